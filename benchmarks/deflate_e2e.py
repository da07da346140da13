"""permessage-deflate end to end: bytes on the wire and deliveries/s, with and without it.

A node is spawned pinned to one CPU (``taskset -c 0``); this process, pinned to another
(CPU 1), holds N WebSocket subscribers of one channel (JSON, ``fastim.json``), all
offering permessage-deflate or none of them, and one publisher connection that keeps at
most ``--window`` publishes of a realistic ~1 KiB JSON document awaiting their puback.
Subscribers count the messages and the bytes the node sent them (WebSocket frames:
headers included, TCP/IP headers not) with the compiled parser in client mode; a few
sampled subscribers inflate and decode every message and check its offset (no loss, no
reordering).

    .venv/bin/python benchmarks/deflate_e2e.py                 # 1,000 subscribers, 3 runs each
    .venv/bin/python benchmarks/deflate_e2e.py -n 200 -d 3 --runs 1 --json

The node's CPU time (from /proc) and this process's are reported with each run, so it
can be seen which side was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim import _core  # noqa: E402
from fastim.bench.spawn import wait_listening  # noqa: E402

OP_TEXT = _core.OP_TEXT
OP_PING = _core.OP_PING
OP_CLOSE = _core.OP_CLOSE
COMPRESSED = _core.OP_COMPRESSED
OFFER = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"

_WORDS = [
    "the",
    "a",
    "price",
    "update",
    "order",
    "book",
    "trade",
    "market",
    "buy",
    "sell",
    "limit",
    "stop",
    "fill",
    "partial",
    "new",
    "meeting",
    "tomorrow",
    "please",
    "check",
    "review",
    "deploy",
    "release",
    "build",
    "test",
    "merge",
    "branch",
    "fix",
    "bug",
    "issue",
    "ticket",
    "customer",
    "support",
    "thanks",
    "great",
    "sounds",
    "good",
    "let",
    "me",
    "know",
    "when",
    "lunch",
]


def chat_message(i: int, rng: random.Random | None = None) -> dict[str, Any]:
    """A chat message event as a messaging app sends it: ~1 KiB of JSON with nested objects.

    Realistic for compression: repeated keys, URLs, ids, and some free text; not random
    bytes. Deterministic for a given ``i``.
    """
    r = rng or random.Random(i)
    uid = r.randrange(10_000, 99_999)
    return {
        "type": "message.created",
        "id": f"msg_{r.getrandbits(64):016x}",
        "room": {"id": "room_7f3a", "name": "engineering", "kind": "channel"},
        "ts": 1_732_660_000_000 + i * 137,
        "user": {
            "id": uid,
            "name": r.choice(["Alice Martin", "Bob Chen", "Carol Diaz", "Dave Okafor"]),
            "handle": r.choice(["alice", "bob", "carol", "dave"]),
            "avatar": f"https://cdn.example.com/avatars/{uid}/64x64.png",
            "roles": ["member"] + (["moderator"] if r.random() < 0.2 else []),
            "status": "online",
        },
        "text": " ".join(r.choice(_WORDS) for _ in range(r.randrange(40, 60))),
        "mentions": [{"id": r.randrange(10_000, 99_999), "handle": r.choice(["bob", "carol"])}],
        "reactions": [
            {"emoji": "thumbsup", "count": r.randrange(1, 9), "me": False},
            {"emoji": "eyes", "count": r.randrange(1, 4), "me": r.random() < 0.5},
        ],
        "attachments": [
            {
                "kind": "link",
                "url": f"https://github.com/example/project/pull/{r.randrange(1000, 9999)}",
                "title": "Fix reconnect backoff when the server restarts",
                "site": "GitHub",
            }
        ],
        "thread": {"id": f"thr_{r.getrandbits(32):08x}", "replies": r.randrange(0, 20)},
        "edited": False,
        "pinned": False,
    }


def ticker_message(i: int) -> dict[str, Any]:
    """An order-book snapshot (~1 KiB): 14 price levels a side, the same keys repeated."""
    r = random.Random(i)
    mid = 64_000 + r.uniform(-50, 50)

    def side(sign: int) -> list[dict[str, float]]:
        return [
            {"px": round(mid + sign * k * 0.5, 2), "qty": round(r.uniform(0.01, 3), 4)}
            for k in range(14)
        ]

    return {
        "type": "book.snapshot",
        "symbol": "BTC-USD",
        "seq": 1_000_000 + i,
        "ts": 1_732_660_000_000 + i * 100,
        "bids": side(-1),
        "asks": side(1),
    }


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _deflate_alone(data: bytes, level: int) -> int:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return len(c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)) - 4


def _deflate_stream(messages: list[bytes], level: int) -> float:
    """Mean compressed size with context takeover (what no_context_takeover gives up)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    total = 0
    for m in messages:
        total += len(c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH)) - 4
    return total / len(messages)


