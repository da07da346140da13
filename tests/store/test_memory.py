"""What only the memory store does: a new epoch per process, and a sweep that frees."""

from __future__ import annotations

from fastim.store import HistoryLimits, InboxLimits, MemoryStore


async def test_a_new_process_is_a_new_epoch() -> None:
    a, b = MemoryStore(), MemoryStore()
    ea = (await a.append("c", b"x")).epoch
    eb = (await b.append("c", b"x")).epoch
    assert ea != eb
    # inboxes too: a restarted node numbers them from 1 again, in a new epoch
    ia = await a.inbox_append("bob", b"x")
    ib = await b.inbox_append("bob", b"x")
    assert ia.seq == ib.seq == 1 and ia.epoch != ib.epoch


async def test_sweep_frees_expired_messages_channels_and_dedup_keys() -> None:
    now = [0.0]
    s = MemoryStore(
        HistoryLimits(size=100, ttl=10, meta_ttl=60), InboxLimits(dedup_window=30), lambda: now[0]
    )
    for i in range(5):
        await s.append("quiet", b"%d" % i)
    await s.inbox_append("u", b"m", "c1", "a")
    now[0] = 11.0
    await s.append("busy", b"x")
    assert await s.sweep() == 5  # the five expired messages of "quiet"
    assert len(s._channels["quiet"].msgs) == 0
    assert (await s.state("quiet")).top == 5  # its epoch and top stay
    now[0] = 31.0
    assert await s.sweep() == 2  # the dedup key, and the message of "busy"
    now[0] = 61.0
    assert await s.sweep() == 1  # "quiet" itself (its state() at t=11 did not renew it)
    assert "quiet" not in s._channels and "busy" in s._channels
    assert (await s.inbox_state("u"))[:2] == (0, 1)
