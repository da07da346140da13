"""The store contract: the same assertions against memory, sqlite and redis.

Whatever a store does inside, the hub and sessions rely on exactly these behaviours:
offsets 1, 2, 3 per channel under one epoch, reads of what is kept after an offset,
limits applied exactly, inbox sequences, idempotent sends, cumulative acks.
"""

from __future__ import annotations

import asyncio

import pytest

from fastim.errors import FastimError
from fastim.store import (
    AckOutOfRange,
    HistoryLimits,
    InboxFull,
    InboxLimits,
    Store,
    StoreError,
    StoreUnavailable,
)

from .conftest import StoreFactory

# ------------------------------------------------------------------------ channel history


async def test_new_channel_has_a_stable_epoch_that_the_first_message_keeps(store: Store) -> None:
    st = await store.state("news")
    assert st.top == 0 and isinstance(st.epoch, str) and st.epoch
    assert await store.state("news") == st
    h = await store.read("news", 0)
    assert (h.epoch, h.top, h.messages) == (st.epoch, 0, [])
    assert await store.append("news", b"1") == (1, st.epoch)


async def test_offsets_are_consecutive_from_one(store: Store) -> None:
    got = [await store.append("c", b'{"n":%d}' % i) for i in range(1, 11)]
    epoch = got[0].epoch
    assert got == [(i, epoch) for i in range(1, 11)]
    assert await store.state("c") == (epoch, 10)


async def test_restart_epoch_is_a_compare_and_set_that_keeps_history(store: Store) -> None:
    """A store restored from an older snapshot keeps its epoch; the node moves the
    channel to a new one. Messages and top stay, offsets continue; only the caller that
    saw the current epoch changes it (two nodes noticing at once give one new epoch)."""
    first = await store.append_many("r", [b"1", b"2", b"3"])
    old = first.epoch
    st = await store.restart_epoch("r", old)
    assert st.top == 3 and st.epoch != old
    assert await store.restart_epoch("r", old) == st  # the second caller: unchanged
    assert await store.state("r") == st
    h = await store.read("r", 0)
    assert (h.epoch, [o for o, _ in h.messages]) == (st.epoch, [1, 2, 3])
    assert await store.append("r", b"4") == (4, st.epoch)
    # a channel never seen gets its first epoch, not a restart
    fresh = await store.restart_epoch("never", "no-such-epoch")
    assert fresh.top == 0 and await store.state("never") == fresh


async def test_peek_reads_without_creating(store: Store) -> None:
    """A read for an outside reader (the HTTP API's history) must not create a channel:
    None for a channel never seen, however often; once it exists, what read returns."""
    assert await store.peek("ghost", 0) is None
    assert await store.peek("ghost", 0) is None  # the first peek created nothing
    st = await store.state("ghost")  # state and read create the epoch
    assert await store.peek("ghost", 0) == (st.epoch, 0, [])
    await store.append_many("p", [b"1", b"2", b"3"])
    assert await store.peek("p", 1, 1) == await store.read("p", 1, 1)
    assert await store.peek("p", 0) == await store.read("p", 0)


async def test_peek_of_a_forgotten_channel_is_none(make_store: StoreFactory) -> None:
    store = await make_store(HistoryLimits(size=10, ttl=0.2, meta_ttl=0.3))
    await store.append("q", b"1")
    assert (await store.peek("q", 0)) is not None
    await asyncio.sleep(0.45)  # past meta_ttl since the append: the channel is forgotten
    assert await store.peek("q", 0) is None
    assert await store.peek("q", 0) is None


async def test_read_returns_messages_after_since_in_order(store: Store) -> None:
    for i in range(1, 21):
        await store.append("c", b"m%d" % i)
    h = await store.read("c", 0)
    assert h.top == 20
    assert h.messages == [(i, b"m%d" % i) for i in range(1, 21)]
    assert (await store.read("c", 15)).messages == [(i, b"m%d" % i) for i in range(16, 21)]
    assert (await store.read("c", 20)).messages == []
    assert (await store.read("c", 99)).messages == []


