"""User routes against a real etcd: batched writes under the node's lease, the cluster map
kept by a watch, and what happens when a node crashes, its lease is replaced, or etcd
restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from fastim.cluster.membership import Membership, parse_endpoints
from fastim.cluster.users import UserRoutes, users_prefix

from ._etcd import EtcdServer

MemberFactory = Callable[..., Membership]


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture
async def routes_of() -> AsyncIterator[Callable[..., UserRoutes]]:
    made: list[UserRoutes] = []

    def make(m: Membership, **kw: object) -> UserRoutes:
        r = UserRoutes(m, backoff=(0.05, 0.5), **kw)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


async def etcd_keys(endpoint: str, prefix: str) -> dict[str, int]:
    """key → lease of every key under ``prefix``, read with a plain etcd client."""
    import aetcd  # type: ignore[import-untyped]

    host, port = parse_endpoints(endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        r = await c.get_prefix(prefix.encode())
        return {bytes(kv.key).decode()[len(prefix) :]: int(kv.lease) for kv in r}


async def test_routes_are_written_in_batches_under_the_node_lease(
    etcd: EtcdServer,
    members: MemberFactory,
    routes_of: Callable[..., UserRoutes],
    cluster_name: str,
) -> None:
    a = members("a", etcd.endpoint)
    await a.start()
    registered: list[str] = []
    ra = routes_of(a, on_registered=registered.extend)
    await ra.start()
    users = [f"user-{i}" for i in range(200)] + ["with/slash"]
    for u in users:  # one tick: 201 attaches
        ra.add(u)
        ra.add(u)  # a second connection of the same user: still one key
    await until(lambda: all(ra.is_registered(u) for u in users), 5, "all routes written")
    # 201 puts in transactions of at most 64 operations: 4 transactions, not 201
    assert ra.puts == 201 and ra.txns == 4, ra.status()
    assert sorted(registered) == sorted(users)
    prefix = users_prefix("/fastim-test", cluster_name)
    keys = await etcd_keys(etcd.endpoint, prefix)
    assert set(keys) == {f"{u}/a" for u in users}
    assert set(keys.values()) == {a.lease_id}  # bound to the node's lease
    await until(lambda: len(ra.routes) == 201, 5, "own routes seen by the watch")
    assert ra.nodes_of("with/slash") == {"a"} and ra.nodes_of("nobody") == frozenset()

    # 100 users leave; 50 of them come back within the same batch window: 50 deletes
    txns = ra.txns
    for u in users[:100]:
        ra.discard(u)
    for u in users[:50]:
        ra.add(u)
    await until(lambda: ra.pending == 0 and ra.deletes == 50, 5, "the deletes written")
    assert ra.txns == txns + 1 and ra.puts == 201
    keys = await etcd_keys(etcd.endpoint, prefix)
    assert set(keys) == {f"{u}/a" for u in users[:50] + users[100:]}
    await until(lambda: "user-60" not in ra.routes, 5, "the watch saw the deletes")
    assert ra.nodes_of("user-10") == {"a"}


async def test_two_nodes_see_each_others_users_and_a_crash_removes_them(
    etcd: EtcdServer, members: MemberFactory, routes_of: Callable[..., UserRoutes]
) -> None:
    a = members("a", etcd.endpoint)
    b = members("b", etcd.endpoint, ttl=2)
    c = members("c", etcd.endpoint, ttl=30)
    for m in (a, b, c):
        await m.start()
    ra, rb, rc = routes_of(a), routes_of(b), routes_of(c)
    ra.add("alice")
    ra.add("bob")
    await ra.start()  # users added before start are written once it is up
    await rb.start()
    await rc.start()
    rb.add("bob")
    rb.add("carol")
    rc.add("dave")
    # Each node's map is kept by its own watch: each converges on its own, so each is waited
    # for (a seeing a route says nothing of when c's watch delivers it).
    await until(
        lambda: ra.nodes_of("bob") == {"a", "b"} and ra.nodes_of("dave") == {"c"},
        5,
        "a sees b's and c's users",
    )
    await until(
        lambda: rb.nodes_of("alice") == {"a"} and rb.nodes_of("carol") == {"b"},
        5,
        "b sees a's users (written before b started) and its own",
    )
    await until(lambda: rc.nodes_of("bob") == {"a", "b"}, 5, "c sees bob on a and b")

    # b crashes (no deregistration): its routes go when its 2 s lease expires
    await rb.stop()
    await b.stop(deregister=False)
    took = await until(lambda: ra.nodes_of("carol") == frozenset(), 8, "b's routes expire")
    assert ra.nodes_of("bob") == {"a"} and rc.nodes_of("bob") == {"a"}
    assert took > 0.5  # it was the lease, not a delete

    # c stops gracefully: membership revokes its 30 s lease, its routes go at once
    await rc.stop()
    await c.stop()
    took = await until(lambda: ra.nodes_of("dave") == frozenset(), 5, "c's routes revoked")
    assert took < 3.0


async def test_a_replaced_lease_gets_every_route_again(
    etcd: EtcdServer, members: MemberFactory, routes_of: Callable[..., UserRoutes]
) -> None:
    """Membership registers again under a new lease when its lease is gone (here revoked
    behind its back, as an expiry during a partition looks): the routes follow."""
    import aetcd

    a = members("a", etcd.endpoint)
    b = members("b", etcd.endpoint, ttl=3)
    await a.start()
    await b.start()
    ra, rb = routes_of(a), routes_of(b)
    await ra.start()
    await rb.start()
    for u in ("u1", "u2", "u3"):
        rb.add(u)
    await until(lambda: ra.nodes_of("u3") == {"b"}, 5, "a sees b's users")
    old = b.lease_id
    host, port = parse_endpoints(etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as cl:
        await cl.revoke_lease(old)
    await until(lambda: b.lease_id not in (0, old), 8, "b registers under a new lease")
    await until(lambda: all(rb.is_registered(u) for u in ("u1", "u2", "u3")), 5, "routes rewritten")
    await until(lambda: ra.nodes_of("u1") == {"b"}, 5, "a sees b's users again")
    assert rb.reregistrations >= 1
    assert all(ra.nodes_of(u) == {"b"} for u in ("u1", "u2", "u3"))


async def test_routes_resume_after_an_etcd_restart(
    own_etcd: EtcdServer, members: MemberFactory, routes_of: Callable[..., UserRoutes]
) -> None:
    a = members("a", own_etcd.endpoint, ttl=5)
    b = members("b", own_etcd.endpoint, ttl=5)
    await a.start()
    await b.start()
    ra, rb = routes_of(a), routes_of(b)
    await ra.start()
    await rb.start()
    rb.add("x")
    rb.add("y")
    await until(lambda: ra.nodes_of("y") == {"b"}, 5, "a sees b's users")
    relists = ra.relists

    own_etcd.stop()
    await until(lambda: not ra.healthy and not rb.healthy, 8, "both notice etcd is gone")
    assert ra.nodes_of("x") == {"b"}  # routes kept while etcd is away
    rb.discard("x")  # changes while etcd is down wait in the batch
    rb.add("z")
    await asyncio.sleep(0.2)
    assert rb.pending == 2
    own_etcd.start()
    await until(
        lambda: ra.nodes_of("z") == {"b"} and ra.nodes_of("x") == frozenset(),
        15,
        "a sees b's changes made while etcd was down",
    )
    assert ra.healthy and rb.healthy
    assert ra.resumes >= 1 and ra.relists == relists  # resumed, not listed again
    assert ra.nodes_of("y") == {"b"}


async def test_compacted_revision_is_relisted(
    own_etcd: EtcdServer, members: MemberFactory, routes_of: Callable[..., UserRoutes]
) -> None:
    """A watch resumed at a compacted revision is refused: the map is listed again and
    still ends up right."""
    import aetcd

    from ._proxy import Proxy

    proxy = Proxy(own_etcd.client_port)
    await proxy.start()
    try:
        a = members("a", proxy.endpoint, ttl=5)
        b = members("b", own_etcd.endpoint, ttl=5)
        await a.start()
        await b.start()
        ra, rb = routes_of(a), routes_of(b)
        await ra.start()
        await rb.start()
        rb.add("p")
        await until(lambda: ra.nodes_of("p") == {"b"}, 5, "a sees p")
        relists = ra.relists
        proxy.cut()
        await until(lambda: not ra.healthy, 8, "a cut off")
        rb.discard("p")
        rb.add("q")
        await until(lambda: rb.pending == 0, 5, "b wrote its changes")
        host, port = parse_endpoints(own_etcd.endpoint)[0]
        async with aetcd.Client(host=host, port=port, timeout=2) as cl:
            for i in range(5):
                await cl.put(b"/filler", str(i).encode())
            rev = (await cl.get(b"/filler")).mod_revision
            await cl.compact(rev, physical=True)
        proxy.heal()
        await until(
            lambda: ra.nodes_of("q") == {"b"} and ra.nodes_of("p") == frozenset(),
            15,
            "a relists after compaction",
        )
        assert ra.relists > relists
    finally:
        await proxy.close()
