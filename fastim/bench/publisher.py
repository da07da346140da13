"""The publisher: one connection that sends, and the probe subscriber that paces it.

One publisher connection sends; the publisher's process also holds one of the N
subscribers, the *probe*, connected last. Saturation keeps at most ``--inflight`` (W)
publishes not yet received: by every subscriber (``--window every``, the default: the
worker processes report the fewest messages any of their subscribers has, see
workers.MinReporter, and the probe counts too) or by the probe alone (``--window probe``,
the rule until P10). Either is the same rule for fastim and for peers, which have no
acks. ``--rate`` publishes at a fixed rate instead (the window still caps what is in
flight). ``--broadcast K`` publishes K messages one at a time, each once every subscriber
has the one before (:func:`broadcast`; the subscribers' side is broadcast.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import orjson

from .. import _core
from ..client.connection import HandshakeError
from ..protocol import FrameType, pack_hello, pack_sub
from .broadcast import Tracker, track
from .counting import WorkerResult, _Sub
from .serverstats import cpu_pids, cpu_sum
from .target import Target, upgrade_request, upgrade_response
from .wire import MAX_MESSAGE, SERVER_TYPES, make_payload, mask, ws_text
from .workers import open_subs

#: a full window with nothing received for this long ends the publishing (an error)
STALL_S = 10.0

_OP_TEXT = _core.OP_TEXT
_OP_PING = _core.OP_PING
_OP_CLOSE = _core.OP_CLOSE


class _Pub(asyncio.Protocol):
    """The publisher's connection: sends, counts fastim's acks, answers pings.

    To a fastim node it says hello first (the HELLO frame over TCP, ``{"op":"hello"}``
    as user ``fastim-bench`` over WebSocket) and is ready at the welcome, whose ``node``
    it keeps: on a node of several workers, the worker it landed on (``<node>.w<i>``)."""

    def __init__(self, target: Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self.acked = 0
        self.errors: list[str] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b"" if target.kind != "tcp" else None
        self.key = ""  # the upgrade request's Sec-WebSocket-Key
        self.dec = _core.FrameDecoder(MAX_MESSAGE, SERVER_TYPES)
        self.parser = _core.WSParser(MAX_MESSAGE, client=True)
        self.ch_json = orjson.dumps(channel)
        #: the node (the worker) that welcomed it, from the welcome's ``node``
        self.node: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.target.kind == "tcp":
            transport.write(_core.encode_frame(FrameType.HELLO, pack_hello(1, 1)))  # type: ignore[attr-defined]
        else:
            request, self.key = upgrade_request(self.target)
            transport.write(request)  # type: ignore[attr-defined]

    def publish(self, seq: int, payload: bytes) -> None:
        assert self.transport is not None
        k = self.target.kind
        if k == "tcp":
            frame = _core.encode_frame(
                FrameType.PUB, pack_sub(FrameType.PUB, seq & 0xFFFFFFFF, self.channel, payload)
            )
        elif k == "ws":
            frame = ws_text(
                b'{"op":"pub","ch":%s,"data":%s,"id":%d}' % (self.ch_json, payload, seq)
            )
        else:
            frame = ws_text(payload)
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        try:
            if self.target.kind == "tcp":
                self._frames(data)
                return
            if self.head is not None:
                head = self.head + data
                try:
                    start = upgrade_response(self.target, head, self.key)
                except HandshakeError as e:
                    self._error(f"publisher: {e}")
                    return
                if start < 0:
                    self.head = head
                    return
                self.head = None
                if self.target.fastim and self.transport is not None:
                    # a JSON hello names a user (or a token); nobody sends it anything
                    self.transport.write(ws_text(b'{"op":"hello","user":"fastim-bench","id":0}'))
                elif not self.ready.done():
                    self.ready.set_result(None)
                data = head[start:]
            for op, p in self.parser.feed(data):
                if op == _OP_TEXT:
                    if b'"puback"' in p:
                        self.acked += 1
                    elif b'"welcome"' in p and not self.ready.done():
                        self._welcomed(p)
                    else:
                        self._error(f"publisher got {p[:120]!r}")
                elif op == _OP_PING and self.transport is not None:
                    self.transport.write(_core.ws_encode(_core.OP_PONG, p, mask=mask()))
                elif op == _OP_CLOSE:
                    self._error(f"publisher: server closed {_core.ws_parse_close(p)}")
        except Exception as e:
            self._error(f"publisher: {e!r}")

    def _frames(self, data: bytes) -> None:
        for t, p in self.dec.feed(data):
            if t == FrameType.PUBACK:
                self.acked += 1
            elif t == FrameType.WELCOME and not self.ready.done():
                self._welcomed(p[1:])  # a version byte, then JSON
            elif t == FrameType.PING and self.transport is not None:
                self.transport.write(_core.encode_frame(FrameType.PONG, p))
            elif t in (FrameType.ERROR, FrameType.GOAWAY):
                self._error(f"publisher got frame 0x{t:02x}: {p[:100]!r}")

    def _welcomed(self, welcome: bytes) -> None:
        try:
            node = orjson.loads(welcome).get("node")
        except (ValueError, AttributeError):
            node = None
        self.node = str(node) if node is not None else None
        if not self.ready.done():
            self.ready.set_result(None)

    def _error(self, why: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(why)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"publisher closed ({exc})"))


@dataclass
class PubResult:
    published: int = 0
    acked: int = 0
    probe_received: int = 0
    probe_last_rx: float = 0.0
    elapsed_s: float = 0.0
    publish_s: float = 0.0
    server_cpu_s: float | None = None
    #: ``--window every``: the workers' reports received while publishing
    min_reports: int = 0
    #: the node (on a node of several workers, the worker) the publisher is on
    node: str | None = None
    errors: list[str] = field(default_factory=list)


class _Floor:
    """``--window every``: the fewest messages any subscriber has, over the probe and the
    workers' reports (``("min", m)`` on each worker's pipe, read as they come)."""

    def __init__(
        self, pipes: list[Connection], shares: list[int], wake: asyncio.Event, probe: _Sub
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.pipes = pipes
        self.wake = wake
        self.probe = probe
        # a worker without subscribers never reports: it holds no one back
        self.mins: list[float] = [0 if n else math.inf for n in shares]
        self.reports = 0
        self.errors: list[str] = []
        for i, a in enumerate(pipes):
            self.loop.add_reader(a.fileno(), self._readable(i))

    def _readable(self, i: int) -> Callable[[], None]:
        a = self.pipes[i]

        def cb() -> None:
            while a.poll():
                msg = a.recv()
                if msg[0] == "min":
                    self.reports += 1
                    if msg[1] > self.mins[i]:
                        self.mins[i] = msg[1]
                        self.wake.set()
                elif msg[0] == "error" and len(self.errors) < 5:
                    self.errors.append(f"worker: {msg[1]}")

        return cb

    def value(self) -> float:
        return min(self.probe.count, *self.mins) if self.mins else self.probe.count

    def close(self) -> None:
        for a in self.pipes:
            self.loop.remove_reader(a.fileno())
            os.set_blocking(a.fileno(), True)  # the loop made it non-blocking; recv() blocks


async def drive(
    target: Target,
    args: argparse.Namespace,
    pipes: list[Connection],
    server_pid: int | None,
    progress: bool,
    shares: list[int] | None = None,
) -> PubResult:
    """Connect publisher and probe, start the workers' clocks, publish, wait until the
    last publish is received (by every subscriber, or with ``--window probe`` by the
    probe). ``shares``: the workers' subscribers, one figure per pipe. Without
    ``args.window`` the rule is the probe's: the workers report only when their
    WorkerSpec says so (runner.py sets both)."""
    loop = asyncio.get_running_loop()
    res = PubResult()
    probe_out = WorkerResult(connections=1)
    _t, pub = await loop.create_connection(
        lambda: _Pub(target, args.channel), target.host, target.port
    )
    await asyncio.wait_for(pub.ready, 30)
    # the probe connects last, so in a server that fans out in subscription order it is
    # the last to be served: when it has message k, every subscriber's write of k is done
    probe = (await open_subs(target, args.channel, 1, set(), True, probe_out))[0]
    wake = probe.wake = asyncio.Event()
    await asyncio.sleep(0.1)  # let the last subscription settle before the clock starts
    every = getattr(args, "window", "probe") == "every"
    floor: _Floor | None = None
    if every:
        floor = _Floor(pipes, shares if shares is not None else [1] * len(pipes), wake, probe)
        received: Callable[[], float] = floor.value
    else:

        def received() -> float:
            return probe.count

    for a in pipes:
        a.send(("go",))
    pids = cpu_pids(args, server_pid)
    cpu0 = cpu_sum(pids)
    window = args.inflight
    size = args.size
    duration = args.duration
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    sent = 0
    t0 = time.monotonic()
    end = t0 + duration
    next_report = t0 + 1.0
    stalled = False
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if sent - received() >= window:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), STALL_S)
            except asyncio.TimeoutError:
                stalled = True
                break
            continue
        if interval:
            delay = t0 + sent * interval - now
            if delay > 0:
                await asyncio.sleep(min(delay, end - now))
                continue
        sent += 1
        pub.publish(sent, make_payload(sent, size))
        if sent % 16 == 0:
            await asyncio.sleep(0)  # let the probe's reads in between writes
        if progress and now >= next_report:
            next_report += 1.0
            el = now - t0
            print(
                f"\r  running {el:4.1f}s  published {sent:,} ({sent / el:,.0f} msg/s)"
                f"  probe {probe.count:,}" + (f"  slowest {received():,.0f}" if every else ""),
                end="",
                file=sys.stderr,
                flush=True,
            )
    res.publish_s = time.monotonic() - t0
    # the last messages: the probe, served last, has them when the server is done (and
    # with --window every, the slowest subscriber has them)
    wait_until = time.monotonic() + args.drain
    while received() < sent and time.monotonic() < wait_until and not probe.closed:
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), max(0.01, wait_until - time.monotonic()))
        except asyncio.TimeoutError:
            break
    res.elapsed_s = time.monotonic() - t0
    if floor is not None:
        floor.close()
        res.min_reports = floor.reports
        res.errors += floor.errors
    cpu1 = cpu_sum(pids)
    if cpu0 is not None and cpu1 is not None:
        res.server_cpu_s = cpu1 - cpu0
    if target.fastim:
        ack_until = time.monotonic() + 5
        while pub.acked < sent and time.monotonic() < ack_until:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
    res.published = sent
    res.acked = pub.acked
    res.node = pub.node
    res.probe_received = probe.count
    res.probe_last_rx = probe.last_rx
    res.errors = res.errors + pub.errors + probe_out.errors
    if stalled:
        res.errors.append(
            f"the {'slowest subscriber' if every else 'probe'} received nothing for "
            f"{STALL_S:g} s "
            f"(at {received():,.0f} of {sent}; the probe at {probe.count})"
        )
    if progress:
        print(file=sys.stderr)
    probe.close()
    if pub.transport is not None:
        pub.transport.close()
    await asyncio.sleep(0.05)
    return res


@dataclass
class BroadcastRun:
    """What the publisher's side saw: the stamps, the probe, what took too long."""

    published: int = 0
    acked: int = 0
    node: str | None = None  # the node (the worker) the publisher is on
    #: per message: its stamp (CLOCK_MONOTONIC ns) and when the publisher learnt that
    #: every subscriber had it (0: not within --drain)
    t_pub_ns: list[int] = field(default_factory=list)
    t_complete_ns: list[int] = field(default_factory=list)
    probe: WorkerResult = field(default_factory=WorkerResult)
    probe_tracker: Tracker | None = None
    server_cpu_s: float | None = None
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Reached:
    """The workers' ``("reached", k, t)`` reports, read in the publisher's loop."""

    def __init__(self, pipes: list[Connection], shares: list[int], wake: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.pipes = pipes
        self.wake = wake
        # per worker, the messages every one of its connections has (none to wait for
        # in a worker without connections)
        self.done: list[set[int] | None] = [set() if n else None for n in shares]
        self.errors: list[str] = []
        for i, a in enumerate(pipes):
            self.loop.add_reader(a.fileno(), self._readable(i))

    def _readable(self, i: int) -> Callable[[], None]:
        a = self.pipes[i]

        def cb() -> None:
            while a.poll():
                msg = a.recv()
                if msg[0] == "reached":
                    d = self.done[i]
                    if d is not None:
                        d.add(int(msg[1]))
                    self.wake.set()
                elif msg[0] == "error" and len(self.errors) < 5:
                    self.errors.append(f"worker: {msg[1]}")

        return cb

    def everyone(self, j: int) -> bool:
        return all(d is None or j in d for d in self.done)

    def close(self) -> None:
        for a in self.pipes:
            self.loop.remove_reader(a.fileno())
            os.set_blocking(a.fileno(), True)  # the loop made it non-blocking; recv() blocks


async def broadcast(
    target: Target,
    args: argparse.Namespace,
    pipes: list[Connection],
    shares: list[int],
    pids: list[int],
    progress: bool,
) -> BroadcastRun:
    """Connect the publisher and the probe, start the workers' trackers, publish the K
    messages one at a time (see the module docstring)."""
    loop = asyncio.get_running_loop()
    res = BroadcastRun()
    k = int(args.broadcast)
    gap = float(args.broadcast_gap)
    _t, pub = await loop.create_connection(
        lambda: _Pub(target, args.channel), target.host, target.port
    )
    await asyncio.wait_for(pub.ready, 30)
    probe = (await open_subs(target, args.channel, 1, set(), True, res.probe))[0]
    await asyncio.sleep(0.1)  # let the last subscription settle
    wake = asyncio.Event()
    reports = _Reached(pipes, shares, wake)
    tracker = res.probe_tracker = track([probe], k)
    tracker.on_done = lambda _j: wake.set()
    for a in pipes:
        a.send(("go",))
    await asyncio.sleep(0.05)  # the workers install their trackers
    cpu0 = cpu_sum(pids)
    t0 = time.monotonic()
    for j in range(1, k + 1):
        t_pub = time.monotonic_ns()
        res.t_pub_ns.append(t_pub)
        pub.publish(j, make_payload(j, args.size, t_pub))
        res.published = j
        deadline = time.monotonic() + args.drain
        complete = 0
        while True:
            if j in tracker.done and reports.everyone(j):
                complete = time.monotonic_ns()
                break
            left = deadline - time.monotonic()
            if left <= 0 or probe.closed:
                break
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except asyncio.TimeoutError:
                pass
        res.t_complete_ns.append(complete)
        if not complete:
            res.errors.append(f"message {j} did not reach every subscriber in {args.drain:g} s")
        if progress:
            took = f"{(complete - t_pub) / 1e6:,.1f} ms" if complete else "incomplete"
            print(f"\r  broadcast {j}/{k}: everyone has it after {took}", file=sys.stderr)
        # the next one a gap after this one was published (after the last message, a gap
        # too: a late duplicate would arrive then)
        rest = t_pub / 1e9 + gap - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)
    res.elapsed_s = time.monotonic() - t0
    cpu1 = cpu_sum(pids)
    if cpu0 is not None and cpu1 is not None:
        res.server_cpu_s = cpu1 - cpu0
    reports.close()
    res.errors += reports.errors
    if target.fastim:
        ack_until = time.monotonic() + 5
        while pub.acked < res.published and time.monotonic() < ack_until:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    res.acked = pub.acked
    res.node = pub.node
    res.errors += pub.errors + res.probe.errors
    res.probe.received = probe.count
    res.probe.conns_exact = int(probe.count == k)
    res.probe.conns_over = int(probe.count > k)
    res.probe.per_conn_min = res.probe.per_conn_max = probe.count
    res.probe.last_rx = probe.last_rx
    tracker.into(res.probe)
    probe.close()
    if pub.transport is not None:
        pub.transport.close()
    await asyncio.sleep(0.05)
    return res


async def warm_up(target: Target, channel: str, n: int, subscribe: bool) -> None:
    """Open and close a few connections: first-use allocations out of the RSS baseline."""
    out = WorkerResult()
    subs = await open_subs(target, channel, n, set(), subscribe, out)
    for s in subs:
        s.close()
    await asyncio.sleep(0.3)