def ratio_table(level: int, count: int = 200) -> list[dict[str, Any]]:
    """Compressed size of the messages as the node sends them, alone and with context."""
    rows = []
    for name, make in (("chat", chat_message), ("ticker", ticker_message)):
        wire = [
            b'{"op":"msg","ch":"bench","off":%d,"data":%s}' % (i + 1, dumps(make(i)))
            for i in range(count)
        ]
        raw = statistics.mean(len(m) for m in wire)
        alone = statistics.mean(_deflate_alone(m, level) for m in wire)
        stream = _deflate_stream(wire, level)
        rows.append(
            {
                "message": name,
                "raw_bytes": round(raw, 1),
                "no_context_takeover_bytes": round(alone, 1),
                "ratio": round(alone / raw, 3),
                "context_takeover_bytes": round(stream, 1),
                "context_takeover_ratio": round(stream / raw, 3),
            }
        )
    return rows


# ---------------------------------------------------------------------------- clients


@dataclass
class Totals:
    messages: int = 0
    wire_bytes: int = 0
    compressed: int = 0
    checked: int = 0
    gaps: int = 0
    errors: list[str] = field(default_factory=list)


def upgrade(port: int, deflate: bool) -> bytes:
    key = base64.b64encode(os.urandom(16))
    ext = b"Sec-WebSocket-Extensions: " + OFFER + b"\r\n" if deflate else b""
    return (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: fastim.json\r\n%s\r\n" % (port, key, ext)
    )


def text_frame(payload: bytes) -> bytes:
    return _core.ws_encode(OP_TEXT, payload, mask=os.urandom(4))


class Conn(asyncio.Protocol):
    """A WebSocket client connection: the upgrade by hand, then the compiled parser.

    Once subscribed, a subscriber that checks nothing counts ``len(parser.feed(data))``:
    no Python per message, so that the generator is not the limit (the node is started
    with pings off, so every event is a channel message; a close ends the run with an
    error).
    """

    def __init__(self, port: int, deflate: bool, totals: Totals) -> None:
        self.port = port
        self.offer = deflate
        self.totals = totals
        self.head = b""
        self.parser: _core.WSParser | None = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.negotiated: str | None = None
        self.counting = False  # the lean path (see the class docstring)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(upgrade(self.port, self.offer))  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during setup: {exc}"))
        elif not self.closing:
            self.totals.errors.append(f"connection lost: {exc}")

    closing = False

    def data_received(self, data: bytes) -> None:
        if self.counting:
            t = self.totals
            t.wire_bytes += len(data)
            t.messages += len(self.parser.feed(data))  # type: ignore[union-attr]
            return
        if self.parser is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.head = b""
            if " 101 " not in head.split("\r\n", 1)[0]:
                self.ready.set_exception(ConnectionError(head))
                return
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "sec-websocket-extensions":
                    self.negotiated = v.strip()
            self.parser = _core.WSParser(1 << 30, client=True, deflate=self.negotiated is not None)
            self.upgraded()
        self.on_bytes(len(data))
        for op, payload in self.parser.feed(data):
            if op == OP_PING:
                assert self.transport is not None
                self.transport.write(_core.ws_encode(_core.OP_PONG, payload, mask=os.urandom(4)))
            elif op == OP_CLOSE:
                self.totals.errors.append(f"closed by the node: {_core.ws_parse_close(payload)}")
            elif op & 0x0F == OP_TEXT:
                self.on_text(op, payload)

    def upgraded(self) -> None: ...

    def on_bytes(self, n: int) -> None: ...

    def on_text(self, op: int, payload: bytes) -> None: ...


