"""``fastim bench``: end-to-end fan-out load against a node, or against a peer server.

Targets: a fastim node over TCP (``--url tcp://host:port``) or WebSocket (``--url
ws://host:port/ws``, JSON subprotocol ``fastim.json``), or a plain broadcast peer
(``--peer ws://host:port/``: every message a client sends goes to every other client,
no acks; see benchmarks/peers/). Without a URL the bench spawns a node itself
(``--transport``, default tcp) pinned to ``--server-cpu``.

N subscribers spread over several worker processes (each under the 20,000-fd limit;
each reports the CPU time it used, so the generator can be shown not to be the
bottleneck). Subscribers read the server's coalesced writes and count messages with
the compiled parsers (FrameDecoder, WSParser); an evenly spread sample of them decodes
every message to check its sequence number (loss, reordering, duplicates) and measure
publish-to-delivery latency (the publisher stamps CLOCK_MONOTONIC, shared by every
process on the machine).

One publisher connection sends; the publisher's process also holds one of the N
subscribers, the *probe*, connected last. Saturation keeps published − received by the
probe ≤ ``--inflight`` (W): the same rule for fastim and for peers, which have no acks.
``--rate`` publishes at a fixed rate instead. ``--idle`` opens N connections, waits for
the server's memory to settle and reports its RSS growth per connection.

At the end: deliveries/s, latency percentiles, loss and reordering, the server's CPU
(when its pid is known) and the generator's, as a table or ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any
from urllib.parse import urlparse

import orjson

from . import _core
from .protocol import FrameType, pack_hello, pack_sub, type_mask, unpack_msg

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
_monotonic = time.monotonic
_OP_TEXT = _core.OP_TEXT
_OP_BINARY = _core.OP_BINARY
_OP_PING = _core.OP_PING
_OP_CLOSE = _core.OP_CLOSE

#: connections one worker process holds at most: the hard fd limit here is 20,000
CONNS_PER_PROCESS = 18_000
#: connections per 127.0.0.x source address with --spread-ips (ephemeral range ≈ 28k)
CONNS_PER_IP = 20_000
#: concurrent connection attempts per worker (keeps the server's backlog from overflowing)
CONNECT_CONCURRENCY = 200
MAX_MESSAGE = 64 << 20


@dataclass(frozen=True)
class Target:
    """What the bench talks to: a fastim node over TCP or WebSocket, or a broadcast peer."""

    kind: str  # "tcp" (fastim frames), "ws" (fastim JSON over WebSocket), "peer"
    host: str
    port: int
    path: str = "/"

    @property
    def url(self) -> str:
        if self.kind == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"ws://{self.host}:{self.port}{self.path}"

    @property
    def fastim(self) -> bool:
        return self.kind != "peer"


def parse_target(url: str, peer: bool = False) -> Target:
    """``tcp://h:p`` or ``ws://h:p/path`` → Target; raises SystemExit on anything else."""
    u = urlparse(url)
    if not u.hostname or not u.port:
        raise SystemExit(f"fastim bench: need scheme://host:port, got {url!r}")
    if peer:
        if u.scheme != "ws":
            raise SystemExit(f"fastim bench: --peer must be ws://host:port/path, got {url!r}")
        return Target("peer", u.hostname, u.port, u.path or "/")
    if u.scheme == "tcp":
        return Target("tcp", u.hostname, u.port)
    if u.scheme == "ws":
        return Target("ws", u.hostname, u.port, u.path or "/ws")
    raise SystemExit(f"fastim bench: --url must be tcp://host:port or ws://host:port/ws: {url!r}")


@dataclass
class WorkerResult:
    connections: int = 0
    received: int = 0  # deliveries (data messages) over all connections
    per_conn_min: int = 0
    per_conn_max: int = 0
    sampled: int = 0  # connections whose every message was checked
    lost_sampled: int = 0  # gaps in the sequence seen by sampled connections
    reordered: int = 0
    duplicates: int = 0
    closed: int = 0  # connections the server closed during the run
    last_rx: float = 0.0  # CLOCK_MONOTONIC of the last message any connection received
    latencies_us: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    sys_s: float = 0.0  # of cpu_s, in the kernel (mostly recv copies)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- messages


def make_payload(seq: int, size: int) -> bytes:
    """The publisher's message: a JSON object of ``size`` bytes with seq ``s`` and stamp ``t``.

    ``t`` is CLOCK_MONOTONIC in ns (``time.monotonic_ns``), which every process on the
    machine shares, so a subscriber in another process computes the delivery latency.
    """
    head = b'{"t":%d,"s":%d,"p":"' % (time.monotonic_ns(), seq)
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def _mask() -> bytes:
    return os.urandom(4)


def upgrade_request(t: Target, subprotocol: str | None) -> bytes:
    """The client's HTTP/1.1 upgrade request (RFC 6455 §4.1)."""
    key = base64.b64encode(os.urandom(16))
    proto = b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode() if subprotocol else b""
    return (
        b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s"
        b"User-Agent: fastim-bench\r\n\r\n" % (t.path.encode(), t.host.encode(), t.port, key, proto)
    )


def _ws_text(payload: bytes) -> bytes:
    return _core.ws_encode(_OP_TEXT, payload, mask=_mask())


# ---------------------------------------------------------------------------- subscribers


