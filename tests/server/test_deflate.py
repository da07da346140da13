"""permessage-deflate (RFC 7692) end to end, on real sockets against a node.

Negotiation (what is accepted, declined, and the exact response), compressed messages
in both directions, subscribers with and without compression on one channel, one
compression per message for all of them, and the failures: zip bomb (1009), bad DEFLATE
data or bad UTF-8 inside it (1007), RSV1 where it may not be (1002). The `websockets`
library, with its default permessage-deflate, interoperates in both roles.
"""

from __future__ import annotations

import json
import os
import tracemalloc
import zlib
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.extensions.permessage_deflate import PerMessageDeflate

from fastim import _core
from fastim.node import Node
from fastim.protocol import FrameType, unpack_msg
from fastim.transport.handshake import (
    CLIENT_DEFLATE_OFFER,
    deflate_response_ok,
    negotiate_deflate,
    parse_extensions,
)

from ._support import (
    TcpClient,
    WsClient,
    deadline,
    open_tcp,
    read_http_response,
    upgrade_request,
    wait_for_sessions,
)

T = 5.0
ACCEPT = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
OP_TEXT_Z = _core.OP_TEXT | _core.OP_COMPRESSED
OP_BINARY_Z = _core.OP_BINARY | _core.OP_COMPRESSED


