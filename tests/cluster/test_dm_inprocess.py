"""Direct messages across nodes, the nodes in this process: real etcd, redis, links and
client sockets, with the cluster pieces (membership, links, user routes, DmRouter) put
together by the test as a node's cluster runtime does. It checks the routing logic on
its own; tests/cluster/test_cluster_dm.py runs the same through ``fastim serve``
processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from faults._markers import dm_marker  # type: ignore[import-not-found]
from store._redis import RedisServer  # type: ignore[import-not-found]

from fastim.client import Backoff, Client, DirectMessage, connect
from fastim.cluster.dm import DmRouter
from fastim.cluster.frames import DmEntry
from fastim.cluster.link import LinkHandler, Links, LinkServer, link_peers
from fastim.cluster.membership import Membership
from fastim.cluster.users import UserRoutes
from fastim.node import Node

from ._etcd import EtcdServer


class _Handler(LinkHandler):
    def __init__(self) -> None:
        self.router: DmRouter | None = None

    def on_dm(self, peer: str, items: list[DmEntry]) -> None:
        if self.router is not None:
            self.router.on_dm(peer, items)

    def on_peer(self, peer: str, connected: bool) -> None:
        if self.router is not None:
            self.router.on_peer(peer, connected)


class CNode:
    """One node and its cluster pieces."""

    def __init__(self, node: Node, membership: Membership, links: Links, server: LinkServer,
                 router: DmRouter) -> None:  # fmt: skip
        self.node = node
        self.membership = membership
        self.links = links
        self.server = server
        self.router = router

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.node.tcp_port}"

    async def stop(self, crash: bool = False) -> None:
        await self.router.stop()
        await self.membership.stop(deregister=not crash)
        await self.links.close()
        await self.server.close()
        await self.node.stop()


@pytest.fixture(scope="module")
def dm_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-dm")))
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def cluster(
    etcd: EtcdServer, dm_redis: RedisServer, node_factory: Any, cluster_name: str
) -> AsyncIterator[Callable[..., Any]]:
    made: list[CNode] = []
    prefix = "dm" + os.urandom(5).hex()

    async def make(node_id: str, etcd_endpoint: str = etcd.endpoint, **settings: Any) -> CNode:
        node: Node = await node_factory(
            node_id=node_id, store="redis", redis_url=dm_redis.url, redis_prefix=prefix,
            dm_retry=settings.pop("dm_retry", 0.5), **settings,
        )  # fmt: skip
        handler = _Handler()
        server = LinkServer(node_id, cluster_name, handler, timeout=2.0, flusher=node.flusher)
        await server.start()
        links = Links(node_id, cluster_name, heartbeat=0.3, timeout=1.5, backoff=(0.02, 0.2),
                      flusher=node.flusher)  # fmt: skip
        m = Membership(etcd_endpoint, cluster_name, node_id, ttl=2, prefix="/fastim-test",
                       addresses={"link": server.address})  # fmt: skip
        m.on_change(lambda ev: links.sync(link_peers(m.nodes, node_id)))
        assert node.postman is not None
        router = DmRouter(node_id, node.postman, UserRoutes(m), links)
        handler.router = router
        await m.start()
        links.sync(link_peers(m.nodes, node_id))
        await router.start()
        c = CNode(node, m, links, server, router)
        made.append(c)
        return c

    yield make
    for c in made:
        if c.membership.state != "stopped":
            await c.stop()


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def client(url: str | list[str], **kw: Any) -> Client:
    kw.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kw.setdefault("connect_timeout", 2.0)
    return await connect(url, **kw)


def reader(c: Client, got: list[DirectMessage]) -> asyncio.Task[None]:
    async def run() -> None:
        async for dm in c.direct_messages():
            got.append(dm)

    return asyncio.ensure_future(run())


async def test_every_connection_on_every_node_gets_every_dm(cluster: Any) -> None:
    a, b, c = await cluster("a"), await cluster("b"), await cluster("c")
    bob_b = await client(b.url, user="bob")
    bob_c = await client(c.url, user="bob")
    alice = await client(a.url, user="alice")
    got_b: list[DirectMessage] = []
    got_c: list[DirectMessage] = []
    tasks = [reader(bob_b, got_b), reader(bob_c, got_c)]
    try:
        routes = a.router.routes
        await until(lambda: routes.nodes_of("bob") == {"b", "c"}, 5, "a sees bob on b and c")
        await until(lambda: a.links.is_up("b") and a.links.is_up("c"), 5, "links up")
        # a first message tells each SDK where the inbox starts (until then, a client
        # asks the node, and would skip what the other connection acked meanwhile)
        sent = [await alice.send("bob", {"i": 0})]
        await until(lambda: min(len(got_b), len(got_c)) == 1, 5, "the first DM on both")
        n = 100
        sent += await asyncio.gather(*(alice.send("bob", {"i": i}) for i in range(1, n)))
        await until(lambda: min(len(got_b), len(got_c)) >= n, 10, "bob's connections get all")
        # a duplicate would arrive before a marker sent last
        assert (await dm_marker(alice, "bob", got_b, got_c)).seq == n + 1
        for got in (got_b, got_c):
            assert [d.seq for d in got] == list(range(1, n + 1))  # in order, each once
            assert {d.seq: d.mid for d in got} == {s.seq: s.mid for s in sent}
            assert all(d.sender == "alice" for d in got)
        assert a.router.relayed >= 2 * n and b.router.received >= n
        # an idempotent retry through another node: the same mid and seq, nothing new
        first = await alice.send("bob", {"x": 1}, cid="once")
        alice2 = await client(c.url, user="alice")
        again = await alice2.send("bob", {"x": 1}, cid="once")
        assert again.dup and (again.mid, again.seq) == (first.mid, first.seq)
        await until(lambda: len(got_b) == n + 1 and len(got_c) == n + 1, 5, "the one DM")
        # a copy would arrive before a marker sent last
        assert (await dm_marker(alice, "bob", got_b, got_c)).seq == first.seq + 1
        assert len(got_b) == n + 1 and len(got_c) == n + 1
        await alice2.aclose()
    finally:
        for t in tasks:
            t.cancel()
        for cl in (alice, bob_b, bob_c):
            await cl.aclose()


async def test_acks_on_one_node_stop_retries_on_another(cluster: Any) -> None:
    """bob acks on b (SDK, auto ack); c's retry looks at the store first and stops."""
    a, b, c = await cluster("a"), await cluster("b"), await cluster("c", dm_retry=0.2)
    bob_b = await client(b.url, user="bob")
    got: list[DirectMessage] = []
    task = reader(bob_b, got)
    raw_events: list[dict[str, Any]] = []
    bob_c = await client(c.url, user="bob", on_event=raw_events.append)
    alice = await client(a.url, user="alice")
    try:
        await until(lambda: a.router.routes.nodes_of("bob") == {"b", "c"}, 5, "routes")
        for i in range(5):
            await alice.send("bob", {"i": i})
        await until(lambda: bob_b.inbox.acked == 5, 5, "bob acks all 5 on b")
        assert c.node.postman is not None
        pm = c.node.postman
        await until(lambda: pm.rechecks >= 1 and not pm._users["bob"].pending, 5,
                    "c learns the ack from the store")  # fmt: skip
        retried = pm.retried
        # c's retries that were scheduled come due and are dropped, not sent: then none
        # is left (a message sent again is scheduled again)
        await until(lambda: all(u != "bob" for _, _, u, _ in pm._due), 5, "c's retries due")
        assert pm.retried == retried
    finally:
        task.cancel()
        for cl in (alice, bob_b, bob_c):
            await cl.aclose()