async def test_read_pages_with_limit(store: Store) -> None:
    await store.append_many("c", [b"%d" % i for i in range(1, 26)])
    seen: list[int] = []
    since = 0
    while True:
        h = await store.read("c", since, limit=7)
        assert len(h.messages) <= 7
        if not h.messages:
            break
        seen += [off for off, _ in h.messages]
        since = h.messages[-1][0]
    assert seen == list(range(1, 26))
    assert (await store.read("c", 0, limit=0)).messages == []


async def test_append_many_is_consecutive_and_mixes_with_append(store: Store) -> None:
    a = await store.append("c", b"a")
    b = await store.append_many("c", [b"b1", b"b2", b"b3"])
    c = await store.append("c", b"c")
    assert (a.offset, b.offset, c.offset) == (1, 2, 5)
    assert a.epoch == b.epoch == c.epoch
    empty = await store.append_many("c", [])
    assert empty == (6, a.epoch)
    h = await store.read("c", 0)
    assert h.top == 5
    assert h.messages == [(1, b"a"), (2, b"b1"), (3, b"b2"), (4, b"b3"), (5, b"c")]


async def test_channels_are_independent(store: Store) -> None:
    await store.append("a", b"a1")
    await store.append("a", b"a2")
    await store.append("b", b"b1")
    assert (await store.read("a", 0)).messages == [(1, b"a1"), (2, b"a2")]
    assert (await store.read("b", 0)).messages == [(1, b"b1")]


async def test_data_and_names_round_trip_exactly(store: Store) -> None:
    blob = bytes(range(256)) * 4
    names = ["é/ü", "{tag}x", "a}b{c", "with space", "x" * 200, "\u2603"]
    for name in names:
        assert (await store.append(name, blob)).offset == 1
        assert (await store.append(name, b"")).offset == 2
    for name in names:
        assert (await store.read(name, 0)).messages == [(1, blob), (2, b"")]


async def test_concurrent_appends_get_unique_offsets(make_store: StoreFactory) -> None:
    store = await make_store(HistoryLimits(size=1000))
    results = await asyncio.gather(*(store.append("c", b"%d" % i) for i in range(200)))
    offsets = sorted(r.offset for r in results)
    assert offsets == list(range(1, 201))
    by_offset = {r.offset: b"%d" % i for i, r in enumerate(results)}
    h = await store.read("c", 0, limit=1000)
    assert h.messages == sorted(by_offset.items())


async def test_count_limit_keeps_the_last_messages(make_store: StoreFactory) -> None:
    s = await make_store(HistoryLimits(size=5))
    for i in range(1, 301):
        await s.append("c", b"%d" % i)
    h = await s.read("c", 0)
    assert h.top == 300
    assert h.messages == [(i, b"%d" % i) for i in range(296, 301)]
    assert (await s.read("c", 297)).messages == [(298, b"298"), (299, b"299"), (300, b"300")]
    # per-call limits win over the store's defaults
    h = await s.read("c", 0, limits=HistoryLimits(size=2))
    assert [off for off, _ in h.messages] == [299, 300]


async def test_size_zero_keeps_no_history_but_counts(make_store: StoreFactory) -> None:
    s = await make_store(HistoryLimits(size=0))
    for i in range(1, 41):
        assert (await s.append("c", b"x")).offset == i
    h = await s.read("c", 0)
    assert (h.top, h.messages) == (40, [])


async def test_age_limit(make_store: StoreFactory) -> None:
    s = await make_store(HistoryLimits(size=100, ttl=0.4))
    await s.append("c", b"old")
    await asyncio.sleep(0.6)
    h = await s.read("c", 0)
    assert (h.top, h.messages) == (1, [])  # expired, not yet deleted: still invisible
    await s.append("c", b"new")
    h = await s.read("c", 0)
    assert (h.top, h.messages) == (2, [(2, b"new")])


