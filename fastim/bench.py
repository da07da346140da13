"""``fastim bench``: end-to-end fan-out load against a node (this one, or any fastim URL).

N subscribers spread over several worker processes (so the load generator is not the
bottleneck: each worker reports the CPU time it used), one publisher with at most
``--inflight`` publishes awaiting their ack, or a fixed ``--rate``. Subscribers read
the node's coalesced writes and count frames in C (FrameDecoder); a sample of them
decodes every message to check order and measure publish-to-delivery latency (the
publisher stamps CLOCK_MONOTONIC, which every process on the machine shares).

At the end: deliveries/s, latency percentiles, loss and reordering, and the CPU the
generator itself used, as a table or ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlparse

import orjson

from . import _core
from .protocol import FrameType, pack_hello, pack_sub, type_mask, unpack_ack, unpack_msg

_MSG = int(FrameType.MSG)
_SERVER_TYPES = type_mask(
    frozenset(
        {
            FrameType.WELCOME,
            FrameType.PING,
            FrameType.PONG,
            FrameType.SUBSCRIBED,
            FrameType.PUBACK,
            FrameType.MSG,
            FrameType.ERROR,
            FrameType.GOAWAY,
        }
    )
)


@dataclass
class WorkerResult:
    connections: int = 0
    received: int = 0  # MSG frames over all connections
    per_conn_min: int = 0
    per_conn_max: int = 0
    sampled: int = 0  # connections whose every message was checked
    reordered: int = 0
    duplicates: int = 0
    latencies_us: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Sub(asyncio.Protocol):
    """One subscriber connection: counts MSG frames; a sampled one checks each."""

    def __init__(self, channel: str, sample: bool, out: WorkerResult) -> None:
        self.dec = _core.FrameDecoder(64 << 20, _SERVER_TYPES)
        self.channel = channel
        self.sample = sample
        self.out = out
        self.count = 0
        self.last_off = -1
        self.subscribed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = _core.encode_frame(FrameType.HELLO, pack_hello(1, 1, b'{"client":"fastim-bench"}'))
        sub = _core.encode_frame(FrameType.SUB, pack_sub(FrameType.SUB, 1, self.channel))
        transport.write(hello + sub)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.dec.feed(data)
        except Exception as e:  # a broken stream is a result, not a crash
            self.out.errors.append(f"decode: {e}")
            return
        if not self.sample and self.subscribed.done():
            self.count += len(frames)  # pings are rare and excluded below
            for t, _p in frames:
                if t != _MSG:
                    self.count -= 1
                    self._control(t, _p)
            return
        now = time.monotonic_ns()
        for t, p in frames:
            if t == _MSG:
                self.count += 1
                if self.sample:
                    off, _ch, payload = unpack_msg(p)
                    if self.last_off >= 0 and off != self.last_off + 1:
                        if off <= self.last_off:
                            self.out.duplicates += 1
                        else:
                            self.out.reordered += 1
                    self.last_off = off
                    stamp = orjson.loads(payload)["t"]
                    self.out.latencies_us.append((now - stamp) / 1000.0)
            else:
                self._control(t, p)

    def _control(self, t: int, p: bytes) -> None:
        if t == FrameType.SUBSCRIBED and not self.subscribed.done():
            self.subscribed.set_result(unpack_ack(p)[1])
        elif t == FrameType.PING and self.transport is not None:
            self.transport.write(_core.encode_frame(FrameType.PONG, p))
        elif t in (FrameType.ERROR, FrameType.GOAWAY):
            self.out.errors.append(f"server frame 0x{t:02x}: {p[:80]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before SUBSCRIBED"))


async def _worker_main(
    host: str, port: int, channel: str, n: int, n_sample: int, pipe: Connection, ip_base: int
) -> None:
    loop = asyncio.get_running_loop()
    res = WorkerResult(connections=n)
    subs: list[_Sub] = []
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            local = None
            if ip_base:
                local = (f"127.0.0.{ip_base + (i // 50000)}", 0)
            _t, proto = await loop.create_connection(
                lambda: _Sub(channel, i < n_sample, res), host, port, local_addr=local
            )
            subs.append(proto)
            await asyncio.wait_for(proto.subscribed, 30)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    except Exception as e:
        pipe.send(("error", f"connect: {e!r}"))
        return
    pipe.send(("ready", len(subs)))
    # wait for the expected total, then for the parent's "stop"
    cmd = await loop.run_in_executor(None, pipe.recv)
    assert cmd[0] == "go"
    t0 = time.monotonic()
    c0 = time.process_time()
    expected: int | None = None
    deadline: float | None = None
    while True:
        if pipe.poll():
            msg = pipe.recv()
            if msg[0] == "expect":
                expected, drain = msg[1], msg[2]
                deadline = time.monotonic() + drain
        if expected is not None and (
            all(s.count >= expected for s in subs) or (deadline and time.monotonic() > deadline)
        ):
            break
        await asyncio.sleep(0.02)
    res.cpu_s = time.process_time() - c0
    res.wall_s = time.monotonic() - t0
    counts = [s.count for s in subs]
    res.received = sum(counts)
    res.per_conn_min = min(counts) if counts else 0
    res.per_conn_max = max(counts) if counts else 0
    res.sampled = min(n_sample, n)
    for s in subs:
        if s.transport is not None:
            s.transport.close()
    pipe.send(("result", asdict(res)))


def _worker(
    host: str, port: int, channel: str, n: int, n_sample: int, pipe: Connection, ip_base: int
) -> None:
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except Exception:
        pass
    try:
        import uvloop

        uvloop.run(_worker_main(host, port, channel, n, n_sample, pipe, ip_base))
    except Exception as e:  # report, don't hang the parent
        pipe.send(("error", repr(e)))


async def _publisher(
    host: str,
    port: int,
    channel: str,
    duration: float,
    rate: float,
    inflight: int,
    size: int,
    progress: bool,
) -> tuple[int, float]:
    """Publish for ``duration`` seconds; return (acked messages, seconds)."""
    reader, writer = await asyncio.open_connection(host, port)
    dec = _core.FrameDecoder(64 << 20, _SERVER_TYPES)
    writer.write(_core.encode_frame(FrameType.HELLO, pack_hello(1, 1)))
    pad = "x" * max(0, size - 40)
    acked = 0
    sent = 0
    window = asyncio.Semaphore(inflight)
    done = asyncio.Event()

    async def read_acks() -> None:
        nonlocal acked
        while True:
            data = await reader.read(1 << 16)
            if not data:
                done.set()
                return
            for t, p in dec.feed(data):
                if t == FrameType.PUBACK:
                    acked += 1
                    window.release()
                elif t == FrameType.PING:
                    writer.write(_core.encode_frame(FrameType.PONG, p))
                elif t in (FrameType.ERROR, FrameType.GOAWAY):
                    raise RuntimeError(f"publisher got frame 0x{t:02x}: {p!r}")

    rtask = asyncio.create_task(read_acks())
    t0 = time.monotonic()
    end = t0 + duration
    next_report = t0 + 1.0
    interval = 1.0 / rate if rate > 0 else 0.0
    while time.monotonic() < end:
        await window.acquire()
        if interval:
            target = t0 + sent * interval
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        data = b'{"t":%d,"p":"%s"}' % (time.monotonic_ns(), pad.encode())
        writer.write(
            _core.encode_frame(FrameType.PUB, pack_sub(FrameType.PUB, sent + 1, channel, data))
        )
        sent += 1
        if progress and time.monotonic() >= next_report:
            next_report += 1.0
            el = time.monotonic() - t0
            print(
                f"\r  running {el:4.1f}s  published {sent:,}  ({sent / el:,.0f} msg/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )
    # wait for the last acks
    wait_until = time.monotonic() + 10
    while acked < sent and time.monotonic() < wait_until:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    rtask.cancel()
    writer.close()
    if progress:
        print(file=sys.stderr)
    return acked, elapsed


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[k]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_node(core: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "fastim",
        "serve",
        "--tcp-port",
        str(port),
        "--ws-port",
        "0",
        "--log-level",
        "warning",
        "--node-id",
        "bench-node",
    ]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", core, *cmd]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"tcp://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("fastim bench: the spawned node did not start")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark; return the result as a dict."""
    node = None
    url = args.url
    if url is None:
        node, url = _spawn_node(args.server_cpu)
    try:
        u = urlparse(url)
        if u.scheme != "tcp" or not u.hostname or not u.port:
            raise SystemExit(f"fastim bench: --url must be tcp://host:port, got {url!r}")
        host, port = u.hostname, u.port
        channel = args.channel
        procs = max(1, args.processes)
        share = [
            args.subscribers // procs + (1 if i < args.subscribers % procs else 0)
            for i in range(procs)
        ]
        sample_each = max(1, args.sample // procs)
        ctx = mp.get_context("spawn")
        pipes = []
        workers = []
        progress = not args.json and not args.quiet
        if progress:
            print(
                f"fastim bench → {url}: {args.subscribers:,} subscribers in {procs} "
                f"process(es), {args.size}-byte messages, "
                + (
                    f"{args.rate:g} msg/s"
                    if args.rate
                    else f"saturation (≤{args.inflight} in flight)"
                )
                + f", {args.duration:g}s",
                file=sys.stderr,
            )
        for i, n in enumerate(share):
            a, b = ctx.Pipe()
            ip_base = (1 + i * 8) if args.spread_ips else 0
            p = ctx.Process(
                target=_worker,
                args=(host, port, channel, n, min(sample_each, n), b, ip_base),
                daemon=True,
            )
            if args.client_cpu is not None and hasattr(os, "sched_setaffinity"):
                pass  # affinity set after start, below
            p.start()
            if args.client_cpu is not None and hasattr(os, "sched_setaffinity") and p.pid:
                os.sched_setaffinity(p.pid, {int(c) for c in args.client_cpu.split(",")})
            pipes.append(a)
            workers.append(p)
        ready = 0
        t_conn = time.monotonic()
        for a in pipes:
            msg = a.recv()
            if msg[0] != "ready":
                raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
            ready += msg[1]
            if progress:
                print(
                    f"\r  connected {ready:,}/{args.subscribers:,}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        connect_s = time.monotonic() - t_conn
        if progress:
            print(f"  ({connect_s:.1f}s)", file=sys.stderr)
        for a in pipes:
            a.send(("go",))
        if args.client_cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
        c0 = time.process_time()
        acked, elapsed = _run_loop(
            _publisher(
                host, port, channel, args.duration, args.rate, args.inflight, args.size, progress
            )
        )
        pub_cpu = time.process_time() - c0
        for a in pipes:
            a.send(("expect", acked, args.drain))
        results = [WorkerResult(**a.recv()[1]) for a in pipes]
        for p in workers:
            p.join(5)
        received = sum(r.received for r in results)
        expected = acked * args.subscribers
        lat = [x for r in results for x in r.latencies_us]
        worker_util = max((r.cpu_s / r.wall_s) for r in results if r.wall_s) if results else 0.0
        out: dict[str, Any] = {
            "url": url,
            "subscribers": args.subscribers,
            "size": args.size,
            "mode": "rate" if args.rate else "saturation",
            "rate": args.rate,
            "inflight": args.inflight,
            "duration_s": round(elapsed, 3),
            "published": acked,
            "publish_per_s": round(acked / elapsed, 1),
            "deliveries": received,
            "deliveries_expected": expected,
            "deliveries_per_s": round(received / elapsed, 1),
            "lost": max(0, expected - received),
            "reordered": sum(r.reordered for r in results),
            "duplicates": sum(r.duplicates for r in results),
            "latency_us": {
                "samples": len(lat),
                "p50": round(_pct(lat, 50), 1),
                "p90": round(_pct(lat, 90), 1),
                "p99": round(_pct(lat, 99), 1),
                "max": round(max(lat), 1) if lat else None,
            },
            "generator": {
                "processes": procs,
                "worker_cpu_max_pct": round(100 * worker_util, 1),
                "publisher_cpu_pct": round(100 * pub_cpu / elapsed, 1),
            },
            "connect_s": round(connect_s, 2),
            "errors": [e for r in results for e in r.errors][:20],
        }
        return out
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def render(r: dict[str, Any]) -> str:
    lat = r["latency_us"]
    g = r["generator"]
    rows = [
        ("target", r["url"]),
        ("subscribers", f"{r['subscribers']:,}"),
        (
            "mode",
            f"{r['mode']}"
            + (f" {r['rate']:g} msg/s" if r["rate"] else f" (≤{r['inflight']} in flight)"),
        ),
        ("message size", f"{r['size']} B"),
        (
            "published (acked)",
            f"{r['published']:,} in {r['duration_s']:.2f}s = {r['publish_per_s']:,.0f}/s",
        ),
        ("deliveries", f"{r['deliveries']:,} of {r['deliveries_expected']:,}"),
        ("deliveries/s", f"{r['deliveries_per_s']:,.0f}"),
        (
            "latency p50/p90/p99",
            f"{lat['p50']:,.0f} / {lat['p90']:,.0f} / {lat['p99']:,.0f} µs"
            f" ({lat['samples']:,} samples)",
        ),
        ("lost / reordered / dup", f"{r['lost']:,} / {r['reordered']:,} / {r['duplicates']:,}"),
        (
            "generator CPU",
            f"worker max {g['worker_cpu_max_pct']}%, publisher {g['publisher_cpu_pct']}%"
            f" ({g['processes']} procs)",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(w)}  {v}" for k, v in rows]
    if r["errors"]:
        lines.append("  errors: " + "; ".join(r["errors"]))
    return "\n".join(lines)


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure fan-out: N subscribers, one publisher, deliveries/s and latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="fastim node to measure (tcp://host:port); default: spawn one")
    p.add_argument("--subscribers", "-n", type=int, default=1000)
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds of publishing")
    p.add_argument("--rate", "-r", type=float, default=0.0, help="msg/s; 0 = saturation")
    p.add_argument(
        "--inflight", "-w", type=int, default=64, help="unacked publishes at most (saturation)"
    )
    p.add_argument("--size", "-s", type=int, default=64, help="message size, bytes (≥ 40)")
    p.add_argument(
        "--processes",
        "-p",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="subscriber worker processes",
    )
    p.add_argument("--sample", type=int, default=20, help="subscribers that check every message")
    p.add_argument("--channel", default="bench")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers")
    p.add_argument("--server-cpu", default="0", help="CPU to pin a spawned node to (taskset)")
    p.add_argument("--client-cpu", default=None, help="CPUs for the generator, e.g. 1")
    p.add_argument(
        "--spread-ips",
        action="store_true",
        help="bind subscribers to 127.0.0.x source addresses (for >60k connections)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.subscribers < 1 or args.duration <= 0 or args.inflight < 1:
        print(
            "fastim bench: --subscribers, --duration and --inflight must be positive",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    bad = result["lost"] or result["reordered"] or result["duplicates"] or result["errors"]
    return 1 if bad else 0
