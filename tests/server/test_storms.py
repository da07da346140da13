"""Hostile input at volume: reconnect storms and garbage on many connections at once.

A control pair (a TCP and a WS-JSON client subscribed to one channel) keeps doing pub/sub
round trips the whole time; the worst round trip must stay well under a second or two.
The bound is generous on purpose: the point is that the node is never blocked by the
storm, not a benchmark. After each storm the node's state must be back where it was:
sessions, channels, timer-wheel entries, per-address counters, flusher backlog, and the
process's open file descriptors (no leaked socket).

The node runs in the test's process and loop (so its state can be read): storm clients
and node share one core, which makes the round-trip bound conservative. Connections are
opened and closed as fast as the openers go, never held in bulk, so the process stays
far below its file-descriptor limit.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastim import _core
from fastim.errors import ProtocolError, WebSocketError
from fastim.node import Node
from fastim.protocol import (
    CloseCode,
    ErrorCode,
    FrameType,
    pack_hello,
    pack_sub,
    unpack_error,
    unpack_goaway,
)
from fastim.session import CLIENT_TYPES_MASK

from ._support import Control, deadline

F = FrameType
CONTROL_SESSIONS = 2
RTT_BOUND = 2.0  # seconds: "still served", with a wide margin for a loaded 2-core machine
T = 10.0  # bound of any single wait of a storm connection
HELLO = _core.encode_frame(F.HELLO, pack_hello(1, 1))


# --------------------------------------------------------------------------- the watch


@dataclass
class Watch:
    """Control round trips in a loop until stopped: how many, and the slowest."""

    control: Control
    rtts: list[float] = field(default_factory=list)
    _stop: bool = False
    _task: asyncio.Task[None] | None = None

    def start(self) -> Watch:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            t0 = loop.time()
            await self.control.roundtrip(timeout=RTT_BOUND * 5)
            self.rtts.append(loop.time() - t0)
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop = True
        assert self._task is not None
        await asyncio.wait_for(self._task, RTT_BOUND * 5)

    def check(self, at_least: int) -> None:
        assert len(self.rtts) >= at_least, f"only {len(self.rtts)} control round trips"
        worst = max(self.rtts)
        assert worst < RTT_BOUND, f"worst control round trip {worst:.3f}s"


@dataclass
class Baseline:
    """What must come back after a storm."""

    state: tuple[Any, ...]
    NAMES = ("sessions", "subscribers", "presence", "wheel", "ip_conns", "flusher", "fds")

    @classmethod
    def of(cls, node: Node) -> Baseline:
        # sockets earlier tests left unreferenced must not be closed by the collector
        # during the storm, under the baseline's count: collected before it is taken
        gc.collect()
        return cls(cls.now(node))

    async def check(self, node: Node, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (now := self.now(node)) != self.state:
            if loop.time() > end:
                diff = {
                    name: (a, b)
                    for name, a, b in zip(self.NAMES, now, self.state, strict=True)
                    if a != b
                }
                raise AssertionError(f"node state not back to baseline (now, before): {diff}")
            await asyncio.sleep(0.05)

    @staticmethod
    def now(node: Node) -> tuple[Any, ...]:
        """Channels stay (with their history, for history_ttl); their members must not."""
        channels = node.hub.channels.values()
        return (
            len(node.sessions),
            {ch.name: len(ch.subs) for ch in channels if len(ch.subs)},
            {ch.name: dict(ch.users) for ch in channels if ch.users},
            len(node.wheel),
            dict(node._ip_conns),
            node.flusher.pending,
            _fds(),
        )


def _fds() -> int:
    """Open sockets of this process (the node's connections and listeners). Files are
    not counted: a store's files (the default sqlite store: the database, its WAL, the
    lock) come and go with other tests' nodes and with checkpoints, not with a storm."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            continue  # closed meanwhile (the listing itself, a thread's file)
    return n


