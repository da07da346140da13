"""One connected client, whatever its transport: commands, subscriptions, heartbeat, close.

A session *is* the asyncio protocol of its connection (one object per client, no Task,
no Timer): the transports in :mod:`fastim.transport` subclass :class:`Session` and turn
bytes into calls of :meth:`Session.handle_frame` (fastim frames) or
:meth:`Session.handle_json` (WebSocket text). Everything the session sends goes through
its :class:`~fastim._core.OutRing`, so replies and channel messages keep their order
and leave in one write per loop tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import orjson

from .. import _core
from ..auth import AuthFailed, Identity
from ..errors import BadRequest, ProtocolError
from ..hub import HubError, Published, Since
from ..protocol import (
    CloseCode,
    ErrorCode,
    FrameType,
    Request,
    negotiate,
    pack_goaway,
    unpack_request,
    validate_channel,
)
from .commands import CID_MAX, history_field, json_data, since_field, user_id, welcome_tail
from .hooks import PERSONAL, Hooked
from .host import Host
from .replies import TCP_REPLIES, Replies

log = logging.getLogger("fastim")

HANDSHAKE, OPEN, CLOSING, CLOSED = range(4)

_F = FrameType


class Session(Hooked, asyncio.Protocol):
    """Base of the TCP and WebSocket sessions."""

    # __slots__: a session is the largest per-connection Python object, and 100k idle
    # connections are the target (docs/performance.md): no per-instance __dict__
    __slots__ = (
        "_linked",
        "_next",
        "_prev",
        "awaiting_pong",
        "bucket",
        "closed_with",
        "closing_after",
        "config",
        "decoder",
        "delta",
        "eid",
        "hello_seen",
        "inflight",
        "ip",
        "last_rx",
        "node",
        "ping_sent_at",
        "replies",
        "ring",
        "state",
        "subs",
        "transport",
        "wheel_tick",
    )

    #: the TCP protocol requires HELLO first; over WebSocket the upgrade is the handshake
    hello_required = True

    def __init__(self, node: Host) -> None:
        self.node = node
        self.config = node.config
        self.transport: asyncio.Transport | None = None
        self.ring: _core.OutRing | None = None
        self.replies: Replies = TCP_REPLIES
        # a list, created on first subscribe: a 1-element set costs 216 bytes, a list 64,
        # and membership tests over at most max_subscriptions names are cheap
        self.subs: list[str] | None = None
        #: channels this connection subscribed to asking for Fossil deltas ("delta":
        #: "fossil" in its sub; the hub reads it at the join: docs/delta.md)
        self.delta: list[str] | None = None
        self.state = HANDSHAKE
        self.wheel_tick = -1
        self.last_rx = node.wheel.now
        self.awaiting_pong = False
        self.ping_sent_at = 0.0
        self.hello_seen = False
        self.decoder: _core.FrameDecoder | None = None
        self.user: str | None = None  # declared (hello) or, with auth, from the token
        #: publishes waiting for the store; a close waits for them (:meth:`_close_after`)
        self.inflight = 0
        self.closing_after: tuple[bytes | None, int, str] | None = None
        #: event webhooks (fastim/backend/events.py): the connection id its events
        #: carry ("" until its first), and the (code, reason) the server closed it with
        self.eid = ""
        self.closed_with: tuple[int, str] | None = None
        self.ip: str | None = None  # the client's address when per-address limits apply
        self.bucket: _core.TokenBucket | None = None  # publish/send rate, on first use
        #: what the connection's verified token says (None: no token)
        self.identity: Identity | None = None
        #: anonymous access is off and no token has been verified yet: only a hello
        #: (HELLO frame, or JSON hello) with a token is accepted
        self.auth_wait = node.auth.required
        #: the proxy hooks' state of this connection (fastim/session/hooks.py); None on
        #: a node without hooks, and until a hook is first asked
        self.backend = None
        self._linked = False  # in node.sessions (a SessionList)
        self._prev: Session | None = None
        self._next: Session | None = None

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        node = self.node
        node.sessions.add(self)
        self.ring = _core.OutRing(
            node.flusher,
            self.transport,
            _core.FMT_TCP,
            self.config.outbound_cap,
            self,  # the session is its ring's overflow callback: no bound method per ring
        )
        if self.config.direct_write:
            self._enable_direct_write()
        if len(node.sessions) > self.config.max_connections:
            self.refuse_overload()
            return
        refusal = node.admit(self)
        if refusal is not None:
            self.refuse_limit(*refusal)
            if self.state >= CLOSING:
                return
            # not refused yet (WebSocket/HTTP: it may be a probe): handshake_timeout as usual
        node.wheel.schedule(self, node.wheel.now + self.config.handshake_timeout)

    def _enable_direct_write(self) -> None:
        """Let the flusher write to this socket from C (OutRing.set_fd).

        Only for a plain socket: TLS transforms bytes in the transport. The high-water
        mark 0 makes the transport pause the ring whenever it holds any bytes (what a
        direct write could not place), so bytes never overtake each other.
        """
        transport = self.transport
        assert transport is not None and self.ring is not None
        # asyncio's and uvloop's SSL transports both report these (tests/server/test_tls.py);
        # their "socket" is the raw TCP socket, which must never see our plaintext
        if (
            transport.get_extra_info("sslcontext") is not None
            or transport.get_extra_info("ssl_object") is not None
        ):
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            fd = sock.fileno()
        except (AttributeError, OSError):
            return
        if fd < 0:
            return
        transport.set_write_buffer_limits(high=0)
        self.ring.set_fd(fd)

    def close_transport(self, abort: bool = False) -> None:
        """Close the transport (``abort``: dropping what it holds). Every close of a
        session's transport goes through here (or follows ``ring.close()``).

        The ring's socket stops being written to from C first: once the transport is
        closing, its fd may be closed and its number given to a new connection, and
        the flusher does not ask the transport (OutRing.set_fd)."""
        if self.ring is not None:
            self.ring.set_fd(-1)
        if self.transport is None:
            return
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def eof_received(self) -> bool | None:
        """The peer closed its side: the transport closes ours too (None), so the ring
        stops writing to the socket now, as for :meth:`close_transport`."""
        if self.ring is not None:
            self.ring.set_fd(-1)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ip is not None:
            self.node.release(self.ip)
            self.ip = None
        self.state = CLOSED
        self._drop_subscriptions()
        events = self.node.events
        if events is not None and self.eid:
            events.disconnected(self, self.closed_with, exc is not None)
        if self.ring is not None:
            self.ring.close()
        self.node.wheel.cancel(self)
        self.node.sessions.discard(self)
        self.node.on_session_closed()

    def pause_writing(self) -> None:
        if self.ring is not None:
            self.ring.pause()

    def resume_writing(self) -> None:
        if self.ring is not None:
            self.ring.resume()

    def refuse_overload(self) -> None:
        """Called when the node is at max_connections; the transport closes."""
        self.close(CloseCode.GOING_AWAY, "node at its connection limit, try another")

    def refuse_limit(self, status: int, reason: str, ip: str) -> None:
        """A per-address limit refused this connection from ``ip`` (``status``: the HTTP
        answer)."""
        self.node.limit_refusals += 1
        self.close(CloseCode.RATE_LIMITED, reason)

    def rate_ok(self, req_id: Any, replies: Replies) -> bool:
        """Spend a publish/send token; on refusal answer RATE_LIMITED (and close on repeat)."""
        rate = self.config.publish_rate
        if not rate:
            return True
        now = self.node.wheel.now
        bucket = self.bucket
        if bucket is None:
            bucket = self.bucket = _core.TokenBucket(rate, max(1.0, 2 * rate), now)
        if bucket.take(now):
            return True
        self.node.rate_limited += 1
        if bucket.refused >= self.config.rate_limit_strikes:
            self.close(
                CloseCode.RATE_LIMITED,
                f"over {rate:g} publishes/s {bucket.refused} times; reconnect later",
            )
            return False
        self.send(
            replies.error(
                req_id, ErrorCode.RATE_LIMITED, f"over {rate:g} publishes and sends per second"
            )
        )
        return False

    # ------------------------------------------------------------------ sending

    def send(self, data: bytes) -> None:
        ring = self.ring
        if ring is not None and self.state < CLOSING:
            ring.append(data)

    def __call__(self) -> None:
        """The out-ring overflowed (see :class:`~fastim._core.OutRing`): close as slow."""
        self._on_overflow()

    def _on_overflow(self) -> None:
        self.node.slow_disconnects += 1
        log.info("closing slow consumer %s", self.peer())
        self.close(
            CloseCode.SLOW_CONSUMER,
            f"slow consumer: over {self.config.outbound_cap} bytes queued; reconnect",
            drop_pending=True,
        )

    def peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    # ------------------------------------------------------------------ heartbeat

    def mark_open(self) -> None:
        self.state = OPEN
        cfg = self.config
        # a connection that still owes a token has handshake_timeout to present it
        wait = cfg.handshake_timeout if self.auth_wait else cfg.ping_interval
        self.node.wheel.schedule(self, self.node.wheel.now + wait)

    def on_deadline(self, now: float) -> float | None:
        cfg = self.config
        if self.state == CLOSING:
            # the peer never finished the close: drop it
            self.close_transport(abort=True)
            return None
        if self.state == HANDSHAKE:
            self.on_handshake_timeout()
            return None
        if self.state != OPEN:
            return None
        if self.auth_wait:
            self.fail(AuthFailed(f"no token within {cfg.handshake_timeout:g}s"))
            return None
        if self.awaiting_pong:
            if self.last_rx >= self.ping_sent_at:
                self.awaiting_pong = False
            else:
                self.node.heartbeat_timeouts += 1
                self.close(
                    CloseCode.HEARTBEAT_TIMEOUT,
                    f"no pong within {cfg.pong_timeout:g}s; reconnect",
                )
                return None
        idle = now - self.last_rx
        if idle >= cfg.ping_interval - self.node.wheel.resolution:
            self.send(self.replies.ping())
            self.awaiting_pong = True
            self.ping_sent_at = now
            return now + cfg.pong_timeout
        return self.last_rx + cfg.ping_interval

    def on_handshake_timeout(self) -> None:
        self.fail(
            ProtocolError(
                f"no HELLO within {self.config.handshake_timeout:g}s",
                ErrorCode.HANDSHAKE_REQUIRED,
            )
        )

    # ------------------------------------------------------------------ closing

    def close_bytes(self, code: int, reason: str) -> bytes:
        """What a transport sends last (GOAWAY frame, WebSocket close frame)."""
        return _core.encode_frame(_F.GOAWAY, pack_goaway(code, reason))

    def close(self, code: int, reason: str, drop_pending: bool = False) -> None:
        """Send what is queued (unless ``drop_pending``), a last frame, then close.

        Publishes of this connection still waiting for the store are answered first
        (see :meth:`_close_after`): a client whose valid publish came before its
        violation learns that it was stored."""
        if self.state >= CLOSING or self.transport is None:
            return
        if self.closed_with is None:
            self.closed_with = (code, reason)  # the disconnect event's reason
        if self.inflight and not drop_pending:
            self._close_after(None, code, reason)
            return
        self.state = CLOSING
        self._drop_subscriptions()
        pending = b""
        ring = self.ring
        if ring is not None:
            if not drop_pending and not ring.overflowed:
                pending = ring.take()
            ring.close()
        self.transport.write(pending + self.close_bytes(code, reason))
        self.finish_close()

    def finish_close(self) -> None:
        """TCP closes at once (after the write buffer drains); WebSocket overrides."""
        assert self.transport is not None
        self.close_transport()
        self.node.wheel.schedule(self, self.node.wheel.now + self.config.close_timeout)

    def fail(self, err: ProtocolError, req_id: Any = None) -> None:
        """A protocol violation: error reply naming it, then close."""
        self.node.protocol_errors += 1
        log.debug("protocol error from %s: %s", self.peer(), err.reason)
        if self.state < CLOSING:
            error = self.replies.error(req_id, err.code, err.reason)
            if self.inflight:
                self._close_after(error, err.close_code, err.reason[:100])
                return
            self.send(error)
            self.close(err.close_code, err.reason[:100])

    def _close_after(self, last: bytes | None, code: int, reason: str) -> None:
        """Close once the publishes in flight are answered, ``last`` sent before.

        Reading stops at once (nothing after the violation is handled); the store
        answers every append, or fails it, within its timeout, so the wait is bounded.
        """
        if self.closing_after is None:
            self.closing_after = (last, code, reason)
            assert self.transport is not None
            self.transport.pause_reading()

    def published(self) -> None:
        """A publish that waited for the store was answered (see :meth:`_close_after`)."""
        self.inflight -= 1
        after = self.closing_after
        if not self.inflight and after is not None:
            self.closing_after = None
            last, code, reason = after
            if last is not None:
                self.send(last)
            self.close(code, reason)

    def _drop_subscriptions(self) -> None:
        subs = self.subs
        if subs and self.ring is not None:
            hub = self.node.hub
            for ch in list(subs):
                hub.unsubscribe(ch, self)
            subs.clear()
        self.delta = None
        if self.user is not None and self.node.postman is not None:
            self.node.postman.detach(self, self.user)
        limit = self.node.user_limit
        if limit is not None:
            limit.forget(self)

    def is_open(self) -> bool:
        return self.state == OPEN or (self.state == HANDSHAKE and self.transport is not None)

    def send_event(self, body: bytes) -> None:
        """A JSON event (dm, join, ...) in this connection's format."""
        self.send(self.replies.event(body))

    # ------------------------------------------------------------------ commands

    def handle_frame(self, ftype: int, payload: bytes) -> None:
        """One fastim frame from the client (over TCP, or inside a WebSocket binary message)."""
        b = self.backend
        if b is not None and b.busy:  # an earlier command waits for the backend
            self.queue_command(self.handle_frame, ftype, payload)
            return
        if ftype == _F.HELLO:
            if self.hello_seen or (self.state == OPEN and self.hello_required):
                raise BadRequest("HELLO may only be the first frame")
            version, options = negotiate(payload)
            self.hello_seen = True
            opts: dict[str, Any] = {}
            if options.strip() not in (b"", b"{}"):
                try:
                    opts = orjson.loads(options)
                except orjson.JSONDecodeError as e:
                    raise BadRequest(f"HELLO options are not JSON: {e}") from None
                if not isinstance(opts, dict):
                    raise BadRequest("HELLO options must be a JSON object")
            self.server_positions(opts.get("subs"))  # recovery of server-side channels
            if (
                opts.get("token") is None
                and self.identity is None
                and self.state == HANDSHAKE
                and self.node.proxy.has("connect")
            ):
                # the connect hook decides who this is (docs/proxy.md): the welcome
                # waits for its answer, with the HELLO's "data" passed on
                self.connect_hook({}, opts.get("data"), lambda: self._hello(version, opts))
                return
            self._hello(version, opts)
            return
        if self.state == HANDSHAKE:
            raise ProtocolError(
                f"first frame must be HELLO (0x01), got 0x{ftype:02x}",
                ErrorCode.HANDSHAKE_REQUIRED,
            )
        if self.auth_wait:
            raise AuthFailed('authenticate first: HELLO with options {"token": ...}')
        self.hello_seen = True
        if ftype == _F.PING:
            if len(payload) > 64:
                raise BadRequest(f"PING payload of {len(payload)} bytes, at most 64")
            self.send(self.replies.pong(None, payload))
        elif ftype == _F.PONG:
            pass  # liveness was recorded when the bytes arrived
        elif ftype == _F.CMD:
            self.handle_json(payload, self.replies.cmd)
        else:
            req = unpack_request(ftype, payload)
            if req.op == "pub":
                try:
                    orjson.loads(req.data)
                except orjson.JSONDecodeError as e:
                    raise BadRequest(f"PUB data is not a JSON document: {e}") from None
            self.handle_request(req, self.replies)

    def _hello(self, version: int, opts: dict[str, Any]) -> None:
        """The rest of a HELLO frame (after the connect hook, where there is one)."""
        user = self._identify(opts.get("user"), opts.get("token"))
        welcome = self._welcome(user or self.user)
        self.send(self.replies.frame(_F.WELCOME, bytes((version,)) + welcome))
        if self.state == HANDSHAKE:
            self.mark_open()
        if user is not None:
            self._declare(user)

    def handle_json(self, text: bytes, replies: Replies | None = None) -> None:
        """One JSON command (WebSocket text message, or the payload of a CMD frame)."""
        b = self.backend
        if b is not None and b.busy:  # an earlier command waits for the backend
            self.queue_command(self.handle_json, text, replies)
            return
        replies = replies or self.replies
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"invalid JSON: {e}") from None
        if not isinstance(msg, dict):
            raise BadRequest(f"a command must be a JSON object, got {type(msg).__name__}")
        req_id = msg.get("id")
        if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, (int, str))):
            raise BadRequest('field "id" must be an integer or a string')
        op = msg.get("op")
        if op is None:
            raise BadRequest('missing field "op"')
        if self.auth_wait and op != "hello":
            raise AuthFailed('authenticate first: {"op":"hello","token":"..."}')
        if op == "ping":
            self.send(replies.pong(req_id))
            return
        if op in ("sub", "unsub", "pub"):
            if "ch" not in msg:
                raise BadRequest(f'missing field "ch" in {op!r}')
            data = b""
            if op == "pub":
                if "data" not in msg:
                    raise BadRequest("missing field \"data\" in 'pub'")
                data = json_data(msg["data"])
            since = history_field(msg, since_field(msg.get("since"))) if op == "sub" else None
            if op == "sub":
                self._delta_choice(msg["ch"], msg.get("delta"))
            hook_data = msg.get("data") if op == "sub" else None  # for the subscribe hook
            self.handle_request(Request(op, req_id, msg["ch"], data), replies, since, hook_data)
            return
        if op == "rpc":
            self.rpc(msg, req_id, replies)
            return
        if op == "hello":
            # a hello may name nobody: its welcome says who the connection is (a
            # token at the upgrade, the connect hook's user) or that it is anonymous
            declared, token = msg.get("user"), msg.get("token")
            self.server_positions(msg.get("subs"))  # recovery of server-side channels
            user = self._identify(declared, token)
            self.send(replies.event(self._welcome(user or self.user)[:-1] + welcome_tail(req_id)))
            if user is not None:
                self._declare(user)
            return
        if op == "refresh":
            self._refresh(msg.get("token"), req_id, replies)
            return
        if op == "presence":
            ch = validate_channel(msg.get("ch"))
            if not self._denied("presence", ch, req_id, replies):
                self.node.hub.answer_presence(self, replies, req_id, ch)
            return
        if op in ("send", "ack", "inbox"):
            postman = self.node.postman
            assert postman is not None
            if self.user is None:
                self.send(
                    replies.error(
                        req_id,
                        ErrorCode.NO_USER,
                        f"{op!r} needs a user: declare one first (hello)",
                    )
                )
                return
            if op == "send":
                to = user_id(msg.get("to"), "to")
                if "data" not in msg:
                    raise BadRequest("missing field \"data\" in 'send'")
                data = json_data(msg["data"])
                if len(data) > self.config.max_message:
                    raise ProtocolError(
                        f"data of {len(data)} bytes exceeds max_message", ErrorCode.FRAME_TOO_LARGE
                    )
                cid = msg.get("cid")
                if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= CID_MAX):
                    raise BadRequest(f'field "cid" must be a string of 1..{CID_MAX} characters')
                if self.rate_ok(req_id, replies):
                    postman.send(self, req_id, to, data, cid)
            elif op == "ack":
                seq = msg.get("seq")
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                    raise BadRequest('field "seq" must be an integer >= 0')
                epoch = msg.get("epoch")
                if epoch is not None and not isinstance(epoch, str):
                    raise BadRequest('field "epoch" must be a string (the inbox\'s epoch)')
                postman.ack(self, req_id, seq, epoch)
            else:
                postman.inbox(self, req_id)
            return
        raise ProtocolError(f"unknown op {op!r}", ErrorCode.UNKNOWN_OP)

    def _delta_choice(self, ch: object, value: object) -> None:
        """Record whether this sub asks for deltas (``"delta": "fossil"``); each sub of
        a channel not subscribed decides anew, so a refused one leaves nothing behind.
        Namespaces without ``delta`` ignore it: full messages (docs/delta.md)."""
        if value is not None and value != "fossil":
            raise BadRequest('field "delta" must be "fossil"')
        if not isinstance(ch, str) or (self.subs is not None and ch in self.subs):
            return  # refused below (bad channel, already subscribed)
        d = self.delta
        if value is not None:
            if d is None:
                d = self.delta = []
            if ch not in d:
                d.append(ch)
        elif d and ch in d:
            d.remove(ch)

    def handle_request(
        self,
        req: Request,
        replies: Replies,
        since: Since | None = None,
        hook_data: Any = None,
    ) -> None:
        ch = validate_channel(req.channel)
        op = req.op
        if op == "pub":
            if len(req.data) > self.config.max_message:
                raise ProtocolError(
                    f"data of {len(req.data)} bytes exceeds max_message", ErrorCode.FRAME_TOO_LARGE
                )
            if not self.rate_ok(req.id, replies) or self._denied("publish", ch, req.id, replies):
                return
            if ch[0] == PERSONAL and self.config.personal_channels:
                why = "only the server publishes to personal channels (#<user>)"
                self.send(replies.error(req.id, ErrorCode.PERMISSION_DENIED, why))
                return
            proxy = self.node.proxy
            if proxy and proxy.has("publish") and self.node.hub.namespaces.of(ch).proxy_publish:
                self.publish_hook(ch, req.data, req.id, replies)  # allow, deny or rewrite
            else:
                self._publish(ch, req.data, req.id, replies)
        elif op == "sub":
            if ch[0] == PERSONAL and self.config.personal_channels:
                why = "personal channels (#<user>) are subscribed by the node, to their user"
                self.send(replies.error(req.id, ErrorCode.PERMISSION_DENIED, why))
                return
            if self._denied("subscribe", ch, req.id, replies) or (
                since is not None and self._denied("history", ch, req.id, replies)
            ):
                return
            subs = self.subs
            if subs is not None and ch in subs:
                self.send(
                    replies.error(
                        req.id, ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {ch!r}"
                    )
                )
                return
            if subs is not None and len(subs) >= self.config.max_subscriptions:
                self.send(
                    replies.error(
                        req.id,
                        ErrorCode.LIMIT_EXCEEDED,
                        f"at most {self.config.max_subscriptions} subscriptions per connection",
                    )
                )
                return
            proxy = self.node.proxy
            if proxy and proxy.has("subscribe") and self.node.hub.namespaces.of(ch).proxy_subscribe:
                self.subscribe_hook(ch, req.id, replies, since, hook_data)  # allow or deny
            else:
                self._subscribe(ch, req.id, replies, since)
        else:  # unsub
            if not self.subs or ch not in self.subs:
                self.send(
                    replies.error(req.id, ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {ch!r}")
                )
                return
            self.subs.remove(ch)
            if self.delta and ch in self.delta:
                self.delta.remove(ch)
            if self.node.events is not None:  # before the leave it may cause
                self.node.events.unsubscribed(self, ch)
            self.node.hub.unsubscribe(ch, self)
            self.send(replies.unsubscribed(req.id, ch))

    def _publish(self, ch: str, data: bytes, req_id: Any, replies: Replies) -> None:
        """Publish (every check passed): acknowledged now, or by ``done`` later."""

        def done(result: Published) -> None:
            refusal = result.refusal
            if refusal is None:
                self.send(replies.puback(req_id, ch, result.offset))
            else:  # the store failed, or (cluster) the owner was not reachable
                self.send(replies.error(req_id, refusal.code, refusal.reason))
            self.published()

        try:
            off = self.node.hub.publish(ch, data, done)
        except HubError as e:
            self.send(replies.error(req_id, e.code, e.reason))
            return
        if off is not None:
            self.send(replies.puback(req_id, ch, off))
        else:
            self.inflight += 1  # answered by done(), later

    def _subscribe(self, ch: str, req_id: Any, replies: Replies, since: Since | None) -> None:
        """Subscribe (every check passed; a server-side subscription has no ``req_id``)."""
        assert self.ring is not None
        subs = self.subs
        if subs is None:
            # a list, created on first subscribe: a 1-element set costs 216 bytes, a
            # list 64, and membership tests over max_subscriptions names are cheap
            subs = self.subs = []
        if len(subs) >= self.config.max_subscriptions:
            self.send(
                replies.error(
                    req_id,
                    ErrorCode.LIMIT_EXCEEDED,
                    f"at most {self.config.max_subscriptions} subscriptions per connection",
                )
            )
            return
        hub = self.node.hub
        try:
            channel = hub.channel(ch)
        except HubError as e:
            self.send(replies.error(req_id, e.code, e.reason))
            return
        assert channel is not None
        subs.append(channel.name)  # the hub's str: one copy per channel, not per client
        # the reply (and recovered messages) go into the ring before the first live
        # message can: order holds
        hub.subscribe(self, replies, req_id, channel.name, since)
