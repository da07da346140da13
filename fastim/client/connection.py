"""Byte transports of the client SDK: fastim frames over TCP, or over WebSocket.

A transport moves whole fastim frames. :meth:`Connection.write` takes one or more
encoded frames (``encode_frame(...)`` concatenated) and :meth:`Connection.read_frames`
returns the ``(type, payload)`` of every frame that the next chunk of bytes from the
server completed. Everything below the fastim framing is the transport's business:
over WebSocket it wraps outgoing frames in masked binary messages, answers the
server's pings, and turns a close frame into :class:`~fastim.errors.ConnectionClosed`.

The fastim handshake (HELLO / WELCOME), requests and heartbeats are the
:class:`~fastim.client.Client`'s job, not this module's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl as _ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import protocol
from .._core import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    WSParser,
    encode_frame,
    ws_close_payload,
    ws_encode,
    ws_parse_close,
)
from ..errors import ConnectionClosed, ProtocolError, WebSocketError
from ..protocol import CloseCode, ErrorCode, FrameType

__all__ = [
    "MAX_FRAME",
    "MAX_HTTP_HEAD",
    "WS_GUID",
    "WS_SUBPROTOCOL",
    "Connection",
    "Endpoint",
    "HandshakeError",
    "TCPConnection",
    "WSConnection",
    "check_ws_upgrade",
    "deadline",
    "open_connection",
    "parse_url",
    "ws_accept",
    "ws_response_head_end",
    "ws_upgrade_request",
]

#: Largest fastim frame (payload bytes) the client accepts from a server. The client
#: trusts its server more than the server trusts its clients: this only stops a
#: corrupt length field from making us allocate gigabytes.
MAX_FRAME = 16 << 20
#: Largest WebSocket message the client accepts (one message may hold many frames).
MAX_WS_MESSAGE = 64 << 20
#: Cap on the size of the HTTP response head of a WebSocket upgrade.
MAX_HTTP_HEAD = 16 * 1024
#: RFC 6455 §1.3: appended to Sec-WebSocket-Key before hashing.
WS_GUID = protocol.WS_GUID.decode("ascii")  # RFC 6455 §1.3 (one constant: the protocol's)
#: The WebSocket subprotocol of binary fastim frames.
WS_SUBPROTOCOL = "fastim.binary"
#: The ``User-Agent`` of the SDK's upgrade requests.
USER_AGENT = "fastim-py/0.1"

_READ_CHUNK = 64 * 1024
_SERVER_TYPES = protocol.type_mask(protocol.SERVER_FRAME_TYPES)


# ``asyncio.wait_for`` before Python 3.12 runs the awaitable in a second task and can lose
# a ``cancel()`` that arrives while that task is finishing with an exception (3.12 rebuilt
# wait_for on asyncio.timeout): the client's reader then kept reconnecting after being
# cancelled (see test_cancelling_the_client_tasks_while_reconnecting_stops_them).
# ``asyncio.timeout`` (3.11+) runs the block in the current task and tells its own expiry
# apart from an outside cancellation; on 3.10 a timer that cancels the task does the job.
if sys.version_info >= (3, 11):

    def deadline(seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        """``async with deadline(s):`` raises TimeoutError if the block takes over ``s``."""
        return asyncio.timeout(seconds)

else:  # pragma: no cover - 3.10 only

    @contextlib.asynccontextmanager
    async def deadline(seconds: float) -> AsyncIterator[None]:
        """``async with deadline(s):`` raises TimeoutError if the block takes over ``s``."""
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise asyncio.TimeoutError from None
            raise
        finally:
            handle.cancel()


class HandshakeError(ProtocolError):
    """The WebSocket upgrade failed: bad status, bad accept key, oversized head, EOF."""

    code = ErrorCode.BAD_FRAMING


@dataclass(frozen=True)
class Endpoint:
    """A parsed server URL."""

    scheme: str  # "tcp" | "tls" | "ws" | "wss"
    host: str
    port: int
    path: str  # request target of a WebSocket upgrade ("/" for tcp)

    @property
    def tls(self) -> bool:
        """Whether the connection is wrapped in TLS (``tls://``, ``wss://``)."""
        return self.scheme in ("tls", "wss")

    @property
    def host_header(self) -> str:
        """The value of an HTTP ``Host`` header for this endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "wss" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str, default_path: str = "/") -> Endpoint:
    """Parse a server URL.

    Args:
        url: ``tcp://host:port``, ``tls://host:port`` (fastim frames over TLS),
            ``ws://host[:port]/path`` or ``wss://host[:port]/path``.
        default_path: the path of a ``ws://`` or ``wss://`` URL that has none.

    Returns:
        The :class:`Endpoint`.

    Raises:
        ValueError: unknown scheme, missing host, or missing port for ``tcp://``/``tls://``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("tcp", "tls", "ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r} (tcp, tls, ws, wss)")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL {url!r} has no host")
    port = parts.port  # raises ValueError for a bad port
    if port is None:
        if scheme in ("tcp", "tls"):
            raise ValueError(f"URL {url!r} needs a port")
        port = 443 if scheme == "wss" else 80
    path = parts.path or default_path
    if parts.query:
        path += "?" + parts.query
    return Endpoint(scheme, host, port, path if scheme in ("ws", "wss") else "/")


def ws_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value a server must answer to ``key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def ws_upgrade_request(
    ep: Endpoint, subprotocol: str | None = WS_SUBPROTOCOL, user_agent: str = USER_AGENT
) -> tuple[bytes, str]:
    """The client's HTTP/1.1 upgrade request to ``ep`` (RFC 6455 §4.1), with a fresh key.

    Args:
        ep: the server (its ``path`` is the request target).
        subprotocol: the ``Sec-WebSocket-Protocol`` offered; None offers none.
        user_agent: the ``User-Agent`` header.

    Returns:
        (the request bytes, the ``Sec-WebSocket-Key`` sent: for :func:`check_ws_upgrade`).
    """
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    proto = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    request = (
        f"GET {ep.path} HTTP/1.1\r\n"
        f"Host: {ep.host_header}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{proto}"
        f"User-Agent: {user_agent}\r\n"
        "\r\n"
    )
    return request.encode("ascii"), key


def ws_response_head_end(buf: bytes | bytearray) -> int:
    """Where the upgrade response's head ends in ``buf`` (the blank line's index), or -1.

    Raises:
        HandshakeError: the head is (or already would be) longer than MAX_HTTP_HEAD.
    """
    end = buf.find(b"\r\n\r\n")
    if end > MAX_HTTP_HEAD or (end < 0 and len(buf) > MAX_HTTP_HEAD):
        raise HandshakeError(f"upgrade response head exceeds {MAX_HTTP_HEAD} bytes")
    return end


def check_ws_upgrade(head: bytes, key: str, subprotocol: str | None = WS_SUBPROTOCOL) -> None:
    """Check the server's response to an upgrade request (RFC 6455 §4.2.2, §4.1).

    Args:
        head: the response head, up to (without) the blank line.
        key: the ``Sec-WebSocket-Key`` the request sent.
        subprotocol: the subprotocol the request offered (None: none).

    Raises:
        HandshakeError: not a 101, a missing ``Upgrade``/``Connection`` header, a wrong
            ``Sec-WebSocket-Accept``, a subprotocol or extension that was not offered.
    """
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HandshakeError(f"malformed upgrade response status line {status_line!r}")
    if parts[1] != "101":
        raise HandshakeError(f"WebSocket upgrade refused: {status_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeError(f"malformed header line in upgrade response: {line!r}")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise HandshakeError("upgrade response lacks 'Upgrade: websocket'")
    if "upgrade" not in (t.strip().lower() for t in headers.get("connection", "").split(",")):
        raise HandshakeError("upgrade response lacks 'Connection: Upgrade'")
    if headers.get("sec-websocket-accept") != ws_accept(key):
        raise HandshakeError("upgrade response has a wrong Sec-WebSocket-Accept")
    proto = headers.get("sec-websocket-protocol")
    if proto is not None and proto != subprotocol:
        raise HandshakeError(
            f"server chose subprotocol {proto!r}, we asked for {subprotocol or 'none'}"
        )
    if headers.get("sec-websocket-extensions"):
        raise HandshakeError("server enabled WebSocket extensions we did not offer")


class Connection:
    """One open connection to a server, moving fastim frames (base class).

    Not safe for concurrent :meth:`read_frames` calls: one reader at a time.
    """

    url: str

    def __init__(
        self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.url = url
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(MAX_FRAME, _SERVER_TYPES)
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called."""
        return self._closed

    def write(self, frames: bytes) -> None:
        """Queue encoded fastim frames for sending (no waiting; see :meth:`drain`).

        Args:
            frames: one or more whole frames from ``encode_frame``, concatenated.

        Raises:
            ConnectionClosed: the connection is closed.
        """
        raise NotImplementedError

    def send_ping(self, payload: bytes) -> None:
        """Queue a heartbeat ping that the server answers with a pong."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its high-water mark.

        Raises:
            ConnectionClosed: the connection was lost.
        """
        if self._closed:
            raise ConnectionClosed(CloseCode.NORMAL, "connection closed")
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ConnectionClosed(1006, f"connection lost: {exc}") from exc

    async def read_frames(self) -> list[tuple[int, bytes]]:
        """Read the next chunk from the socket and return the frames it completed.

        The list may be empty (the chunk held part of a frame, or only WebSocket
        control frames): any return means the server sent *something*.

        Returns:
            ``(frame type, payload)`` pairs, in order.

        Raises:
            ConnectionClosed: EOF, socket error, or a WebSocket close frame
                (with the server's code and reason).
            ProtocolError: the server's bytes break the protocol (bad CRC, unknown
                frame type, bad WebSocket framing).
        """
        raise NotImplementedError

    async def _read_chunk(self) -> bytes:
        try:
            data = await self._reader.read(_READ_CHUNK)
        except OSError as exc:
            raise ConnectionClosed(1006, f"connection lost: {exc}") from exc
        if not data:
            raise ConnectionClosed(1006, "connection closed by server (EOF)")
        return data

    def _write_raw(self, data: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise ConnectionClosed(1006, "connection closed")
        self._writer.write(data)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection politely (a close frame first, over WebSocket).

        Idempotent; never raises.
        """
        if self._closed:
            return
        self._closed = True
        await self._shutdown()

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer.can_write_eof():
                self._writer.write_eof()
        self._writer.close()
        with contextlib.suppress(Exception):
            async with deadline(1.0):
                await self._writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (no close handshake); a pending read sees EOF."""
        self._closed = True
        self._writer.transport.abort()


class TCPConnection(Connection):
    """fastim frames straight on a TCP stream."""

    def write(self, frames: bytes) -> None:
        self._write_raw(frames)

    def send_ping(self, payload: bytes) -> None:
        self._write_raw(encode_frame(FrameType.PING, payload))

    async def read_frames(self) -> list[tuple[int, bytes]]:
        data = await self._read_chunk()
        return self._decoder.feed(data)


class WSConnection(Connection):
    """fastim frames inside binary WebSocket messages (subprotocol ``fastim.binary``)."""

    def __init__(
        self,
        url: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        leftover: bytes = b"",
    ) -> None:
        super().__init__(url, reader, writer)
        self._parser = WSParser(MAX_WS_MESSAGE, client=True)
        self._leftover = leftover
        self._close_received: ConnectionClosed | None = None
        self._close_sent = False

    def write(self, frames: bytes) -> None:
        self._write_raw(ws_encode(OP_BINARY, frames, mask=os.urandom(4)))

    def send_ping(self, payload: bytes) -> None:
        self._write_raw(ws_encode(OP_PING, payload[:125], mask=os.urandom(4)))

    async def read_frames(self) -> list[tuple[int, bytes]]:
        if self._close_received is not None:
            raise self._close_received
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            data = await self._read_chunk()
        frames: list[tuple[int, bytes]] = []
        for opcode, payload in self._parser.feed(data):
            if opcode == OP_BINARY:
                frames.extend(self._decoder.feed(payload))
            elif opcode == OP_PING:
                with contextlib.suppress(ConnectionClosed):
                    self._write_raw(ws_encode(OP_PONG, payload, mask=os.urandom(4)))
            elif opcode == OP_PONG:
                pass
            elif opcode == OP_CLOSE:
                code, reason = ws_parse_close(payload)
                if code == 1005:  # no status code in the close frame
                    code = CloseCode.NORMAL
                self._close_received = ConnectionClosed(code, reason)
                await self._answer_close(payload)
                break
            elif opcode == OP_TEXT:
                raise WebSocketError(
                    "text message on a fastim.binary connection", CloseCode.PROTOCOL_ERROR
                )
        if self._close_received is not None and not frames:
            raise self._close_received
        return frames

    async def _answer_close(self, payload: bytes) -> None:
        # RFC 6455 §5.5.1: echo the status code, then the server closes the TCP stream.
        echo = payload[:2] if len(payload) >= 2 else b""
        if not self._close_sent and not self._closed:
            self._close_sent = True
            with contextlib.suppress(Exception):
                self._writer.write(ws_encode(OP_CLOSE, echo, mask=os.urandom(4)))
        await self.close()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._closed:
            return
        if not self._close_sent:
            self._close_sent = True
            with contextlib.suppress(Exception):
                self._writer.write(
                    ws_encode(OP_CLOSE, ws_close_payload(code, reason), mask=os.urandom(4))
                )
        self._closed = True
        await self._shutdown()


async def _ws_upgrade(
    ep: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    """Do the client side of the upgrade; return the bytes that followed the response head."""
    request, key = ws_upgrade_request(ep)
    writer.write(request)
    await writer.drain()

    buf = bytearray()
    while (end := ws_response_head_end(buf)) < 0:
        chunk = await reader.read(4096)
        if not chunk:
            raise HandshakeError("server closed the connection during the WebSocket upgrade")
        buf += chunk
    check_ws_upgrade(bytes(buf[:end]), key)
    return bytes(buf[end + 4 :])


async def open_connection(url: str, ssl: _ssl.SSLContext | None = None) -> Connection:
    """Open a transport to ``url`` (no timeout of its own: the caller sets one).

    For ``ws://`` and ``wss://`` this includes the WebSocket upgrade; the fastim
    HELLO / WELCOME exchange is left to the caller.

    Args:
        url: ``tcp://host:port``, ``tls://host:port``, ``ws://host:port/ws`` or
            ``wss://...``.
        ssl: the TLS context of ``tls://`` and ``wss://`` (a private CA, a client
            certificate); default: the system's trusted CAs, hostname checked.
            Ignored for plain ``tcp://`` and ``ws://``.

    Returns:
        A :class:`TCPConnection` or :class:`WSConnection`.

    Raises:
        ValueError: the URL is not understood.
        OSError: the TCP connection could not be made (ssl.SSLError: TLS failed,
            e.g. the server's certificate does not verify).
        HandshakeError: the WebSocket upgrade failed.
    """
    ep = parse_url(url)
    ssl_ctx = (ssl or _ssl.create_default_context()) if ep.tls else None
    reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=ssl_ctx)
    try:
        if ep.scheme in ("tcp", "tls"):
            return TCPConnection(url, reader, writer)
        leftover = await _ws_upgrade(ep, reader, writer)
        return WSConnection(url, reader, writer, leftover)
    except BaseException:
        writer.transport.abort()
        raise