class _Sub(asyncio.Protocol):
    """One subscriber connection: counts data messages; a sampled one checks each.

    ``ready`` resolves when the connection can receive (fastim: subscribed, or just
    open with ``subscribe=False``; peer: upgrade done). ``wake``, set on the probe,
    is set whenever messages arrive, so the publisher can wait on it.

    Counting: a connection starts in *parse* mode (the compiled FrameDecoder/WSParser,
    one Python object per message). Once it has seen a data message and its stream sits
    on a frame boundary, it switches to *stride* mode: every message of a run has the
    same wire size F and the same first header bytes H, so a chunk's frame starts are
    at ``skip, skip+F, ...`` and ``data[skip+i::F]`` must consist of ``H[i]`` only —
    checked with a few C-level slices per chunk, whatever the number of messages. The
    first mismatch (a ping, a close, a message of another size: fastim's JSON offset
    gaining a digit) hands the stream, from the last verified frame start, back to the
    parser; it returns to stride mode at the next boundary. Sampled connections always
    parse. Without this the generator spent ~150 ns per delivery and, on the one core it
    has, could not keep up with fastim (measured: 95% CPU at 4.4M deliveries/s and
    seconds of queueing in its own socket buffers).
    """

    def __init__(
        self, target: Target, channel: str, sample: bool, subscribe: bool, out: WorkerResult
    ) -> None:
        self.target = target
        self.channel = channel
        self.sample = sample
        self.subscribe = subscribe
        self.out = out
        self.count = 0
        self.last_seq = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.closing = False
        self.wake: asyncio.Event | None = None
        self.last_rx = 0.0
        # stride mode
        self.stride = False
        self.F = 0  # wire size of one message
        self.H = b""  # its first header bytes (always the same for that size)
        self.skip = 0  # bytes of an already counted message at the next chunk's start
        self.carry = b""  # a header cut by the chunk's end
        self.strides = 0  # switches into stride mode (diagnostics)

    # ---------------------------------------------------------------- to override

    def parse(self, data: bytes) -> int:
        """Parse mode: handle ``data`` fully; return the data messages; may call enter()."""
        raise NotImplementedError

    def layout(self, plen: int) -> tuple[int, bytes]:
        """(wire size, fixed header prefix) of a data message with a ``plen``-byte payload."""
        raise NotImplementedError

    # ---------------------------------------------------------------- counting

    def data_received(self, data: bytes) -> None:
        n = self._stride(data) if self.stride else self.parse(data)
        if n:
            self.count += n
            self.last_rx = _monotonic()
            if self.wake is not None:
                self.wake.set()

    def enter(self, plen: int) -> None:
        """Switch to stride mode; the stream is at a frame boundary."""
        self.F, self.H = self.layout(plen)
        self.skip = 0
        self.carry = b""
        self.stride = True
        self.strides += 1

    def _resync(self, buf: bytes, n: int) -> int:
        """``buf`` starts at a frame start: back to parse mode with it."""
        self.stride = False
        return n + self.parse(buf)

    def _stride(self, data: bytes) -> int:
        size = len(data)
        F = self.F
        H = self.H
        h = len(H)
        n = 0
        if self.carry:
            c = self.carry
            need = h - len(c)
            if size < need:
                c += data
                if H.startswith(c):
                    self.carry = c
                    return 0
                return self._resync(c, 0)
            if c + data[:need] != H:
                self.carry = b""
                return self._resync(c + data, 0)
            self.carry = b""
            n = 1
            pos = need + F - h
        else:
            pos = self.skip
        if pos >= size:
            self.skip = pos - size
            return n
        starts = (size - pos + F - 1) // F  # frame starts in [pos, size)
        last = pos + (starts - 1) * F
        full = starts if last + h <= size else starts - 1
        if full:
            stop = pos + (full - 1) * F + 1
            for i in range(h):
                if data[pos + i : stop + i : F].count(H[i : i + 1]) != full:
                    return self._resync(data[pos:], n)
        if full < starts:
            self.carry = data[last:]
            self.skip = 0
        else:
            self.skip = last + F - size
        return n + full

    # ---------------------------------------------------------------- common

    def check(self, d: dict[str, Any], now: int) -> None:
        """Sequence and latency of one decoded message (sampled connections only)."""
        s = d["s"]
        last = self.last_seq
        if last and s != last + 1:
            out = self.out
            if s <= last:
                out.duplicates += 1
            else:
                out.reordered += 1  # a gap: a later message overtook, or one was lost
                out.lost_sampled += s - last - 1
        self.last_seq = s if s > last else last
        self.out.latencies_us.append((now - d["t"]) / 1000.0)

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def fail(self, why: str) -> None:
        if len(self.out.errors) < 50:
            self.out.errors.append(why)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.closing:
            self.out.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({exc})"))

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()


