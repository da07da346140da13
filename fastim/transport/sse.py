"""Server-Sent Events and HTTP streaming: the WebSocket-less transports (docs/transports.md).

Both are a plain HTTP request on the WebSocket port whose response does not end:

- ``GET /sse?ch=a&ch=b`` (``EventSource``): each channel message, reply and event is one
  Server-Sent Event whose data is the JSON a WebSocket text connection gets. After the
  messages of each write comes an event id carrying the position of *every* channel the
  connection reads (``id: {"a":["<epoch>",<offset>],...}``, an id-only event: it
  dispatches nothing in the browser but becomes its ``Last-Event-ID``), so the browser's
  automatic reconnect, which sends that header, recovers every channel through the same
  history as a WebSocket's ``since``. Heartbeats are SSE comments (``: ping``).
- ``GET`` or ``POST /stream``: the same events on a streaming response read with
  ``fetch`` (fastim.js's ``http_stream`` transport).

Each stream starts with ``{"op":"session","sid":...}``: commands (the WebSocket text
grammar, one JSON object per line) are POSTed to ``/stream/<sid>`` (or ``/sse/<sid>``),
answered ``204``, and their replies come on the stream. The sid is 144 random bits;
a POST for a stream that is gone gets ``404``.

A stream *is* a session (:class:`EventStream` subclasses the WebSocket session, which
parsed its request): the hub's compiled fan-out appends the ``FMT_SSE`` event encoded
once per publish to its ring, like any subscriber's, with the same limits, heartbeat
timer, origin checks and authentication (``?token=`` or the connect hook's cookies).
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import httptools
import orjson

from .. import _core
from ..errors import BadRequest, ProtocolError
from ..hub import Since
from ..protocol import Request, validate_channel
from ..session import OPEN, JsonReplies
from ..tasks import Background
from .origin import refuse_cross_origin, same_origin
from .ws import _SERVER, MODE_JSON, WsSession

#: the stream paths (beside the WebSocket path; fastim.js finds them next to it)
SSE_PATH = b"/sse"
STREAM_PATH = b"/stream"
#: commands in one POST at most (each is also a publish/send under publish_rate)
MAX_POST_COMMANDS = 256
#: the browser's reconnect delay we ask for (ms): the default is 3 s
RETRY_MS = 1000

_PING = b": ping\n\n"


def _sse(body: bytes) -> bytes:
    # orjson output is one line: it escapes every control character in strings
    return b"data: " + body + b"\n\n"


#: replies and events of a stream: JSON objects, one event each; pings are comments
SSE_REPLIES = JsonReplies(_sse, _PING)
SSE_REPLIES.cmd = SSE_REPLIES

#: open streams of this process by session id (a POST names one)
_streams: dict[str, EventStream] = {}

#: Ask = mesh.ask: (worker, question, args) -> its answer, or None
Ask = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
#: on a node of several workers: the node -> (this worker's name, how to ask another);
#: a stream's sid starts with its worker's name, so a POST that the shared port gave to
#: another worker is forwarded there (attach_workers)
_workers: weakref.WeakKeyDictionary[Any, tuple[str, Ask]] = weakref.WeakKeyDictionary()
#: POSTs waiting for the stream's worker to answer
_forwards = Background("stream command forwards")


def attach_workers(node: Any, name: str, ask: Ask, answers: dict[str, Any]) -> None:
    """``node`` is worker ``name`` of a node of several (fastim/workers/mesh.py): its
    streams' sids name it, and it answers the commands other workers forward to them."""
    _workers[node] = (name, ask)

    def answer(msg: dict[str, Any]) -> list[Any]:
        origin = msg.get("origin")
        return list(
            inject(
                node,
                str(msg.get("sid")),
                origin.encode("latin-1") if isinstance(origin, str) else None,
                str(msg.get("body", "")).encode("utf-8", "surrogateescape"),
            )
        )

    answers["stream_post"] = answer


