"""Hostile and broken input: every violation gets an error naming it and a close, and the
node keeps serving everyone else.

Each test holds a control pair (a TCP and a WS-JSON client subscribed to one channel) and
proves a sub/pub round trip works while the bad connection is open and after it is gone,
and that the node's session count comes back to the control pair alone.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fastim import _core
from fastim.errors import ProtocolError
from fastim.node import Node
from fastim.protocol import (
    CloseCode,
    ErrorCode,
    FrameType,
    pack_hello,
    pack_sub,
    unpack_error,
    unpack_goaway,
)

from ._support import (
    Closed,
    Control,
    TcpClient,
    WsClient,
    deadline,
    http_exchange,
    open_tcp,
    read_http_response,
    upgrade_request,
    wait_for_sessions,
    wait_until,
)

F = FrameType
CONTROL_SESSIONS = 2  # the control pair


@pytest.fixture
async def control(node: Node) -> AsyncIterator[Control]:
    c = await Control(node).start()
    yield c
    await c.close()


async def still_serving(node: Node, control: Control, errors: int | None = None) -> None:
    """After the bad client: round trip works, only the control sessions are left."""
    await control.roundtrip()
    await wait_for_sessions(node, CONTROL_SESSIONS)
    await control.roundtrip()
    if errors is not None:
        assert node.protocol_errors == errors


def header(length: int, ftype: int, crc: int = 0) -> bytes:
    return struct.pack("!IBI", length, ftype, crc)


# --------------------------------------------------------------------------- TCP


async def test_tcp_garbage(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port, hello=False)
    await control.roundtrip()  # during
    bad.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))  # a TLS ClientHello
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code in (
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.BAD_CHECKSUM,
        ErrorCode.BAD_FRAMING,
    )
    assert reason
    assert close_code == ProtocolError("", code).close_code
    await still_serving(node, control, errors=1)


async def test_tcp_garbage_after_hello(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await bad.sub("control")
    await control.roundtrip()
    assert (await bad.msg())[1] == "control"  # it is a subscriber like the others...
    bad.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # ...until it sends HTTP to the TCP port
    code, _reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.FRAME_TOO_LARGE  # "GET " read as a length is ~1.2 GB
    assert close_code == CloseCode.MESSAGE_TOO_BIG
    assert len(node.hub.channels["control"].subs) == CONTROL_SESSIONS
    await still_serving(node, control, errors=1)


async def test_tcp_oversize_frame_header(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()
    # only the header, claiming 1 byte over max_frame: the verdict must come from it alone,
    # so the node cannot be waiting to buffer (or have allocated) the payload
    hdr = header(node.config.max_frame + 1, F.PUB)
    bad.write(hdr[:8])
    with pytest.raises(asyncio.TimeoutError):
        await bad.recv(0.2)  # 8 bytes decide nothing yet
    assert len(node.sessions) == CONTROL_SESSIONS + 1
    bad.write(hdr[8:])
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.FRAME_TOO_LARGE
    assert str(node.config.max_frame + 1) in reason or "max" in reason.lower()
    assert close_code == CloseCode.MESSAGE_TOO_BIG
    await still_serving(node, control, errors=1)


async def test_tcp_frame_size_limit_is_exact(node_factory) -> None:
    node = await node_factory(max_frame=1024)
    control = await Control(node).start()
    ok = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    ch = "lim"
    prefix = len(pack_sub(F.PUB, 1, ch, b""))
    data = b'"' + b"x" * (1024 - prefix - 2) + b'"'
    assert len(pack_sub(F.PUB, 1, ch, data)) == 1024
    assert await ok.pub(ch, data) == 1  # exactly max_frame: accepted
    ok.send_pub(ch, data[:-1] + b'x"')  # 1025 bytes
    code, _, close_code, _ = await ok.expect_error_and_goaway()
    assert (code, close_code) == (ErrorCode.FRAME_TOO_LARGE, CloseCode.MESSAGE_TOO_BIG)
    await still_serving(node, control, errors=1)
    await control.close()


async def test_tcp_bad_checksum(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()
    frame = bytearray(_core.encode_frame(F.SUB, pack_sub(F.SUB, 1, "control")))
    frame[5] ^= 0x01  # first CRC byte
    bad.write(bytes(frame))
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_CHECKSUM
    assert "crc" in reason.lower() or "checksum" in reason.lower()
    assert close_code == CloseCode.PROTOCOL_ERROR
    assert len(node.hub.channels["control"].subs) == CONTROL_SESSIONS  # the SUB was not applied
    await still_serving(node, control, errors=1)


async def test_tcp_payload_corrupted_in_flight(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    frame = bytearray(_core.encode_frame(F.PUB, pack_sub(F.PUB, 1, "control", b'{"x":1}')))
    frame[-2] ^= 0x20  # a payload byte, CRC left as it was
    bad.write(bytes(frame))
    code, _, _, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_CHECKSUM
    assert node.hub.channels["control"].offset == control.n  # nothing was published
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("ftype", [0x00, 0x7E, 0xFF, int(F.MSG), int(F.WELCOME), int(F.GOAWAY)])
async def test_tcp_unknown_frame_type(node: Node, control: Control, ftype: int) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()
    bad.write(_core.encode_frame(ftype, b"{}"))
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.UNKNOWN_OP
    assert f"{ftype:02x}" in reason.lower() or str(ftype) in reason
    assert close_code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("first", [F.SUB, F.PUB, F.PING])
async def test_tcp_first_frame_not_hello(node: Node, control: Control, first: FrameType) -> None:
    bad = await TcpClient.connect(node.tcp_port, hello=False)
    await control.roundtrip()
    payload = (
        b"" if first == F.PING else pack_sub(first, 1, "control", b"1" if first == F.PUB else b"")
    )
    bad.send(first, payload)
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.HANDSHAKE_REQUIRED
    assert "HELLO" in reason
    assert close_code == CloseCode.POLICY_VIOLATION
    assert node.hub.channels["control"].offset == control.n
    await still_serving(node, control, errors=1)


async def test_tcp_second_hello_is_bad_request(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send(F.HELLO, pack_hello(1, 1))
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_REQUEST and "HELLO" in reason
    assert close_code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize(("lo", "hi"), [(2, 3), (0, 0), (200, 255)])
async def test_tcp_unsupported_version(node: Node, control: Control, lo: int, hi: int) -> None:
    bad = await TcpClient.connect(node.tcp_port, hello=False)
    await control.roundtrip()
    bad.send(F.HELLO, pack_hello(lo, hi))
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.UNSUPPORTED_VERSION
    assert f"{lo}..{hi}" in reason and "1..1" in reason  # both ranges are named
    assert close_code == CloseCode.POLICY_VIOLATION
    await still_serving(node, control, errors=1)


async def test_tcp_hello_too_short(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port, hello=False)
    await control.roundtrip()  # while the bad connection is open
    bad.send(F.HELLO, b"\x01")
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_REQUEST and "HELLO" in reason
    assert close_code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize(
    "data", [b"{not json", b"", b"\xff\xfe", b"[1,2", b"NaN", b'{"a":1} trailing']
)
async def test_tcp_pub_with_invalid_json(node: Node, control: Control, data: bytes) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()
    bad.send_pub("control", data, req_id=5)
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_REQUEST
    assert "JSON" in reason
    assert close_code == CloseCode.BAD_REQUEST
    assert node.hub.channels["control"].offset == control.n  # nothing was published
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (b"\x00\x00\x00\x01", "short"),  # no channel length
        (b"\x00\x00\x00\x01\x09abc", "channel"),  # channel length beyond the payload
        (b"\x00\x00\x00\x01\x00", "ch"),  # empty channel
    ],
)
async def test_tcp_malformed_sub_payload(
    node: Node, control: Control, payload: bytes, word: str
) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send(F.SUB, payload)
    code, reason, _, _ = await bad.expect_error_and_goaway()
    assert code in (ErrorCode.BAD_REQUEST, ErrorCode.BAD_CHANNEL)
    assert word in reason
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("ch", ["bad\nchannel", "\x00", "tab\there", "del\x7f", "nel\x85"])
async def test_tcp_channel_with_control_characters(node: Node, control: Control, ch: str) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send_sub(ch)
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_CHANNEL and "control" in reason
    assert close_code == CloseCode.BAD_REQUEST
    assert ch not in node.hub.channels
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("ch", ["", "x" * 256, "é" * 128])
async def test_ws_channel_of_bad_length(node: Node, control: Control, ch: str) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send_json({"op": "sub", "ch": ch, "id": 1})
    err, code, _ = await ws_error_then_close(bad)
    assert err["code"] == ErrorCode.BAD_CHANNEL and "255" in str(err["reason"])
    assert code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


async def test_tcp_ping_payload_over_64_bytes(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send(F.PING, b"p" * 64)
    assert await bad.expect(F.PONG) == b"p" * 64  # 64 is fine
    bad.send(F.PING, b"p" * 65)
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.BAD_REQUEST and "64" in reason
    assert close_code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


async def test_tcp_pub_data_over_max_message(node_factory: Any) -> None:
    node = await node_factory(max_message=1000)
    control = await Control(node).start()
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    assert await bad.pub("control", b'"' + b"d" * 998 + b'"') == control.n + 1  # exactly 1000
    control.n += 1
    await control.tcp.msg()
    await control.ws.msg()
    bad.send_pub("control", b'"' + b"d" * 999 + b'"')
    code, reason, close_code, _ = await bad.expect_error_and_goaway()
    assert code == ErrorCode.FRAME_TOO_LARGE and "max_message" in reason
    assert close_code == CloseCode.MESSAGE_TOO_BIG
    await still_serving(node, control, errors=1)
    await control.close()


async def test_tcp_pipelined_frames_after_a_fatal_one_are_not_executed(
    node: Node, control: Control
) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    bad.write(
        _core.encode_frame(F.PUB, pack_sub(F.PUB, 1, "control", b"{bad"))
        + _core.encode_frame(F.PUB, pack_sub(F.PUB, 2, "control", b'"must not be published"'))
    )
    await bad.expect_error_and_goaway()
    assert node.hub.channels["control"].offset == control.n
    await still_serving(node, control, errors=1)


async def test_tcp_frames_before_a_bad_checksum_in_one_chunk_are_answered(
    node: Node, control: Control
) -> None:
    """A publish that arrived whole ahead of a corrupt frame is executed and acked, then
    the error and the close come (the decoder hands over what it completed)."""
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    corrupt = bytearray(_core.encode_frame(F.SUB, pack_sub(F.SUB, 2, "control")))
    corrupt[5] ^= 0x01
    bad.write(
        _core.encode_frame(F.PUB, pack_sub(F.PUB, 1, "control", b'"before the garbage"'))
        + bytes(corrupt)
    )
    ftype, _payload = await bad.recv()
    assert ftype == F.PUBACK
    code, _, close_code, _ = await bad.expect_error_and_goaway()
    assert (code, close_code) == (ErrorCode.BAD_CHECKSUM, CloseCode.PROTOCOL_ERROR)
    assert (await control.tcp.msg())[2] == b'"before the garbage"'
    await control.ws.msg()
    control.n += 1
    await still_serving(node, control, errors=1)


# --------------------------------------------------------------------------- WebSocket JSON


async def ws_error_then_close(bad: WsClient) -> tuple[dict[str, object], int, str]:
    """The error message, then the close frame; we answer the close like a good client."""
    code, reason, before = await bad.recv_close()
    assert len(before) == 1, f"expected exactly one error message before the close, got {before}"
    op, payload = before[0]
    assert op == _core.OP_TEXT
    err = orjson.loads(payload)
    assert err["op"] == "error"
    bad.send_close(code)
    await bad.wait_eof()  # the server drops TCP after the close handshake
    return err, code, reason


@pytest.mark.parametrize(
    "text", ["{not json", "", "[1, 2", '{"op": "sub", "ch": "a"} extra', '"just a string"', "42"]
)
async def test_ws_invalid_json(node: Node, control: Control, text: str) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    bad.send_text(text)
    err, code, _ = await ws_error_then_close(bad)
    assert err["code"] == ErrorCode.BAD_REQUEST
    assert "JSON" in str(err["reason"])
    assert code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("op", ["subscribe", "PUB", "", 7, None])
async def test_ws_unknown_op(node: Node, control: Control, op: object) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    bad.send_json({"op": op, "ch": "control", "id": 3})
    err, code, _ = await ws_error_then_close(bad)
    if op is None:  # "op": null is the same as a missing op
        assert err["code"] == ErrorCode.BAD_REQUEST and '"op"' in str(err["reason"])
    else:
        assert err["code"] == ErrorCode.UNKNOWN_OP
        assert repr(op) in str(err["reason"])
    assert code == CloseCode.BAD_REQUEST
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize(
    ("cmd", "field"),
    [
        ({"ch": "control"}, "op"),
        ({"op": "sub"}, "ch"),
        ({"op": "unsub", "id": 1}, "ch"),
        ({"op": "pub", "ch": "control"}, "data"),
        ({"op": "pub", "data": 1}, "ch"),
        ({"op": "sub", "ch": 5}, "ch"),
        ({"op": "sub", "ch": "x", "id": [1]}, "id"),
        ({"op": "sub", "ch": "x", "id": 1.5}, "id"),
    ],
)
async def test_ws_missing_or_mistyped_field(
    node: Node, control: Control, cmd: dict[str, object], field: str
) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    bad.send_json(cmd)
    err, code, _ = await ws_error_then_close(bad)
    assert err["code"] == ErrorCode.BAD_REQUEST
    assert f'"{field}"' in str(err["reason"]), (
        f"the reason does not name {field!r}: {err['reason']!r}"
    )
    assert code == CloseCode.BAD_REQUEST
    assert node.hub.channels["control"].offset == control.n
    await still_serving(node, control, errors=1)


async def test_ws_invalid_utf8_text(node: Node, control: Control) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    bad.send_frame(_core.OP_TEXT, b'{"op":"pub","ch":"control","data":"\xc3\x28"}')
    code, _reason, before = await bad.recv_close()
    assert code == CloseCode.INVALID_DATA
    assert before == []  # framing-level violation: the close code says it all
    await bad.wait_eof()  # parser is dead: the server drops TCP at once
    assert node.hub.channels["control"].offset == control.n
    await still_serving(node, control, errors=1)


async def test_ws_invalid_utf8_split_across_fragments(node: Node, control: Control) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send_frame(_core.OP_TEXT, b'{"op":"ping","x":"\xe2\x82', fin=False)
    bad.send_frame(_core.OP_CONT, b'\x28"}', fin=True)  # \xe2\x82\x28: broken sequence
    code, _, before = await bad.recv_close()
    assert code == CloseCode.INVALID_DATA and before == []
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


def json_error_103(before: list[tuple[int, bytes]]) -> bool:
    """What came before a 1009 close: exactly the JSON error 103 naming max_message."""
    assert len(before) == 1 and before[0][0] == _core.OP_TEXT, before
    err = orjson.loads(before[0][1])
    assert err["op"] == "error" and err["code"] == ErrorCode.FRAME_TOO_LARGE, err
    assert "maximum of" in err["reason"], err
    return True


async def test_ws_message_over_max_message_gets_error_103_then_1009(node_factory: Any) -> None:
    """docs/configuration.md: a WebSocket message over max_message closes the connection
    with error 103 then close 1009, as a frame over max_frame does over TCP: the error in
    the connection's format (JSON for text clients, an ERROR frame for fastim.binary)."""
    node = await node_factory(max_message=1024)
    control = await Control(node).start()
    too_big = b'{"op":"pub","ch":"big","data":"' + b"x" * 1100 + b'"}'
    # a text client (the first message fixes JSON mode; here it is the oversize one)
    for first in (b"", b'{"op":"ping","id":1}'):
        ws = await WsClient.connect(node.ws_port)
        if first:
            ws.send_text(first)
            assert await ws.recv_json() == {"op": "pong", "id": 1}
        ws.send_text(too_big)
        code, _reason, before = await ws.recv_close()
        assert code == CloseCode.MESSAGE_TOO_BIG
        assert json_error_103(before)
        await ws.wait_eof()
    # a binary client: the error is a fastim ERROR frame in a binary message
    ws = await WsClient.connect(node.ws_port, protocols="fastim.binary")
    assert ws.protocol == "fastim.binary"
    ws.send_frame(_core.OP_BINARY, b"\x00" * 1100)
    code, _reason, before = await ws.recv_close()
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert len(before) == 1 and before[0][0] == _core.OP_BINARY
    frames = _core.FrameDecoder(1 << 20).feed(before[0][1])
    assert [t for t, _ in frames] == [F.ERROR]
    assert unpack_error(frames[0][1])[1] == ErrorCode.FRAME_TOO_LARGE
    await ws.wait_eof()
    assert node.hub.published == 0
    await still_serving(node, control, errors=3)
    await control.close()


