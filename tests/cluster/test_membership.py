"""Membership against a real etcd: registration under a lease, the routing table, and what
happens when etcd or the path to it fails (degraded, resume, re-list, re-register)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest

from fastim.cluster import ClusterError, NodeIdTaken
from fastim.cluster.membership import (
    DEGRADED,
    HEALTHY,
    MemberEvent,
    Membership,
    NodeInfo,
    parse_endpoints,
)

from ._etcd import EtcdServer, free_port
from ._proxy import Proxy

MemberFactory = Callable[..., Membership]
ProxyFactory = Callable[[int], Awaitable[Proxy]]


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``pred()``; return the seconds it took; fail naming ``what``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def recorder(m: Membership) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []

    def on(ev: MemberEvent) -> None:
        seen.append((ev.kind, ev.node_id))

    m.on_change(on)
    return seen


# --------------------------------------------------------------------------- pure parts


def test_parse_endpoints() -> None:
    assert parse_endpoints("127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_endpoints(" http://a:1/ , b:2,,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    assert parse_endpoints("") == []
    for bad in ("a", "a:b", "a:0", ":1", "https://a:1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_node_info_round_trip() -> None:
    info = NodeInfo("n1", {"tcp": "tcp://h:1", "link": "h:3"}, {"version": "0.1.0"}, 7, 9)
    back = NodeInfo.from_value("n1", info.value(), 7, 9)
    assert back == info and back.link == "h:3"
    for bad in (b"nope", b"[1]", b'{"addresses":{"tcp":1}}', b'{"metadata":[]}'):
        with pytest.raises(ValueError):
            NodeInfo.from_value("n1", bad, 1, 1)


def test_membership_refuses_bad_arguments() -> None:
    with pytest.raises(ClusterError):
        Membership("", "c", "n")
    with pytest.raises(ClusterError):
        Membership("127.0.0.1:1", "c", "a/b")


# --------------------------------------------------------------------------- with etcd


async def test_nodes_register_and_see_each_other(
    etcd: EtcdServer, members: MemberFactory, cluster_name: str
) -> None:
    a = members("a", etcd.endpoint, addresses={"tcp": "tcp://127.0.0.1:7070", "link": "h:1"})
    b = members("b", etcd.endpoint)
    await a.start()
    seen = recorder(a)
    await b.start()
    assert a.healthy and b.healthy
    await until(lambda: "b" in a.nodes, 5, "a sees b")
    assert set(b.nodes) == {"a", "b"}  # b listed a at start
    assert seen == [("join", "b")]  # events are about the others
    info = b.nodes["a"]
    assert info.addresses == {"tcp": "tcp://127.0.0.1:7070", "link": "h:1"}
    assert info.metadata["version"] and info.metadata["started"] > 0
    assert info.incarnation > 0 and info.lease == a.lease_id

    # the key layout of docs/cluster.md, read with a plain etcd client
    import aetcd  # type: ignore[import-untyped]

    host, port = parse_endpoints(etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        kv = await c.get(f"/fastim-test/{cluster_name}/nodes/a".encode())
        assert kv is not None and kv.lease == a.lease_id
        doc = orjson.loads(kv.value)
        assert doc["node"] == "a" and doc["addresses"]["link"] == "h:1"
        lease = await c.get_lease_info(a.lease_id, keys=False)
        assert 0 < lease.TTL <= 2 and lease.grantedTTL == 2


async def test_stop_deregisters_at_once(etcd: EtcdServer, members: MemberFactory) -> None:
    a = members("a", etcd.endpoint, ttl=30)
    b = members("b", etcd.endpoint, ttl=30)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes, 5, "a sees b")
    seen = recorder(a)
    await b.stop()
    took = await until(lambda: "b" not in a.nodes, 5, "a sees b leave")
    assert took < 2.0  # revoked: no wait for the 30 s lease
    assert seen == [("leave", "b")]


async def test_crashed_node_leaves_when_its_lease_expires(
    etcd: EtcdServer, members: MemberFactory
) -> None:
    a = members("a", etcd.endpoint)
    b = members("b", etcd.endpoint, ttl=2)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes, 5, "a sees b")
    await b.stop(deregister=False)  # as kill -9 looks to the others
    t0 = time.monotonic()
    await until(lambda: "b" not in a.nodes, 8, "b's lease expires")
    took = time.monotonic() - t0
    assert 1.0 < took < 6.0, took


async def test_same_node_id_is_refused_while_the_holder_lives(
    etcd: EtcdServer, members: MemberFactory
) -> None:
    a = members("a", etcd.endpoint)
    await a.start()
    twin = members("a", etcd.endpoint)
    with pytest.raises(NodeIdTaken, match="held by another registration"):
        await twin.start(timeout=3.0)
    assert a.healthy and a.registrations == 1


async def test_restart_with_the_same_id_waits_for_the_old_lease(
    etcd: EtcdServer, members: MemberFactory
) -> None:
    old = members("a", etcd.endpoint, ttl=2)
    watcher = members("w", etcd.endpoint)
    await old.start()
    await watcher.start()
    first = watcher.nodes["a"].incarnation
    await old.stop(deregister=False)  # crashed: its key stays until the lease expires
    new = members("a", etcd.endpoint, ttl=2)
    t0 = time.monotonic()
    await new.start()  # default timeout: ttl + 5 s
    assert time.monotonic() - t0 > 0.5
    await until(
        lambda: "a" in watcher.nodes and watcher.nodes["a"].incarnation != first,
        5,
        "the watcher sees the new incarnation",
    )


async def test_start_fails_clearly_without_etcd(members: MemberFactory) -> None:
    m = members("a", f"127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"could not join cluster .* through etcd"):
        await m.start(timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    assert m.state == "stopped"


async def test_second_endpoint_is_used_when_the_first_is_down(
    etcd: EtcdServer, members: MemberFactory
) -> None:
    m = members("a", f"127.0.0.1:{free_port()},{etcd.endpoint}")
    await m.start(timeout=5.0)
    assert m.healthy


async def test_bad_registrations_are_ignored(
    etcd: EtcdServer, members: MemberFactory, cluster_name: str
) -> None:
    import aetcd

    a = members("a", etcd.endpoint)
    await a.start()
    host, port = parse_endpoints(etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        await c.put(f"/fastim-test/{cluster_name}/nodes/junk".encode(), b"not json")
        await c.put(f"/fastim-test/{cluster_name}/nodes/ok".encode(), b'{"node":"ok"}')
        await until(lambda: "ok" in a.nodes, 5, "a sees ok")
        assert "junk" not in a.nodes
        await c.delete(f"/fastim-test/{cluster_name}/nodes/ok".encode())
        await until(lambda: "ok" not in a.nodes, 5, "a sees ok go")
    assert a.healthy


# --------------------------------------------------------------------------- failures


async def _partitioned_pair(
    etcd: EtcdServer, members: MemberFactory, proxies: ProxyFactory, ttl: int = 5
) -> tuple[Membership, Membership, Proxy]:
    """a reaches etcd through a proxy that can cut it off; b reaches etcd directly."""
    proxy = await proxies(etcd.client_port)
    a = members("a", proxy.endpoint, ttl=ttl)
    b = members("b", etcd.endpoint, ttl=ttl)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes and "a" in b.nodes, 5, "a and b see each other")
    return a, b, proxy


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_partitioned_node_keeps_routes_then_resumes_the_watch(
    etcd: EtcdServer, members: MemberFactory, proxies: ProxyFactory
) -> None:
    a, b, proxy = await _partitioned_pair(etcd, members, proxies)
    seen = recorder(a)
    states: list[str] = []
    a.on_state(states.append)
    proxy.cut()
    await until(lambda: a.state == DEGRADED, 5, "a notices it lost etcd")
    assert set(a.nodes) == {"a", "b"}  # known routes are kept
    # meanwhile the cluster changes: c joins, b leaves
    c = members("c", etcd.endpoint)
    await c.start()
    await b.stop()
    await asyncio.sleep(0.3)
    assert set(a.nodes) == {"a", "b"} and seen == []
    relists = a.relists
    proxy.heal()
    await until(lambda: a.state == HEALTHY, 10, "a reconnects")
    await until(lambda: set(a.nodes) == {"a", "c"}, 5, "a catches up")
    assert seen == [("join", "c"), ("leave", "b")]  # in etcd's order, each once
    assert a.relists == relists and a.resumes >= 1  # resumed, not re-listed
    assert a.registrations == 1  # the lease outlived the cut
    assert states == [DEGRADED, HEALTHY]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_compacted_history_is_relisted(
    own_etcd: EtcdServer, members: MemberFactory, proxies: ProxyFactory
) -> None:
    import aetcd

    a, b, proxy = await _partitioned_pair(own_etcd, members, proxies)
    seen = recorder(a)
    proxy.cut()
    await until(lambda: a.state == DEGRADED, 5, "a notices it lost etcd")
    c = members("c", own_etcd.endpoint)
    await c.start()
    await b.stop()
    host, port = parse_endpoints(own_etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as cl:
        rev = (await cl.get_prefix(b"/nothing")).header.revision
        await cl.compact(rev, physical=True)
    relists = a.relists
    proxy.heal()
    await until(lambda: a.state == HEALTHY, 10, "a reconnects")
    # etcd creates a watch from a compacted revision and cancels it at once
    await until(lambda: a.relists == relists + 1, 5, "a lists the cluster again")
    assert set(a.nodes) == {"a", "c"}
    assert sorted(seen) == [("join", "c"), ("leave", "b")]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_node_cut_off_past_its_ttl_registers_again(
    etcd: EtcdServer, members: MemberFactory, proxies: ProxyFactory
) -> None:
    a, b, proxy = await _partitioned_pair(etcd, members, proxies, ttl=2)
    first = b.nodes["a"].incarnation
    seen = recorder(b)
    proxy.cut()
    await until(lambda: "a" not in b.nodes, 8, "b sees a's lease expire")
    assert a.state == DEGRADED and set(a.nodes) == {"a", "b"}
    proxy.heal()
    await until(lambda: "a" in b.nodes, 10, "a registers again")
    assert a.registrations == 2
    assert b.nodes["a"].incarnation > first  # a new incarnation: stale state must go
    assert seen == [("leave", "a"), ("join", "a")]
    await until(lambda: a.state == HEALTHY, 5, "a healthy")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hung_etcd_degrades_then_recovers(
    own_etcd: EtcdServer, members: MemberFactory
) -> None:
    a = members("a", own_etcd.endpoint, ttl=6)
    b = members("b", own_etcd.endpoint, ttl=6)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes, 5, "a sees b")
    own_etcd.pause()
    try:
        took = await until(lambda: a.state == DEGRADED and b.state == DEGRADED, 10, "degraded")
    finally:
        own_etcd.resume()
    assert took < 6.0  # keepalive interval (2 s) + request timeout (2 s), with slack
    assert set(a.nodes) == {"a", "b"} and set(b.nodes) == {"a", "b"}
    await until(lambda: a.healthy and b.healthy, 15, "healthy again")
    assert set(a.nodes) == {"a", "b"}


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_etcd_restart_is_survived(own_etcd: EtcdServer, members: MemberFactory) -> None:
    a = members("a", own_etcd.endpoint, ttl=5)
    b = members("b", own_etcd.endpoint, ttl=5)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes, 5, "a sees b")
    seen = recorder(a)
    own_etcd.stop()
    await until(lambda: a.state == DEGRADED, 5, "a notices")
    own_etcd.start()
    await until(lambda: a.healthy and b.healthy, 15, "healthy again")
    c = members("c", own_etcd.endpoint)
    await c.start()
    await until(lambda: "c" in a.nodes, 5, "a sees c: the watch works again")
    assert set(a.nodes) == {"a", "b", "c"}
    assert ("leave", "b") not in seen
    # etcd renews every lease when its new leader takes over: nobody had to register again
    assert a.registrations == 1 and b.registrations == 1


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_rebuilt_etcd_is_listed_again_and_everyone_registers_again(
    own_etcd: EtcdServer, members: MemberFactory
) -> None:
    a = members("a", own_etcd.endpoint, ttl=3)
    b = members("b", own_etcd.endpoint, ttl=3)
    await a.start()
    await b.start()
    await until(lambda: "b" in a.nodes and "a" in b.nodes, 5, "a and b see each other")
    own_etcd.stop()
    own_etcd.wipe()
    own_etcd.start()  # blocks the loop: a and b may not have noticed anything yet
    await until(lambda: a.registrations == 2 and b.registrations == 2, 15, "registered again")
    await until(lambda: a.relists == 2 and b.relists == 2, 10, "listed again")
    await until(lambda: a.healthy and b.healthy, 10, "healthy again")
    # one may have listed the new etcd before the other registered there: its watch
    # (from the list's revision on) brings that registration a moment later
    await until(lambda: set(a.nodes) == {"a", "b"} == set(b.nodes), 10, "each sees the other again")
    assert a.nodes["b"].incarnation == b.nodes["b"].incarnation  # the new etcd's