# --------------------------------------------------------------------------- raw clients


async def _connect(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), T)
    except BaseException:
        sock.close()
        raise
    return sock


def _abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the rudest way to leave."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _recv(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), T)
    except (ConnectionResetError, BrokenPipeError):
        return b""


async def _read_to_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    out = b""
    while len(out) < limit:
        data = await _recv(sock)
        if not data:
            return out
        out += data
    raise AssertionError("the node kept sending")


async def _read_http_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await _recv(sock)
        assert data, f"EOF inside an HTTP response head: {buf[:200]!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(" ", 2)[1]), headers, rest


def _upgrade(port: int, extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (port, key, extra)
    )


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    dec = _core.FrameDecoder(1 << 30)
    frames = dec.feed(data)
    assert dec.buffered == 0, f"a partial frame from the node: {data[-40:]!r}"
    return frames


def _ws_events(data: bytes) -> list[tuple[int, bytes]]:
    return _core.WSParser(1 << 30, client=True).feed(data)


def _close_code(events: list[tuple[int, bytes]]) -> int | None:
    for op, payload in events:
        if op == _core.OP_CLOSE:
            return _core.ws_parse_close(payload)[0]
    return None


# --------------------------------------------------------------------------- one connection each


async def tcp_hello(node: Node) -> str:
    """HELLO, WELCOME, close: the shortest useful TCP session."""
    sock = await _connect(node.tcp_port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, HELLO)
        data = b""
        while len(data) < 9 or len(data) < 9 + struct.unpack("!I", data[:4])[0]:
            more = await _recv(sock)
            if not more:
                return _tcp_refusal(data)
            data += more
        (ftype, _), *_rest = _frames(data[: 9 + struct.unpack("!I", data[:4])[0]])
        if ftype == F.GOAWAY:
            return _tcp_refusal(data)
        assert ftype == F.WELCOME, ftype
        return "tcp hello"
    finally:
        sock.close()


def _tcp_refusal(data: bytes) -> str:
    """A per-address refusal of a TCP client: GOAWAY 4002 alone, then EOF."""
    frames = _frames(data)
    assert [t for t, _ in frames] == [F.GOAWAY], f"expected a refusal, got {frames}"
    code, reason = unpack_goaway(frames[0][1])
    assert code == CloseCode.RATE_LIMITED and reason, (code, reason)
    return "tcp refused 4002"


async def tcp_subscriber(node: Node) -> str:
    """HELLO with a user, SUB to one of 50 channels, read SUBSCRIBED, reset."""
    loop = asyncio.get_running_loop()
    sock = await _connect(node.tcp_port)
    n = random.randrange(50)
    try:
        hello = _core.encode_frame(F.HELLO, pack_hello(1, 1, b'{"user":"u%d"}' % (n % 7)))
        sub = _core.encode_frame(F.SUB, pack_sub(F.SUB, 1, f"storm:{n}"))
        await loop.sock_sendall(sock, hello + sub)
        dec = _core.FrameDecoder(1 << 30)
        frames: list[tuple[int, bytes]] = []
        data = b""
        while len(frames) < 2:
            more = await _recv(sock)
            if not more:
                return _tcp_refusal(data)
            data += more
            frames += dec.feed(more)
            if frames and frames[0][0] == F.GOAWAY:
                return _tcp_refusal(data)
        assert [t for t, _ in frames[:2]] == [F.WELCOME, F.SUBSCRIBED], frames
        return "tcp subscriber"
    finally:
        _abort(sock)


