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

Retries are driven by the node's timer tick (no task or timer per message): a heap of
(due, user, seq); an unacknowledged message is sent again after ``dm_retry`` seconds,
doubling up to :data:`MAX_RETRY`, while its recipient has a connection here.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .errors import BadRequest
from .protocol import ErrorCode
from .store import AckOutOfRange, InboxFull, InboxMessage, Store, StoreError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("fastim")

MAX_RETRY = 60.0
READ_PAGE = 1000


def dm_event(msg: InboxMessage) -> bytes:
    """The ``dm`` event's JSON text; ``data`` is spliced in as stored (already JSON)."""
    return b"".join(
        (
            b'{"op":"dm","from":',
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


class _User:
    """What the node knows of one user with connections here."""

    __slots__ = ("acked", "pending", "sessions", "syncing")

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        #: connections still reading their backlog → live events queued for them
        self.syncing: dict[Session, list[tuple[int, bytes]]] = {}
        self.acked = 0
        #: seq → (event bytes, current retry interval), delivered and not yet acked
        self.pending: dict[int, tuple[bytes, float]] = {}


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
        self._users: dict[str, _User] = {}
        self._due: list[tuple[float, int, str, int]] = []  # (due, tiebreak, user, seq)
        self._tiebreak = 0
        self._spawn = spawn or asyncio.ensure_future
        self._tasks: set[asyncio.Future[Any]] = set()
        # counters (metrics)
        self.sent = 0
        self.delivered = 0
        self.retried = 0
        self.store_errors = 0

    # ------------------------------------------------------------------ connections

    def attach(self, session: Session, user: str) -> None:
        """``session`` declared ``user``: replay its unacknowledged messages, then live."""
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = _User()
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

    async def _sync(self, session: Session, user: str, u: _User) -> None:
        try:
            state = await self.store.inbox_state(user)
            u.acked = max(u.acked, state.acked)
            after = state.acked
            backlog: list[InboxMessage] = []
            while True:
                page = await self.store.inbox_read(user, after, READ_PAGE)
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
            res = await self.store.inbox_append(to, data, cid, sender)
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
            "dup": res.duplicate,
        }
        if req_id is not None:
            reply["id"] = req_id
        session.send_event(orjson.dumps(reply))
        self.sent += 1
        if not res.duplicate:
            self.deliver(to, InboxMessage(res.seq, res.msg_id, sender, data))

    def deliver(self, user: str, msg: InboxMessage) -> None:
        """Send a stored message to every connection of ``user`` here; track it for retry."""
        u = self._users.get(user)
        if u is None:
            return  # offline here: the inbox keeps it until a connection reads it
        ev = dm_event(msg)
        for s in u.sessions:
            q = u.syncing.get(s)
            if q is not None:
                q.append((msg.seq, ev))
            else:
                s.send_event(ev)
                self.delivered += 1
        self._track(user, u, msg.seq, ev)

    def ack(self, session: Session, req_id: Any, seq: int) -> None:
        user = session.user
        assert user is not None
        u = self._users.get(user)
        if u is not None and seq <= u.acked:
            if req_id is not None:
                session.send_event(_acked(req_id, u.acked))
            return
        self._run(self._ack(session, req_id, user, seq))

    async def _ack(self, session: Session, req_id: Any, user: str, seq: int) -> None:
        try:
            state = await self.store.inbox_ack(user, seq)
        except AckOutOfRange as e:
            session.fail(BadRequest(f'field "seq": {e}'), req_id)
            return
        except StoreError as e:
            self.store_errors += 1
            session.send_event(_error(req_id, ErrorCode.STORE_UNAVAILABLE, f"ack not stored: {e}"))
            return
        u = self._users.get(user)
        if u is not None and state.acked > u.acked:
            u.acked = state.acked
            for s in [s for s in u.pending if s <= state.acked]:
                del u.pending[s]
        if req_id is not None:
            session.send_event(_acked(req_id, state.acked))

    def inbox(self, session: Session, req_id: Any) -> None:
        self._run(self._inbox(session, req_id))

    async def _inbox(self, session: Session, req_id: Any) -> None:
        assert session.user is not None
        try:
            st = await self.store.inbox_state(session.user)
        except StoreError as e:
            session.send_event(_error(req_id, ErrorCode.STORE_UNAVAILABLE, str(e)))
            return
        reply: dict[str, Any] = {"op": "inbox", "acked": st.acked, "top": st.top}
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
        while due and due[0][0] <= now:
            _t, _n, user, seq = heapq.heappop(due)
            u = self._users.get(user)
            if u is None or seq <= u.acked:
                continue
            entry = u.pending.get(seq)
            if entry is None:
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
        return resent

    # ------------------------------------------------------------------ tasks

    def _run(self, coro: Any) -> None:
        task = self._spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("direct-message task failed", exc_info=task.exception())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _error(req_id: Any, code: int, reason: str) -> bytes:
    obj: dict[str, Any] = {"op": "error", "code": code, "reason": reason}
    if req_id is not None:
        obj["id"] = req_id
    return orjson.dumps(obj)


def _acked(req_id: Any, acked: int) -> bytes:
    return orjson.dumps({"op": "acked", "seq": acked, "id": req_id})
