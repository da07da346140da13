"""A cluster of real node processes doing pub/sub: publish anywhere, deliver everywhere.

Three ``python -m fastim serve`` processes join one real etcd and share one real
redis-server (``tests/cluster/_nodes.py``); clients are raw TCP connections speaking
fastim frames (``tests/server/_support.py``), so a duplicate or a reordering is seen as
it arrives, not smoothed over by an SDK.

- every subscriber on every node gets every message exactly once, in offset order, with
  publishers on every node at once;
- a publish on a node that is not the channel's owner is acknowledged with the owner's
  offset (TCP PUBACK, WebSocket JSON puback, and the HTTP API, whose epoch is the owner's);
- a graceful stop of the owner: the channel goes on under the new owner, offsets
  continuing from the store;
- Redis gone: publishes refused with a code (on the owner and forwarded), nodes up,
  and after Redis returns exactly the acknowledged messages are delivered, in order;
- etcd gone: the nodes keep serving pub/sub (local and across nodes, known routes),
  ``/ready`` answers 200 "degraded", and healthy again once etcd is back.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from server._support import TcpClient, WsClient, deadline  # type: ignore[import-not-found]

from fastim.cluster.placement import owner
from fastim.protocol import ErrorCode, FrameType, unpack_error, unpack_msg, unpack_subscribed

from ._etcd import free_port
from ._nodes import ClusterNode, Nodes

F = FrameType
API_KEY = "cluster-test-api-key-0123456789"
IDS = ["n0", "n1", "n2"]

# the nodes are processes of their own: the test's loop does not matter, one is enough
pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Three nodes for the tests that leave the cluster as they found it."""
    nodes = Nodes(tmp_path_factory.mktemp("cluster"), 3, "--api-key", API_KEY)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Nodes]:
    """Three nodes a test may stop, and whose etcd it may stop."""
    nodes = Nodes(tmp_path, 3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


def channel_owned_by(node_id: str, prefix: str) -> str:
    """A channel name whose owner (rendezvous hashing over n0..n2) is ``node_id``."""
    return channel_owned_by_of(node_id, IDS, prefix)


def channel_owned_by_of(node_id: str, ids: list[str], prefix: str) -> str:
    for i in range(1000):
        name = f"{prefix}-{i}"
        if owner(name, ids) == node_id:
            return name
    raise AssertionError("no such channel")


async def subscribe(node: ClusterNode, ch: str) -> tuple[TcpClient, int, str]:
    """A raw TCP subscriber on ``node``: (client, offset, epoch) from SUBSCRIBED."""
    c = await TcpClient.connect(node.tcp_port)
    rid = c.send_sub(ch)
    p = await c.expect(F.SUBSCRIBED)
    got_id, off, got_ch, epoch, _rec = unpack_subscribed(p)
    assert (got_id, got_ch) == (rid, ch)
    return c, off, epoch


async def publish_many(c: TcpClient, ch: str, datas: list[bytes]) -> dict[int, bytes]:
    """Pipeline PUBs, wait for every PUBACK: offset -> data (any ERROR fails)."""
    ids = {c.send_pub(ch, d): d for d in datas}
    out: dict[int, bytes] = {}
    async with deadline(15):
        while ids:
            t, p = await c.recv(10)
            if t == F.PUBACK:
                rid = int.from_bytes(p[:4], "big")
                off = int.from_bytes(p[4:12], "big")
                out[off] = ids.pop(rid)
            elif t == F.ERROR:
                raise AssertionError(f"publish refused: {unpack_error(p)}")
    return out


async def collect(c: TcpClient, ch: str, n: int, timeout: float = 15) -> list[tuple[int, bytes]]:
    """The next ``n`` messages of ``ch`` on ``c`` (offset, data), in arrival order."""
    got: list[tuple[int, bytes]] = []
    async with deadline(timeout):
        while len(got) < n:
            t, p = await c.recv(timeout)
            if t == F.MSG:
                off, got_ch, data = unpack_msg(p)
                assert got_ch == ch
                got.append((off, data))
    return got


async def no_more(subs: list[TcpClient], pub: TcpClient, ch: str) -> None:
    """Nothing else arrives (a duplicate would): a marker published last on ``ch`` through
    ``pub`` is the next message of each subscriber (what was on its way comes before)."""
    marker = b'{"marker":true}'
    off = await pub.pub(ch, marker)
    for c in subs:
        async with deadline(15):
            while True:
                t, p = await c.recv(15)
                if t == F.MSG:
                    break
        got = unpack_msg(p)
        assert got == (off, ch, marker), f"unexpected message after the last one: {got}"


def api_publish(node: ClusterNode, ch: str, data: object) -> dict[str, object]:
    req = urllib.request.Request(
        node.http + "/api/publish",
        data=orjson.dumps({"channel": ch, "data": data}),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        body: dict[str, object] = json.loads(r.read())
        return body


async def test_publish_on_every_node_reaches_every_subscriber_once_in_order(
    cluster: Nodes,
) -> None:
    ch = "room-everyone"
    subs = [(await subscribe(node, ch))[0] for node in cluster.nodes]
    pubs = [await TcpClient.connect(node.tcp_port) for node in cluster.nodes]
    per = 40
    try:
        # publishers on all three nodes at once: one owner numbers them all
        results = await asyncio.gather(
            *(
                publish_many(p, ch, [b'{"n":%d,"i":%d}' % (k, i) for i in range(per)])
                for k, p in enumerate(pubs)
            )
        )
        acked: dict[int, bytes] = {}
        for r in results:
            assert not set(r) & set(acked), "two publishes acknowledged with one offset"
            acked.update(r)
        assert sorted(acked) == list(range(1, 3 * per + 1))
        for node, s in zip(cluster.nodes, subs, strict=True):
            got = await collect(s, ch, 3 * per)
            offsets = [o for o, _ in got]
            assert offsets == sorted(acked), f"{node.node_id}: not once each in offset order"
            assert dict(got) == acked, f"{node.node_id}: data does not match the acks"
        await no_more(subs, pubs[0], ch)
        # each node's publishes stay in their own order within the channel's order
        order = [orjson.loads(acked[o]) for o in sorted(acked)]
        for k in range(3):
            assert [m["i"] for m in order if m["n"] == k] == list(range(per))
    finally:
        for c in subs + pubs:
            await c.close()


async def test_publish_on_a_non_owner_is_acked_with_the_owners_offset(cluster: Nodes) -> None:
    ch = channel_owned_by("n2", "ack")
    owner_node, other = cluster[2], cluster[0]
    s, off0, epoch = await subscribe(owner_node, ch)
    p = await TcpClient.connect(other.tcp_port)
    try:
        first = await p.pub(ch, b'{"via":"tcp"}')
        assert first == off0 + 1
        ((off, data),) = await collect(s, ch, 1)
        assert (off, data) == (first, b'{"via":"tcp"}')
        # the HTTP API on the other non-owner: the owner's offset and epoch
        res = await asyncio.to_thread(api_publish, cluster[1], ch, {"via": "http"})
        assert res == {"offset": first + 1, "epoch": epoch}
        ((off, data),) = await collect(s, ch, 1)
        assert (off, orjson.loads(data)) == (first + 1, {"via": "http"})
        # a WebSocket (JSON) client on a non-owner: the owner's offset in its puback
        ws = await WsClient.connect(cluster[1].ws_port)
        try:
            assert await ws.pub(ch, {"via": "ws"}) == first + 2
        finally:
            await ws.close()
        ((off, data),) = await collect(s, ch, 1)
        assert (off, orjson.loads(data)) == (first + 2, {"via": "ws"})
        metrics = await asyncio.to_thread(other.metrics)
        assert 'fastim_cluster_forwards_total{result="acked"}' in metrics
        assert "fastim_cluster_links_up 2.0" in metrics
    finally:
        await s.close()
        await p.close()


async def test_graceful_stop_of_the_owner_continues_the_channel(own_cluster: Nodes) -> None:
    ch = channel_owned_by("n0", "handover")
    subs = [(await subscribe(node, ch))[0] for node in own_cluster.nodes[1:]]
    p = await TcpClient.connect(own_cluster[1].tcp_port)
    try:
        before = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(10)])
        assert sorted(before) == list(range(1, 11))
        for s in subs:
            assert [o for o, _ in await collect(s, ch, 10)] == list(range(1, 11))
        await asyncio.to_thread(own_cluster[0].stop)  # SIGTERM: deregisters at once
        await own_cluster.await_joined(own_cluster.nodes[1:], timeout=15)
        after = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(10, 20)])
        assert sorted(after) == list(range(11, 21)), "offsets did not continue"
        for s in subs:
            got = await collect(s, ch, 10)
            assert [o for o, _ in got] == list(range(11, 21))
            assert dict(got) == after
        await no_more(subs, p, ch)
    finally:
        for c in [*subs, p]:
            await c.close()