class StreamState:
    """What a stream keeps besides a session's state (one per stream, in ``stream``)."""

    __slots__ = ("kind", "last_id", "origin", "positions", "sid")

    def __init__(self, kind: str, sid: str, origin: bytes | None) -> None:
        self.kind = kind  # "sse" or "http_stream"
        self.sid = sid
        self.origin = origin
        #: channel -> (epoch, offset) every message up to which is in the ring; the
        #: event id (SSE with channels in its URL only; else None)
        self.positions: dict[str, tuple[str, int]] | None = None
        self.last_id = b""


class EventStream(WsSession):
    """A session whose transport is a never-ending HTTP response of SSE events.

    No slots of its own (``__slots__ = ()``): the connection starts as a
    :class:`WsSession` parsing HTTP and becomes this class in place once its request
    says it is a stream (same layout, so ``__class__`` can change).
    """

    __slots__ = ()

    def _wire(self) -> tuple[str, str]:
        assert self.stream is not None
        return self.stream.kind, "json"

    def data_received(self, data: bytes) -> None:
        # a stream's client sends nothing after its request (commands come by POST)
        self.node.bytes_in += len(data)

    def on_deadline(self, now: float) -> float | None:
        if self.state == OPEN and not self.auth_wait:
            # no pong to wait for: a dead peer shows as a failed write or a full ring
            self.send(_PING)
            return now + self.config.ping_interval
        return super().on_deadline(now)

    def close_bytes(self, code: int, reason: str) -> bytes:
        # the WebSocket close frame's equivalent, before the response ends
        return _sse(orjson.dumps({"op": "close", "code": code, "reason": reason}))

    def finish_close(self) -> None:
        self.close_transport()
        self.node.wheel.schedule(self, self.node.wheel.now + self.config.close_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.stream
        if st is not None and _streams.get(st.sid) is self:
            del _streams[st.sid]
        super().connection_lost(exc)

    def event_id(self) -> None:
        """The ring's ``on_flush``: after this write's messages, an id-only event with
        the position of every channel the connection reads, if any moved.

        Exact: the hub sets ``channel.offset`` and fans out in the same step, so a ring
        in a channel's subscriber set holds every message up to ``channel.offset``; a
        channel still loading (not joined yet) keeps the position it was asked from.
        """
        st = self.stream
        ring = self.ring
        if st is None or st.positions is None or ring is None:
            return
        pos = st.positions
        channels = self.node.hub.channels
        for name in self.subs or ():
            ch = channels.get(name)
            if ch is not None and ring in ch.subs:
                pos[name] = (ch.epoch, ch.offset)
        ident = orjson.dumps(pos)
        if ident != st.last_id:
            st.last_id = ident
            ring.append(b"id: " + ident + b"\n\n")


def parse_event_id(value: bytes) -> dict[str, tuple[str, int]]:
    """A ``Last-Event-ID`` of ours: channel -> (epoch, offset). BadRequest if not one."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        obj = None
    out: dict[str, tuple[str, int]] = {}
    if not isinstance(obj, dict):
        raise BadRequest('Last-Event-ID is not an event id of this node ({"ch":[epoch,off]})')
    for ch, pos in obj.items():
        if (
            not isinstance(pos, list)
            or len(pos) != 2
            or not isinstance(pos[0], str)
            or len(pos[0]) > 64
            or isinstance(pos[1], bool)
            or not isinstance(pos[1], int)
            or pos[1] < 0
        ):
            raise BadRequest(f"Last-Event-ID: position of {ch!r} is not [epoch, offset]")
        out[ch] = (pos[0], pos[1])
    return out


def open_stream(session: WsSession, kind: str) -> None:
    """Turn ``session`` (a complete plain request for ``/sse`` or ``/stream``) into an
    :class:`EventStream`, or answer its 4xx."""
    http = session.http
    assert http is not None
    method = http.get_method()
    if kind == "sse" and method != b"GET":
        session.http_reply(405, "SSE endpoint: use GET (EventSource)", b"Allow: GET\r\n")
        return
    if kind == "http_stream" and method not in (b"GET", b"POST"):
        session.http_reply(405, "stream endpoint: use GET or POST", b"Allow: GET, POST\r\n")
        return
    headers = session.headers
    node = session.node
    if refuse_cross_origin(node.origins, headers, session.http_reply):
        return  # a page of another origin, not allowed (403), as for WebSocket
    channels: list[str] = []
    token: str | None = None
    last_id = headers.get(b"last-event-id")
    try:
        query = httptools.parse_url(session.url).query or b""
        for key, value in parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True):
            if key == "ch":
                ch = validate_channel(value)
                if ch not in channels:
                    channels.append(ch)
            elif key == "token":
                token = value
            elif key == "lastEventId":  # EventSource polyfills cannot set the header
                last_id = value.encode()
        if len(channels) > session.config.max_subscriptions:
            raise BadRequest(f"at most {session.config.max_subscriptions} channels (ch=)")
        positions = parse_event_id(last_id) if last_id and last_id.strip() else {}
    except (ProtocolError, httptools.HttpParserInvalidURLError) as e:
        session.http_reply(400, getattr(e, "reason", str(e)))
        return
    proxy = node.proxy
    hook = token is None and proxy.has("connect")
    if token is not None:
        try:
            node.auth.verify(token)
        except ProtocolError as e:
            session.http_reply(401, e.reason, b"Cache-Control: no-store\r\n")
            return
    elif channels and session.auth_wait and not hook:
        session.http_reply(401, "this node needs a token: ?token=...")
        return
    origin = headers.get(b"origin")
    host = headers.get(b"host")
    cors = b""
    if origin is not None and not same_origin(
        origin.decode("latin-1"), host.decode("latin-1") if host is not None else None
    ):
        # allowed cross-origin (refuse_cross_origin passed): EventSource withCredentials
        # and fetch(credentials: "include") need the origin named and credentials allowed
        cors = (
            b"Access-Control-Allow-Origin: " + origin.strip() + b"\r\n"
            b"Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        )
    sid = secrets.token_urlsafe(18)
    worker = _workers.get(node)
    if worker is not None:
        sid = f"{worker[0]}.{sid}"  # which worker a POST must reach (attach_workers)
    st = StreamState(kind, sid, origin)
    transport = session.transport
    assert transport is not None and session.ring is not None
    transport.write(
        b"HTTP/1.1 200 OK\r\nServer: " + _SERVER + b"\r\n"
        b"Content-Type: text/event-stream; charset=utf-8\r\n"
        b"Cache-Control: no-cache, no-store\r\nX-Accel-Buffering: no\r\n"
        + cors
        + b"Connection: close\r\n\r\n"
        + (b"retry: %d\n\n" % RETRY_MS if kind == "sse" else b"")
    )
    copied = proxy.copy_headers(headers) if hook else {}
    session.__class__ = EventStream
    session.stream = st
    session.http = None
    session.headers = {}
    session.url = b""
    session.mode = MODE_JSON
    session.replies = SSE_REPLIES
    session.ring.fmt = _core.FMT_SSE
    stream: EventStream = session  # type: ignore[assignment]  # the class just changed
    _streams[sid] = stream
    if kind == "sse" and (channels or positions):
        st.positions = {ch: positions[ch] for ch in channels if ch in positions}
        session.ring.on_flush = stream.event_id
    stream.send(_sse(orjson.dumps({"op": "session", "sid": sid, "transport": kind})))
    if token is not None and not stream.login(token):
        return  # refused after all (expired meanwhile): the error went out, closing

    def subscribe() -> None:
        for ch in channels:
            pos = positions.get(ch)
            since = Since(pos[1], pos[0]) if pos is not None else None
            stream.handle_request(Request("sub", None, ch, b""), SSE_REPLIES, since)
            if stream.state != OPEN:
                return

    stream.mark_open()
    try:
        if hook:
            # the backend decides who this is from the request's cookies and headers
            # (docs/proxy.md); the URL's channels are subscribed once it answered
            stream.connect_hook(copied, None, subscribe)
        else:
            subscribe()
    except ProtocolError as e:
        stream.fail(e)


def post_commands(session: WsSession, sid: str) -> None:
    """``POST /stream/<sid>``: the body's commands (one JSON object per line) into the
    stream ``sid``, whose replies go out on the stream; this request gets 204."""
    http = session.http
    assert http is not None
    if http.get_method() != b"POST":
        session.http_reply(405, "stream commands: use POST", b"Allow: POST\r\n")
        return
    if refuse_cross_origin(session.node.origins, session.headers, session.http_reply):
        return
    origin = session.headers.get(b"origin")
    body = bytes(session.body or b"")
    cors = b""
    if origin is not None and not same_origin(
        origin.decode("latin-1"), _text(session.headers.get(b"host"))
    ):
        cors = (
            b"Access-Control-Allow-Origin: " + origin.strip() + b"\r\n"
            b"Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        )
    node = session.node
    worker = _workers.get(node)
    owner = sid.split(".", 1)[0] if "." in sid else None
    if worker is not None and owner is not None and owner != worker[0]:
        # the shared port gave this POST to another worker than the stream's: ask it
        _forwards.run(_forward(session, worker[1], owner, sid, origin, body, cors))
        return
    status, reason = inject(node, sid, origin, body)
    if status == 204:
        session.http_send(204, b"", b"text/plain", cors)
    else:
        session.http_reply(status, reason, cors)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


async def _forward(
    session: WsSession,
    ask: Ask,
    owner: str,
    sid: str,
    origin: bytes | None,
    body: bytes,
    cors: bytes,
) -> None:
    """A command POST for a stream of worker ``owner``, answered with its verdict."""
    args = {
        "sid": sid,
        "origin": _text(origin),
        "body": body.decode("utf-8", "surrogateescape"),
    }
    answer = await ask(owner, "stream_post", args)
    value = answer.get("value") if answer is not None else None
    if not isinstance(value, list) or len(value) != 2:
        session.http_reply(
            503 if answer is None else 404,
            f"the stream's worker {owner!r} did not answer: open a new stream",
        )
        return
    status, reason = int(value[0]), str(value[1])
    if status == 204:
        session.http_send(204, b"", b"text/plain", cors)
    else:
        session.http_reply(status, reason, cors)


def inject(node: Any, sid: str, origin: bytes | None, body: bytes) -> tuple[int, str]:
    """Hand the commands of ``body`` (JSON lines) to this process's stream ``sid``:
    (204, "") when they were taken (their replies go out on the stream), else the
    refusal's status and reason."""
    target = _streams.get(sid)
    if target is None or target.node is not node or target.state != OPEN:
        return 404, "no such stream (closed, timed out, or never opened here): open a new one"
    st = target.stream
    assert st is not None
    if st.origin is not None and origin is not None and origin != st.origin:
        return 403, "this stream was opened by a page of another origin"
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > MAX_POST_COMMANDS:
        return 400, f"at most {MAX_POST_COMMANDS} commands per POST"
    target.last_rx = target.node.wheel.now
    for line in lines:
        try:
            target.handle_json(line)
        except ProtocolError as e:
            target.fail(e)  # as on a WebSocket: the error on the stream, then its close
        if target.state != OPEN or target.closing_after is not None:
            break
    return 204, ""


def stream_route(session: WsSession, path: bytes) -> bool:
    """Answer ``path`` if it is a stream path (open, or a POST of commands)."""
    if path == SSE_PATH:
        open_stream(session, "sse")
    elif path == STREAM_PATH:
        open_stream(session, "http_stream")
    elif path.startswith((SSE_PATH + b"/", STREAM_PATH + b"/")):
        post_commands(session, path.rsplit(b"/", 1)[1].decode("latin-1"))
    else:
        return False
    return True


def streams_open() -> int:
    """Open streams of this process (tests, metrics)."""
    return len(_streams)