class _TcpSub(_Sub):
    """fastim frames over TCP: HELLO + SUB, then MSG frames (FrameDecoder, then strides)."""

    def __init__(
        self, target: Target, channel: str, sample: bool, subscribe: bool, out: WorkerResult
    ) -> None:
        super().__init__(target, channel, sample, subscribe, out)
        self.dec = _core.FrameDecoder(MAX_MESSAGE, _SERVER_TYPES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = _core.encode_frame(FrameType.HELLO, pack_hello(1, 1, b'{"client":"fastim-bench"}'))
        if self.subscribe:
            hello += _core.encode_frame(FrameType.SUB, pack_sub(FrameType.SUB, 1, self.channel))
        transport.write(hello)  # type: ignore[attr-defined]

    def layout(self, plen: int) -> tuple[int, bytes]:
        # u32 length, u8 type; the CRC that follows differs per message
        return _core.HEADER_SIZE + plen, struct.pack(">IB", plen, _MSG)

    def parse(self, data: bytes) -> int:
        try:
            frames = self.dec.feed(data)
        except Exception as e:  # a broken stream is a result, not a crash
            self.fail(f"decode: {e}")
            return 0
        n = 0
        plen = -1
        if self.sample:
            now = time.monotonic_ns()
            for t, p in frames:
                if t == _MSG:
                    n += 1
                    self.check(orjson.loads(unpack_msg(p)[2]), now)
                else:
                    self._control(t, p)
            return n
        for t, p in frames:
            if t == _MSG:
                n += 1
                plen = len(p)
            else:
                self._control(t, p)
        if plen >= 0 and self.dec.buffered == 0 and self.ready.done():
            self.enter(plen)
        return n

    def _control(self, t: int, p: bytes) -> None:
        if t == FrameType.SUBSCRIBED or (t == FrameType.WELCOME and not self.subscribe):
            self._ready()
        elif t == FrameType.PING and self.transport is not None:
            self.transport.write(_core.encode_frame(FrameType.PONG, p))
        elif t in (FrameType.ERROR, FrameType.GOAWAY):
            self.fail(f"server frame 0x{t:02x}: {p[:80]!r}")


def _ws_layout(plen: int) -> tuple[int, bytes]:
    """A server's unmasked, unfragmented text frame: size and header bytes."""
    if plen < 126:
        return 2 + plen, bytes((0x81, plen))
    if plen < 65536:
        return 4 + plen, b"\x81\x7e" + struct.pack(">H", plen)
    return 10 + plen, b"\x81\x7f" + struct.pack(">Q", plen)


class _WsSub(_Sub):
    """WebSocket: HTTP upgrade, then (fastim) a JSON subscribe; messages counted in C.

    Frames are parsed by ``_core.WSParser(client=True)`` (then strides, see _Sub). Pings
    are answered with masked pongs (the peers' libraries ping idle connections every
    20 s and close the silent ones).
    """

    def __init__(
        self, target: Target, channel: str, sample: bool, subscribe: bool, out: WorkerResult
    ) -> None:
        super().__init__(target, channel, sample, subscribe, out)
        self.parser = _core.WSParser(MAX_MESSAGE, client=True)
        self.head: bytes | None = b""  # response head until the upgrade is done
        self.fastim = target.fastim
        # a fastim subscriber's first text message is the "subscribed" reply
        self.awaiting_reply = self.fastim and subscribe
        self.fed = 0  # parse mode: bytes fed since the last frame boundary ...
        self.framed = 0  # ... and bytes of the frames it returned

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proto = "fastim.json" if self.fastim else None
        transport.write(upgrade_request(self.target, proto))  # type: ignore[attr-defined]

    def layout(self, plen: int) -> tuple[int, bytes]:
        return _ws_layout(plen)

    def _upgraded(self, data: bytes) -> bytes | None:
        """Collect the 101 response; return the bytes after it, or None while incomplete."""
        head = (self.head or b"") + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > 16384:
                self.fail("upgrade: response head too long")
            self.head = head
            return None
        status = head[: head.find(b"\r\n")]
        if b" 101 " not in status + b" ":
            self.fail(f"upgrade refused: {status[:100]!r}")
            return None
        self.head = None
        assert self.transport is not None
        if self.awaiting_reply:
            self.transport.write(
                _ws_text(b'{"op":"sub","ch":%s,"id":1}' % orjson.dumps(self.channel))
            )
        else:
            self._ready()
        return head[end + 4 :]

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            rest = self._upgraded(data)
            if not rest:
                return
            data = rest
        super().data_received(data)

    def parse(self, data: bytes) -> int:
        try:
            events = self.parser.feed(data)
        except Exception as e:
            self.fail(f"websocket: {e}")
            return 0
        n = 0
        if self.sample or self.awaiting_reply:
            now = time.monotonic_ns()
            for op, p in events:
                if op <= _OP_BINARY:  # text (1) or binary (2); control ops are ≥ 8
                    if self.awaiting_reply:
                        self._reply(p)
                        continue
                    n += 1
                    if self.sample:
                        d = orjson.loads(p)
                        if self.fastim:
                            if d.get("op") != "msg":
                                self.fail(f"unexpected message: {p[:100]!r}")
                                continue
                            d = d["data"]
                        self.check(d, now)
                else:
                    self._control(op, p)
            return n
        plen = -1
        framed = self.framed
        for op, p in events:
            plen = len(p)
            framed += plen + (2 if plen < 126 else 4 if plen < 65536 else 10)
            if op <= _OP_BINARY:
                n += 1
            else:
                plen = -1
                self._control(op, p)
        fed = self.fed + len(data)
        if fed == framed:  # on a frame boundary (the parser holds nothing)
            self.fed = self.framed = 0
            if plen >= 0 and not self.closing:
                self.enter(plen)
        else:
            self.fed, self.framed = fed, framed
        return n

    def _reply(self, p: bytes) -> None:
        d = orjson.loads(p)
        if d.get("op") == "subscribed":
            self.awaiting_reply = False
            self._ready()
        else:
            self.fail(f"subscribe refused: {p[:100]!r}")

    def _control(self, op: int, p: bytes) -> None:
        tr = self.transport
        if op == _OP_PING and tr is not None:
            tr.write(_core.ws_encode(_core.OP_PONG, p, mask=_mask()))
        elif op == _OP_CLOSE and not self.closing:
            code, reason = _core.ws_parse_close(p)
            self.fail(f"server closed the WebSocket: {code} {reason!r}")

    def close(self) -> None:
        if self.transport is not None and not self.closed and self.head is None:
            self.transport.write(
                _core.ws_encode(_OP_CLOSE, _core.ws_close_payload(1000), mask=_mask())
            )
        super().close()


def _sub_class(t: Target) -> type[_Sub]:
    return _TcpSub if t.kind == "tcp" else _WsSub


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
    cls = _sub_class(target)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            local = (f"127.0.0.{ip_base + i // CONNS_PER_IP}", 0) if ip_base else None
            _t, proto = await loop.create_connection(
                lambda: cls(target, channel, i in sampled, subscribe, out),
                target.host,
                target.port,
                local_addr=local,
            )
            subs.append(proto)
            await asyncio.wait_for(proto.ready, 30)
            done += 1
            if on_progress is not None and done % 250 == 0:
                on_progress(done)

    await asyncio.gather(*(one(i) for i in range(n)))
    return subs


def spread_sample(n: int, k: int) -> set[int]:
    """``k`` indices evenly spread over ``range(n)``: early and late connections alike.

    Where a subscriber sits in the server's fan-out order decides its latency; sampling
    only the first connections would measure only the head of the fan-out.
    """
    k = max(0, min(n, k))
    if k == 0:
        return set()
    return {int(i * n / k) for i in range(k)}


# ---------------------------------------------------------------------------- workers


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
    t0 = time.monotonic()
    c0 = time.process_time()
    s0 = os.times().system
    expected: int | None = None
    deadline = 0.0
    while True:
        # commands: ("go",) restarts the CPU clock at the start of publishing,
        # ("expect", total, drain) waits for every connection to have ``total`` messages,
        # ("stop",) reports now (idle mode)
        cmd = await loop.run_in_executor(None, pipe.recv) if expected is None else None
        if cmd is not None:
            if cmd[0] == "go":
                t0 = time.monotonic()
                c0 = time.process_time()
                s0 = os.times().system
                continue
            if cmd[0] == "stop":
                break
            if cmd[0] == "expect":
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


def _worker(spec: WorkerSpec, pipe: Connection) -> None:
    _raise_fd_limit()
    try:
        _run_loop(_worker_main(spec, pipe))
    except Exception as e:  # report, don't hang the parent
        pipe.send(("error", repr(e)))


# ---------------------------------------------------------------------------- publisher


class _Pub(asyncio.Protocol):
    """The publisher's connection: sends, counts fastim's acks, answers pings."""

    def __init__(self, target: Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self.acked = 0
        self.errors: list[str] = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b"" if target.kind != "tcp" else None
        self.dec = _core.FrameDecoder(MAX_MESSAGE, _SERVER_TYPES)
        self.parser = _core.WSParser(MAX_MESSAGE, client=True)
        self.ch_json = orjson.dumps(channel)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.target.kind == "tcp":
            transport.write(_core.encode_frame(FrameType.HELLO, pack_hello(1, 1)))  # type: ignore[attr-defined]
        else:
            proto = "fastim.json" if self.target.fastim else None
            transport.write(upgrade_request(self.target, proto))  # type: ignore[attr-defined]

    def publish(self, seq: int, payload: bytes) -> None:
        assert self.transport is not None
        k = self.target.kind
        if k == "tcp":
            frame = _core.encode_frame(
                FrameType.PUB, pack_sub(FrameType.PUB, seq & 0xFFFFFFFF, self.channel, payload)
            )
        elif k == "ws":
            frame = _ws_text(
                b'{"op":"pub","ch":%s,"data":%s,"id":%d}' % (self.ch_json, payload, seq)
            )
        else:
            frame = _ws_text(payload)
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        try:
            if self.target.kind == "tcp":
                self._frames(data)
                return
            if self.head is not None:
                head = self.head + data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    self.head = head
                    return
                status = head[: head.find(b"\r\n")]
                if b" 101 " not in status + b" ":
                    self._error(f"publisher upgrade refused: {status[:100]!r}")
                    return
                self.head = None
                if not self.ready.done():
                    self.ready.set_result(None)
                data = head[end + 4 :]
            for op, p in self.parser.feed(data):
                if op == _OP_TEXT:
                    if b'"puback"' in p:
                        self.acked += 1
                    else:
                        self._error(f"publisher got {p[:120]!r}")
                elif op == _OP_PING and self.transport is not None:
                    self.transport.write(_core.ws_encode(_core.OP_PONG, p, mask=_mask()))
                elif op == _OP_CLOSE:
                    self._error(f"publisher: server closed {_core.ws_parse_close(p)}")
        except Exception as e:
            self._error(f"publisher: {e!r}")

    def _frames(self, data: bytes) -> None:
        for t, p in self.dec.feed(data):
            if t == FrameType.PUBACK:
                self.acked += 1
            elif t == FrameType.WELCOME and not self.ready.done():
                self.ready.set_result(None)
            elif t == FrameType.PING and self.transport is not None:
                self.transport.write(_core.encode_frame(FrameType.PONG, p))
            elif t in (FrameType.ERROR, FrameType.GOAWAY):
                self._error(f"publisher got frame 0x{t:02x}: {p[:100]!r}")

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
    errors: list[str] = field(default_factory=list)


async def _drive(
    target: Target,
    args: argparse.Namespace,
    pipes: list[Connection],
    server_pid: int | None,
    progress: bool,
) -> PubResult:
    """Connect publisher and probe, start the workers' clocks, publish, wait for the probe."""
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
    for a in pipes:
        a.send(("go",))
    cpu_pids = _cpu_pids(args, server_pid)
    cpu0 = _cpu_sum(cpu_pids)
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
        if sent - probe.count >= window:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 10)
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
                f"  probe {probe.count:,}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    res.publish_s = time.monotonic() - t0
    # the last messages: the probe, served last, has them when the server is done
    wait_until = time.monotonic() + args.drain
    while probe.count < sent and time.monotonic() < wait_until and not probe.closed:
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), max(0.01, wait_until - time.monotonic()))
        except asyncio.TimeoutError:
            break
    res.elapsed_s = time.monotonic() - t0
    cpu1 = _cpu_sum(cpu_pids)
    if cpu0 is not None and cpu1 is not None:
        res.server_cpu_s = cpu1 - cpu0
    if target.fastim:
        ack_until = time.monotonic() + 5
        while pub.acked < sent and time.monotonic() < ack_until:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
    res.published = sent
    res.acked = pub.acked
    res.probe_received = probe.count
    res.probe_last_rx = probe.last_rx
    res.errors = pub.errors + probe_out.errors
    if stalled:
        res.errors.append(f"the probe received nothing for 10 s (at {probe.count} of {sent})")
    if progress:
        print(file=sys.stderr)
    probe.close()
    if pub.transport is not None:
        pub.transport.close()
    await asyncio.sleep(0.05)
    return res


