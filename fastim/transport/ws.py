"""The WebSocket transport: an HTTP/1.1 upgrade (parsed by httptools), then RFC 6455.

Text messages carry JSON commands (browsers); binary messages carry whole fastim
frames (binary clients). A connection uses one of the two: the subprotocol
``fastim.json`` / ``fastim.binary`` fixes it at the upgrade, otherwise the first
message does. Plain HTTP requests get a status and a close: 426 on the WebSocket path
without an upgrade, 404 elsewhere, 400 for a malformed request or upgrade.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING

import httptools

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

if TYPE_CHECKING:
    from ..node import Node

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_HEAD = 16 * 1024
MAX_HEADERS = 64
_SERVER = f"fastim/{__version__}".encode()

_STATUS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
    200: b"OK",
}

MODE_UNSET, MODE_JSON, MODE_BINARY, MODE_ECHO = range(4)

#: shared by every upgraded session (never written: httptools is gone by then)
_NO_HEADERS: dict[bytes, bytes] = {}


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class WsSession(Session):
    """One client on the WebSocket port, from its first HTTP byte to its close."""

    __slots__ = (
        "close_sent",
        "head_bytes",
        "headers",
        "http",
        "mode",
        "n_headers",
        "parser",
        "reject",
        "request_done",
        "url",
    )

    hello_required = False

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.http: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.head_bytes = 0
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.n_headers = 0
        self.reject: tuple[int, str] | None = None
        self.request_done = False
        self.parser: _core.WSParser | None = None
        self.mode = MODE_UNSET
        self.close_sent = False

    # ------------------------------------------------------------------ httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.n_headers += 1
        if self.n_headers > MAX_HEADERS:
            self.reject = (431, f"more than {MAX_HEADERS} headers")
            return
        key = name.lower()
        if key in self.headers:
            self.headers[key] += b"," + value
        else:
            self.headers[key] = value

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
        self.head_bytes += len(data)
        try:
            self.http.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.reject is not None:
                self.http_reply(*self.reject)
                return
            offset = e.args[0] if e.args else len(data)
            self._upgrade(data[offset:])
            return
        except httptools.HttpParserError as e:
            self.http_reply(400, f"malformed HTTP request: {e}")
            return
        if self.reject is not None:
            self.http_reply(*self.reject)
        elif self.request_done:
            self._plain_request()
        elif self.head_bytes > MAX_REQUEST_HEAD:
            self.http_reply(431, f"request head over {MAX_REQUEST_HEAD} bytes")

    def http_reply(self, status: int, body: str, extra: bytes = b"") -> None:
        """Answer a plain HTTP request and close the connection."""
        if self.transport is None or self.state >= CLOSING:
            return
        self.node.http_rejects += 1
        payload = (body + "\n").encode()
        head = b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: text/plain; charset=utf-8\r\n" % (
            status,
            _STATUS.get(status, b"Error"),
            _SERVER,
        )
        self.http = None
        self.state = CLOSING
        self.transport.write(
            head
            + extra
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
            + payload
        )
        self.transport.close()
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
            + b"Server: "
            + _SERVER
            + b"\r\n\r\n"
        )
        # drop what only the upgrade needed: idle connections are the memory budget
        self.http = None
        self.headers = _NO_HEADERS
        self.url = b""
        max_message = cfg.max_message
        self.parser = _core.WSParser(max_message)
        self._set_mode(mode)
        if mode == MODE_ECHO:
            # an echo client may send a message as large as max_message and get it back
            assert self.ring is not None
            self.ring.cap = max(self.ring.cap, 2 * max_message + 64)
        self.mark_open()
        if rest:
            self._ws_data(rest)

    def _set_mode(self, mode: int) -> None:
        self.mode = mode
        assert self.ring is not None
        if mode == MODE_BINARY:
            self.replies = WS_BINARY_REPLIES
            self.ring.fmt = _core.FMT_WS_BINARY
            self.decoder = _core.FrameDecoder(self.config.max_frame, CLIENT_TYPES_MASK)
        else:
            self.replies = JSON_REPLIES
            self.ring.fmt = _core.FMT_WS_JSON

    def on_handshake_timeout(self) -> None:
        self.http_reply(
            400, f"no complete WebSocket upgrade within {self.config.handshake_timeout:g}s"
        )

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
                if self.state >= CLOSING and opcode != _core.OP_CLOSE:
                    continue  # after our close frame only the peer's close matters (§5.5.1)
                self._ws_event(opcode, payload)
            if error is not None:
                self.fail(error)
        except ProtocolError as e:
            self.fail(e)

    def _ws_event(self, opcode: int, payload: bytes) -> None:
        if opcode == _core.OP_TEXT or opcode == _core.OP_BINARY:
            mode = self.mode
            if mode == MODE_ECHO:
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
                for ftype, fpayload in decoder.feed(payload):
                    self.handle_frame(ftype, fpayload)
                    if self.state >= CLOSING:
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
                self.transport.close()
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
            self.transport.close()
        self.node.wheel.schedule(self, self.node.wheel.now + self.config.close_timeout)

    def fail(self, err: ProtocolError, req_id: object = None) -> None:
        if isinstance(err, WebSocketError):
            # framing is broken: no error message, just the close code RFC 6455 asks for
            self.node.protocol_errors += 1
            if self.state >= CLOSING:
                # broken framing while we wait for the peer's close: stop waiting (§7.1.7)
                assert self.transport is not None
                self.transport.close()
                return
            self.close(err.ws_close_code, err.reason[:100])
            return
        super().fail(err, req_id)
