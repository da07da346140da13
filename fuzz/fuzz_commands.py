"""atheris target: the command parser (Session.handle_json / handle_frame) without sockets.

    .venv/bin/python fuzz/fuzz_commands.py -max_total_time=120

One node runs (store in memory) in an event loop owned by the target. Each input becomes
one session (TCP, WebSocket JSON or WebSocket binary) on a fake transport that records
what the node writes: usually a valid opening (HELLO, or an HTTP upgrade), then messages
cut from the input and framed properly (CMD and other client frames with a correct CRC,
masked WebSocket frames), so that the fuzzer works on the JSON commands and frame
payloads rather than on framing. Every byte goes through the session's real
``data_received``. Findings:

- any exception out of ``data_received`` (on a real socket the loop would log it and
  drop the connection without an answer);
- an error code the protocol does not document, or 100 (INTERNAL); a close code, HTTP
  status or frame type the node must not send; bytes that do not parse;
- an error logged by the node, or an exception reaching the event loop;
- after the connection is gone: the session still listed, still subscribed anywhere,
  or still in the timer wheel.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import sys
from typing import Any

import _common

_common.start(instrument=["fastim.node", "fastim.transport"])

import atheris  # type: ignore[import-untyped,unused-ignore]  # noqa: E402
import orjson  # noqa: E402

from fastim.config import Config  # noqa: E402
from fastim.node import Node  # noqa: E402
from fastim.protocol import (  # noqa: E402
    CLIENT_FRAME_TYPES,
    SERVER_FRAME_TYPES,
    ErrorCode,
    FrameType,
    pack_hello,
    unpack_error,
    unpack_goaway,
)
from fastim.session import CLOSED  # noqa: E402
from fastim.transport import TcpSession, WsSession  # noqa: E402

core = _common.core()
F = FrameType
DOCUMENTED = {int(c) for c in ErrorCode} - {int(ErrorCode.INTERNAL)}
CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009, 4000, 4001, 4002, 4500}
HTTP = {101, 200, 400, 404, 405, 426, 429, 431, 503}
CLIENT_TYPES = sorted(CLIENT_FRAME_TYPES)
MASK = b"\x0f\xf0\xaa\x55"


class Problems(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))


class FakeTransport:
    """Records writes; close() ends the connection on the next loop iteration, as asyncio does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
        self.loop = loop
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.out += data

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
PROBLEMS = Problems()
logging.getLogger("fastim").addHandler(PROBLEMS)
LOOP.set_exception_handler(lambda _loop, ctx: PROBLEMS.seen.append(str(ctx)))
# a listener only because a node needs one; no connection is ever made to it
NODE = Node(Config(tcp_port=_free_port(), ws_port=0, node_id="fuzz", direct_write=0))
LOOP.run_until_complete(NODE.start())


def spin(n: int = 4) -> None:
    """Let the loop run: flushes, the hub's and the postman's tasks, connection_lost."""
    for _ in range(n):
        LOOP.run_until_complete(asyncio.sleep(0))


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return bytes(core.ws_encode(opcode, payload, fin=fin, mask=MASK))


def upgrade(fdp: Any, kind: str) -> bytes:
    key = base64.b64encode(fdp.ConsumeBytes(16).ljust(16, b"k"))
    extra = b""
    if fdp.ConsumeBool():
        extra += b"Sec-WebSocket-Protocol: %s\r\n" % (
            b"fastim.json" if kind == "ws-json" else b"fastim.binary"
        )
    if fdp.ConsumeIntInRange(0, 3) == 0:
        extra += b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    return (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (key, extra)
    )


def message(fdp: Any, kind: str) -> bytes:
    """One client message cut from the input, framed for ``kind``."""
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    how = fdp.ConsumeIntInRange(0, 15)
    if how == 0:
        return bytes(body)  # unframed bytes
    if kind == "ws-json":
        if how == 1:
            return ws_frame(core.OP_BINARY, body)
        if how == 2:  # fragmented, with a ping in between
            half = len(body) // 2
            return (
                ws_frame(core.OP_TEXT, body[:half], fin=False)
                + ws_frame(core.OP_PING, body[:10])
                + ws_frame(core.OP_CONT, body[half:])
            )
        return ws_frame(core.OP_TEXT, body)
    ftype = F.CMD if how > 5 else fdp.PickValueInList([*CLIENT_TYPES, 0x7F])
    frame = core.encode_frame(ftype, body)
    return ws_frame(core.OP_BINARY, frame) if kind == "ws-binary" else frame


