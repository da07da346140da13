"""SSE against WebSocket end to end: deliveries/s to N subscribers of one channel.

A node (memory store) is spawned pinned to one CPU (``taskset -c 0``); this process,
pinned to another (CPU 1), holds N subscribers of one channel, all SSE
(``GET /sse?ch=bench``: the ``FMT_SSE`` event encoded once per publish, and the event id
with the channel's position after each write), all HTTP streaming (``POST /stream`` and
a ``sub`` by POST: the same events, no ids) or all WebSocket JSON (``fastim.json``),
and one TCP publisher (the SDK) that keeps ``--window`` publishes of a ~100-byte JSON
document awaiting their puback for ``--duration`` seconds. Subscribers count the
messages in the bytes they receive; the node's CPU time (from /proc) is reported.

    .venv/bin/python benchmarks/sse_e2e.py                      # 1,000 subscribers, 5 s
    .venv/bin/python benchmarks/sse_e2e.py -n 200 -d 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim import _core  # noqa: E402
from fastim.client import connect  # noqa: E402

MARK = b'"op":"msg"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counter(asyncio.Protocol):
    """Counts channel messages in a byte stream (a mark split across reads counted once)."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.msgs = 0
        self.bytes = 0
        self.reads = 0
        self.tail = b""
        self.ready = asyncio.get_running_loop().create_future()
        self.head = b""
        self.sid = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        transport.write(self.first)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        self.bytes += len(data)
        buf = self.tail + data
        self.msgs += buf.count(MARK)
        self.tail = buf[-(len(MARK) - 1) :]
        if not self.sid.done():
            self.head += data
            at = self.head.find(b'"sid":"')
            if at >= 0 and b'"' in self.head[at + 7 :]:
                self.sid.set_result(self.head[at + 7 :].split(b'"', 1)[0].decode())
        if not self.ready.done() and b'"op":"subscribed"' in buf:
            self.ready.set_result(None)


def request(kind: str, port: int) -> tuple[bytes, bytes]:
    host = f"127.0.0.1:{port}".encode()
    if kind == "sse":
        return b"GET /sse?ch=bench HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", b""
    if kind == "http_stream":  # subscribed by a POST: no event ids (fastim.js's case)
        head = b"POST /stream HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 0\r\n\r\n"
        return head, b""
    sub = _core.ws_encode(_core.OP_TEXT, b'{"op":"sub","ch":"bench"}', mask=os.urandom(4))
    head = (
        b"GET /ws HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: fastim.json\r\n\r\n"
    )
    return head + sub, b""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(kind: str, n: int, duration: float, window: int) -> dict[str, Any]:
    tcp, ws = free_port(), free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "fastim", "serve", "--store", "memory"]
    cmd += ["--tcp-port", str(tcp), "--ws-port", str(ws), "--max-connections", str(n + 100)]
    cmd += ["--outbound-cap", str(64 << 20)]
    proc = subprocess.Popen(  # noqa: ASYNC220 - before any connection: nothing to block
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    while "listening" not in proc.stdout.readline():
        if proc.poll() is not None:
            raise SystemExit("the node did not start")
    loop = asyncio.get_running_loop()
    subs: list[Counter] = []
    for _ in range(n):
        first, _ = request(kind, ws)
        c = Counter(first)
        await loop.create_connection(lambda: c, "127.0.0.1", ws)  # noqa: B023 - awaited here
        subs.append(c)
        if kind == "http_stream":
            sid = await c.sid
            body = b'{"op":"sub","ch":"bench"}'
            r, w = await asyncio.open_connection("127.0.0.1", ws)
            w.write(
                b"POST /stream/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (sid.encode(), len(body), body)
            )
            await r.read()
            w.close()
    await asyncio.gather(*(c.ready for c in subs))
    doc = {"sym": "ACME", "px": 101.25, "qty": 300, "side": "buy", "note": "x" * 40}
    pub = await connect(f"tcp://127.0.0.1:{tcp}")
    sent = 0
    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    before = sum(c.msgs for c in subs)
    while time.perf_counter() - t0 < duration:
        await asyncio.gather(*(pub.publish("bench", doc) for _ in range(window)))
        sent += window
    await asyncio.sleep(0.5)  # the last deliveries
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(proc.pid) - cpu0
    got = sum(c.msgs for c in subs) - before
    await pub.aclose()
    proc.terminate()
    proc.wait()
    return {
        "transport": kind,
        "subscribers": n,
        "published": sent,
        "deliveries": got,
        "complete": got == sent * n,
        "deliveries_per_s": round(got / elapsed),
        "node_cpu_s": round(cpu, 2),
        "node_us_per_delivery": round(cpu / max(1, got) * 1e6, 3),
        "deliveries_per_read": round(got / max(1, sum(c.reads for c in subs)), 1),
        "bytes_per_delivery": round(sum(c.bytes for c in subs) / max(1, got + n), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="subscribers")
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    import uvloop

    rows = []
    for kind in ("websocket", "sse", "http_stream") * args.runs:
        rows.append(uvloop.run(run(kind, args.n, args.duration, args.window)))
        if not args.json:
            print(rows[-1], flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
