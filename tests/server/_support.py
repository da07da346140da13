"""Client-side tools of the server tests: raw TCP and WebSocket clients on asyncio streams.

Nothing here uses fastim's own client package: the TCP client speaks fastim frames with
``fastim._core.encode_frame`` / ``FrameDecoder``, the WebSocket client does the HTTP
upgrade by hand and reads frames with ``fastim._core.WSParser(client=True)``. Every wait
is bounded (``timeout``), so a server that goes quiet fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from fastim import _core
from fastim.protocol import (
    FrameType,
    pack_hello,
    pack_sub,
    unpack_ack,
    unpack_error,
    unpack_goaway,
    unpack_msg,
    unpack_unsubscribed,
)

F = FrameType
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
T = 5.0  # default bound of a single wait, seconds


class deadline:
    """``async with deadline(seconds):`` bounds a block; raises asyncio.TimeoutError.

    ``asyncio.timeout`` for Python 3.10 as well (the project supports 3.10).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._fired = False
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._handle = asyncio.get_running_loop().call_later(self.seconds, self._fire)

    def _fire(self) -> None:
        self._fired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._handle is not None
        self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            uncancel = getattr(self._task, "uncancel", None)  # 3.11+
            if uncancel is not None:
                uncancel()
            raise asyncio.TimeoutError(f"nothing for {self.seconds}s") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Closed(Exception):
    """The server closed the connection (EOF or reset) while we waited for something."""


async def open_tcp(
    port: int, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if rcvbuf is None:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), T)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), T)
    return await asyncio.open_connection(sock=sock, limit=rcvbuf)


# --------------------------------------------------------------------------- TCP


