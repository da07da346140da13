"""Direct messages across ``fastim serve`` processes: three nodes joined through a real
etcd, sharing a real redis store, SDK clients on different nodes.

What must hold at the application (through the SDK): every connection of the recipient,
on any node, gets every message once in ``seq`` order; the sender's ack carries the
message id the recipient sees; a send retried through another node with the same
``cid`` is stored once; a recipient offline meanwhile gets its backlog on any node; and
when the node holding the recipient's connection is killed (-9), the recipient
reconnects to another node and gets everything, once, in order.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults._markers import dm_marker  # type: ignore[import-not-found]
from faults._node import NodeProc, free_port  # type: ignore[import-not-found]
from store._redis import RedisServer  # type: ignore[import-not-found]

from fastim.client import Backoff, Client, DirectMessage, Sent, connect
from fastim.cluster.membership import parse_endpoints

from ._etcd import EtcdServer

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

ETCD_PREFIX = "/fastim-test"


class Cluster:
    """The command lines of a cluster's nodes (one etcd, one redis prefix)."""

    def __init__(self, directory: Path, etcd: EtcdServer, redis: RedisServer) -> None:
        self.directory = directory
        self.etcd = etcd
        self.redis = redis
        self.name = "dm" + uuid.uuid4().hex[:8]
        self.redis_prefix = "cdm" + uuid.uuid4().hex[:8]
        self.nodes: dict[str, NodeProc] = {}

    def node(self, node_id: str) -> NodeProc:
        d = self.directory / node_id
        d.mkdir(exist_ok=True)
        proc = NodeProc(
            d, free_port(), free_port(),
            "--node-id", node_id,
            "--store", "redis", "--redis-url", self.redis.url,
            "--redis-prefix", self.redis_prefix,
            "--etcd-endpoints", self.etcd.endpoint, "--cluster-name", self.name,
            "--etcd-prefix", ETCD_PREFIX, "--node-lease-ttl", "2",
            "--link-port", str(free_port()),
            "--dm-retry", "0.5",
        )  # fmt: skip
        self.nodes[node_id] = proc
        return proc

    def stop(self) -> None:
        for proc in self.nodes.values():
            proc.stop()

    async def routes(self, user: str) -> set[str]:
        """The nodes etcd lists for ``user`` (read with a plain client)."""
        import aetcd  # type: ignore[import-untyped]

        host, port = parse_endpoints(self.etcd.endpoint)[0]
        prefix = f"{ETCD_PREFIX}/{self.name}/users/{user}/".encode()
        async with aetcd.Client(host=host, port=port, timeout=2) as c:
            r = await c.get_prefix(prefix)
            return {bytes(kv.key[len(prefix) :]).decode() for kv in r}


@pytest.fixture(scope="module")
def cdm_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-cdm")))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def three(
    tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer, cdm_redis: RedisServer
) -> Iterator[Cluster]:
    """Nodes a, b and c, shared by the tests that kill nothing (each uses its own users)."""
    c = Cluster(tmp_path_factory.mktemp("cdm"), etcd, cdm_redis)
    try:
        for node_id in ("a", "b", "c"):
            c.node(node_id).start()
        yield c
    finally:
        c.stop()


async def eventually(cond: Callable[[], bool], seconds: float = 10.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.01)


async def client(url: str | list[str], **kw: Any) -> Client:
    kw.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("request_timeout", 10.0)
    return await connect(url, **kw)


def reader(c: Client, got: list[DirectMessage]) -> asyncio.Task[None]:
    async def run() -> None:
        async for dm in c.direct_messages():
            got.append(dm)

    return asyncio.ensure_future(run())


