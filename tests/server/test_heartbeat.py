"""Heartbeats: the node pings quiet clients and closes the ones that do not answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.frames import Opcode

from fastim.protocol import CloseCode, FrameType, unpack_goaway

from ._support import Closed, TcpClient, WsClient, deadline, wait_for_sessions

F = FrameType
PING_INTERVAL = 0.3
PONG_TIMEOUT = 0.3
# a silent client must be closed by ping_interval + pong_timeout plus some timer slack;
# 2 s leaves room for a loaded 2-core machine
CLOSE_BOUND = 2.0
STAY = 2.0  # "several intervals"


@pytest.fixture
async def hb_node(node_factory):
    return await node_factory(ping_interval=PING_INTERVAL, pong_timeout=PONG_TIMEOUT)


async def test_tcp_client_that_never_answers_pings_is_closed(hb_node: Any) -> None:
    node = hb_node
    loop = asyncio.get_running_loop()
    c = await TcpClient.connect(node.tcp_port)
    t0 = loop.time()
    frames = await c.recv_all_until_eof(timeout=CLOSE_BOUND + 3)
    elapsed = loop.time() - t0
    types = [t for t, _ in frames]
    assert types[-1] == F.GOAWAY, types
    assert types.count(F.PING) >= 1 and set(types[:-1]) == {F.PING}, types
    code, reason = unpack_goaway(frames[-1][1])
    assert code == CloseCode.HEARTBEAT_TIMEOUT
    assert "pong" in reason and "reconnect" in reason
    assert PING_INTERVAL <= elapsed < CLOSE_BOUND, elapsed
    assert node.heartbeat_timeouts == 1
    await wait_for_sessions(node, 0)


async def test_tcp_client_answering_pings_stays_connected(hb_node: Any) -> None:
    node = hb_node
    loop = asyncio.get_running_loop()
    c = await TcpClient.connect(node.tcp_port)
    await c.sub("hb")
    pings = 0
    end = loop.time() + STAY
    while (left := end - loop.time()) > 0:
        try:
            t, p = await c.recv(left)
        except asyncio.TimeoutError:
            break
        assert t == F.PING, f"unexpected frame {t} while idle"
        pings += 1
        c.send(F.PONG, p)
    # one ping per interval, roughly (≥ half of them to allow for timer slack)
    assert pings >= int(STAY / (PING_INTERVAL + PONG_TIMEOUT)), pings
    assert node.heartbeat_timeouts == 0
    assert len(node.sessions) == 1
    # still fully working
    assert await c.pub("hb", b"1") == 1
    assert await c.msg() == (1, "hb", b"1")
    await c.close()


async def test_tcp_client_that_keeps_talking_is_not_pinged(hb_node: Any) -> None:
    """Any bytes count as life: a client publishing every 0.1 s needs no ping."""
    node = hb_node
    c = await TcpClient.connect(node.tcp_port)
    for i in range(int(STAY / 0.1)):
        await asyncio.sleep(0.1)
        assert await c.pub("busy", b"%d" % i) == i + 1
    # a ping sent meanwhile would have come before the last PUBACK (pub keeps it)
    assert not c.frames
    assert node.heartbeat_timeouts == 0 and len(node.sessions) == 1
    await c.close()


async def test_websockets_client_stays_connected(hb_node: Any) -> None:
    node = hb_node
    pings = 0
    async with deadline(STAY + 10):
        # the library answers pings by itself; its own keepalive is off so that only
        # its pongs keep the connection alive
        async with connect(f"ws://127.0.0.1:{node.ws_port}/ws", ping_interval=None) as ws:
            orig = ws.process_event

            def count(event: Any) -> None:
                nonlocal pings
                if event.opcode is Opcode.PING:
                    pings += 1
                orig(event)

            ws.process_event = count  # type: ignore[method-assign]
            await ws.send(json.dumps({"op": "sub", "ch": "hb"}))
            assert json.loads(await ws.recv())["op"] == "subscribed"
            await asyncio.sleep(STAY)
            assert node.heartbeat_timeouts == 0
            await ws.send(json.dumps({"op": "pub", "ch": "hb", "data": 1, "id": 1}))
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
            assert {m["op"] for m in got} == {"msg", "puback"}
        assert ws.close_code == 1000
    assert pings >= int(STAY / (PING_INTERVAL + PONG_TIMEOUT)), pings
    await wait_for_sessions(node, 0)


async def test_raw_ws_client_that_ignores_pings_is_closed_with_4000(hb_node: Any) -> None:
    node = hb_node
    loop = asyncio.get_running_loop()
    c = await WsClient.connect(node.ws_port)
    c.auto_pong = False
    t0 = loop.time()
    code, reason, before = await c.recv_close(timeout=CLOSE_BOUND + 3)
    elapsed = loop.time() - t0
    assert code == CloseCode.HEARTBEAT_TIMEOUT and "reconnect" in reason
    assert before == []
    assert c.pings >= 1
    assert PING_INTERVAL <= elapsed < CLOSE_BOUND, elapsed
    c.send_close(code)
    await c.wait_eof()
    assert node.heartbeat_timeouts == 1
    await wait_for_sessions(node, 0)


async def test_raw_ws_client_answering_pings_stays_connected(hb_node: Any) -> None:
    node = hb_node
    c = await WsClient.connect(node.ws_port)
    c.auto_pong = True
    await c.sub("hb")
    await c.pump(STAY)  # answers every ping; nothing else arrives
    assert not c.events, list(c.events)
    assert c.pings >= int(STAY / (PING_INTERVAL + PONG_TIMEOUT)), c.pings
    assert await c.pub("hb", 5) == 1
    assert node.heartbeat_timeouts == 0
    await c.close()


async def test_ws_binary_client_gets_websocket_pings(hb_node: Any) -> None:
    """On a fastim.binary WebSocket the ping is a WebSocket ping, not a fastim PING frame."""
    node = hb_node
    c = await WsClient.connect(node.ws_port, protocols="fastim.binary")
    c.auto_pong = False
    code, _, before = await c.recv_close(timeout=CLOSE_BOUND + 3)
    assert code == CloseCode.HEARTBEAT_TIMEOUT
    assert before == [] and c.pings >= 1


async def test_silent_clients_do_not_disturb_a_live_one(hb_node: Any) -> None:
    node = hb_node
    silent = [await TcpClient.connect(node.tcp_port) for _ in range(20)]
    live = await TcpClient.connect(node.tcp_port)
    await live.sub("live")

    async def gone(c: TcpClient) -> int:
        frames = await c.recv_all_until_eof(timeout=CLOSE_BOUND + 3)
        return unpack_goaway(frames[-1][1])[0]

    closing = asyncio.gather(*(gone(c) for c in silent))
    loop = asyncio.get_running_loop()
    end = loop.time() + STAY
    n = 0
    while loop.time() < end:
        n += 1
        assert await live.pub("live", b"%d" % n) == n
        assert await live.msg() == (n, "live", b"%d" % n)
        await asyncio.sleep(0.05)
    assert await closing == [CloseCode.HEARTBEAT_TIMEOUT] * 20
    assert node.heartbeat_timeouts == 20
    await wait_for_sessions(node, 1)
    with pytest.raises((asyncio.TimeoutError, Closed)):
        await live.recv(0.05)
    await live.close()


async def test_commands_after_the_servers_close_frame_are_not_executed(hb_node: Any) -> None:
    """A client that had not yet read the close frame may still send commands; the node
    has already let it go, so they must have no effect (no publish without a puback)."""
    node = hb_node
    c = await WsClient.connect(node.ws_port)
    c.auto_pong = False
    assert await c.pub("late", "before") == 1
    code, _, _ = await c.recv_close(timeout=CLOSE_BOUND + 3)
    assert code == CloseCode.HEARTBEAT_TIMEOUT
    c.send_json({"op": "pub", "ch": "late", "data": "after 1", "id": 2})
    await asyncio.sleep(0.05)  # separate segments: each is a data_received of its own
    c.send_json({"op": "pub", "ch": "late", "data": "after 2", "id": 3})
    c.send_json({"op": "sub", "ch": "late.sub", "id": 4})
    await asyncio.sleep(0.05)
    c.send_close(1000)
    await c.wait_eof()
    assert node.hub.channels["late"].offset == 1
    assert "late.sub" not in node.hub.channels
    assert not c.events  # and nothing was answered
    await wait_for_sessions(node, 0)