async def test_ws_oversize_message(node: Node, control: Control) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    # a header announcing max_message + 1 bytes: refused from the header alone
    n = node.config.max_message + 1
    bad.writer.write(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", n) + b"\x00\x00\x00\x00")
    code, _, before = await bad.recv_close()
    assert code == CloseCode.MESSAGE_TOO_BIG and json_error_103(before)
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


async def test_ws_oversize_message_in_fragments(node_factory) -> None:
    node = await node_factory(max_message=4096)
    control = await Control(node).start()
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    for _ in range(5):  # 5 × 1000 bytes, each fragment fine, the message is not
        bad.send_frame(_core.OP_TEXT if _ == 0 else _core.OP_CONT, b"x" * 1000, fin=False)
    code, _, _ = await bad.recv_close()
    assert code == CloseCode.MESSAGE_TOO_BIG
    await bad.wait_eof()
    await still_serving(node, control, errors=1)
    await control.close()


async def test_ws_message_size_limit_is_exact(node_factory: Any) -> None:
    node = await node_factory(max_message=1024)
    control = await Control(node).start()
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    ping = b'{"op":"ping","id":1}'
    bad.send_text(ping + b" " * (1024 - len(ping)))  # exactly max_message: fine
    assert await bad.recv_json() == {"op": "pong", "id": 1}
    bad.send_text(ping + b" " * (1025 - len(ping)))
    code, _, before = await bad.recv_close()
    assert code == CloseCode.MESSAGE_TOO_BIG and json_error_103(before)
    await bad.wait_eof()
    await still_serving(node, control, errors=1)
    await control.close()


async def test_ws_unmasked_client_frame(node: Node, control: Control) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()
    bad.writer.write(_core.ws_encode(_core.OP_TEXT, b'{"op":"ping"}'))  # mask=None
    code, reason, before = await bad.recv_close()
    assert code == CloseCode.PROTOCOL_ERROR and before == []
    assert "mask" in reason
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize(
    "frame",
    [
        bytes((0x83, 0x80)) + b"\0\0\0\0",  # reserved opcode 3
        bytes((0xC1, 0x80)) + b"\0\0\0\0",  # RSV1 without an extension
        bytes((0x80, 0x80)) + b"\0\0\0\0",  # continuation with nothing started
        bytes((0x09, 0x80)) + b"\0\0\0\0",  # fragmented ping
    ],
)
async def test_ws_framing_violations(node: Node, control: Control, frame: bytes) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    bad.writer.write(frame)
    code, _, before = await bad.recv_close()
    assert code == CloseCode.PROTOCOL_ERROR and before == []
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


@pytest.mark.parametrize("payload", [b"\x03", b"\x03\xed", b"\x00\x00", b"\x03\xe8\xff\xfe"])
async def test_ws_bad_close_frame(node: Node, control: Control, payload: bytes) -> None:
    """1-byte close payload, a code peers may not send (1005, 0), a reason not UTF-8."""
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    bad.send_frame(_core.OP_CLOSE, payload)
    code, _, before = await bad.recv_close()
    assert code == (CloseCode.INVALID_DATA if len(payload) > 2 else CloseCode.PROTOCOL_ERROR)
    assert before == []
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


async def test_ws_complete_message_before_a_violation_is_handled(
    node: Node, control: Control
) -> None:
    """What arrived whole before broken framing is still executed, then the close comes."""
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    good = _core.ws_encode(
        _core.OP_TEXT, b'{"op":"pub","ch":"control","data":"last","id":1}', mask=b"abcd"
    )
    bad.writer.write(good + bytes((0x83, 0x80)) + b"\0\0\0\0")  # then a reserved opcode
    code, _, before = await bad.recv_close()
    assert code == CloseCode.PROTOCOL_ERROR
    replies = [orjson.loads(p) for _op, p in before]
    assert replies == [{"op": "puback", "ch": "control", "off": control.n + 1, "id": 1}]
    await bad.wait_eof()
    m = await control.ws.msg()
    assert m["data"] == "last"
    assert (await control.tcp.msg())[0] == control.n + 1
    control.n += 1
    await still_serving(node, control, errors=1)


async def test_ws_binary_message_with_partial_frame(node: Node, control: Control) -> None:
    bad = await WsClient.connect(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    frame = _core.encode_frame(F.SUB, pack_sub(F.SUB, 1, "control"))
    bad.send_binary(frame[:-3])
    code, _, before = await bad.recv_close()
    assert len(before) == 1
    _op, payload = before[0]
    frames = _core.FrameDecoder().feed(payload)
    assert frames[0][0] == F.ERROR
    assert unpack_error(frames[0][1])[1] == ErrorCode.BAD_FRAMING
    assert code == CloseCode.PROTOCOL_ERROR
    bad.send_close(code)
    await bad.wait_eof()
    await still_serving(node, control, errors=1)


# --------------------------------------------------------------------------- HTTP


async def test_http_get_ws_without_upgrade(node: Node, control: Control) -> None:
    status, headers, body = await http_exchange(
        node.ws_port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", during=control.roundtrip
    )
    assert status == 426
    assert headers.get("upgrade", "").lower() == "websocket"
    assert b"websocket" in body.lower()
    assert node.http_rejects == 1
    await still_serving(node, control, errors=0)


async def test_http_get_unknown_path(node: Node, control: Control) -> None:
    status, _h, body = await http_exchange(
        node.ws_port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", during=control.roundtrip
    )
    assert status == 404 and b"/nope" in body
    # a valid upgrade to an unknown path is a 404 too
    req, _ = upgrade_request(node.ws_port, "/nope")
    status, _h, _b = await http_exchange(node.ws_port, req, during=control.roundtrip)
    assert status == 404
    assert node.http_rejects == 2
    await still_serving(node, control)


async def test_http_health(node: Node, control: Control) -> None:
    status, _h, body = await http_exchange(
        node.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", during=control.roundtrip
    )
    assert (status, body) == (200, b"ok\n")
    await still_serving(node, control)


@pytest.mark.parametrize("version", [b"8", b"12", b"", b"13, 8"])
async def test_http_bad_websocket_version(node: Node, control: Control, version: bytes) -> None:
    req, _ = upgrade_request(node.ws_port, version=version)
    status, headers, body = await http_exchange(node.ws_port, req, during=control.roundtrip)
    assert status == 426
    assert headers.get("sec-websocket-version") == "13"
    assert b"Sec-WebSocket-Version" in body
    await still_serving(node, control)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost x\r\n\r\n",  # header without a colon
        b"GET /ws HTTP/9.9\r\nHost: x\r\n\r\n",
        b"G\xffT /ws HTTP/1.1\r\n\r\n",
    ],
)
async def test_http_malformed(node: Node, control: Control, request_bytes: bytes) -> None:
    status, _h, body = await http_exchange(node.ws_port, request_bytes, during=control.roundtrip)
    assert status == 400
    assert b"malformed" in body.lower() or b"bad" in body.lower() or b"invalid" in body.lower()
    await still_serving(node, control)


