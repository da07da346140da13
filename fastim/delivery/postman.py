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
inbox state from the store (:meth:`Postman._recheck`): the store is the truth, no ack
notice has to travel between nodes, and a message that no DM frame brought (the sender's
node did not know the route yet, a link was down) is read from the inbox and delivered.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from ..errors import BadRequest, ProtocolError
from ..protocol import ErrorCode
from ..store import AckOutOfRange, InboxAppended, InboxFull, InboxMessage, Store, StoreError
from ..tasks import Background


class Session(Protocol):
    """A connection of a user, as the postman sees it (a :class:`fastim.session.Session`
    to the node): it is sent events, and failed when its command is bad."""

    user: str | None

    def is_open(self) -> bool: ...

    def send_event(self, body: bytes) -> None: ...

    def fail(self, err: ProtocolError, req_id: Any = None) -> None: ...

log = logging.getLogger("fastim")

MAX_RETRY = 60.0
#: cluster: after a user's route is written, inbox checks at route_poll and at this many
#: times route_poll (a sender's node whose watch lags stored without sending a frame)
SETTLE_CHECKS = 6
READ_PAGE = 1000


_DM_EPOCH = b'{"op":"dm","epoch":"'


def dm_event(msg: InboxMessage) -> bytes:
    """The ``dm`` event's JSON text; ``data`` is spliced in as stored (already JSON).

    The epoch comes first, so :func:`event_epoch` finds it without parsing."""
    return b"".join(
        (
            _DM_EPOCH,
            msg.epoch.encode(),
            b'","from":',
            orjson.dumps(msg.sender),
            b',"mid":"',
            msg.msg_id.encode(),
            b'","seq":',
            str(msg.seq).encode(),
            b',"data":',
            msg.data,
            b"}",
        )
    )


def event_epoch(ev: bytes) -> str:
    """The inbox epoch of a ``dm`` event made by :func:`dm_event` ("" if none)."""
    if not ev.startswith(_DM_EPOCH):
        return ""
    n = len(_DM_EPOCH)
    return ev[n : ev.find(b'"', n)].decode()


def event_mid(ev: bytes) -> str:
    """The message id of a ``dm`` event made by :func:`dm_event`."""
    i = ev.find(b'"mid":"')
    if i < 0:
        return ""
    i += 7
    return ev[i : ev.find(b'"', i)].decode()


class Relay(Protocol):
    """The cluster side of direct messages (:class:`fastim.cluster.dm.DmRouter`)."""

    def present(self, user: str) -> None:
        """``user``'s first connection here: publish the route user → this node."""

    def absent(self, user: str) -> None:
        """``user``'s last connection here closed: withdraw the route."""

    def registered(self, user: str) -> bool:
        """Whether the other nodes can find ``user`` here (its route is in etcd)."""

    def relay(self, user: str, seq: int, event: bytes) -> None:
        """A message stored here for ``user``: send it to the other nodes holding it."""


class _User:
    """What the node knows of one user with connections here."""

    __slots__ = ("acked", "checking", "due", "epoch", "pending", "seen", "sessions", "syncing")

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        #: the inbox's epoch as last seen in the store ("" until known): ``acked``,
        #: ``pending`` and ``seen`` count sequences of this epoch
        self.epoch = ""
        #: connections still reading their backlog → live events queued for them
        self.syncing: dict[Session, list[tuple[int, bytes]]] = {}
        self.acked = 0
        #: seq → (event bytes, current retry interval), delivered and not yet acked
        self.pending: dict[int, tuple[bytes, float]] = {}
        #: the highest seq delivered here or acknowledged (a higher one arriving first
        #: means a gap); -1 until the first delivery or the backlog read tells
        self.seen = -1
        #: cluster: seqs whose retry is due, resent after a look at the store's ack
        self.due: set[int] = set()
        #: cluster: a store re-check is in flight
        self.checking = False


