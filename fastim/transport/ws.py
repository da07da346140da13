"""The WebSocket transport: an HTTP/1.1 upgrade (parsed by httptools), then RFC 6455.

Text messages carry JSON commands (browsers); binary messages carry whole fastim
frames (binary clients). A connection uses one of the two: the subprotocol
``fastim.json`` / ``fastim.binary`` fixes it at the upgrade, otherwise the first
message does. Plain HTTP requests get a status and a close: 426 on the WebSocket path
without an upgrade, 404 elsewhere, 400 for a malformed request or upgrade.

permessage-deflate (RFC 7692) is accepted when a client offers it, always with
``server_no_context_takeover`` (each message the node sends is compressed on its own,
so one compressed frame serves every subscriber: :class:`~fastim.hub.Deflater`) and
``client_no_context_takeover`` (each message the client sends inflates on its own, so
a connection keeps no zlib state between messages). See docs/protocol.md, Compression.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

import httptools
import orjson

from .. import __version__, _core
from ..errors import ProtocolError, WebSocketError
from ..protocol import CloseCode, ErrorCode
from ..session import (
    CLIENT_TYPES_MASK,
    CLOSING,
    JSON_REPLIES,
    WS_BINARY_REPLIES,
    Session,
)
from ..tasks import Background
from . import static
from .handshake import (
    DeflateParams,
    accept_key,
    negotiate_deflate,
    upgrade_param,
    upgrade_token,
)
from .host import TransportHost
from .origin import refuse_cross_origin

if TYPE_CHECKING:
    from .sse import StreamState

#: pages answered after the node's workers were asked (``/metrics`` of several workers)
_pages = Background("http pages")

MAX_REQUEST_HEAD = 16 * 1024
MAX_HEADERS = 64
_SERVER = f"fastim/{__version__}".encode()

#: the plain HTTP endpoints of probes and scrapers (``GET`` only): the per-address client
#: limits never refuse them (docs/operations.md, "Probes and the per-address limits")
PROBE_PATHS = frozenset({b"/health", b"/ready", b"/metrics"})
#: connections an address over its per-address limits may keep open while they send
#: their request head (which tells a probe from a client); more are refused unread
PROBE_HOLD = 16
#: probes per second (burst twice that) an address over its per-address limits may make
PROBE_RATE = 10.0

_STATUS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    304: b"Not Modified",
}

MODE_UNSET, MODE_JSON, MODE_BINARY, MODE_ECHO = range(4)

#: shared by every upgraded session (never written: httptools is gone by then)
_NO_HEADERS: dict[bytes, bytes] = {}

_OP_COMPRESSED = _core.OP_COMPRESSED


class WsSession(Session):
    """One client on the WebSocket port, from its first HTTP byte to its close."""

    __slots__ = (
        "body",
        "close_sent",
        "deflate",
        "head_bytes",
        "headers",
        "http",
        "limited",
        "mode",
        "n_headers",
        "parser",
        "reject",
        "request_done",
        "stream",
        "url",
    )

    hello_required = False

    node: TransportHost  # narrower than Session's Host: the HTTP side too

    def __init__(self, node: TransportHost) -> None:
        super().__init__(node)
        self.node = node
        self.http: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.head_bytes = 0
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.n_headers = 0
        #: an answer decided while parsing (status, reason, extra header lines), sent once
        #: the parser stops: 431, 413, and under /api/ a 401 or 404 from the head alone
        self.reject: tuple[int, str, bytes] | None = None
        self.request_done = False
        #: None until the request head is complete; then the body (plain requests: /api/)
        self.body: bytes | bytearray | None = None
        self.parser: _core.WSParser | None = None
        self.mode = MODE_UNSET
        self.close_sent = False
        #: messages to this client are compressed (permessage-deflate, full window)
        self.deflate = False
        #: refused by a per-address limit (status, reason, address), answered once the
        #: request head shows it is not a probe (PROBE_PATHS)
        self.limited: tuple[int, str, str] | None = None
        #: an SSE or HTTP-streaming connection's own state (fastim/transport/sse.py)
        self.stream: StreamState | None = None

    # ------------------------------------------------------------------ httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.n_headers += 1
        if self.n_headers > MAX_HEADERS:
            self.reject = (431, f"more than {MAX_HEADERS} headers", b"")
            return
        key = name.lower()
        if key in self.headers:
            self.headers[key] += b"," + value
        else:
            self.headers[key] = value

    def on_headers_complete(self) -> None:
        # from here on bytes are body: limited by max_message (413), not the head limit
        self.body = b""
        path = self._path()
        assert self.http is not None
        if self.reject is None and self._limits_refuse(self.http.get_method(), path):
            return
        if self.reject is None and path.startswith(b"/api/"):
            # the API key before anything about the body: a caller without it learns
            # nothing, not even the size limit (docs/api.md: 401 first, whatever the path)
            assert self.http is not None
            self.reject = self.node.api.gate(self.headers, self.http.get_method(), path)
            if self.reject is not None:
                return
        cl = self.headers.get(b"content-length", b"").strip()
        if cl.isdigit() and int(cl) > self.config.max_message:
            self.reject = (
                413,
                f"request body over max_message ({self.config.max_message} bytes)",
                b"",
            )
        elif self.reject is None and self.headers.get(b"expect", b"").lower() == b"100-continue":
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _limits_refuse(self, method: bytes, path: bytes) -> bool:
        """The per-address limits, now that the request head is in: a probe (GET /health,
        /ready, /metrics) is never refused by the client limits (an address over them has
        PROBE_RATE probes a second); anything else over them gets its 503 / 429 (True)."""
        probe = method == b"GET" and path in PROBE_PATHS
        limited = self.limited
        if limited is None:
            if probe:
                self.node.probe_admitted(self)  # does not count among the clients
            return False
        self.limited = None
        status, reason, ip = limited
        node = self.node
        node.unhold(ip)
        if probe:
            if node.probe_allowed(ip):
                return False
            status, reason = 429, f"over {PROBE_RATE:g} probes per second from {ip}"
        node.limit_refusals += 1
        self.reject = (status, reason, b"Retry-After: 1\r\n")
        return True

    def on_body(self, body: bytes) -> None:
        buf = self.body
        if self.reject is not None or buf is None:
            return
        if len(buf) + len(body) > self.config.max_message:
            self.reject = (
                413,
                f"request body over max_message ({self.config.max_message} bytes)",
                b"",
            )
            return
        if not isinstance(buf, bytearray):
            buf = self.body = bytearray()
        buf += body

    def on_message_complete(self) -> None:
        # a complete request; if it is not an upgrade, it gets a plain HTTP answer
        self.request_done = True

    # ------------------------------------------------------------------ bytes in

    def data_received(self, data: bytes) -> None:
        if self.state >= CLOSING:
            # RFC 6455 §5.5.1 / §7.1.1: after our close frame, keep parsing until the
            # peer's close arrives, then drop TCP (else we would wait close_timeout)
            if self.state == CLOSING and self.parser is not None and not self.parser.closed:
                self._ws_data(data)
            return
        self.last_rx = self.node.wheel.now
        self.node.bytes_in += len(data)
        if self.http is not None:
            self._http_data(data)
        else:
            self._ws_data(data)

    def _http_data(self, data: bytes) -> None:
        assert self.http is not None
        if self.request_done:
            return  # one request per connection: its answer is on the way, then we close
        self.head_bytes += len(data)
        try:
            self.http.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.reject is not None:
                self._send_reject()
                return
            offset = e.args[0] if e.args else len(data)
            self._upgrade(data[offset:])
            return
        except httptools.HttpParserError as e:
            self.http_reply(400, f"malformed HTTP request: {e}")
            return
        if self.reject is not None:
            self._send_reject()
        elif self.request_done:
            self._plain_request()
        elif self.body is None and self.head_bytes > MAX_REQUEST_HEAD:
            self.http_reply(431, f"request head over {MAX_REQUEST_HEAD} bytes")

    def _send_reject(self) -> None:
        assert self.reject is not None
        status, reason, extra = self.reject
        path = self._path()
        if path.startswith(b"/api/"):
            self.node.api.refuse(self, path, status, reason, extra)  # counted per route
        else:
            self.http_reply(status, reason, extra)

    def http_reply(self, status: int, body: str, extra: bytes = b"") -> None:
        """Answer a plain HTTP request and close the connection: text, JSON under /api/."""
        if self._path().startswith(b"/api/"):
            self.http_send(status, orjson.dumps({"error": body}), b"application/json", extra)
        else:
            self.http_send(status, (body + "\n").encode(), b"text/plain; charset=utf-8", extra)

    def http_send(
        self, status: int, payload: bytes, content_type: bytes, extra: bytes = b""
    ) -> None:
        """Write one HTTP response and close the connection (no keep-alive)."""
        if self.transport is None or self.state >= CLOSING:
            return
        if status >= 400:
            self.node.http_rejects += 1
        head = b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: %s\r\n" % (
            status,
            _STATUS.get(status, b"Error"),
            _SERVER,
            content_type,
        )
        self.http = None
        self.state = CLOSING
        if status in (204, 304):  # no body, and no Content-Length that would describe one
            tail = b"Connection: close\r\n\r\n"
        else:
            tail = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload
        self.transport.write(head + extra + tail)
        self.close_transport()
        self.node.wheel.schedule(self, self.node.wheel.now + self.config.close_timeout)

    def _path(self) -> bytes:
        try:
            return httptools.parse_url(self.url).path or b"/"
        except httptools.HttpParserInvalidURLError:
            return b""

    def _plain_request(self) -> None:
        assert self.http is not None
        method = self.http.get_method()
        path = self._path()
        cfg = self.config
        ws_paths = {cfg.ws_path.encode()}
        if cfg.ws_echo_path:
            ws_paths.add(cfg.ws_echo_path.encode())
        if path in ws_paths:
            if method != b"GET":
                self.http_reply(
                    405, "WebSocket endpoint: use GET with an Upgrade", b"Allow: GET\r\n"
                )
            else:
                self.http_reply(
                    426,
                    "this endpoint speaks WebSocket: send Upgrade: websocket",
                    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                )
        elif path == b"/health" and method == b"GET":
            self.http_reply(200, "ok")
        elif path == b"/ready" and method == b"GET":
            why = self.node.readiness()
            if why is None:
                self.http_reply(200, self.node.ready_text())
            else:
                self.http_reply(503, why)
        elif path == b"/metrics" and method == b"GET":
            metrics = self.node.metrics
            ctype = metrics.content_type.encode()
            whole = metrics.whole_node
            if whole is None:
                self.http_send(200, metrics.render(), ctype)
            else:  # every worker of the node, asked over their links

                async def send() -> None:
                    self.http_send(200, await whole(), ctype)

                _pages.run(send())
        elif path.startswith(b"/api/"):
            self.node.api.handle(self, method, path)
        elif path.startswith((b"/sse", b"/stream")) and _stream_route(self, path):
            pass  # Server-Sent Events, HTTP streaming and its commands (transport/sse.py)
        elif static.serve(self, method, path):
            pass  # /fastim.js, /demo/ (fastim/transport/static.py)
        else:
            self.http_reply(404, f"no such endpoint: {path.decode('latin-1')}")

    def _upgrade(self, rest: bytes) -> None:
        http = self.http
        assert http is not None
        cfg = self.config
        path = self._path()
        if path == cfg.ws_path.encode():
            mode = MODE_UNSET
        elif cfg.ws_echo_path and path == cfg.ws_echo_path.encode():
            mode = MODE_ECHO
        else:
            self.http_reply(404, f"no WebSocket endpoint at {path.decode('latin-1')}")
            return
        h = self.headers
        if http.get_method() != b"GET":
            self.http_reply(405, "WebSocket upgrade needs GET", b"Allow: GET\r\n")
            return
        if http.get_http_version() != "1.1":
            self.http_reply(400, "WebSocket upgrade needs HTTP/1.1")
            return
        if b"websocket" not in h.get(b"upgrade", b"").lower():
            self.http_reply(400, 'header "Upgrade" must be "websocket"')
            return
        if h.get(b"sec-websocket-version", b"").strip() != b"13":
            self.http_reply(
                426, 'header "Sec-WebSocket-Version" must be 13', b"Sec-WebSocket-Version: 13\r\n"
            )
            return
        key = h.get(b"sec-websocket-key", b"").strip()
        try:
            ok = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            self.http_reply(400, 'header "Sec-WebSocket-Key" must be 16 bytes in base64')
            return
        if refuse_cross_origin(self.node.origins, self.headers, self.http_reply):
            return  # a browser page of another origin, not allowed (403: origin.py)
        subs = upgrade_param(self.url, "subs") if mode != MODE_ECHO else None
        if subs is not None:
            # where the client's server-side subscriptions were: recovered from there
            try:
                self.server_positions(orjson.loads(subs))
            except (orjson.JSONDecodeError, ProtocolError) as e:
                why = e.reason if isinstance(e, ProtocolError) else "not JSON"
                self.http_reply(400, f'query parameter "subs": {why}')
                return
        ext_line = b""
        deflate: DeflateParams | None = None
        if cfg.ws_compression and b"sec-websocket-extensions" in h:
            deflate = negotiate_deflate(h[b"sec-websocket-extensions"])
            if deflate is not None:
                ext_line = b"Sec-WebSocket-Extensions: " + deflate.response + b"\r\n"
        proto_line = b""
        if mode != MODE_ECHO:
            offered = [p.strip() for p in h.get(b"sec-websocket-protocol", b"").split(b",")]
            for name, m in ((b"fastim.binary", MODE_BINARY), (b"fastim.json", MODE_JSON)):
                if name in offered:
                    mode = m
                    proto_line = b"Sec-WebSocket-Protocol: " + name + b"\r\n"
                    break
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + accept_key(key)
            + b"\r\n"
            + proto_line
            + ext_line
            + b"Server: "
            + _SERVER
            + b"\r\n\r\n"
        )
        token = None
        if mode == MODE_ECHO:
            self.auth_wait = False  # the operator's conformance echo touches no channel or user
        else:
            token = upgrade_token(self.url)
        # drop what only the upgrade needed: idle connections are the memory budget
        self.http = None
        self.headers = _NO_HEADERS
        self.url = b""
        max_message = cfg.max_message
        self.parser = _core.WSParser(max_message, deflate=deflate is not None)
        self.deflate = deflate is not None and deflate.compress_outbound
        self._set_mode(mode)
        if mode == MODE_ECHO:
            # an echo client may send a message as large as max_message and get it back
            assert self.ring is not None
            self.ring.cap = max(self.ring.cap, 2 * max_message + 64)
        if token is not None and not self.login(token):
            return  # refused: AUTH_FAILED went out, the connection is closing
        proxy = self.node.proxy
        if token is None and mode != MODE_ECHO and proxy.has("connect"):
            # the backend decides who this is from the upgrade's cookies and headers
            # (docs/proxy.md); what the client sends meanwhile waits for its answer
            self.connect_hook(proxy.copy_headers(h), None, _nothing)
        self.mark_open()
        if rest:
            self._ws_data(rest)

    def _wire(self) -> tuple[str, str]:
        return "websocket", "fastim" if self.mode == MODE_BINARY else "json"

    def _set_mode(self, mode: int) -> None:
        self.mode = mode
        assert self.ring is not None
        # replies stay uncompressed (RSV1 is per message); channel messages are not
        if mode == MODE_BINARY:
            self.replies = WS_BINARY_REPLIES
            self.ring.fmt = _core.FMT_WS_BINARY_DEFLATE if self.deflate else _core.FMT_WS_BINARY
            self.decoder = _core.FrameDecoder(self.config.max_frame, CLIENT_TYPES_MASK)
        else:
            self.replies = JSON_REPLIES
            self.ring.fmt = _core.FMT_WS_JSON_DEFLATE if self.deflate else _core.FMT_WS_JSON

    def on_handshake_timeout(self) -> None:
        limited = self.limited
        if limited is not None:  # over a per-address limit, and no request head in time
            self.limited = None
            self.node.unhold(limited[2])
            self.node.limit_refusals += 1
            self.http_reply(limited[0], limited[1], b"Retry-After: 1\r\n")
            return
        if self.request_done:  # an API request still working (a store that does not answer)
            self.http_reply(503, f"not answered within {self.config.handshake_timeout:g}s")
            return
        self.http_reply(
            400, f"no complete WebSocket upgrade within {self.config.handshake_timeout:g}s"
        )

    def refuse_limit(self, status: int, reason: str, ip: str) -> None:
        if self.http is not None and self.node.hold(ip):
            # it may be a probe, which the client limits must not refuse: decided when
            # its request head is in (_limits_refuse), within handshake_timeout
            self.limited = (status, reason, ip)
            return
        self.node.limit_refusals += 1
        self.http_reply(status, reason, b"Retry-After: 1\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.limited is not None:
            self.node.unhold(self.limited[2])
            self.limited = None
        super().connection_lost(exc)

    def refuse_overload(self) -> None:
        self.http_reply(503, "node at its connection limit, try another", b"Retry-After: 1\r\n")

    # ------------------------------------------------------------------ WebSocket

    def _ws_data(self, data: bytes) -> None:
        assert self.parser is not None
        error: WebSocketError | None = None
        try:
            events = self.parser.feed(data)
        except WebSocketError as e:
            # RFC 6455 §7.1.7: what arrived complete before the violation is handled
            # first (echoed), then the connection is failed (see WSParser in _core.pyi)
            events = e.events
            error = e
        try:
            for opcode, payload in events:
                if (
                    self.state >= CLOSING or self.closing_after is not None
                ) and opcode != _core.OP_CLOSE:
                    continue  # after our close frame only the peer's close matters (§5.5.1)
                self._ws_event(opcode, payload)
            if error is not None:
                self.fail(error)
        except ProtocolError as e:
            self.fail(e)

    def _ws_event(self, opcode: int, payload: bytes) -> None:
        if opcode & _OP_COMPRESSED:
            # permessage-deflate: a fresh inflate per message (client_no_context_takeover),
            # capped at max_message (1009), then the UTF-8 check of text (1007)
            opcode &= 0x0F
            payload = _core.ws_inflate(payload, self.config.max_message, opcode == _core.OP_TEXT)
        if opcode == _core.OP_TEXT or opcode == _core.OP_BINARY:
            mode = self.mode
            if mode == MODE_ECHO:
                if self.deflate:
                    self.send(self.node.hub.deflater.frame(opcode, payload))
                else:
                    self.send(_core.ws_encode(opcode, payload))
                return
            if opcode == _core.OP_TEXT:
                if mode == MODE_BINARY:
                    raise ProtocolError(
                        "text message on a binary (fastim.binary) connection", ErrorCode.BAD_REQUEST
                    )
                if mode == MODE_UNSET:
                    self._set_mode(MODE_JSON)
                self.handle_json(payload)
            else:
                if mode == MODE_JSON:
                    raise ProtocolError(
                        "binary message on a JSON (fastim.json) connection", ErrorCode.BAD_REQUEST
                    )
                if mode == MODE_UNSET:
                    self._set_mode(MODE_BINARY)
                decoder = self.decoder
                assert decoder is not None
                try:
                    frames = decoder.feed(payload)
                except ProtocolError as e:
                    # the frames before the bad bytes were valid: answer them, then fail
                    for ftype, fpayload in e.frames:
                        self.handle_frame(ftype, fpayload)
                        if self.state >= CLOSING or self.closing_after is not None:
                            return
                    raise
                for ftype, fpayload in frames:
                    self.handle_frame(ftype, fpayload)
                    if self.state >= CLOSING or self.closing_after is not None:
                        return
                if decoder.buffered:
                    raise ProtocolError(
                        "a binary message must hold whole fastim frames "
                        f"({decoder.buffered} bytes of an unfinished frame left)",
                        ErrorCode.BAD_FRAMING,
                    )
        elif opcode == _core.OP_PING:
            self.send(_core.ws_encode(_core.OP_PONG, payload))
        elif opcode == _core.OP_CLOSE:
            code, _reason = _core.ws_parse_close(payload)
            if self.state >= CLOSING:
                # the answer to our close: the handshake is done
                assert self.transport is not None
                self.close_transport()
            else:
                self.close(1000 if code == 1005 else code, "")
        # OP_PONG: liveness was recorded when the bytes arrived

    # ------------------------------------------------------------------ closing

    def close_bytes(self, code: int, reason: str) -> bytes:
        if self.http is not None:
            return b""
        return _core.ws_encode(_core.OP_CLOSE, _core.ws_close_payload(code, reason))

    def close(self, code: int, reason: str, drop_pending: bool = False) -> None:
        if self.http is not None and self.state < CLOSING:
            # still in HTTP: there is no WebSocket to close
            self.http_reply(503 if code == CloseCode.GOING_AWAY else 400, reason)
            return
        super().close(code, reason, drop_pending)

    def finish_close(self) -> None:
        # RFC 6455 §7.1.1: after both closes the server drops the TCP connection. If the
        # peer's close already came (parser closed), drop now; else wait close_timeout.
        assert self.transport is not None
        if self.parser is None or self.parser.closed:
            self.close_transport()
        self.node.wheel.schedule(self, self.node.wheel.now + self.config.close_timeout)

    def fail(self, err: ProtocolError, req_id: object = None) -> None:
        if isinstance(err, WebSocketError):
            # framing is broken: just the close code RFC 6455 asks for...
            self.node.protocol_errors += 1
            if self.state >= CLOSING:
                # broken framing while we wait for the peer's close: stop waiting (§7.1.7)
                assert self.transport is not None
                self.close_transport()
                return
            if err.ws_close_code == CloseCode.MESSAGE_TOO_BIG and self.mode != MODE_ECHO:
                # ...but a message over max_message left the framing intact: error 103
                # first, in the connection's format, as over TCP (docs/configuration.md).
                # Not on the echo endpoint: conformance suites expect the close alone
                error = self.replies.error(req_id, err.code, err.reason)
                if self.inflight:  # after the answers to its publishes still in flight
                    self._close_after(error, err.ws_close_code, err.reason[:100])
                    return
                self.send(error)
            self.close(err.ws_close_code, err.reason[:100])
            return
        super().fail(err, req_id)


def _stream_route(session: WsSession, path: bytes) -> bool:
    # imported here: sse.py builds on this module (EventStream subclasses WsSession)
    from .sse import stream_route

    return stream_route(session, path)


def _nothing() -> None:
    """After a WebSocket's connect hook: nothing more (the upgrade is done)."""
