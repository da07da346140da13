"""Model-based tests: random appends, reads, clock jumps, inbox sends and acks, applied to
a store and to a plain-Python reference model; every answer must match.

Runs against the memory and sqlite stores with a fake clock (Redis keeps its own time,
so its store is covered by the contract suite instead). The limits are tiny so that count
trimming, age expiry, forgetting, full inboxes and dedup expiry all happen within a few
steps.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fastim.store import (
    AckOutOfRange,
    HistoryLimits,
    InboxFull,
    InboxLimits,
    MemoryStore,
    Store,
)
from fastim.store.base import dedup_key
from fastim.store.sqlite import SqliteStore

LIMITS = HistoryLimits(size=4, ttl=10.0, meta_ttl=25.0)
INBOX = InboxLimits(max_unacked=5, dedup_window=30.0)
CHANNELS = st.sampled_from(["a", "b"])
USERS = st.sampled_from(["u", "v"])
DATA = st.binary(max_size=6)


@dataclass
class MChannel:
    epoch: int
    touched: float
    top: int = 0
    msgs: list[tuple[int, float, bytes]] = field(default_factory=list)


@dataclass
class MInbox:
    top: int = 0
    acked: int = 0
    msgs: list[tuple[int, str, str | None, bytes]] = field(default_factory=list)
    dedup: dict[str, tuple[int, str, float]] = field(default_factory=dict)
    epoch: str = ""  # given by the store at the first send, then never changes


class StoreMachine(RuleBasedStateMachine):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.loop = asyncio.new_event_loop()
        self.tmp: str | None = None
        self.store: Store
        if self.kind == "memory":
            self.store = MemoryStore(LIMITS, INBOX, clock=self.clock)
        else:
            self.tmp = tempfile.mkdtemp()
            self.store = self.run(
                SqliteStore.open(f"{self.tmp}/m.db", LIMITS, INBOX, clock=self.clock)
            )
        self.channels: dict[str, MChannel] = {}
        self.epochs = 0
        #: model epoch number -> the store's epoch string, learnt on first sight
        self.names: dict[int, str] = {}
        self.inboxes: dict[str, MInbox] = {}

    def clock(self) -> float:
        return self.now

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------------- the model

    def channel(self, name: str) -> MChannel:
        ch = self.channels.get(name)
        if ch is None or (LIMITS.meta_ttl is not None and self.now - ch.touched >= LIMITS.meta_ttl):
            self.epochs += 1
            ch = self.channels[name] = MChannel(self.epochs, self.now)
        return ch

    def same_epoch(self, model: int, actual: str) -> None:
        known = self.names.setdefault(model, actual)
        assert known == actual, "the epoch changed without a loss of history"
        assert list(self.names.values()).count(actual) == 1, "an epoch was reused"

    def visible(self, ch: MChannel, since: int, limit: int) -> list[tuple[int, bytes]]:
        assert LIMITS.ttl is not None
        lo = max(since, ch.top - LIMITS.size)
        cutoff = self.now - LIMITS.ttl
        return [(o, d) for o, ts, d in ch.msgs if o > lo and ts > cutoff][:limit]

    # --------------------------------------------------------------------------- channels

    @rule(name=CHANNELS, items=st.lists(DATA, max_size=5), single=st.booleans())
    def append(self, name: str, items: list[bytes], single: bool) -> None:
        ch = self.channel(name)
        if single:
            items = items[:1] or [b""]
            got = self.run(self.store.append(name, items[0]))
        else:
            got = self.run(self.store.append_many(name, items))
        assert got.offset == ch.top + 1
        self.same_epoch(ch.epoch, got.epoch)
        for data in items:
            ch.top += 1
            ch.msgs.append((ch.top, self.now, data))
        if items:
            ch.touched = self.now

    @rule(name=CHANNELS, back=st.integers(-1, 6), limit=st.integers(0, 6))
    def read(self, name: str, back: int, limit: int) -> None:
        ch = self.channel(name)
        since = max(0, ch.top - back)
        h = self.run(self.store.read(name, since, limit))
        self.same_epoch(ch.epoch, h.epoch)
        assert h.top == ch.top
        assert h.messages == self.visible(ch, since, limit)

    @rule(name=CHANNELS)
    def state(self, name: str) -> None:
        ch = self.channel(name)
        got = self.run(self.store.state(name))
        self.same_epoch(ch.epoch, got.epoch)
        assert got.top == ch.top

    @rule(dt=st.sampled_from([0.5, 4.0, 11.0, 26.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def sweep(self) -> None:
        self.run(self.store.sweep())

    # ---------------------------------------------------------------------------- inboxes

    @rule(
        user=USERS,
        data=DATA,
        cid=st.sampled_from([None, "x", "y", "z"]),
        sender=st.sampled_from([None, "", "s"]),
    )
    def inbox_append(self, user: str, data: bytes, cid: str | None, sender: str | None) -> None:
        ib = self.inboxes.setdefault(user, MInbox())
        key = None if cid is None else dedup_key(sender, cid)
        hit = ib.dedup.get(key) if key is not None else None
        if hit is not None and self.now - hit[2] < INBOX.dedup_window:
            assert self.run(self.store.inbox_append(user, data, cid, sender)) == (
                hit[0],
                hit[1],
                True,
                ib.epoch,
            )
            return
        if ib.top - ib.acked >= INBOX.max_unacked:
            with pytest.raises(InboxFull):
                self.run(self.store.inbox_append(user, data, cid, sender))
            return
        got = self.run(self.store.inbox_append(user, data, cid, sender))
        ib.top += 1
        assert (got.seq, got.duplicate) == (ib.top, False)
        if not ib.epoch:
            ib.epoch = got.epoch
        assert got.epoch == ib.epoch and ib.epoch
        assert all(m[1] != got.msg_id for m in ib.msgs)
        ib.msgs.append((got.seq, got.msg_id, sender, data))
        if key is not None:
            ib.dedup[key] = (got.seq, got.msg_id, self.now)

    @rule(user=USERS, back=st.integers(-1, 6), limit=st.integers(0, 6))
    def inbox_read(self, user: str, back: int, limit: int) -> None:
        ib = self.inboxes.get(user, MInbox())
        after = max(0, ib.top - back)
        got = self.run(self.store.inbox_read(user, after, limit))
        want = [m for m in ib.msgs if m[0] > after][:limit]
        assert [tuple(m)[:4] for m in got] == want
        assert all(m.epoch == ib.epoch for m in got)

    @rule(user=USERS, back=st.integers(-1, 6))
    def inbox_ack(self, user: str, back: int) -> None:
        ib = self.inboxes.setdefault(user, MInbox())
        seq = max(0, ib.top - back)
        if seq > ib.top:
            with pytest.raises(AckOutOfRange):
                self.run(self.store.inbox_ack(user, seq))
            return
        got = self.run(self.store.inbox_ack(user, seq))
        if seq > ib.acked:
            ib.acked = seq
            ib.msgs = [m for m in ib.msgs if m[0] > seq]
        assert got == (ib.acked, ib.top, ib.epoch)

    @invariant()
    def inbox_states(self) -> None:
        for user, ib in self.inboxes.items():
            assert self.run(self.store.inbox_state(user)) == (ib.acked, ib.top, ib.epoch)


class SqliteMachine(StoreMachine):
    kind = "sqlite"


_settings = settings(
    deadline=None,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)

TestMemoryModel = StoreMachine.TestCase
TestMemoryModel.settings = settings(_settings, max_examples=150)
TestSqliteModel = SqliteMachine.TestCase
TestSqliteModel.settings = settings(_settings, max_examples=40)
