"""The machinery under the client SDK's :class:`~fastim.client.Client`: one connection
at a time across reconnects, the reader task, and requests on the connection.

:class:`BaseClient` connects (failover over the node list, :mod:`.failover`), applies
what WELCOME says (heartbeat, ``max_frame``), runs one reader task per client that
serves each connection (:mod:`.dispatch`) and, when it is lost, fails the pending
requests (:mod:`.requests`), reconnects and subscribes again, or gives up for good. It
carries requests on the connection of the moment, waiting for one while reconnecting.
It is what :class:`~fastim.client.subscription.Subscription`,
:class:`~fastim.client.direct.DirectInbox`, the reader and failover call on a client
(their protocols: ``SubscriptionOwner``, ``InboxOwner``, ``ReaderHost``, ``Dialer``).
The public API is :class:`~fastim.client.Client`'s, in :mod:`.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .. import protocol
from .._core import encode_frame
from ..errors import ConnectionClosed, ProtocolError, RequestError
from ..protocol import CloseCode, ErrorCode, FrameType
from .backoff import Backoff
from .connection import Connection
from .direct import DirectInbox
from .dispatch import Dispatcher
from .failover import MOVE_ON_AT_ONCE, first_connect, next_urls, node_order, reconnect
from .handshake import Frames, handshake, hello_frame
from .heartbeat import Heartbeat
from .requests import Pending, PendingRequests, future
from .subscription import Subscription

__all__ = ["CLIENT_CLOSED", "UNSUBSCRIBED", "BaseClient", "check_channel", "check_user"]

log = logging.getLogger("fastim.client")

CLIENT_CLOSED = (CloseCode.NORMAL, "client closed")
UNSUBSCRIBED = (CloseCode.NORMAL, "unsubscribed")


def check_channel(channel: str) -> str:
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}")
    try:
        return protocol.validate_channel(channel)
    except ProtocolError as e:
        raise ValueError(f"invalid channel name {channel!r}: {e.reason}") from None


def check_user(user: str, field: str) -> str:
    """A user id follows the rules of a channel name (1..255 bytes, no control chars)."""
    if not isinstance(user, str):
        raise TypeError(f"{field} must be a str, got {type(user).__name__}")
    try:
        return protocol.validate_channel(user)
    except ProtocolError as e:
        reason = e.reason.replace('field "ch"', field)
        raise ValueError(f"invalid user id {user!r}: {reason}") from None


class BaseClient:
    """A client's connection across reconnects, its reader and its requests; no public
    API of its own but its state (:class:`~fastim.client.Client` is the one to use)."""

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
            check_user(user, "user")
        self.urls = list(urls)
        #: the order addresses are tried in: ``urls``, or a random permutation of them
        #: (``shuffle``); after a loss the client starts at the address after the lost one
        self.order = node_order(self.urls, shuffle)
        self.user = user
        self.reconnect = reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.on_event = on_event
        self.server_info: dict[str, Any] = {}
        self.reconnects = 0
        self._hello = hello_frame(user)
        self._url = self.order[0]
        self._conn: Connection | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: BaseException | None = None
        self._subs: dict[str, Subscription] = {}
        self._subscribing: set[str] = set()
        self._requests = PendingRequests()
        self._inbox = DirectInbox(self)
        # a node that could not read our inbox at connect never replays it on that
        # connection: connect again, no faster than this backoff allows
        self._inbox_backoff = Backoff(base=0.5, factor=2.0, max=30.0)
        self._inbox_retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat = Heartbeat(self._abort)
        #: why the client dropped the connection itself (silence, inbox unreadable)
        self._abort_reason: ConnectionClosed | None = None
        self._dispatcher = Dispatcher(self, self._requests, self._inbox, self._heartbeat)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed" if self.closed else "disconnected"
        return f"<fastim Client {self._url} {state} subs={len(self._subs)}>"

    @property
    def connected(self) -> bool:
        """Whether the handshake is done and requests can go out right now."""
        return self._ready.is_set() and self._conn is not None

    @property
    def closed(self) -> bool:
        """Whether the client is closed: :meth:`aclose` was called, or it gave up."""
        return self._closing or self._failure is not None

    # ----------------------------------------------------------------- connecting

    async def _start(self) -> None:
        """First connect: each URL once, in :attr:`order`; raise the last error if all fail."""
        conn, rest = await first_connect(self)
        self._on_connected(conn)
        self._reader = asyncio.get_running_loop().create_task(
            self._run(conn, rest), name=f"fastim-client-reader {conn.url}"
        )

    async def _handshake(self, url: str) -> tuple[Connection, Frames]:
        """Open a transport, HELLO, wait for WELCOME; all within ``connect_timeout``."""
        self._url = url
        conn, info, rest = await handshake(url, self._hello, self.connect_timeout)
        self.server_info = info
        self._heartbeat.configure(info)
        max_frame = info.get("max_frame")
        if isinstance(max_frame, int) and max_frame > 0:
            self._requests.max_frame = max_frame
        return conn, rest

    def _on_connected(self, conn: Connection) -> None:
        """The handshake is done: re-subscribe, start the heartbeat, let requests go."""
        self._conn = conn
        self._url = conn.url
        self._abort_reason = None
        self.backoff.reset()
        with contextlib.suppress(ConnectionClosed):  # lost already: the reader will see it
            for sub in list(self._subs.values()):
                self._dispatcher.resubscribe(conn, sub)
        self._heartbeat.start(conn)
        self._ready.set()
        self._inbox.pump()  # an ack the last connection could not deliver

    def _next_urls(self, lost: str) -> list[str]:
        """The addresses of one round of reconnect attempts after losing ``lost``."""
        return next_urls(self.order, lost)

    def _abort(self, conn: Connection, why: ConnectionClosed) -> None:
        """Drop ``conn`` now; the reader reports ``why`` (and reconnects)."""
        self._abort_reason = why
        conn.abort()

    # ----------------------------------------------------------------- the reader

    async def _run(self, conn: Connection, rest: Frames) -> None:
        try:
            await self._run_loop(conn, rest)
        except Exception as e:  # a bug: fail loudly rather than leave requests hanging
            log.exception("fastim client: reader failed")
            self._ready.clear()
            self._heartbeat.stop()
            if self._conn is not None:
                self._conn.abort()
                self._conn = None
            self._give_up(ConnectionClosed(CloseCode.INTERNAL_ERROR, f"client error: {e!r}"))

    async def _run_loop(self, conn: Connection, rest: Frames) -> None:
        """Serve each connection until it ends, then reconnect (or give up)."""
        while True:
            lost = await self._dispatcher.serve(conn, rest)
            await self._on_disconnect(conn, lost)
            if self._closing:
                return
            if not (self.reconnect and lost.temporary):
                self._give_up(lost)
                return
            log.info("fastim client: connection to %s lost (%s); reconnecting", conn.url, lost)
            new = await reconnect(self, conn.url, at_once=lost.code in MOVE_ON_AT_ONCE)
            if new is None:
                return
            self.reconnects += 1
            conn, rest = new
            self._on_connected(conn)

    async def _on_disconnect(self, conn: Connection, lost: ConnectionClosed) -> None:
        self._ready.clear()
        self._heartbeat.stop()
        if self._conn is conn:
            self._conn = None
        self._requests.fail_all(lost)
        await conn.close()

    def _give_up(self, why: ConnectionClosed) -> None:
        log.warning("fastim client: giving up on the connection: %s", why)
        self._failure = why
        self._ready.set()  # wake requests waiting for a connection: they see _failure
        self._requests.fail_all(why)
        self._end_subscriptions(why, normal=False)
        self._inbox.finish(why, normal=False)

    def _end_subscriptions(self, exc: ConnectionClosed, normal: bool) -> None:
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            sub._finish(exc, normal)

    # ----------------------------------------------------------------- the inbox

    def _inbox_unavailable(self) -> None:
        """The node could not read our inbox when we connected and will not replay the
        unacknowledged messages on this connection: a new connection asks again."""
        if self.user and self._inbox_retry is None:
            delay = self._inbox_backoff.next()
            self._inbox_retry = asyncio.get_running_loop().call_later(
                delay, self._reconnect_for_inbox
            )

    def _reconnect_for_inbox(self) -> None:
        self._inbox_retry = None
        conn = self._conn
        if conn is not None and not self._closing:
            self._abort(
                conn,
                ConnectionClosed(
                    CloseCode.INTERNAL_ERROR, "the node could not read the inbox; reconnecting"
                ),
            )

    def _inbox_ok(self) -> None:
        """The node serves our inbox: connect-again delays for it start over."""
        self._inbox_backoff.reset()

    # ----------------------------------------------------------------- requests

    def _check_open(self) -> None:
        if self._closing:
            raise ConnectionClosed(*CLIENT_CLOSED)
        failure = self._failure
        if isinstance(failure, ConnectionClosed):
            raise ConnectionClosed(failure.code, failure.reason)

    async def _wait_ready(self) -> Connection:
        while True:
            self._check_open()
            conn = self._conn
            if self._ready.is_set() and conn is not None:
                return conn
            await self._ready.wait()

    async def _call(
        self, frame: Callable[[int], bytes], pending: Pending, timeout: float | None = None
    ) -> Any:
        """Send the frame ``frame(request id)`` and wait for its reply.

        Waits for the connection first; all within ``timeout`` (``request_timeout``).
        """
        limit = self.request_timeout if timeout is None else timeout
        return await self._requests.call(self._wait_ready, frame, pending, limit)

    async def _request(
        self, ftype: int, channel: str, data: bytes = b"", sub: Subscription | None = None
    ) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await self._call(
            self._requests.frame(ftype, channel, data), Pending(future(), sub)
        )
        return result

    async def _cmd(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """A JSON command (CMD frame); its JSON reply (EVENT frame), or RequestError."""
        reply: dict[str, Any] = await self._call(
            self._requests.cmd_frame(cmd), Pending(future()), timeout
        )
        return reply

    async def _unsubscribe(self, sub: Subscription) -> None:
        if not sub.active:
            return
        ch = sub.channel
        if self._subs.get(ch) is sub:
            del self._subs[ch]
        sub._finish(ConnectionClosed(*UNSUBSCRIBED), normal=True)
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
            payload = protocol.pack_sub(FrameType.UNSUB, self._requests.new_id(), channel)
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