async def test_offline_backlog_on_another_node_and_a_crash(cluster: Any) -> None:
    a, b, c = await cluster("a"), await cluster("b"), await cluster("c")
    alice = await client(a.url, user="alice")
    try:
        for i in range(20):
            await alice.send("carol", {"i": i})  # carol is offline
        # carol connects to b, listing c as a fallback
        carol = await client([b.url, c.url], user="carol", request_timeout=5.0)
        got: list[DirectMessage] = []
        task = reader(carol, got)
        await until(lambda: len(got) == 20, 5, "the backlog on b")
        await until(lambda: a.router.routes.nodes_of("carol") == {"b"}, 5, "route to b")
        # b crashes: carol reconnects to c, sends meanwhile are stored and reach her
        sends = asyncio.ensure_future(
            asyncio.gather(*(alice.send("carol", {"i": i}) for i in range(20, 60)))
        )
        await asyncio.sleep(0.05)
        await b.stop(crash=True)
        await sends
        await until(lambda: len(got) == 60, 15, "everything after the crash")
        await dm_marker(alice, "carol", got)  # a duplicate would arrive before it
        assert [d.seq for d in got] == list(range(1, 61))
        assert [d.data["i"] for d in got] == list(range(60))
        task.cancel()
        await carol.aclose()
    finally:
        await alice.aclose()


