"""The SDK with several node addresses: failover between real node processes.

Two or three standalone ``fastim serve`` processes share one real redis-server (the
``redis`` store), so channel offsets, epochs, history and inboxes are the same whichever
node a client is on: a client that moves to another node recovers there with ``since``
(channels) and the inbox replay (direct messages), as it would on a cluster. Standalone
nodes do not deliver live to a client connected to another node; the tests are about
what the client does when its node goes away:

* kill -9 of the node a subscriber is on, while a publisher publishes (acked) through
  another: the subscriber moves to the next address of its list and the application
  sees every acked message exactly once, in order;
* the same for direct messages: the recipient moves and the inbox replay brings what
  was sent through the other node, each seq once, in order;
* a graceful stop (close 1001): the clients move to the next node without sleeping
  their backoff (a 60 s backoff would make the test time out);
* every node down: the client keeps trying the whole list, and a node that refused is
  tried again later (it comes back on the same port);
* RATE_LIMITED (116) surfaces as :class:`RateLimited`.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from cluster._nodes import ClusterNode, Nodes  # type: ignore[import-not-found]
from faults._markers import channel_marker, dm_marker  # type: ignore[import-not-found]
from faults._node import NodeProc, free_port  # type: ignore[import-not-found]
from store._redis import RedisServer  # type: ignore[import-not-found]

from fastim import _core, protocol
from fastim.client import (
    Backoff,
    Client,
    DirectMessage,
    Message,
    RateLimited,
    Subscription,
    connect,
)
from fastim.cluster.placement import owner
from fastim.errors import ConnectionClosed, RequestError
from fastim.node import Node
from fastim.protocol import ErrorCode, FrameType

T = TypeVar("T")
uvloop_only = pytest.mark.asyncio(loop_factories=["uvloop"])


class CountingBackoff(Backoff):
    """A Backoff that counts the delays the client drew (a going-away close must draw none)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drawn = 0

    def next(self) -> float:
        self.drawn += 1
        return super().next()


