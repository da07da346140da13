"""Stores end to end: publish throughput (acked vs not waiting for the store) and the
time to recover 10,000 missed messages, for the memory, sqlite and redis stores.

For each store a node is spawned pinned to CPU 0 (``taskset -c 0``); this process runs
on CPU 1 (and, for the redis store, the redis-server it starts on a free port too: the
node's core is the one measured, Redis and the clients share the other one). Per store:

* **publish/s, durable, acked**: one raw TCP connection keeps ``--window`` (64) PUB
  frames in flight, sending the next one as each PUBACK arrives: the node acknowledges a
  publish after the store accepted it (one ``append_many`` per channel per loop tick).
  No subscribers: the publish path alone. The node's per-connection ``publish_rate``
  limit is turned off in its config (this one connection is meant to saturate it). The
  CPU columns (node, this process) say which side was the limit.
* **publish/s, durable = false**: the same, on a channel of a namespace configured
  ``[namespaces.fast] durable = false`` (config file): the node numbers, keeps (in
  memory) and acknowledges the message without waiting for the store. This is the
  "fire-and-forget" of the store: still one PUBACK per publish, but nothing written.
  On the memory store both columns take the same path (history is in the node anyway).
* **recover 10k**: 10,000+ messages are published to a fresh channel
  (``history_size`` 20,000, ``recovery_max`` 10,000); then a new connection subscribes
  with ``since`` = (top - 10,000, epoch) and the time from sending the subscribe to the
  10,000th recovered MSG is measured, with a raw client (the node's cost) and with the
  SDK (``Client.subscribe(since=...)`` then 10,000 ``get()``: what an application
  waits). *warm*: the node still holds the messages in its history ring; *cold*: after a
  restart of the node (graceful), so they come from the store (not for memory: its
  history does not survive a restart).

Each figure is the median of ``--runs`` (3) runs. Prints a markdown table; ``--out``
writes everything as JSON.

    .venv/bin/python benchmarks/store_e2e.py --out /tmp/store_e2e.json
    .venv/bin/python benchmarks/store_e2e.py --stores sqlite --runs 1 --duration 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from fastim import _core, protocol  # noqa: E402
from fastim.bench.spawn import wait_listening  # noqa: E402
from fastim.client import connect  # noqa: E402
from fastim.protocol import FrameType  # noqa: E402

F = FrameType
SERVER_MASK = protocol.type_mask(protocol.SERVER_FRAME_TYPES)
HELLO = _core.encode_frame(F.HELLO, protocol.pack_hello(1, 1, b"{}"))
#: ~100 bytes of JSON, a typical small chat/ticker message
PAYLOAD = orjson.dumps({"user": "u123456", "text": "x" * 60, "ts": 1732650000.123, "n": 1})
RECOVER = 10_000
RECOVERIES = ("warm_raw", "warm_sdk", "cold_raw", "cold_sdk")

CONFIG = """\
ping_interval = 3600.0
history_size = 20000
recovery_max = 10000
log_level = "warning"
{extra}
[namespaces.fast]
durable = false
history_size = 20000
"""


def node_config() -> str:
    """The node's config file; per-connection publish rate limits off where the node has
    them (the benchmark saturates one connection on purpose)."""
    from dataclasses import fields

    from fastim.config import Config

    names = {f.name for f in fields(Config)}
    extra = "publish_rate = 0.0\n" if "publish_rate" in names else ""
    return CONFIG.format(extra=extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu >= 0 else cmd


class Node:
    """``fastim serve`` as a child process on fixed ports, restartable."""

    def __init__(self, args: argparse.Namespace, workdir: Path, store_args: list[str]) -> None:
        self.args = args
        self.port = free_port()
        config = workdir / "fastim.toml"
        config.write_text(node_config())
        self.cmd = pinned(
            args.server_cpu,
            [
                sys.executable, "-m", "fastim", "serve", "--config", str(config),
                "--tcp-port", str(self.port), "--ws-port", "0", *store_args,
            ],
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=ROOT)
        wait_listening(self.port, self.proc, "node")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Redis:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        self.cmd = pinned(
            args.client_cpu,
            [
                binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(workdir),
                "--save", "", "--appendonly", "yes", "--daemonize", "no",
                "--maxmemory-policy", "noeviction", "--logfile", str(workdir / "redis.log"),
            ],
        )  # fmt: skip
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Raw(asyncio.Protocol):
    """A bare fastim TCP client: a window of publishes, counting, JSON commands."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.dec = _core.FrameDecoder(1 << 24, SERVER_MASK)
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.transport: asyncio.Transport | None = None
        self.acked = 0
        self.errors = 0
        self.inflight = 0
        self.window = 0
        self.frame = b""
        self.running = False
        self.msgs = 0
        self.msgs_target = 0
        self.msgs_done: asyncio.Future[float] | None = None
        self.idle: asyncio.Event = asyncio.Event()
        self.ack_target = 0
        self.ack_reached = asyncio.Event()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(HELLO)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        refill = False
        for ftype, payload in self.dec.feed(data):
            if ftype == F.PUBACK:
                self.acked += 1
                self.inflight -= 1
                refill = True
                if self.ack_target and self.acked >= self.ack_target:
                    self.ack_reached.set()
            elif ftype == F.MSG:
                self.msgs += 1
                done = self.msgs_done
                if done is not None and self.msgs >= self.msgs_target and not done.done():
                    done.set_result(time.perf_counter())
            elif ftype == F.EVENT:
                obj = orjson.loads(payload)
                fut = self.replies.pop(obj.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(obj)
            elif ftype == F.ERROR:
                self.errors += 1
                self.inflight -= 1
                refill = True
            elif ftype == F.WELCOME:
                if not self.welcome.done():
                    self.welcome.set_result(None)
            elif ftype == F.PING and self.transport is not None:
                self.transport.write(_core.encode_frame(F.PONG, payload))
        if refill:
            if self.running:
                self.fill()
            elif self.inflight <= 0:
                self.idle.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("closed by the node")
        self.running = False
        self.idle.set()
        self.ack_reached.set()
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(self.lost)
        if self.msgs_done is not None and not self.msgs_done.done():
            self.msgs_done.set_exception(self.lost)

    def fill(self) -> None:
        n = self.window - self.inflight
        if n > 0 and self.transport is not None:
            self.transport.write(self.frame * n)
            self.inflight += n

    def publish_stream(self, channel: str, window: int) -> None:
        self.frame = _core.encode_frame(F.PUB, protocol.pack_sub(F.PUB, 1, channel, PAYLOAD))
        self.window = window
        self.running = True
        self.idle.clear()
        self.fill()

    async def stop_stream(self) -> None:
        self.running = False
        if self.inflight > 0:
            await asyncio.wait_for(self.idle.wait(), 60)

    async def cmd(self, obj: dict[str, Any], req_id: int) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[req_id] = fut
        assert self.transport is not None
        self.transport.write(_core.encode_frame(F.CMD, orjson.dumps({**obj, "id": req_id})))
        return await asyncio.wait_for(fut, 60)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def raw(node: Node) -> Raw:
    _, proto = await asyncio.get_running_loop().create_connection(Raw, "127.0.0.1", node.port)
    await asyncio.wait_for(proto.welcome, 10)
    return proto


async def throughput(node: Node, channel: str, args: argparse.Namespace) -> dict[str, float]:
    c = await raw(node)
    try:
        c.publish_stream(channel, args.window)
        await asyncio.sleep(args.warmup)
        a0, e0, s0, t0 = c.acked, c.errors, cpu_seconds(node.pid), time.perf_counter()
        my0 = time.process_time()
        await asyncio.sleep(args.duration)
        a1, e1, s1, t1 = c.acked, c.errors, cpu_seconds(node.pid), time.perf_counter()
        my1 = time.process_time()
        await c.stop_stream()
    finally:
        c.close()
    if c.lost is not None:
        raise SystemExit(f"throughput on {channel}: connection lost: {c.lost!r}")
    wall = t1 - t0
    return {
        "publishes_per_s": round((a1 - a0) / wall),
        "errors": e1 - e0,
        "node_cpu": round((s1 - s0) / wall, 3),
        "node_us_per_publish": round((s1 - s0) / max(1, a1 - a0) * 1e6, 2),
        "client_cpu": round((my1 - my0) / wall, 3),
    }


async def populate(node: Node, channel: str) -> tuple[int, str]:
    """Publish RECOVER+ messages; return the channel's (top, epoch)."""
    c = await raw(node)
    try:
        c.ack_target = RECOVER
        c.publish_stream(channel, 256)
        await asyncio.wait_for(c.ack_reached.wait(), 120)
        await c.stop_stream()
        if c.lost is not None or c.acked < RECOVER:
            raise SystemExit(f"populating {channel}: {c.acked} acked, {c.lost!r}")
        reply = await c.cmd({"op": "sub", "ch": channel}, 1)
        return int(reply["off"]), str(reply["epoch"])
    finally:
        c.close()


async def recover_raw(node: Node, channel: str, top: int, epoch: str) -> dict[str, Any]:
    c = await raw(node)
    try:
        c.msgs_target = RECOVER
        c.msgs_done = asyncio.get_running_loop().create_future()
        since = {"off": top - RECOVER, "epoch": epoch}
        t0 = time.perf_counter()
        reply = await c.cmd({"op": "sub", "ch": channel, "since": since}, 7)
        t_last = await asyncio.wait_for(c.msgs_done, 120)
    finally:
        c.close()
    return {"seconds": round(t_last - t0, 4), "recovered": reply.get("recovered")}


async def recover_sdk(node: Node, channel: str, top: int, epoch: str) -> dict[str, Any]:
    async with await connect(node.url, request_timeout=60) as client:
        t0 = time.perf_counter()
        sub = await client.subscribe(channel, since=(top - RECOVER, epoch))
        first = last = None
        for _ in range(RECOVER):
            msg = await asyncio.wait_for(sub.get(), 60)
            first = first or msg.offset
            last = msg.offset
        t1 = time.perf_counter()
    ok = first == top - RECOVER + 1 and last == top and sub.gaps == 0
    return {"seconds": round(t1 - t0, 4), "recovered": ok}


async def bench_store(store: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis: Redis | None = None
    if store == "redis":
        redis = Redis(args, workdir)
        store_args = ["--store", "redis", "--redis-url", redis.url]
    elif store == "sqlite":
        store_args = ["--store", "sqlite", "--store-path", str(workdir / "fastim.db")]
    else:
        store_args = ["--store", "memory"]
    node = Node(args, workdir, store_args)
    node.start()
    runs: list[dict[str, Any]] = []
    try:
        for run in range(args.runs):
            r: dict[str, Any] = {"run": run}
            r["durable"] = await throughput(node, f"bench{run}", args)
            r["not_durable"] = await throughput(node, f"fast:bench{run}", args)
            channel = f"recover{run}"
            top, epoch = await populate(node, channel)
            r["warm_raw"] = await recover_raw(node, channel, top, epoch)
            r["warm_sdk"] = await recover_sdk(node, channel, top, epoch)
            if store != "memory":
                node.stop()
                node.start()
                r["cold_raw"] = await recover_raw(node, channel, top, epoch)
                r["cold_sdk"] = await recover_sdk(node, channel, top, epoch)
            print(f"{store} run {run}: {json.dumps(r)}", file=sys.stderr)
            runs.append(r)
    finally:
        node.stop()
        if redis is not None:
            redis.stop()

    def med(section: str, key: str) -> float | None:
        values = [r[section][key] for r in runs if section in r]
        return statistics.median(values) if values else None

    summary = {
        "store": store,
        "durable_publishes_per_s": med("durable", "publishes_per_s"),
        "durable_node_cpu": med("durable", "node_cpu"),
        "durable_node_us_per_publish": med("durable", "node_us_per_publish"),
        "not_durable_publishes_per_s": med("not_durable", "publishes_per_s"),
        "not_durable_node_cpu": med("not_durable", "node_cpu"),
        "durable_client_cpu": med("durable", "client_cpu"),
        "not_durable_client_cpu": med("not_durable", "client_cpu"),
        "recover_10k_warm_raw_s": med("warm_raw", "seconds"),
        "recover_10k_warm_sdk_s": med("warm_sdk", "seconds"),
        "recover_10k_cold_raw_s": med("cold_raw", "seconds"),
        "recover_10k_cold_sdk_s": med("cold_sdk", "seconds"),
        "all_recovered": all(r[k]["recovered"] for r in runs for k in RECOVERIES if k in r),
        "publish_errors": sum(r[k]["errors"] for r in runs for k in ("durable", "not_durable")),
    }
    return {"summary": summary, "runs": runs}


def fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:,.0f} ms"


def table(summaries: list[dict[str, Any]], window: int) -> str:
    head = (
        f"| store | publish/s acked, durable (W={window}) | CPU node / client | "
        f"publish/s acked, durable = false (W={window}) | CPU node / client | "
        "recover 10k warm: raw / SDK | recover 10k cold (from the store): raw / SDK |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for s in summaries:
        rows.append(
            f"| {s['store']} | {fmt_rate(s['durable_publishes_per_s'])} | "
            f"{s['durable_node_cpu']:.0%} / {s['durable_client_cpu']:.0%} | "
            f"{fmt_rate(s['not_durable_publishes_per_s'])} | "
            f"{s['not_durable_node_cpu']:.0%} / {s['not_durable_client_cpu']:.0%} | "
            f"{fmt_ms(s['recover_10k_warm_raw_s'])} / {fmt_ms(s['recover_10k_warm_sdk_s'])} | "
            f"{fmt_ms(s['recover_10k_cold_raw_s'])} / {fmt_ms(s['recover_10k_cold_sdk_s'])} |"
        )
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stores", default="memory,sqlite,redis", help="comma-separated")
    p.add_argument("--runs", type=int, default=3, help="runs per store; medians reported")
    p.add_argument("-d", "--duration", type=float, default=3.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--window", type=int, default=64, help="publishes in flight (awaiting PUBACK)")
    p.add_argument("--server-cpu", type=int, default=0, help="taskset CPU of the node (-1: none)")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of this process (-1: none)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    results: dict[str, Any] = {"stores": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    load = [os.getloadavg()[0]]
    for store in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix=f"fastim-bench-{store}-") as d:
            results["stores"][store] = runner(bench_store(store, args, Path(d)))
        load.append(os.getloadavg()[0])
    summaries = [r["summary"] for r in results["stores"].values()]
    # other processes on the node's CPU make it slower: a load average well over what
    # this benchmark itself puts on the machine (~2) says the figures are pessimistic
    results["load_average_1min"] = load
    results["table"] = table(summaries, args.window) + (
        f"\n\nMedians of {args.runs} runs; 1-min load average during the runs: "
        + ", ".join(f"{x:.2f}" for x in load)
    )
    print(results["table"])
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    bad = any(not s["all_recovered"] or s["publish_errors"] for s in summaries)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
