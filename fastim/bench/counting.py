"""The subscriber connections of the load generator: counting deliveries, checking a sample.

Every subscriber counts its data messages; an evenly spread sample of them decodes each
message to check its sequence number (loss, reordering, duplicates) and its publish-to-
delivery latency. Counting is the generator's hot loop: a count-only connection soon stops
parsing message by message and checks frame headers at the known stride instead (_Sub).
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .. import _core
from ..client.connection import HandshakeError
from ..protocol import FrameType, pack_hello, pack_sub, unpack_msg
from .target import Target, upgrade_request, upgrade_response
from .wire import MAX_MESSAGE, SERVER_TYPES, mask, ws_text

_MSG = int(FrameType.MSG)
_monotonic = time.monotonic
_OP_BINARY = _core.OP_BINARY
_OP_PING = _core.OP_PING
_OP_CLOSE = _core.OP_CLOSE


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
    pings: int = 0  # the server's heartbeat pings, each answered (a pong)
    #: --broadcast K: per message 1..K, the connections that received it, the first and
    #: the last of them (CLOCK_MONOTONIC ns); connections that got exactly K, more than K
    bcast_reached: list[int] = field(default_factory=list)
    bcast_first_ns: list[int] = field(default_factory=list)
    bcast_last_ns: list[int] = field(default_factory=list)
    conns_exact: int = 0
    conns_over: int = 0
    cpu_s: float = 0.0
    sys_s: float = 0.0  # of cpu_s, in the kernel (mostly recv copies)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class Waker(Protocol):
    """What a subscriber calls after a read that brought messages: the probe's
    ``asyncio.Event``, a worker's ``MinReporter`` (``--window every``), or with
    ``--broadcast`` the connection's ``broadcast.Reach``."""

    def set(self) -> None: ...


class _Sub(asyncio.Protocol):
    """One subscriber connection: counts data messages; a sampled one checks each.

    ``ready`` resolves when the connection can receive (fastim: subscribed, or just
    open with ``subscribe=False``; peer: upgrade done). ``wake``, set on the probe (and,
    with ``--window every``, on a worker's tracked subscribers), is set whenever a read
    brings messages, so the publisher can wait on it.

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
        self.wake: Waker | None = None
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
        self.dec = _core.FrameDecoder(MAX_MESSAGE, SERVER_TYPES)

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
            self.out.pings += 1
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
        self.key = ""  # the upgrade request's Sec-WebSocket-Key
        self.fastim = target.fastim
        # a fastim subscriber's first text message is the "subscribed" reply
        self.awaiting_reply = self.fastim and subscribe
        self.fed = 0  # parse mode: bytes fed since the last frame boundary ...
        self.framed = 0  # ... and bytes of the frames it returned

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request, self.key = upgrade_request(self.target)
        transport.write(request)  # type: ignore[attr-defined]

    def layout(self, plen: int) -> tuple[int, bytes]:
        return _ws_layout(plen)

    def _upgraded(self, data: bytes) -> bytes | None:
        """Collect the 101 response; return the bytes after it, or None while incomplete."""
        head = (self.head or b"") + data
        try:
            start = upgrade_response(self.target, head, self.key)
        except HandshakeError as e:
            self.fail(str(e))
            return None
        if start < 0:
            self.head = head
            return None
        self.head = None
        assert self.transport is not None
        if self.awaiting_reply:
            self.transport.write(
                ws_text(b'{"op":"sub","ch":%s,"id":1}' % orjson.dumps(self.channel))
            )
        else:
            self._ready()
        return head[start:]

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
            tr.write(_core.ws_encode(_core.OP_PONG, p, mask=mask()))
            self.out.pings += 1
        elif op == _OP_CLOSE and not self.closing:
            code, reason = _core.ws_parse_close(p)
            self.fail(f"server closed the WebSocket: {code} {reason!r}")

    def close(self) -> None:
        if self.transport is not None and not self.closed and self.head is None:
            self.transport.write(
                _core.ws_encode(_OP_CLOSE, _core.ws_close_payload(1000), mask=mask())
            )
        super().close()


def sub_class(t: Target) -> type[_Sub]:
    """The subscriber protocol for ``t``: fastim frames over TCP, or WebSocket."""
    return _TcpSub if t.kind == "tcp" else _WsSub