async def test_etcd_down_nodes_keep_serving_and_ready_says_degraded(own_cluster: Nodes) -> None:
    ch = channel_owned_by("n1", "no-etcd")
    s, _off, _epoch = await subscribe(own_cluster[0], ch)
    p = await TcpClient.connect(own_cluster[2].tcp_port)
    local = channel_owned_by("n0", "local")
    ls, _o, _e = await subscribe(own_cluster[0], local)
    lp = await TcpClient.connect(own_cluster[0].tcp_port)
    try:
        own_cluster.etcd.stop()
        async with deadline(10):
            while True:
                status, body = await own_cluster[0].aready()
                if "degraded" in body:
                    break
                await asyncio.sleep(0.1)
        assert status == 200, body
        assert "3 nodes" in body
        # known routes: a publish on n2, owned by n1, delivered on n0
        acked = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(5)])
        assert [o for o, _ in await collect(s, ch, 5)] == sorted(acked)
        # and local traffic
        lacked = await publish_many(lp, local, [b'{"i":%d}' % i for i in range(5)])
        assert [o for o, _ in await collect(ls, local, 5)] == sorted(lacked)
        own_cluster.etcd.start()
        await own_cluster.await_joined(own_cluster.nodes, timeout=20)
        status, body = await own_cluster[0].aready()
        assert status == 200 and "degraded" not in body, body
        acked = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(5, 8)])
        assert [o for o, _ in await collect(s, ch, 3)] == sorted(acked)
    finally:
        for c in (s, p, ls, lp):
            await c.close()


