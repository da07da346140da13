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

This module is the public API (:class:`Client`, :func:`connect`). The machinery under
it is in modules of one job each, every one importing only modules below it:

* :mod:`.base`: :class:`~.base.BaseClient`, the connection across reconnects, the reader
  task's loop, requests on the connection of the moment;
* :mod:`.dispatch`: the reader: frames and JSON events to requests, subscriptions and
  the inbox; subscriptions placed in their channel's history, and sent again;
* :mod:`.failover`: the node list: order, first connect, reconnect rounds;
* :mod:`.handshake`: HELLO / WELCOME; :mod:`.heartbeat`: pings and silence;
* :mod:`.requests`: request ids, pending requests, their frames and timeouts;
* :mod:`.subscription` and :mod:`.direct`: what the application reads (they call the
  client only through the protocols they define, ``SubscriptionOwner`` and
  ``InboxOwner``); :mod:`.connection`: the transports; :mod:`.backoff`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .. import protocol
from ..errors import ConnectionClosed, ProtocolError, RequestError
from ..protocol import CloseCode, ErrorCode, FrameType
from .backoff import Backoff
from .base import CLIENT_CLOSED, UNSUBSCRIBED, BaseClient, check_channel, check_user
from .connection import parse_url
from .direct import DirectGapCallback, DirectInbox, DirectMessages, InboxState, Sent, inbox_state
from .handshake import CLIENT_NAME
from .requests import TRANSIENT, Pending, RateLimited, future
from .subscription import GapCallback, Message, Since, Subscription

__all__ = ["CLIENT_NAME", "Client", "Message", "RateLimited", "Subscription", "connect"]

#: how a :meth:`Client.send` spaces its retries after STORE_UNAVAILABLE
_SEND_BACKOFF = (0.05, 2.0, 2.0)  # base, factor, max


class Client(BaseClient):
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

    # ----------------------------------------------------------------- public API

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
        delta: str | None = None,
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
            delta: ``"fossil"``: on a channel whose namespace sets ``delta =
                "fossil"``, the node sends each message as a Fossil delta against the
                previous one (after a full one), and the client applies it: the
                application sees the same documents, with fewer bytes on the wire
                (docs/delta.md). Elsewhere it changes nothing. Default off.

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
        check_channel(channel)
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if delta is not None and delta != "fossil":
            raise ValueError('delta: "fossil" or None')
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
        sub.delta = delta is not None
        if start is not None:
            sub.offset, sub.epoch = start
        self._subscribing.add(channel)
        try:
            if start is None and not sub.delta:
                await self._request(FrameType.SUB, channel, sub=sub)
            else:
                cmd: dict[str, Any] = {"op": "sub", "ch": channel}
                if start is not None:
                    cmd["since"] = start._asdict()
                if sub.delta:
                    cmd["delta"] = "fossil"
                await self._call(self._requests.cmd_frame(cmd), Pending(future(), sub, since=start))
        except BaseException:
            if self._subs.get(channel) is sub:  # the reply won the race with a timeout
                del self._subs[channel]
                self._send_unsub(channel)
            sub._finish(ConnectionClosed(*UNSUBSCRIBED), normal=True)
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
        check_channel(channel)
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
        check_user(to, "to")
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
                if e.code not in TRANSIENT:
                    raise
                last = e
                await asyncio.sleep(min(backoff.next(), max(0.0, end - loop.time())))
                continue
            except ConnectionClosed as e:
                if self.closed or not e.temporary:
                    raise
                last = e
                # the reader reconnects, and the next attempt waits for it; but until the
                # reader has run, the client may still hold the dead connection, and an
                # attempt on it fails without ever yielding: retrying at once would spin
                # here and starve the very reader that replaces it
                await asyncio.sleep(min(backoff.next(), max(0.0, end - loop.time())))
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
        check_channel(channel)
        reply = await self._cmd({"op": "presence", "ch": channel})
        return {k: v for k, v in reply.items() if k not in ("op", "id")}

    async def rpc(self, method: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Call a method of the application's backend through this connection: the
        node's rpc hook (docs/proxy.md) answers; returns the backend's ``data``.

        Raises:
            RequestError: the backend's own error code (400-1999); BACKEND_UNAVAILABLE
                (120): the backend failed or timed out (nothing is known of the call);
                NOT_AVAILABLE (121): the node has no rpc hook.
        """
        if not isinstance(method, str) or len(method) > 255:
            raise ValueError("method must be a string of at most 255 characters")
        cmd: dict[str, Any] = {"op": "rpc", "method": method}
        if data is not None:
            cmd["data"] = data
        reply = await self._cmd(cmd, timeout)
        return reply.get("data")

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
        self._requests.fail_all(ConnectionClosed(*CLIENT_CLOSED))
        self._end_subscriptions(ConnectionClosed(*CLIENT_CLOSED), normal=True)
        self._inbox.finish(ConnectionClosed(*CLIENT_CLOSED), normal=True)
        self._heartbeat.stop()
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