class Subscriber(Conn):
    """Counts channel messages; a sampled one inflates, decodes and checks each
    (:meth:`check`: here the offsets follow each other; benchmarks/delta_e2e.py checks
    the documents too)."""

    channel = b"bench"

    def __init__(self, port: int, deflate: bool, totals: Totals, sample: bool) -> None:
        super().__init__(port, deflate, totals)
        self.sample = sample
        self.subscribed = False
        self.last_off = 0
        self.count = 0
        self.publisher: Publisher | None = None  # set on the probe: wakes the publisher

    def sub_command(self) -> bytes:
        return b'{"op":"sub","ch":"%s","id":1}' % self.channel

    def upgraded(self) -> None:
        assert self.transport is not None
        self.transport.write(text_frame(self.sub_command()))

    def on_bytes(self, n: int) -> None:
        if self.subscribed:
            self.totals.wire_bytes += n

    def on_text(self, op: int, payload: bytes) -> None:
        t = self.totals
        if not self.subscribed:
            self.subscribed = True
            self.counting = not self.sample
            self.ready.set_result(None)
            return
        t.messages += 1
        self.count += 1
        if self.publisher is not None:
            self.publisher.fill()
        if op & COMPRESSED:
            t.compressed += 1
        if not self.sample:
            return
        if op & COMPRESSED:
            payload = _core.ws_inflate(payload, 1 << 30, text=True)
        msg = json.loads(payload)
        off = msg["off"]
        if self.last_off and off != self.last_off + 1:
            t.gaps += 1
        self.last_off = off
        self.check(off, msg, payload)

    def check(self, off: int, msg: dict[str, Any], payload: bytes) -> None:
        """A sampled message, decoded (``payload``: its JSON text)."""
        self.totals.checked += 1


class Publisher(Conn):
    """Keeps published − received by the probe (the last subscriber) ≤ ``window``,
    publishing ``bodies`` (JSON documents) in turn to ``channel``.

    Throttling on a subscriber, not on pubacks, bounds what waits in the node's
    out-rings: the run measures deliveries, not how fast rings fill.
    """

    def __init__(
        self,
        port: int,
        totals: Totals,
        window: int,
        probe: Subscriber,
        bodies: list[bytes],
        channel: bytes = b"bench",
    ) -> None:
        super().__init__(port, False, totals)
        self.window = window
        self.probe = probe
        self.sent = 0
        self.acked = 0
        self.running = False
        self.frames = [
            text_frame(b'{"op":"pub","ch":"%s","data":%s}' % (channel, b)) for b in bodies
        ]

    def upgraded(self) -> None:
        self.ready.set_result(None)

    def start(self) -> None:
        self.running = True
        self.fill()

    def fill(self) -> None:
        assert self.transport is not None
        out = []
        while self.running and self.sent - self.probe.count < self.window:
            out.append(self.frames[self.sent % len(self.frames)])
            self.sent += 1
        if out:
            self.transport.write(b"".join(out))

    def on_text(self, op: int, payload: bytes) -> None:
        if payload.startswith(b'{"op":"puback"'):
            self.acked += 1
        else:
            self.totals.errors.append(payload[:200].decode("utf-8", "replace"))


# ---------------------------------------------------------------------------- one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_node(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "fastim", "serve", "--tcp-port", "0", "--ws-port", str(port),
        "--ws-compression", str(args.level), "--log-level", "warning",
        "--ping-interval", "3600",
    ]  # fmt: skip
    if args.server_cpu >= 0:
        cmd = ["taskset", "-c", str(args.server_cpu), *cmd]
    env = {**os.environ, "PYTHONPATH": str(args.root)}
    proc = subprocess.Popen(cmd, env=env, cwd=args.root)
    wait_listening(port, proc, "node", timeout=15)
    return proc


