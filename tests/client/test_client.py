"""The Python client SDK (fastim.client) against a real node over loopback sockets,
and against tiny scripted servers for what a real node will not do on demand
(wrong accept key, silence, duplicates, a dropped connection mid-publish).

Uses the shared ``node`` / ``node_factory`` fixtures of tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest

from fastim import _core, protocol
from fastim.client import Backoff, Client, HandshakeError, Message, connect
from fastim.client.connection import parse_url, ws_accept
from fastim.errors import ConnectionClosed, ProtocolError, RequestError
from fastim.node import Node
from fastim.protocol import CloseCode, ErrorCode, FrameType

T = TypeVar("T")
NodeFactory = Callable[..., Awaitable[Node]]


async def fast_connect(url: str, **kwargs: Any) -> Client:
    """connect() with quick reconnects (a fresh Backoff each time: it is stateful)."""
    kwargs.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.2))
    kwargs.setdefault("connect_timeout", 2.0)
    return await connect(url, **kwargs)


async def within(aw: Awaitable[T], seconds: float = 5.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def eventually(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def tcp_url(node: Node) -> str:
    return f"tcp://127.0.0.1:{node.tcp_port}"


def ws_url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.ws_port}/ws"


URLS = {"tcp": tcp_url, "ws": ws_url}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- real node


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_subscribe_publish_round_trip(node: Node, transport: str) -> None:
    async with await connect(URLS[transport](node)) as client:
        assert client.connected
        assert client.server_info["node"] == "test-node"
        sub = await within(client.subscribe("news"))
        assert sub.channel == "news" and sub.offset == 0
        off = await within(client.publish("news", {"title": "hello", "n": [1, 2.5, None]}))
        msg = await within(sub.get())
        assert isinstance(msg, Message)
        assert msg == Message("news", off, {"title": "hello", "n": [1, 2.5, None]})
        assert sub.offset == off
    assert not client.connected and client.closed


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_publish_returns_increasing_offsets(node: Node, transport: str) -> None:
    async with await connect(URLS[transport](node)) as client:
        offsets = [await within(client.publish("counter", i)) for i in range(20)]
        assert offsets == list(range(1, 21))
        sub = await within(client.subscribe("counter"))
        assert sub.offset == 20  # SUBSCRIBED carries the channel's current offset
        assert await within(client.publish("counter", "x")) == 21
        assert (await within(sub.get())).offset == 21


async def test_two_clients_tcp_and_ws(node: Node) -> None:
    async with await connect(tcp_url(node)) as a, await connect(ws_url(node)) as b:
        sub_a = await within(a.subscribe("room"))
        sub_b = await within(b.subscribe("room"))
        o1 = await within(a.publish("room", {"from": "a"}))
        o2 = await within(b.publish("room", {"from": "b"}))
        assert o2 == o1 + 1
        for sub in (sub_a, sub_b):
            got = [await within(sub.get()), await within(sub.get())]
            assert [(m.offset, m.data) for m in got] == [(o1, {"from": "a"}), (o2, {"from": "b"})]


async def test_many_messages_in_order(node: Node) -> None:
    async with await connect(ws_url(node)) as pub, await connect(tcp_url(node)) as subc:
        sub = await within(subc.subscribe("bulk"))
        n = 300
        await within(
            asyncio.gather(*(pub.publish("bulk", {"i": i, "pad": "x" * i}) for i in range(n)))
        )
        got = [await within(sub.get()) for _ in range(n)]
        assert [m.offset for m in got] == list(range(1, n + 1))
        assert sorted(m.data["i"] for m in got) == list(range(n))


async def test_error_reply_raises_request_error(node_factory: NodeFactory) -> None:
    node = await node_factory(max_subscriptions=1)
    async with await connect(tcp_url(node)) as client:
        await within(client.subscribe("one"))
        with pytest.raises(RequestError) as err:
            await within(client.subscribe("two"))
        assert err.value.code == ErrorCode.LIMIT_EXCEEDED
        assert "two" not in client.subscriptions
        # a non-fatal error: the connection is still good
        assert client.connected
        assert await within(client.publish("one", 1)) == 1


async def test_already_subscribed_is_refused_locally(node: Node) -> None:
    async with await connect(tcp_url(node)) as client:
        sub = await within(client.subscribe("dup"))
        with pytest.raises(RequestError) as err:
            await within(client.subscribe("dup"))
        assert err.value.code == ErrorCode.ALREADY_SUBSCRIBED
        assert sub.active and client.subscriptions == {"dup": sub}


async def test_invalid_channel_names_are_refused_before_sending(node: Node) -> None:
    async with await connect(tcp_url(node)) as client:
        for bad in ["", "a" * 256, "tab\there", "é" * 128]:
            with pytest.raises(ValueError):
                await client.subscribe(bad)
            with pytest.raises(ValueError):
                await client.publish(bad, 1)
        with pytest.raises(TypeError):
            await client.subscribe(b"bytes")  # type: ignore[arg-type]
        # nothing reached the server (a bad name there is fatal to the connection)
        assert client.connected and node.protocol_errors == 0
        assert await within(client.publish("ok", 1)) == 1


async def test_publish_limits_checked_locally(node: Node) -> None:
    async with await connect(tcp_url(node)) as client:
        with pytest.raises(TypeError):
            await client.publish("ch", {1, 2})  # a set is not JSON
        with pytest.raises(ValueError, match="max_frame"):
            await client.publish("ch", "x" * (1 << 20))
        assert client.connected and node.protocol_errors == 0


async def test_unsubscribe_ends_iteration(node: Node) -> None:
    async with await connect(tcp_url(node)) as client:
        sub = await within(client.subscribe("u"))
        await within(client.publish("u", 1))
        await eventually(lambda: sub.qsize() == 1)
        await within(sub.unsubscribe())
        assert not sub.active and "u" not in client.subscriptions
        # what was queued is still delivered, then the iterator stops
        assert [m.data async for m in sub] == [1]
        await within(sub.unsubscribe())  # idempotent
        # the server forgot it: later messages do not come, resubscribing works
        assert node.hub.channels.get("u") is None or len(node.hub.channels["u"].subs) == 0
        sub2 = await within(client.subscribe("u"))
        await within(client.publish("u", 2))
        assert (await within(sub2.get())).data == 2


async def test_aclose_ends_iterators_and_refuses_requests(node: Node) -> None:
    client = await connect(ws_url(node))
    sub = await within(client.subscribe("c"))

    async def drain() -> list[Any]:
        return [m.data async for m in sub]

    reader = asyncio.ensure_future(drain())
    await within(client.publish("c", "last"))
    await eventually(lambda: sub.offset == 1)
    await within(client.aclose())
    assert await within(reader) == ["last"]
    assert client.closed and not client.connected
    with pytest.raises(ConnectionClosed):
        await client.publish("c", 1)
    with pytest.raises(ConnectionClosed):
        await client.subscribe("d")
    await client.aclose()  # idempotent
    await eventually(lambda: not node.sessions)


async def test_bounded_queue_drops_oldest(node: Node) -> None:
    async with await connect(tcp_url(node)) as client:
        sub = await within(client.subscribe("q", max_queue=2))
        for i in range(5):
            await within(client.publish("q", i))
        # the server sends our own MSG before the PUBACK: all five have arrived
        assert sub.offset == 5
        assert sub.qsize() == 2 and sub.dropped == 3
        assert [(await sub.get()).data for _ in range(2)] == [3, 4]


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_reconnect_after_node_restart(node_factory: NodeFactory, transport: str) -> None:
    node1 = await node_factory()
    client = await fast_connect(URLS[transport](node1))
    try:
        sub = await within(client.subscribe("news"))
        for i in range(3):
            await within(client.publish("news", i))
        assert [(await within(sub.get())).offset for _ in range(3)] == [1, 2, 3]

        await within(node1.stop())  # GOAWAY 1001 / close 1001: "reconnect"
        await eventually(lambda: not client.connected)
        node2 = await node_factory(tcp_port=node1.tcp_port, ws_port=node1.ws_port)
        await eventually(lambda: client.connected)
        assert client.reconnects == 1
        assert sub.active and client.subscriptions == {"news": sub}

        # the new node's history starts over: offsets 1.. must not be taken for duplicates
        async with await connect(tcp_url(node2)) as other:
            off = await within(other.publish("news", {"after": "restart"}))
        assert off == 1
        msg = await within(sub.get())
        assert msg == Message("news", 1, {"after": "restart"})
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_heartbeat_keeps_an_idle_connection_alive(
    node_factory: NodeFactory, transport: str
) -> None:
    node = await node_factory(ping_interval=0.2, pong_timeout=0.2)
    async with await fast_connect(URLS[transport](node)) as client:
        assert client.server_info["ping_interval"] == 0.2
        await asyncio.sleep(1.2)  # six intervals with nothing to say
        assert client.connected and client.reconnects == 0
        assert node.heartbeat_timeouts == 0
        assert await within(client.publish("hb", 1)) == 1


async def test_requests_wait_for_the_reconnect(node_factory: NodeFactory) -> None:
    node1 = await node_factory()
    client = await fast_connect(tcp_url(node1))
    try:
        await within(node1.stop())
        await eventually(lambda: not client.connected)
        publish = asyncio.ensure_future(client.publish("later", "queued"))
        await asyncio.sleep(0.1)
        assert not publish.done()  # waiting for a connection, not failed
        await node_factory(tcp_port=node1.tcp_port, ws_port=node1.ws_port)
        assert await within(publish) == 1
    finally:
        await client.aclose()


async def test_no_reconnect_gives_up(node_factory: NodeFactory) -> None:
    node = await node_factory()
    client = await connect(ws_url(node), reconnect=False)
    sub = await within(client.subscribe("x"))
    await within(node.stop())
    with pytest.raises(ConnectionClosed) as err:
        async for _ in sub:
            pass
    assert err.value.code == CloseCode.GOING_AWAY and err.value.temporary
    assert client.closed and not client.connected
    with pytest.raises(ConnectionClosed):
        await client.publish("x", 1)
    await client.aclose()


async def test_fallback_url(node: Node) -> None:
    dead = f"tcp://127.0.0.1:{closed_port()}"
    async with await connect(dead, urls=[ws_url(node)]) as client:
        assert client.url == ws_url(node)
        assert await within(client.publish("f", 1)) == 1


async def test_connect_failures() -> None:
    with pytest.raises(OSError):
        await connect(f"tcp://127.0.0.1:{closed_port()}")
    with pytest.raises(ValueError):
        await connect("http://127.0.0.1:1/")
    with pytest.raises(ValueError):
        await connect("tcp://127.0.0.1")  # no port


async def test_ws_upgrade_refused_on_wrong_path(node: Node) -> None:
    with pytest.raises(HandshakeError, match="404"):
        await connect(f"ws://127.0.0.1:{node.ws_port}/nope")


def test_parse_url() -> None:
    ep = parse_url("ws://[::1]:8080/ws?x=1")
    assert (ep.scheme, ep.host, ep.port, ep.path) == ("ws", "::1", 8080, "/ws?x=1")
    assert ep.host_header == "[::1]:8080"
    assert parse_url("ws://example.com").host_header == "example.com"
    assert parse_url("wss://example.com").port == 443
    assert parse_url("tcp://h:1").path == "/"
    assert parse_url("ws://h:1", default_path="/ws").path == "/ws"
    assert parse_url("ws://h:1/x", default_path="/ws").path == "/x"
    assert parse_url("tcp://h:1", default_path="/ws").path == "/"


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(base=0.1, factor=2.0, max=1.0, jitter="none")
    assert [round(b.next(), 6) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert b.attempts == 7
    b.reset()
    assert b.attempts == 0 and b.next() == pytest.approx(0.1)


def test_backoff_full_jitter_within_bounds() -> None:
    b = Backoff(base=0.1, factor=2.0, max=10.0, rng=random.Random(1))
    for _round in range(200):
        b.reset()
        for n in range(12):
            ceiling = min(10.0, 0.1 * 2.0**n)
            assert b.ceiling() == pytest.approx(ceiling)
            d = b.next()
            assert 0.0 <= d <= ceiling
    # jitter actually spreads the delays, and late attempts reach far up the window
    b.reset()
    draws = [Backoff(rng=random.Random(s)).next() for s in range(100)]
    assert len(set(draws)) == 100 and min(draws) < 0.02 and max(draws) > 0.08
    late = Backoff(base=0.1, max=10.0, rng=random.Random(7))
    delays = [late.next() for _ in range(60)]
    assert max(delays[20:]) > 5.0 and all(d <= 10.0 for d in delays)


def test_backoff_equal_jitter_and_determinism() -> None:
    b = Backoff(base=1.0, factor=3.0, max=20.0, jitter="equal", rng=random.Random(3))
    for n in range(10):
        ceiling = min(20.0, 3.0**n)
        assert ceiling / 2 <= b.next() <= ceiling
    seq1 = [Backoff(rng=random.Random(42)).next() for _ in range(5)]
    seq2 = [Backoff(rng=random.Random(42)).next() for _ in range(5)]
    assert seq1 == seq2


def test_backoff_huge_attempt_counts_do_not_overflow() -> None:
    b = Backoff(base=0.1, factor=10.0, max=30.0, jitter="none")
    for _ in range(5000):
        d = b.next()
    assert d == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0}, {"factor": 0.5}, {"base": 2.0, "max": 1.0}, {"jitter": "half"}],
)
def test_backoff_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# --------------------------------------------------------------------------- scripted servers

CLIENT_MASK = protocol.type_mask(protocol.CLIENT_FRAME_TYPES)


class Peer:
    """The server side of one connection to a scripted server (fastim over TCP)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = _core.FrameDecoder(allowed_types=CLIENT_MASK)
        self.frames: deque[tuple[int, bytes]] = deque()
        self.seen: list[tuple[int, bytes]] = []

    async def recv(self) -> tuple[int, bytes]:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.frames.extend(self.decoder.feed(data))
        frame = self.frames.popleft()
        self.seen.append(frame)
        return frame

    async def expect(self, ftype: int) -> bytes:
        """The payload of the next frame of type ``ftype`` (others skipped, kept in seen)."""
        while True:
            t, payload = await self.recv()
            if t == ftype:
                return payload

    def send(self, ftype: int, payload: bytes) -> None:
        self.writer.write(_core.encode_frame(ftype, payload))

    async def handshake(self, ping_interval: float = 25.0, pong_timeout: float = 10.0) -> None:
        hello = await self.expect(FrameType.HELLO)
        assert hello[:2] == b"\x01\x01"
        assert orjson.loads(hello[2:]) == {"client": "fastim-py/0.1"}
        info = {
            "node": "fake",
            "ping_interval": ping_interval,
            "pong_timeout": pong_timeout,
            "max_frame": 1 << 20,
        }
        self.send(FrameType.WELCOME, b"\x01" + orjson.dumps(info))

    async def accept_sub(self, offset: int) -> str:
        req_id, ch, _ = protocol.unpack_request(FrameType.SUB, await self.expect(FrameType.SUB))[1:]
        assert isinstance(req_id, int)
        self.send(FrameType.SUBSCRIBED, protocol.pack_subscribed(req_id, offset, ch.encode()))
        return ch

    def msg(self, offset: int, ch: str, data: Any) -> None:
        self.send(FrameType.MSG, protocol.pack_msg(offset, ch.encode(), orjson.dumps(data)))