async def ws_subscriber(node: Node) -> str:
    """Upgrade, hello and sub in the same write, wait for subscribed, drop TCP."""
    sock = await _connect(node.ws_port)
    n = random.randrange(50)
    try:
        cmds = b"".join(
            _core.ws_encode(_core.OP_TEXT, orjson.dumps(c), mask=b"abcd")
            for c in ({"op": "hello", "user": f"u{n % 7}"}, {"op": "sub", "ch": f"storm:{n}"})
        )
        await asyncio.get_running_loop().sock_sendall(sock, _upgrade(node.ws_port) + cmds)
        status, headers, rest = await _read_http_head(sock)
        if status != 101:
            return _http_refusal(status, headers)
        parser = _core.WSParser(1 << 30, client=True)
        events = parser.feed(rest)
        while len(events) < 2:
            more = await _recv(sock)
            assert more, f"EOF before subscribed: {events}"
            events += parser.feed(more)
        ops = [orjson.loads(p)["op"] for _op, p in events[:2]]
        assert ops == ["welcome", "subscribed"], ops
        return "ws subscriber"
    finally:
        sock.close()


async def tcp_bare(node: Node) -> str:
    """Connect and close at once, nothing sent."""
    sock = await _connect(node.tcp_port)
    sock.close()
    return "tcp bare"


async def tcp_reset(node: Node) -> str:
    """Connect, half a HELLO, then a reset."""
    sock = await _connect(node.tcp_port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, HELLO[:5])
    finally:
        _abort(sock)
    return "tcp reset"


async def ws_upgrade(node: Node) -> str:
    """Upgrade, 101, then drop the TCP connection without a close frame."""
    sock = await _connect(node.ws_port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, _upgrade(node.ws_port))
        status, headers, _ = await _read_http_head(sock)
        if status != 101:
            return _http_refusal(status, headers)
        return "ws upgrade"
    finally:
        sock.close()


async def ws_clean(node: Node) -> str:
    """Upgrade, a ping in the same write, then the full close handshake."""
    loop = asyncio.get_running_loop()
    sock = await _connect(node.ws_port)
    try:
        ping = _core.ws_encode(_core.OP_PING, b"storm", mask=b"abcd")
        await loop.sock_sendall(sock, _upgrade(node.ws_port) + ping)
        status, headers, rest = await _read_http_head(sock)
        if status != 101:
            return _http_refusal(status, headers)
        close = _core.ws_encode(_core.OP_CLOSE, _core.ws_close_payload(1000), mask=b"efgh")
        await loop.sock_sendall(sock, close)
        events = _ws_events(rest + await _read_to_eof(sock))
        assert events == [(_core.OP_PONG, b"storm"), (_core.OP_CLOSE, b"\x03\xe8")], events
        return "ws clean"
    finally:
        sock.close()


def _http_refusal(status: int, headers: dict[str, str]) -> str:
    """A per-address refusal before the upgrade: 429 or 503, with Retry-After."""
    assert status in (429, 503), f"upgrade refused with {status} {headers}"
    assert headers.get("retry-after") == "1", headers
    return f"ws refused {status}"


STORM_KINDS: list[Callable[[Node], Awaitable[str]]] = [
    tcp_hello,
    tcp_hello,
    tcp_bare,
    tcp_reset,
    tcp_subscriber,
    ws_upgrade,
    ws_upgrade,
    ws_clean,
    ws_subscriber,
]
ALL_KINDS = {"tcp hello", "tcp bare", "tcp reset", "tcp subscriber"} | {
    "ws upgrade",
    "ws clean",
    "ws subscriber",
}


async def storm(node: Any, total: int, openers: int, seconds: float) -> Counter[str]:
    """``total`` connections opened and closed by ``openers`` concurrent loops."""
    counts: Counter[str] = Counter()
    failures: list[str] = []
    next_i = iter(range(total))

    async def opener(seed: int) -> None:
        rnd = random.Random(seed)
        for _i in next_i:
            kind = rnd.choice(STORM_KINDS)
            try:
                counts[await kind(node)] += 1
            except (OSError, asyncio.TimeoutError, AssertionError) as e:
                failures.append(f"{kind.__name__}: {e!r}")
                if len(failures) > 20:
                    return

    async with deadline(seconds):
        await asyncio.gather(*(opener(s) for s in range(openers)))
    assert not failures, f"{len(failures)} storm connections failed: {failures[:5]}"
    assert sum(counts.values()) == total
    return counts