class TcpClient:
    """A raw fastim TCP client. ``recv`` returns whole frames as (type, payload)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = _core.FrameDecoder(1 << 30)
        self.frames: deque[tuple[int, bytes]] = deque()
        self.eof = False
        self.next_id = 1

    @classmethod
    async def connect(cls, port: int, hello: bool = True, rcvbuf: int | None = None) -> TcpClient:
        c = cls(*await open_tcp(port, rcvbuf))
        if hello:
            await c.hello()
        return c

    # ---- raw I/O

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, ftype: int, payload: bytes) -> None:
        self.writer.write(_core.encode_frame(ftype, payload))

    async def _fill(self, timeout: float) -> None:
        if self.eof:
            raise Closed("connection closed by the server")
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.eof = True
            raise Closed(f"connection reset: {e}") from None
        if not data:
            self.eof = True
            raise Closed("connection closed by the server")
        self.frames.extend(self.decoder.feed(data))

    async def recv(self, timeout: float = T) -> tuple[int, bytes]:
        """The next frame; raises Closed at EOF, TimeoutError if none in ``timeout``."""
        async with deadline(timeout):
            while not self.frames:
                await self._fill(timeout)
            return self.frames.popleft()

    async def recv_all_until_eof(self, timeout: float = T) -> list[tuple[int, bytes]]:
        """Every frame until the server closes the connection (EOF or reset)."""
        out: list[tuple[int, bytes]] = []
        async with deadline(timeout):
            while True:
                while self.frames:
                    out.append(self.frames.popleft())
                try:
                    await self._fill(timeout)
                except Closed:
                    out.extend(self.frames)
                    self.frames.clear()
                    return out

    async def expect(self, ftype: int, timeout: float = T) -> bytes:
        t, p = await self.recv(timeout)
        assert t == ftype, f"expected {F(ftype).name}, got {_name(t)} {p[:80]!r}"
        return p

    # ---- protocol

    async def hello(self) -> dict[str, Any]:
        self.send(F.HELLO, pack_hello(1, 1))
        p = await self.expect(F.WELCOME)
        assert p[0] == 1
        info: dict[str, Any] = orjson.loads(p[1:])
        return info

    def _id(self, req_id: int | None) -> int:
        if req_id is None:
            req_id = self.next_id
            self.next_id += 1
        return req_id

    def send_sub(self, ch: str, req_id: int | None = None) -> int:
        req_id = self._id(req_id)
        self.send(F.SUB, pack_sub(F.SUB, req_id, ch))
        return req_id

    def send_unsub(self, ch: str, req_id: int | None = None) -> int:
        req_id = self._id(req_id)
        self.send(F.UNSUB, pack_sub(F.UNSUB, req_id, ch))
        return req_id

    def send_pub(self, ch: str, data: bytes, req_id: int | None = None) -> int:
        req_id = self._id(req_id)
        self.send(F.PUB, pack_sub(F.PUB, req_id, ch, data))
        return req_id

    async def sub(self, ch: str, req_id: int | None = None) -> int:
        """Subscribe; returns the channel offset carried by SUBSCRIBED."""
        rid = self.send_sub(ch, req_id)
        p = await self.expect(F.SUBSCRIBED)
        got_id, off, got_ch = unpack_ack(p)
        assert (got_id, got_ch) == (rid, ch)
        return off

    async def unsub(self, ch: str, req_id: int | None = None) -> None:
        rid = self.send_unsub(ch, req_id)
        p = await self.expect(F.UNSUBSCRIBED)
        assert unpack_unsubscribed(p) == (rid, ch)

    async def pub(self, ch: str, data: bytes, req_id: int | None = None) -> int:
        """Publish and wait for the PUBACK; returns the offset (MSG frames are kept)."""
        rid = self.send_pub(ch, data, req_id)
        keep: list[tuple[int, bytes]] = []
        try:
            while True:
                t, p = await self.recv()
                if t == F.PUBACK:
                    got_id, off, got_ch = unpack_ack(p)
                    assert (got_id, got_ch) == (rid, ch)
                    return off
                assert t in (F.MSG, F.PING), f"expected PUBACK, got {_name(t)} {p[:80]!r}"
                keep.append((t, p))
        finally:
            self.frames.extendleft(reversed(keep))

    async def msg(self, timeout: float = T) -> tuple[int, str, bytes]:
        return unpack_msg(await self.expect(F.MSG, timeout))

    async def expect_error_and_goaway(self, timeout: float = T) -> tuple[int, str, int, str]:
        """ERROR, GOAWAY, EOF: returns (error code, error reason, close code, close reason)."""
        frames = await self.recv_all_until_eof(timeout)
        types = [_name(t) for t, _ in frames]
        assert types == ["ERROR", "GOAWAY"], f"expected ERROR, GOAWAY, EOF; got {types}"
        _id, code, reason = unpack_error(frames[0][1])
        close_code, close_reason = unpack_goaway(frames[1][1])
        return code, reason, close_code, close_reason

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), T)
        except (OSError, asyncio.TimeoutError):
            pass


def _name(t: int) -> str:
    try:
        return F(t).name
    except ValueError:
        return f"0x{t:02x}"


# --------------------------------------------------------------------------- WebSocket


def upgrade_request(
    port: int,
    path: str = "/ws",
    key: bytes | None = None,
    version: bytes = b"13",
    protocols: str | None = None,
    extra: bytes = b"",
) -> tuple[bytes, bytes]:
    """(request bytes, the Sec-WebSocket-Key sent)."""
    key = key if key is not None else base64.b64encode(os.urandom(16))
    req = (
        b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n"
        % (path.encode(), port, key, version)
    )
    if protocols is not None:
        req += b"Sec-WebSocket-Protocol: " + protocols.encode() + b"\r\n"
    return req + extra + b"\r\n", key


async def read_http_response(
    reader: asyncio.StreamReader, timeout: float = T
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lowercased names) and the bytes after the head of an HTTP response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers, head


async def http_exchange(
    port: int,
    request: bytes,
    timeout: float = T,
    during: Callable[[], Awaitable[None]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the HTTP port; return status, headers, body; the server must close.

    ``during`` is awaited once connected, before the request is sent.
    """
    reader, writer = await open_tcp(port)
    try:
        if during is not None:
            await during()
        writer.write(request)
        status, headers, _head = await read_http_response(reader, timeout)
        body = await asyncio.wait_for(reader.read(), timeout)  # up to EOF: the server closes
        if "content-length" in headers:
            assert len(body) == int(headers["content-length"])
        return status, headers, body
    finally:
        writer.close()


