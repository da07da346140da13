"""Channel subscriptions of the client SDK: messages, gaps, and the queue between them
and the application.

A :class:`Subscription` is where the client's reader puts what arrives for one channel
and where the application takes it. The reader has already dropped every duplicate
(offsets at or below :attr:`Subscription.offset` in the same epoch), so what is queued is
each message once, in offset order. When the client learns that some messages can never
be delivered (history trimmed or lost while it was away), it queues a :class:`Gap` at
that point of the stream: the application meets it in order, through the ``on_gap``
callback (and :attr:`Subscription.gaps` counts gaps as soon as they are known).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..errors import ConnectionClosed, RequestError

__all__ = ["Gap", "GapCallback", "Message", "Since", "Subscription", "SubscriptionOwner"]

log = logging.getLogger("fastim.client")


class Message(NamedTuple):
    """One message of a channel."""

    channel: str
    offset: int  # position in the channel, strictly increasing within an epoch
    data: Any  # the published JSON document, decoded


class Since(NamedTuple):
    """A position in a channel's history: the last offset delivered, in an epoch."""

    off: int
    epoch: str


class Gap(NamedTuple):
    """Messages of a channel that the application will never see.

    Found when a resubscribe (after a reconnect, or when the node lost history) was
    answered ``recovered: false``. Messages after ``last_offset`` of ``last_epoch`` may
    be missing; what the node still had follows the gap in the stream, then live ones.

    ``reason``:

    * ``"trimmed"``: same epoch, but the node no longer had every missed message
      (``history_size``, ``history_ttl``, or more than ``recovery_max`` missed); those
      it still had follow, with offsets above ``last_offset``.
    * ``"epoch"``: the channel's history was lost (a new epoch: a memory store or a
      non-durable namespace restarted, Redis lost keys). What the old epoch had after
      ``last_offset`` is lost; offsets start again, and the stream goes on with every
      message of the new epoch the node still has, from its start (offset 1 unless
      trimmed), then live ones.
    * ``"rewound"``: same epoch, but the channel is behind the offset the client had
      (a store that lost its last writes, e.g. a Redis failover); offsets after
      ``offset`` follow.
    """

    channel: str
    last_epoch: str  # the epoch of the last message delivered before the gap
    last_offset: int  # the last offset delivered before the gap (0: none)
    epoch: str  # the channel's epoch from here on
    offset: int  # the channel's latest offset when the gap was found
    reason: str


#: called with each :class:`Gap` when the application's reading reaches it
GapCallback = Callable[[Gap], object]


class SubscriptionOwner(Protocol):
    """What a :class:`Subscription` needs of its client (:class:`~fastim.client.Client`
    is one): to end it."""

    async def _unsubscribe(self, sub: Subscription) -> None:
        """End ``sub`` here at once, and on the node if connected."""
        ...