async def test_redis_down_publishes_fail_clearly_and_the_cluster_recovers(
    own_cluster: Nodes,
) -> None:
    """Redis (the shared store) stopped under a running cluster: a durable publish, on
    the owner or forwarded from another node, is refused with a code (never acked and
    lost); every node stays up; once Redis is back publishing works again and the
    subscribers get exactly the acknowledged messages, in order."""
    redis = own_cluster.redis
    assert redis is not None
    ch = channel_owned_by("n1", "no-redis")
    s, off0, _epoch = await subscribe(own_cluster[0], ch)
    on_owner = await TcpClient.connect(own_cluster[1].tcp_port)
    forwarded = await TcpClient.connect(own_cluster[2].tcp_port)
    try:
        before = await publish_many(forwarded, ch, [b'{"i":0}', b'{"i":1}'])
        assert sorted(before) == [off0 + 1, off0 + 2]
        assert [o for o, _ in await collect(s, ch, 2)] == sorted(before)
        redis.stop()
        for c in (on_owner, forwarded):
            rid = c.send_pub(ch, b'{"refused":true}')
            async with deadline(20):
                t, payload = await c.recv(20)
            assert t == F.ERROR, t
            got_id, code, reason = unpack_error(payload)
            assert got_id == rid
            assert code in (ErrorCode.STORE_UNAVAILABLE, ErrorCode.NOT_ROUTED), (code, reason)
            assert reason
        for node in own_cluster.nodes:
            node.check_alive()
        redis.start()
        async with deadline(20):
            while True:  # the nodes reconnect to Redis by themselves
                try:
                    after = await publish_many(forwarded, ch, [b'{"i":2}'])
                    break
                except AssertionError:
                    await asyncio.sleep(0.3)
        after.update(await publish_many(on_owner, ch, [b'{"i":3}', b'{"i":4}']))
        got = await collect(s, ch, len(after))
        assert dict(got) == after  # a refused publish was not delivered: it would be first
        assert [o for o, _ in got] == sorted(after)
        assert min(after) > max(before)
        await no_more([s], on_owner, ch)
    finally:
        for c in (s, on_owner, forwarded):
            await c.close()