async def routed(cluster: Cluster, user: str, nodes: set[str]) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while (have := await cluster.routes(user)) != nodes:
        if loop.time() > end:
            raise AssertionError(f"routes of {user}: {have}, expected {nodes}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the other nodes' watches


def _metrics(node: NodeProc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.ws_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def test_every_connection_on_every_node_gets_every_dm(three: Cluster) -> None:
    a, b, c = (three.nodes[n] for n in "abc")
    bob_b = await client(b.tcp_url, user="bob")
    bob_c = await client(c.ws_url, user="bob")
    alice = await client(a.tcp_url, user="alice")
    got_b: list[DirectMessage] = []
    got_c: list[DirectMessage] = []
    tasks = [reader(bob_b, got_b), reader(bob_c, got_c)]
    try:
        await routed(three, "bob", {"b", "c"})
        # a first message tells each SDK where the inbox starts: until then a client asks
        # the node, and skips what the other connection acked meanwhile ("read on
        # another device": counted in inbox.skipped), so seq 1 reaches both or one
        sent: list[Sent] = [await alice.send("bob", {"i": 0})]

        def seen_first(c: Client, got: list[DirectMessage]) -> bool:
            return len(got) + c.inbox.skipped >= 1

        await eventually(
            lambda: seen_first(bob_b, got_b) and seen_first(bob_c, got_c),
            what=f"the first DM on both (got {len(got_b)}, {len(got_c)}; skipped "
            f"{bob_b.inbox.skipped}, {bob_c.inbox.skipped})",
        )
        assert bool(got_b) or bool(got_c), "seq 1 reached neither connection"
        n = 200
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent += await asyncio.gather(*(alice.send("bob", {"i": i}) for i in range(1, n)))
        first = {id(got): 1 if got else 2 for got in (got_b, got_c)}  # 2: skipped seq 1
        await eventually(
            lambda: all(len(got) >= n + 1 - first[id(got)] for got in (got_b, got_c)),
            what=f"every DM on both connections (b {len(got_b)}, c {len(got_c)})",
        )
        took = loop.time() - t0
        # a duplicate would arrive before a marker sent last
        mark = await dm_marker(alice, "bob", got_b, got_c)
        assert mark.seq == n + 1  # and nothing else was stored
        for got in (got_b, got_c):
            start = first[id(got)]
            assert [d.seq for d in got] == list(range(start, n + 1))  # in order, each once
            assert sorted(d.data["i"] for d in got) == list(range(start - 1, n))
            # the sender's ack names the message the recipient sees
            assert {d.seq: d.mid for d in got} == {s.seq: s.mid for s in sent if s.seq >= start}
            assert all(d.sender == "alice" for d in got)
        assert len({s.mid for s in sent}) == n and not any(s.dup for s in sent)
        await eventually(
            lambda: bob_b.inbox.acked == n + 1 or bob_c.inbox.acked == n + 1, 5, "acks"
        )
        state = await bob_c.inbox_state()
        assert tuple(state)[:2] == (n + 1, n + 1)  # every one acked, the marker last
        # /metrics on the sender's node counts the relays to b and c
        metrics = await asyncio.to_thread(_metrics, a)
        relayed = re.search(r"^fastim_cluster_dm_relayed_total (\S+)$", metrics, re.M)
        assert relayed is not None and float(relayed.group(1)) >= 2 * n, metrics[-2000:]
        assert re.search(r"^fastim_cluster_user_routes [1-9]", metrics, re.M), "no user routes"
        print(f"\n{n - 1} DMs a -> b and c, sent and received in {took * 1000:.0f} ms")
    finally:
        for t in tasks:
            t.cancel()
        for cl in (alice, bob_b, bob_c):
            await cl.aclose()


async def test_a_send_retried_through_another_node_is_stored_once(three: Cluster) -> None:
    a, b, c = (three.nodes[n] for n in "abc")
    dave = await client(b.tcp_url, user="dave")
    got: list[DirectMessage] = []
    task = reader(dave, got)
    alice_a = await client(a.tcp_url, user="erin")
    alice_c = await client(c.tcp_url, user="erin")
    try:
        await routed(three, "dave", {"b"})
        first = await alice_a.send("dave", {"hello": 1}, cid="same-cid")
        again = await alice_c.send("dave", {"hello": 1}, cid="same-cid")
        assert not first.dup and again.dup
        assert (again.mid, again.seq) == (first.mid, first.seq)
        await eventually(lambda: len(got) == 1, what="the DM")
        mark = await dm_marker(alice_a, "dave", got)  # a copy would arrive before it
        assert [(d.seq, d.mid, d.data) for d in got] == [(first.seq, first.mid, {"hello": 1})]
        state = await dave.inbox_state()
        assert state.top == mark.seq == 2  # stored once, then the marker
    finally:
        task.cancel()
        for cl in (dave, alice_a, alice_c):
            await cl.aclose()


async def test_offline_backlog_arrives_on_any_node(three: Cluster) -> None:
    a, b, c = (three.nodes[n] for n in "abc")
    sender = await client(a.tcp_url, user="frank")
    try:
        sent = [await sender.send("grace", {"i": i}) for i in range(30)]
        grace = await client(c.ws_url, user="grace")
        got: list[DirectMessage] = []
        task = reader(grace, got)
        await eventually(lambda: len(got) == 30, what="the backlog on c")
        # and live ones after it, stored by b
        sender_b = await client(b.tcp_url, user="frank")
        sent += [await sender_b.send("grace", {"i": i}) for i in range(30, 40)]
        await eventually(lambda: len(got) == 40, what="the live ones from b")
        await dm_marker(sender_b, "grace", got)  # a duplicate would arrive before it
        assert [d.seq for d in got] == list(range(1, 41))
        assert [d.mid for d in got] == [s.mid for s in sent]
        task.cancel()
        await grace.aclose()
        await sender_b.aclose()
    finally:
        await sender.aclose()


async def test_kill9_of_the_recipients_node_loses_nothing(
    tmp_path: Path, etcd: EtcdServer, cdm_redis: RedisServer
) -> None:
    cluster = Cluster(tmp_path, etcd, cdm_redis)
    try:
        a, b, c = (cluster.node(n) for n in "abc")
        for node in (a, b, c):
            await node.astart()
        n = 300
        alice = await client([a.tcp_url, c.tcp_url], user="alice", send_timeout=30.0)
        # the recipient's connection is on b; c is its fallback
        heidi = await client([b.tcp_url, c.tcp_url], user="heidi")
        got: list[DirectMessage] = []
        task = reader(heidi, got)
        await routed(cluster, "heidi", {"b"})
        sent: dict[int, Sent] = {}
        slots = asyncio.Semaphore(4)

        async def send(i: int) -> None:
            async with slots:
                sent[i] = await alice.send("heidi", {"i": i})  # retried until acked

        sends = [asyncio.ensure_future(send(i)) for i in range(n)]
        await eventually(lambda: len(got) >= n // 3, 20, "a third delivered")
        await b.akill()
        await asyncio.wait_for(asyncio.gather(*sends), 40)
        await eventually(lambda: len(got) >= n, 20, f"all {n} after the kill (have {len(got)})")
        await eventually(lambda: heidi.inbox.acked == n, 10, "heidi's acks")
        mark = await dm_marker(alice, "heidi", got)  # a duplicate would arrive before it
        assert mark.seq == n + 1  # and nothing else was stored
        task.cancel()
        # each exactly once, in seq order, as the sender was told
        assert [d.seq for d in got] == list(range(1, n + 1))
        assert sorted(d.data["i"] for d in got) == list(range(n))
        assert {s.seq: s.mid for s in sent.values()} == {d.seq: d.mid for d in got}
        assert heidi.reconnects >= 1
        await eventually(lambda: heidi.inbox.acked == n + 1, 10, "the marker's ack")
        state = await heidi.inbox_state()
        assert tuple(state)[:2] == (n + 1, n + 1)  # every one acked, the marker last
        await routed(cluster, "heidi", {"c"})  # b's route went with its lease
        await alice.aclose()
        await heidi.aclose()
    finally:
        cluster.stop()


async def test_dms_keep_flowing_while_etcd_is_down(tmp_path: Path, cdm_redis: RedisServer) -> None:
    """etcd stopped: known routes keep serving, and a user who connects meanwhile (its
    route cannot be written) still gets DMs sent from another node; etcd back: its
    route is written."""
    (tmp_path / "etcd").mkdir()
    etcd = EtcdServer(str(tmp_path / "etcd"))
    etcd.start()
    cluster = Cluster(tmp_path, etcd, cdm_redis)
    clients: list[Client] = []
    try:
        a, b, c = (cluster.node(n) for n in "abc")
        for node in (a, b, c):
            await node.astart()
        alice = await client(a.tcp_url, user="alice")
        judy = await client(b.tcp_url, user="judy")
        clients += [alice, judy]
        got_j: list[DirectMessage] = []
        tasks = [reader(judy, got_j)]
        await routed(cluster, "judy", {"b"})
        etcd.stop()
        await asyncio.sleep(1.0)  # every node notices (degraded)
        for i in range(10):
            await alice.send("judy", {"i": i})
        await eventually(lambda: len(got_j) == 10, what="DMs over a known route")
        # a user connecting while etcd is down: no route anywhere
        kate = await client(c.tcp_url, user="kate")
        clients.append(kate)
        got_k: list[DirectMessage] = []
        tasks.append(reader(kate, got_k))
        await asyncio.sleep(0.3)
        for i in range(10):
            await alice.send("kate", {"i": i})
        await eventually(lambda: len(got_k) == 10, what="DMs to a user without a route")
        assert [d.seq for d in got_k] == list(range(1, 11))
        etcd.start()
        await routed(cluster, "kate", {"c"})
        await alice.send("kate", {"i": 10})
        await eventually(lambda: len(got_k) == 11, what="the one after etcd is back")
        # a duplicate would arrive before a marker sent last
        await dm_marker(alice, "kate", got_k)
        await dm_marker(alice, "judy", got_j)
        assert [d.seq for d in got_k] == list(range(1, 12))
        assert [d.seq for d in got_j] == list(range(1, 11))
        for t in tasks:
            t.cancel()
    finally:
        for cl in clients:
            await cl.aclose()
        cluster.stop()
        etcd.kill()
