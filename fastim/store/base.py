"""The store interface: channel history with offsets and epochs, and per-user inboxes.

Every store (:mod:`.memory`, :mod:`.sqlite`, :mod:`.redis`) implements :class:`Store` with
the same semantics, checked by one contract test suite (``tests/store``). The hub and the
sessions talk only to this interface, so a node changes store by a setting.

Why this shape:

* **Results are named tuples.** They unpack like the plain tuples the callers want
  (``offset, epoch = await store.append(...)``) and still read well in logs and tests.
* **Limits travel with each call** (:class:`HistoryLimits`), because they are a property
  of the channel's namespace, which the hub knows and the store does not. A store made
  by :func:`~fastim.store.open_store` has defaults from its settings for calls that pass none.
* **Reads apply the limits exactly; trimming is lazy.** A read never returns a message
  that the count or age limit has pushed out, whether or not it has been physically
  deleted yet. The stores may then delete in batches (sqlite), approximately (Redis
  ``MAXLEN ~``) or at sweep time, which is where their speed comes from.
* **Batches are first-class** (:meth:`Store.append_many`), and concurrent calls made in
  the same event-loop tick are committed together where the store can (sqlite: one
  transaction; Redis: one script call per batch). A publish is acknowledged only after
  its store call returned.
* **Failures raise, never drop.** Any backend failure is a :class:`StoreError` (or a
  subclass); a write whose call raised :class:`StoreUnavailable` may or may not have been
  applied (a reply can be lost after the write), so a caller must not acknowledge it,
  and a retry can duplicate a channel message (inbox sends are idempotent by client id).
"""

from __future__ import annotations

import abc
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar

from ..errors import FastimError

# ---------------------------------------------------------------------------------- errors


class StoreError(FastimError):
    """The store refused or failed an operation; the message says which store and why."""


class StoreUnavailable(StoreError):
    """The backend failed (Redis down or too slow, disk full, I/O error, store closed).

    For a write, the outcome is unknown: it may have been applied before the failure was
    seen. Never acknowledge such a write to a client; retrying an inbox send with its
    client message id is safe, retrying a channel append may store the message twice.
    """


class InboxFull(StoreError):
    """The recipient already has ``inbox_max`` unacknowledged messages; nothing was stored."""

    def __init__(self, user: str, limit: int) -> None:
        self.user = user
        self.limit = limit
        super().__init__(f"inbox of {user!r} is full: {limit} unacknowledged messages")


class AckOutOfRange(StoreError):
    """An inbox ack names a sequence above the last one stored; nothing changed."""

    def __init__(self, user: str, seq: int, top: int) -> None:
        self.user = user
        self.seq = seq
        self.top = top
        super().__init__(f"ack {seq} for {user!r} is above the last sequence {top}")


# --------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much history a channel keeps.

    ``size``: the last ``size`` messages (0 keeps none; offsets are still assigned).
    ``ttl``: seconds a message is kept after it was appended; ``None`` = no age limit.
    ``meta_ttl``: seconds the channel's epoch and top outlive its last append (or its
    creation by a read); then the channel is forgotten and its next use starts a new
    epoch at offset 1. ``None`` = kept for ever. Taken as at least ``ttl``. It is separate
    from ``ttl`` so that a quiet channel keeps its epoch: a subscriber that reconnects
    after all messages expired but none was published still recovers completely.
    """

    size: int = 128
    ttl: float | None = None
    meta_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"history size must be >= 0, got {self.size}")
        for name in ("ttl", "meta_ttl"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"history {name} must be > 0 seconds or None, got {value}")
        if self.meta_ttl is not None and self.ttl is not None and self.meta_ttl < self.ttl:
            object.__setattr__(self, "meta_ttl", self.ttl)


class Appended(NamedTuple):
    """Where :meth:`Store.append` put a message (for ``append_many``: the first one)."""

    offset: int
    epoch: str


class KeyedAppended(NamedTuple):
    """What :meth:`Store.append_keyed` did with each item of a batch.

    ``offset``: the first offset given to a new message (``top + 1`` when every item was
    a repeat); the new ones have consecutive offsets from it, in item order. ``offsets``:
    per item, the offset it has in ``epoch``: its new one, or for a repeat
    (``duplicate[i]``) the offset the first message with its key got.
    """

    offset: int
    epoch: str
    offsets: list[int]
    duplicate: list[bool]


class ChannelState(NamedTuple):
    """A channel's epoch and last offset (``top``; 0 before the first message)."""

    epoch: str
    top: int