# --------------------------------------------------------------------------- (a) reconnect storm


async def test_reconnect_storm_10k(node_factory: Any) -> None:
    """10,000 connections (TCP and WebSocket, five ways to come and go) opened and closed
    as fast as 32 openers go; the control pair stays served and nothing is left behind."""
    node = await node_factory()
    control = await Control(node).start()
    await control.roundtrip()
    base = Baseline.of(node)
    loop = asyncio.get_running_loop()
    watch = Watch(control).start()
    t0 = loop.time()
    counts = await storm(node, 10_000, openers=32, seconds=60)
    elapsed = loop.time() - t0
    await watch.stop()
    watch.check(at_least=3)
    assert set(counts) == ALL_KINDS
    await base.check(node)
    await control.roundtrip()
    print(
        f"\nstorm: 10,000 connections in {elapsed:.1f}s ({10_000 / elapsed:.0f}/s); "
        f"{len(watch.rtts)} control round trips, worst {max(watch.rtts) * 1000:.0f} ms; {counts}"
    )
    await control.close()


async def test_reconnect_storm_with_per_address_limits(node_factory: Any) -> None:
    """The same storm with loopback not exempt: over the connect rate (429 / GOAWAY 4002)
    or the per-address cap (503 / GOAWAY 4002) a connection is refused cleanly, the
    admitted ones work, the control pair stays served, and the counters come back."""
    node = await node_factory(
        ip_limits_exempt="", connect_rate_per_ip=200.0, max_connections_per_ip=24
    )
    control = await Control(node).start()
    base = Baseline.of(node)
    assert node._ip_conns == {"127.0.0.1": CONTROL_SESSIONS}
    watch = Watch(control).start()
    refusals0 = node.limit_refusals
    counts = await storm(node, 3_000, openers=32, seconds=60)
    await watch.stop()
    watch.check(at_least=3)
    # bare and reset connections cannot see a refusal; the others all say which they got
    refused = sum(n for k, n in counts.items() if "refused" in k)
    served = sum(n for k, n in counts.items() if k in ALL_KINDS - {"tcp bare", "tcp reset"})
    assert refused > 500 and served > 100, counts
    assert "tcp refused 4002" in counts and "ws refused 429" in counts, counts
    assert node.limit_refusals - refusals0 >= refused
    await base.check(node)
    await control.roundtrip()
    print(f"\nstorm with limits: {counts}; worst round trip {max(watch.rtts) * 1000:.0f} ms")
    await control.close()


