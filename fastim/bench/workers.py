"""The subscriber worker processes: each opens its share of the N connections and counts.

N subscribers spread over several worker processes, each under the 20,000-fd limit. A
worker opens its connections (spread over the nodes of ``--sub-urls``, bound to
127.0.0.x source addresses above 20,000), reports when they are ready, restarts its CPU
clock when publishing starts, waits until every connection has all the messages, and
reports what they counted and the CPU time it used, so the generator can be shown not to
be the bottleneck. The parent talks to a worker over a pipe (see _worker_main).
"""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from .broadcast import Tracker, track
from .counting import WorkerResult, _Sub, sub_class
from .target import Target

#: connections one worker process holds at most: the hard fd limit here is 20,000
CONNS_PER_PROCESS = 18_000
#: connections per 127.0.0.x source address with --spread-ips (ephemeral range ≈ 28k)
CONNS_PER_IP = 20_000
#: concurrent connection attempts per worker (keeps the server's backlog from overflowing)
CONNECT_CONCURRENCY = 200
#: ``--window every``: subscribers per worker whose progress is reported, at most (all of
#: them up to this, else an evenly spread sample: the fan-out order decides who lags)
TRACK_PER_PROCESS = 2_000
#: the progress report's share of a worker's CPU, at most: after a report that took t
#: seconds of CPU, the next waits ``t * REPORT_SPACING`` (≈ 1 ms for 1,000 subscribers)
REPORT_SPACING = 30
#: ... and never more than this (seconds)
MAX_SPACING = 0.002