async def test_owner_unreachable_answers_not_routed(own_cluster: Nodes) -> None:
    """A frozen owner: the publish is answered NOT_ROUTED (119), never silently lost."""
    ch = channel_owned_by("n2", "frozen")
    p = await TcpClient.connect(own_cluster[0].tcp_port)
    proc = own_cluster[2].proc
    assert proc is not None
    try:
        proc.send_signal(signal.SIGSTOP)
        rid = p.send_pub(ch, b'{"lost":false}')
        t, payload = await p.recv(15)
        assert t == F.ERROR
        got_id, code, reason = unpack_error(payload)
        assert (got_id, code) == (rid, ErrorCode.NOT_ROUTED), reason
    finally:
        proc.send_signal(signal.SIGCONT)
        await p.close()


async def test_memory_channels_follow_their_owner(tmp_path: Path) -> None:
    """Memory store: the owner numbers, a subscriber on another node gets the owner's
    epoch and recovers through it (CONTROL); the owner's graceful stop starts a new
    epoch, which subscribers elsewhere learn as a resubscribe."""
    nodes = Nodes(tmp_path, 3, store="memory")
    clients: list[TcpClient] = []
    try:
        await asyncio.to_thread(nodes.start)
        ch = channel_owned_by("n1", "mem")
        s0, off0, epoch = await subscribe(nodes[0], ch)  # n0 asks n1
        s1, off1, epoch1 = await subscribe(nodes[1], ch)
        clients += [s0, s1]
        assert (off0, epoch) == (off1, epoch1) == (0, epoch1)
        p = await TcpClient.connect(nodes[2].tcp_port)
        clients.append(p)
        acked = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(5)])
        assert sorted(acked) == [1, 2, 3, 4, 5]
        for s in (s0, s1):
            assert dict(await collect(s, ch, 5)) == acked
        # a subscriber on n2, which holds nothing of the channel, recovers from offset 2
        c = await TcpClient.connect(nodes[2].tcp_port)
        clients.append(c)
        since = {"off": 2, "epoch": epoch}
        c.send(F.CMD, orjson.dumps({"op": "sub", "ch": ch, "since": since, "id": 7}))
        t, payload = await c.recv(10)
        assert t == F.EVENT, payload
        reply = orjson.loads(payload)
        assert (reply["op"], reply["off"], reply["epoch"], reply["recovered"]) == (
            "subscribed",
            5,
            epoch,
            True,
        )
        assert await collect(c, ch, 3) == [(o, acked[o]) for o in (3, 4, 5)]
        # the owner goes: the new owner starts a new epoch; n0's subscriber is told
        await asyncio.to_thread(nodes[1].stop)
        await nodes.await_joined([nodes[0], nodes[2]], timeout=15)
        again = await publish_many(p, ch, [b'{"after":1}'])
        assert list(again) == [1], "a new owner of a memory channel starts a new epoch"
        async with deadline(10):
            while True:
                t, payload = await s0.recv(10)
                if t == F.EVENT and orjson.loads(payload)["op"] == "resubscribe":
                    assert orjson.loads(payload)["epoch"] != epoch
                    break
                assert t != F.MSG, f"a message of the old epoch's subscription: {payload!r}"
    finally:
        for cl in clients:
            await cl.close()
        await asyncio.to_thread(nodes.close)


async def publish_retrying(
    c: TcpClient, ch: str, data: bytes, timeout: float = 15
) -> tuple[int, int]:
    """Publish until acked, retrying on NOT_ROUTED: (offset, refusals)."""
    refusals = 0
    async with deadline(timeout):
        while True:
            rid = c.send_pub(ch, data)
            while True:
                t, p = await c.recv(timeout)
                if t == F.PUBACK and int.from_bytes(p[:4], "big") == rid:
                    return int.from_bytes(p[4:12], "big"), refusals
                if t == F.ERROR:
                    got_id, code, reason = unpack_error(p)
                    assert (got_id, code) == (rid, ErrorCode.NOT_ROUTED), reason
                    refusals += 1
                    await asyncio.sleep(0.1)
                    break