def deflate(data: bytes, level: int = 6) -> bytes:
    """One message as a client without context takeover compresses it (RFC 7692 §7.2.1)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def big_doc(i: int = 0) -> dict[str, Any]:
    """A JSON document well over ws_compression_min_size, that compresses well."""
    return {"i": i, "items": [{"name": f"item-{k}", "price": k * 3, "tags": ["a", "b"]}
                              for k in range(20)]}  # fmt: skip


class DeflateClient(WsClient):
    """WsClient that offers extensions; inflates compressed messages it receives."""

    extensions: str | None = None
    compressed_received = 0

    @classmethod
    async def open(
        cls,
        port: int,
        offer: str | None = CLIENT_DEFLATE_OFFER.decode(),
        path: str = "/ws",
        protocols: str | None = None,
        extra: bytes = b"",
    ) -> DeflateClient:
        reader, writer = await open_tcp(port)
        if offer is not None:
            extra = b"Sec-WebSocket-Extensions: " + offer.encode() + b"\r\n" + extra
        req, _key = upgrade_request(port, path, protocols=protocols, extra=extra)
        writer.write(req)
        status, headers, _ = await read_http_response(reader)
        assert status == 101, (status, headers)
        c = cls(reader, writer)
        c.protocol = headers.get("sec-websocket-protocol")
        c.extensions = headers.get("sec-websocket-extensions")
        c.parser = _core.WSParser(1 << 30, client=True, deflate=c.extensions is not None)
        return c

    async def recv_event(self, timeout: float = T) -> tuple[int, bytes]:
        op, payload = await super().recv_event(timeout)
        if op & _core.OP_COMPRESSED:
            self.compressed_received += 1
            op &= 0x0F
            payload = _core.ws_inflate(payload, 1 << 30, op == _core.OP_TEXT)
        return op, payload

    async def recv_raw(self, timeout: float = T) -> tuple[int, bytes]:
        """The next data message as received: compressed ones keep OP_COMPRESSED."""
        return await WsClient.recv_event(self, timeout)

    def send_compressed(self, opcode: int, data: bytes, frag: int = 0) -> None:
        """One compressed message (RSV1 on its first frame), split into ``frag``-byte frames."""
        z = deflate(data)
        pieces = [z[i : i + frag] for i in range(0, len(z), frag)] if frag else [z]
        pieces = pieces or [b""]
        out = b""
        for i, p in enumerate(pieces):
            out += _core.ws_encode(
                opcode if i == 0 else _core.OP_CONT,
                p,
                fin=i == len(pieces) - 1,
                mask=os.urandom(4),
                rsv1=i == 0,
            )
        self.writer.write(out)


async def upgrade_response(node: Node, extra: bytes) -> dict[str, str]:
    reader, writer = await open_tcp(node.ws_port)
    try:
        req, _ = upgrade_request(node.ws_port, extra=extra)
        writer.write(req)
        status, headers, _ = await read_http_response(reader)
        assert status == 101
        return headers
    finally:
        writer.close()


# ------------------------------------------------------------------ negotiation

W = "permessage-deflate"
MATRIX: list[tuple[str, str | None]] = [
    (W, ACCEPT),
    (f"{W}; client_max_window_bits", ACCEPT),
    (f"{W}; client_max_window_bits=10", ACCEPT),
    (f"{W}; client_no_context_takeover; server_no_context_takeover", ACCEPT),
    (f"{W}; server_max_window_bits=15", ACCEPT + "; server_max_window_bits=15"),
    (f"{W}; server_max_window_bits=9", ACCEPT + "; server_max_window_bits=9"),
    (f'{W}; server_max_window_bits="12"', ACCEPT + "; server_max_window_bits=12"),
    (f"{W} ;server_max_window_bits = 11 ", ACCEPT + "; server_max_window_bits=11"),
    ("Permessage-Deflate; Client_Max_Window_Bits", ACCEPT),
    # declined: invalid values, duplicates, unknown parameters (RFC 7692 §7.1)
    (f"{W}; server_max_window_bits", None),
    (f"{W}; server_max_window_bits=16", None),
    (f"{W}; server_max_window_bits=7", None),
    (f"{W}; server_max_window_bits=015", None),
    (f"{W}; client_max_window_bits=20", None),
    (f'{W}; client_max_window_bits="1 0"', None),
    (f"{W}; server_no_context_takeover=1", None),
    (f"{W}; client_no_context_takeover; client_no_context_takeover", None),
    (f"{W}; client_max_window_bits; client_max_window_bits=9", None),
    (f"{W}; mystery", None),
    (f"{W};", None),
    ("x-webkit-deflate-frame", None),
    (f'{W}; x="unterminated', None),
    # several offers: the first acceptable one wins
    (f"{W}; mystery, {W}; client_max_window_bits", ACCEPT),
    (f"{W}; server_max_window_bits=8, {W}", ACCEPT + "; server_max_window_bits=8"),
    (f'x-foo; a="b, c; d", {W}; server_max_window_bits=10', ACCEPT + "; server_max_window_bits=10"),
    (f", ,{W} ,", ACCEPT),
]


@pytest.mark.parametrize(("offer", "response"), MATRIX)
async def test_negotiation_matrix(node: Node, offer: str, response: str | None) -> None:
    headers = await upgrade_response(node, b"Sec-WebSocket-Extensions: " + offer.encode() + b"\r\n")
    assert headers.get("sec-websocket-extensions") == response
    # the same decision, without the socket
    params = negotiate_deflate(offer.encode())
    assert (params.response.decode() if params else None) == response


async def test_offers_split_over_several_headers(node: Node) -> None:
    extra = b"Sec-WebSocket-Extensions: x-foo\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
    assert (await upgrade_response(node, extra)).get("sec-websocket-extensions") == ACCEPT


async def test_no_offer_no_extension(node: Node) -> None:
    assert "sec-websocket-extensions" not in await upgrade_response(node, b"")


async def test_compression_can_be_turned_off(node_factory: Any) -> None:
    node = await node_factory(ws_compression=0)
    headers = await upgrade_response(node, b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert "sec-websocket-extensions" not in headers
    c = await DeflateClient.open(node.ws_port)
    assert c.extensions is None
    c.send_compressed(_core.OP_TEXT, b'{"op":"ping"}')  # RSV1 was not negotiated
    code, _reason, _ = await c.recv_close()
    assert code == 1002


def test_parse_extensions() -> None:
    assert parse_extensions(b'a; b=1; c="x\\"y", d') == [
        (b"a", [(b"b", b"1"), (b"c", b'x"y')]),
        (b"d", []),
    ]
    assert parse_extensions(b"a; =1, b") == [None, (b"b", [])]
    assert parse_extensions(b"a b") == [None]
    assert parse_extensions(b"a\x01") == []
    assert parse_extensions(b"") == []


def test_client_side_response_check() -> None:
    assert deflate_response_ok(ACCEPT.encode())
    assert deflate_response_ok(b"permessage-deflate; server_max_window_bits=10")
    assert not deflate_response_ok(b"permessage-deflate; server_max_window_bits=99")
    assert not deflate_response_ok(b"permessage-deflate, x-foo")
    assert not deflate_response_ok(b"x-foo")
    assert negotiate_deflate(CLIENT_DEFLATE_OFFER) is not None


# ------------------------------------------------------------------ messages


async def test_mixed_subscribers_get_the_right_payload(node: Node) -> None:
    """TCP, WS binary, WS JSON, each with and without deflate, on one channel."""
    async with deadline(20):
        plain_json = await DeflateClient.open(node.ws_port, offer=None)
        z_json = [await DeflateClient.open(node.ws_port) for _ in range(3)]
        plain_bin = await DeflateClient.open(node.ws_port, offer=None, protocols="fastim.binary")
        z_bin = await DeflateClient.open(node.ws_port, protocols="fastim.binary")
        small_window = await DeflateClient.open(
            node.ws_port, offer="permessage-deflate; server_max_window_bits=10"
        )
        tcp = await TcpClient.connect(node.tcp_port)
        for c in (plain_json, *z_json, small_window):
            await c.sub("mix")
        for c in (plain_bin, z_bin):
            c.send_frame(_core.OP_BINARY, _core.encode_frame(FrameType.HELLO, b"\x01\x01{}"))
            c.send_frame(_core.OP_BINARY, _core.encode_frame(FrameType.SUB, b"\0\0\0\1\3mix"))
            assert (await c.recv_frame())[0] == FrameType.WELCOME
            assert (await c.recv_frame())[0] == FrameType.SUBSCRIBED
        await tcp.sub("mix")
        subs = node.hub.channels["mix"].subs
        assert [subs.count(f) for f in range(_core.N_FORMATS)] == [1, 1, 2, 1, 3, 0]

        before = node.hub.deflater.messages
        docs = [big_doc(i) for i in range(5)] + [{"small": True}]
        for d in docs:
            await tcp.pub("mix", orjson.dumps(d))
        # two formats with deflate subscribers, five big messages: ten compressions
        assert node.hub.deflater.messages - before == 10

        for i, d in enumerate(docs, 1):
            for c in (plain_json, *z_json, small_window):
                assert await c.msg() == {"op": "msg", "ch": "mix", "off": i, "data": d}
            for c in (plain_bin, z_bin):
                ftype, payload = await c.recv_frame()
                assert ftype == FrameType.MSG and unpack_msg(payload) == (i, "mix", orjson.dumps(d))
            off, _ch, data = await tcp.msg()
            assert (off, orjson.loads(data)) == (i, d)
        # big messages came compressed to the deflate subscribers, the small one did not;
        # the connection that asked for a 2^10 window got them all uncompressed
        assert [c.compressed_received for c in z_json] == [5, 5, 5]
        assert z_bin.compressed_received == 5
        assert plain_json.compressed_received == small_window.compressed_received == 0
        for c in (plain_json, *z_json, plain_bin, z_bin, small_window):
            await c.close()
        await tcp.close()
    await wait_for_sessions(node, 0)


async def test_one_compressed_frame_is_shared_byte_for_byte(node: Node) -> None:
    async with deadline(15):
        clients = [await DeflateClient.open(node.ws_port) for _ in range(4)]
        for c in clients:
            await c.sub("same")
        pub = await TcpClient.connect(node.tcp_port)
        await pub.pub("same", orjson.dumps(big_doc()))
        raws = [await c.recv_raw() for c in clients]
        assert raws[0][0] == OP_TEXT_Z
        assert all(r == raws[0] for r in raws)  # the very same compressed bytes
        assert len(raws[0][1]) < len(orjson.dumps(big_doc())) // 2
        for c in clients:
            await c.close()
        await pub.close()


@pytest.mark.parametrize("frag", [0, 7])
async def test_compressed_publish_from_a_client(node: Node, frag: int) -> None:
    async with deadline(15):
        pub = await DeflateClient.open(node.ws_port)
        plain = await DeflateClient.open(node.ws_port, offer=None)
        zsub = await DeflateClient.open(node.ws_port)
        await plain.sub("up")
        await zsub.sub("up")
        doc = big_doc(7)
        cmd = orjson.dumps({"op": "pub", "ch": "up", "data": doc, "id": 5})
        pub.send_compressed(_core.OP_TEXT, cmd, frag)
        assert await pub.recv_json() == {"op": "puback", "ch": "up", "off": 1, "id": 5}
        for c in (plain, zsub):
            assert await c.msg() == {"op": "msg", "ch": "up", "off": 1, "data": doc}
        # a compressed binary message carries fastim frames just the same
        zbin = await DeflateClient.open(node.ws_port, protocols="fastim.binary")
        frames = _core.encode_frame(FrameType.PUB, b"\0\0\0\x09\2up" + orjson.dumps(doc))
        zbin.send_compressed(_core.OP_BINARY, frames, frag)
        assert (await zbin.recv_frame())[0] == FrameType.PUBACK
        for c in (plain, zsub):
            assert (await c.msg())["off"] == 2
        for c in (pub, plain, zsub, zbin):
            await c.close()


async def test_replies_stay_uncompressed(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port)
    c.send_json({"op": "sub", "ch": "r" * 200, "id": "x" * 300})  # a long reply
    op, payload = await c.recv_raw()
    assert op == _core.OP_TEXT
    assert orjson.loads(payload)["op"] == "subscribed"
    await c.close()


async def test_echo_endpoint_echoes_compressed(node_factory: Any) -> None:
    node = await node_factory(ws_echo_path="/echo")
    c = await DeflateClient.open(node.ws_port, path="/echo")
    text = ("ünïcödé " * 200).encode()
    c.send_compressed(_core.OP_TEXT, text, frag=100)
    op, payload = await c.recv_raw()
    assert op == OP_TEXT_Z
    assert _core.ws_inflate(payload, 1 << 20, text=True) == text
    c.send_compressed(_core.OP_BINARY, b"\x00\xff" * 1000)
    assert await c.recv_event() == (_core.OP_BINARY, b"\x00\xff" * 1000)
    c.send_compressed(_core.OP_TEXT, b"short")  # under ws_compression_min_size
    assert await c.recv_raw() == (_core.OP_TEXT, b"short")
    await c.close()


# ------------------------------------------------------------------ failures


async def expect_close(c: DeflateClient, code: int) -> None:
    got, _reason, _before = await c.recv_close()
    assert got == code
    await c.wait_eof()


async def test_zip_bomb_closes_1009_without_the_memory(node_factory: Any) -> None:
    node = await node_factory(max_message=1 << 20)
    c = await DeflateClient.open(node.ws_port)
    await c.sub("z")
    bomb = orjson.dumps({"op": "pub", "ch": "z", "data": "0" * (256 << 20)})  # 256 MiB
    z = deflate(bomb, 9)
    assert len(z) < 1 << 20  # under max_message on the wire
    del bomb
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        c.writer.write(_core.ws_encode(_core.OP_TEXT, z, mask=os.urandom(4), rsv1=True))
        await expect_close(c, 1009)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"inflating the bomb took {peak >> 20} MiB"
    ch = node.hub.channels.get("z")
    assert ch is None or ch.offset == 0  # nothing was published


async def test_invalid_deflate_data_closes_1007(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port)
    c.writer.write(
        _core.ws_encode(_core.OP_TEXT, b"\xff\xff\xff\xff", mask=os.urandom(4), rsv1=True)
    )
    await expect_close(c, 1007)


async def test_invalid_utf8_inside_compressed_text_closes_1007(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port)
    c.send_compressed(_core.OP_TEXT, b'{"op":"ping","x":"\xc3\x28"}')
    await expect_close(c, 1007)


@pytest.mark.parametrize("opcode", [_core.OP_PING, _core.OP_PONG, _core.OP_CLOSE])
async def test_rsv1_on_a_control_frame_closes_1002(node: Node, opcode: int) -> None:
    c = await DeflateClient.open(node.ws_port)
    c.writer.write(_core.ws_encode(opcode, b"\x03\xe8", mask=os.urandom(4), rsv1=True))
    await expect_close(c, 1002)


async def test_rsv1_on_a_continuation_frame_closes_1002(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port)
    z = deflate(b'{"op":"ping"}')
    c.writer.write(
        _core.ws_encode(_core.OP_TEXT, z[:3], fin=False, mask=os.urandom(4), rsv1=True)
        + _core.ws_encode(_core.OP_CONT, z[3:], mask=os.urandom(4), rsv1=True)
    )
    await expect_close(c, 1002)


async def test_rsv1_without_negotiation_closes_1002(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port, offer=None)
    assert c.extensions is None
    c.send_compressed(_core.OP_TEXT, b'{"op":"ping"}')
    await expect_close(c, 1002)


async def test_messages_before_a_bad_compressed_one_are_handled(node: Node) -> None:
    c = await DeflateClient.open(node.ws_port)
    good = _core.ws_encode(_core.OP_TEXT, deflate(b'{"op":"ping","id":1}'), mask=b"abcd", rsv1=True)
    bad = _core.ws_encode(_core.OP_TEXT, b"\x07\x00\x00", mask=b"abcd", rsv1=True)
    c.writer.write(good + bad)
    assert await c.recv_json() == {"op": "pong", "id": 1}
    await expect_close(c, 1007)


# ------------------------------------------------------------------ a third-party peer


async def test_websockets_client_with_its_default_compression(node: Node) -> None:
    async with deadline(20), ws_connect(f"ws://127.0.0.1:{node.ws_port}/ws") as ws:
        [ext] = ws.protocol.extensions
        assert isinstance(ext, PerMessageDeflate)
        assert ext.remote_no_context_takeover and ext.local_no_context_takeover
        await ws.send(json.dumps({"op": "sub", "ch": "tp", "id": 1}))
        reply = json.loads(await ws.recv())
        assert reply.pop("epoch") and reply.pop("recovered") is False
        assert reply == {"op": "subscribed", "ch": "tp", "off": 0, "id": 1}
        before = node.hub.deflater.messages
        docs = [big_doc(i) for i in range(20)]
        for d in docs:  # websockets compresses these: the node inflates them
            await ws.send(json.dumps({"op": "pub", "ch": "tp", "data": d}))
        got = [json.loads(await ws.recv()) for _ in range(40)]
        msgs = [g for g in got if g["op"] == "msg"]
        assert [m["data"] for m in msgs] == docs
        assert node.hub.deflater.messages - before == 20  # and it inflated ours
        await ws.send("x" * 10)  # not JSON: error, then close 4500, all uncompressed
        assert json.loads(await ws.recv())["op"] == "error"
    await wait_for_sessions(node, 0)


async def test_core_client_mode_against_a_websockets_server() -> None:
    """Client side: offer, check the answer, send compressed, inflate what comes back."""
    received: list[str | bytes] = []

    async def echo(conn: ServerConnection) -> None:
        async for message in conn:
            received.append(message)
            await conn.send(message)

    async with deadline(20), serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        c = await DeflateClient.open(port, path="/")
        assert c.extensions is not None and deflate_response_ok(c.extensions.encode())
        text = ("bonjour le monde " * 100).encode()
        c.send_compressed(_core.OP_TEXT, text, frag=50)
        op, payload = await c.recv_raw()
        assert op == OP_TEXT_Z  # websockets compressed its answer
        assert _core.ws_inflate(payload, 1 << 20, text=True) == text
        assert received == [text.decode()]
        c.send_close(1000)
        assert (await c.recv_close())[0] == 1000
        await c.close()
