"""Event webhooks end to end: events/s delivered to a local HTTP backend.

A node is spawned (``taskset -c 0`` unless ``--server-cpu -1``) with ``events_url``
pointing at an aiohttp receiver in this process (on the other core), and a namespace
``feed`` with ``events_publish = true``. One SDK client publishes ``-n`` messages to
``feed:x`` (``--window`` in flight): each is a ``publish`` event, written to the store's
outbox in the writer's group commit, then POSTed in batches of ``--batch``. Measured:

* **delivered/s**: unique events received (2xx answered) over the time from the first
  publish to the last event received: the whole pipeline, outbox included;
* **drain/s**: the same events delivered from a backlog: the receiver answers 503 until
  all ``-n`` are in the outbox, then 204; the time from its first 204 to the last event
  (the sender alone: read a batch, POST, delete);
* the node's CPU seconds over the run.

    .venv/bin/python benchmarks/events_e2e.py -n 20000 --batch 100 --batch 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiohttp import web

from fastim.client import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    def __init__(self) -> None:
        self.port = _free_port()
        self.ids: set[str] = set()
        self.first = 0.0
        self.last = 0.0
        self.refuse = False
        self.posts = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.posts += 1
        if self.refuse:
            return web.Response(status=503)
        now = time.perf_counter()
        if not self.first:
            self.first = now
        for e in body["events"]:
            self.ids.add(e["id"])
        self.last = now
        return web.Response(status=204)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/events", self.handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(cmd: list[str], work: Path) -> subprocess.Popen[bytes]:
    """The node, its log in ``work`` (a file: a pipe nobody reads would block it)."""
    with open(work / "node.log", "wb") as log:
        return subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)


async def one(n: int, batch: int, window: int, cpu: int, drain: bool) -> dict[str, float]:
    rx = Receiver()
    runner = await rx.start()
    work = Path(tempfile.mkdtemp(prefix="fastim-events-bench-"))
    (work / "fastim.toml").write_text(
        "publish_rate = 0.0\n[namespaces.feed]\nevents_publish = true\n"
    )
    tcp = _free_port()
    cmd = [
        sys.executable, "-m", "fastim", "serve", "--config", str(work / "fastim.toml"),
        "--tcp-port", str(tcp), "--ws-port", str(_free_port()),
        "--events-url", f"http://127.0.0.1:{rx.port}/events",
        "--events-batch", str(batch), "--events-retry-max", "0.2",
    ]  # fmt: skip
    if cpu >= 0:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = _spawn(cmd, work)
    try:
        while "listening" not in (work / "node.log").read_text():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        rx.refuse = drain
        client = await connect(f"tcp://127.0.0.1:{tcp}", reconnect=False)
        cpu0 = _cpu(proc.pid)
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(window)

        async def pub(i: int) -> None:
            async with sem:
                await client.publish("feed:x", {"i": i})

        await asyncio.gather(*(pub(i) for i in range(n)))
        if drain:
            await asyncio.sleep(0.5)  # every event in the outbox (acked publishes + a tick)
            rx.refuse = False
        deadline = time.monotonic() + 300
        while len(rx.ids) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(rx.ids)} of {n} events delivered")
            await asyncio.sleep(0.01)
        cpu_s = _cpu(proc.pid) - cpu0
        await client.aclose()
        span = rx.last - (rx.first if drain else t0)
        return {"events_per_s": n / span, "node_cpu_s": cpu_s, "posts": rx.posts}
    finally:
        proc.terminate()
        proc.wait(10)
        await runner.cleanup()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=20_000, help="publish events per run")
    p.add_argument("--batch", type=int, action="append", help="events_batch (repeatable)")
    p.add_argument("--window", type=int, default=256, help="publishes in flight")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server-cpu", type=int, default=0, help="taskset CPU of the node (-1: none)")
    a = p.parse_args()
    print("| events_batch | mode | events/s delivered (median) | node CPU s | POSTs |")
    print("|---|---|---|---|---|")
    for batch in a.batch or [100, 1000]:
        for drain in (False, True):
            runs = [await one(a.n, batch, a.window, a.server_cpu, drain) for _ in range(a.runs)]
            runs.sort(key=lambda r: r["events_per_s"])
            m = runs[len(runs) // 2]
            mode = "drain a backlog" if drain else "publish → delivered"
            each = ", ".join(f"{r['events_per_s']:,.0f}" for r in runs)
            print(
                f"| {batch} | {mode} | {m['events_per_s']:,.0f} ({each}) | "
                f"{m['node_cpu_s']:.2f} | {m['posts']:.0f} |"
            )


if __name__ == "__main__":
    asyncio.run(main())
