"""The asyncio client: connect, subscribe, publish, direct messages, heartbeat, reconnect.

One :class:`Client` holds one connection at a time and one reader task. The reader
decodes every frame the server sends and dispatches it: replies resolve the future of
the request with the same id, MSG frames go to the queue of their
:class:`Subscription`, ``dm`` events to the direct-message inbox, PINGs are answered at
once. When the connection is lost (EOF, socket error, silence longer than
``ping_interval + pong_timeout``, a GOAWAY or WebSocket close whose code says
"reconnect"), the reader fails the pending requests, then reconnects with
:class:`~fastim.client.Backoff`, subscribes again to every live subscription *with
``since``* (the epoch and last offset it delivered), so the node sends what was missed
and the application sees each message once, and carries on.

Several node addresses (a cluster, or a primary and fallbacks): the client connects to
the first that answers, and after a loss it tries the *next* address in its order first
(the one it lost is tried again last, and again on every later round), so the clients
of a dead node move to the others; a "going away" close (1001 from a node shutting
down, 1012) moves on at once, without the backoff sleep. ``shuffle=True`` gives each
client its own random order (the crowd spreads over the nodes).

A publish in flight at a disconnect is failed, never resent: channel publishes carry no
idempotency key, and a resend could store the message twice. A direct message
(:meth:`Client.send`) is resent with the same client id (``cid``) until acknowledged:
the node stores it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import struct
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson

from .. import protocol
from .._core import DEFAULT_MAX_FRAME, encode_frame
from ..errors import ConnectionClosed, FastimError, ProtocolError, RequestError
from ..protocol import CloseCode, ErrorCode, FrameType
from .backoff import Backoff
from .connection import Connection, HandshakeError, deadline, open_connection, parse_url
from .direct import DirectGapCallback, DirectInbox, DirectMessages, InboxState, Sent, inbox_state
from .subscription import Gap, GapCallback, Message, Since, Subscription

__all__ = ["CLIENT_NAME", "Client", "Message", "RateLimited", "Subscription", "connect"]

log = logging.getLogger("fastim.client")

#: What the SDK calls itself in HELLO.
CLIENT_NAME = "fastim-py/0.1"

_MAX_ID = 0xFFFFFFFF
_CLIENT_CLOSED = (CloseCode.NORMAL, "client closed")
_UNSUBSCRIBED = (CloseCode.NORMAL, "unsubscribed")
#: first and last delay between attempts of a resubscribe the store could not serve
_RESUB_RETRY = (0.2, 5.0)
#: how a :meth:`Client.send` spaces its retries after STORE_UNAVAILABLE
_SEND_BACKOFF = (0.05, 2.0, 2.0)  # base, factor, max
#: refusals that say "not now" rather than "no": the store could not be read or written
#: (114), or, in a cluster, the channel's owner node could not be reached (119: it died
#: and the others have not rerouted yet). A resubscribe is retried on the connection, a
#: send with its cid; a publish is not (it may or may not have been stored).
_TRANSIENT = frozenset({ErrorCode.STORE_UNAVAILABLE, ErrorCode.NOT_ROUTED})
#: close codes of a node that is leaving (shutdown, restart): try the next node at once
_MOVE_ON_AT_ONCE = frozenset({CloseCode.GOING_AWAY, 1012})


class RateLimited(RequestError):
    """The node refused a publish or send with RATE_LIMITED (116): this connection is
    over the node's ``publish_rate``. Nothing was stored; slow down and try again.

    A :class:`~fastim.errors.RequestError` (``code`` 116), so code that catches those
    keeps working; a node closes a connection that keeps going over (close 4002,
    after which the client reconnects with backoff).
    """


def _request_error(code: int, reason: str) -> RequestError:
    """The exception of an error reply: :class:`RateLimited` for 116."""
    if code == ErrorCode.RATE_LIMITED:
        return RateLimited(code, reason)
    return RequestError(code, reason)


def _hello_frame(user: str | None) -> bytes:
    options: dict[str, Any] = {"client": CLIENT_NAME}
    if user is not None:
        options["user"] = user
    return encode_frame(
        FrameType.HELLO,
        protocol.pack_hello(
            protocol.SUPPORTED_VERSIONS[0],
            protocol.SUPPORTED_VERSIONS[-1],
            orjson.dumps(options),
        ),
    )


def _check_channel(channel: str) -> str:
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}")
    try:
        return protocol.validate_channel(channel)
    except ProtocolError as e:
        raise ValueError(f"invalid channel name {channel!r}: {e.reason}") from None


def _check_user(user: str, field: str) -> str:
    """A user id follows the rules of a channel name (1..255 bytes, no control chars)."""
    if not isinstance(user, str):
        raise TypeError(f"{field} must be a str, got {type(user).__name__}")
    try:
        return protocol.validate_channel(user)
    except ProtocolError as e:
        reason = e.reason.replace('field "ch"', field)
        raise ValueError(f"invalid user id {user!r}: {reason}") from None


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def _resolve(p: _Pending, result: Any) -> None:
    if not p.future.done():
        p.future.set_result(result)


class _Pending:
    """A request waiting for its reply."""

    __slots__ = ("future", "resubscribe", "since", "sub")

    def __init__(
        self,
        future: asyncio.Future[Any],
        sub: Subscription | None = None,
        resubscribe: bool = False,
        since: Since | None = None,
    ) -> None:
        self.future = future
        self.sub = sub  # a subscribe: registered by the reader the moment its reply arrives
        self.resubscribe = resubscribe
        self.since = since  # a subscribe with since: where recovery was asked from


class Client:
    """A connection to a fastim server that survives disconnects. Use :func:`connect`.

    Attributes:
        urls: the server URLs as given; :attr:`order` is the order the client tries
            them in (the same, or shuffled with ``shuffle=True``).
        user: the user id declared in HELLO (None: no user, no direct messages).
        server_info: the JSON object of the last WELCOME (node, ping_interval, ...).
        reconnects: how many times the client has connected again after a loss.
        send_timeout: seconds :meth:`send` keeps retrying before it gives up.
        on_event: called with each JSON event the client does not handle itself
            (``join`` / ``leave`` on channels with ``join_leave``), from the reader.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        user: str | None = None,
        shuffle: bool = False,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        send_timeout: float = 30.0,
        on_event: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("at least one URL is needed")
        if not connect_timeout > 0 or not request_timeout > 0 or not send_timeout > 0:
            raise ValueError("connect_timeout, request_timeout and send_timeout must be > 0")
        if user is not None:
            _check_user(user, "user")
        self.urls = list(urls)
        #: the order addresses are tried in: ``urls``, or a random permutation of them
        #: (``shuffle``); after a loss the client starts at the address after the lost one
        self.order = list(self.urls)
        if shuffle:
            random.shuffle(self.order)
        self.user = user
        self.reconnect = reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.on_event = on_event
        self.server_info: dict[str, Any] = {}
        self.reconnects = 0
        self._hello = _hello_frame(user)
        self._url = self.order[0]
        self._conn: Connection | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: BaseException | None = None
        self._subs: dict[str, Subscription] = {}
        self._subscribing: set[str] = set()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._max_frame = DEFAULT_MAX_FRAME  # the server's, from WELCOME
        self._inbox = DirectInbox(self)
        # a node that could not read our inbox at connect never replays it on that
        # connection: connect again, no faster than this backoff allows
        self._inbox_backoff = Backoff(base=0.5, factor=2.0, max=30.0)
        self._inbox_retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # heartbeat (per connection)
        self._ping_interval = 0.0
        self._dead_after = 0.0
        self._last_rx = 0.0
        self._next_ping = 0.0
        self._hb: asyncio.TimerHandle | None = None
        self._abort_reason: ConnectionClosed | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed" if self.closed else "disconnected"
        return f"<fastim Client {self._url} {state} subs={len(self._subs)}>"

    # ----------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        """Whether the handshake is done and requests can go out right now."""
        return self._ready.is_set() and self._conn is not None

    @property
    def closed(self) -> bool:
        """Whether the client is closed: :meth:`aclose` was called, or it gave up."""
        return self._closing or self._failure is not None

    @property
    def url(self) -> str:
        """The URL of the current connection (or of the last attempt)."""
        return self._url

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The live subscriptions, by channel (a copy)."""
        return dict(self._subs)

    @property
    def inbox(self) -> DirectInbox:
        """The receiving side of direct messages (counters: ``delivered``, ``taken``,
        ``acked``, ``duplicates``)."""
        return self._inbox

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def subscribe(
        self,
        channel: str,
        *,
        max_queue: int = 0,
        since: Since | tuple[int, str] | None = None,
        on_gap: GapCallback | None = None,
    ) -> Subscription:
        """Subscribe to a channel.

        Waits for the connection if the client is reconnecting (all within
        ``request_timeout``).

        Args:
            channel: 1..255 bytes of UTF-8, no control characters.
            max_queue: bound of the subscription's queue; 0 for unbounded. When full,
                the oldest message is dropped (see :class:`Subscription`).
            since: ``(offset, epoch)`` of the last message the application already
                has (e.g. :attr:`Subscription.since` saved by an earlier run): the node
                sends every later message it still has, then live ones. Without it,
                live messages only.
            on_gap: called with a :class:`Gap` when reading reaches a point where
                messages were lost for good (recovery incomplete); see
                :attr:`Subscription.gaps`.

        Returns:
            The :class:`Subscription`, once the server confirmed it.

        Raises:
            ValueError: the channel name is invalid (checked before sending).
            RequestError: the server refused (``code`` is an ErrorCode, e.g.
                LIMIT_EXCEEDED, STORE_UNAVAILABLE while reading history), or this
                client is already subscribed to ``channel`` (ALREADY_SUBSCRIBED,
                without asking the server).
            asyncio.TimeoutError: no reply within ``request_timeout``.
            ConnectionClosed: the connection was lost before the reply, or the
                client is closed.
        """
        _check_channel(channel)
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        start: Since | None = None
        if since is not None:
            off, epoch = since
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise ValueError("since: the offset must be an integer >= 0")
            if not isinstance(epoch, str) or len(epoch) > 64:
                raise ValueError("since: the epoch must be a string of at most 64 characters")
            start = Since(off, epoch)
        self._check_open()
        if channel in self._subs or channel in self._subscribing:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, max_queue, on_gap)
        if start is not None:
            sub.offset, sub.epoch = start
        self._subscribing.add(channel)
        try:
            if start is None:
                await self._request(FrameType.SUB, channel, sub=sub)
            else:
                cmd = {"op": "sub", "ch": channel, "since": start._asdict()}
                await self._call(self._cmd_frame(cmd), _Pending(_future(), sub, since=start))
        except BaseException:
            if self._subs.get(channel) is sub:  # the reply won the race with a timeout
                del self._subs[channel]
                self._send_unsub(channel)
            sub._finish(ConnectionClosed(*_UNSUBSCRIBED), normal=True)
            raise
        finally:
            self._subscribing.discard(channel)
        return sub

    async def publish(self, channel: str, data: Any) -> int:
        """Publish a JSON document to a channel.

        Waits for the connection if the client is reconnecting (all within
        ``request_timeout``). A publish whose connection is lost before the server's
        acknowledgement fails with ConnectionClosed and is *not* resent (the server
        may or may not have it; a resend could store it twice).

        Args:
            channel: 1..255 bytes of UTF-8, no control characters.
            data: any value orjson can encode.

        Returns:
            The offset the server gave the message in the channel.

        Raises:
            ValueError: invalid channel name, or the message exceeds the server's
                ``max_frame``.
            TypeError: ``data`` cannot be encoded as JSON.
            RequestError: the server refused; STORE_UNAVAILABLE (114): the store
                failed and the message was not acknowledged (it may or may not have
                been stored); NOT_ROUTED (119, a cluster): the node could not get an
                answer from the channel's owner (it may or may not have been stored).
            asyncio.TimeoutError: no acknowledgement within ``request_timeout``.
            ConnectionClosed: the connection was lost before the acknowledgement, or
                the client is closed.
        """
        _check_channel(channel)
        body = orjson.dumps(data)
        self._check_open()
        _, payload = await self._request(FrameType.PUB, channel, body)
        _, offset, _ = protocol.unpack_ack(payload)
        return offset

    async def send(
        self, to: str, data: Any, cid: str | None = None, *, timeout: float | None = None
    ) -> Sent:
        """Send a direct message to user ``to``; return once the node stored it.

        The message carries a client id (``cid``; a random one when not given). Until
        the node acknowledges it, the send is retried with the *same* cid: after a lost
        connection (once reconnected), after STORE_UNAVAILABLE or NOT_ROUTED (with
        backoff), after a request timeout. The node stores a cid once, so the recipient
        gets the message once however many attempts it took; a retry of a send that had
        been stored is answered with its ``mid`` and ``seq`` and ``dup=True``.

        Args:
            to: the recipient's user id.
            data: any value orjson can encode.
            cid: the client id (1..128 characters): pass the same one to make a send
                made again later (after a crash, say) idempotent too.
            timeout: seconds to keep trying (default :attr:`send_timeout`).

        Returns:
            :class:`Sent` (``mid``, ``seq``, ``dup``).

        Raises:
            ValueError: ``to`` or ``cid`` is invalid.
            TypeError: ``data`` cannot be encoded as JSON.
            RequestError: refused for good: NO_USER (115, this client declared no
                user), INBOX_FULL (113, the recipient has ``inbox_max`` unacknowledged
                messages), or another error code.
            asyncio.TimeoutError: not acknowledged within ``timeout`` (the message
                may or may not be stored; sending it again with the same ``cid``
                is safe).
            ConnectionClosed: the client is closed or gave up.
        """
        _check_user(to, "to")
        if cid is None:
            cid = uuid.uuid4().hex
        elif not isinstance(cid, str) or not 0 < len(cid) <= 128:
            raise ValueError("cid must be a string of 1..128 characters")
        cmd = {"op": "send", "to": to, "data": data, "cid": cid}
        orjson.dumps(cmd)  # TypeError now rather than on each attempt
        limit = self.send_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        backoff = Backoff(*_SEND_BACKOFF)
        last: BaseException | None = None
        while True:
            self._check_open()
            left = end - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(
                    f"send to {to!r} (cid {cid}) not acknowledged within {limit:g}s: {last!r}"
                ) from last
            try:
                reply = await self._cmd(cmd, timeout=min(self.request_timeout, left))
            except RequestError as e:
                if e.code not in _TRANSIENT:
                    raise
                last = e
                await asyncio.sleep(min(backoff.next(), max(0.0, end - loop.time())))
                continue
            except ConnectionClosed as e:
                if self.closed or not e.temporary:
                    raise
                last = e  # the reader reconnects; the next attempt waits for it
                continue
            except asyncio.TimeoutError as e:
                last = e
                continue
            try:
                return Sent(
                    str(reply["mid"]),
                    int(reply["seq"]),
                    bool(reply.get("dup")),
                    str(reply.get("epoch") or ""),
                )
            except (KeyError, TypeError, ValueError):
                raise ProtocolError(f"malformed 'sent' reply: {reply!r}") from None

    def direct_messages(
        self, *, auto_ack: bool = True, on_gap: DirectGapCallback | None = None
    ) -> DirectMessages:
        """The direct messages to this client's user: each ``seq`` once, in order.

        ``async for msg in client.direct_messages(): ...`` yields
        :class:`~fastim.client.DirectMessage` items, across reconnects, without
        duplicates. With ``auto_ack`` a message is acknowledged (cumulatively, in
        batches: at most one ack in flight) once the iterator handed it over; without,
        call :meth:`ack`. Several iterators share one queue (each message goes to one).
        Needs ``user`` in :func:`connect`.

        ``on_gap`` is called with a :class:`~fastim.client.DirectGap` when the reading
        reaches the point where the inbox's numbering started again (the node's store
        lost it): what is lost is said there, and the new numbering follows
        (``client.inbox.gaps`` counts them either way).
        """
        if self.user is None:
            raise ValueError("direct messages need a user: connect(..., user=...)")
        if on_gap is not None:
            self._inbox.on_gap = on_gap
        return DirectMessages(self._inbox, auto_ack)

    def ack(self, seq: int) -> None:
        """Acknowledge direct messages up to ``seq`` (for ``auto_ack=False``).

        Returns at once; the ack goes out in the background (batched, resent after a
        reconnect). Never acknowledges past what this client received.
        """
        self._inbox.took(seq)

    async def presence(self, channel: str) -> dict[str, Any]:
        """Who is subscribed to ``channel``.

        Returns:
            ``{"ch": ..., "count": N, "users": [...]}``: ``count`` subscribed
            connections; ``users`` the distinct user ids among them (at most the
            node's ``presence_max``; absent when the namespace disables presence).
        """
        _check_channel(channel)
        reply = await self._cmd({"op": "presence", "ch": channel})
        return {k: v for k, v in reply.items() if k not in ("op", "id")}

    async def inbox_state(self) -> InboxState:
        """The inbox of this client's user: ``acked`` and ``top`` sequences.

        Raises:
            RequestError: NO_USER (115) without a user; STORE_UNAVAILABLE (114).
        """
        return inbox_state(await self._cmd({"op": "inbox"}))

    async def ping(self) -> float:
        """A round trip through the node's command path; returns it in seconds.

        Answered by the node's event loop without touching the store: a way to tell a
        node that is up from one that hangs.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._cmd({"op": "ping"})
        return loop.time() - start

    async def aclose(self) -> None:
        """Close the connection and end every subscription. Idempotent.

        Pending requests fail with ConnectionClosed (code 1000); subscription and
        direct-message iterators end once their queued messages are read.
        """
        if self._closing:
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            return
        self._closing = True
        self._ready.set()  # wake requests waiting for a connection: they see _closing
        self._fail_pending(ConnectionClosed(*_CLIENT_CLOSED))
        self._end_subscriptions(ConnectionClosed(*_CLIENT_CLOSED), normal=True)
        self._inbox.finish(ConnectionClosed(*_CLIENT_CLOSED), normal=True)
        self._stop_heartbeat()
        if self._inbox_retry is not None:
            self._inbox_retry.cancel()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            tasks.append(reader)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(CloseCode.NORMAL, "client closed")

    # ----------------------------------------------------------------- connecting

    async def _start(self) -> None:
        """First connect: each URL once, in :attr:`order`; raise the last error if all fail."""
        last: BaseException | None = None
        for url in self.order:
            try:
                conn, rest = await self._handshake(url)
            except (OSError, asyncio.TimeoutError, FastimError) as e:
                log.debug("fastim client: %s: %r", url, e)
                last = e
                continue
            self._on_connected(conn)
            self._reader = asyncio.get_running_loop().create_task(
                self._run(conn, rest), name=f"fastim-client-reader {url}"
            )
            return
        assert last is not None
        raise last

    async def _handshake(self, url: str) -> tuple[Connection, list[tuple[int, bytes]]]:
        """Open a transport, HELLO, wait for WELCOME; all within ``connect_timeout``."""
        self._url = url
        conn: Connection | None = None

        async def run() -> tuple[Connection, list[tuple[int, bytes]]]:
            nonlocal conn
            conn = await open_connection(url)
            conn.write(self._hello)
            await conn.drain()
            error: tuple[int, str] | None = None
            while True:
                try:
                    frames = await conn.read_frames()
                except ConnectionClosed:
                    if error is not None:
                        raise ProtocolError(error[1], error[0]) from None
                    raise
                for i, (ftype, payload) in enumerate(frames):
                    if ftype == FrameType.WELCOME:
                        self._on_welcome(payload)
                        return conn, frames[i + 1 :]
                    if ftype == FrameType.PING:
                        conn.write(encode_frame(FrameType.PONG, payload))
                    elif ftype == FrameType.ERROR:
                        _, code, reason = protocol.unpack_error(payload)
                        error = (code, reason)
                    elif ftype == FrameType.GOAWAY:
                        code, reason = protocol.unpack_goaway(payload)
                        if error is not None:
                            raise ProtocolError(error[1], error[0])
                        raise ConnectionClosed(code, reason)

        try:
            async with deadline(self.connect_timeout):
                try:
                    return await run()
                except struct.error as e:
                    raise ProtocolError(f"malformed frame during the handshake: {e}") from None
        except BaseException:
            if conn is not None:
                conn.abort()
            raise

    def _on_welcome(self, payload: bytes) -> None:
        if not payload or payload[0] not in protocol.SUPPORTED_VERSIONS:
            raise ProtocolError(
                f"server chose protocol version {payload[:1].hex() or 'none'}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        try:
            info = orjson.loads(payload[1:]) if len(payload) > 1 else {}
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"WELCOME info is not JSON: {e}") from None
        if not isinstance(info, dict):
            raise ProtocolError("WELCOME info is not a JSON object")
        self.server_info = info
        ping = info.get("ping_interval")
        pong = info.get("pong_timeout")
        self._ping_interval = float(ping) if isinstance(ping, (int, float)) and ping > 0 else 0.0
        pong_t = float(pong) if isinstance(pong, (int, float)) and pong > 0 else 10.0
        self._dead_after = self._ping_interval + pong_t if self._ping_interval else 0.0
        max_frame = info.get("max_frame")
        if isinstance(max_frame, int) and max_frame > 0:
            self._max_frame = max_frame

    def _on_connected(self, conn: Connection) -> None:
        """The handshake is done: re-subscribe, start the heartbeat, let requests go."""
        self._conn = conn
        self._url = conn.url
        self._abort_reason = None
        self.backoff.reset()
        with contextlib.suppress(ConnectionClosed):  # lost already: the reader will see it
            for sub in list(self._subs.values()):
                self._resubscribe(conn, sub)
        self._start_heartbeat()
        self._ready.set()
        self._inbox.pump()  # an ack the last connection could not deliver

    def _resubscribe(self, conn: Connection, sub: Subscription) -> None:
        """Subscribe ``sub`` again on ``conn`` (the reply is handled by the reader).

        With ``since`` = where the subscription is, so the node sends what was missed,
        when the server has named an epoch; a server without epochs gets a plain SUB.
        """
        req_id = self._new_id()
        fut: asyncio.Future[Any] = _future()
        fut.add_done_callback(functools.partial(self._resubscribed, sub, conn))
        if sub.epoch:
            since = sub.since
            self._pending[req_id] = _Pending(fut, sub, resubscribe=True, since=since)
            cmd = {"op": "sub", "ch": sub.channel, "since": since._asdict(), "id": req_id}
            conn.write(encode_frame(FrameType.CMD, orjson.dumps(cmd)))
        else:
            self._pending[req_id] = _Pending(fut, sub, resubscribe=True)
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
        if self._subs.get(sub.channel) is not sub:
            return
        if exc.code in _TRANSIENT:
            # the node could not read the history (or the channel's state, or ask the
            # channel's owner node): try again on this connection, later; the sub is not
            # on the node meanwhile
            delay = min(max(sub._retry_delay * 2, _RESUB_RETRY[0]), _RESUB_RETRY[1])
            sub._retry_delay = delay
            log.info("fastim client: resubscribe %r: %s; again in %.1fs", sub.channel, exc, delay)
            asyncio.get_running_loop().call_later(delay, self._retry_resubscribe, sub, conn)
            return
        log.warning("fastim client: re-subscribing to %r refused: %s", sub.channel, exc)
        del self._subs[sub.channel]
        sub._finish(exc, normal=False)

    def _retry_resubscribe(self, sub: Subscription, conn: Connection) -> None:
        if self._conn is conn and self.connected and self._subs.get(sub.channel) is sub:
            with contextlib.suppress(ConnectionClosed):
                self._resubscribe(conn, sub)

    def _next_urls(self, lost: str) -> list[str]:
        """The order of one round of reconnect attempts after losing ``lost``: the
        addresses after it in :attr:`order`, then it (a node that just failed is the
        least likely to answer; it is tried again at the end of every round)."""
        order = self.order
        try:
            i = order.index(lost)
        except ValueError:
            return list(order)
        return order[i + 1 :] + order[: i + 1]

    async def _reconnect_loop(
        self, lost: str, at_once: bool = False
    ) -> tuple[Connection, list[tuple[int, bytes]]] | None:
        """Sleep, try the next URL, repeat; None if the client closed or gave up.

        ``lost``: the URL of the connection that ended (tried last in each round).
        ``at_once``: it ended with "going away" (the node is shutting down): the first
        attempt, at the next node, is made without the backoff sleep. A node that
        refuses the handshake with "going away" (at its connection limit) is also
        skipped at once, at most once per address per round, so a cluster where every
        node refuses still goes through the backoff.
        """
        permanent: dict[str, BaseException] = {}
        attempt = 0
        urls = self._next_urls(lost)
        skips = 0  # sleeps skipped since the last sleep
        while not self._closing:
            if at_once and skips < len(urls):
                skips += 1
            else:
                skips = 0
                delay = self.backoff.next()
                await asyncio.sleep(delay)
                if self._closing:
                    return None
            at_once = False
            url = urls[attempt % len(urls)]
            attempt += 1
            try:
                conn, rest = await self._handshake(url)
            except (OSError, asyncio.TimeoutError, HandshakeError) as e:
                log.info("fastim client: reconnect to %s failed: %r", url, e)
                permanent.pop(url, None)
                continue
            except (ConnectionClosed, ProtocolError) as e:
                if isinstance(e, ConnectionClosed) and e.temporary:
                    log.info("fastim client: %s turned us away: %s", url, e)
                    permanent.pop(url, None)
                    at_once = e.code in _MOVE_ON_AT_ONCE
                    continue
                log.warning("fastim client: %s refused us: %r", url, e)
                permanent[url] = e
                if len(permanent) == len(set(urls)):
                    self._give_up(
                        e
                        if isinstance(e, ConnectionClosed)
                        else ConnectionClosed(CloseCode.POLICY_VIOLATION, str(e))
                    )
                    return None
                continue
            self.reconnects += 1
            log.info("fastim client: reconnected to %s (lost %s)", url, lost)
            self._on_connected(conn)
            return conn, rest
        return None

    # ----------------------------------------------------------------- the reader

    async def _run(self, conn: Connection, rest: list[tuple[int, bytes]]) -> None:
        try:
            await self._run_loop(conn, rest)
        except Exception as e:  # a bug: fail loudly rather than leave requests hanging
            log.exception("fastim client: reader failed")
            self._ready.clear()
            self._stop_heartbeat()
            if self._conn is not None:
                self._conn.abort()
                self._conn = None
            self._give_up(ConnectionClosed(CloseCode.INTERNAL_ERROR, f"client error: {e!r}"))

    async def _run_loop(self, conn: Connection, rest: list[tuple[int, bytes]]) -> None:
        while True:
            lost = await self._serve(conn, rest)
            await self._on_disconnect(conn, lost)
            if self._closing:
                return
            if not (self.reconnect and lost.temporary):
                self._give_up(lost)
                return
            log.info("fastim client: connection to %s lost (%s); reconnecting", conn.url, lost)
            new = await self._reconnect_loop(conn.url, at_once=lost.code in _MOVE_ON_AT_ONCE)
            if new is None:
                return
            conn, rest = new

    async def _serve(self, conn: Connection, rest: list[tuple[int, bytes]]) -> ConnectionClosed:
        """Read and dispatch until the connection ends; return why it ended.

        ``rest``: frames that came in the same chunk as WELCOME, dispatched first.
        """
        loop = asyncio.get_running_loop()
        try:
            for ftype, payload in rest:
                self._dispatch(ftype, payload)
            while True:
                frames = await conn.read_frames()
                self._last_rx = loop.time()
                for ftype, payload in frames:
                    self._dispatch(ftype, payload)
        except ConnectionClosed as e:
            return self._abort_reason or e
        except ProtocolError as e:
            log.warning("fastim client: protocol error from %s: %s", conn.url, e.reason)
            await conn.close(e.close_code, e.reason[:100])
            return ConnectionClosed(e.close_code, f"protocol error from server: {e.reason}")
        except OSError as e:
            return self._abort_reason or ConnectionClosed(1006, f"connection lost: {e}")

    async def _on_disconnect(self, conn: Connection, lost: ConnectionClosed) -> None:
        self._ready.clear()
        self._stop_heartbeat()
        if self._conn is conn:
            self._conn = None
        self._fail_pending(lost)
        await conn.close()

    def _give_up(self, why: ConnectionClosed) -> None:
        log.warning("fastim client: giving up on the connection: %s", why)
        self._failure = why
        self._ready.set()  # wake requests waiting for a connection: they see _failure
        self._fail_pending(why)
        self._end_subscriptions(why, normal=False)
        self._inbox.finish(why, normal=False)

    def _fail_pending(self, exc: ConnectionClosed) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionClosed(exc.code, exc.reason))

    def _end_subscriptions(self, exc: ConnectionClosed, normal: bool) -> None:
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            sub._finish(exc, normal)

    def _dispatch(self, ftype: int, payload: bytes) -> None:
        try:
            if ftype == FrameType.MSG:
                self._on_msg(payload)
            elif ftype == FrameType.EVENT:
                self._on_event(payload)
            elif ftype == FrameType.SUBSCRIBED:
                req_id, off, ch, epoch, recovered = protocol.unpack_subscribed(payload)
                p = self._pending.pop(req_id, None)
                if p is None:
                    self._late_subscribed(ch)
                    return
                self._on_subscribed(p, ch, off, epoch, recovered)
                _resolve(p, (ftype, payload))
            elif ftype == FrameType.PUBACK:
                req_id, _off, _ch = protocol.unpack_ack(payload)
                self._on_reply(req_id, (ftype, payload))
            elif ftype == FrameType.UNSUBSCRIBED:
                req_id, _ch = protocol.unpack_unsubscribed(payload)
                self._on_reply(req_id, (ftype, payload))
            elif ftype == FrameType.ERROR:
                self._on_error(payload)
            elif ftype == FrameType.PING:
                if self._conn is not None:
                    self._conn.write(encode_frame(FrameType.PONG, payload))
            elif ftype == FrameType.GOAWAY:
                code, reason = protocol.unpack_goaway(payload)
                raise ConnectionClosed(code, reason)
            # PONG: liveness is recorded when the bytes arrive; WELCOME again: ignored
        except struct.error as e:
            raise ProtocolError(f"malformed {FrameType(ftype).name} payload: {e}") from None

    def _on_msg(self, payload: bytes) -> None:
        offset, channel, data = protocol.unpack_msg(payload)
        sub = self._subs.get(channel)
        if sub is None or offset <= sub.offset:
            return  # not (or no longer) subscribed, or already delivered
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
            self._inbox_ok()
            self._inbox.on_dm(obj)
            return
        if op == "resubscribe":
            self._on_resubscribe(obj)
            return
        req_id = obj.get("id")
        p = None
        if isinstance(req_id, int) and not isinstance(req_id, bool):
            p = self._pending.pop(req_id, None)
        if p is None:
            if op == "subscribed":
                self._late_subscribed(obj.get("ch"))
            elif op == "error":
                self._on_unsolicited_error(obj)
            elif req_id is None and self.on_event is not None:
                try:
                    self.on_event(obj)
                except Exception:
                    log.exception("fastim client: on_event callback failed")
            return
        if op == "error":
            code, reason = obj.get("code"), obj.get("reason")
            if not p.future.done():
                p.future.set_exception(
                    _request_error(code if isinstance(code, int) else 0, str(reason or ""))
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
        _resolve(p, obj)

    def _on_subscribed(self, p: _Pending, ch: str, off: int, epoch: str, recovered: bool) -> None:
        """A subscribe was answered: register it, and place it in the channel's history.

        Runs in the reader, before any message that follows the reply is dispatched:
        the replayed messages and the live ones meet the right ``offset``.
        """
        sub = p.sub
        if sub is None:
            return
        if p.resubscribe:
            if self._subs.get(ch) is not sub:  # unsubscribed while re-subscribing
                self._send_unsub(ch)
                return
        else:
            self._subs[ch] = sub
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
        if isinstance(ch, str) and ch not in self._subs:
            self._send_unsub(ch)

    def _on_resubscribe(self, obj: dict[str, Any]) -> None:
        """The channel's history was lost while subscribed (a new epoch); the node
        dropped the subscription. Subscribe again from the start of the new epoch:
        what this subscription had came live, so nothing is missing unless the new
        epoch's history is (then the reply says recovered: false, and that is a gap)."""
        ch, epoch = obj.get("ch"), obj.get("epoch")
        sub = self._subs.get(ch) if isinstance(ch, str) else None
        conn = self._conn
        if sub is None or not isinstance(epoch, str):
            return
        log.info("fastim client: %r: history lost, new epoch %s", ch, epoch)
        # an epoch names one history, never reused: one this subscription has been in
        # before (a store that answered wrongly for a while) is resumed where it was left
        sub._move(epoch, sub._left.get(epoch, 0))
        if conn is not None:
            with contextlib.suppress(ConnectionClosed):
                self._resubscribe(conn, sub)

    def _on_reply(self, req_id: int, result: Any) -> None:
        p = self._pending.pop(req_id, None)
        if p is not None:
            _resolve(p, result)

    def _on_error(self, payload: bytes) -> None:
        req_id, code, reason = protocol.unpack_error(payload)
        p = self._pending.pop(req_id, None) if req_id else None
        if p is None:
            if req_id:  # the answer to a request given up on (timeout, fire-and-forget)
                log.debug("fastim client: late error for request %d: %d %s", req_id, code, reason)
            else:  # connection-level (fatal) error: the GOAWAY / close that follows ends it
                log.warning("fastim client: server error %d: %s", code, reason)
            return
        if not p.future.done():
            p.future.set_exception(_request_error(code, reason))

    def _on_unsolicited_error(self, obj: dict[str, Any]) -> None:
        code = obj.get("code")
        log.warning("fastim client: server error %s: %s", code, obj.get("reason"))
        # STORE_UNAVAILABLE without a request: the node could not read our inbox when we
        # connected, and will not replay the unacknowledged messages on this connection;
        # a new connection asks again
        if code == ErrorCode.STORE_UNAVAILABLE and self.user and self._inbox_retry is None:
            delay = self._inbox_backoff.next()
            self._inbox_retry = asyncio.get_running_loop().call_later(
                delay, self._reconnect_for_inbox
            )

    def _reconnect_for_inbox(self) -> None:
        self._inbox_retry = None
        conn = self._conn
        if conn is not None and not self._closing:
            self._abort_reason = ConnectionClosed(
                CloseCode.INTERNAL_ERROR, "the node could not read the inbox; reconnecting"
            )
            conn.abort()

    def _inbox_ok(self) -> None:
        """The node serves our inbox: connect-again delays for it start over."""
        self._inbox_backoff.reset()

    # ----------------------------------------------------------------- requests

    def _check_open(self) -> None:
        if self._closing:
            raise ConnectionClosed(*_CLIENT_CLOSED)
        failure = self._failure
        if isinstance(failure, ConnectionClosed):
            raise ConnectionClosed(failure.code, failure.reason)

    def _new_id(self) -> int:
        self._next_id = self._next_id % _MAX_ID + 1  # 1..2**32-1; 0 means "no request"
        return self._next_id

    async def _wait_ready(self) -> Connection:
        while True:
            self._check_open()
            conn = self._conn
            if self._ready.is_set() and conn is not None:
                return conn
            await self._ready.wait()

    async def _call(
        self,
        frame: Callable[[int], bytes],
        pending: _Pending,
        timeout: float | None = None,
    ) -> Any:
        """Send the frame ``frame(request id)`` and wait for its reply.

        Waits for the connection first; all within ``timeout`` (``request_timeout``).
        """

        async def run() -> Any:
            conn = await self._wait_ready()
            req_id = self._new_id()
            data = frame(req_id)
            self._pending[req_id] = pending
            try:
                conn.write(data)
                await conn.drain()
                return await pending.future
            finally:
                self._pending.pop(req_id, None)

        async with deadline(self.request_timeout if timeout is None else timeout):
            return await run()

    def _frame(self, ftype: int, channel: str, data: bytes = b"") -> Callable[[int], bytes]:
        def make(req_id: int) -> bytes:
            payload = protocol.pack_sub(ftype, req_id, channel, data)
            self._check_size(FrameType(ftype).name, len(payload))
            return encode_frame(ftype, payload)

        return make

    def _cmd_frame(self, cmd: dict[str, Any]) -> Callable[[int], bytes]:
        def make(req_id: int) -> bytes:
            body = orjson.dumps({**cmd, "id": req_id})
            self._check_size(f"{cmd.get('op')!r} command", len(body))
            return encode_frame(FrameType.CMD, body)

        return make

    def _check_size(self, what: str, size: int) -> None:
        if size > self._max_frame:
            raise ValueError(
                f"{what} of {size} bytes exceeds the server's max_frame of {self._max_frame}"
            )

    async def _request(
        self, ftype: int, channel: str, data: bytes = b"", sub: Subscription | None = None
    ) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self._call(
            self._frame(ftype, channel, data), _Pending(_future(), sub)
        )
        return result

    async def _cmd(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """A JSON command (CMD frame); its JSON reply (EVENT frame), or RequestError."""
        reply: dict[str, Any] = await self._call(self._cmd_frame(cmd), _Pending(_future()), timeout)
        return reply

    async def _unsubscribe(self, sub: Subscription) -> None:
        if not sub.active:
            return
        ch = sub.channel
        if self._subs.get(ch) is sub:
            del self._subs[ch]
        sub._finish(ConnectionClosed(*_UNSUBSCRIBED), normal=True)
        if not self.connected:
            return  # the server forgot it with the connection; we will not re-subscribe
        try:
            await self._request(FrameType.UNSUB, ch)
        except ConnectionClosed:
            pass
        except RequestError as e:
            if e.code != ErrorCode.NOT_SUBSCRIBED:
                raise

    def _send_unsub(self, channel: str) -> None:
        """Fire-and-forget UNSUB (its reply is ignored)."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(ConnectionClosed):
            payload = protocol.pack_sub(FrameType.UNSUB, self._new_id(), channel)
            conn.write(encode_frame(FrameType.UNSUB, payload))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background coroutine of the client (cancelled by :meth:`aclose`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fastim client: background task failed", exc_info=task.exception())

    # ----------------------------------------------------------------- heartbeat

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._last_rx = now
        if not self._ping_interval:
            return
        self._next_ping = now + self._ping_interval
        self._hb = loop.call_at(self._next_ping, self._heartbeat)

    def _stop_heartbeat(self) -> None:
        if self._hb is not None:
            self._hb.cancel()
            self._hb = None

    def _heartbeat(self) -> None:
        """Timer callback: ping every ping_interval; drop a connection gone silent."""
        self._hb = None
        conn = self._conn
        if conn is None or conn.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        silent = now - self._last_rx
        if silent >= self._dead_after:
            self._abort_reason = ConnectionClosed(
                CloseCode.HEARTBEAT_TIMEOUT, f"nothing from the server for {silent:.1f}s"
            )
            log.info("fastim client: %s", self._abort_reason.reason)
            conn.abort()
            return
        if now >= self._next_ping:
            try:
                conn.send_ping(struct.pack("!d", now))
            except ConnectionClosed:
                return
            self._next_ping = now + self._ping_interval
        wake = min(self._next_ping, self._last_rx + self._dead_after)
        self._hb = loop.call_at(wake, self._heartbeat)


async def connect(
    url: str | Sequence[str],
    *,
    urls: Sequence[str] | None = None,
    user: str | None = None,
    shuffle: bool = False,
    reconnect: bool = True,
    backoff: Backoff | None = None,
    connect_timeout: float = 5.0,
    request_timeout: float = 10.0,
    send_timeout: float = 30.0,
    on_event: Callable[[dict[str, Any]], object] | None = None,
) -> Client:
    """Connect to a fastim server.

    The first connection is tried once per URL (``url``, then each of ``urls``, or in a
    random order with ``shuffle``); the retries with backoff are for *re*-connecting
    after a loss. After a loss the client tries the URLs that follow the lost one
    first, the lost one last (see docs/client.md, "Several nodes").

    Args:
        url: ``tcp://host:port`` or ``ws://host:port/ws``, or a list of them: the
            nodes of a cluster, or a primary and its fallbacks.
        urls: more URLs, after ``url``.
        user: the user id to declare (in HELLO's options): needed to send and receive
            direct messages, and named in presence. 1..255 bytes of UTF-8.
        shuffle: try the URLs in a random order of this client's own (the same order
            for its whole life) instead of as given: for the nodes of a cluster, so
            that many clients with the same list spread over the nodes, and the
            clients of a node that fails spread over the others instead of all
            landing on the next one in the list.
        reconnect: reconnect after a connection loss whose close code allows it
            (EOF, heartbeat silence, server shutdown: yes; a "bad request" close: no).
        backoff: delays between reconnect attempts; default
            ``Backoff(base=0.1, factor=2.0, max=10.0, jitter="full")``.
        connect_timeout: seconds for one attempt: TCP connect, WebSocket upgrade,
            HELLO / WELCOME.
        request_timeout: seconds a subscribe / publish / unsubscribe / command may
            take (waiting for a reconnect included).
        send_timeout: seconds :meth:`Client.send` keeps retrying a direct message.
        on_event: called (from the reader) with JSON events the client does not
            handle itself, e.g. ``{"op":"join","ch":...,"user":...}``.

    Returns:
        A connected :class:`Client`; close it with ``aclose()`` or ``async with``.

    Raises:
        ValueError: a URL or the user id is not understood.
        OSError: no server accepted the TCP connection.
        asyncio.TimeoutError: the handshake did not finish within ``connect_timeout``.
        HandshakeError: the WebSocket upgrade failed (a ProtocolError).
        ProtocolError: the server refused the HELLO (e.g. UNSUPPORTED_VERSION, or a
            BAD_REQUEST for the user id).
        ConnectionClosed: the server closed the connection during the handshake.
    """
    first = [url] if isinstance(url, str) else list(url)
    all_urls = [*first, *(urls or ())]
    for u in all_urls:
        parse_url(u)  # fail fast on a typo
    client = Client(
        all_urls,
        user=user,
        shuffle=shuffle,
        reconnect=reconnect,
        backoff=backoff,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        send_timeout=send_timeout,
        on_event=on_event,
    )
    await client._start()
    return client
