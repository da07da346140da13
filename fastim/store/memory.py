"""The volatile store: dicts and deques in the node's process.

Everything is lost when the process ends; every channel then starts a new epoch (epochs
are random per process), so a subscriber that reconnects after a restart is told its
recovery is incomplete instead of being handed offsets that mean something else now.
Operations never wait: the coroutines return without suspending, so a publish costs a
few dictionary and deque operations.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from .base import (
    IDEMPOTENCY_WINDOW,
    AckOutOfRange,
    Appended,
    ChannelState,
    History,
    HistoryLimits,
    InboxAppended,
    InboxFull,
    InboxLimits,
    InboxMessage,
    InboxState,
    KeyedAppended,
    KeyWindow,
    OutboxEntry,
    OutboxItem,
    OutboxStats,
    Store,
    StoreUnavailable,
    check_read_args,
    dedup_key,
    new_epoch,
    new_msg_id,
    plan_keyed,
    settle_keyed,
)


class _Channel:
    """One channel's history: ``msgs`` holds (offset, time, data), consecutive offsets.

    ``keys``: the idempotency keys of :meth:`MemoryStore.append_keyed`, made on first use.
    """

    __slots__ = ("epoch", "keys", "meta_ttl", "msgs", "top", "touched", "ttl")

    def __init__(self, now: float, limits: HistoryLimits) -> None:
        self.epoch = new_epoch()
        self.top = 0
        self.msgs: deque[tuple[int, float, bytes]] = deque()
        #: last append (or creation): the clock of ``meta_ttl``
        self.touched = now
        self.ttl = limits.ttl
        self.meta_ttl = limits.meta_ttl
        self.keys: KeyWindow | None = None


class _Inbox:
    __slots__ = ("acked", "dedup", "dedup_order", "epoch", "msgs", "top")

    def __init__(self) -> None:
        #: new with the inbox: a restarted node's memory store numbers inboxes from 1
        #: again, and clients tell its messages from copies of old ones by the epoch
        self.epoch = new_epoch()
        self.top = 0
        self.acked = 0
        self.msgs: deque[InboxMessage] = deque()
        #: dedup key -> (seq, msg_id, time of the send)
        self.dedup: dict[str, tuple[int, str, float]] = {}
        #: (time, key) in time order, to forget keys older than the dedup window
        self.dedup_order: deque[tuple[float, str]] = deque()


class MemoryStore(Store):
    """Channel history and inboxes in memory. ``clock`` (wall-clock seconds) is for tests."""

    name = "memory"

    def __init__(
        self,
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(limits, inbox)
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._inboxes: dict[str, _Inbox] = {}
        # the event outbox (volatile like everything here: docs/events.md)
        self._outbox: dict[int, tuple[float, bytes]] = {}  # insertion order = outbox order
        self._outbox_next = 1
        #: armed key -> (node, order, insertion number, lost-event prefix)
        self._armed: dict[str, tuple[str, int, int, bytes]] = {}
        self._armed_next = 0
        self._beats: dict[str, float] = {}
        self._lease: tuple[str, float] | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("memory store is closed")

    # -------------------------------------------------------------------- channel history

    def _channel(self, name: str, limits: HistoryLimits, now: float) -> _Channel:
        ch = self._channels.get(name)
        if ch is not None and limits.meta_ttl is not None and now - ch.touched >= limits.meta_ttl:
            ch = None  # forgotten: a new epoch below
        if ch is None:
            ch = self._channels[name] = _Channel(now, limits)
        return ch

    @staticmethod
    def _trim(ch: _Channel, limits: HistoryLimits, now: float) -> None:
        msgs = ch.msgs
        while len(msgs) > limits.size:
            msgs.popleft()
        if limits.ttl is not None:
            cutoff = now - limits.ttl
            while msgs and msgs[0][1] <= cutoff:
                msgs.popleft()

    def _append(self, channel: str, items: Sequence[bytes], limits: HistoryLimits) -> Appended:
        self._check_open()
        now = self._clock()
        ch = self._channel(channel, limits, now)
        first = ch.top + 1
        if items:
            # time never goes back inside one channel, so expired messages are a prefix
            ts = max(now, ch.msgs[-1][1]) if ch.msgs else now
            msgs = ch.msgs
            off = ch.top
            for data in items:
                off += 1
                msgs.append((off, ts, bytes(data)))
            ch.top = off
            ch.touched = now
            ch.ttl = limits.ttl
            ch.meta_ttl = limits.meta_ttl
            self._trim(ch, limits, now)
        return Appended(first, ch.epoch)

    async def append(
        self, channel: str, data: bytes, limits: HistoryLimits | None = None
    ) -> Appended:
        return self._append(channel, (data,), self._limits(limits))

    async def append_many(
        self, channel: str, items: Sequence[bytes], limits: HistoryLimits | None = None
    ) -> Appended:
        return self._append(channel, items, self._limits(limits))

    async def append_keyed(
        self,
        channel: str,
        items: Sequence[bytes],
        keys: Sequence[str | None],
        limits: HistoryLimits | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> KeyedAppended:
        self._check_open()
        lim = self._limits(limits)
        now = self._clock()
        ch = self._channel(channel, lim, now)
        seen = ch.keys
        known = {}
        if seen is not None:
            seen.forget(now)
            for k in keys:
                if k is not None and (off := seen.get(k, ch.epoch, now)) is not None:
                    known[k] = off
        fresh, offsets, duplicate = plan_keyed(items, keys, known)
        first, epoch = self._append(channel, [items[i] for i in fresh], lim)
        done = settle_keyed(fresh, offsets, duplicate, first, epoch)
        if window > 0:
            for i in fresh:
                k = keys[i]
                if k is not None:
                    if ch.keys is None:
                        ch.keys = KeyWindow()
                    ch.keys.add(k, offsets[i], epoch, now + window)
        return done

    async def read(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History:
        check_read_args(since, limit)
        self._check_open()
        lim = self._limits(limits)
        now = self._clock()
        ch = self._channel(channel, lim, now)
        out: list[tuple[int, bytes]] = []
        msgs = ch.msgs
        if msgs and limit:
            start = max(since, ch.top - lim.size) + 1
            cutoff = now - lim.ttl if lim.ttl is not None else None
            for off, ts, data in itertools.islice(msgs, max(0, start - msgs[0][0]), None):
                if cutoff is not None and ts <= cutoff:
                    continue
                out.append((off, data))
                if len(out) >= limit:
                    break
        return History(ch.epoch, ch.top, out)

    async def peek(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History | None:
        check_read_args(since, limit)
        self._check_open()
        lim = self._limits(limits)
        ch = self._channels.get(channel)
        if ch is None or (lim.meta_ttl is not None and self._clock() - ch.touched >= lim.meta_ttl):
            return None  # never seen, or forgotten: read would give it a new epoch
        return await self.read(channel, since, limit, limits)

    async def state(self, channel: str, limits: HistoryLimits | None = None) -> ChannelState:
        self._check_open()
        ch = self._channel(channel, self._limits(limits), self._clock())
        return ChannelState(ch.epoch, ch.top)

    async def restart_epoch(
        self, channel: str, seen_epoch: str, limits: HistoryLimits | None = None
    ) -> ChannelState:
        self._check_open()
        ch = self._channel(channel, self._limits(limits), self._clock())
        if ch.epoch == seen_epoch:
            ch.epoch = new_epoch()
        return ChannelState(ch.epoch, ch.top)

    # ----------------------------------------------------------------------------- inboxes

    def _prune_dedup(self, ib: _Inbox, now: float) -> None:
        cutoff = now - self.inbox_limits.dedup_window
        order = ib.dedup_order
        while order and order[0][0] <= cutoff:
            ts, key = order.popleft()
            hit = ib.dedup.get(key)
            if hit is not None and hit[2] == ts:
                del ib.dedup[key]

    async def inbox_append(
        self,
        user: str,
        data: bytes,
        client_msg_id: str | None = None,
        sender: str | None = None,
    ) -> InboxAppended:
        self._check_open()
        now = self._clock()
        ib = self._inboxes.get(user)
        if ib is None:
            ib = self._inboxes[user] = _Inbox()
        key = None
        if client_msg_id is not None:
            key = dedup_key(sender, client_msg_id)
            self._prune_dedup(ib, now)
            hit = ib.dedup.get(key)
            if hit is not None:
                return InboxAppended(hit[0], hit[1], True, ib.epoch)
        if ib.top - ib.acked >= self.inbox_limits.max_unacked:
            raise InboxFull(user, self.inbox_limits.max_unacked)
        ib.top += 1
        msg_id = new_msg_id()
        ib.msgs.append(InboxMessage(ib.top, msg_id, sender, bytes(data)))
        if key is not None and self.inbox_limits.dedup_window > 0:
            ib.dedup[key] = (ib.top, msg_id, now)
            ib.dedup_order.append((now, key))
        return InboxAppended(ib.top, msg_id, False, ib.epoch)

    async def inbox_read(self, user: str, after_seq: int, limit: int = 1000) -> list[InboxMessage]:
        check_read_args(after_seq, limit)
        self._check_open()
        ib = self._inboxes.get(user)
        if ib is None or not ib.msgs:
            return []
        start = max(0, after_seq + 1 - ib.msgs[0].seq)
        epoch = ib.epoch
        return [m._replace(epoch=epoch) for m in itertools.islice(ib.msgs, start, start + limit)]

    async def inbox_ack(self, user: str, seq: int, epoch: str | None = None) -> InboxState:
        self._check_open()
        ib = self._inboxes.get(user)
        if ib is None:
            if epoch:
                return InboxState(0, 0)  # an ack of a numbering this store does not have
            if seq > 0:
                raise AckOutOfRange(user, seq, 0)
            return InboxState(0, 0)
        if epoch is not None and epoch != ib.epoch:
            return InboxState(ib.acked, ib.top, ib.epoch)
        if seq > ib.top:
            raise AckOutOfRange(user, seq, ib.top)
        if seq > ib.acked:
            msgs = ib.msgs
            while msgs and msgs[0].seq <= seq:
                msgs.popleft()
            ib.acked = seq
        return InboxState(ib.acked, ib.top, ib.epoch)

    async def inbox_state(self, user: str) -> InboxState:
        self._check_open()
        ib = self._inboxes.get(user)
        return InboxState(0, 0) if ib is None else InboxState(ib.acked, ib.top, ib.epoch)

    async def inbox_restart_epoch(self, user: str, seen_epoch: str) -> InboxState:
        self._check_open()
        ib = self._inboxes.get(user)
        if ib is None:
            return InboxState(0, 0)
        if ib.epoch == seen_epoch:
            ib.epoch = new_epoch()
        return InboxState(ib.acked, ib.top, ib.epoch)

    # ------------------------------------------------------------------------ event outbox

    async def outbox_add(self, items: Sequence[OutboxItem]) -> int:
        self._check_open()
        now = self._clock()
        n = 0
        for item in items:
            if item.disarm is not None and self._armed.pop(item.disarm, None) is None:
                continue  # already emitted as lost
            if item.arm is not None:
                key, node, order, lost = item.arm
                self._armed_next += 1
                self._armed[key] = (node, order, self._armed_next, lost)
            if not item.data:
                continue  # bookkeeping only (an arm whose own event kind is off)
            self._outbox[self._outbox_next] = (now, item.data)
            self._outbox_next += 1
            n += 1
        return n

    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        self._check_open()
        out: list[OutboxEntry] = []
        for key, (_, data) in self._outbox.items():
            if len(out) >= limit:
                break
            out.append(OutboxEntry(str(key), data))
        return out

    async def outbox_remove(self, keys: Sequence[str]) -> None:
        self._check_open()
        for key in keys:
            self._outbox.pop(int(key), None)

    async def outbox_stats(self) -> OutboxStats:
        self._check_open()
        oldest = next(iter(self._outbox.values()))[0] if self._outbox else None
        return OutboxStats(len(self._outbox), oldest, len(self._armed))

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        self._check_open()
        now = self._clock()
        lease = self._lease
        if lease is not None and lease[0] != owner and lease[1] > now:
            return False
        self._lease = (owner, now + ttl) if ttl > 0 else None
        return ttl > 0

    async def outbox_beat(self, node: str, ttl: float) -> None:
        self._check_open()
        self._beats[node] = self._clock() + ttl

    async def outbox_claim(self, limit: int = 1000) -> int:
        self._check_open()
        now = self._clock()
        dead = {node for node, _, _, _ in self._armed.values() if self._beats.get(node, 0.0) <= now}
        if not dead:
            return 0
        lost = sorted(
            (order, seq, key, prefix)
            for key, (node, order, seq, prefix) in self._armed.items()
            if node in dead
        )[:limit]
        tail = b',"time":%d}' % int(now * 1000)
        for _, _, key, prefix in lost:
            del self._armed[key]
            self._outbox[self._outbox_next] = (now, prefix + tail)
            self._outbox_next += 1
        return len(lost)

    # ------------------------------------------------------------------------------ upkeep

    async def sweep(self) -> int:
        """Forget channels past ``meta_ttl``, drop expired messages and dedup entries.

        One pass over every channel and inbox (a plain loop: about 0.1 s per million
        channels), so the node calls it every few minutes, not every tick.
        """
        self._check_open()
        now = self._clock()
        dead = []
        n = 0
        for name, ch in self._channels.items():
            if ch.meta_ttl is not None and now - ch.touched >= ch.meta_ttl:
                dead.append(name)
            else:
                if ch.keys is not None:
                    n += ch.keys.forget(now)
                if ch.ttl is not None and ch.msgs:
                    cutoff = now - ch.ttl
                    msgs = ch.msgs
                    while msgs and msgs[0][1] <= cutoff:
                        msgs.popleft()
                        n += 1
        for name in dead:
            del self._channels[name]
        for ib in self._inboxes.values():
            if ib.dedup_order:
                before = len(ib.dedup)
                self._prune_dedup(ib, now)
                n += before - len(ib.dedup)
        return n + len(dead)

    async def close(self) -> None:
        self._closed = True
        self._channels.clear()
        self._inboxes.clear()
