"""Event webhooks, the emitting side: what happened on this node, as events in the store's
outbox (docs/events.md). :mod:`.outbox` sends them to ``events_url``.

Who calls it: the session (connect, disconnect, unsubscribe), the hub (subscribe,
presence join/leave where the join/leave is decided, publish on an ``events_publish``
namespace), the postman and the HTTP API (a direct message stored). Each call builds
one event (a JSON object with a unique ``id``) and queues it; the events queued in one
event-loop tick go to the store as one :meth:`~fastim.store.Store.outbox_add` (one
sqlite transaction in the writer's group commit, one Redis script). One add is in
flight at a time, so the outbox holds a process's events in the order they happened.

Why disconnects survive a crash: a ``connect`` is written together with an *armed*
``disconnect`` (reason ``node_lost``) under this process's id, and a ``join`` with an
armed ``leave``; this process beats in the store every ``events_lease / 3`` seconds.
The real disconnect (or leave) *disarms* its key in the same write, and is written only
if the key was still armed. When the beats stop (``kill -9``, power loss, a hang), the
sender of the store (any process) claims the armed events: they go into the outbox,
atomically with being dropped. So every connect gets exactly one disconnect, from the
node or from its claimer, and a node that was only stalled does not add a second one.

Zero cost when off: the node has no :class:`Events` (``node.events is None``), and
every call site is one ``None`` check.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from ..codes import CloseCode
from ..config.events import event_kinds
from ..store import OutboxItem, Store, StoreError
from ..tasks import backoff_delay

log = logging.getLogger("fastim.events")

#: events a process may hold waiting for the store before new ones are dropped (and
#: counted): the store is down for long; RAM stays bounded
MAX_QUEUE = 100_000

#: armed-event order: a lost node's leaves come before its disconnects
_ORDER_LEAVE = 0
_ORDER_DISCONNECT = 1

#: disconnect reasons by close code (docs/events.md); a close the client started is
#: "client_closed", a connection that broke without a close "connection_lost"
REASONS = {
    int(CloseCode.NORMAL): "client_closed",
    int(CloseCode.GOING_AWAY): "shutdown",
    int(CloseCode.PROTOCOL_ERROR): "protocol_error",
    int(CloseCode.INVALID_DATA): "protocol_error",
    int(CloseCode.POLICY_VIOLATION): "protocol_error",
    int(CloseCode.MESSAGE_TOO_BIG): "protocol_error",
    int(CloseCode.INTERNAL_ERROR): "internal_error",
    int(CloseCode.HEARTBEAT_TIMEOUT): "heartbeat_timeout",
    int(CloseCode.SLOW_CONSUMER): "slow_consumer",
    int(CloseCode.RATE_LIMITED): "rate_limited",
    int(CloseCode.BAD_REQUEST): "protocol_error",
    int(CloseCode.AUTH_FAILED): "auth_failed",
    int(CloseCode.DISCONNECTED): "api_disconnect",
}


def disconnect_reason(close: tuple[int, str] | None, broken: bool) -> tuple[str, int | None]:
    """(reason, close code) of a connection that ended: ``close`` is the (code, reason)
    the server closed it with (None: it never did), ``broken``: the transport failed."""
    if close is None:
        return ("connection_lost" if broken else "client_closed"), None
    code, text = close
    if not text and code != int(CloseCode.GOING_AWAY):
        return "client_closed", code  # the server echoed the client's close frame
    return REASONS.get(code, "closed"), code


class Conn(Protocol):
    """A connection, as events see it: its user and its connection id (``eid``, "" until
    its first event names it)."""

    user: str | None
    eid: str


class Events:
    """Builds events and writes them, in order, to the store's outbox; beats for the
    process so that its connections' disconnects are claimed if it dies."""

    def __init__(
        self,
        store: Store,
        node: str,
        kinds: str,
        lease: float,
        on_added: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        #: this run of the process, under which it beats and arms: a node restarted
        #: with the same id (kill -9, then start) is another run, so the old run's
        #: armed events are claimed when its beats stop
        self.run = f"{node}~{secrets.token_hex(4)}"
        self.kinds = event_kinds(kinds)
        self.lease = lease
        #: called after each write that added events (the local sender wakes up)
        self.on_added = on_added
        self._on = {k: k in self.kinds for k in ("connect", "disconnect", "subscribe")}
        self.track = "connect" in self.kinds or "disconnect" in self.kinds
        # ids: 64 random bits per process, then a counter (unique without a syscall each)
        self._prefix = secrets.token_hex(8)
        self._n = 0
        self._queue: list[OutboxItem] = []
        self._writing = False
        self._scheduled = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._beat_task: asyncio.Task[None] | None = None
        self._stopped = False
        # counters (fastim.api.metrics)
        self.emitted = 0
        self.dropped = 0
        self.store_errors = 0
        #: the outbox as last seen (refreshed with each beat): depth, oldest, armed
        self.depth = 0
        self.oldest: float | None = None
        self.armed = 0

    # ------------------------------------------------------------------ ids and shapes

    def new_id(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:x}"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"id": self.new_id(), "type": kind, "time": int(time.time() * 1000)}
        ev["node"] = self.node
        ev.update(fields)
        return ev

    def _lost(self, kind: str, order: int, key: str, **fields: Any) -> tuple[str, str, int, bytes]:
        """The armed form of an event: emitted by a claimer if this process dies. The
        claimer appends ``,"time":<ms>}``, so the object is encoded without "time" and
        without its closing brace."""
        ev = {"id": self.new_id(), "type": kind, "node": self.node, **fields}
        return key, self.run, order, orjson.dumps(ev)[:-1]

    def _put(self, item: OutboxItem) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("events: the store is behind, %d events dropped", self.dropped)
            return
        self._queue.append(item)
        self.emitted += 1
        if not self._writing and not self._scheduled:
            self._scheduled = True
            self._idle.clear()
            asyncio.get_running_loop().call_soon(self._flush)

    # ------------------------------------------------------------------ the emitters

    def connected(self, conn: Conn) -> None:
        """``conn`` has a user (declared, or from its token): ``connect``, and its
        ``disconnect`` armed."""
        if not self.track or conn.user is None:
            return
        # the id the proxy hooks already know the connection by, when they asked first
        hooked = getattr(conn, "backend", None)
        eid = conn.eid = hooked.client if hooked is not None else self.new_id()
        fields = {"user": conn.user, "client": eid}
        data = orjson.dumps(self._event("connect", **fields)) if self._on["connect"] else b""
        arm = None
        if self._on["disconnect"]:
            arm = self._lost(
                "disconnect", _ORDER_DISCONNECT, "c:" + eid, reason="node_lost", **fields
            )
        self._put(OutboxItem(data, arm))

    def disconnected(self, conn: Conn, close: tuple[int, str] | None, broken: bool) -> None:
        """``conn`` is gone: ``disconnect`` with the reason, replacing the armed one."""
        eid = conn.eid
        if not eid or not self._on["disconnect"]:
            return
        reason, code = disconnect_reason(close, broken)
        ev = self._event("disconnect", user=conn.user, client=eid, reason=reason)
        if code is not None:
            ev["code"] = code
        self._put(OutboxItem(orjson.dumps(ev), disarm="c:" + eid))

    def subscribed(self, conn: Conn, channel: str) -> None:
        if conn.eid and "subscribe" in self.kinds:
            ev = self._event("subscribe", user=conn.user, client=conn.eid, channel=channel)
            self._put(OutboxItem(orjson.dumps(ev)))

    def unsubscribed(self, conn: Conn, channel: str) -> None:
        if conn.eid and "unsubscribe" in self.kinds:
            ev = self._event("unsubscribe", user=conn.user, client=conn.eid, channel=channel)
            self._put(OutboxItem(orjson.dumps(ev)))

    def presence(self, channel: str, op: str, user: str) -> None:
        """A node-wide join/leave, where it is decided (the channel's owner worker)."""
        if op not in self.kinds and not (op == "join" and "leave" in self.kinds):
            return
        key = f"p:{self.run}\x00{channel}\x00{user}"
        if op == "join":
            data = b""
            if "join" in self.kinds:
                data = orjson.dumps(self._event("join", user=user, channel=channel))
            arm = None
            if "leave" in self.kinds:
                arm = self._lost(
                    "leave", _ORDER_LEAVE, key, user=user, channel=channel, reason="node_lost"
                )
            self._put(OutboxItem(data, arm))
        else:
            ev = self._event("leave", user=user, channel=channel)
            self._put(OutboxItem(orjson.dumps(ev), disarm=key))

    def dm(self, to: str, sender: str | None, seq: int, mid: str, epoch: str) -> None:
        """A direct message was stored (not a duplicate of an earlier send)."""
        if "dm" in self.kinds:
            ev = self._event("dm", user=to, sender=sender, seq=seq, mid=mid, epoch=epoch)
            self._put(OutboxItem(orjson.dumps(ev)))

    def published(self, channel: str, offset: int, epoch: str, data: bytes) -> None:
        """A publish on an ``events_publish`` namespace was numbered (``data`` is JSON)."""
        if "publish" in self.kinds:
            ev = self._event("publish", channel=channel, offset=offset, epoch=epoch)
            ev["data"] = orjson.Fragment(data)
            self._put(OutboxItem(orjson.dumps(ev)))

    # ------------------------------------------------------------------ writing

    def _flush(self) -> None:
        self._scheduled = False
        if self._writing or not self._queue:
            if not self._writing:
                self._idle.set()
            return
        self._writing = True
        batch, self._queue = self._queue, []
        asyncio.get_running_loop().create_task(self._write(batch))

    async def _write(self, batch: list[OutboxItem]) -> None:
        """One outbox add at a time (order); a failed add is retried, first, until it
        works: the events wait in memory (bounded by MAX_QUEUE), in order."""
        attempt = 0
        while True:
            try:
                await self.store.outbox_add(batch)
                break
            except StoreError as e:
                self.store_errors += 1
                if attempt == 0:
                    log.warning("events: outbox write failed, retrying: %s", e)
                if self._stopped and attempt >= 3:
                    log.error("events: %d events not written at shutdown: %s", len(batch), e)
                    break
                await asyncio.sleep(backoff_delay(attempt, 0.05, 2.0))
                attempt += 1
        self._writing = False
        if self.on_added is not None:
            self.on_added()
        if self._queue:
            self._flush()
        else:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every event queued so far is in the store."""
        while self._queue or self._writing or self._scheduled:
            await self._idle.wait()
            if self._queue and not self._writing and not self._scheduled:
                self._flush()
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ liveness

    async def start(self) -> None:
        """Beat once (before any event is armed under this process), then every
        ``lease / 3`` seconds."""
        await self.store.outbox_beat(self.run, self.lease)
        self._beat_task = asyncio.get_running_loop().create_task(self._beats())

    async def _beats(self) -> None:
        every = self.lease / 3
        while True:
            await asyncio.sleep(min(every, 1.0))
            try:
                await self.store.outbox_beat(self.run, self.lease)
                self.depth, self.oldest, self.armed = await self.store.outbox_stats()
            except StoreError as e:
                self.store_errors += 1
                log.warning("events: beat failed: %s", e)

    async def stop(self) -> None:
        """Write what is queued (graceful stop: the disconnects of the closed sessions),
        then stop beating."""
        self._stopped = True
        try:
            await asyncio.wait_for(self.drain(), 10.0)
        except asyncio.TimeoutError:
            log.error("events: %d events not written at shutdown", len(self._queue))
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
