"""``{"op":"sub","history":N}``: a new subscriber gets the channel's newest N messages.

A client that has never seen a channel knows no epoch, so ``since`` cannot serve it; a
chat page that opens a room wants the last messages before the live ones. Tested on the
memory store (history in the node's ring) and on sqlite (read from the store when the
node's cache does not hold them: after a restart), over real sockets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fastim import _core
from fastim.protocol import CloseCode, ErrorCode, FrameType

from ._support import TcpClient, WsClient, deadline

F = FrameType


async def _msgs(ws: WsClient, n: int) -> list[dict[str, Any]]:
    return [await ws.msg() for _ in range(n)]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_history_gives_the_newest_messages_then_live(
    node_factory: Any, tmp_path: Path, store: str
) -> None:
    node = await node_factory(store=store, store_path=str(tmp_path / "h.db"))
    pub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        for i in range(10):
            await pub.pub("room:a", {"i": i})
        late = await WsClient.connect(node.ws_port)
        r = await late.request({"op": "sub", "ch": "room:a", "history": 4}, "subscribed")
        assert r["off"] == 10 and r["recovered"] is True and r["epoch"]
        got = await _msgs(late, 4)
        assert [m["off"] for m in got] == [7, 8, 9, 10]
        assert [m["data"]["i"] for m in got] == [6, 7, 8, 9]
        await pub.pub("room:a", {"i": 10})  # then live: no gap, no duplicate
        live = await late.msg()
        assert live["off"] == 11 and live["data"] == {"i": 10}
        # more than the channel has: all of it, and it is complete
        all_ = await WsClient.connect(node.ws_port)
        r = await all_.request({"op": "sub", "ch": "room:a", "history": 50}, "subscribed")
        assert r["recovered"] is True and r["off"] == 11
        assert [m["off"] for m in await _msgs(all_, 11)] == list(range(1, 12))
        # 0 is the same as none: live only
        none = await WsClient.connect(node.ws_port)
        r = await none.request({"op": "sub", "ch": "room:a", "history": 0}, "subscribed")
        assert r["recovered"] is False
        await pub.pub("room:a", {"i": 11})
        assert (await none.msg())["off"] == 12
        # an empty channel: nothing to send, nothing missing
        empty = await WsClient.connect(node.ws_port)
        r = await empty.request({"op": "sub", "ch": "room:new", "history": 5}, "subscribed")
        assert r["off"] == 0 and r["recovered"] is True
        await pub.pub("room:new", "first")
        assert (await empty.msg())["off"] == 1
    for c in (pub, late, all_, none, empty):
        await c.close()


async def test_history_is_read_from_the_store_after_a_restart(
    node_factory: Any, tmp_path: Path
) -> None:
    """The node's cache is empty after a restart: the durable store answers."""
    db = str(tmp_path / "restart.db")
    node = await node_factory(store="sqlite", store_path=db)
    c = await WsClient.connect(node.ws_port)
    async with deadline(20):
        for i in range(6):
            await c.pub("room:r", {"i": i})
    await c.close()
    await node.stop()
    node2 = await node_factory(store="sqlite", store_path=db)
    c2 = await WsClient.connect(node2.ws_port)
    async with deadline(20):
        r = await c2.request({"op": "sub", "ch": "room:r", "history": 3}, "subscribed")
        assert r["off"] == 6 and r["recovered"] is True
        assert [m["data"]["i"] for m in await _msgs(c2, 3)] == [3, 4, 5]
    await c2.close()


async def test_history_beyond_what_is_kept_is_not_recovered(node_factory: Any) -> None:
    node = await node_factory(history_size=3)
    c = await WsClient.connect(node.ws_port)
    async with deadline(10):
        for i in range(10):
            await c.pub("short", i)
        late = await WsClient.connect(node.ws_port)
        r = await late.request({"op": "sub", "ch": "short", "history": 5}, "subscribed")
        assert r["recovered"] is False and r["off"] == 10
        assert [m["data"] for m in await _msgs(late, 3)] == [7, 8, 9]  # what was kept
    await c.close()
    await late.close()


async def test_history_over_a_cmd_frame(node_factory: Any) -> None:
    """Binary clients use the same JSON grammar inside a CMD frame; messages are MSG frames."""
    node = await node_factory()
    tcp = await TcpClient.connect(node.tcp_port)
    ws = await WsClient.connect(node.ws_port)
    async with deadline(10):
        for i in range(3):
            await ws.pub("bin", i)
        cmd = orjson.dumps({"op": "sub", "ch": "bin", "history": 2, "id": 9})
        tcp.send(F.CMD, cmd)
        t, p = await tcp.recv()
        assert t == F.EVENT
        reply = orjson.loads(p)
        assert reply["op"] == "subscribed" and reply["recovered"] is True and reply["id"] == 9
        assert [(await tcp.msg())[2] for _ in range(2)] == [b"1", b"2"]
    await tcp.close()
    await ws.close()


async def test_history_needs_allow_history(node_factory: Any) -> None:
    node = await node_factory(namespaces={"live": {"allow_history": "none"}})
    c = await WsClient.connect(node.ws_port)
    async with deadline(10):
        reply = await c.request({"op": "sub", "ch": "live:1", "history": 5}, "error")
        assert reply["code"] == ErrorCode.PERMISSION_DENIED
        assert "allow_history = none" in reply["reason"]
        assert (await c.request({"op": "sub", "ch": "live:1"}, "subscribed"))["off"] == 0
    await c.close()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"history": -1}, 'field "history" must be an integer >= 0'),
        ({"history": "10"}, 'field "history" must be an integer >= 0'),
        ({"history": True}, 'field "history" must be an integer >= 0'),
        ({"history": 3, "since": {"off": 0, "epoch": "e"}}, '"since" or "history", not both'),
    ],
)
async def test_bad_history_is_a_bad_request(
    node_factory: Any, fields: dict[str, Any], needle: str
) -> None:
    node = await node_factory()
    c = await WsClient.connect(node.ws_port)
    async with deadline(10):
        c.send_json({"op": "sub", "ch": "x", "id": 1, **fields})
        code, _reason, before = await c.recv_close()
        assert code == CloseCode.BAD_REQUEST
        errors = [orjson.loads(p) for op, p in before if op == _core.OP_TEXT]
        assert errors[-1]["code"] == ErrorCode.BAD_REQUEST and needle in errors[-1]["reason"]
    await c.close()