async def within(aw: Awaitable[T], seconds: float = 20.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def eventually(
    cond: Callable[[], bool], what: Callable[[], str], seconds: float = 20.0
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not within {seconds}s: {what()}")
        await asyncio.sleep(0.01)


async def client(urls: list[str], **kwargs: Any) -> Client:
    kwargs.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("request_timeout", 10.0)
    return await connect(urls, **kwargs)


def collect(sub: Subscription) -> tuple[list[Message], asyncio.Task[None]]:
    got: list[Message] = []

    async def read() -> None:
        async for m in sub:
            got.append(m)

    return got, asyncio.ensure_future(read())


async def sigterm(node: NodeProc) -> None:
    """A graceful stop (the node closes its clients with 1001), waited for without blocking."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while node.proc.poll() is None:
        if loop.time() > end:
            raise AssertionError(f"node did not stop within 15s: {node.log()}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-node-list")))
    server.start()
    yield server
    server.kill()


Standalone = Callable[[int], Awaitable[list[NodeProc]]]


@pytest.fixture
async def standalone(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Standalone]:
    """``await standalone(n)``: n node processes on one redis-server and a fresh prefix of
    this test's (offsets, epochs, inboxes shared), started concurrently; stopped at the end."""
    made: list[NodeProc] = []
    prefix = f"nl{uuid.uuid4().hex[:8]}"

    async def start(n: int) -> list[NodeProc]:
        nodes = []
        for i in range(n):
            d = tmp_path / f"n{i + 1}"
            d.mkdir()
            node = NodeProc(
                d, free_port(), free_port(),
                "--node-id", f"n{i + 1}",
                "--store", "redis", "--redis-url", redis_server.url, "--redis-prefix", prefix,
                "--history-size", "5000",
                "--publish-rate", "0",
            )  # fmt: skip
            made.append(node)
            nodes.append(node)
        await asyncio.gather(*(node.astart() for node in nodes))
        return nodes

    yield start
    for node in made:
        node.stop()


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Nodes]:
    """Three nodes of one cluster (a real etcd, one redis-server), joined, links up."""
    nodes = Nodes(tmp_path, 3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


def roles(nodes: Nodes, channel: str) -> tuple[ClusterNode, ClusterNode, ClusterNode]:
    """(the channel's owner, two other nodes)."""
    own = owner(channel, [n.node_id for n in nodes.nodes])
    o = next(n for n in nodes.nodes if n.node_id == own)
    a, b = (n for n in nodes.nodes if n.node_id != own)
    return o, a, b


async def test_order_and_rotation() -> None:
    """The try order, and the order of a reconnect round after losing one address."""
    one = Client("tcp://127.0.0.1:1")
    assert one.urls == one.order == ["tcp://127.0.0.1:1"]
    assert one._next_urls("tcp://127.0.0.1:1") == ["tcp://127.0.0.1:1"]
    urls = [f"tcp://127.0.0.1:{p}" for p in (1, 2, 3, 4)]
    c = Client(urls)
    assert c.order == urls and c.url == urls[0]
    assert c._next_urls(urls[1]) == [urls[2], urls[3], urls[0], urls[1]]  # the lost one last
    assert c._next_urls(urls[3]) == urls
    orders = {tuple(Client(urls, shuffle=True).order) for _ in range(50)}
    assert all(sorted(o) == sorted(urls) for o in orders)
    assert len(orders) > 1  # 50 draws of 24 permutations all equal: p = 24**-49
    for x in (one, c):
        await x.aclose()


@uvloop_only
async def test_kill9_subscriber_moves_to_the_next_node(standalone: Standalone) -> None:
    """Killed under a subscriber: it moves to the next address and recovers from its offset
    (every acked message once, in order, no gap)."""
    n1, n2, n3 = await standalone(3)
    backoff = CountingBackoff(base=0.02, factor=2.0, max=0.25)
    sub_client = await client([n1.tcp_url, n2.tcp_url, n3.tcp_url], backoff=backoff)
    pub1 = await client([n1.tcp_url], reconnect=False)
    pub2 = await client([n2.tcp_url], reconnect=False)
    try:
        assert sub_client.url == n1.tcp_url
        sub = await within(sub_client.subscribe("news"))
        got, reader = collect(sub)
        acked: list[tuple[int, int]] = []
        for i in range(20):  # through n1: live to the subscriber
            acked.append((await within(pub1.publish("news", i)), i))
        await eventually(lambda: len(got) == 20, lambda: f"live on n1: {len(got)} of 20")
        kill: asyncio.Task[None] | None = None
        for i in range(20, 250):  # through n2, while n1 dies under the subscriber
            acked.append((await within(pub2.publish("news", i)), i))
            if i == 80:
                kill = asyncio.ensure_future(n1.akill())
        assert kill is not None
        await within(kill)
        await eventually(
            lambda: len(got) >= len(acked),
            lambda: f"{len(got)} of {len(acked)}; client on {sub_client.url}",
        )
        await channel_marker(pub2, "news", got)  # a duplicate would arrive before it
        assert [(m.offset, m.data) for m in got] == acked
        assert sub.gaps == 0
        assert sub_client.url == n2.tcp_url  # the address after the lost one,
        assert sub_client.reconnects == 1
        assert backoff.drawn == 1  # at the first attempt (the lost one is tried last)
        reader.cancel()
    finally:
        for c in (sub_client, pub1, pub2):
            await c.aclose()


@uvloop_only
async def test_kill9_inbox_replayed_on_the_next_node(standalone: Standalone) -> None:
    """Direct messages sent through another node while the recipient's node dies: the
    replay on the node it moves to brings each seq once, in order."""
    n1, n2 = await standalone(2)
    bob = await client([n1.tcp_url, n2.tcp_url], user="bob")
    alice1 = await client([n1.tcp_url], user="alice", reconnect=False)
    alice2 = await client([n2.tcp_url], user="alice", reconnect=False)
    dms: list[DirectMessage] = []

    async def read() -> None:
        async for dm in bob.direct_messages():
            dms.append(dm)

    reader = asyncio.ensure_future(read())
    try:
        seqs = []
        for i in range(10):  # through n1, live
            seqs.append((await within(alice1.send("bob", {"i": i}))).seq)
        await eventually(lambda: len(dms) == 10, lambda: f"live on n1: {len(dms)} of 10")
        kill: asyncio.Task[None] | None = None
        for i in range(10, 60):  # through n2: into bob's inbox, while n1 dies under bob
            seqs.append((await within(alice2.send("bob", {"i": i}))).seq)
            if i == 30:
                kill = asyncio.ensure_future(n1.akill())
        assert kill is not None
        await within(kill)
        await eventually(lambda: len(dms) >= 60, lambda: f"{len(dms)} of 60; bob on {bob.url}")
        await dm_marker(alice2, "bob", dms)  # a duplicate would arrive before it
        assert [d.data["i"] for d in dms] == list(range(60))
        assert [d.seq for d in dms] == seqs == sorted(set(seqs))
        assert bob.url == n2.tcp_url and bob.reconnects == 1
        reader.cancel()
    finally:
        for c in (bob, alice1, alice2):
            await c.aclose()


@uvloop_only
async def test_graceful_stop_moves_on_at_once(standalone: Standalone) -> None:
    """A node shutting down closes its clients with 1001: they go to the next node without
    a backoff sleep (theirs is 60 s: a sleep would time the test out), the subscriber
    recovers, and every acked message arrives once, in order."""
    n1, n2 = await standalone(2)
    slow = {"base": 60.0, "factor": 1.0, "max": 60.0, "jitter": "none"}
    sub_backoff, pub_backoff = CountingBackoff(**slow), CountingBackoff(**slow)
    sub_client = await client([n1.tcp_url, n2.tcp_url], backoff=sub_backoff)
    pub = await client([n1.tcp_url, n2.tcp_url], backoff=pub_backoff, request_timeout=5.0)
    try:
        sub = await within(sub_client.subscribe("room"))
        got, reader = collect(sub)
        acked: list[tuple[int, int]] = []
        attempted = 0
        stop: asyncio.Task[None] | None = None
        for i in range(300):
            attempted += 1
            try:
                acked.append((await within(pub.publish("room", i)), i))
            except (ConnectionClosed, RequestError):
                pass  # in flight at the stop: not acknowledged (may or may not be stored)
            if i == 100:
                stop = asyncio.ensure_future(sigterm(n1))
        assert stop is not None
        await within(stop)
        await eventually(
            lambda: {m.offset for m in got} >= {o for o, _ in acked},
            lambda: f"{len(got)} delivered, {len(acked)} acked; sub on {sub_client.url}",
        )
        await channel_marker(pub, "room", got)  # a duplicate would arrive before it
        offsets = [m.offset for m in got]
        assert offsets == sorted(set(offsets)), "a message twice or out of order"
        assert all(0 <= m.data < attempted for m in got)
        delivered = {m.offset: m.data for m in got}
        assert all(delivered[o] == i for o, i in acked)
        assert len(acked) >= 290  # at most a few were in flight at the stop
        assert sub.gaps == 0
        assert sub_client.url == pub.url == n2.tcp_url
        assert sub_client.reconnects == pub.reconnects == 1
        assert sub_backoff.drawn == pub_backoff.drawn == 0, "slept before moving on"
        reader.cancel()
    finally:
        for c in (sub_client, pub):
            await c.aclose()


@uvloop_only
async def test_every_node_down_then_one_back(standalone: Standalone) -> None:
    """With every node down the client keeps going round its list; a node that refused it
    is tried again later, and when one comes back the client recovers there."""
    n1, n2 = await standalone(2)
    sub_client = await client([n1.tcp_url, n2.tcp_url])
    try:
        sub = await within(sub_client.subscribe("c"))
        got, reader = collect(sub)
        pub = await client([n1.tcp_url], reconnect=False)
        acked = [(await within(pub.publish("c", i)), i) for i in range(5)]
        await pub.aclose()
        await eventually(lambda: len(got) == 5, lambda: f"live: {len(got)} of 5")
        await n2.akill()
        await n1.akill()
        attempts = sub_client.backoff
        await eventually(lambda: attempts.attempts >= 4, lambda: f"{attempts!r}")  # 2 rounds
        assert not sub_client.connected
        await n2.astart()  # same port: refused twice already, tried again
        await eventually(lambda: sub_client.connected, lambda: f"on {sub_client.url}")
        assert sub_client.url == n2.tcp_url
        pub = await client([n2.tcp_url], reconnect=False)
        acked += [(await within(pub.publish("c", i)), i) for i in range(5, 10)]
        await pub.aclose()
        await eventually(lambda: len(got) == 10, lambda: f"{len(got)} of 10")
        assert [(m.offset, m.data) for m in got] == acked
        reader.cancel()
    finally:
        await sub_client.aclose()


@uvloop_only
async def test_cluster_kill9_subscriber_node(cluster3: Nodes) -> None:
    """A cluster: the subscriber's node (not the owner) is killed while a publisher
    publishes through a third node; the subscriber, which was getting the messages live
    across nodes, moves to the next address and recovers: every acked message once, in
    order, nothing twice."""
    o, a, b = roles(cluster3, "feed")
    sub_client = await client([a.tcp_url, b.tcp_url, o.tcp_url])
    pub = await client([b.tcp_url], reconnect=False)
    try:
        sub = await within(sub_client.subscribe("feed"))
        got, reader = collect(sub)
        acked: list[tuple[int, int]] = []
        for i in range(300):
            try:
                acked.append((await within(pub.publish("feed", i)), i))
            except RequestError as e:
                # NOT_ROUTED: not acknowledged (it may or may not have been published);
                # seen in a node's first timer tick after it started
                assert e.code == ErrorCode.NOT_ROUTED, e
            if i == 30:  # b -> owner -> a: live across nodes before the kill
                await eventually(lambda: len(got) >= len(acked), lambda: f"live: {len(got)}")
            if i == 100:
                a.kill()
        assert len(acked) >= 250, f"{len(acked)} of 300 acked"
        await eventually(
            lambda: {m.offset for m in got} >= {off for off, _ in acked},
            lambda: f"{len(got)} delivered, {len(acked)} acked; client on {sub_client.url}",
        )
        await channel_marker(pub, "feed", got)  # a duplicate would arrive before it
        offsets = [m.offset for m in got]
        assert offsets == sorted(set(offsets)), "a message twice or out of order"
        delivered = {m.offset: m.data for m in got}
        assert all(delivered[off] == v for off, v in acked)
        assert all(0 <= m.data < 300 for m in got)
        assert sub.gaps == 0
        assert sub_client.url == b.tcp_url and sub_client.reconnects == 1
        reader.cancel()
    finally:
        for c in (sub_client, pub):
            await c.aclose()


@uvloop_only
async def test_cluster_owner_killed(cluster3: Nodes) -> None:
    """A cluster: the channel's owner is killed under a stream published through another
    node. Publishes fail (NOT_ROUTED, timeouts) until the cluster reroutes, then go on
    at the new owner from the store's offsets; the subscriber on the third node sees
    every acked message once, in order, and nothing twice."""
    o, a, b = roles(cluster3, "feed")
    sub_client = await client([a.tcp_url, b.tcp_url])
    pub = await client([b.tcp_url], reconnect=False, request_timeout=8.0)
    try:
        sub = await within(sub_client.subscribe("feed"))
        got, reader = collect(sub)
        acked: list[tuple[int, int]] = []
        refused = 0
        i = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 25
        while len(acked) < 250 and loop.time() < end:
            try:
                acked.append((await within(pub.publish("feed", i)), i))
            except (RequestError, asyncio.TimeoutError):
                refused += 1  # not acknowledged: may or may not have been stored
                await asyncio.sleep(0.05)
            i += 1
            if i == 100:
                o.kill()
        assert len(acked) >= 250, f"{len(acked)} acked in 25 s ({refused} refused)"
        await eventually(
            lambda: {m.offset for m in got} >= {off for off, _ in acked},
            lambda: f"{len(got)} delivered, {len(acked)} acked",
        )
        await channel_marker(pub, "feed", got)  # a duplicate would arrive before it
        offsets = [m.offset for m in got]
        assert offsets == sorted(set(offsets)), "a message twice or out of order"
        delivered = {m.offset: m.data for m in got}
        assert all(delivered[off] == v for off, v in acked)
        assert all(0 <= m.data < i for m in got)
        assert sub.gaps == 0
        assert sub_client.url == a.tcp_url and sub_client.reconnects == 0
        reader.cancel()
    finally:
        for c in (sub_client, pub):
            await c.aclose()


async def test_not_routed_resubscribe_is_retried() -> None:
    """After a failover, a node may answer the resubscribe NOT_ROUTED (119: it could not
    reach the channel's owner yet). The client keeps the subscription and asks again on
    the same connection; the messages then continue without a gap. (A scripted server:
    a real node does this only in a narrow window after an owner died.)"""
    decoder_mask = protocol.type_mask(protocol.CLIENT_FRAME_TYPES)
    subs_seen: list[dict[str, Any]] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        dec = _core.FrameDecoder(allowed_types=decoder_mask)
        frames: list[tuple[int, bytes]] = []

        async def recv(ftype: int) -> bytes:
            while True:
                while not frames:
                    data = await reader.read(65536)
                    if not data:
                        raise EOFError
                    frames.extend(dec.feed(data))
                t, payload = frames.pop(0)
                if t == ftype:
                    return payload

        def send(ftype: int, payload: bytes) -> None:
            writer.write(_core.encode_frame(ftype, payload))

        try:
            await recv(FrameType.HELLO)
            send(FrameType.WELCOME, b"\x01" + orjson.dumps({"node": f"fake{n}"}))
            if n == 1:
                req_id = int.from_bytes((await recv(FrameType.SUB))[:4], "big")
                send(FrameType.SUBSCRIBED, protocol.pack_subscribed(req_id, 0, b"c", "e1"))
                send(FrameType.MSG, protocol.pack_msg(1, b"c", b"1"))
                await asyncio.sleep(0.05)
                writer.transport.abort()  # the node dies
                return
            for attempt in range(2):
                cmd = orjson.loads(await recv(FrameType.CMD))
                subs_seen.append(cmd)
                if attempt == 0:
                    err = {"op": "error", "code": 119, "reason": "owner?", "id": cmd["id"]}
                    send(FrameType.EVENT, orjson.dumps(err))
                    continue
                ok = {"op": "subscribed", "ch": "c", "off": 1, "epoch": "e1", "recovered": True}
                send(FrameType.EVENT, orjson.dumps({**ok, "id": cmd["id"]}))
                send(FrameType.MSG, protocol.pack_msg(2, b"c", b"2"))
            while await reader.read(65536):
                pass
        except (EOFError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    c = await client([url])
    try:
        sub = await within(c.subscribe("c"), 5.0)
        got = [await within(sub.get(), 5.0), await within(sub.get(), 10.0)]
        assert [(m.offset, m.data) for m in got] == [(1, 1), (2, 2)]
        assert [x.get("since") for x in subs_seen] == [{"off": 1, "epoch": "e1"}] * 2
        assert sub.active and sub.gaps == 0 and c.reconnects == 1
    finally:
        await c.aclose()
        server.close()


async def test_rate_limited_is_a_distinct_error(
    node_factory: Callable[..., Awaitable[Node]],
) -> None:
    """Over the node's publish_rate: RateLimited (a RequestError with code 116)."""
    node = await node_factory(publish_rate=1.0, rate_limit_strikes=1000)
    c = await client([f"tcp://127.0.0.1:{node.tcp_port}"])
    try:
        with pytest.raises(RateLimited) as e:
            for i in range(10):  # burst 2, then refused
                await within(c.publish("r", i), 5.0)
        assert isinstance(e.value, RequestError) and e.value.code == ErrorCode.RATE_LIMITED
        assert c.connected  # a refusal, not a disconnect
    finally:
        await c.aclose()
