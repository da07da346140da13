"""The asyncio client: connect, subscribe, publish, heartbeat, reconnect.

One :class:`Client` holds one connection at a time and one reader task. The reader
decodes every frame the server sends and dispatches it: replies resolve the future of
the request with the same id, MSG frames go to the queue of their
:class:`Subscription`, PINGs are answered at once. When the connection is lost (EOF,
socket error, silence longer than ``ping_interval + pong_timeout``, a GOAWAY or
WebSocket close whose code says "reconnect"), the reader fails the pending requests,
then reconnects with :class:`~fastim.client.Backoff`, re-subscribes every live
subscription and carries on. A publish in flight at a disconnect is failed, never
resent: publishes are not idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from .. import protocol
from .._core import DEFAULT_MAX_FRAME, encode_frame
from ..errors import ConnectionClosed, FastimError, ProtocolError, RequestError
from ..protocol import CloseCode, ErrorCode, FrameType
from .backoff import Backoff
from .connection import Connection, HandshakeError, deadline, open_connection, parse_url

__all__ = ["CLIENT_NAME", "Client", "Message", "Subscription", "connect"]

log = logging.getLogger("fastim.client")

#: What the SDK calls itself in HELLO.
CLIENT_NAME = "fastim-py/0.1"

_HELLO = encode_frame(
    FrameType.HELLO,
    protocol.pack_hello(
        protocol.SUPPORTED_VERSIONS[0],
        protocol.SUPPORTED_VERSIONS[-1],
        orjson.dumps({"client": CLIENT_NAME}),
    ),
)
_MAX_ID = 0xFFFFFFFF
_CLIENT_CLOSED = (CloseCode.NORMAL, "client closed")
_UNSUBSCRIBED = (CloseCode.NORMAL, "unsubscribed")


class Message(NamedTuple):
    """One message of a channel."""

    channel: str
    offset: int  # position in the channel, strictly increasing
    data: Any  # the published JSON document, decoded


def _check_channel(channel: str) -> str:
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}")
    try:
        return protocol.validate_channel(channel)
    except ProtocolError as e:
        raise ValueError(f"invalid channel name {channel!r}: {e.reason}") from None


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
    Across a reconnect the subscription lives on: the client subscribes again and
    drops messages at offsets it has already delivered.
    """

    def __init__(self, client: Client, channel: str, max_queue: int = 0) -> None:
        self.channel = channel
        #: Latest offset seen: from SUBSCRIBED, then from each message.
        self.offset = 0
        #: Queue bound (0: unbounded).
        self.max_queue = max_queue
        #: Messages dropped because the queue was full.
        self.dropped = 0
        self._client = client
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._end: BaseException | None = None
        self._end_normal = False

    def __repr__(self) -> str:
        state = "active" if self._end is None else "ended"
        return f"<Subscription {self.channel!r} offset={self.offset} {state}>"

    @property
    def active(self) -> bool:
        """Whether messages may still arrive (not unsubscribed, closed or failed)."""
        return self._end is None

    def qsize(self) -> int:
        """Messages waiting to be read."""
        n = self._queue.qsize()
        return n - 1 if self._end is not None and n else n

    async def get(self) -> Message:
        """Wait for the next message.

        Returns:
            The next :class:`Message`, in offset order.

        Raises:
            ConnectionClosed: the subscription has ended and its queue is empty: code
                1000 after :meth:`unsubscribe` or :meth:`Client.aclose`; the close code
                of the connection if the client gave up on it.
            RequestError: the server refused to subscribe again after a reconnect.
        """
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # the end marker stays for other readers
            raise self._end_error()
        return item

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
        q = self._queue
        if self.max_queue and q.qsize() >= self.max_queue:
            q.get_nowait()
            self.dropped += 1
        q.put_nowait(msg)

    def _finish(self, exc: BaseException, normal: bool) -> None:
        if self._end is not None:
            return
        self._end = exc
        self._end_normal = normal
        self._queue.put_nowait(None)

    def _end_error(self) -> BaseException:
        end = self._end
        assert end is not None
        # a fresh exception per raise: re-raising one object would pile up tracebacks
        if isinstance(end, ConnectionClosed):
            return ConnectionClosed(end.code, end.reason)
        if isinstance(end, RequestError):
            return RequestError(end.code, end.reason)
        return end


class _Pending:
    """A request waiting for its reply."""

    __slots__ = ("ftype", "future", "resubscribe", "sub")

    def __init__(
        self,
        future: asyncio.Future[tuple[int, bytes]],
        ftype: int,
        sub: Subscription | None = None,
        resubscribe: bool = False,
    ) -> None:
        self.future = future
        self.ftype = ftype
        self.sub = sub  # SUB: registered by the reader the moment SUBSCRIBED arrives
        self.resubscribe = resubscribe