def _proc_state(pid: int) -> tuple[int, int]:
    """(open file descriptors, resident KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


async def test_reconnect_storm_against_a_node_process(node_process: Any) -> None:
    """The storm from outside: the node in its own process (its own core), 10,000
    connections from this one. Its open files come back to the baseline exactly and its
    memory does not grow with the number of connections that came and went."""
    p = node_process()
    control = await Control(p).start()
    await control.roundtrip()
    pid = p.proc.pid
    fds0, rss0 = _proc_state(pid)
    watch = Watch(control).start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    counts = await storm(p, 10_000, openers=32, seconds=60)
    elapsed = loop.time() - t0
    await watch.stop()
    watch.check(at_least=3)
    assert set(counts) == ALL_KINDS
    for _ in range(200):  # the node closes its last sockets within a few ticks
        fds, rss = _proc_state(pid)
        if fds == fds0:
            break
        await asyncio.sleep(0.05)
    assert fds == fds0, f"the node holds {fds} files, {fds0} before the storm"
    assert rss - rss0 < 64 * 1024, f"node RSS grew from {rss0} to {rss} KiB"
    await control.roundtrip()
    print(
        f"\nstorm against a process: 10,000 connections in {elapsed:.1f}s; worst round trip "
        f"{max(watch.rtts) * 1000:.0f} ms; node RSS {rss0} -> {rss} KiB; {counts}"
    )
    await control.close()
    assert p.terminate() == 0


# --------------------------------------------------------------------------- (b) garbage at once


@dataclass
class Garbage:
    """One hostile connection and the answer the protocol documents for it."""

    name: str
    port: str  # "tcp" | "ws"
    send: list[bytes]  # written in order, ``gap`` seconds apart
    expect: Callable[[bytes], None]  # checks everything the node sent until EOF
    gap: float = 0.0
    upgrade: bool = False  # do the WebSocket upgrade first


def expect_error_goaway(codes: Collection[int]) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        frames = _frames(data)
        types = [t for t, _ in frames]
        if types and types[0] == F.WELCOME:
            types, frames = types[1:], frames[1:]
        assert types == [F.ERROR, F.GOAWAY], f"expected ERROR, GOAWAY; got {frames}"
        code = unpack_error(frames[0][1])[1]
        assert code in codes, f"error {code}, expected one of {codes}"
        close = unpack_goaway(frames[1][1])[0]
        assert close == ProtocolError("", code).close_code, (code, close)

    return check


def expect_ws_close(code: int, error: int | None = None) -> Callable[[bytes], None]:
    """A close frame with ``code``, after an error message with ``error`` if given."""

    def check(data: bytes) -> None:
        events = _ws_events(data)
        assert _close_code(events) == code, f"expected close {code}, got {events[-3:]}"
        texts = [orjson.loads(p) for op, p in events if op == _core.OP_TEXT]
        if error is None:
            assert texts == [], texts
        else:
            assert [t["code"] for t in texts] == [error], texts

    return check


def expect_http(status: int) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        assert data.startswith(b"HTTP/1.1 %d " % status), data[:100]
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert len(body) == length and body, (head, body)

    return check


def garbage_kinds(rnd: random.Random, max_frame: int) -> list[Garbage]:
    """One of each kind of hostile client, with fresh random bytes."""

    def rb(n: int) -> bytes:
        return rnd.randbytes(n)

    def decisive_tcp() -> bytes:
        # random bytes whose first header is decided at once (the decoder must not wait)
        while True:
            data = rb(rnd.randint(9, 300))
            try:
                _core.FrameDecoder(max_frame, CLIENT_TYPES_MASK).feed(data)
            except ProtocolError:
                return data

    def decisive_ws() -> tuple[bytes, int]:
        # random bytes that break RFC 6455 before any event: (bytes, the close code due)
        while True:
            data = rb(rnd.randint(2, 300))
            try:
                _core.WSParser(1 << 20).feed(data)
            except WebSocketError as e:
                if not e.events:
                    return data, e.ws_close_code

    mask = b"\x11\x22\x33\x44"
    huge = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 40) + mask
    bad_utf8 = _core.ws_encode(_core.OP_TEXT, b'{"op":"ping","x":"\xc3\x28"}', mask=mask)
    not_json = _core.ws_encode(_core.OP_TEXT, b"{" + rb(20).hex().encode(), mask=mask)
    tcp_codes = {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.BAD_CHECKSUM,
        ErrorCode.HANDSHAKE_REQUIRED,
    }
    endless = b"GET /ws HTTP/1.1\r\n" + b"X-A: " + b"a" * 20_000
    slow_head = [b"GET /ws HTTP/1.1\r\n", b"Host: x\r\n"] + [
        b"X-Slow: %d\r\n" % i for i in range(8)
    ]
    ws_random, ws_code = decisive_ws()
    return [
        Garbage("tcp random", "tcp", [decisive_tcp()], expect_error_goaway(tcp_codes)),
        Garbage(
            "tcp random after hello",
            "tcp",
            [HELLO + decisive_tcp()],
            expect_error_goaway(tcp_codes),
        ),
        Garbage(
            "tcp oversized frame",
            "tcp",
            [HELLO + struct.pack("!IBI", max_frame + 1, F.PUB, 0)],
            expect_error_goaway({ErrorCode.FRAME_TOO_LARGE}),
        ),
        Garbage(
            "tcp slowloris hello",
            "tcp",
            [HELLO[i : i + 1] for i in range(6)],
            expect_error_goaway({ErrorCode.HANDSHAKE_REQUIRED}),
            gap=0.2,
        ),
        Garbage("ws random frames", "ws", [ws_random], expect_ws_close(ws_code), upgrade=True),
        Garbage("ws oversized message", "ws", [huge], expect_ws_close(1009, 103), upgrade=True),
        Garbage("ws invalid utf-8", "ws", [bad_utf8], expect_ws_close(1007), upgrade=True),
        Garbage("ws not json", "ws", [not_json], expect_ws_close(4500, 102), upgrade=True),
        Garbage("http random bytes", "ws", [rb(200) + b"\r\n\r\n"], expect_http(400)),
        Garbage("http slowloris head", "ws", slow_head, expect_http(400), gap=0.2),
        Garbage("http endless head", "ws", [endless], expect_http(431)),
    ]


async def run_garbage(node: Node, g: Garbage) -> str:
    loop = asyncio.get_running_loop()
    port = node.tcp_port if g.port == "tcp" else node.ws_port
    sock = await _connect(port)
    try:
        prefix = b""
        if g.upgrade:
            await loop.sock_sendall(sock, _upgrade(port))
            status, _h, prefix = await _read_http_head(sock)
            assert status == 101, status
        for i, chunk in enumerate(g.send):
            if i and g.gap:
                await asyncio.sleep(g.gap)
            try:
                await loop.sock_sendall(sock, chunk)
            except (ConnectionResetError, BrokenPipeError):
                break  # the node already answered and closed
        data = prefix + await _read_to_eof(sock)
        if g.upgrade:
            # answer the close like a good client would have (the node may have gone)
            try:
                sock.send(_core.ws_encode(_core.OP_CLOSE, b"", mask=b"abcd"))
            except OSError:
                pass
        g.expect(data)
        return g.name
    finally:
        sock.close()


async def test_garbage_on_many_connections_at_once(node_factory: Any) -> None:
    """Hundreds of hostile connections at the same time (random bytes, oversized frames,
    invalid UTF-8, bad JSON, slowloris headers and HELLOs): each gets the documented
    answer and close, the control pair stays served, nothing is left behind."""
    node = await node_factory(handshake_timeout=1.5)
    control = await Control(node).start()
    await control.roundtrip()
    base = Baseline.of(node)
    errors0, rejects0 = node.protocol_errors, node.http_rejects
    rnd = random.Random(20240611)
    jobs = [g for _ in range(30) for g in garbage_kinds(rnd, node.config.max_frame)]
    rnd.shuffle(jobs)
    watch = Watch(control).start()
    async with deadline(60):
        results = await asyncio.gather(
            *(run_garbage(node, g) for g in jobs), return_exceptions=True
        )
    await watch.stop()
    bad = [(g.name, r) for g, r in zip(jobs, results, strict=True) if isinstance(r, BaseException)]
    assert not bad, f"{len(bad)} of {len(jobs)} hostile connections: {bad[:5]}"
    watch.check(at_least=3)
    # every one of them was counted as a protocol error or a rejected HTTP request
    assert (node.protocol_errors - errors0) + (node.http_rejects - rejects0) >= len(jobs)
    await base.check(node)
    await control.roundtrip()
    print(
        f"\ngarbage: {len(jobs)} hostile connections at once; "
        f"{len(watch.rtts)} control round trips, worst {max(watch.rtts) * 1000:.0f} ms"
    )
    await control.close()