async def test_quiet_channel_keeps_its_epoch_until_meta_ttl(make_store: StoreFactory) -> None:
    s = await make_store(HistoryLimits(size=10, ttl=0.2, meta_ttl=0.8))
    first = await s.append("c", b"a")
    await asyncio.sleep(0.35)  # the message expired; the epoch and top did not
    assert await s.state("c") == (first.epoch, 1)
    await asyncio.sleep(0.75)  # past meta_ttl since the append: the channel is forgotten
    st = await s.state("c")
    assert st.top == 0 and st.epoch != first.epoch
    again = await s.append("c", b"b")
    assert again[:3] == (1, st.epoch)
    assert (await s.read("c", 0)).messages == [(1, b"b")]


#: what sweep deletes, by store: memory counts forgotten channels, expired messages of
#: the channels it keeps and expired dedup entries; sqlite forgotten channels and dedup
#: rows (reads skip expired messages, appends trim them); Redis nothing (its keys expire
#: by themselves: PEXPIRE on channels, dedup entries pruned at the user's next send)
SWEPT = {"memory": 3, "sqlite": 2, "redis": 0}


async def test_sweep_deletes_what_expired_and_keeps_what_is_live(
    make_store: StoreFactory, kind: str
) -> None:
    short = HistoryLimits(size=10, ttl=0.2, meta_ttl=0.3)  # the store's default
    quiet = HistoryLimits(size=10, ttl=0.2, meta_ttl=60)  # messages expire, the epoch stays
    long = HistoryLimits(size=10)
    s = await make_store(short, InboxLimits(dedup_window=0.4))
    gone = await s.append("gone", b"x")
    still = await s.append("quiet", b"q", limits=quiet)
    old = await s.inbox_append("u", b"m", "cid", "snd")
    await asyncio.sleep(0.5)  # past meta_ttl, ttl and the dedup window of all three
    live = await s.append("live", b"y", limits=long)
    kept = await s.inbox_append("v", b"m", "cid", "snd")
    assert await s.sweep() == SWEPT[kind]
    assert await s.sweep() == 0  # nothing left to delete
    # the live ones are kept
    assert await s.read("live", 0, limits=long) == (live.epoch, 1, [(1, b"y")])
    again = await s.inbox_append("v", b"m", "cid", "snd")
    assert again[:3] == (kept.seq, kept.msg_id, True)
    # a quiet channel keeps its epoch and top, its expired message is gone
    assert await s.read("quiet", 0, limits=quiet) == (still.epoch, 1, [])
    # the forgotten channel starts again; the expired dedup entry no longer matches
    st = await s.state("gone")
    assert st.top == 0 and st.epoch != gone.epoch
    assert (await s.inbox_state("u"))[:2] == (0, 1)
    resent = await s.inbox_append("u", b"m", "cid", "snd")
    assert not resent.duplicate and resent.seq == 2 and resent.msg_id != old.msg_id