class History(NamedTuple):
    """What :meth:`Store.read` returns: the state and the messages after ``since``."""

    epoch: str
    top: int
    messages: list[tuple[int, bytes]]


class InboxAppended(NamedTuple):
    """Result of :meth:`Store.inbox_append`; ``duplicate``: an earlier send with the same
    (sender, client id) was found, and ``seq``/``msg_id`` are that send's. ``epoch``: the
    inbox's epoch, which ``seq`` belongs to."""

    seq: int
    msg_id: str
    duplicate: bool
    epoch: str = ""


class InboxMessage(NamedTuple):
    """One stored direct message; ``epoch`` is the inbox's epoch when it was read."""

    seq: int
    msg_id: str
    sender: str | None
    data: bytes
    epoch: str = ""


class OutboxItem(NamedTuple):
    """One event for :meth:`Store.outbox_add`, with the bookkeeping that makes a node's
    crash lose no disconnect (see :mod:`fastim.backend.events`).

    ``data``: the event (JSON bytes; ``b""``: none, only the bookkeeping). ``arm``:
    ``(key, node, order, lost)``: remember,
    under ``node``, the event to emit if that node dies first: ``lost`` is a JSON object
    without its closing brace, to which :meth:`Store.outbox_claim` appends
    ``,"time":<unix ms>}``; ``order`` sorts one node's armed events (lower first).
    ``disarm``: an armed key this event replaces: the event is added only if the key is
    still armed (else it was already emitted as lost, and this one would be a second
    disconnect), and the key is dropped. Checked and applied atomically with the add.
    """

    data: bytes
    arm: tuple[str, str, int, bytes] | None = None
    disarm: str | None = None


class OutboxEntry(NamedTuple):
    """An event in the outbox: ``key`` names it for :meth:`Store.outbox_remove`."""

    key: str
    data: bytes


class OutboxStats(NamedTuple):
    """``depth``: events waiting; ``oldest``: unix time the oldest was added (None: empty);
    ``armed``: crash-disconnect entries registered (open connections, joins)."""

    depth: int
    oldest: float | None
    armed: int = 0


class InboxState(NamedTuple):
    """``acked``: the highest acknowledged sequence; ``top``: the last one assigned;
    ``epoch``: the inbox's epoch ("" for an inbox never written to)."""

    acked: int
    top: int
    epoch: str = ""


#: default seconds a channel remembers a publish's idempotency key (Store.append_keyed)
IDEMPOTENCY_WINDOW = 86_400.0
#: longest idempotency key, in characters (as a direct message's client id)
KEY_MAX = 128

# ------------------------------------------------------------------------------- interface

_S = TypeVar("_S", bound="Store")


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """``max_unacked``: messages an inbox holds before sends are refused (:class:`InboxFull`).
    ``dedup_window``: seconds a (sender, client id) is remembered for idempotent retries."""

    max_unacked: int = 10_000
    dedup_window: float = 86_400.0


