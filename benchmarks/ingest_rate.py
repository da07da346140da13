"""Entries per second a node ingests from a Redis stream (docs/ingest.md).

Starts a redis-server and one ``fastim serve`` (sqlite store, the default) in a
temporary directory, XADDs ``-n`` entries over ``--channels`` channels (each with an
idempotency key) to one stream, and times from the first XADD until the group has read
and acked them all (lag 0, nothing pending):

    .venv/bin/python benchmarks/ingest_rate.py -n 20000 --channels 8 --batch 200
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import orjson
import redis.asyncio as aioredis


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(url: str, n: int, channels: int, batch: int, store: str) -> None:
    r = aioredis.from_url(url)
    while True:  # the node created the stream and its group: it is consuming
        try:
            if await r.exists("bench"):
                break
        except Exception:
            pass
        await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        ch = f"ch{i % channels}"
        pipe.xadd("bench", {"channel": ch, "data": orjson.dumps({"i": i}), "key": f"k{i}"})
        if len(pipe) >= 1000:
            await pipe.execute()
    await pipe.execute()
    t_add = time.perf_counter() - t0
    while True:
        g = (await r.xinfo_groups("bench"))[0]
        if int(g["lag"] or 0) == 0 and int(g["pending"]) == 0:
            break
        await asyncio.sleep(0.01)
    dt = time.perf_counter() - t0
    print(f"{n} entries, {channels} channels, batch {batch}, store {store}: "
          f"{dt:.2f} s, {n / dt:,.0f} entries/s (XADD took {t_add:.2f} s)")  # fmt: skip
    await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--store", default="sqlite")
    a = ap.parse_args()
    d = tempfile.mkdtemp()
    rp, tp, wp = _port(), _port(), _port()
    redis_bin = shutil.which("redis-server") or sys.exit("apt-get install redis-server")
    rs = subprocess.Popen([redis_bin, "--port", str(rp), "--save", "", "--dir", d],
                          stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{rp}/0"
    with open(f"{d}/node.log", "wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "fastim", "serve", "--tcp-port", str(tp),
             "--ws-port", str(wp), "--store", a.store, "--redis-url", url,
             "--ingest-redis-stream", "bench", "--ingest-batch", str(a.batch)],
            cwd=d, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        asyncio.run(measure(url, a.n, a.channels, a.batch, a.store))
    finally:
        node.terminate()
        node.wait(20)
        rs.terminate()
        rs.wait(10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