class Subscription:
    """A channel subscription: an async iterator of :class:`Message`.

    Created by :meth:`Client.subscribe`. Messages wait in a queue until read with
    ``async for`` or :meth:`get`. The queue is unbounded by default; with
    ``max_queue=N`` it keeps the newest N messages: when a message arrives at a full
    queue the *oldest* one is dropped and :attr:`dropped` counts it (the reader never
    blocks, so one slow consumer cannot stall the connection or its heartbeat).

    Iteration ends (``StopAsyncIteration``) after :meth:`unsubscribe` or
    :meth:`Client.aclose`, once the queued messages are read. If the client gives up
    on the connection, iteration raises :class:`~fastim.errors.ConnectionClosed`.

    Across reconnects the subscription lives on: the client subscribes again with
    ``since`` = (:attr:`epoch`, :attr:`offset`), the node sends what was missed, and
    anything at or below :attr:`offset` is dropped, so the application sees each
    message once, in order. If the node could not send everything that was missed, a
    :class:`Gap` is queued at that point: :attr:`gaps` counts it at once, and
    ``on_gap`` (if given to :meth:`Client.subscribe`) is called with it when reading
    reaches it, before the messages that follow it.
    """

    def __init__(
        self,
        client: SubscriptionOwner,
        channel: str,
        max_queue: int = 0,
        on_gap: GapCallback | None = None,
    ) -> None:
        self.channel = channel
        #: The last offset handed to the queue (or where the subscription started): the
        #: ``since`` of the next resubscribe.
        self.offset = 0
        #: The epoch :attr:`offset` belongs to ("" until the server named one; a server
        #: without epochs never does, and then reconnects cannot recover).
        self.epoch = ""
        #: Queue bound (0: unbounded).
        self.max_queue = max_queue
        #: Messages dropped because the queue was full.
        self.dropped = 0
        #: Gaps found so far (see :class:`Gap`).
        self.gaps = 0
        #: The last gap found, or None.
        self.last_gap: Gap | None = None
        self.on_gap = on_gap
        self._client = client
        self._items: deque[Message | Gap] = deque()
        self._messages = 0  # Message items in _items (the rest are Gaps)
        self._wake = asyncio.Event()
        self._end: BaseException | None = None
        self._end_normal = False
        self._retry_delay = 0.0  # the client's, for resubscribes the store refused
        #: epochs this subscription left → the last offset it delivered in each (a few)
        self._left: dict[str, int] = {}
        #: asked the node for Fossil deltas (docs/delta.md); the data of the last
        #: message this subscription received, and its offset, are the next delta's base
        self.delta = False
        self._base: bytes | None = None
        self._base_off = 0
        #: a delta could not be applied: resubscribed with ``since``, so everything up to
        #: that reply is dropped (recovery sends it again, full)
        self._resyncing = False
        #: deltas applied, and deltas that could not be (each cost a resubscribe)
        self.deltas = 0
        self.delta_failures = 0

    def __repr__(self) -> str:
        state = "active" if self._end is None else "ended"
        return f"<Subscription {self.channel!r} offset={self.offset} {state}>"

    @property
    def active(self) -> bool:
        """Whether messages may still arrive (not unsubscribed, closed or failed)."""
        return self._end is None

    @property
    def since(self) -> Since:
        """Where this subscription is: give it to ``subscribe(..., since=)`` to resume
        in another client (e.g. after the process restarted) without duplicates."""
        return Since(self.offset, self.epoch)

    def qsize(self) -> int:
        """Messages waiting to be read."""
        return self._messages

    async def get(self) -> Message:
        """Wait for the next message.

        Gaps met on the way are passed to ``on_gap``.

        Returns:
            The next :class:`Message`, in offset order.

        Raises:
            ConnectionClosed: the subscription has ended and its queue is empty: code
                1000 after :meth:`unsubscribe` or :meth:`Client.aclose`; the close code
                of the connection if the client gave up on it.
            RequestError: the server refused to subscribe again after a reconnect.
        """
        while True:
            items = self._items
            while items:
                item = items.popleft()
                if isinstance(item, Gap):
                    self._reached(item)
                    continue
                self._messages -= 1
                return item
            if self._end is not None:
                raise self._end_error()
            self._wake.clear()
            await self._wake.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except ConnectionClosed:
            if self._end_normal:
                raise StopAsyncIteration from None
            raise

    async def unsubscribe(self) -> None:
        """Stop the subscription; iteration ends once the queued messages are read.

        Idempotent. The subscription ends locally at once, whatever the server says; if
        the connection is down there is nothing to tell the server (it dropped the
        subscription with the connection).

        Raises:
            asyncio.TimeoutError: the server did not confirm within ``request_timeout``
                (the subscription has ended locally all the same).
        """
        await self._client._unsubscribe(self)

    # ----------------------------------------------------------------- client side

    def _deliver(self, msg: Message) -> None:
        items = self._items
        if self.max_queue and self._messages >= self.max_queue:
            while items:  # drop the oldest message; gaps before it are reached on the way
                old = items.popleft()
                if isinstance(old, Gap):
                    self._reached(old)
                    continue
                self._messages -= 1
                self.dropped += 1
                break
        items.append(msg)
        self._messages += 1
        self._wake.set()

    def _gap(self, gap: Gap) -> None:
        """History the application will not get: count it now, queue it in order."""
        self.gaps += 1
        self.last_gap = gap
        log.info(
            "fastim client: %r: gap after %s/%d (now %s/%d): %s",
            gap.channel,
            gap.last_epoch,
            gap.last_offset,
            gap.epoch,
            gap.offset,
            gap.reason,
        )
        self._items.append(gap)
        self._wake.set()

    def _move(self, epoch: str, offset: int) -> None:
        """Continue in ``epoch`` after ``offset``; remember where the old epoch ended."""
        if self.epoch and epoch != self.epoch:
            left = self._left
            left[self.epoch] = self.offset
            while len(left) > 8:
                del left[next(iter(left))]
        self.epoch, self.offset = epoch, offset

    def _reached(self, gap: Gap) -> None:
        cb = self.on_gap
        if cb is None:
            return
        try:
            cb(gap)
        except Exception:  # the application's bug must not break the stream
            log.exception("fastim client: on_gap callback of %r failed", self.channel)

    def _finish(self, exc: BaseException, normal: bool) -> None:
        if self._end is not None:
            return
        self._end = exc
        self._end_normal = normal
        self._wake.set()

    def _end_error(self) -> BaseException:
        end = self._end
        assert end is not None
        # a fresh exception per raise: re-raising one object would pile up tracebacks
        if isinstance(end, ConnectionClosed):
            return ConnectionClosed(end.code, end.reason)
        if isinstance(end, RequestError):
            return RequestError(end.code, end.reason)
        return end