async def measure(
    args: argparse.Namespace,
    node: subprocess.Popen[bytes],
    port: int,
    make_sub: Callable[[Totals, bool], Subscriber],
    bodies: list[bytes],
    channel: bytes,
    counter: Callable[[Totals, list[Subscriber]], int],
) -> tuple[list[Subscriber], dict[str, Any]]:
    """One run against a started ``node``, which is stopped at the end (also used by
    benchmarks/delta_e2e.py).

    ``args.subscribers`` from ``make_sub(totals, sample)`` (``args.sample`` of them
    check every message, the last one among them: it paces the publisher), the
    publisher of ``bodies`` on ``channel``, ``args.warmup`` seconds, then
    ``args.duration`` measured. Returns the subscribers and the figures common to every
    such run, with ``share``: how much ``counter`` grew per message checked meanwhile.
    """
    loop = asyncio.get_running_loop()
    totals = Totals()
    try:
        subs: list[Subscriber] = []
        step = max(1, args.subscribers // args.sample)
        for i in range(args.subscribers):
            last = i == args.subscribers - 1
            sub = make_sub(totals, i % step == 0 or last)
            await loop.create_connection(lambda sub=sub: sub, "127.0.0.1", port)  # type: ignore[misc]
            subs.append(sub)
        await asyncio.wait_for(asyncio.gather(*(s.ready for s in subs)), 60)
        probe = subs[-1]
        assert probe.sample
        pub = Publisher(port, totals, args.window, probe, bodies, channel)
        probe.publisher = pub
        await loop.create_connection(lambda: pub, "127.0.0.1", port)
        await asyncio.wait_for(pub.ready, 10)
        pub.start()
        await asyncio.sleep(args.warmup)
        m0, b0, k0, c0 = totals.messages, totals.wire_bytes, totals.checked, counter(totals, subs)
        s0, t0, my0 = cpu_seconds(node.pid), time.monotonic(), time.process_time()
        await asyncio.sleep(args.duration)
        m1, b1, k1, c1 = totals.messages, totals.wire_bytes, totals.checked, counter(totals, subs)
        s1, t1, my1 = cpu_seconds(node.pid), time.monotonic(), time.process_time()
        pub.running = False
        for c in (*subs, pub):
            c.closing = True
        wall = t1 - t0
        deliveries = m1 - m0
        return subs, {
            "subscribers": args.subscribers,
            "deliveries_per_s": round(deliveries / wall),
            "publishes_per_s": round(deliveries / wall / args.subscribers, 1),
            "wire_bytes_per_delivery": round((b1 - b0) / max(1, deliveries), 1),
            "share": round((c1 - c0) / max(1, k1 - k0), 3),
            "node_cpu": round((s1 - s0) / wall, 3),
            "client_cpu": round((my1 - my0) / wall, 3),
            "node_us_per_delivery": round((s1 - s0) / max(1, deliveries) * 1e6, 3),
            "checked": totals.checked,
            "gaps": totals.gaps,
            "errors": totals.errors[:5],
        }
    finally:
        node.terminate()
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()


async def run_once(args: argparse.Namespace, deflate: bool) -> dict[str, Any]:
    port = free_port()
    subs, r = await measure(
        args,
        start_node(args, port),
        port,
        lambda totals, sample: Subscriber(port, deflate, totals, sample),
        [dumps(chat_message(i)) for i in range(256)],
        Subscriber.channel,
        lambda totals, _subs: totals.compressed,
    )
    r["compressed_share"] = r.pop("share")  # of the messages checked
    return {"deflate_offered": deflate, "negotiated": subs[0].negotiated, **r}


MEDIANS = (
    "deliveries_per_s",
    "wire_bytes_per_delivery",
    "node_us_per_delivery",
    "node_cpu",
    "client_cpu",
    "compressed_share",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--subscribers", type=int, default=1000)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument(
        "--window", type=int, default=32, help="published - received by the probe, at most"
    )
    p.add_argument("--level", type=int, default=6, help="the node's ws_compression")
    p.add_argument("--runs", type=int, default=3, help="runs per mode; medians reported")
    p.add_argument("--sample", type=int, default=10, help="subscribers that check every message")
    p.add_argument("--server-cpu", type=int, default=0, help="taskset CPU of the node (-1: none)")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of this process (-1: none)")
    p.add_argument("--root", type=Path, default=ROOT, help="source tree the node runs from")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result: dict[str, Any] = {"ratios": ratio_table(args.level), "runs": []}
    for deflate in (False, True):
        for _ in range(args.runs):
            r = runner(run_once(args, deflate))
            result["runs"].append(r)
            if not args.json:
                print(json.dumps(r), file=sys.stderr)
    summary = []
    for deflate in (False, True):
        runs = [r for r in result["runs"] if r["deflate_offered"] == deflate]
        summary.append(
            {
                "mode": "permessage-deflate" if deflate else "plain",
                **{k: statistics.median(r[k] for r in runs) for k in MEDIANS},
                "gaps": sum(r["gaps"] for r in runs),
            }
        )
    result["summary"] = summary
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result["ratios"]:
            print(json.dumps(row))
        for row in summary:
            print(json.dumps(row))
    bad = any(r["gaps"] or r["errors"] for r in result["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