async def open_subs(
    target: Target,
    channel: str,
    n: int,
    sampled: set[int],
    subscribe: bool,
    out: WorkerResult,
    ip_base: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[_Sub]:
    """Open ``n`` ready subscriber connections (``sampled``: indices that check messages)."""
    loop = asyncio.get_running_loop()
    subs: list[_Sub] = []
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    cls = sub_class(target)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            factory = functools.partial(cls, target, channel, i in sampled, subscribe, out)
            if ip_base:
                sock = await _connect_from(f"127.0.0.{ip_base + i // CONNS_PER_IP}", target)
                _t, proto = await loop.create_connection(factory, sock=sock)
            else:
                _t, proto = await loop.create_connection(factory, target.host, target.port)
            subs.append(proto)
            await asyncio.wait_for(proto.ready, 30)
            done += 1
            if on_progress is not None and done % 250 == 0:
                on_progress(done)

    await asyncio.gather(*(one(i) for i in range(n)))
    return subs


#: Linux's IP_BIND_ADDRESS_NO_PORT (not in the socket module of every Python)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _connect_from(ip: str, target: Target) -> socket.socket:
    """A socket connected to ``target`` from source address ``ip`` (``--spread-ips``).

    The port is picked at connect time (``IP_BIND_ADDRESS_NO_PORT``), not at bind: the
    kernel's connect() skips every port some socket bound explicitly, whatever the
    address, so 100,000 connections bound over a few addresses would take every
    ephemeral port from every other process's connects on the machine; picked at
    connect, a port is only unique per (source, destination) pair.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:  # pragma: no cover - not Linux
            pass
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.bind((ip, 0))
        await loop.sock_connect(sock, (target.host, target.port))
    except BaseException:
        sock.close()
        raise
    return sock


def spread_sample(n: int, k: int) -> set[int]:
    """``k`` indices evenly spread over ``range(n)``: early and late connections alike.

    Where a subscriber sits in the server's fan-out order decides its latency; sampling
    only the first connections would measure only the head of the fan-out.
    """
    k = max(0, min(n, k))
    if k == 0:
        return set()
    return {int(i * n / k) for i in range(k)}


@dataclass
class WorkerSpec:
    target: Target
    channel: str
    n: int
    n_sample: int
    subscribe: bool
    ip_base: int
    #: with --sub-urls: the nodes the worker's subscribers are spread over (round robin)
    targets: tuple[Target, ...] = ()
    #: ``--window every``: report the slowest subscriber's count to the publisher
    report_min: bool = False
    #: ``--broadcast K``: track the K messages on every connection (broadcast.Tracker)
    broadcast: int = 0


class MinReporter:
    """``--window every``: tells the publisher the fewest messages any tracked subscriber has.

    It is the tracked subscribers' ``wake`` (``_Sub.data_received`` calls ``set()`` once
    per read that brought messages, not per message): the first read of a loop tick
    schedules one report, which takes the minimum over the tracked subscribers (closed
    ones aside) and sends ``("min", m)`` down the worker's pipe when it moved. Reports are
    spaced by ``REPORT_SPACING`` times their own cost, so they stay a few percent of the
    worker's CPU whatever the number of subscribers.
    """

    def __init__(self, subs: list[_Sub], pipe: Connection) -> None:
        self.loop = asyncio.get_running_loop()
        self.subs = subs
        self.pipe = pipe
        self.scheduled = False
        self.on = True
        self.last = -1
        self.next_ok = 0.0
        self._count = operator.attrgetter("count")
        for s in subs:
            s.wake = self

    def set(self) -> None:
        if not self.scheduled and self.on:
            self.scheduled = True
            delay = self.next_ok - time.monotonic()
            if delay > 0:
                self.loop.call_later(delay, self.report)
            else:
                self.loop.call_soon(self.report)

    def current(self) -> int:
        live = [s for s in self.subs if not s.closed]
        return min(map(self._count, live)) if live else -1

    def report(self) -> None:
        self.scheduled = False
        if not self.on:
            return
        c = time.thread_time()
        m = self.current()
        if m != self.last and m >= 0:
            self.last = m
            self.pipe.send(("min", m))
        # spaced by the report's CPU time, not its wall time: on a shared core the send
        # may hand the core to the publisher, and a wall-clock spacing then grew to 40 ms
        spacing = min((time.thread_time() - c) * REPORT_SPACING, MAX_SPACING)
        self.next_ok = time.monotonic() + spacing

    def stop(self) -> None:
        self.on = False
        for s in self.subs:
            s.wake = None


def tracked(subs: list[_Sub], k: int = TRACK_PER_PROCESS) -> list[_Sub]:
    """All of ``subs`` up to ``k``, else ``k`` spread evenly over the connection order."""
    if len(subs) <= k:
        return list(subs)
    return [subs[i] for i in sorted(spread_sample(len(subs), k))]


def _progress_from(progress: Callable[[int], None], base: int, k: int) -> None:
    progress(base + k)


async def _worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    res = WorkerResult(connections=spec.n)
    loop = asyncio.get_running_loop()
    last_progress = [0.0]

    def progress(k: int) -> None:
        now = time.monotonic()
        if now - last_progress[0] > 0.2:
            last_progress[0] = now
            pipe.send(("progress", k))

    try:
        subs: list[_Sub] = []
        targets = spec.targets or (spec.target,)
        m = len(targets)
        for j, t in enumerate(targets):  # an even share of connections and samples each
            n_j = spec.n // m + (1 if j < spec.n % m else 0)
            k_j = spec.n_sample // m + (1 if j < spec.n_sample % m else 0)
            subs += await open_subs(
                t,
                spec.channel,
                n_j,
                spread_sample(n_j, k_j),
                spec.subscribe,
                res,
                spec.ip_base,
                functools.partial(_progress_from, progress, len(subs)),
            )
    except Exception as e:
        pipe.send(("error", f"connect: {e!r}; " + "; ".join(res.errors[:3])))
        return
    pipe.send(("ready", len(subs)))
    reporter: MinReporter | None = None
    tracker: Tracker | None = None
    t0 = time.monotonic()
    c0 = time.process_time()
    s0 = os.times().system
    expected: int | None = None
    deadline = 0.0
    while True:
        # commands: ("go",) restarts the CPU clock at the start of publishing (and with
        # report_min starts the reports of the slowest subscriber's count: the publisher
        # reads them while it publishes; with broadcast, the tracking of every
        # connection's messages), ("expect", total, drain) ends the reports and waits for
        # every connection to have ``total`` messages, ("stop",) reports now (idle
        # mode), ("mark",) answers at once with the heartbeat pings answered so far and
        # the connections the server closed (the idle window of broadcast mode)
        cmd = await loop.run_in_executor(None, pipe.recv) if expected is None else None
        if cmd is not None:
            if cmd[0] == "mark":
                closed = sum(1 for s in subs if s.closed)
                pipe.send(("mark", {"pings": res.pings, "closed": closed}))
                continue
            if cmd[0] == "go":
                t0 = time.monotonic()
                c0 = time.process_time()
                s0 = os.times().system
                if spec.report_min and subs and reporter is None:
                    reporter = MinReporter(tracked(subs), pipe)
                    reporter.report()  # a first figure, so the publisher knows its floor
                if spec.broadcast and tracker is None:
                    tracker = track(subs, spec.broadcast, pipe)
                continue
            if cmd[0] == "stop":
                break
            if cmd[0] == "expect":
                if reporter is not None:
                    reporter.stop()
                expected = int(cmd[1])
                deadline = time.monotonic() + float(cmd[2])
        if expected is not None:
            if all(s.count >= expected or s.closed for s in subs):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    res.cpu_s = time.process_time() - c0
    res.sys_s = os.times().system - s0
    res.wall_s = time.monotonic() - t0
    counts = [s.count for s in subs]
    res.received = sum(counts)
    res.per_conn_min = min(counts) if counts else 0
    res.per_conn_max = max(counts) if counts else 0
    if tracker is not None:
        tracker.into(res)
        res.conns_exact = sum(1 for c in counts if c == spec.broadcast)
        res.conns_over = sum(1 for c in counts if c > spec.broadcast)
    res.sampled = sum(1 for s in subs if s.sample)
    res.last_rx = max([s.last_rx for s in subs] or [0.0])
    for s in subs:
        s.close()
    await asyncio.sleep(0.05)  # let the close frames leave
    pipe.send(("result", asdict(res)))


def _raise_fd_limit() -> None:
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
        pass


def worker(spec: WorkerSpec, pipe: Connection) -> None:
    _raise_fd_limit()
    try:
        run_loop(_worker_main(spec, pipe))
    except Exception as e:  # report, don't hang the parent
        pipe.send(("error", repr(e)))


def run_loop(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop (asyncio where uvloop is missing)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