class Postman:
    """The node's direct-message router (one per node)."""

    def __init__(
        self,
        store: Store,
        retry: float = 2.0,
        spawn: Callable[[Any], Any] | None = None,
    ) -> None:
        self.store = store
        self.retry = retry
        #: cluster only (None on a single node): where messages for users with
        #: connections on other nodes go, and where routes are published
        self.relay: Relay | None = None
        #: cluster: seconds a suspected gap (a seq past the next one) is given to close
        #: by itself (DM frames from two nodes may cross) before the inbox is read
        self.gap_wait = 0.25
        #: cluster: seconds between inbox checks for users whose route is not in etcd
        #: yet (other nodes cannot send to them), and after it is, before the last one
        self.route_poll = 0.5
        self._users: dict[str, _User] = {}
        # cluster: user -> when to re-check its inbox (the earliest asked), and a heap of
        # (when, user) to find the due ones without a scan (stale entries are skipped)
        self._checks: dict[str, float] = {}
        self._check_heap: list[tuple[float, str]] = []
        self._unrouted: set[str] = set()  # cluster: local users whose route is not written
        self._settling: list[tuple[float, str]] = []  # cluster: heap of late checks after routed
        self._next_poll = 0.0
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
        self.rechecks = 0  # cluster: store re-checks
        self.filled = 0  # cluster: messages found in the inbox by a re-check
        self.epoch_changes = 0  # inboxes seen to start a new numbering
        self.restarts = 0  # inbox epochs restarted here (the store went back)

    # ------------------------------------------------------------------ connections

    def attach(self, session: Session, user: str) -> None:
        """``session`` declared ``user``: replay its unacknowledged messages, then live."""
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = _User()
            if self.relay is not None:
                self.relay.present(user)
                self._unrouted.add(user)
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
                self._unrouted.discard(user)
                self._checks.pop(user, None)

    async def _sync(self, session: Session, user: str, u: _User) -> None:
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

    def send(
        self, session: Session, req_id: Any, to: str, data: bytes, cid: str | None
    ) -> None:
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
        ev = dm_event(msg)
        u = self._users.get(user)
        if u is not None:
            self._align(user, u, msg.epoch)
            self._deliver(user, u, msg.seq, ev)
        if self.relay is not None:
            self.relay.relay(user, msg.seq, ev)

    def _align(self, user: str, u: _User, epoch: str) -> None:
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

    def _deliver(self, user: str, u: _User, seq: int, ev: bytes) -> None:
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

    def _track(self, user: str, u: _User, seq: int, ev: bytes) -> None:
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
            entry = u.pending.get(seq)
            if entry is None:
                continue
            if cluster:
                # another node may have taken the ack: look at the store first
                u.due.add(seq)
                self._check_at(user, now)
                continue
            ev, interval = entry
            for s in u.sessions:
                if s not in u.syncing:
                    s.send_event(ev)
            resent += 1
            interval = min(interval * 2, MAX_RETRY)
            u.pending[seq] = (ev, interval)
            self._schedule(user, seq, interval)
        self.retried += resent
        if cluster:
            self._cluster_tick(now)
        return resent

    # ------------------------------------------------------------------ cluster

    def routed(self, users: list[str]) -> None:
        """Cluster: these local users' routes are now in etcd. A message stored before
        the other nodes saw the route reached no connection here: inbox checks
        ``route_poll`` seconds later (time for their watches to catch up) and, for a
        watch that lags, ``SETTLE_CHECKS`` times that, find it."""
        later = asyncio.get_running_loop().time() + self.route_poll * SETTLE_CHECKS
        for user in users:
            if user in self._users:
                self._unrouted.discard(user)
                self._check(user, self.route_poll)
                heapq.heappush(self._settling, (later, user))

    def recheck_all(self, delay: float = 0.0) -> int:
        """Cluster: re-check the inbox of every user with connections here in ``delay``
        seconds (a link from another node came up: what it sent while it was down, or
        queued when it broke, is lost). Returns how many users."""
        for user in self._users:
            self._check(user, delay)
        return len(self._users)

    def _check(self, user: str, delay: float) -> None:
        """Re-check ``user``'s inbox in ``delay`` seconds (sooner if already asked)."""
        self._check_at(user, asyncio.get_running_loop().time() + delay)

    def _check_at(self, user: str, when: float) -> None:
        if when < self._checks.get(user, when + 1):
            self._checks[user] = when
            heapq.heappush(self._check_heap, (when, user))

    def _cluster_tick(self, now: float) -> None:
        if self._unrouted and now >= self._next_poll:
            # routes not written (etcd slow or away): other nodes cannot send here
            self._next_poll = now + self.route_poll
            relay = self.relay
            assert relay is not None
            for user in list(self._unrouted):
                if relay.registered(user):
                    self.routed([user])
                else:
                    self._check_at(user, now)
        settling = self._settling
        while settling and settling[0][0] <= now:
            user = heapq.heappop(settling)[1]
            if user in self._users:
                self._check_at(user, now)
        heap = self._check_heap
        while heap and heap[0][0] <= now:
            when, user = heapq.heappop(heap)
            if self._checks.get(user) != when:
                continue  # superseded by an earlier request, or done
            u = self._users.get(user)
            if u is None:
                del self._checks[user]
            elif u.checking:
                # one check per user at a time: this one follows the running one
                del self._checks[user]
                self._check_at(user, now + 0.05)
            else:
                del self._checks[user]
                u.checking = True
                self._run(self._recheck(user, u))

    async def _recheck(self, user: str, u: _User) -> None:
        """Cluster: bring ``user``'s connections here in line with the inbox in the store.

        Takes the acked sequence (acks other nodes wrote), delivers what is stored and
        was never delivered here, and resends the messages whose retry is due and that
        are still unacknowledged. Without the store, the due ones are resent anyway (as
        on one node: a duplicate is better than a stall).
        """
        self.rechecks += 1
        due, u.due = u.due, set()  # seqs falling due meanwhile wait for the next check
        try:
            try:
                state = await self.store.inbox_state(user)
                missing: list[InboxMessage] = []
                if state.top - state.acked > sum(1 for q in u.pending if q > state.acked):
                    after = max(state.acked, u.acked)
                    while True:
                        page = await self.store.inbox_read(user, after, READ_PAGE)
                        missing.extend(m for m in page if m.seq not in u.pending)
                        if len(page) < READ_PAGE:
                            break
                        after = page[-1].seq
            except StoreError as e:
                self.store_errors += 1
                log.info("inbox of %r could not be re-checked: %s", user, e)
                state = None
                missing = []
            if self._users.get(user) is not u:
                return  # every connection left meanwhile
            if state is not None:
                self._align(user, u, state.epoch)
                missing = [m for m in missing if m.epoch == u.epoch]
                u.seen = max(u.seen, state.acked)
            if state is not None and state.acked > u.acked:
                u.acked = state.acked
                for seq in [seq for seq in u.pending if seq <= u.acked]:
                    del u.pending[seq]
            for msg in missing:
                if msg.seq > u.acked and msg.seq not in u.pending:
                    self.filled += 1
                    self._deliver(user, u, msg.seq, dm_event(msg))
            resent = 0
            for seq in sorted(due):
                entry = u.pending.get(seq)
                if entry is None:
                    continue
                ev, interval = entry
                for session in u.sessions:
                    if session not in u.syncing:
                        session.send_event(ev)
                resent += 1
                interval = min(interval * 2, MAX_RETRY)
                u.pending[seq] = (ev, interval)
                self._schedule(user, seq, interval)
            self.retried += resent
        finally:
            u.checking = False

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
