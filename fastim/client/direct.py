"""Direct messages in the client SDK: the receiving side (each ``seq`` once, in order,
acknowledged after the application took it) and the types of the sending side.

The node may send a recipient the same ``seq`` several times: it retries what is not
acknowledged (``dm_retry``, doubling), replays every unacknowledged message when a
connection declares its user, and a user may have several connections. So the client
keeps one number, :attr:`DirectInbox.delivered` (every ``seq`` up to it has been queued
for the application, or was acknowledged before this client knew of it), drops anything
at or below it, and holds back a message that arrives with a hole before it until the
hole is filled (a retry or the replay brings the missing one) or turns out to be
acknowledged already (by another connection of the same user: then it is skipped, as the
inbox's ack is per user).

Epochs. An inbox's numbering starts again at 1 when the node's store lost it (a memory
store's restart, a flushed Redis) or went back (a restored backup); the node then gives
the inbox a new epoch, carried by every ``dm``. A message of another epoch than the one
this client is in is never a copy: the client queues a :class:`DirectGap` (the old
numbering's messages after ``last_seq`` may be lost), starts its duplicate check afresh,
and delivers the new numbering from where the node says it starts. Copies from an epoch
it has left are dropped; an ack names its epoch, so it never acknowledges messages of a
numbering this client has not seen.

Acks are cumulative and batched: at most one ``ack`` is in flight; when it returns, the
next one carries the highest ``seq`` the application has taken since. An ack that was
lost (connection gone, store unavailable) is sent again later: the node's own retries
and replays are harmless meanwhile, the duplicates are dropped here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, Protocol

from ..errors import ConnectionClosed, RequestError
from ..protocol import ErrorCode

__all__ = [
    "DirectGap",
    "DirectGapCallback",
    "DirectInbox",
    "DirectMessage",
    "DirectMessages",
    "InboxOwner",
    "InboxState",
    "Sent",
    "inbox_state",
]

log = logging.getLogger("fastim.client")

#: first and last delay between two inbox-state checks while a hole stays open (seconds)
_HOLE_CHECK = (0.2, 5.0)
#: delay before resending an ack the store could not take (seconds)
_ACK_RETRY = 0.5


class DirectMessage(NamedTuple):
    """A direct message to this client's user."""

    seq: int  # the recipient's sequence: 1, 2, 3, ... in inbox order
    mid: str  # the node's message id (the same for every copy and every retry)
    sender: str | None  # the sender's user id
    data: Any  # the JSON document sent, decoded
    epoch: str = ""  # the inbox's epoch: seq counts within it ("" from a node without)


class DirectGap(NamedTuple):
    """The inbox's numbering started again (a new epoch): direct messages of the old
    numbering after ``last_seq`` that this client had not received may be lost (the
    node's store lost them). Messages of the new epoch follow, from its start."""

    last_epoch: str  # the epoch this client was in
    last_seq: int  # the last seq of it handed to the application (0: none)
    epoch: str  # the inbox's epoch from here on


#: called with each :class:`DirectGap` when the application's reading reaches it
DirectGapCallback = Callable[[DirectGap], object]


class Sent(NamedTuple):
    """The node's acknowledgement of :meth:`Client.send`."""

    mid: str  # message id
    seq: int  # the recipient's sequence number given to the message
    dup: bool  # True: this cid had been stored before (a retry); nothing new was stored
    epoch: str = ""  # the recipient inbox's epoch that ``seq`` belongs to


class InboxState(NamedTuple):
    """The inbox of this client's user, as the store has it."""

    acked: int  # every seq up to this one is acknowledged
    top: int  # the last seq given
    epoch: str = ""  # the inbox's epoch ("" before its first message)


def inbox_state(reply: dict[str, Any]) -> InboxState:
    """The :class:`InboxState` in the reply to an ``inbox`` command."""
    return InboxState(int(reply["acked"]), int(reply["top"]), str(reply.get("epoch") or ""))