Script = Callable[[Peer, int], Awaitable[None]]


class ScriptedServer:
    """A loopback TCP server that runs ``script(peer, n)`` for its n-th connection (1-based)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.peers: list[Peer] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = Peer(reader, writer)
        self.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(peer, self.connections)
        except (EOFError, ConnectionError):
            pass
        except AssertionError as e:
            self.errors.append(e)
        finally:
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for peer in self.peers:  # the handlers end on their own (EOF), no cancel needed
            peer.writer.transport.abort()
        _done, stuck = await asyncio.wait(self.tasks, timeout=2.0) if self.tasks else (set(), set())
        for t in stuck:
            t.cancel()
        assert not self.errors, self.errors


async def hold(peer: Peer) -> None:
    """Keep reading (and ignoring) until the client goes."""
    while True:
        await peer.recv()


async def test_duplicates_are_dropped_across_reconnect() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        if n == 1:
            ch = await peer.accept_sub(0)
            for off in (1, 2, 2, 1, 3):  # duplicates inside one connection too
                peer.msg(off, ch, {"off": off})
            await peer.writer.drain()
            return  # EOF: the client reconnects
        # second connection: the client subscribes again; a replay overlaps what it saw
        ch = await peer.accept_sub(3)
        for off in (2, 3, 4, 5):
            peer.msg(off, ch, {"off": off})
        await hold(peer)

    async with ScriptedServer(script) as srv, await fast_connect(srv.url) as client:
        sub = await within(client.subscribe("d"))
        got = [await within(sub.get()) for _ in range(5)]
        assert [m.offset for m in got] == [1, 2, 3, 4, 5]
        assert [m.data["off"] for m in got] == [1, 2, 3, 4, 5]
        assert client.reconnects == 1 and srv.connections == 2
        assert sub.qsize() == 0


async def test_publish_in_flight_fails_and_is_not_resent() -> None:
    pubs: list[bytes] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        if n == 1:
            pubs.append(await peer.expect(FrameType.PUB))
            return  # drop the connection without a PUBACK
        await peer.accept_sub(0)  # the marker
        await hold(peer)

    async with ScriptedServer(script) as srv, await fast_connect(srv.url) as client:
        with pytest.raises(ConnectionClosed) as err:
            await within(client.publish("p", {"once": True}))
        assert err.value.temporary
        await eventually(lambda: client.connected and srv.connections == 2)
        # a request sent now, the marker: a resend would have come before it
        await within(client.subscribe("marker"))
        # the second connection got a HELLO and nothing else: no resend
        assert [t for t, _ in srv.peers[1].seen] == [FrameType.HELLO, FrameType.SUB]
        assert len(pubs) == 1


async def test_request_timeout() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await hold(peer)  # never answers

    async with (
        ScriptedServer(script) as srv,
        await connect(srv.url, request_timeout=0.2) as client,
    ):
        with pytest.raises(asyncio.TimeoutError):
            await client.subscribe("slow")
        assert client.connected and client.subscriptions == {}


async def test_heartbeat_silence_triggers_reconnect() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake(ping_interval=0.1, pong_timeout=0.1)
        await hold(peer)  # reads the client's PINGs, never answers anything

    async with ScriptedServer(script) as srv, await fast_connect(srv.url) as client:
        # 0.2 s of silence: the client drops the connection and connects again
        await eventually(lambda: client.reconnects >= 1 and srv.connections >= 2, 3.0)
        pings = [p for t, p in srv.peers[0].seen if t == FrameType.PING]
        assert pings and all(len(p) <= 64 for p in pings)


async def test_server_ping_is_answered_and_goaway_4500_is_final() -> None:
    got: list[bytes] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        peer.send(FrameType.PING, b"are you there")
        got.append(await peer.expect(FrameType.PONG))
        peer.send(FrameType.GOAWAY, protocol.pack_goaway(CloseCode.BAD_REQUEST, "go away"))
        await hold(peer)

    async with ScriptedServer(script) as srv:
        client = await fast_connect(srv.url)
        sub_task = asyncio.ensure_future(client.subscribe("s"))
        with pytest.raises(ConnectionClosed) as err:
            await within(sub_task)
        assert err.value.code == CloseCode.BAD_REQUEST and not err.value.temporary
        assert got == [b"are you there"]
        await eventually(lambda: client.closed)
        await asyncio.sleep(0.2)
        assert srv.connections == 1  # a 4500 close is not retried
        await client.aclose()


async def test_cancelling_the_client_tasks_while_reconnecting_stops_them() -> None:
    # What asyncio.run() does at exit: cancel every task once, then wait for them. Here
    # the client's tasks are cancelled (with any helper task it runs, as asyncio.wait_for
    # does) while it retries a refused port. Python 3.11's wait_for dropped such a cancel
    # when the connect attempt failed in the same tick, and the reader retried forever.
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await hold(peer)

    for _ in range(30):
        async with ScriptedServer(script) as srv:
            client = await fast_connect(srv.url, backoff=Backoff(base=0.0005, max=0.001))
        # the server is gone: every reconnect attempt is refused at once
        await eventually(lambda c=client: not c.connected)  # type: ignore[misc]
        await asyncio.sleep(random.random() * 0.02)
        tasks = [
            t
            for t in asyncio.all_tasks()
            if "Client." in getattr(t.get_coro(), "__qualname__", "") and not t.done()
        ]
        assert tasks
        for t in tasks:
            t.cancel()
        _, pending = await asyncio.wait(tasks, timeout=2.0)
        if pending:  # stop the runaway reader before failing, or the teardown would hang
            client._closing = True
            await asyncio.wait(pending, timeout=2.0)
        assert not pending, f"tasks ignored a cancel: {pending}"
        await client.aclose()


async def test_version_refused_during_handshake() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.expect(FrameType.HELLO)
        peer.send(FrameType.ERROR, protocol.pack_error(0, ErrorCode.UNSUPPORTED_VERSION, "no"))
        peer.send(FrameType.GOAWAY, protocol.pack_goaway(CloseCode.POLICY_VIOLATION, "no"))

    async with ScriptedServer(script) as srv:
        with pytest.raises(ProtocolError) as err:
            await connect(srv.url)
        assert err.value.code == ErrorCode.UNSUPPORTED_VERSION


# --------------------------------------------------------------------------- scripted WebSocket


async def read_http_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0].startswith("GET /ws HTTP/1.1")
    return {
        k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
    }


@pytest.fixture
async def ws_server() -> AsyncIterator[Callable[[Callable[..., Awaitable[None]]], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Callable[..., Awaitable[None]]) -> str:
        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(srv)
        return f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/ws"

    yield start
    for s in servers:
        s.close()


async def test_ws_handshake_rejects_bad_accept(ws_server: Any) -> None:
    requests: list[dict[str, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await read_http_head(reader)
        requests.append(headers)
        wrong = ws_accept(base64.b64encode(b"0123456789abcdef").decode())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + wrong.encode() + b"\r\n\r\n"
        )
        await writer.drain()
        await reader.read()
        writer.close()

    url = await ws_server(handler)
    with pytest.raises(HandshakeError, match="Sec-WebSocket-Accept"):
        await connect(url)
    (h,) = requests
    assert h["upgrade"].lower() == "websocket" and h["connection"].lower() == "upgrade"
    assert h["sec-websocket-version"] == "13"
    assert h["sec-websocket-protocol"] == "fastim.binary"
    assert len(base64.b64decode(h["sec-websocket-key"])) == 16


async def test_ws_oversized_response_head(ws_server: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_head(reader)
        writer.write(b"HTTP/1.1 101 OK\r\n" + b"X-Filler: " + b"a" * 40000)
        await writer.drain()
        await reader.read()
        writer.close()

    url = await ws_server(handler)
    with pytest.raises(HandshakeError, match="exceeds"):
        await connect(url)


async def test_ws_ping_pong_masking_and_close(ws_server: Any) -> None:
    events: list[tuple[int, bytes]] = []
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await read_http_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Protocol: fastim.binary\r\n"
            b"Sec-WebSocket-Accept: "
            + ws_accept(headers["sec-websocket-key"]).encode()
            + b"\r\n\r\n"
        )
        parser = _core.WSParser()  # server side: raises on any unmasked client frame
        decoder = _core.FrameDecoder(allowed_types=CLIENT_MASK)
        pending: deque[tuple[int, bytes]] = deque()

        async def next_event() -> tuple[int, bytes]:
            while not pending:
                data = await reader.read(65536)
                assert data, "client went away"
                pending.extend(parser.feed(data))
            ev = pending.popleft()
            events.append(ev)
            return ev

        op, payload = await next_event()
        assert op == _core.OP_BINARY
        ((ftype, _),) = decoder.feed(payload)
        assert ftype == FrameType.HELLO
        welcome = b"\x01" + orjson.dumps({"node": "fake-ws", "ping_interval": 25.0})
        writer.write(
            _core.ws_encode(_core.OP_BINARY, _core.encode_frame(FrameType.WELCOME, welcome))
        )
        writer.write(_core.ws_encode(_core.OP_PING, b"hb-1"))
        op, payload = await next_event()
        assert (op, payload) == (_core.OP_PONG, b"hb-1")
        writer.write(_core.ws_encode(_core.OP_CLOSE, _core.ws_close_payload(4500, "bad")))
        op, payload = await next_event()
        assert op == _core.OP_CLOSE and _core.ws_parse_close(payload)[0] == 4500
        done.set()
        writer.close()

    url = await ws_server(handler)
    client = await fast_connect(url)
    assert client.server_info["node"] == "fake-ws"
    await within(done.wait())
    await eventually(lambda: client.closed)
    with pytest.raises(ConnectionClosed) as err:
        await client.publish("x", 1)
    assert err.value.code == 4500
    await client.aclose()
    assert [op for op, _ in events] == [_core.OP_BINARY, _core.OP_PONG, _core.OP_CLOSE]


async def test_client_is_usable_as_plain_object(node: Node) -> None:
    client = Client([tcp_url(node)])
    assert not client.connected and not client.closed
    with pytest.raises(ValueError):
        Client([])
    await client.aclose()
    assert client.closed