async def _warm_up(target: Target, channel: str, n: int, subscribe: bool) -> None:
    """Open and close a few connections: first-use allocations out of the RSS baseline."""
    out = WorkerResult()
    subs = await open_subs(target, channel, n, set(), subscribe, out)
    for s in subs:
        s.close()
    await asyncio.sleep(0.3)


# ---------------------------------------------------------------------------- server side


def _read_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def server_rss_kib(pid: int | None) -> int | None:
    """The process's resident set (VmRSS), KiB; None if unknown."""
    return None if pid is None else _read_status_kib(pid, "VmRSS")


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds the process has used; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_pids(args: argparse.Namespace, server_pid: int | None) -> list[int]:
    """The processes whose CPU is the server's: ``--server-pids`` (the nodes of a
    cluster), else the one server pid (if known)."""
    pids = [int(x) for x in (getattr(args, "server_pids", None) or "").split(",") if x.strip()]
    return pids or ([server_pid] if server_pid is not None else [])


def _cpu_sum(pids: list[int]) -> float | None:
    """CPU seconds used by all of ``pids`` so far; None if any is unknown (or none given)."""
    total = 0.0
    for pid in pids:
        cpu = server_cpu_s(pid)
        if cpu is None:
            return None
        total += cpu
    return total if pids else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_node(
    transport: str, core: str | None, store: str, directory: str
) -> tuple[subprocess.Popen[bytes], Target]:
    """A node of this machine on a free port, its store (a sqlite file for the default)
    in ``directory``."""
    port = _free_port()
    ports = ["--tcp-port", str(port), "--ws-port", "0"]
    if transport == "ws":
        ports = ["--tcp-port", "0", "--ws-port", str(port)]
    cmd = [
        sys.executable,
        "-m",
        "fastim",
        "serve",
        *ports,
        "--log-level",
        "warning",
        "--node-id",
        "bench-node",
        # the per-connection publish rate limit is a guard for the internet, not for a
        # load test's one publisher (the peer servers have none either)
        "--publish-rate",
        "0",
        "--store",
        store,
    ]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", core, *cmd]
    proc = subprocess.Popen(cmd, cwd=directory)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            kind = "ws" if transport == "ws" else "tcp"
            return proc, Target(kind, "127.0.0.1", port, "/ws" if kind == "ws" else "/")
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("fastim bench: the spawned node did not start")