class InboxOwner(Protocol):
    """What a :class:`DirectInbox` needs of its client (:class:`~fastim.client.Client`
    is one): its state, a command round trip, and a place to run background work."""

    @property
    def connected(self) -> bool:
        """Whether requests can go out right now."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the client is closed or gave up."""
        ...

    async def _cmd(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """A JSON command; its JSON reply, or RequestError."""
        ...

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background (cancelled when the client closes)."""
        ...

    def _inbox_ok(self) -> None:
        """The node serves the inbox (the client's connect-again delays start over)."""
        ...


class DirectInbox:
    """Receiving side of one client's direct messages (one per :class:`Client`)."""

    def __init__(self, client: InboxOwner) -> None:
        self._client = client
        #: every seq up to this one has been queued for the application or skipped
        #: (None until the first message tells where the inbox starts)
        self.delivered: int | None = None
        #: the highest seq the application took
        self.taken = 0
        #: the highest seq the node confirmed as acknowledged
        self.acked = 0
        #: copies dropped because their seq had been delivered already
        self.duplicates = 0
        #: messages skipped because another connection of the user acknowledged them
        self.skipped = 0
        #: the inbox epoch ``delivered``, ``taken`` and ``acked`` count in ("" unknown)
        self.epoch = ""
        #: times the inbox's numbering started again (see :class:`DirectGap`)
        self.gaps = 0
        self.last_gap: DirectGap | None = None
        #: called when the application's reading reaches a gap
        self.on_gap: DirectGapCallback | None = None
        self._left: deque[str] = deque(maxlen=8)  # epochs left: their copies are stale
        self._held: dict[int, DirectMessage] = {}
        self._queue: deque[DirectMessage | DirectGap] = deque()
        self._wake = asyncio.Event()
        self._end: ConnectionClosed | None = None
        self._end_normal = False
        self._ack_inflight = False
        self._checking = False

    # ----------------------------------------------------------------- from the reader

    def on_dm(self, obj: dict[str, Any]) -> None:
        """A ``dm`` event from the node (maybe a copy of one already delivered)."""
        seq = obj.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            log.warning("fastim client: dm without a valid seq: %r", obj)
            return
        epoch = obj.get("epoch")
        epoch = epoch if isinstance(epoch, str) else ""
        if epoch and epoch != self.epoch:
            if epoch in self._left:
                self.duplicates += 1  # a late copy of a numbering already left
                return
            self._new_epoch(epoch)
        if (self.delivered is not None and seq <= self.delivered) or seq in self._held:
            self.duplicates += 1
            return
        sender = obj.get("from")
        self._held[seq] = DirectMessage(
            seq, str(obj.get("mid", "")), sender if isinstance(sender, str) else None,
            obj.get("data"), self.epoch,
        )  # fmt: skip
        self._drain()
        if self._held:
            self._check_hole()

    def _new_epoch(self, epoch: str) -> None:
        """The inbox numbers in ``epoch`` from now on. From an unknown one (the first
        message) nothing is lost; from a known one, the old numbering ended: what was
        held of it is handed over (real messages, with a hole before them), a gap is
        queued, and the duplicate check starts afresh."""
        old = self.epoch
        self.epoch = epoch
        if not old:
            return
        self._left.append(old)
        held = self._held
        last = self.delivered or 0
        for seq in sorted(held):
            self._queue.append(held[seq])
            last = seq
        held.clear()
        gap = DirectGap(old, last, epoch)
        self.gaps += 1
        self.last_gap = gap
        log.warning(
            "fastim client: the inbox started a new numbering (epoch %s -> %s): direct "
            "messages after seq %d of the old one may be lost",
            old,
            epoch,
            last,
        )
        self._queue.append(gap)
        self.delivered = None
        self.taken = 0
        self.acked = 0
        self._wake.set()

    def _drain(self) -> None:
        """Queue the held messages that follow ``delivered`` without a hole."""
        if self.delivered is None:
            return
        held = self._held
        for seq in [s for s in held if s <= self.delivered]:
            del held[seq]  # acknowledged elsewhere meanwhile
            self.skipped += 1
        nxt = self.delivered + 1
        while nxt in held:
            self._queue.append(held.pop(nxt))
            self.delivered = nxt
            nxt += 1
            self._wake.set()

    def _check_hole(self) -> None:
        """A message came with a hole before it: ask the node where the inbox is acked.

        Two causes: this client does not know yet where the inbox starts (its first
        message), or a message before it is still on its way (a retry, the replay) or
        was acknowledged by another connection of the user. The inbox state tells the
        last two apart; a message on its way is waited for.
        """
        if self._checking:
            return
        self._checking = True
        self._client._spawn(self._check_loop())

    async def _check_loop(self) -> None:
        client = self._client
        delay = _HOLE_CHECK[0]
        try:
            while self._held and not client.closed:
                try:
                    state = inbox_state(await client._cmd({"op": "inbox"}))
                except (ConnectionClosed, RequestError, asyncio.TimeoutError) as e:
                    if client.closed:
                        return
                    log.debug("fastim client: inbox state: %r", e)
                else:
                    client._inbox_ok()
                    if state.epoch and state.epoch != self.epoch and state.epoch not in self._left:
                        # the inbox moved to another numbering: what is held of the
                        # old one is handed over, with the gap, and the new one starts
                        self._new_epoch(state.epoch)
                    if state.epoch in ("", self.epoch) and (
                        self.delivered is None or state.acked > self.delivered
                    ):
                        self.delivered = state.acked
                    self._drain()
                    if not self._held:
                        return
                    log.info(
                        "fastim client: direct messages %d.. wait for %d (acked %d)",
                        min(self._held),
                        state.acked + 1,
                        state.acked,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _HOLE_CHECK[1])
        finally:
            self._checking = False

    # ----------------------------------------------------------------- acks

    def took(self, seq: int, epoch: str | None = None) -> None:
        """The application has ``seq`` (and everything before it): acknowledge it.

        ``epoch``: the message's; one of a numbering left since is not acknowledged
        (the node no longer has it)."""
        if epoch is not None and epoch != self.epoch:
            return
        if self.delivered is not None:
            seq = min(seq, self.delivered)  # never ack what this client has not seen
        if seq > self.taken:
            self.taken = seq
            self.pump()

    def pump(self) -> None:
        """Send an ack for ``taken`` unless one is in flight or nothing is new."""
        client = self._client
        if self._ack_inflight or self.taken <= self.acked or not client.connected:
            return
        self._ack_inflight = True
        client._spawn(self._ack(self.taken, self.epoch))

    async def _ack(self, seq: int, epoch: str) -> None:
        client = self._client
        again = True
        try:
            cmd: dict[str, Any] = {"op": "ack", "seq": seq}
            if epoch:
                cmd["epoch"] = epoch
            reply = await client._cmd(cmd)
            acked = reply.get("seq")
            if epoch == self.epoch and reply.get("epoch", epoch) == epoch:
                self.acked = max(self.acked, acked if isinstance(acked, int) else seq)
            else:
                # the inbox is in another numbering now (the store lost it): this ack is
                # moot, and sending it again would loop until a new message comes
                again = False
        except RequestError as e:
            log.info("fastim client: ack %d refused: %s", seq, e)
            if e.code == ErrorCode.STORE_UNAVAILABLE:
                await asyncio.sleep(_ACK_RETRY)
            else:
                again = False
        except (ConnectionClosed, asyncio.TimeoutError):
            pass  # sent again once connected (Client._on_connected pumps)
        finally:
            self._ack_inflight = False
        if again and not client.closed:
            self.pump()

    # ----------------------------------------------------------------- the application

    async def get(self, auto_ack: bool = True) -> DirectMessage:
        while True:
            if self._queue:
                msg = self._queue.popleft()
                if isinstance(msg, DirectGap):
                    self._reached(msg)
                    continue
                if auto_ack:
                    self.took(msg.seq, msg.epoch)
                return msg
            if self._end is not None:
                raise ConnectionClosed(self._end.code, self._end.reason)
            self._wake.clear()
            await self._wake.wait()

    def _reached(self, gap: DirectGap) -> None:
        cb = self.on_gap
        if cb is None:
            return
        try:
            cb(gap)
        except Exception:  # the application's bug must not break the stream
            log.exception("fastim client: on_gap callback of the direct messages failed")

    def qsize(self) -> int:
        return sum(1 for m in self._queue if isinstance(m, DirectMessage))

    def finish(self, exc: ConnectionClosed, normal: bool) -> None:
        if self._end is None:
            self._end = exc
            self._end_normal = normal
            self._wake.set()


class DirectMessages:
    """``async for msg in client.direct_messages():`` each ``seq`` once, in seq order.

    With ``auto_ack`` (the default) a message counts as taken, and is acknowledged (in
    a batch), when the iterator hands it over; without it, call
    :meth:`Client.ack` when the application is done with it (acknowledging a seq
    acknowledges everything before it). Iteration ends after :meth:`Client.aclose`;
    it raises :class:`~fastim.errors.ConnectionClosed` if the client gave up.
    """

    def __init__(self, inbox: DirectInbox, auto_ack: bool = True) -> None:
        self._inbox = inbox
        self.auto_ack = auto_ack

    def __aiter__(self) -> DirectMessages:
        return self

    async def __anext__(self) -> DirectMessage:
        try:
            return await self.get()
        except ConnectionClosed:
            if self._inbox._end_normal:
                raise StopAsyncIteration from None
            raise

    async def get(self) -> DirectMessage:
        """The next direct message (waits for it).

        Raises:
            ConnectionClosed: the client is closed (code 1000) or gave up.
        """
        return await self._inbox.get(self.auto_ack)

    def qsize(self) -> int:
        """Messages received and not taken yet."""
        return self._inbox.qsize()