class Store(abc.ABC):
    """Channel history and user inboxes; every method is a coroutine except ``name``.

    Channel history: per channel an epoch (names one continuous history; a new one when
    the store lost the channel's history) and offsets 1, 2, 3, ... Inboxes: per user an
    epoch (the same idea: a new one when the inbox's numbering started again), a
    sequence 1, 2, 3, ..., a cumulative acknowledged sequence, and idempotent sends.

    Why inboxes have epochs: a client drops a direct message whose ``seq`` it has already
    delivered (it gets copies: retries, replays, several connections). An inbox that
    started again at 1 (a memory store's restart, a flushed Redis, a restored backup)
    would give new messages sequences the client has seen, and they would be dropped in
    silence. With the epoch on every message, a client knows a new numbering from a copy.
    """

    #: "memory", "sqlite" or "redis"
    name: str = ""

    def __init__(
        self, limits: HistoryLimits | None = None, inbox: InboxLimits | None = None
    ) -> None:
        self.limits = limits or HistoryLimits()
        self.inbox_limits = inbox or InboxLimits()

    # -- channel history

    @abc.abstractmethod
    async def append(
        self, channel: str, data: bytes, limits: HistoryLimits | None = None
    ) -> Appended:
        """Assign the channel's next offset to ``data`` and store it; trim to ``limits``.

        Returns the offset and the epoch it belongs to. If the epoch differs from the one
        the caller saw before, the channel's history was lost in between (offsets
        started again at 1).
        """

    @abc.abstractmethod
    async def append_many(
        self, channel: str, items: Sequence[bytes], limits: HistoryLimits | None = None
    ) -> Appended:
        """Append ``items`` in order, atomically, in one round trip / one transaction.

        They get consecutive offsets ``first .. first + len(items) - 1``; returns
        ``(first, epoch)``. An empty ``items`` stores nothing and returns ``(top + 1, epoch)``.
        """

    @abc.abstractmethod
    async def append_keyed(
        self,
        channel: str,
        items: Sequence[bytes],
        keys: Sequence[str | None],
        limits: HistoryLimits | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> KeyedAppended:
        """:meth:`append_many` with an idempotency key per item (``None``: none).

        An item whose key the channel already recorded within ``window`` seconds, in its
        current epoch, is **not** stored again: it gets the offset the first one got
        (``duplicate`` True); so does a key repeated inside ``items`` (the first counts).
        The keys of the new items are recorded in the same atomic step as the append (one
        sqlite transaction, one Redis script), so "stored" and "key recorded" cannot be
        separated by a crash: a publisher that retries after a lost answer, or a stream
        entry redelivered after a ``kill -9``, is stored once.

        Keys are per channel (the same key on two channels names two messages). A key
        belongs to the channel's epoch: a channel that lost its history (a new epoch)
        forgot its keys too, since the offsets they name are gone. A separate method
        rather than a parameter of :meth:`append_many`: the result says per item what
        happened, and the keyless append (the hot path) stays exactly as it was.
        """

    @abc.abstractmethod
    async def read(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History:
        """The kept messages with offset > ``since``, oldest first, at most ``limit`` of them.

        Also the channel's epoch and top, from the same snapshot: if ``messages`` is empty
        or ends before ``top``, page on from the last offset returned. A channel never
        seen before gets its epoch here (so a subscriber learns an epoch that its first
        message will keep).
        """

    @abc.abstractmethod
    async def peek(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History | None:
        """What :meth:`read` returns, for a channel that exists; else None, creating nothing.

        For readers from outside (the server HTTP API's history): looking at a channel
        that was never published to, or was forgotten after ``meta_ttl``, must not give
        it an epoch (nor keep it in the store).
        """

    @abc.abstractmethod
    async def state(self, channel: str, limits: HistoryLimits | None = None) -> ChannelState:
        """The channel's epoch and top; creates the epoch of a channel never seen before."""

    @abc.abstractmethod
    async def restart_epoch(
        self, channel: str, seen_epoch: str, limits: HistoryLimits | None = None
    ) -> ChannelState:
        """Give the channel a new epoch if it is still in ``seen_epoch``; return its state.

        For history that went back without losing its epoch: a store restored from an
        older backup or snapshot keeps the epoch it had then, with a lower top, and would
        number new messages with offsets clients have already seen (they would drop them
        as duplicates). The node calls this when an append starts below what it already
        delivered. The kept messages and the top stay; offsets continue from the top, in
        the new epoch. Compare-and-set: when another node restarted it first, its epoch
        is returned unchanged.
        """

    # -- inboxes

    @abc.abstractmethod
    async def inbox_append(
        self,
        user: str,
        data: bytes,
        client_msg_id: str | None = None,
        sender: str | None = None,
    ) -> InboxAppended:
        """Store a direct message for ``user``: next sequence, a new unique message id.

        The first append to an inbox the store does not have (never written, or lost)
        gives it a new epoch, returned with every result.

        With a ``client_msg_id``, a second send with the same (``sender``,
        ``client_msg_id``) to the same user within the dedup window stores nothing and
        returns the first send's sequence and id with ``duplicate=True``, even after the
        message was acknowledged. Raises :class:`InboxFull` when ``inbox_max`` messages
        are unacknowledged (a duplicate is still recognised when full).
        """

    @abc.abstractmethod
    async def inbox_read(self, user: str, after_seq: int, limit: int = 1000) -> list[InboxMessage]:
        """Unacknowledged messages with sequence > ``after_seq``, in order, at most ``limit``;
        each carries the inbox's epoch read in the same snapshot."""

    @abc.abstractmethod
    async def inbox_ack(self, user: str, seq: int, epoch: str | None = None) -> InboxState:
        """Acknowledge every message up to ``seq`` (cumulative) and drop them.

        An ack at or below the current acked sequence changes nothing; above the last
        sequence it raises :class:`AckOutOfRange`. With ``epoch``, an ack for another
        epoch than the inbox's (a client that has not seen the new numbering yet)
        changes nothing either: its ``seq`` names other messages. Returns the state after.
        """

    @abc.abstractmethod
    async def inbox_state(self, user: str) -> InboxState:
        """(acked, top, epoch) of the user's inbox; (0, 0, "") for a user never written to."""

    @abc.abstractmethod
    async def inbox_restart_epoch(self, user: str, seen_epoch: str) -> InboxState:
        """Give the inbox a new epoch if it is still in ``seen_epoch``; return its state.

        For an inbox that went back without losing its epoch (a store restored from an
        older backup numbers new messages with sequences clients have already seen).
        The node calls it when a new message gets a sequence at or below one it already
        delivered in the same epoch. Messages, acked and top stay. Compare-and-set: a
        restart made by another node first is returned unchanged.
        """

    # -- event outbox (fastim.backend: docs/events.md)

    @abc.abstractmethod
    async def outbox_add(self, items: Sequence[OutboxItem]) -> int:
        """Append ``items``' events in order, atomically with their arm/disarm
        bookkeeping (one transaction / one script); return how many were added (an item
        whose ``disarm`` key is not armed adds nothing)."""

    @abc.abstractmethod
    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        """The oldest ``limit`` events, oldest first."""

    @abc.abstractmethod
    async def outbox_remove(self, keys: Sequence[str]) -> None:
        """Drop delivered events (unknown keys are ignored)."""

    @abc.abstractmethod
    async def outbox_stats(self) -> OutboxStats:
        """Depth, time of the oldest event, armed entries."""

    @abc.abstractmethod
    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        """Take or renew the sender lease for ``ttl`` seconds: True if ``owner`` holds it
        (it was free, expired, or already ``owner``'s). ``ttl`` 0 releases it if held."""

    @abc.abstractmethod
    async def outbox_beat(self, node: str, ttl: float) -> None:
        """``node`` is alive for ``ttl`` more seconds (its armed events stay armed)."""

    @abc.abstractmethod
    async def outbox_claim(self, limit: int = 1000) -> int:
        """Emit the armed events of dead nodes (no beat within their ttl): each becomes
        an outbox event (``lost`` + the time), atomically with dropping it, so two
        claimers never emit one twice. At most ``limit`` a call; returns how many."""

    # -- upkeep

    async def sweep(self) -> int:
        """Delete what has expired (forgotten channels, old dedup entries); return a count.

        Reads are exact without it; it bounds storage. The node calls it periodically.
        """
        return 0

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release connections, threads and files. Idempotent."""

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _limits(self, limits: HistoryLimits | None) -> HistoryLimits:
        return self.limits if limits is None else limits


# --------------------------------------------------------------------------------- helpers


def new_epoch() -> str:
    """A random name for one continuous history (12 hex characters, 48 random bits)."""
    return os.urandom(6).hex()


def new_msg_id() -> str:
    """A unique direct-message id: 96 random bits as 24 hex characters.

    Random rather than derived from (user, seq) so that ids stay unique when a volatile
    store restarts and sequences begin again at 1.
    """
    return os.urandom(12).hex()


def dedup_key(sender: str | None, client_msg_id: str) -> str:
    """One string per (sender, client id) pair, unambiguous for any characters in either."""
    if sender is None:
        return "-" + client_msg_id
    return f"+{len(sender)}:{sender}{client_msg_id}"


class KeyWindow:
    """Idempotency keys remembered in memory for a window: key -> (offset, epoch, expiry).

    The memory store keeps one per channel, and so does the hub for its in-memory
    channels. ``order`` holds (expiry, key) in the order they were added, so forgetting
    the expired ones is a pop from the left (windows are the same for every key of one
    owner, so expiries come in order).
    """

    __slots__ = ("keys", "order")

    def __init__(self) -> None:
        self.keys: dict[str, tuple[int, str, float]] = {}
        self.order: deque[tuple[float, str]] = deque()

    def get(self, key: str, epoch: str, now: float) -> int | None:
        """The offset ``key`` was recorded with in ``epoch``, if it has not expired."""
        hit = self.keys.get(key)
        if hit is None or hit[1] != epoch or hit[2] <= now:
            return None
        return hit[0]

    def add(self, key: str, offset: int, epoch: str, expires: float) -> None:
        self.keys[key] = (offset, epoch, expires)
        self.order.append((expires, key))

    def forget(self, now: float) -> int:
        """Drop the keys whose window ended; return how many."""
        keys, order = self.keys, self.order
        n = 0
        while order and order[0][0] <= now:
            expires, key = order.popleft()
            hit = keys.get(key)
            if hit is not None and hit[2] == expires:
                del keys[key]
                n += 1
        return n


def plan_keyed(
    items: Sequence[bytes], keys: Sequence[str | None], known: dict[str, int]
) -> tuple[list[int], list[int], list[bool]]:
    """The first half of :meth:`Store.append_keyed` for stores that look keys up in
    Python (memory, sqlite): which items to store, and the offsets of the repeats.

    ``known``: key -> offset, for the keys of this batch the channel recorded (live, in
    its epoch). Returns ``(fresh, offsets, duplicate)``: the positions to store, in
    order; per item its known offset, 0 for a fresh one, ``-1 - j`` for a repeat of
    the batch's item ``j``; per item whether it is a repeat. :func:`settle_keyed` fills
    in the rest once the store gave the first new offset.
    """
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} keys for {len(items)} items")
    fresh: list[int] = []
    offsets = [0] * len(items)
    duplicate = [False] * len(items)
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None:
            off = known.get(k)
            if off is not None:
                offsets[i], duplicate[i] = off, True
                continue
            j = first.setdefault(k, i)
            if j != i:
                offsets[i], duplicate[i] = -1 - j, True
                continue
        fresh.append(i)
    return fresh, offsets, duplicate


def settle_keyed(
    fresh: list[int], offsets: list[int], duplicate: list[bool], first: int, epoch: str
) -> KeyedAppended:
    """The second half (see :func:`plan_keyed`): the fresh items got ``first``, ``first +
    1``, ...; a repeat inside the batch gets its first item's offset."""
    for n, i in enumerate(fresh):
        offsets[i] = first + n
    for i, off in enumerate(offsets):
        if off < 0:
            offsets[i] = offsets[-1 - off]
    return KeyedAppended(first, epoch, offsets, duplicate)


def check_read_args(since: int, limit: int) -> None:
    if since < 0:
        raise ValueError(f"since must be >= 0, got {since}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