# ---------------------------------------------------------------------------- the run


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[k]


def _affinity(spec: str | None) -> set[int] | None:
    if spec is None or not hasattr(os, "sched_setaffinity"):
        return None
    return {int(c) for c in spec.split(",")}


def _default_sample(args: argparse.Namespace) -> int:
    """Sampled subscribers: a few at saturation (their decoding costs generator CPU);
    up to 1,000 at a fixed rate, where the per-message cost is small and p99 needs
    samples from all along the fan-out order."""
    if args.sample is not None:
        return int(args.sample)
    n = int(args.subscribers)
    if args.rate:
        return min(n, 1000)
    # at most 1% of the deliveries: with 50 subscribers and ~60k publishes/s, 10 decoding
    # subscribers alone saturated the generator's core (measured)
    return max(1, min(10, n // 100))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark; return the result as a dict."""
    node = None
    server_pid: int | None = getattr(args, "server_pid", None)
    if args.url is not None and args.peer is not None:
        raise SystemExit("fastim bench: give --url or --peer, not both")
    if args.url is not None:
        target = parse_target(args.url)
    elif args.peer is not None:
        target = parse_target(args.peer, peer=True)
    else:
        workdir = tempfile.mkdtemp(prefix="fastim-bench-")
        node, target = _spawn_node(args.transport, args.server_cpu, args.store, workdir)
        server_pid = node.pid
    try:
        result = _run(target, args, server_pid)
        if node is not None:
            result["store"] = args.store
        return result
    finally:
        if node is not None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
            shutil.rmtree(workdir, ignore_errors=True)


def _run(target: Target, args: argparse.Namespace, server_pid: int | None) -> dict[str, Any]:
    idle = bool(args.idle)
    progress = not args.json and not args.quiet
    n_total = args.subscribers
    # the probe, in the publisher's process, is one of the N subscribers
    n_workers_conns = n_total if idle else n_total - 1
    procs = max(1, args.processes, math.ceil(n_workers_conns / CONNS_PER_PROCESS))
    spread = args.spread_ips or n_total > CONNS_PER_IP
    share = [
        n_workers_conns // procs + (1 if i < n_workers_conns % procs else 0) for i in range(procs)
    ]
    n_sample = 0 if idle else _default_sample(args)
    subscribe = not (idle and args.no_subscribe) and target.fastim
    sub_targets = _sub_targets(args, target)
    cpus = _affinity(args.client_cpu)
    if cpus:
        os.sched_setaffinity(0, cpus)
    if progress:
        what = (
            "idle connections"
            if idle
            else (
                f"{args.rate:g} msg/s" if args.rate else f"saturation (≤{args.inflight} in flight)"
            )
        )
        print(
            f"fastim bench → {target.url} ({target.kind}): {n_total:,} connections in "
            f"{procs} process(es), {args.size}-byte messages, {what}"
            + ("" if idle else f", {args.duration:g}s"),
            file=sys.stderr,
        )
    rss_before = None
    if idle and server_pid is not None:
        _run_loop(_warm_up(target, args.channel, min(20, n_total), subscribe))
        rss_before = server_rss_kib(server_pid)
    ctx = _mp_context()
    pipes: list[Connection] = []
    workers = []
    samples_left = n_sample
    for i, n in enumerate(share):
        a, b = ctx.Pipe()
        k = min(n, math.ceil(samples_left / (procs - i))) if n_sample else 0
        samples_left -= k
        spec = WorkerSpec(
            target, args.channel, n, k, subscribe, (1 + i * 8) if spread else 0, sub_targets
        )
        p = ctx.Process(target=_worker, args=(spec, b), daemon=True)
        p.start()
        if cpus and p.pid:
            os.sched_setaffinity(p.pid, cpus)
        pipes.append(a)
        workers.append(p)
    try:
        return _measure(
            target, args, server_pid, pipes, share, progress, idle, rss_before, n_sample, procs
        )
    finally:
        for p in workers:
            p.join(5)
            if p.is_alive():
                p.terminate()


def _sub_targets(args: argparse.Namespace, target: Target) -> tuple[Target, ...]:
    """``--sub-urls``: the nodes of a cluster the subscribers are spread over (the
    publisher and the probe stay on ``--url``); empty: every subscriber on the target."""
    urls = [u.strip() for u in (getattr(args, "sub_urls", None) or "").split(",") if u.strip()]
    if not urls:
        return ()
    if not target.fastim:
        raise SystemExit("fastim bench: --sub-urls needs --url (fastim nodes), not --peer")
    targets = tuple(parse_target(u) for u in urls)
    if any(t.kind != target.kind for t in targets):
        raise SystemExit("fastim bench: --sub-urls must use the transport of --url")
    return targets


def _mp_context() -> Any:
    """forkserver with this module preloaded: a worker starts in ~10 ms instead of ~200 ms
    (peers_e2e.py starts dozens); spawn where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # pragma: no cover - not on Linux
        return mp.get_context("spawn")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _collect(pipes: list[Connection], timeout: float) -> list[WorkerResult]:
    out: list[WorkerResult] = []
    for a in pipes:
        if not a.poll(timeout):
            raise SystemExit("fastim bench: a worker did not report its result")
        msg = a.recv()
        while msg[0] == "progress":
            msg = a.recv()
        if msg[0] != "result":
            raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
        out.append(WorkerResult(**msg[1]))
    return out


def _measure(
    target: Target,
    args: argparse.Namespace,
    server_pid: int | None,
    pipes: list[Connection],
    share: list[int],
    progress: bool,
    idle: bool,
    rss_before: int | None,
    n_sample: int,
    procs: int,
) -> dict[str, Any]:
    n_total = args.subscribers
    counts = [0] * len(pipes)
    waiting = {id(a): i for i, a in enumerate(pipes)}
    t_conn = time.monotonic()
    while waiting:
        for a in wait([pipes[i] for i in waiting.values()], timeout=60):
            i = waiting[id(a)]
            msg = pipes[i].recv()
            if msg[0] == "progress":
                counts[i] = msg[1]
            elif msg[0] == "ready":
                counts[i] = msg[1]
                del waiting[id(a)]
            else:
                raise SystemExit(f"fastim bench: worker failed: {msg[1]}")
        if time.monotonic() - t_conn > 600:
            raise SystemExit("fastim bench: connecting took more than 10 minutes")
        if progress:
            print(
                f"\r  connected {sum(counts):,}/{sum(share):,}", end="", file=sys.stderr, flush=True
            )
    connect_s = time.monotonic() - t_conn
    if progress:
        print(f"  ({connect_s:.1f}s)", file=sys.stderr)
    out: dict[str, Any] = {
        "target": target.kind,
        "url": target.url,
        "sub_urls": [t.url for t in _sub_targets(args, target)] or None,
        "subscribers": n_total,
        "connect_s": round(connect_s, 2),
    }
    gen_cpu0 = time.process_time()
    if idle:
        return _idle(out, args, server_pid, pipes, rss_before, progress)
    pub = _run_loop(_drive(target, args, pipes, server_pid, progress))
    pub_cpu = time.process_time() - gen_cpu0
    for a in pipes:
        a.send(("expect", pub.published, args.drain))
    results = _collect(pipes, args.drain + 30)
    sent = pub.published
    received = sum(r.received for r in results) + pub.probe_received
    expected = sent * n_total
    lat = [x for r in results for x in r.latencies_us]
    elapsed = max(pub.elapsed_s, 1e-9)
    per_proc = [round(100 * r.cpu_s / r.wall_s, 1) if r.wall_s else 0.0 for r in results]
    per_proc_sys = [round(100 * r.sys_s / r.wall_s, 1) if r.wall_s else 0.0 for r in results]
    pub_pct = round(100 * pub_cpu / elapsed, 1)
    n_cores = len(_affinity(args.client_cpu) or os.sched_getaffinity(0))
    total_pct = round(sum(per_proc) + pub_pct, 1)
    closed = sum(r.closed for r in results)
    errors = [e for r in results for e in r.errors] + pub.errors
    if closed:
        errors.insert(0, f"the server closed {closed} subscriber connections during the run")
    out.update(
        {
            "size": args.size,
            "mode": "rate" if args.rate else "saturation",
            "rate": args.rate,
            "inflight": args.inflight,
            "duration_s": round(elapsed, 3),
            # the last message any subscriber received, after the probe's last: near 0
            # (or below) when the generator kept up, large when its own sockets queued
            "subscribers_lag_s": round(
                max([r.last_rx for r in results] or [pub.probe_last_rx]) - pub.probe_last_rx, 3
            ),
            "published": sent,
            "acked": pub.acked if target.fastim else None,
            "publish_per_s": round(sent / elapsed, 1),
            "deliveries": received,
            "deliveries_expected": expected,
            "deliveries_per_s": round(received / elapsed, 1),
            "lost": max(0, expected - received),
            "per_conn_min": min([r.per_conn_min for r in results if r.connections] or [0]),
            "reordered": sum(r.reordered for r in results),
            "duplicates": sum(r.duplicates for r in results),
            "latency_us": {
                "samples": len(lat),
                "sampled_subscribers": sum(r.sampled for r in results),
                "p50": round(_pct(lat, 50), 1),
                "p90": round(_pct(lat, 90), 1),
                "p99": round(_pct(lat, 99), 1),
                "max": round(max(lat), 1) if lat else None,
            },
            "server": {
                "pid": server_pid,
                "cpu_pids": _cpu_pids(args, server_pid),
                "cpu_pct": round(100 * pub.server_cpu_s / elapsed, 1)
                if pub.server_cpu_s is not None
                else None,
                "rss_kib": server_rss_kib(server_pid),
            },
            "generator": {
                "processes": procs,
                "cores": n_cores,
                "worker_cpu_pct": per_proc,
                "worker_sys_pct": per_proc_sys,
                "worker_cpu_max_pct": max(per_proc) if per_proc else 0.0,
                "publisher_cpu_pct": pub_pct,
                "total_cpu_pct": total_pct,
                "load_pct_of_cores": round(total_pct / n_cores, 1),
            },
            "errors": errors[:20],
        }
    )
    return out


def _idle(
    out: dict[str, Any],
    args: argparse.Namespace,
    server_pid: int | None,
    pipes: list[Connection],
    rss_before: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Hold the connections until the server's RSS is steady; report its growth."""
    t0 = time.monotonic()
    prev = server_rss_kib(server_pid)
    steady = 0
    while server_pid is not None and time.monotonic() - t0 < args.settle:
        time.sleep(0.25)
        cur = server_rss_kib(server_pid)
        if cur is None or prev is None:
            break
        # steady: three readings in a row within 0.2% (or 64 KiB) of each other
        steady = steady + 1 if abs(cur - prev) <= max(64, prev // 500) else 0
        prev = cur
        if progress:
            print(f"\r  settling: server RSS {cur:,} KiB", end="", file=sys.stderr, flush=True)
        if steady >= 3:
            break
    if progress:
        print(file=sys.stderr)
    rss_after = server_rss_kib(server_pid)
    settle_s = time.monotonic() - t0
    for a in pipes:
        a.send(("stop",))
    results = _collect(pipes, 60)
    n = sum(r.connections for r in results)
    errors = [e for r in results for e in r.errors]
    closed = sum(r.closed for r in results)
    if closed:
        errors.insert(0, f"the server closed {closed} idle connections")
    per_conn = None
    if rss_before is not None and rss_after is not None and n:
        per_conn = round((rss_after - rss_before) * 1024 / n, 1)
    out.update(
        {
            "mode": "idle",
            "subscribed": not args.no_subscribe and out["target"] != "peer",
            "connections": n,
            "server": {
                "pid": server_pid,
                "rss_before_kib": rss_before,
                "rss_after_kib": rss_after,
                "rss_growth_bytes_per_conn": per_conn,
            },
            "settle_s": round(settle_s, 2),
            "errors": errors[:20],
        }
    )
    if server_pid is None:
        out["errors"].append("server pid unknown (--server-pid): RSS not measured")
    return out


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def failed(r: dict[str, Any]) -> bool:
    """Whether a result shows loss, reordering, duplicates or errors."""
    if r.get("mode") == "idle":
        return bool(r["errors"]) or r["connections"] < r["subscribers"]
    return bool(r["lost"] or r["reordered"] or r["duplicates"] or r["errors"])


def render(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("target", f"{r['url']} ({r['target']})"),
    ]
    if r.get("sub_urls"):
        rows.append(("subscribers on", ", ".join(r["sub_urls"])))
    if r.get("mode") == "idle":
        s = r["server"]
        rows += [
            (
                "connections",
                f"{r['connections']:,} idle" + (", subscribed" if r["subscribed"] else ""),
            ),
            ("connect", f"{r['connect_s']:.1f}s"),
            (
                "server RSS",
                f"{s['rss_before_kib']:,} KiB → {s['rss_after_kib']:,} KiB"
                if s["rss_before_kib"] is not None and s["rss_after_kib"] is not None
                else "unknown (give --server-pid)",
            ),
            (
                "RSS per connection",
                f"{s['rss_growth_bytes_per_conn']:,.0f} B"
                if s["rss_growth_bytes_per_conn"] is not None
                else "-",
            ),
        ]
    else:
        lat = r["latency_us"]
        g = r["generator"]
        srv = r["server"]
        rows += [
            ("subscribers", f"{r['subscribers']:,} (connect {r['connect_s']:.1f}s)"),
            (
                "mode",
                f"{r['mode']}"
                + (f" {r['rate']:g} msg/s" if r["rate"] else f" (≤{r['inflight']} in flight)"),
            ),
            ("message size", f"{r['size']} B"),
            (
                "published",
                f"{r['published']:,} in {r['duration_s']:.2f}s = {r['publish_per_s']:,.0f}/s"
                + (f" ({r['acked']:,} acked)" if r["acked"] is not None else ""),
            ),
            ("deliveries", f"{r['deliveries']:,} of {r['deliveries_expected']:,}"),
            ("deliveries/s", f"{r['deliveries_per_s']:,.0f}"),
            (
                "subscribers' lag",
                f"{1000 * r['subscribers_lag_s']:,.1f} ms after the probe's last message",
            ),
            (
                "latency p50/p90/p99",
                f"{lat['p50'] / 1000:,.2f} / {lat['p90'] / 1000:,.2f} / {lat['p99'] / 1000:,.2f} ms"
                f" ({lat['samples']:,} samples, {lat['sampled_subscribers']} subscribers)",
            ),
            (
                "lost / reordered / dup",
                f"{r['lost']:,} / {r['reordered']:,} / {r['duplicates']:,}",
            ),
            (
                "server CPU",
                f"{srv['cpu_pct']}%" if srv["cpu_pct"] is not None else "unknown (--server-pid)",
            ),
            (
                "generator CPU",
                f"{g['total_cpu_pct']}% on {g['cores']} core(s): workers "
                + ", ".join(
                    f"{x}% ({y}% kernel)"
                    for x, y in zip(g["worker_cpu_pct"], g["worker_sys_pct"], strict=True)
                )
                + f"; publisher+probe {g['publisher_cpu_pct']}%",
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
    add_bench_arguments(p)
    p.set_defaults(func=_cmd)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags (also used by benchmarks/peers_e2e.py)."""
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument(
        "--url", help="fastim node: tcp://host:port or ws://host:port/ws; default: spawn one"
    )
    tgt.add_argument("--peer", help="plain broadcast peer: ws://host:port/path (no acks)")
    p.add_argument(
        "--sub-urls",
        default=None,
        metavar="URL,URL,...",
        help="with --url: spread the subscribers evenly over these nodes (a cluster); the "
        "publisher and the probe subscriber stay on --url",
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ws"),
        default="tcp",
        help="of the node the bench spawns when no URL is given (default tcp)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="of the node the bench spawns: sqlite (the node's default, durable: every "
        "publish is in the file before it is acknowledged) or memory (default sqlite)",
    )
    p.add_argument("--subscribers", "-n", type=int, default=1000)
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds of publishing")
    p.add_argument("--rate", "-r", type=float, default=0.0, help="msg/s; 0 = saturation")
    p.add_argument(
        "--inflight",
        "-w",
        type=int,
        default=64,
        help="published − received by the probe subscriber, at most (W)",
    )
    p.add_argument("--size", "-s", type=int, default=64, help="message size, bytes (≥ 40)")
    p.add_argument(
        "--processes",
        "-p",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help=f"subscriber worker processes (at least one per {CONNS_PER_PROCESS:,} connections)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="subscribers that check every message (default 1%% up to 10; 1,000 with --rate)",
    )
    p.add_argument("--channel", default="bench")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers")
    p.add_argument("--server-cpu", default="0", help="CPU to pin a spawned node to (taskset)")
    p.add_argument("--server-pid", type=int, default=None, help="server to read RSS/CPU of")
    p.add_argument(
        "--server-pids",
        default=None,
        metavar="PID,PID,...",
        help="the server's CPU is these processes' together (the nodes of a cluster)",
    )
    p.add_argument("--client-cpu", default=None, help="CPUs for the generator, e.g. 1")
    p.add_argument(
        "--spread-ips",
        action="store_true",
        help=f"bind subscribers to 127.0.0.x source addresses (automatic above {CONNS_PER_IP:,})",
    )
    p.add_argument(
        "--idle", action="store_true", help="open N connections and report server RSS per conn"
    )
    p.add_argument(
        "--no-subscribe",
        action="store_true",
        help="with --idle: fastim connections stay unsubscribed",
    )
    p.add_argument(
        "--settle", type=float, default=10.0, help="with --idle: seconds at most for RSS to settle"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _cmd(args: argparse.Namespace) -> int:
    if args.subscribers < 1 or args.duration <= 0 or args.inflight < 1:
        print(
            "fastim bench: --subscribers, --duration and --inflight must be positive",
            file=sys.stderr,
        )
        return 2
    if not args.idle and args.subscribers < 2:
        print("fastim bench: need 2 subscribers at least (one is the probe)", file=sys.stderr)
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 1 if failed(result) else 0