async def test_bad_read_arguments(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.read("c", -1)
    with pytest.raises(ValueError):
        await store.read("c", 0, limit=-1)


# --------------------------------------------------------------------------------- inboxes


async def test_inbox_sequences_and_ids(store: Store) -> None:
    assert (await store.inbox_state("bob"))[:2] == (0, 0)
    assert await store.inbox_read("bob", 0) == []
    sent = [await store.inbox_append("bob", b"m%d" % i, sender="alice") for i in range(1, 6)]
    assert [s.seq for s in sent] == [1, 2, 3, 4, 5]
    assert not any(s.duplicate for s in sent)
    assert len({s.msg_id for s in sent}) == 5
    msgs = await store.inbox_read("bob", 0)
    assert [(m.seq, m.msg_id, m.sender, m.data) for m in msgs] == [
        (s.seq, s.msg_id, "alice", b"m%d" % s.seq) for s in sent
    ]
    assert [m.seq for m in await store.inbox_read("bob", 3)] == [4, 5]
    assert [m.seq for m in await store.inbox_read("bob", 0, limit=2)] == [1, 2]
    assert (await store.inbox_state("bob"))[:2] == (0, 5)
    assert await store.inbox_read("carol", 0) == []


async def test_inbox_sender_none_and_empty_are_kept_apart(store: Store) -> None:
    await store.inbox_append("u", b"a")
    await store.inbox_append("u", b"b", sender="")
    msgs = await store.inbox_read("u", 0)
    assert [m.sender for m in msgs] == [None, ""]


async def test_inbox_ack_is_cumulative(store: Store) -> None:
    for i in range(5):
        await store.inbox_append("u", b"%d" % i)
    assert (await store.inbox_ack("u", 3))[:2] == (3, 5)
    assert [m.seq for m in await store.inbox_read("u", 0)] == [4, 5]
    assert (await store.inbox_ack("u", 2))[:2] == (3, 5)  # below: no-op
    assert (await store.inbox_ack("u", 3))[:2] == (3, 5)
    assert (await store.inbox_state("u"))[:2] == (3, 5)
    with pytest.raises(AckOutOfRange) as e:
        await store.inbox_ack("u", 6)
    assert "above the last sequence 5" in str(e.value)
    assert (await store.inbox_state("u"))[:2] == (3, 5)
    assert (await store.inbox_ack("u", 5))[:2] == (5, 5)
    assert await store.inbox_read("u", 0) == []
    assert (await store.inbox_append("u", b"next")).seq == 6
    assert (await store.inbox_ack("nobody", 0))[:2] == (0, 0)
    with pytest.raises(AckOutOfRange):
        await store.inbox_ack("nobody", 1)


async def test_inbox_send_is_idempotent_by_sender_and_client_id(store: Store) -> None:
    first = await store.inbox_append("u", b"hello", client_msg_id="c1", sender="alice")
    again = await store.inbox_append("u", b"hello", client_msg_id="c1", sender="alice")
    assert again[:3] == (first.seq, first.msg_id, True)
    other_sender = await store.inbox_append("u", b"x", client_msg_id="c1", sender="bob")
    anonymous = await store.inbox_append("u", b"y", client_msg_id="c1")
    anonymous2 = await store.inbox_append("u", b"y", client_msg_id="c1")
    other_user = await store.inbox_append("v", b"z", client_msg_id="c1", sender="alice")
    assert not other_sender.duplicate and other_sender.seq == 2
    assert not anonymous.duplicate and anonymous.seq == 3
    assert anonymous2[:3] == (3, anonymous.msg_id, True)
    assert not other_user.duplicate and other_user.seq == 1
    assert [m.seq for m in await store.inbox_read("u", 0)] == [1, 2, 3]
    # still recognised after the message was acknowledged and dropped
    await store.inbox_ack("u", 3)
    assert (await store.inbox_append("u", b"hello", "c1", "alice"))[:3] == (1, first.msg_id, True)
    # no client id: never deduplicated
    a = await store.inbox_append("u", b"same")
    b = await store.inbox_append("u", b"same")
    assert (a.seq, b.seq) == (4, 5)


async def test_concurrent_retries_store_once(store: Store) -> None:
    results = await asyncio.gather(
        *(store.inbox_append("u", b"m", client_msg_id="c", sender="s") for _ in range(20))
    )
    assert len({(r.seq, r.msg_id) for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert (await store.inbox_state("u"))[:2] == (0, 1)


async def test_dedup_window_expires(make_store: StoreFactory) -> None:
    s = await make_store(inbox=InboxLimits(max_unacked=100, dedup_window=0.3))
    first = await s.inbox_append("u", b"m", "c1", "alice")
    assert (await s.inbox_append("u", b"m", "c1", "alice")).duplicate
    await asyncio.sleep(0.45)
    late = await s.inbox_append("u", b"m", "c1", "alice")
    assert not late.duplicate and late.seq == 2 and late.msg_id != first.msg_id


async def test_inbox_full_refuses_until_acked(make_store: StoreFactory) -> None:
    s = await make_store(inbox=InboxLimits(max_unacked=3))
    sent = [await s.inbox_append("u", b"%d" % i, f"c{i}", "a") for i in range(3)]
    with pytest.raises(InboxFull) as e:
        await s.inbox_append("u", b"more", "c9", "a")
    assert "inbox of 'u' is full: 3 unacknowledged messages" in str(e.value)
    assert (await s.inbox_state("u"))[:2] == (0, 3)
    # a retry of a stored message is still answered while full
    assert (await s.inbox_append("u", b"0", "c0", "a"))[:3] == (1, sent[0].msg_id, True)
    await s.inbox_ack("u", 1)
    assert (await s.inbox_append("u", b"more", "c9", "a")).seq == 4


async def test_inbox_epoch_is_given_at_the_first_send_and_kept(store: Store) -> None:
    """An inbox gets its epoch when it is created and every result carries it: the
    node hands it to clients with each message, so they tell a new numbering (after
    the store lost the inbox) from copies of messages they already have."""
    assert await store.inbox_state("bob") == (0, 0, "")  # nothing created by a read
    first = await store.inbox_append("bob", b"1", "c1", "alice")
    epoch = first.epoch
    assert isinstance(epoch, str) and len(epoch) >= 8
    assert (await store.inbox_append("bob", b"2")).epoch == epoch
    assert (await store.inbox_append("bob", b"1", "c1", "alice")) == (1, first.msg_id, True, epoch)
    assert await store.inbox_state("bob") == (0, 2, epoch)
    assert {m.epoch for m in await store.inbox_read("bob", 0)} == {epoch}
    assert await store.inbox_ack("bob", 1, epoch) == (1, 2, epoch)
    assert (await store.inbox_append("carol", b"x")).epoch != epoch  # one per inbox


async def test_inbox_ack_of_another_epoch_changes_nothing(store: Store) -> None:
    """A client acknowledging by the old numbering must not acknowledge messages of the
    new one that it has never seen (their seqs overlap)."""
    e = (await store.inbox_append("u", b"1")).epoch
    await store.inbox_append("u", b"2")
    assert await store.inbox_ack("u", 2, "0123456789ab") == (0, 2, e)
    assert [m.seq for m in await store.inbox_read("u", 0)] == [1, 2]
    assert await store.inbox_ack("u", 99, "0123456789ab") == (0, 2, e)  # not out of range
    assert await store.inbox_ack("nobody", 5, "0123456789ab") == (0, 0, "")
    assert await store.inbox_ack("u", 1) == (1, 2, e)  # no epoch: as before
    with pytest.raises(AckOutOfRange):
        await store.inbox_ack("u", 3, e)


async def test_inbox_restart_epoch_is_a_compare_and_set_that_keeps_the_inbox(
    store: Store,
) -> None:
    """A store restored from an older backup keeps the inbox's epoch with a lower top;
    the node moves the inbox to a new epoch. Messages, acked and top stay."""
    old = (await store.inbox_append("u", b"1")).epoch
    await store.inbox_append("u", b"2")
    await store.inbox_ack("u", 1)
    st = await store.inbox_restart_epoch("u", old)
    assert st.epoch not in ("", old) and st[:2] == (1, 2)
    assert await store.inbox_restart_epoch("u", old) == st  # the second caller: unchanged
    assert await store.inbox_state("u") == st
    assert [(m.seq, m.epoch) for m in await store.inbox_read("u", 0)] == [(2, st.epoch)]
    nxt = await store.inbox_append("u", b"3")
    assert (nxt.seq, nxt.epoch) == (3, st.epoch)
    assert await store.inbox_restart_epoch("never", "x") == (0, 0, "")
    assert await store.inbox_state("never") == (0, 0, "")


def test_errors_form_one_tree() -> None:
    for cls in (StoreUnavailable, InboxFull, AckOutOfRange):
        assert issubclass(cls, StoreError)
    assert issubclass(StoreError, FastimError)


async def test_closed_store_refuses(make_store: StoreFactory) -> None:
    s = await make_store()
    await s.append("c", b"x")
    await s.close()
    await s.close()  # idempotent
    for call in (
        s.append("c", b"y"),
        s.read("c", 0),
        s.state("c"),
        s.inbox_append("u", b"m"),
        s.inbox_ack("u", 0),
    ):
        with pytest.raises(StoreUnavailable, match="closed"):
            await call


async def test_context_manager_closes(make_store: StoreFactory) -> None:
    s = await make_store()
    async with s as same:
        assert same is s
        await s.append("c", b"x")
    with pytest.raises(StoreUnavailable):
        await s.append("c", b"y")