class Client:
    """A connection to a fastim server that survives disconnects. Use :func:`connect`.

    Attributes:
        urls: the server URLs, primary first; reconnects try them in turn.
        server_info: the JSON object of the last WELCOME (node, ping_interval, ...).
        reconnects: how many times the client has connected again after a loss.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one URL is needed")
        if not connect_timeout > 0 or not request_timeout > 0:
            raise ValueError("connect_timeout and request_timeout must be > 0")
        self.urls = list(urls)
        self.reconnect = reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.server_info: dict[str, Any] = {}
        self.reconnects = 0
        self._url = self.urls[0]
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

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def subscribe(self, channel: str, *, max_queue: int = 0) -> Subscription:
        """Subscribe to a channel.

        Waits for the connection if the client is reconnecting (all within
        ``request_timeout``).

        Args:
            channel: 1..255 bytes of UTF-8, no control characters.
            max_queue: bound of the subscription's queue; 0 for unbounded. When full,
                the oldest message is dropped (see :class:`Subscription`).

        Returns:
            The :class:`Subscription`, once the server confirmed it.

        Raises:
            ValueError: the channel name is invalid (checked before sending).
            RequestError: the server refused (``code`` is an ErrorCode, e.g.
                LIMIT_EXCEEDED), or this client is already subscribed to ``channel``
                (ALREADY_SUBSCRIBED, without asking the server).
            asyncio.TimeoutError: no reply within ``request_timeout``.
            ConnectionClosed: the connection was lost before the reply, or the
                client is closed.
        """
        _check_channel(channel)
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self._check_open()
        if channel in self._subs or channel in self._subscribing:
            raise RequestError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, max_queue)
        self._subscribing.add(channel)
        try:
            await self._request(FrameType.SUB, channel, sub=sub)
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
        may or may not have it).

        Args:
            channel: 1..255 bytes of UTF-8, no control characters.
            data: any value orjson can encode.

        Returns:
            The offset the server gave the message in the channel.

        Raises:
            ValueError: invalid channel name, or the message exceeds the server's
                ``max_frame``.
            TypeError: ``data`` cannot be encoded as JSON.
            RequestError: the server refused.
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

    async def aclose(self) -> None:
        """Close the connection and end every subscription. Idempotent.

        Pending requests fail with ConnectionClosed (code 1000); subscription iterators
        end once their queued messages are read.
        """
        if self._closing:
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            return
        self._closing = True
        self._ready.set()  # wake requests waiting for a connection: they see _closing
        self._fail_pending(ConnectionClosed(*_CLIENT_CLOSED))
        self._end_subscriptions(ConnectionClosed(*_CLIENT_CLOSED), normal=True)
        self._stop_heartbeat()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(CloseCode.NORMAL, "client closed")

    # ----------------------------------------------------------------- connecting

    async def _start(self) -> None:
        """First connect: each URL once, in order; raise the last error if all fail."""
        last: BaseException | None = None
        for url in self.urls:
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
            conn.write(_HELLO)
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

    def _resubscribe(self, conn: Connection, sub: Subscription) -> None:
        """Subscribe ``sub`` again on a new connection (reply handled by the reader)."""
        req_id = self._new_id()
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(functools.partial(self._resubscribed, sub))
        self._pending[req_id] = _Pending(fut, FrameType.SUB, sub, resubscribe=True)
        conn.write(
            encode_frame(
                FrameType.SUB,
                protocol.pack_sub(FrameType.SUB, req_id, sub.channel, self._recovery_hint(sub)),
            )
        )

    def _recovery_hint(self, sub: Subscription) -> bytes:
        """Extra SUB payload on a re-subscribe; empty for now.

        Hook for history recovery: once the server takes a ``since`` offset in SUB, this
        returns it (from ``sub.offset``) and the server replays what was missed; the
        offset check in :meth:`_on_msg` already drops anything delivered twice.
        """
        return b""

    def _resubscribed(self, sub: Subscription, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, RequestError):
            log.warning("fastim client: re-subscribing to %r refused: %s", sub.channel, exc)
            if self._subs.get(sub.channel) is sub:
                del self._subs[sub.channel]
            sub._finish(exc, normal=False)
        # ConnectionClosed: the sub stays in _subs and is re-subscribed on the next connect

    async def _reconnect_loop(self) -> tuple[Connection, list[tuple[int, bytes]]] | None:
        """Sleep, try the next URL, repeat; None if the client closed or gave up."""
        permanent: dict[str, BaseException] = {}
        attempt = 0
        while not self._closing:
            delay = self.backoff.next()
            await asyncio.sleep(delay)
            if self._closing:
                return None
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                conn, rest = await self._handshake(url)
            except (OSError, asyncio.TimeoutError, HandshakeError) as e:
                log.info("fastim client: reconnect to %s failed: %r", url, e)
                permanent.pop(url, None)
                continue
            except (ConnectionClosed, ProtocolError) as e:
                if isinstance(e, ConnectionClosed) and e.temporary:
                    permanent.pop(url, None)
                    continue
                log.warning("fastim client: %s refused us: %r", url, e)
                permanent[url] = e
                if len(permanent) == len(set(self.urls)):
                    self._give_up(
                        e
                        if isinstance(e, ConnectionClosed)
                        else ConnectionClosed(CloseCode.POLICY_VIOLATION, str(e))
                    )
                    return None
                continue
            self.reconnects += 1
            log.info("fastim client: reconnected to %s", url)
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
            new = await self._reconnect_loop()
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
            elif ftype in (FrameType.SUBSCRIBED, FrameType.PUBACK):
                req_id, offset, channel = protocol.unpack_ack(payload)
                self._on_reply(req_id, ftype, payload, offset, channel)
            elif ftype == FrameType.UNSUBSCRIBED:
                req_id, channel = protocol.unpack_unsubscribed(payload)
                self._on_reply(req_id, ftype, payload, 0, channel)
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

    def _on_reply(self, req_id: int, ftype: int, payload: bytes, offset: int, ch: str) -> None:
        p = self._pending.pop(req_id, None)
        if p is None:
            if ftype == FrameType.SUBSCRIBED and ch not in self._subs:
                # the reply to a subscribe that timed out: the server has it, we do not
                self._send_unsub(ch)
            return
        if ftype == FrameType.SUBSCRIBED and p.sub is not None:
            sub = p.sub
            if p.resubscribe:
                if self._subs.get(ch) is not sub:  # unsubscribed while re-subscribing
                    self._send_unsub(ch)
                elif offset < sub.offset:
                    log.info(
                        "fastim client: %r offsets restarted at %d (was %d): new history",
                        ch,
                        offset,
                        sub.offset,
                    )
                elif offset > sub.offset:
                    log.info(
                        "fastim client: %r: messages %d..%d were published while away",
                        ch,
                        sub.offset + 1,
                        offset,
                    )
            else:
                self._subs[ch] = sub
            # without recovery the server sends what follows `offset`; with it (see
            # _recovery_hint) this is where the replay would start from sub.offset instead
            sub.offset = offset
        if not p.future.done():
            p.future.set_result((ftype, payload))

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
            p.future.set_exception(RequestError(code, reason))

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

    async def _request(
        self, ftype: int, channel: str, data: bytes = b"", sub: Subscription | None = None
    ) -> tuple[int, bytes]:
        async def run() -> tuple[int, bytes]:
            conn = await self._wait_ready()
            req_id = self._new_id()
            payload = protocol.pack_sub(ftype, req_id, channel, data)
            if len(payload) > self._max_frame:
                raise ValueError(
                    f"{FrameType(ftype).name} of {len(payload)} bytes exceeds the server's "
                    f"max_frame of {self._max_frame}"
                )
            fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
            self._pending[req_id] = _Pending(fut, ftype, sub)
            try:
                conn.write(encode_frame(ftype, payload))
                await conn.drain()
                return await fut
            finally:
                self._pending.pop(req_id, None)

        async with deadline(self.request_timeout):
            return await run()

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
    url: str,
    *,
    urls: Sequence[str] | None = None,
    reconnect: bool = True,
    backoff: Backoff | None = None,
    connect_timeout: float = 5.0,
    request_timeout: float = 10.0,
) -> Client:
    """Connect to a fastim server.

    The first connection is tried once per URL (``url``, then each of ``urls``); the
    retries with backoff are for *re*-connecting after a loss.

    Args:
        url: ``tcp://host:port`` or ``ws://host:port/ws``.
        urls: fallback URLs, tried in turn (after ``url``) when (re)connecting.
        reconnect: reconnect after a connection loss whose close code allows it
            (EOF, heartbeat silence, server shutdown: yes; a "bad request" close: no).
        backoff: delays between reconnect attempts; default
            ``Backoff(base=0.1, factor=2.0, max=10.0, jitter="full")``.
        connect_timeout: seconds for one attempt: TCP connect, WebSocket upgrade,
            HELLO / WELCOME.
        request_timeout: seconds a subscribe / publish / unsubscribe may take.

    Returns:
        A connected :class:`Client`; close it with ``aclose()`` or ``async with``.

    Raises:
        ValueError: a URL is not understood.
        OSError: no server accepted the TCP connection.
        asyncio.TimeoutError: the handshake did not finish within ``connect_timeout``.
        HandshakeError: the WebSocket upgrade failed (a ProtocolError).
        ProtocolError: the server refused the HELLO (e.g. UNSUPPORTED_VERSION).
        ConnectionClosed: the server closed the connection during the handshake.
    """
    all_urls = [url, *(urls or ())]
    for u in all_urls:
        parse_url(u)  # fail fast on a typo
    client = Client(
        all_urls,
        reconnect=reconnect,
        backoff=backoff,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
    )
    await client._start()
    return client
