"""Idempotency keys of channel appends (``Store.append_keyed``), on memory, sqlite, redis.

What the hub relies on: a message whose key the channel recorded within the window is
not stored again and is answered with the first one's offset; the key is recorded by
the same atomic step as the append, so a durable store still has it after a restart.
"""

from __future__ import annotations

import asyncio

import pytest

from fastim.store import HistoryLimits, Store

from .conftest import StoreFactory


async def _offsets(store: Store, channel: str) -> list[tuple[int, bytes]]:
    return (await store.read(channel, 0)).messages


async def test_a_recorded_key_is_not_stored_again(store: Store) -> None:
    a = await store.append_keyed("c", [b"1", b"2"], ["k1", "k2"])
    assert (a.offset, a.offsets, a.duplicate) == (1, [1, 2], [False, False])
    b = await store.append_keyed("c", [b"2 again", b"3"], ["k2", "k3"])
    assert (b.offset, b.epoch, b.offsets, b.duplicate) == (3, a.epoch, [2, 3], [True, False])
    c = await store.append_keyed("c", [b"1 again"], ["k1"])
    assert (c.offset, c.offsets, c.duplicate) == (4, [1], [True])  # nothing new: top + 1
    assert await _offsets(store, "c") == [(1, b"1"), (2, b"2"), (3, b"3")]
    assert (await store.state("c")).top == 3


async def test_a_batch_mixes_keyed_unkeyed_and_repeats(store: Store) -> None:
    await store.append_keyed("m", [b"old"], ["seen"])
    got = await store.append_keyed(
        "m",
        [b"a", b"b", b"a twice", b"seen again", b"c", b"d"],
        ["ka", None, "ka", "seen", None, "kd"],
    )
    # new: a (2), b (3), c (4), d (5); "ka" twice: the first counts
    assert got.offset == 2
    assert got.offsets == [2, 3, 2, 1, 4, 5]
    assert got.duplicate == [False, False, True, True, False, False]
    assert [d for _, d in await _offsets(store, "m")] == [b"old", b"a", b"b", b"c", b"d"]


async def test_keys_are_per_channel_and_mix_with_plain_appends(store: Store) -> None:
    await store.append_many("x", [b"1", b"2"])
    assert (await store.append_keyed("x", [b"3"], ["k"])).offsets == [3]
    assert (await store.append_keyed("y", [b"1"], ["k"])).offsets == [1]  # another channel
    assert (await store.append("x", b"4")).offset == 4
    again = await store.append_keyed("x", [b"3"], ["k"])
    assert (again.offset, again.offsets, again.duplicate) == (5, [3], [True])
    none = await store.append_keyed("x", [b"5", b"6"], [None, None])
    assert (none.offset, none.offsets, none.duplicate) == (5, [5, 6], [False, False])
    empty = await store.append_keyed("x", [], [])
    assert (empty.offset, empty.offsets) == (7, [])


async def test_a_key_is_forgotten_after_its_window(store: Store) -> None:
    await store.append_keyed("w", [b"1"], ["k"], window=0.2)
    assert (await store.append_keyed("w", [b"1"], ["k"], window=0.2)).duplicate == [True]
    await asyncio.sleep(0.35)
    later = await store.append_keyed("w", [b"1"], ["k"], window=0.2)
    assert (later.offsets, later.duplicate) == ([2], [False])
    await asyncio.sleep(0.35)
    if store.name != "redis":  # Redis forgets them itself (PEXPIRE, pruned on append)
        assert await store.sweep() >= 1  # the expired key (and nothing of the history)
    assert [o for o, _ in await _offsets(store, "w")] == [1, 2]


async def test_window_zero_records_nothing(store: Store) -> None:
    await store.append_keyed("z", [b"1"], ["k"], window=0)
    assert (await store.append_keyed("z", [b"1"], ["k"], window=0)).offsets == [2]


async def test_a_new_epoch_forgets_the_keys(store: Store) -> None:
    """A key names an offset of the channel's epoch; once the channel moved to another
    epoch (history lost, or restarted), that offset means nothing: the key is void."""
    first = await store.append_keyed("e", [b"1"], ["k"])
    st = await store.restart_epoch("e", first.epoch)
    got = await store.append_keyed("e", [b"1 again"], ["k"])
    assert (got.epoch, got.offsets, got.duplicate) == (st.epoch, [2], [False])


async def test_a_forgotten_channel_forgets_its_keys(make_store: StoreFactory) -> None:
    store = await make_store(HistoryLimits(size=10, meta_ttl=0.2))
    first = await store.append_keyed("f", [b"1"], ["k"])
    await asyncio.sleep(0.35)
    got = await store.append_keyed("f", [b"1"], ["k"])
    assert got.epoch != first.epoch and (got.offsets, got.duplicate) == ([1], [False])


async def test_keys_and_items_must_match(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.append_keyed("v", [b"1", b"2"], ["k"])


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_durable_store_keeps_its_keys_across_a_restart(make_store: StoreFactory) -> None:
    """The key is committed with the append: a store opened again on the same file (or
    Redis) still refuses the repeat, with the offset of the first."""
    store = await make_store()
    a = await store.append_keyed("d", [b"1", b"2"], ["k1", "k2"])
    await store.close()
    again = await make_store()
    got = await again.append_keyed("d", [b"2", b"3"], ["k2", "k3"])
    assert (got.epoch, got.offsets, got.duplicate) == (a.epoch, [2, 3], [True, False])


@pytest.mark.parametrize("kind", ["memory"])
async def test_the_memory_store_forgets_keys_with_its_history(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.append_keyed("d", [b"1"], ["k"])
    await store.close()
    again = await make_store()
    assert (await again.append_keyed("d", [b"1"], ["k"])).duplicate == [False]


@pytest.mark.parametrize("kind", ["sqlite"])
async def test_sqlite_records_the_key_in_the_append_transaction(
    make_store: StoreFactory,
) -> None:
    """Many keyed appends of one tick: one transaction, every key recorded once."""
    store = await make_store()
    calls = [store.append_keyed("g", [b"%d" % i], [f"k{i % 5}"]) for i in range(20)]
    got = await asyncio.gather(*calls)
    assert sum(not r.duplicate[0] for r in got) == 5
    assert [r.offsets[0] for r in got] == [1, 2, 3, 4, 5] * 4
    assert (await store.state("g")).top == 5