def check_fastim_frames(data: bytes) -> None:
    dec = core.FrameDecoder(1 << 30)
    frames = dec.feed(data)
    assert dec.buffered == 0, "the node wrote a partial frame"
    for t, p in frames:
        assert t in SERVER_FRAME_TYPES, f"frame type 0x{t:02x} to a client"
        if t == F.ERROR:
            code = unpack_error(p)[1]
            assert code in DOCUMENTED, f"error code {code}: {p!r}"
        elif t == F.GOAWAY:
            assert unpack_goaway(p)[0] in CLOSE_CODES, p
        elif t == F.EVENT:
            check_json(p)


def check_json(p: bytes) -> None:
    obj = orjson.loads(p)
    assert isinstance(obj, dict) and isinstance(obj.get("op"), str), obj
    if obj["op"] == "error":
        assert obj["code"] in DOCUMENTED, f"error code {obj['code']}: {obj}"
        assert isinstance(obj["reason"], str) and obj["reason"], obj


def check_output(kind: str, out: bytes) -> None:
    if kind == "tcp":
        check_fastim_frames(out)
        return
    if not out:
        return
    head, sep, rest = out.partition(b"\r\n\r\n")
    assert sep, f"an unfinished HTTP head: {out[:200]!r}"
    status = int(head.split(b" ", 2)[1])
    assert status in HTTP, head
    if status != 101:
        return
    parser = core.WSParser(1 << 30, client=True, deflate=True)
    for op, payload in parser.feed(rest):
        if op & core.OP_COMPRESSED:
            op &= 0x0F
            payload = core.ws_inflate(payload, 1 << 30, op == core.OP_TEXT)
        if op == core.OP_TEXT:
            check_json(payload)
        elif op == core.OP_BINARY:
            check_fastim_frames(payload)
        elif op == core.OP_CLOSE:
            # the node's own codes, or the client's close code echoed (RFC 6455 §5.5.1):
            # either way one a peer may send (ws_parse_close raises for any other)
            core.ws_parse_close(payload)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(["tcp", "ws-json", "ws-binary"])
    session: Any = TcpSession(NODE) if kind == "tcp" else WsSession(NODE)
    transport = FakeTransport(LOOP, session)
    session.connection_made(transport)
    chunks: list[bytes] = []
    if fdp.ConsumeIntInRange(0, 7):
        if kind == "tcp":
            user = fdp.PickValueInList([b"", b'{"user":"alice"}', b'{"user":"bob"}'])
            chunks.append(core.encode_frame(F.HELLO, pack_hello(1, 1, user)))
        else:
            chunks.append(upgrade(fdp, kind))
    while fdp.remaining_bytes() and len(chunks) < 12:
        chunks.append(message(fdp, kind))
    if fdp.ConsumeBool():
        chunks = [b"".join(chunks)]
    for chunk in chunks:
        if transport.closing:
            break
        session.data_received(chunk)  # an exception here is a finding
        spin(2)
    spin()
    check_output(kind, bytes(transport.out))
    transport.close()
    spin()
    assert session.state == CLOSED, "connection_lost did not run"
    assert session not in NODE.sessions, "a closed session is still listed"
    assert session.wheel_tick == -1, "a closed session is still in the timer wheel"
    ring = session.ring
    for ch in NODE.hub.channels.values():
        assert ring not in ch.subs, f"a closed session is still subscribed to {ch.name!r}"
    if PROBLEMS.seen:
        raise AssertionError(f"the node logged: {PROBLEMS.seen}")


if __name__ == "__main__":
    _common.run(TestOneInput, "commands.dict")
    sys.exit(0)