@pytest.mark.parametrize(
    ("key", "word"),
    [(b"", b"Key"), (b"not base64!", b"Key"), (b"c2hvcnQ=", b"Key")],  # "short": 5 bytes
)
async def test_http_bad_websocket_key(
    node: Node, control: Control, key: bytes, word: bytes
) -> None:
    req, _ = upgrade_request(node.ws_port, key=key)
    status, _h, body = await http_exchange(node.ws_port, req, during=control.roundtrip)
    assert status == 400 and word in body
    await still_serving(node, control)


async def test_http_upgrade_with_wrong_method(node: Node, control: Control) -> None:
    req, _ = upgrade_request(node.ws_port)
    status, headers, _ = await http_exchange(
        node.ws_port, b"POST" + req[3:], during=control.roundtrip
    )
    assert status == 405 and headers.get("allow") == "GET"
    await still_serving(node, control)


async def test_http_too_many_headers(node: Node, control: Control) -> None:
    req, _ = upgrade_request(node.ws_port, extra=b"".join(b"X-H%d: v\r\n" % i for i in range(70)))
    status, _h, _b = await http_exchange(node.ws_port, req, during=control.roundtrip)
    assert status == 431
    await still_serving(node, control)


async def test_http_endless_head(node: Node, control: Control) -> None:
    reader, writer = await open_tcp(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    writer.write(b"GET /ws HTTP/1.1\r\n")
    for _ in range(40):
        writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    status, _h, _ = await read_http_response(reader)
    assert status == 431
    # the server closes; with our unread filler in its buffer, that may be a reset
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
        assert len(rest) < 200  # the rest of the 431 body, then EOF
    except ConnectionResetError:
        pass
    writer.close()
    await still_serving(node, control)


# --------------------------------------------------------------------------- floods and timeouts


async def test_connection_flood(node_factory) -> None:
    """300 connections at once, half of them sending garbage, half nothing at all."""
    node = await node_factory(handshake_timeout=1.0)
    control = await Control(node).start()
    n = 300

    async def one(i: int) -> tuple[str, bytes]:
        port = node.tcp_port if i % 2 else node.ws_port
        try:
            reader, writer = await open_tcp(port)
        except (OSError, asyncio.TimeoutError) as e:
            return "connect failed", repr(e).encode()
        try:
            if i % 4 < 2:
                writer.write(os.urandom(32) + b"\r\n\r\n")
            # both kinds must be answered and closed by the server (garbage at once,
            # the silent ones at handshake_timeout)
            data = await asyncio.wait_for(reader.read(), 10)
            return ("tcp" if port == node.tcp_port else "ws"), data
        except (ConnectionResetError, BrokenPipeError) as e:
            return "reset", repr(e).encode()
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    async with deadline(20):
        await asyncio.sleep(0.05)
        await control.roundtrip()  # during the flood
        results = await asyncio.gather(*tasks)
    bad = [r for r in results if r[0] not in ("tcp", "ws")]
    assert not bad, bad[:5]
    for kind, data in results:
        assert data, f"a {kind} connection was closed without an answer"
        if kind == "ws":
            assert data.startswith(b"HTTP/1.1 400 "), data[:80]
        else:
            t = _core.FrameDecoder().feed(data)
            assert [f[0] for f in t] == [F.ERROR, F.GOAWAY], t
            assert unpack_goaway(t[1][1])[0] in (1002, 1008, 1009, 4500)
    await still_serving(node, control)
    assert node.protocol_errors + node.http_rejects >= n
    await control.close()


async def test_tcp_handshake_timeout(node_factory) -> None:
    node = await node_factory(handshake_timeout=0.5)
    control = await Control(node).start()
    loop = asyncio.get_running_loop()
    silent = await TcpClient.connect(node.tcp_port, hello=False)
    t0 = loop.time()
    await control.roundtrip()
    code, reason, close_code, _ = await silent.expect_error_and_goaway(timeout=5)
    elapsed = loop.time() - t0
    assert code == ErrorCode.HANDSHAKE_REQUIRED and "HELLO" in reason
    assert close_code == CloseCode.POLICY_VIOLATION
    assert 0.4 <= elapsed < 2.0, elapsed
    await still_serving(node, control, errors=1)
    # the control clients, past their handshake long ago, are not affected
    await asyncio.sleep(0.6)
    await control.roundtrip()
    await control.close()


async def test_ws_handshake_timeout(node_factory) -> None:
    node = await node_factory(handshake_timeout=0.5)
    control = await Control(node).start()
    loop = asyncio.get_running_loop()
    reader, writer = await open_tcp(node.ws_port)
    await control.roundtrip()  # while the bad connection is open
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # an unfinished head
    t0 = loop.time()
    status, headers, _ = await read_http_response(reader, timeout=5)
    assert status == 400
    body = await asyncio.wait_for(reader.read(), 5)  # then EOF: the server closed
    assert len(body) == int(headers["content-length"]) and b"upgrade" in body
    assert 0.4 <= loop.time() - t0 < 2.0
    writer.close()
    await still_serving(node, control)
    await control.close()


async def test_tcp_client_closing_mid_frame(node: Node, control: Control) -> None:
    bad = await TcpClient.connect(node.tcp_port)
    await control.roundtrip()  # while the bad connection is open
    frame = _core.encode_frame(F.PUB, pack_sub(F.PUB, 1, "control", b'"half"'))
    bad.write(frame[: len(frame) // 2])
    await bad.writer.drain()
    await wait_until(lambda: node.bytes_in > 0)
    bad.writer.transport.abort()
    await still_serving(node, control, errors=0)
    assert node.hub.channels["control"].offset == control.n


async def test_control_sees_nothing_of_a_bad_clients_close(node: Node, control: Control) -> None:
    """A violation on one connection sends nothing to the others."""
    bad = await TcpClient.connect(node.tcp_port)
    await bad.sub("control")
    bad.send(0x7E, b"")
    await bad.expect_error_and_goaway()
    await control.roundtrip()
    assert not control.tcp.frames and not control.ws.events
    with pytest.raises((asyncio.TimeoutError, Closed)):
        await control.tcp.recv(0.1)


async def test_ws_oversize_message_after_a_durable_publish(node_factory: Any) -> None:
    """The error 103 of an oversize message comes after the answer to a publish that
    came before it and waited for the store (sqlite), then close 1009."""
    node = await node_factory(store="sqlite", max_message=1024)
    ws = await WsClient.connect(node.ws_port)
    async with deadline(10):
        assert await ws.request({"op": "ping"}, "pong")
        pub = _core.ws_encode(
            _core.OP_TEXT, b'{"op":"pub","ch":"d","data":1,"id":7}', mask=os.urandom(4)
        )
        big = _core.ws_encode(_core.OP_TEXT, b" " * 1100, mask=os.urandom(4))
        ws.writer.write(pub + big)  # one write: read and parsed together
        code, _reason, before = await ws.recv_close()
        assert code == CloseCode.MESSAGE_TOO_BIG
        replies = [orjson.loads(p) for op, p in before]
        assert [r["op"] for r in replies] == ["puback", "error"], replies
        assert replies[0]["id"] == 7 and replies[1]["code"] == ErrorCode.FRAME_TOO_LARGE
        await ws.wait_eof()