async def test_owner_killed_publishes_refused_then_taken_by_the_new_owner(
    own_cluster: Nodes,
) -> None:
    """kill -9 of the owner: publishes are refused (NOT_ROUTED) until its lease expires,
    then the new owner continues the offsets; subscribers elsewhere get each once."""
    ch = channel_owned_by("n0", "killed")
    subs = [(await subscribe(node, ch))[0] for node in own_cluster.nodes[1:]]
    p = await TcpClient.connect(own_cluster[1].tcp_port)
    try:
        before = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(5)])
        assert sorted(before) == [1, 2, 3, 4, 5]
        for s in subs:
            await collect(s, ch, 5)
        own_cluster[0].kill()
        acked: dict[int, bytes] = {}
        refused = 0
        for i in range(5, 10):
            off, n = await publish_retrying(p, ch, b'{"i":%d}' % i)
            acked[off] = b'{"i":%d}' % i
            refused += n
        assert refused > 0, "a publish to a dead owner was acknowledged"
        assert sorted(acked) == [6, 7, 8, 9, 10]
        for s in subs:
            assert await collect(s, ch, 5) == sorted(acked.items())
        await no_more(subs, p, ch)
    finally:
        for c in [*subs, p]:
            await c.close()


async def test_a_node_that_cannot_join_exits_1_before_serving(tmp_path: Path) -> None:
    """etcd unreachable at start: one error line, exit status 1, no client was served."""
    dead = free_port()  # nothing listens there
    node = ClusterNode(tmp_path, "lonely", ["--etcd-endpoints", f"127.0.0.1:{dead}"])
    node.args += ["--node-lease-ttl", "2"]
    node.spawn()
    assert node.proc is not None
    served = False
    try:
        while node.proc.poll() is None:
            served = served or (await node.aready())[0] != 0
            await asyncio.sleep(0.2)
        code = node.proc.wait(20)
    finally:
        node.kill()
    errors = [line for line in node.log().splitlines() if " ERROR " in line]
    assert code == 1, node.log()
    assert len(errors) == 1 and "cannot join the cluster" in errors[0], node.log()
    assert not served, "the node answered HTTP before it joined"


async def test_subscribe_with_since_on_a_non_owner_recovers_from_the_store(
    cluster: Nodes,
) -> None:
    ch = channel_owned_by("n0", "since")
    p = await TcpClient.connect(cluster[0].tcp_port)
    s, _off, epoch = await subscribe(cluster[0], ch)
    c = await TcpClient.connect(cluster[2].tcp_port)
    try:
        acked = await publish_many(p, ch, [b'{"i":%d}' % i for i in range(8)])
        await collect(s, ch, 8)
        since = {"off": 3, "epoch": epoch}
        c.send(F.CMD, orjson.dumps({"op": "sub", "ch": ch, "since": since, "id": 5}))
        t, payload = await c.recv(10)
        assert t == F.EVENT, payload
        reply = orjson.loads(payload)
        assert (reply["off"], reply["epoch"], reply["recovered"]) == (8, epoch, True)
        assert await collect(c, ch, 5) == [(o, acked[o]) for o in range(4, 9)]
        # and live ones after, through the tree
        more = await publish_many(p, ch, [b'{"i":8}'])
        assert await collect(c, ch, 1) == list(more.items())
    finally:
        for cl in (p, s, c):
            await cl.close()


@pytest.fixture
def link_cert(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), used as its own CA."""
    crt, key = str(tmp_path / "node.crt"), str(tmp_path / "node.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", key, "-out", crt, "-subj", "/CN=fastim-node",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


async def test_links_with_mutual_tls(tmp_path: Path, link_cert: tuple[str, str]) -> None:
    """link_tls_*: the nodes link over mutual TLS, and the link port speaks TLS."""
    crt, key = link_cert
    tls = ["--link-tls-cert", crt, "--link-tls-key", key, "--link-tls-ca", crt]
    nodes = Nodes(tmp_path, 2, *tls, store="memory")
    clients: list[TcpClient] = []
    try:
        await asyncio.to_thread(nodes.start)
        ch = channel_owned_by_of("n1", ["n0", "n1"], "tls")
        s, _o, _e = await subscribe(nodes[0], ch)
        p = await TcpClient.connect(nodes[0].tcp_port)
        clients += [s, p]
        acked = await publish_many(p, ch, [b"1", b"2"])
        assert await collect(s, ch, 2) == sorted(acked.items())
        port = int(re.findall(r"links on 127\.0\.0\.1:(\d+)", nodes[1].log())[-1])
        ctx = ssl.create_default_context(cafile=crt)
        ctx.load_cert_chain(crt, key)
        _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        assert w.get_extra_info("ssl_object") is not None  # the link port speaks TLS
        w.close()
    finally:
        for cl in clients:
            await cl.close()
        await asyncio.to_thread(nodes.close)