class WsClient:
    """A raw WebSocket client: hand-made upgrade, masked frames out, WSParser(client=True) in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = _core.WSParser(1 << 30, client=True)
        self.events: deque[tuple[int, bytes]] = deque()
        self.eof = False
        self.auto_pong = True
        self.pings = 0
        self.protocol: str | None = None
        self.next_id = 1
        self.close_code: int | None = None
        self.close_reason = ""
        self.decoder = _core.FrameDecoder(1 << 30)  # binary mode: fastim frames inside

    @classmethod
    async def connect(
        cls, port: int, path: str = "/ws", protocols: str | None = None, first: bytes = b""
    ) -> WsClient:
        """Upgrade; ``first`` is sent in the same write as the request (no wait for 101)."""
        reader, writer = await open_tcp(port)
        req, key = upgrade_request(port, path, protocols=protocols)
        writer.write(req + first)
        status, headers, _ = await read_http_response(reader)
        assert status == 101, f"upgrade refused: {status} {headers}"
        expect = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == expect
        assert headers["upgrade"].lower() == "websocket"
        c = cls(reader, writer)
        c.protocol = headers.get("sec-websocket-protocol")
        return c

    # ---- raw I/O

    def send_frame(
        self, opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None
    ) -> None:
        self.writer.write(_core.ws_encode(opcode, payload, fin=fin, mask=mask or os.urandom(4)))

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(_core.OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_json(self, obj: Any) -> None:
        self.send_frame(_core.OP_TEXT, orjson.dumps(obj))

    def send_binary(self, data: bytes) -> None:
        self.send_frame(_core.OP_BINARY, data)

    async def _fill(self, timeout: float) -> None:
        if self.eof:
            raise Closed("connection closed by the server")
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.eof = True
            raise Closed(f"connection reset: {e}") from None
        if not data:
            self.eof = True
            raise Closed("connection closed by the server")
        for op, payload in self.parser.feed(data):
            if op == _core.OP_PING:
                self.pings += 1
                if self.auto_pong:
                    self.send_frame(_core.OP_PONG, payload)
                continue
            if op == _core.OP_PONG:
                continue
            if op == _core.OP_CLOSE:
                self.close_code, self.close_reason = _core.ws_parse_close(payload)
            self.events.append((op, payload))

    async def recv_event(self, timeout: float = T) -> tuple[int, bytes]:
        """The next data message or close frame (pings are counted and answered)."""
        async with deadline(timeout):
            while not self.events:
                await self._fill(timeout)
            return self.events.popleft()

    async def pump(self, seconds: float) -> None:
        """Read (answering pings) for ``seconds``; the connection must stay open."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                await self._fill(left)
            except asyncio.TimeoutError:
                return

    async def recv_json(self, timeout: float = T) -> dict[str, Any]:
        op, payload = await self.recv_event(timeout)
        if op == _core.OP_CLOSE:
            raise AssertionError(
                f"expected a text message, got close {self.close_code} {self.close_reason!r}"
            )
        assert op == _core.OP_TEXT, f"expected a text message, got opcode {op}"
        obj: dict[str, Any] = orjson.loads(payload)
        return obj

    async def recv_frames(self, timeout: float = T) -> list[tuple[int, bytes]]:
        """The fastim frames of the next binary message."""
        op, payload = await self.recv_event(timeout)
        assert op == _core.OP_BINARY, f"expected a binary message, got opcode {op} {payload[:80]!r}"
        frames = self.decoder.feed(payload)
        assert self.decoder.buffered == 0, "binary message holds a partial fastim frame"
        return frames

    async def recv_frame(self, timeout: float = T) -> tuple[int, bytes]:
        frames = await self.recv_frames(timeout)
        assert len(frames) == 1, f"expected one fastim frame per binary message, got {len(frames)}"
        return frames[0]

    async def recv_close(self, timeout: float = T) -> tuple[int, str, list[tuple[int, bytes]]]:
        """Read until the server's close frame; returns (code, reason, messages before it)."""
        before: list[tuple[int, bytes]] = []
        async with deadline(timeout):
            while True:
                op, payload = await self.recv_event(timeout)
                if op == _core.OP_CLOSE:
                    assert self.close_code is not None
                    return self.close_code, self.close_reason, before
                before.append((op, payload))

    async def wait_eof(self, timeout: float = T) -> None:
        """Read until the server drops the TCP connection."""
        async with deadline(timeout):
            while True:
                try:
                    await self._fill(timeout)
                except Closed:
                    return

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.send_frame(_core.OP_CLOSE, _core.ws_close_payload(code, reason))

    # ---- JSON protocol

    def _id(self, req_id: Any) -> Any:
        if req_id is None:
            req_id = self.next_id
            self.next_id += 1
        return req_id

    async def request(
        self, obj: dict[str, Any], reply_op: str, timeout: float = T
    ) -> dict[str, Any]:
        """Send a command; wait for its reply (messages that arrive first are kept)."""
        obj = dict(obj)
        obj["id"] = rid = self._id(obj.get("id"))
        self.send_json(obj)
        keep: list[tuple[int, bytes]] = []
        try:
            async with deadline(timeout):
                while True:
                    op, payload = await self.recv_event(timeout)
                    if op == _core.OP_TEXT:
                        reply = orjson.loads(payload)
                        if reply.get("op") != "msg":
                            assert reply.get("op") == reply_op, f"expected {reply_op}, got {reply}"
                            assert reply.get("id") == rid, (
                                f"id not echoed: sent {rid!r}, got {reply}"
                            )
                            return reply
                    keep.append((op, payload))
        finally:
            self.events.extendleft(reversed(keep))

    async def sub(self, ch: str, req_id: Any = None) -> int:
        reply = await self.request({"op": "sub", "ch": ch, "id": req_id}, "subscribed")
        assert reply["ch"] == ch
        return int(reply["off"])

    async def unsub(self, ch: str, req_id: Any = None) -> None:
        reply = await self.request({"op": "unsub", "ch": ch, "id": req_id}, "unsubscribed")
        assert reply["ch"] == ch

    async def pub(self, ch: str, data: Any, req_id: Any = None) -> int:
        reply = await self.request({"op": "pub", "ch": ch, "data": data, "id": req_id}, "puback")
        assert reply["ch"] == ch
        return int(reply["off"])

    async def msg(self, timeout: float = T) -> dict[str, Any]:
        m = await self.recv_json(timeout)
        assert m.get("op") == "msg", f"expected a msg, got {m}"
        return m

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), T)
        except (OSError, asyncio.TimeoutError):
            pass


