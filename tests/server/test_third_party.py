"""A third-party WebSocket client (the ``websockets`` library) against the node."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastim.node import Node
from fastim.protocol import CloseCode, ErrorCode

from ._support import TcpClient, deadline, wait_for_sessions

T = 5.0


def url(node: Node, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{node.ws_port}{path}"


async def recv_json(ws: object, timeout: float = T) -> dict[str, object]:
    msg = await asyncio.wait_for(ws.recv(), timeout)  # type: ignore[attr-defined]
    assert isinstance(msg, str), f"expected a text message, got {msg!r}"
    obj: dict[str, object] = json.loads(msg)
    return obj


async def test_websockets_client_subscribes_and_receives(node: Node) -> None:
    async with deadline(15):
        async with connect(url(node)) as ws:
            await ws.send(json.dumps({"op": "sub", "ch": "tp", "id": "s1"}))
            r = await recv_json(ws)
            assert r.pop("epoch") and r.pop("recovered") is False
            assert r == {"op": "subscribed", "ch": "tp", "off": 0, "id": "s1"}
            pub = await TcpClient.connect(node.tcp_port)
            docs = [{"n": i, "s": "é" * i} for i in range(50)]
            for d in docs:
                await pub.pub("tp", orjson.dumps(d))
            for i, d in enumerate(docs):
                assert await recv_json(ws) == {"op": "msg", "ch": "tp", "off": i + 1, "data": d}
            # and it can publish itself; its own message comes back as well as the puback
            await ws.send(
                json.dumps({"op": "pub", "ch": "tp", "data": {"from": "websockets"}, "id": 9})
            )
            got = [await recv_json(ws), await recv_json(ws)]
            assert {"op": "msg", "ch": "tp", "off": 51, "data": {"from": "websockets"}} in got
            assert {"op": "puback", "ch": "tp", "off": 51, "id": 9} in got
            await ws.send(json.dumps({"op": "ping", "id": 3}))
            assert await recv_json(ws) == {"op": "pong", "id": 3}
            await pub.close()
        assert ws.close_code == 1000
    await wait_for_sessions(node, 0)


async def test_websockets_client_protocol_violation_gets_close_code(node_factory) -> None:
    node = await node_factory(close_timeout=0.5)
    async with deadline(10):
        async with connect(url(node)) as ws:
            await ws.send('{"op": "sub", "ch": ')  # not JSON
            err = await recv_json(ws)
            assert err["op"] == "error" and err["code"] == ErrorCode.BAD_REQUEST
            assert "JSON" in str(err["reason"])
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(ws.recv(), T)
            assert exc.value.rcvd is not None
            assert exc.value.rcvd.code == CloseCode.BAD_REQUEST
        assert ws.close_code == CloseCode.BAD_REQUEST

        async with connect(url(node)) as ws:
            await ws.send(json.dumps({"op": "teleport", "ch": "x"}))
            err = await recv_json(ws)
            assert err["code"] == ErrorCode.UNKNOWN_OP and "teleport" in str(err["reason"])
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), T)
        assert ws.close_code == CloseCode.BAD_REQUEST

        # a binary message after text fixed the connection to JSON
        async with connect(url(node)) as ws:
            await ws.send(json.dumps({"op": "ping"}))
            assert await recv_json(ws) == {"op": "pong"}
            await ws.send(b"\x00\x01")
            err = await recv_json(ws)
            assert err["code"] == ErrorCode.BAD_REQUEST and "binary" in str(err["reason"])
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), T)
        assert ws.close_code == CloseCode.BAD_REQUEST
    await wait_for_sessions(node, 0)
    assert node.protocol_errors == 3


async def test_websockets_client_message_too_big_gets_1009(node_factory) -> None:
    node = await node_factory(max_message=1024)
    async with deadline(10):
        async with connect(url(node)) as ws:
            await ws.send(json.dumps({"op": "pub", "ch": "big", "data": "x" * 2000}))
            err = await recv_json(ws)  # error 103 first (docs/configuration.md), then 1009
            assert err["op"] == "error" and err["code"] == ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), T)
        assert ws.close_code == CloseCode.MESSAGE_TOO_BIG
    await wait_for_sessions(node, 0)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["fastim.json"], "fastim.json"),
        (["fastim.binary"], "fastim.binary"),
        (["chat.v2", "fastim.json"], "fastim.json"),
    ],
)
async def test_subprotocol_negotiated_when_offered(
    node: Node, offered: list[str], chosen: str
) -> None:
    async with deadline(10):
        async with connect(url(node), subprotocols=offered) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == chosen
            if chosen == "fastim.json":
                await ws.send(json.dumps({"op": "sub", "ch": "sp", "id": 1}))
                r = await recv_json(ws)
                assert r.pop("epoch") and r.pop("recovered") is False
                assert r == {"op": "subscribed", "ch": "sp", "off": 0, "id": 1}
            else:
                # a fastim.binary connection takes no text: that is a protocol error
                await ws.send(json.dumps({"op": "ping"}))
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), T)
        if chosen == "fastim.binary":
            assert ws.close_code == CloseCode.BAD_REQUEST


async def test_no_subprotocol_when_none_offered(node: Node) -> None:
    async with deadline(10), connect(url(node)) as ws:
        assert ws.subprotocol is None
        await ws.send(json.dumps({"op": "ping"}))
        assert await recv_json(ws) == {"op": "pong"}


async def test_close_handshake_completes_promptly_after_server_close(node_factory) -> None:
    """RFC 6455 §7.1.1: once the client answers the server's close frame, the server
    drops the TCP connection; it must not wait for ``close_timeout`` to expire."""
    node = await node_factory(close_timeout=5.0)
    loop = asyncio.get_running_loop()
    async with deadline(15):
        async with connect(url(node)) as ws:
            await ws.send("not json")
            err = await recv_json(ws)
            assert err["op"] == "error"
            t0 = loop.time()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            await asyncio.wait_for(ws.wait_closed(), 10)
            elapsed = loop.time() - t0
        assert ws.close_code == CloseCode.BAD_REQUEST
    await wait_for_sessions(node, 0)
    assert elapsed < 1.0, (
        f"the close handshake took {elapsed:.2f}s: the server ignored the client's close "
        "reply and only dropped the connection at close_timeout"
    )
