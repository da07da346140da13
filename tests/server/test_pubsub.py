"""Publish/subscribe end to end over real loopback sockets: fan-out, offsets, formats, ids."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import orjson
import pytest

from fastim import _core
from fastim.node import Node
from fastim.protocol import (
    CloseCode,
    ErrorCode,
    FrameType,
    pack_hello,
    pack_sub,
    unpack_ack,
    unpack_error,
    unpack_goaway,
    unpack_msg,
)

from ._support import (
    Closed,
    TcpClient,
    WsClient,
    deadline,
    http_exchange,
    open_tcp,
    read_http_response,
    upgrade_request,
    wait_for_sessions,
)

F = FrameType
X = TypeVar("X")

N_SUBSCRIBERS = 1000
N_MESSAGES = 200


async def bounded_gather(
    items: Iterable[X], fn: Callable[[X], Awaitable[Any]], limit: int = 100
) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(x: X) -> Any:
        async with sem:
            return await fn(x)

    return await asyncio.gather(*(one(x) for x in items))


def payload(i: int) -> bytes:
    return orjson.dumps({"i": i, "text": f"message {i} ✓", "pad": "x" * (i % 37)})


async def publish_all(
    pub: TcpClient, ch: str, datas: list[bytes], timeout: float = 20
) -> list[int]:
    """Pipeline every PUB in one write; return the PUBACK offsets in arrival order."""
    pub.write(
        b"".join(
            _core.encode_frame(F.PUB, pack_sub(F.PUB, i + 1, ch, d)) for i, d in enumerate(datas)
        )
    )
    offsets: list[int] = []
    async with deadline(timeout):
        while len(offsets) < len(datas):
            t, p = await pub.recv(timeout)
            assert t == F.PUBACK, f"publisher got frame type {t}"
            rid, off, got_ch = unpack_ack(p)
            assert rid == len(offsets) + 1 and got_ch == ch
            offsets.append(off)
    return offsets


async def close_all(clients: Iterable[TcpClient | WsClient]) -> None:
    for c in clients:
        c.writer.close()
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- fan-out at scale


async def test_one_publisher_1000_tcp_subscribers(node: Node) -> None:
    ch = "fanout.tcp"
    subs: list[TcpClient] = []

    async def connect(_: int) -> TcpClient:
        c = await TcpClient.connect(node.tcp_port, hello=False)
        subs.append(c)
        # HELLO and SUB in one write: the server must take pipelined commands
        c.write(
            _core.encode_frame(F.HELLO, pack_hello(1, 1))
            + _core.encode_frame(F.SUB, pack_sub(F.SUB, 7, ch))
        )
        await c.expect(F.WELCOME)
        assert unpack_ack(await c.expect(F.SUBSCRIBED)) == (7, 0, ch)
        return c

    try:
        async with deadline(60):
            await bounded_gather(range(N_SUBSCRIBERS), connect)
            assert len(node.sessions) == N_SUBSCRIBERS
            assert len(node.hub.channels[ch].subs) == N_SUBSCRIBERS

            pub = await TcpClient.connect(node.tcp_port)
            datas = [payload(i) for i in range(N_MESSAGES)]
            offsets = await publish_all(pub, ch, datas)
            assert offsets == list(range(1, N_MESSAGES + 1))
            # a sentinel after the batch: the frame after the last message must be it (no dups)
            sentinel = b'"end"'
            assert await pub.pub(ch, sentinel) == N_MESSAGES + 1

            async def receive(c: TcpClient) -> None:
                for i in range(N_MESSAGES):
                    off, got_ch, data = await c.msg()
                    assert (off, got_ch, data) == (i + 1, ch, datas[i])
                assert await c.msg() == (N_MESSAGES + 1, ch, sentinel)
                assert not c.frames

            await bounded_gather(subs, receive, limit=N_SUBSCRIBERS)
            assert node.hub.delivered >= N_SUBSCRIBERS * (N_MESSAGES + 1)
            await pub.close()
    finally:
        await close_all(subs)
    await wait_for_sessions(node, 0, timeout=20)


async def test_one_publisher_1000_ws_subscribers(node: Node) -> None:
    ch = "fanout.ws"
    subs: list[WsClient] = []

    async def connect(_: int) -> WsClient:
        c = await WsClient.connect(node.ws_port)
        subs.append(c)
        assert await c.sub(ch, req_id=1) == 0
        return c

    try:
        async with deadline(60):
            await bounded_gather(range(N_SUBSCRIBERS), connect)
            assert len(node.hub.channels[ch].subs) == N_SUBSCRIBERS

            pub = await TcpClient.connect(node.tcp_port)
            datas = [payload(i) for i in range(N_MESSAGES)]
            assert await publish_all(pub, ch, datas) == list(range(1, N_MESSAGES + 1))
            assert await pub.pub(ch, b'"end"') == N_MESSAGES + 1
            expected = [orjson.loads(d) for d in datas]

            async def receive(c: WsClient) -> None:
                for i in range(N_MESSAGES):
                    m = await c.msg()
                    assert m == {"op": "msg", "ch": ch, "off": i + 1, "data": expected[i]}
                assert (await c.msg())["off"] == N_MESSAGES + 1
                assert not c.events

            await bounded_gather(subs, receive, limit=N_SUBSCRIBERS)
            await pub.close()
    finally:
        await close_all(subs)
    await wait_for_sessions(node, 0, timeout=20)


# --------------------------------------------------------------------------- formats


async def test_mixed_formats_on_one_channel_get_same_offsets_and_data(node: Node) -> None:
    ch = "mixed"
    tcp = await TcpClient.connect(node.tcp_port)
    wsj = await WsClient.connect(node.ws_port)
    wsb = await WsClient.connect(node.ws_port)
    wsb_hello = await WsClient.connect(node.ws_port, protocols="fastim.binary")
    async with deadline(15):
        assert await tcp.sub(ch) == 0
        assert await wsj.sub(ch) == 0
        # binary WS without HELLO: SUB straight away
        wsb.send_binary(_core.encode_frame(F.SUB, pack_sub(F.SUB, 3, ch)))
        t, p = await wsb.recv_frame()
        assert (t, unpack_ack(p)) == (F.SUBSCRIBED, (3, 0, ch))
        # binary WS with an (optional) HELLO first, both frames in one binary message
        assert wsb_hello.protocol == "fastim.binary"
        wsb_hello.send_binary(
            _core.encode_frame(F.HELLO, pack_hello(1, 1))
            + _core.encode_frame(F.SUB, pack_sub(F.SUB, 4, ch))
        )
        t, p = await wsb_hello.recv_frame()
        assert t == F.WELCOME and p[0] == 1
        t, p = await wsb_hello.recv_frame()
        assert (t, unpack_ack(p)) == (F.SUBSCRIBED, (4, 0, ch))
        assert node.hub.channels[ch].subs.count(_core.FMT_TCP) == 1
        assert node.hub.channels[ch].subs.count(_core.FMT_WS_JSON) == 1
        assert node.hub.channels[ch].subs.count(_core.FMT_WS_BINARY) == 2

        pub = await TcpClient.connect(node.tcp_port)
        docs: list[Any] = [
            {"a": 1},
            [1, 2, "three"],
            "plain ünïcode",
            42,
            None,
            {"nested": {"x": [True, False]}},
        ]
        for d in docs:
            await pub.pub(ch, orjson.dumps(d))
        for i, d in enumerate(docs):
            off = i + 1
            assert await tcp.msg() == (off, ch, orjson.dumps(d))
            assert await wsj.msg() == {"op": "msg", "ch": ch, "off": off, "data": d}
            for c in (wsb, wsb_hello):
                t, p = await c.recv_frame()
                assert t == F.MSG
                got_off, got_ch, data = unpack_msg(p)
                assert (got_off, got_ch, orjson.loads(data)) == (off, ch, d)
    for client in (tcp, wsj, wsb, wsb_hello, pub):
        await client.close()


async def test_tcp_payload_bytes_are_delivered_verbatim(node: Node) -> None:
    """TCP subscribers get the published JSON bytes exactly, JSON ones an equal document."""
    ch = "verbatim"
    tcp = await TcpClient.connect(node.tcp_port)
    wsj = await WsClient.connect(node.ws_port)
    await tcp.sub(ch)
    await wsj.sub(ch)
    pub = await TcpClient.connect(node.tcp_port)
    raw = b' { "k" : [1, 2.5, "\\u00e9"] } '
    await pub.pub(ch, raw)
    assert await tcp.msg() == (1, ch, raw)
    m = await wsj.msg()
    assert m["data"] == {"k": [1, 2.5, "é"]}
    for c in (tcp, wsj, pub):
        await c.close()


# --------------------------------------------------------------------------- offsets and acks


async def test_puback_offsets_increase_by_one(node: Node) -> None:
    tcp = await TcpClient.connect(node.tcp_port)
    ws = await WsClient.connect(node.ws_port)
    offs = []
    for i in range(10):
        offs.append(await tcp.pub("acks", b"%d" % i))
        offs.append(await ws.pub("acks", i))
    assert offs == list(range(1, 21))
    # another channel has its own sequence
    assert await tcp.pub("acks.other", b"1") == 1
    await tcp.close()
    await ws.close()


async def test_subscribed_carries_latest_offset(node: Node) -> None:
    ch = "latest"
    pub = await TcpClient.connect(node.tcp_port)
    for i in range(5):
        await pub.pub(ch, b"%d" % i)
    tcp = await TcpClient.connect(node.tcp_port)
    ws = await WsClient.connect(node.ws_port)
    assert await tcp.sub(ch) == 5
    assert await ws.sub(ch) == 5
    # what was published before the subscription is not replayed: the next message is 6
    assert await pub.pub(ch, b'"six"') == 6
    assert await tcp.msg() == (6, ch, b'"six"')
    assert (await ws.msg())["off"] == 6
    for c in (pub, tcp, ws):
        await c.close()


async def test_unsubscribe_stops_delivery(node: Node) -> None:
    tcp = await TcpClient.connect(node.tcp_port)
    ws = await WsClient.connect(node.ws_port)
    for c in (tcp, ws):
        await c.sub("a")
        await c.sub("b")
    pub = await TcpClient.connect(node.tcp_port)
    await pub.pub("a", b"1")
    assert (await tcp.msg())[:2] == (1, "a")
    assert (await ws.msg())["off"] == 1
    await tcp.unsub("a")
    await ws.unsub("a")
    assert "a" not in node.hub.channels or len(node.hub.channels["a"].subs) == 0
    await pub.pub("a", b"2")
    await pub.pub("a", b"3")
    await pub.pub("b", b'"sentinel"')
    # the next thing each receives is the sentinel on "b": nothing more from "a"
    assert await tcp.msg() == (1, "b", b'"sentinel"')
    assert await ws.msg() == {"op": "msg", "ch": "b", "off": 1, "data": "sentinel"}
    # unsubscribing again is a (non-fatal) error; the connection stays usable
    tcp.send_unsub("a", 99)
    rid, code, _reason = unpack_error(await tcp.expect(F.ERROR))
    assert (rid, code) == (99, ErrorCode.NOT_SUBSCRIBED)
    ws.send_json({"op": "unsub", "ch": "a", "id": 5})
    err = await ws.recv_json()
    assert err["op"] == "error" and err["id"] == 5 and err["code"] == 111
    assert await tcp.pub("b", b"0") == 2
    assert await ws.pub("b", 0) == 3
    for c in (pub, tcp, ws):
        await c.close()


async def test_ws_json_publish_reaches_tcp_subscriber(node: Node) -> None:
    ch = "from.ws"
    tcp = await TcpClient.connect(node.tcp_port)
    await tcp.sub(ch)
    ws = await WsClient.connect(node.ws_port)
    doc = {"text": "hello from a browser", "n": [1, 2, 3], "ok": True}
    assert await ws.pub(ch, doc) == 1
    off, got_ch, data = await tcp.msg()
    assert (off, got_ch, orjson.loads(data)) == (1, ch, doc)
    await tcp.close()
    await ws.close()


@pytest.mark.parametrize("req_id", [1, 4_000_000_000, "abc", "req-ü-1", ""])
async def test_ws_json_id_is_echoed(node: Node, req_id: Any) -> None:
    ws = await WsClient.connect(node.ws_port)
    r = await ws.request({"op": "sub", "ch": "ids", "id": req_id}, "subscribed")
    assert r["id"] == req_id and type(r["id"]) is type(req_id)
    r = await ws.request({"op": "pub", "ch": "ids", "data": 1, "id": req_id}, "puback")
    assert r["id"] == req_id and r["off"] == 1
    assert (await ws.msg())["off"] == 1  # the message (it arrived before the puback) was kept
    r = await ws.request({"op": "ping", "id": req_id}, "pong")
    assert r["id"] == req_id
    r = await ws.request({"op": "unsub", "ch": "ids", "id": req_id}, "unsubscribed")
    assert r["id"] == req_id
    # a non-fatal error echoes the id too
    r = await ws.request({"op": "unsub", "ch": "ids", "id": req_id}, "error")
    assert r["id"] == req_id and r["code"] == 111
    await ws.close()


async def test_ws_json_without_id_gets_reply_without_id(node: Node) -> None:
    ws = await WsClient.connect(node.ws_port)
    ws.send_json({"op": "sub", "ch": "noid"})
    r = await ws.recv_json()
    assert len(r.pop("epoch")) == 12
    assert r == {"op": "subscribed", "ch": "noid", "off": 0, "recovered": False}
    ws.send_json({"op": "ping"})
    assert await ws.recv_json() == {"op": "pong"}
    await ws.close()


async def test_tcp_request_id_is_echoed(node: Node) -> None:
    tcp = await TcpClient.connect(node.tcp_port)
    assert await tcp.sub("tcpid", req_id=0xFFFFFFFF) == 0
    assert await tcp.pub("tcpid", b"1", req_id=12345) == 1
    assert await tcp.msg() == (1, "tcpid", b"1")  # its own message came before the PUBACK
    await tcp.unsub("tcpid", req_id=77)
    await tcp.close()


async def test_ws_sub_and_pub_right_after_open_without_handshake(node: Node) -> None:
    # first command in the very same write as the HTTP upgrade request
    first = _core.ws_encode(
        _core.OP_TEXT, b'{"op":"sub","ch":"early","id":1}', mask=b"\x01\x02\x03\x04"
    )
    ws = await WsClient.connect(node.ws_port, first=first)
    r = await ws.recv_json()
    assert r.pop("epoch") and r == {
        "op": "subscribed",
        "ch": "early",
        "off": 0,
        "id": 1,
        "recovered": False,
    }
    # and a client that publishes as its very first message
    ws2 = await WsClient.connect(node.ws_port)
    assert await ws2.pub("early", {"first": True}, req_id=2) == 1
    assert await ws.msg() == {"op": "msg", "ch": "early", "off": 1, "data": {"first": True}}
    await ws.close()
    await ws2.close()


async def test_tcp_ping_pong_and_closed_client_is_removed(node: Node) -> None:
    tcp = await TcpClient.connect(node.tcp_port)
    tcp.send(F.PING, b"opaque-123")
    assert await tcp.expect(F.PONG) == b"opaque-123"
    await tcp.sub("gone")
    assert len(node.hub.channels["gone"].subs) == 1
    await tcp.close()
    await wait_for_sessions(node, 0)
    assert "gone" not in node.hub.channels or len(node.hub.channels["gone"].subs) == 0
    # publishing to a channel whose subscriber left still works
    pub = await TcpClient.connect(node.tcp_port)
    assert await pub.pub("gone", b"1") == 1
    with pytest.raises((Closed, asyncio.TimeoutError)):
        await tcp.recv(0.2)
    await pub.close()


# --------------------------------------------------------------------------- limits and closing


async def test_limits_are_non_fatal_errors(node_factory: Any) -> None:
    node = await node_factory(max_subscriptions=2, max_channels=3)
    tcp = await TcpClient.connect(node.tcp_port)
    ws = await WsClient.connect(node.ws_port)
    assert await tcp.sub("c1") == 0
    assert await tcp.sub("c2") == 0
    tcp.send_sub("c3", req_id=33)
    rid, code, reason = unpack_error(await tcp.expect(F.ERROR))
    assert (rid, code) == (33, ErrorCode.LIMIT_EXCEEDED) and "2 subscriptions" in reason
    assert await ws.sub("c3") == 0  # the third channel of the node
    r = await ws.request({"op": "sub", "ch": "c4"}, "error")
    assert r["code"] == ErrorCode.LIMIT_EXCEEDED and "3 channels" in r["reason"]
    r = await ws.request({"op": "pub", "ch": "c5", "data": 1}, "error")
    assert r["code"] == ErrorCode.LIMIT_EXCEEDED
    r = await ws.request({"op": "sub", "ch": "c3"}, "error")
    assert r["code"] == ErrorCode.ALREADY_SUBSCRIBED
    # both connections are still fine
    assert await ws.pub("c1", {"ok": 1}) == 1
    assert await tcp.msg() == (1, "c1", b'{"ok":1}')
    assert "c4" not in node.hub.channels and "c5" not in node.hub.channels
    assert node.protocol_errors == 0
    await tcp.close()
    await ws.close()


async def test_connection_limit(node_factory: Any) -> None:
    node = await node_factory(max_connections=2)
    a = await TcpClient.connect(node.tcp_port)
    b = await WsClient.connect(node.ws_port)
    extra = await TcpClient.connect(node.tcp_port, hello=False)
    frames = await extra.recv_all_until_eof()
    assert [t for t, _ in frames] == [F.GOAWAY]
    code, reason = unpack_goaway(frames[0][1])
    assert code == CloseCode.GOING_AWAY and "limit" in reason
    req, _ = upgrade_request(node.ws_port)
    status, headers, _ = await http_exchange(node.ws_port, req)
    assert status == 503 and "retry-after" in headers
    await wait_for_sessions(node, 2)
    # the two admitted clients work; once one leaves, a newcomer is admitted
    await a.sub("lim")
    assert await b.pub("lim", 1) == 1
    assert (await a.msg())[0] == 1
    await b.close()
    await wait_for_sessions(node, 1)
    c = await TcpClient.connect(node.tcp_port)
    assert await c.pub("lim", b"2") == 2
    await a.close()
    await c.close()


async def test_client_initiated_ws_close(node: Node) -> None:
    ws = await WsClient.connect(node.ws_port)
    await ws.sub("bye")
    ws.send_frame(_core.OP_PING, b"are you there")
    ws.send_close(1000, "done")
    code, _reason, before = await ws.recv_close()
    assert code == 1000 and before == []  # pongs are consumed by the client; the close echoes
    await ws.wait_eof()  # the server drops TCP once both closes are exchanged
    await wait_for_sessions(node, 0)
    assert "bye" not in node.hub.channels or len(node.hub.channels["bye"].subs) == 0


async def test_ws_ping_is_answered_with_same_payload(node: Node) -> None:
    ws = await WsClient.connect(node.ws_port)
    pongs: list[bytes] = []
    ws.send_frame(_core.OP_PING, b"\x00\x01payload")
    async with deadline(5):
        while not pongs:
            data = await ws.reader.read(1024)
            assert data
            pongs += [p for op, p in ws.parser.feed(data) if op == _core.OP_PONG]
    assert pongs == [b"\x00\x01payload"]
    await ws.close()


# --------------------------------------------------------------------------- segmentation


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write one byte per TCP segment (TCP_NODELAY, drain, a pause between)."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0.0005)


async def test_tcp_frames_split_byte_by_byte(node: Node) -> None:
    sub = await TcpClient.connect(node.tcp_port)
    await sub.sub("trickle")
    c = await TcpClient.connect(node.tcp_port, hello=False)
    await _trickle(
        c.writer,
        _core.encode_frame(F.HELLO, pack_hello(1, 1))
        + _core.encode_frame(F.PUB, pack_sub(F.PUB, 1, "trickle", b'{"slow": true}')),
    )
    await c.expect(F.WELCOME)
    assert unpack_ack(await c.expect(F.PUBACK)) == (1, 1, "trickle")
    assert await sub.msg() == (1, "trickle", b'{"slow": true}')
    for client in (c, sub):
        await client.close()


async def test_ws_upgrade_and_message_split_byte_by_byte(node: Node) -> None:
    reader, writer = await open_tcp(node.ws_port)
    req, _key = upgrade_request(node.ws_port, protocols="fastim.json")
    msg = b'{"op":"sub","ch":"bytewise","id":1}'
    await _trickle(writer, req + _core.ws_encode(_core.OP_TEXT, msg, mask=b"wxyz"))
    status, headers, _ = await read_http_response(reader)
    assert status == 101 and headers["sec-websocket-protocol"] == "fastim.json"
    ws = WsClient(reader, writer)
    r = await ws.recv_json()
    assert r.pop("epoch")
    assert r == {"op": "subscribed", "ch": "bytewise", "off": 0, "id": 1, "recovered": False}
    await ws.close()


# --------------------------------------------------------------------------- channel names


@pytest.mark.parametrize(
    "ch",
    [
        "café",
        "日本語 チャンネル",
        "x" * 255,
        "é" * 127,  # 254 bytes
        "room-\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family emoji: ZWJ sequence
        "flag-\U0001f3f3\ufe0f\u200d\U0001f308",  # rainbow flag: ZWJ sequence
        "a\u00a0b",  # no-break space
    ],
    ids=["latin", "cjk", "255-ascii", "254-utf8", "zwj-family", "zwj-flag", "nbsp"],
)
async def test_channel_names_without_control_characters_are_accepted(node: Node, ch: str) -> None:
    """Channel names are 1-255 bytes of UTF-8 with no control characters (docs/protocol.md).
    Emoji ZWJ sequences (U+200D is a format character) and no-break spaces are not control
    characters."""
    tcp = await TcpClient.connect(node.tcp_port)
    tcp.send_sub(ch, req_id=1)
    t, p = await tcp.recv()
    assert t == F.SUBSCRIBED, f"SUB {ch!r} refused: {unpack_error(p) if t == F.ERROR else t}"
    ws = await WsClient.connect(node.ws_port)
    assert await ws.pub(ch, "hi") == 1
    assert await tcp.msg() == (1, ch, b'"hi"')
    await tcp.close()
    await ws.close()


# --------------------------------------------------------------------------- write paths


@pytest.mark.parametrize("direct", [1, 0], ids=["direct-write", "transport-write"])
async def test_both_write_paths_deliver_everything_in_order(node_factory: Any, direct: int) -> None:
    """Flushes from C (sendmsg on the fd) and through transport.write deliver the same."""
    node = await node_factory(direct_write=direct)
    ch = "paths"
    n_subs, n_msgs = 50, 300
    subs = [await TcpClient.connect(node.tcp_port) for _ in range(n_subs)]
    try:
        async with deadline(30):
            for c in subs:
                assert await c.sub(ch) == 0
            rings = [s.ring for s in node.sessions if s.ring is not None]
            assert rings and all((r.direct_fd >= 0) == bool(direct) for r in rings)
            pub = await TcpClient.connect(node.tcp_port)
            # big messages too, so that some flushes exceed what the kernel takes at once
            datas = [orjson.dumps({"i": i, "pad": "z" * (i * 97 % 20000)}) for i in range(n_msgs)]
            assert await publish_all(pub, ch, datas) == list(range(1, n_msgs + 1))

            async def receive(c: TcpClient) -> None:
                for i in range(n_msgs):
                    assert await c.msg() == (i + 1, ch, datas[i])

            await bounded_gather(subs, receive, limit=n_subs)
            await pub.close()
    finally:
        await close_all(subs)
    await wait_for_sessions(node, 0, timeout=20)


async def test_a_closing_session_gives_up_its_socket_before_its_transport(
    node_factory: Any,
) -> None:
    """The flusher does not ask a transport whether it is closing: every way a session's
    transport starts closing sets its ring's fd to -1 first (OutRing.set_fd)."""
    node = await node_factory(direct_write=1)
    clients = [await TcpClient.connect(node.tcp_port) for _ in range(3)]
    ws = await WsClient.connect(node.ws_port)
    try:
        async with deadline(10):
            await ws.sub("fd")
            sessions = [s for s in node.sessions if s.ring is not None]
            assert len(sessions) == 4 and all(s.ring.direct_fd >= 0 for s in sessions)
            eof, closed, aborted, ws_s = sorted(
                sessions, key=lambda s: (s.hello_required is False, id(s))
            )
            assert eof.eof_received() is None  # the transport closes our side too
            closed.close(CloseCode.GOING_AWAY, "bye")
            aborted.close_transport(abort=True)
            ws_s.close(CloseCode.GOING_AWAY, "bye")
            for s in (eof, closed, aborted, ws_s):
                assert s.ring is not None and s.ring.direct_fd == -1
    finally:
        await close_all(clients)
        await ws.close()
    await wait_for_sessions(node, 0, timeout=10)
