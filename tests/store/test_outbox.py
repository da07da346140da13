"""The event outbox of each store (fastim.backend, docs/events.md): order, removal only
by key, the arm/disarm bookkeeping that makes a node's crash lose no disconnect, claims
of dead nodes (once), the sender lease. The same assertions against memory, sqlite, redis.
"""

from __future__ import annotations

import asyncio

import orjson

from fastim.store import OutboxItem, Store

from .conftest import StoreFactory


def _ev(n: int) -> bytes:
    return orjson.dumps({"id": f"e{n}", "n": n})


async def test_events_come_out_in_order_and_stay_until_removed(store: Store) -> None:
    assert await store.outbox_add([OutboxItem(_ev(i)) for i in range(5)]) == 5
    assert await store.outbox_add([OutboxItem(_ev(5))]) == 1
    got = await store.outbox_read(4)
    assert [orjson.loads(e.data)["n"] for e in got] == [0, 1, 2, 3]
    assert (await store.outbox_read(4)) == got  # reading removes nothing
    st = await store.outbox_stats()
    assert st.depth == 6 and st.oldest is not None
    await store.outbox_remove([e.key for e in got[:2]])
    rest = await store.outbox_read(100)
    assert [orjson.loads(e.data)["n"] for e in rest] == [2, 3, 4, 5]
    await store.outbox_remove([e.key for e in rest] + [got[0].key])  # a stale key: ignored
    assert await store.outbox_read(100) == []
    assert (await store.outbox_stats()).depth == 0
    assert (await store.outbox_stats()).oldest is None


async def test_a_disarmed_key_adds_its_event_once(store: Store) -> None:
    conn = OutboxItem(b'{"t":"connect"}', arm=("c:1", "n1", 1, b'{"t":"lost"'))
    assert await store.outbox_add([conn]) == 1
    assert (await store.outbox_stats()).armed == 1
    bye = OutboxItem(b'{"t":"disconnect"}', disarm="c:1")
    assert await store.outbox_add([bye]) == 1
    assert await store.outbox_add([bye]) == 0  # not armed any more: nothing added
    assert [e.data for e in await store.outbox_read(10)] == [
        b'{"t":"connect"}',
        b'{"t":"disconnect"}',
    ]
    assert (await store.outbox_stats()).armed == 0


async def test_a_dead_nodes_armed_events_are_claimed_once_leaves_first(store: Store) -> None:
    await store.outbox_beat("alive", 60)
    await store.outbox_beat("dead", 0.05)
    await store.outbox_add(
        [
            OutboxItem(b"c1", arm=("c:1", "dead", 1, b'{"type":"disconnect","client":"1"')),
            OutboxItem(b"j1", arm=("p:1", "dead", 0, b'{"type":"leave","client":"1"')),
            OutboxItem(b"c2", arm=("c:2", "alive", 1, b'{"type":"disconnect","client":"2"')),
        ]
    )
    await asyncio.sleep(0.15)
    assert await store.outbox_claim() == 2
    assert await store.outbox_claim() == 0  # once
    data = [e.data for e in await store.outbox_read(10)]
    assert data[:3] == [b"c1", b"j1", b"c2"]
    lost = [orjson.loads(d) for d in data[3:]]
    assert [e["type"] for e in lost] == ["leave", "disconnect"]
    assert all(isinstance(e["time"], int) and e["time"] > 0 for e in lost)
    # the dead node's own disconnect, late (it was only stalled): not a second one
    assert await store.outbox_add([OutboxItem(b"late", disarm="c:1")]) == 0
    assert (await store.outbox_stats()).armed == 1


async def test_the_lease_has_one_holder_until_it_expires(store: Store) -> None:
    assert await store.outbox_lease("a", 0.2)
    assert not await store.outbox_lease("b", 0.2)
    assert await store.outbox_lease("a", 0.2)  # renewed
    await asyncio.sleep(0.3)
    assert await store.outbox_lease("b", 5)  # a stopped renewing: b takes over
    assert not await store.outbox_lease("a", 5)
    assert not await store.outbox_lease("b", 0)  # released
    assert await store.outbox_lease("a", 5)


async def test_the_outbox_survives_a_restart(make_store: StoreFactory, kind: str) -> None:
    s = await make_store()
    await s.outbox_add([OutboxItem(_ev(i)) for i in range(3)])
    await s.close()
    s2 = await make_store()
    got = await s2.outbox_read(10)
    assert len(got) == (0 if kind == "memory" else 3)