# --------------------------------------------------------------------------- control


class Control:
    """A TCP and a WS-JSON client that keep proving the node serves: sub/pub round trips.

    The TCP client publishes on a control channel both are subscribed to; a round trip
    passes when the PUBACK comes back and both subscribers get the message, in order.
    """

    CH = "control"

    def __init__(self, node: Any) -> None:
        self.node = node
        self.n = 0
        self.tcp: TcpClient
        self.ws: WsClient

    async def start(self) -> Control:
        self.tcp = await TcpClient.connect(self.node.tcp_port)
        self.ws = await WsClient.connect(self.node.ws_port)
        off = await self.tcp.sub(self.CH)
        assert await self.ws.sub(self.CH) == off
        self.n = off
        return self

    async def roundtrip(self, timeout: float = T) -> None:
        async with deadline(timeout):
            self.n += 1
            data = orjson.dumps({"control": self.n})
            off = await self.tcp.pub(self.CH, data)
            assert off == self.n
            assert await self.tcp.msg() == (off, self.CH, data)
            m = await self.ws.msg()
            assert (m["ch"], m["off"], m["data"]) == (self.CH, off, {"control": self.n})

    async def close(self) -> None:
        await self.tcp.close()
        await self.ws.close()


async def wait_for_sessions(node: Any, n: int, timeout: float = T) -> None:
    """Wait until the node holds exactly ``n`` sessions."""
    try:
        await wait_until(lambda: len(node.sessions) == n, timeout)
    except AssertionError:
        raise AssertionError(
            f"the node holds {len(node.sessions)} sessions, expected {n} within {timeout}s"
        ) from None


async def wait_until(pred: Any, timeout: float = T, what: str = "condition") -> None:
    """Poll ``pred`` (node state has no event to wait on) until true, or fail at ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
