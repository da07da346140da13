"""Direct messages: store in the recipient's inbox, deliver to each of its connections,
retry until acknowledged, and replay what a connection missed when it declares its user.

A user may have many connections (phone, laptop, tabs). Every connection of the recipient
gets every message; any of them acknowledging a sequence acknowledges it for all of them
(the inbox's ack is per user and cumulative, as in most IM systems: "read up to here").

Order and duplicates. Sequences are per recipient and assigned by the store, so the
inbox order is the order in which the store accepted the sends. A connection that
declares its user first gets the unacknowledged messages in ``seq`` order, then live ones;
live messages that arrive while that read is in flight wait in a per-connection queue
and are sent after it, skipping those the read already returned. Retries and several
connections mean a client may see a ``seq`` twice: the SDK hands each ``seq`` to the
application once (``docs/guarantees.md``).

Epochs. An inbox's numbering starts again at 1 when the store lost it (a memory store's
restart, a flushed Redis) and may go back when a store is restored from an older backup.
Clients drop a ``seq`` they have delivered, so each inbox has an epoch (given by the
store when it creates the inbox) that every ``dm``, ``sent``, ``inbox`` and ``acked``
carries: a client that sees a new epoch starts its duplicate check afresh. An append
whose new message gets a ``seq`` already acknowledged, or that of another message
delivered here, in the same epoch is the backup case: the node restarts the inbox's
epoch in the store (compare-and-set) before it answers and delivers. An ``ack`` names
the epoch it is for; one for another epoch changes nothing (its ``seq`` counts other
messages).

Retries are driven by the node's timer tick (no task or timer per message): a heap of
(due, user, seq); an unacknowledged message is sent again after ``dm_retry`` seconds,
doubling up to :data:`MAX_RETRY`, while its recipient has a connection here.

In a cluster (``relay`` set: :class:`fastim.cluster.dm.DmRouter`) the inbox is in the
shared store and the recipient's connections may be on several nodes. The node that
stored a message delivers it here and hands it to ``relay``, which sends it to the other
nodes holding connections of the recipient; they deliver it with :meth:`deliver_remote`
and retry it for their own connections. Acks are written to the store by whichever node
received them, so before a retry (and when a message seems missing) a node re-reads the
inbox state from the store (:mod:`.rechecks`, a mixin of :class:`Postman`): the store is
the truth, no ack notice has to travel between nodes, and a message that no DM frame
brought (the sender's node did not know the route yet, a link was down) is read from
the inbox and delivered.

The protocols the postman talks to (:class:`Session`, :class:`Relay`), the ``dm`` event
(:func:`dm_event`) and the per-user state are in :mod:`.interfaces`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import Any

import orjson

from ..backend.events import Events
from ..errors import BadRequest
from ..protocol import ErrorCode
from ..store import AckOutOfRange, InboxAppended, InboxFull, InboxMessage, Store, StoreError
from ..tasks import Background

# `name as name`: defined here before, still importable from here
from .interfaces import READ_PAGE as READ_PAGE
from .interfaces import Relay as Relay
from .interfaces import Session as Session
from .interfaces import UserState
from .interfaces import dm_event as dm_event
from .interfaces import event_epoch as event_epoch
from .interfaces import event_mid as event_mid
from .rechecks import SETTLE_CHECKS as SETTLE_CHECKS
from .rechecks import InboxRechecks

log = logging.getLogger("fastim")

MAX_RETRY = 60.0


class Postman(InboxRechecks):
    """The node's direct-message router (one per node); in a cluster, with the inbox
    re-checks of :class:`~fastim.delivery.rechecks.InboxRechecks`."""

    def __init__(
        self,
        store: Store,
        retry: float = 2.0,
        spawn: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.retry = retry
        #: cluster only (None on a single node): where messages for users with
        #: connections on other nodes go, and where routes are published
        self.relay: Relay | None = None
        #: event webhooks (fastim/backend/events.py): a "dm" event per message stored
        self.events: Events | None = None
        self._users: dict[str, UserState] = {}
        self._due: list[tuple[float, int, str, int]] = []  # (due, tiebreak, user, seq)
        self._tiebreak = 0
        self._tasks = Background("direct-message", spawn)
        # counters (metrics)
        self.sent = 0
        self.delivered = 0
        self.retried = 0
        self.store_errors = 0
        self.remote_in = 0  # cluster: messages received from other nodes
        self.remote_dups = 0  # ... of which already delivered here or acknowledged
        self.epoch_changes = 0  # inboxes seen to start a new numbering
        self.restarts = 0  # inbox epochs restarted here (the store went back)

    # ------------------------------------------------------------------ connections

    def attach(self, session: Session, user: str) -> None:
        """``session`` declared ``user``: replay its unacknowledged messages, then live."""
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = UserState()
            if self.relay is not None:
                self.relay.present(user)
                self._arrived(user)
        u.sessions.append(session)
        u.syncing[session] = []
        self._run(self._sync(session, user, u))

    def detach(self, session: Session, user: str) -> None:
        u = self._users.get(user)
        if u is None:
            return
        if session in u.sessions:
            u.sessions.remove(session)
        u.syncing.pop(session, None)
        if not u.sessions:
            # pending retries are dropped: the store has them, a reconnect replays them
            del self._users[user]
            if self.relay is not None:
                self.relay.absent(user)
                self._left(user)

    async def _sync(self, session: Session, user: str, u: UserState) -> None:
        try:
            state = await self.store.inbox_state(user)
            self._align(user, u, state.epoch)
            u.acked = max(u.acked, state.acked)
            after = state.acked
            backlog: list[InboxMessage] = []
            while True:
                page = await self.store.inbox_read(user, after, READ_PAGE)
                if page and page[0].epoch != u.epoch:
                    # the numbering started again between the two reads: read it anew
                    self._align(user, u, page[0].epoch)
                    backlog.clear()
                    page = await self.store.inbox_read(user, 0, READ_PAGE)
                backlog.extend(page)
                if len(page) < READ_PAGE:
                    break
                after = page[-1].seq
        except StoreError as e:
            self.store_errors += 1
            log.warning("inbox of %r could not be read: %s", user, e)
            if u.syncing.pop(session, None) is not None and session.is_open():
                session.send_event(
                    _error(None, ErrorCode.STORE_UNAVAILABLE, f"inbox unavailable: {e}")
                )
            return
        queued = u.syncing.pop(session, None)
        if queued is None or not session.is_open():
            return  # the connection went away meanwhile
        u.seen = max(u.seen, state.acked, backlog[-1].seq if backlog else 0)
        last = 0
        for msg in backlog:
            if msg.seq <= u.acked:
                continue
            ev = dm_event(msg)
            session.send_event(ev)
            self.delivered += 1
            last = msg.seq
            if msg.seq not in u.pending:
                self._track(user, u, msg.seq, ev)
        for seq, ev in queued:
            if seq > last and seq > u.acked:
                session.send_event(ev)
                self.delivered += 1

    # ------------------------------------------------------------------ commands

    def send(self, session: Session, req_id: Any, to: str, data: bytes, cid: str | None) -> None:
        """``send``: store for ``to``, answer ``sent`` (or an error), deliver."""
        self._run(self._send(session, req_id, to, data, cid))

    async def _send(
        self, session: Session, req_id: Any, to: str, data: bytes, cid: str | None
    ) -> None:
        sender = session.user
        try:
            res = await self.stored(to, await self.store.inbox_append(to, data, cid, sender))
        except InboxFull as e:
            session.send_event(_error(req_id, ErrorCode.INBOX_FULL, str(e)))
            return
        except StoreError as e:
            self.store_errors += 1
            reason = f"not sent, retry with the same cid: {e}"
            session.send_event(_error(req_id, ErrorCode.STORE_UNAVAILABLE, reason))
            return
        reply: dict[str, Any] = {
            "op": "sent",
            "to": to,
            "mid": res.msg_id,
            "seq": res.seq,
            "epoch": res.epoch,
            "dup": res.duplicate,
        }
        if req_id is not None:
            reply["id"] = req_id
        session.send_event(orjson.dumps(reply))
        self.sent += 1
        if not res.duplicate:
            self.deliver(to, InboxMessage(res.seq, res.msg_id, sender, data, res.epoch))

    async def stored(self, user: str, res: InboxAppended) -> InboxAppended:
        """An append's result, after a look at whether the inbox went back.

        A new message whose ``seq`` was already acknowledged in the same epoch, or
        names another message delivered here and not yet acknowledged, means the
        store numbers again from an older state (a restored backup): clients would
        drop it as a copy. The inbox gets a new epoch
        first (compare-and-set in the store), and the message is delivered in it.
        Raises :class:`StoreError` when that cannot be done (nothing is acknowledged).
        """
        u = self._users.get(user)
        if res.duplicate or u is None or u.epoch != res.epoch:
            return res
        # appends complete in any order (several store connections), so only what a
        # consistent store can never do counts: a new message with a seq already
        # acknowledged, or with the seq of another message delivered here
        prior = u.pending.get(res.seq)
        if res.seq > u.acked and (prior is None or event_mid(prior[0]) == res.msg_id):
            return res
        log.warning(
            "inbox of %r: the store gave a new message seq %d in epoch %s, which names "
            "another message here (acked up to %d; restored from an older backup?): "
            "starting a new epoch",
            user,
            res.seq,
            res.epoch,
            u.acked,
        )
        state = await self.store.inbox_restart_epoch(user, res.epoch)
        self.restarts += 1
        return res._replace(epoch=state.epoch)

    def deliver(self, user: str, msg: InboxMessage) -> None:
        """Send a message just stored to every connection of ``user`` here (tracked for
        retry) and, in a cluster, to the other nodes holding connections of ``user``."""
        if self.events is not None:
            self.events.dm(user, msg.sender, msg.seq, msg.msg_id, msg.epoch)
        ev = dm_event(msg)
        u = self._users.get(user)
        if u is not None:
            self._align(user, u, msg.epoch)
            self._deliver(user, u, msg.seq, ev)
        if self.relay is not None:
            self.relay.relay(user, msg.seq, ev)

    def _align(self, user: str, u: UserState, epoch: str) -> None:
        """The store says ``user``'s inbox is in ``epoch``: a new one ends the old
        numbering here (its pending retries and acked sequence mean nothing now)."""
        if not epoch or epoch == u.epoch:
            return
        if u.epoch:
            log.warning("inbox of %r started a new numbering: epoch %s -> %s", user, u.epoch, epoch)
            self.epoch_changes += 1
            u.pending.clear()
            u.due.clear()
            u.acked = 0
            u.seen = -1
        u.epoch = epoch

    def deliver_remote(self, user: str, seq: int, ev: bytes) -> bool:
        """Cluster: a message another node stored, for ``user``'s connections here.

        Dropped when ``user`` has no connection here any more (the route was stale) or
        when it was delivered here already (by a re-check, or twice on the link's way).
        Returns whether it was delivered.
        """
        self.remote_in += 1
        u = self._users.get(user)
        if u is None:
            return False
        epoch = event_epoch(ev)
        if epoch and u.epoch and epoch != u.epoch:
            # another numbering than the one this node knows: the store decides which
            # is current (an old one's message is not delivered again)
            self._check(user, 0.0)
            return False
        if seq <= u.acked or seq in u.pending:
            self.remote_dups += 1
            return False
        self._deliver(user, u, seq, ev)
        return True

    def _deliver(self, user: str, u: UserState, seq: int, ev: bytes) -> None:
        if self.relay is not None and u.seen >= 0 and seq > u.seen + 1:
            # an earlier seq has not come (yet): another node's frame may be behind
            # this one, or it never knew our route; look at the inbox if it stays open
            self._check(user, self.gap_wait)
        if seq > u.seen:
            u.seen = seq
        for s in u.sessions:
            q = u.syncing.get(s)
            if q is not None:
                q.append((seq, ev))
            else:
                s.send_event(ev)
                self.delivered += 1
        self._track(user, u, seq, ev)

    def ack(self, session: Session, req_id: Any, seq: int, epoch: str | None = None) -> None:
        """``ack`` up to ``seq``; with ``epoch`` (clients that know epochs send it), an
        ack for another epoch than the inbox's changes nothing."""
        user = session.user
        assert user is not None
        u = self._users.get(user)
        if u is not None and seq <= u.acked and u.epoch and epoch in (None, u.epoch):
            if req_id is not None:
                session.send_event(_acked(req_id, u.acked, u.epoch))
            return
        self._run(self._ack(session, req_id, user, seq, epoch))

    async def _ack(
        self, session: Session, req_id: Any, user: str, seq: int, epoch: str | None
    ) -> None:
        try:
            state = await self.store.inbox_ack(user, seq, epoch)
        except AckOutOfRange as e:
            session.fail(BadRequest(f'field "seq": {e}'), req_id)
            return
        except StoreError as e:
            self.store_errors += 1
            session.send_event(_error(req_id, ErrorCode.STORE_UNAVAILABLE, f"ack not stored: {e}"))
            return
        u = self._users.get(user)
        if u is not None:
            self._align(user, u, state.epoch)
            if state.acked > u.acked:
                u.acked = state.acked
                for s in [s for s in u.pending if s <= state.acked]:
                    del u.pending[s]
        if req_id is not None:
            session.send_event(_acked(req_id, state.acked, state.epoch))

    def inbox(self, session: Session, req_id: Any) -> None:
        self._run(self._inbox(session, req_id))

    async def _inbox(self, session: Session, req_id: Any) -> None:
        assert session.user is not None
        try:
            st = await self.store.inbox_state(session.user)
        except StoreError as e:
            session.send_event(_error(req_id, ErrorCode.STORE_UNAVAILABLE, str(e)))
            return
        reply: dict[str, Any] = {
            "op": "inbox",
            "acked": st.acked,
            "top": st.top,
            "epoch": st.epoch,
        }
        if req_id is not None:
            reply["id"] = req_id
        session.send_event(orjson.dumps(reply))

    # ------------------------------------------------------------------ retries

    def _track(self, user: str, u: UserState, seq: int, ev: bytes) -> None:
        u.pending[seq] = (ev, self.retry)
        self._schedule(user, seq, self.retry)

    def _schedule(self, user: str, seq: int, delay: float) -> None:
        self._tiebreak += 1
        now = asyncio.get_running_loop().time()
        heapq.heappush(self._due, (now + delay, self._tiebreak, user, seq))

    def on_tick(self, now: float) -> int:
        """Send again what is due; return how many messages were resent."""
        due = self._due
        resent = 0
        cluster = self.relay is not None
        while due and due[0][0] <= now:
            _t, _n, user, seq = heapq.heappop(due)
            u = self._users.get(user)
            if u is None or seq <= u.acked:
                continue
            if seq not in u.pending:
                continue
            if cluster:
                # another node may have taken the ack: look at the store first
                u.due.add(seq)
                self._check_at(user, now)
                continue
            if self._resend(user, u, seq):
                resent += 1
        if cluster:
            self._cluster_tick(now)
        return resent

    def _resend(self, user: str, u: UserState, seq: int) -> bool:
        """Send ``seq`` again to every connection of ``user`` not reading its backlog and
        retry it in twice the interval (up to :data:`MAX_RETRY`); False if it is no longer
        pending (acknowledged meanwhile)."""
        entry = u.pending.get(seq)
        if entry is None:
            return False
        ev, interval = entry
        for s in u.sessions:
            if s not in u.syncing:
                s.send_event(ev)
        self.retried += 1
        interval = min(interval * 2, MAX_RETRY)
        u.pending[seq] = (ev, interval)
        self._schedule(user, seq, interval)
        return True

    # ------------------------------------------------------------------ tasks

    def _run(self, coro: Any) -> None:
        self._tasks.run(coro)

    async def close(self) -> None:
        await self._tasks.cancel()


def _error(req_id: Any, code: int, reason: str) -> bytes:
    obj: dict[str, Any] = {"op": "error", "code": code, "reason": reason}
    if req_id is not None:
        obj["id"] = req_id
    return orjson.dumps(obj)


def _acked(req_id: Any, acked: int, epoch: str) -> bytes:
    return orjson.dumps({"op": "acked", "seq": acked, "epoch": epoch, "id": req_id})
