"""A connection's side of the proxy hooks (fastim/backend/proxy.py, docs/proxy.md).

A part of :class:`~.session.Session` (a mixin, as :mod:`.identity` is): the commands that
ask the application's backend before they act — the connect hook at the WebSocket
upgrade or the TCP HELLO, subscribe and publish through their hooks, ``rpc`` — and the
refresh of a connect hook's ``expire_at``.

**Order.** A command that waits for the backend holds the commands after it: they are
queued (:attr:`BackendState.queue`) and run, in order, once it is answered. So a
client's publishes reach the channel in the order it sent them even when each one is
checked (and persisted) by the backend first, and a ``sub`` sent right after the
connection opened runs with the user the connect hook decided. Hook calls of different
connections run in parallel, up to ``proxy_max_inflight``. The price: one connection's
commands take a backend round trip each while it is asked.

**Memory.** All of it lives in one :class:`BackendState`, made only on a node with hooks
(the session keeps a single slot, ``None`` elsewhere: idle connections are the budget).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from ..auth import Identity
from ..backend.proxy import (
    BackendUnavailable,
    ConnectResult,
    HookDisconnect,
    HookRefused,
    Proxy,
    parse_connect,
    parse_refresh,
)
from ..errors import BadRequest, ProtocolError
from ..hub import Since
from ..protocol import CloseCode, ErrorCode, validate_channel
from .commands import since_field
from .identity import Identified
from .replies import Replies

log = logging.getLogger("fastim")

#: commands queued behind a backend call before the connection stops being read
QUEUE_PAUSE = 256
#: seconds before a refresh the backend did not answer is asked again
REFRESH_RETRY = 5.0
#: a session's state from which hook answers are dropped (see session.CLOSING)
_CLOSING = 2
#: the first character of a user's personal channel, ``#alice`` (``personal_channels``)
PERSONAL = "#"


class BackendState:
    """What a connection holds for the proxy hooks (one object, made on first use)."""

    __slots__ = (
        "busy",
        "client",
        "data",
        "expiry",
        "info",
        "meta",
        "paused",
        "positions",
        "queue",
    )

    def __init__(self, client: str = "") -> None:
        #: the id the hooks know the connection by (Centrifugo's ``client``): its
        #: events' ``client`` when they came first (docs/events.md), else a new UUID
        self.client = client or str(uuid.uuid4())
        #: a command is waiting for the backend: the ones after it are queued
        self.busy = False
        self.queue: deque[tuple[Callable[..., None], Any, Any]] = deque()
        self.paused = False  # reading paused: too many commands queued
        #: from the connect hook: public info, private meta (sent back in every later
        #: hook request), the data given to the client in its welcome
        self.info: Any = None
        self.meta: Any = None
        self.data: Any = None
        self.expiry: ConnectExpiry | None = None
        #: where the client's server-side subscriptions were (the ``subs`` of its hello
        #: or of its upgrade URL): recovered from there when the node subscribes it
        self.positions: dict[str, Since] | None = None


class ConnectExpiry:
    """At a connect hook's ``expire_at``: ask the refresh hook, or close (4003).

    A timer of its own on the node's wheel (the session's deadline is the heartbeat's).
    One per ``expire_at``: a refresh that extends it starts a new one.
    """

    __slots__ = ("at", "session", "wheel_tick")

    def __init__(self, session: Hooked, at: float) -> None:
        self.session = session
        self.at = at
        self.wheel_tick = -1
        wheel = session.node.wheel
        wheel.schedule(self, wheel.now + max(0.0, at - time.time()))

    def on_deadline(self, now: float) -> float | None:
        s = self.session
        b = s.backend
        if b is None or b.expiry is not self or s.state >= _CLOSING:
            return None
        left = self.at - time.time()
        if left > 0:
            return now + left  # the wheel fired early (its resolution)
        if not s.node.proxy.has("refresh"):
            s.close(CloseCode.EXPIRED, "connection expired (connect hook's expire_at); reconnect")
            return None
        s.node.proxy.tasks.run(s._refresh_hook(self))
        return None


class Hooked(Identified):
    """The proxy-hook commands of a session (see the module docstring).

    Built on :class:`~.identity.Identified` (a connect hook's answer is an identity) in
    one line of inheritance: two mixins with slots of their own could not both be bases.
    """

    __slots__ = ("backend",)
    backend: BackendState | None

    # the session's fields and methods these use (Session defines them)
    eid: str
    replies: Replies
    transport: Any
    close: Callable[..., None]
    _subscribe: Callable[..., None]
    _publish: Callable[..., None]
    rate_ok: Callable[[Any, Replies], bool]

    # ------------------------------------------------------------------ the queue

    def _backend(self) -> BackendState:
        b = self.backend
        if b is None:
            b = self.backend = BackendState(self.eid)
        return b

    def queue_command(self, run: Callable[..., None], a: Any, b_: Any) -> None:
        """Hold a command while an earlier one waits for the backend."""
        b = self.backend
        assert b is not None
        b.queue.append((run, a, b_))
        if len(b.queue) >= QUEUE_PAUSE and not b.paused and self.transport is not None:
            b.paused = True
            self.transport.pause_reading()

    def _ask(self, call: Coroutine[Any, Any, None]) -> None:
        """Run a hook call; the commands after this one wait until it is answered."""
        self._backend().busy = True
        self.node.proxy.tasks.run(self._asking(call))

    async def _asking(self, call: Coroutine[Any, Any, None]) -> None:
        try:
            await call
        finally:
            self._resume()

    def _resume(self) -> None:
        """The backend answered: run the queued commands until one asks it again."""
        b = self.backend
        assert b is not None
        b.busy = False
        queue = b.queue
        while queue and not b.busy:
            if self.state >= _CLOSING:
                queue.clear()
                break
            run, x, y = queue.popleft()
            try:
                run(x, y)
            except ProtocolError as e:
                queue.clear()
                self.fail(e)
                break
        if b.paused and len(queue) < QUEUE_PAUSE // 2 and self.state < _CLOSING:
            b.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ requests

    def _wire(self) -> tuple[str, str]:
        """(transport, protocol) as the hooks name them: websocket|tcp, json|fastim."""
        return "tcp", "fastim"

    def _hook_body(self, **fields: Any) -> dict[str, Any]:
        """Centrifugo's common request fields, then ``fields``."""
        b = self._backend()
        transport, protocol = self._wire()
        body: dict[str, Any] = {
            "client": b.client,
            "transport": transport,
            "protocol": protocol,
            "encoding": "json",
            "user": self.user or "",
        }
        if b.meta is not None:
            body["meta"] = b.meta
        body.update(fields)
        return body

    def _backend_error(self, req_id: Any, replies: Replies, e: Exception) -> None:
        """A hook's refusal or failure, as the reply to the request that asked it."""
        if isinstance(e, HookDisconnect):
            self.close(e.code, e.reason)
        elif isinstance(e, HookRefused):
            self.send(replies.error(req_id, e.code, e.message))
        else:
            assert isinstance(e, BackendUnavailable)
            self.send(replies.error(req_id, ErrorCode.BACKEND_UNAVAILABLE, e.reason))

    # ------------------------------------------------------------------ connect

    def connect_hook(self, headers: dict[str, str], data: Any, then: Callable[[], None]) -> None:
        """Ask the connect hook who this connection is; ``then`` runs once it is decided
        (commands meanwhile are queued). Refused: the connection closes."""
        fields: dict[str, Any] = {}
        if data is not None:
            fields["data"] = data
        body = self._hook_body(**fields)
        self._ask(self._connect(body, headers, then))

    async def _connect(
        self, body: dict[str, Any], headers: dict[str, str], then: Callable[[], None]
    ) -> None:
        proxy: Proxy = self.node.proxy
        try:
            result = parse_connect(await proxy.call("connect", body, headers))
        except HookDisconnect as e:
            self.close(e.code, e.reason)
            return
        except HookRefused as e:
            if self.state < _CLOSING:
                self.send(self.replies.error(None, e.code, e.message))
                self.close(CloseCode.AUTH_FAILED, e.message[:100])
            return
        except BackendUnavailable as e:
            if self.state < _CLOSING:
                self.send(self.replies.error(None, ErrorCode.BACKEND_UNAVAILABLE, e.reason))
                self.close(CloseCode.BACKEND_UNAVAILABLE, e.reason[:100])
            return
        if self.state >= _CLOSING:
            return
        self._connected(result)
        try:
            then()
        except ProtocolError as e:
            self.fail(e)

    def _connected(self, result: ConnectResult) -> None:
        b = self._backend()
        b.info, b.meta, b.data = result.info, result.meta, result.data
        self.auth_wait = False  # the backend decided: its answer is the authentication
        channels = []
        for ch in result.channels:
            try:
                channels.append(validate_channel(ch))
            except ProtocolError as e:
                log.warning("connect hook: channel %r skipped: %s", ch, e.reason)
        if result.expire_at:
            b.expiry = ConnectExpiry(self, result.expire_at)
        if result.user:
            expires = result.expire_at or math.inf
            self.identity = Identity(result.user, None, None, expires, tuple(channels))
            self._declare(result.user)  # subscribes the server-side channels
        else:
            self.subscribe_server_side(channels)

    # ------------------------------------------------------------------ server-side

    def server_positions(self, raw: object) -> None:
        """Where the client's server-side subscriptions were: ``subs`` of its hello or
        of its upgrade URL, ``{"<channel>": {"off": N, "epoch": "..."}}``. The node
        recovers each from there when it subscribes it (docs/protocol.md)."""
        if raw is None:
            return
        if not isinstance(raw, dict) or len(raw) > self.config.max_subscriptions:
            raise BadRequest(
                'field "subs" must be an object {"<channel>": {"off": N, "epoch": "..."}} '
                f"of at most {self.config.max_subscriptions} channels"
            )
        positions: dict[str, Since] = {}
        for ch, since in raw.items():
            pos = since_field(since)
            if pos is not None:
                positions[validate_channel(ch)] = pos
        if positions:
            self._backend().positions = positions

    def server_channels(self) -> list[str]:
        """The channels the node subscribes this connection to by itself: its token's
        ``subs`` (or the connect hook's ``channels``) and, with ``personal_channels``,
        its user's own ``#<user>``."""
        identity = self.identity
        out = list(identity.server_subs) if identity is not None else []
        if self.config.personal_channels and self.user is not None:
            out.append(PERSONAL + self.user)
        return out

    def subscribe_server_side(self, channels: list[str]) -> None:
        """Subscribe to ``channels`` with no request of the client's (the
        ``subscribed`` has no id), each recovered from the client's position when it
        gave one. The token or the backend decided: neither the subscribe hook nor the
        namespace rules are asked again."""
        b = self.backend
        positions = b.positions if b is not None else None
        for ch in channels:
            if self.subs is not None and ch in self.subs:
                continue
            since = positions.get(ch) if positions else None
            self._subscribe(ch, None, self.replies, since)

    async def _refresh_hook(self, expiry: ConnectExpiry) -> None:
        b = self.backend
        if b is None:
            return
        try:
            expired, expire_at, info = parse_refresh(
                await self.node.proxy.call("refresh", self._hook_body())
            )
        except (BackendUnavailable, HookRefused, HookDisconnect) as e:
            # Centrifugo's choice, and ours: a backend that is down must not end the
            # connections it let in; asked again a little later
            log.debug("refresh hook: %s; asking again in %gs", e, REFRESH_RETRY)
            if b.expiry is expiry and self.state < _CLOSING:
                b.expiry = ConnectExpiry(self, time.time() + REFRESH_RETRY)
            return
        if b.expiry is not expiry or self.state >= _CLOSING:
            return
        if expired or (expire_at and expire_at <= time.time()):
            b.expiry = None
            self.close(CloseCode.EXPIRED, "connection expired (refresh hook); reconnect")
            return
        if info is not None:
            b.info = info
        b.expiry = ConnectExpiry(self, expire_at) if expire_at else None

    # ------------------------------------------------------------------ channels

    def subscribe_hook(self, ch: str, req_id: Any, replies: Replies, since: Any, data: Any) -> None:
        """Ask the subscribe hook before subscribing (the local checks passed)."""
        fields: dict[str, Any] = {"channel": ch}
        if data is not None:
            fields["data"] = data
        body = self._hook_body(**fields)
        self._ask(self._subscribe_asked(body, ch, req_id, replies, since))

    async def _subscribe_asked(
        self, body: dict[str, Any], ch: str, req_id: Any, replies: Replies, since: Any
    ) -> None:
        try:
            await self.node.proxy.call("subscribe", body)
        except (BackendUnavailable, HookRefused, HookDisconnect) as e:
            if self.state < _CLOSING:
                self._backend_error(req_id, replies, e)
            return
        if self.state >= _CLOSING:
            return
        if self.subs is not None and ch in self.subs:  # a server-side one meanwhile
            self.send(
                replies.error(req_id, ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {ch!r}")
            )
            return
        self._subscribe(ch, req_id, replies, since)

    def publish_hook(self, ch: str, data: bytes, req_id: Any, replies: Replies) -> None:
        """Ask the publish hook: allow, deny, or replace the data; then publish."""
        body = self._hook_body(channel=ch, data=orjson.Fragment(data))
        self._ask(self._publish_asked(body, ch, data, req_id, replies))

    async def _publish_asked(
        self, body: dict[str, Any], ch: str, data: bytes, req_id: Any, replies: Replies
    ) -> None:
        try:
            result = await self.node.proxy.call("publish", body)
        except (BackendUnavailable, HookRefused, HookDisconnect) as e:
            if self.state < _CLOSING:
                self._backend_error(req_id, replies, e)
            return
        if self.state >= _CLOSING:
            return
        if "data" in result:  # the backend rewrote it (validated, persisted...)
            data = orjson.dumps(result["data"])
            if len(data) > self.config.max_message:
                self.send(
                    replies.error(
                        req_id,
                        ErrorCode.BACKEND_UNAVAILABLE,
                        f"the publish hook's data is {len(data)} bytes, over max_message",
                    )
                )
                return
        self._publish(ch, data, req_id, replies)

    # ------------------------------------------------------------------ rpc

    def rpc(self, msg: dict[str, Any], req_id: Any, replies: Replies) -> None:
        """``{"op":"rpc","method":...,"data":...}``: the rpc hook answers the client."""
        method = msg.get("method")
        if method is not None and (not isinstance(method, str) or len(method) > 255):
            raise BadRequest('field "method" must be a string of at most 255 characters')
        if not self.node.proxy.has("rpc"):
            why = "rpc: this node has no rpc hook (proxy_rpc_url)"
            self.send(replies.error(req_id, ErrorCode.NOT_AVAILABLE, why))
            return
        fields: dict[str, Any] = {}
        if method is not None:
            fields["method"] = method
        if "data" in msg:
            fields["data"] = msg["data"]
        if not self.rate_ok(req_id, replies):
            return
        self._ask(self._rpc(self._hook_body(**fields), req_id, replies))

    async def _rpc(self, body: dict[str, Any], req_id: Any, replies: Replies) -> None:
        try:
            result = await self.node.proxy.call("rpc", body)
        except (BackendUnavailable, HookRefused, HookDisconnect) as e:
            if self.state < _CLOSING:
                self._backend_error(req_id, replies, e)
            return
        if self.state < _CLOSING:
            self.send(replies.obj({"op": "rpc", "data": result.get("data")}, req_id))