async def test_a_user_whose_route_cannot_be_written_still_gets_its_dms(
    cluster: Any, etcd: EtcdServer
) -> None:
    """b is cut off from etcd: bob's route on b is never written, so a does not send
    him DM frames; b reads the inbox of its unrouted users (route_poll) and delivers."""
    from ._proxy import Proxy

    proxy = Proxy(etcd.client_port)
    await proxy.start()
    try:
        a = await cluster("a")
        b = await cluster("b", etcd_endpoint=proxy.endpoint)
        await until(lambda: a.links.is_up("b"), 5, "a's link to b")
        proxy.cut()
        await until(lambda: not b.router.routes.healthy, 8, "b's routes lose etcd")
        bob = await client(b.url, user="bob")
        got: list[DirectMessage] = []
        task = reader(bob, got)
        alice = await client(a.url, user="alice")
        await asyncio.sleep(0.3)
        assert a.router.routes.nodes_of("bob") == frozenset()
        for i in range(10):
            await alice.send("bob", {"i": i})
        await until(lambda: len(got) == 10, 5, "bob gets them by b's inbox polls")
        assert [d.seq for d in got] == list(range(1, 11))
        assert a.router.relayed == 0 and b.node.postman is not None
        assert b.node.postman.filled >= 10
        # etcd back: the route is written, a sends frames again
        proxy.heal()
        await until(lambda: a.router.routes.nodes_of("bob") == {"b"}, 10, "route written")
        await alice.send("bob", {"i": 10})
        await until(lambda: len(got) == 11, 5, "the live one")
        assert a.router.relayed == 1
        task.cancel()
        await alice.aclose()
        await bob.aclose()
    finally:
        await proxy.close()


async def test_a_message_no_frame_brought_is_read_from_the_inbox(cluster: Any) -> None:
    """A message stored without a frame to bob's node (as when the storing node did not
    know the route yet) is found when a later seq shows the gap, and when a link into
    bob's node comes back after a break (frames queued on it were lost)."""
    a, b = await cluster("a"), await cluster("b")
    bob = await client(b.url, user="bob")
    got: list[DirectMessage] = []
    task = reader(bob, got)
    alice = await client(a.url, user="alice")
    pm = b.node.postman
    assert pm is not None and a.node.store is not None
    try:
        await until(lambda: a.router.routes.nodes_of("bob") == {"b"}, 5, "a sees bob on b")
        await until(lambda: a.links.is_up("b"), 5, "a's link to b")
        await asyncio.sleep(pm.route_poll + 0.3)  # past the check after the route was written
        rechecks = pm.rechecks
        # seq 1 stored behind the router's back; seq 2 sent normally: b sees 2 after 0
        await a.node.store.inbox_append("bob", b'{"hidden":1}', None, "zed")
        await alice.send("bob", {"live": 2})
        await until(lambda: len(got) == 2, 5, "the gap is filled from the inbox")
        assert [(d.seq, d.data) for d in got] == [(1, {"hidden": 1}), (2, {"live": 2})]
        assert pm.filled >= 1 and pm.rechecks > rechecks

        # a link break: the link into b is cut, a message stored meanwhile is not relayed
        filled, resyncs = pm.filled, b.router.resyncs
        conn = b.server.peers["a"]
        conn.abort()
        await a.node.store.inbox_append("bob", b'{"hidden":3}', None, "zed")
        await until(lambda: len(got) == 3, 5, "read after the link came back")
        assert got[2].seq == 3 and got[2].data == {"hidden": 3}
        assert b.router.resyncs == resyncs + 1 and pm.filled == filled + 1
    finally:
        task.cancel()
        await alice.aclose()
        await bob.aclose()
