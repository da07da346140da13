"""The reader of the client SDK: it reads each connection's frames and dispatches them.

Replies resolve the pending request with the same id (an ERROR, or a JSON ``error``,
fails it), MSG frames go to the queue of their :class:`Subscription` (anything at or
below its offset is a copy and is dropped), ``dm`` events to the direct-message inbox,
PINGs are answered at once, a GOAWAY ends the connection; JSON events the client does
not handle itself go to ``on_event``.

A subscribe's reply is handled here, in the reader, before any message that follows
it: it registers the subscription and places it in the channel's history (recovered,
or a :class:`Gap` and where the stream goes on). So are the subscriptions sent again on
a new connection (with ``since``: where each one is) and after the node lost a
channel's history while subscribed (a ``resubscribe`` event).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from .. import protocol
from .._core import encode_frame, fossil_apply
from ..errors import ConnectionClosed, ProtocolError, RequestError
from ..protocol import ErrorCode, FrameType
from .connection import Connection
from .direct import DirectInbox
from .heartbeat import Heartbeat
from .requests import TRANSIENT, Pending, PendingRequests, future, request_error, resolve
from .subscription import Gap, Message, Subscription

__all__ = ["Dispatcher", "ReaderHost"]

log = logging.getLogger("fastim.client")

#: first and last delay between attempts of a resubscribe the store could not serve
_RESUB_RETRY = (0.2, 5.0)


class ReaderHost(Protocol):
    """What the reader needs of its client: the connection, the subscriptions by
    channel, why a connection was dropped on purpose, and a few actions."""

    on_event: Callable[[dict[str, Any]], object] | None
    _conn: Connection | None
    _subs: dict[str, Subscription]
    _abort_reason: ConnectionClosed | None

    @property
    def connected(self) -> bool: ...

    def _send_unsub(self, channel: str) -> None: ...

    def _inbox_ok(self) -> None: ...

    def _inbox_unavailable(self) -> None: ...


class Dispatcher:
    """Reads a client's connections and dispatches their frames (one per client)."""

    def __init__(
        self,
        host: ReaderHost,
        requests: PendingRequests,
        inbox: DirectInbox,
        heartbeat: Heartbeat,
    ) -> None:
        self._host = host
        self._requests = requests
        self._inbox = inbox
        self._heartbeat = heartbeat

    async def serve(self, conn: Connection, rest: list[tuple[int, bytes]]) -> ConnectionClosed:
        """Read and dispatch until the connection ends; return why it ended.

        ``rest``: frames that came in the same chunk as WELCOME, dispatched first.
        """
        loop = asyncio.get_running_loop()
        heartbeat = self._heartbeat
        try:
            for ftype, payload in rest:
                self.dispatch(ftype, payload)
            while True:
                frames = await conn.read_frames()
                heartbeat.last_rx = loop.time()
                for ftype, payload in frames:
                    self.dispatch(ftype, payload)
        except ConnectionClosed as e:
            return self._host._abort_reason or e
        except ProtocolError as e:
            log.warning("fastim client: protocol error from %s: %s", conn.url, e.reason)
            await conn.close(e.close_code, e.reason[:100])
            return ConnectionClosed(e.close_code, f"protocol error from server: {e.reason}")
        except OSError as e:
            return self._host._abort_reason or ConnectionClosed(1006, f"connection lost: {e}")

    def dispatch(self, ftype: int, payload: bytes) -> None:
        try:
            if ftype == FrameType.MSG:
                self._on_msg(payload)
            elif ftype == FrameType.DELTA:
                self._on_delta(payload)
            elif ftype == FrameType.EVENT:
                self._on_event(payload)
            elif ftype == FrameType.SUBSCRIBED:
                req_id, off, ch, epoch, recovered = protocol.unpack_subscribed(payload)
                p = self._requests.pop(req_id)
                if p is None:
                    self._late_subscribed(ch)
                    return
                self._on_subscribed(p, ch, off, epoch, recovered)
                resolve(p, (ftype, payload))
            elif ftype == FrameType.PUBACK:
                req_id, _off, _ch = protocol.unpack_ack(payload)
                self._requests.reply(req_id, (ftype, payload))
            elif ftype == FrameType.UNSUBSCRIBED:
                req_id, _ch = protocol.unpack_unsubscribed(payload)
                self._requests.reply(req_id, (ftype, payload))
            elif ftype == FrameType.ERROR:
                self._on_error(payload)
            elif ftype == FrameType.PING:
                conn = self._host._conn
                if conn is not None:
                    conn.write(encode_frame(FrameType.PONG, payload))
            elif ftype == FrameType.GOAWAY:
                code, reason = protocol.unpack_goaway(payload)
                raise ConnectionClosed(code, reason)
            # PONG: liveness is recorded when the bytes arrive; WELCOME again: ignored
        except struct.error as e:
            raise ProtocolError(f"malformed {FrameType(ftype).name} payload: {e}") from None

    def _on_msg(self, payload: bytes) -> None:
        offset, channel, data = protocol.unpack_msg(payload)
        sub = self._host._subs.get(channel)
        if sub is None or offset <= sub.offset or sub._resyncing:
            return  # not (or no longer) subscribed, already delivered, or coming again
        if sub.delta:
            sub._base, sub._base_off = data, offset
        self._take(sub, channel, offset, data)

    def _on_delta(self, payload: bytes) -> None:
        """A DELTA frame: the message as a Fossil delta against the previous message of
        the channel, which this subscription must hold (offset - 1). Otherwise, or if
        it does not apply, resubscribe with ``since``: recovery sends the missed
        messages full, so nothing is lost (docs/delta.md)."""
        offset, channel, delta = protocol.unpack_msg(payload)
        sub = self._host._subs.get(channel)
        if sub is None or offset <= sub.offset or sub._resyncing:
            return
        base = sub._base
        data = None
        if base is not None and sub._base_off == offset - 1 == sub.offset:
            try:
                data = fossil_apply(base, delta)
            except ValueError as e:
                log.warning(
                    "fastim client: %r offset %d: delta not applied: %s", channel, offset, e
                )
        if data is None:
            sub.delta_failures += 1
            self._resync(sub)
            return
        sub.deltas += 1
        sub._base, sub._base_off = data, offset
        self._take(sub, channel, offset, data)

    def _resync(self, sub: Subscription) -> None:
        """Subscribe ``sub`` again from its offset, for full messages (see _on_delta)."""
        conn = self._host._conn
        sub._resyncing = True
        sub._base = None
        if conn is None:
            return  # the next connection resubscribes anyway
        self._host._send_unsub(sub.channel)
        with contextlib.suppress(ConnectionClosed):
            self.resubscribe(conn, sub)

    def _take(self, sub: Subscription, channel: str, offset: int, data: bytes) -> None:
        sub.offset = offset
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            log.warning("fastim client: %r offset %d: data is not JSON (%s)", channel, offset, e)
            return
        sub._deliver(Message(channel, offset, value))

    def _on_event(self, payload: bytes) -> None:
        """An EVENT frame: a JSON reply to a CMD (by ``id``) or an event of the node."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"EVENT payload is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("EVENT payload is not a JSON object")
        op = obj.get("op")
        if op == "dm":
            self._host._inbox_ok()
            self._inbox.on_dm(obj)
            return
        if op == "resubscribe":
            self._on_resubscribe(obj)
            return
        req_id = obj.get("id")
        p = None
        if isinstance(req_id, int) and not isinstance(req_id, bool):
            p = self._requests.pop(req_id)
        if p is None:
            if op == "subscribed":
                self._late_subscribed(obj.get("ch"))
            elif op == "error":
                self._on_unsolicited_error(obj)
            elif req_id is None:
                on_event = self._host.on_event
                if on_event is not None:
                    try:
                        on_event(obj)
                    except Exception:
                        log.exception("fastim client: on_event callback failed")
            return
        if op == "error":
            code, reason = obj.get("code"), obj.get("reason")
            if not p.future.done():
                p.future.set_exception(
                    request_error(code if isinstance(code, int) else 0, str(reason or ""))
                )
            return
        if op == "subscribed":
            try:
                ch, off = str(obj["ch"]), int(obj["off"])
            except (KeyError, TypeError, ValueError):
                raise ProtocolError(f"malformed 'subscribed' reply: {obj!r}") from None
            self._on_subscribed(
                p, ch, off, str(obj.get("epoch") or ""), obj.get("recovered") is True
            )
        resolve(p, obj)

    def _on_error(self, payload: bytes) -> None:
        req_id, code, reason = protocol.unpack_error(payload)
        p = self._requests.pop(req_id) if req_id else None
        if p is None:
            if req_id:  # the answer to a request given up on (timeout, fire-and-forget)
                log.debug("fastim client: late error for request %d: %d %s", req_id, code, reason)
            else:  # connection-level (fatal) error: the GOAWAY / close that follows ends it
                log.warning("fastim client: server error %d: %s", code, reason)
            return
        if not p.future.done():
            p.future.set_exception(request_error(code, reason))

    def _on_unsolicited_error(self, obj: dict[str, Any]) -> None:
        code = obj.get("code")
        log.warning("fastim client: server error %s: %s", code, obj.get("reason"))
        # STORE_UNAVAILABLE without a request: the node could not read our inbox when we
        # connected, and will not replay the unacknowledged messages on this connection
        if code == ErrorCode.STORE_UNAVAILABLE:
            self._host._inbox_unavailable()

    # ----------------------------------------------------------------- subscriptions

    def _on_subscribed(self, p: Pending, ch: str, off: int, epoch: str, recovered: bool) -> None:
        """A subscribe was answered: register it, and place it in the channel's history.

        Runs in the reader, before any message that follows the reply is dispatched:
        the replayed messages and the live ones meet the right ``offset``.
        """
        sub = p.sub
        if sub is None:
            return
        sub._resyncing = False
        sub._base = None  # a delta follows a full message of this subscription
        subs = self._host._subs
        if p.resubscribe:
            if subs.get(ch) is not sub:  # unsubscribed while re-subscribing
                self._host._send_unsub(ch)
                return
        else:
            subs[ch] = sub
        since = p.since
        if since is None:
            if p.resubscribe and sub.offset:
                log.info(
                    "fastim client: %r resubscribed at %d without recovery (was at %d)",
                    ch,
                    off,
                    sub.offset,
                )
            sub._move(epoch, off)  # live messages after `off`
            return
        if recovered:
            sub.epoch = epoch  # (since.off, off] follow, then live ones
            return
        if epoch == since.epoch and off >= since.off:
            reason = "trimmed"  # what the node still had of (since.off, off] follows
        elif epoch != since.epoch:
            reason = "epoch"
            # the node sends what it has of the new epoch from its start, then live
            # ones (an epoch this subscription was in before resumes where it was left)
            sub._move(epoch, sub._left.get(epoch, 0))
        else:
            reason = "rewound"
            sub._move(epoch, off)  # offsets start again: live messages after `off`
        sub.epoch = epoch
        sub._gap(Gap(ch, since.epoch, since.off, epoch, off, reason))

    def _late_subscribed(self, ch: object) -> None:
        """The reply to a subscribe given up on (timeout): the server has it, we do not."""
        if isinstance(ch, str) and ch not in self._host._subs:
            self._host._send_unsub(ch)

    def _on_resubscribe(self, obj: dict[str, Any]) -> None:
        """The channel's history was lost while subscribed (a new epoch); the node
        dropped the subscription. Subscribe again from the start of the new epoch:
        what this subscription had came live, so nothing is missing unless the new
        epoch's history is (then the reply says recovered: false, and that is a gap)."""
        ch, epoch = obj.get("ch"), obj.get("epoch")
        sub = self._host._subs.get(ch) if isinstance(ch, str) else None
        conn = self._host._conn
        if sub is None or not isinstance(epoch, str):
            return
        log.info("fastim client: %r: history lost, new epoch %s", ch, epoch)
        if obj.get("complete") is False and sub.epoch and sub.epoch != epoch:
            # the node may not have had every message of the old epoch (its owner was
            # another node or worker): what came after our offset may be lost
            sub._gap(Gap(sub.channel, sub.epoch, sub.offset, epoch, 0, "epoch"))
        # an epoch names one history, never reused: one this subscription has been in
        # before (a store that answered wrongly for a while) is resumed where it was left
        sub._move(epoch, sub._left.get(epoch, 0))
        if conn is not None:
            with contextlib.suppress(ConnectionClosed):
                self.resubscribe(conn, sub)

    def resubscribe(self, conn: Connection, sub: Subscription) -> None:
        """Subscribe ``sub`` again on ``conn`` (the reply is handled by the reader).

        With ``since`` = where the subscription is, so the node sends what was missed,
        when the server has named an epoch; a server without epochs gets a plain SUB.
        """
        requests = self._requests
        req_id = requests.new_id()
        fut: asyncio.Future[Any] = future()
        fut.add_done_callback(functools.partial(self._resubscribed, sub, conn))
        if sub.epoch or sub.delta:
            since = sub.since if sub.epoch else None
            requests.add(req_id, Pending(fut, sub, resubscribe=True, since=since))
            cmd: dict[str, Any] = {"op": "sub", "ch": sub.channel, "id": req_id}
            if since is not None:
                cmd["since"] = since._asdict()
            if sub.delta:
                cmd["delta"] = "fossil"
            conn.write(encode_frame(FrameType.CMD, orjson.dumps(cmd)))
        else:
            requests.add(req_id, Pending(fut, sub, resubscribe=True))
            payload = protocol.pack_sub(FrameType.SUB, req_id, sub.channel)
            conn.write(encode_frame(FrameType.SUB, payload))

    def _resubscribed(self, sub: Subscription, conn: Connection, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            sub._retry_delay = 0.0
            return
        if not isinstance(exc, RequestError):
            return  # ConnectionClosed: the sub stays in _subs, resubscribed on the next connect
        subs = self._host._subs
        if subs.get(sub.channel) is not sub:
            return
        if exc.code in TRANSIENT:
            # the node could not read the history (or the channel's state, or ask the
            # channel's owner node): try again on this connection, later; the sub is not
            # on the node meanwhile
            delay = min(max(sub._retry_delay * 2, _RESUB_RETRY[0]), _RESUB_RETRY[1])
            sub._retry_delay = delay
            log.info("fastim client: resubscribe %r: %s; again in %.1fs", sub.channel, exc, delay)
            asyncio.get_running_loop().call_later(delay, self._retry_resubscribe, sub, conn)
            return
        log.warning("fastim client: re-subscribing to %r refused: %s", sub.channel, exc)
        del subs[sub.channel]
        sub._finish(exc, normal=False)

    def _retry_resubscribe(self, sub: Subscription, conn: Connection) -> None:
        host = self._host
        if host._conn is conn and host.connected and host._subs.get(sub.channel) is sub:
            with contextlib.suppress(ConnectionClosed):
                self.resubscribe(conn, sub)
