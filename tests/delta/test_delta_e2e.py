"""Delta compression through real clients: the SDK over TCP and WebSocket, raw JSON over
WebSocket, against a real node (docs/delta.md).

Every subscriber, with or without deltas, must receive the same documents; a delta
subscriber gets a full message first (after subscribe, recovery, an epoch change), then
deltas, and a delta it cannot apply costs a resubscribe, never a message.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from server._support import WsClient, deadline  # type: ignore[import-not-found]

from fastim import _pyref
from fastim.client import connect
from fastim.config.namespaces import check_namespaces
from fastim.node import Node

#: tests/conftest.py's node_factory (not importable by name: several conftest modules)
NodeFactory = Callable[..., Awaitable[Node]]

NS = {"doc": {"delta": "fossil", "history_size": 100}}


def documents(n: int) -> list[dict[str, Any]]:
    """A ~10 KB JSON document changing ~1% per message (one row's value), n versions."""
    doc = {"rows": [{"id": i, "name": f"row {i} ✓", "value": i * 7} for i in range(200)]}
    out = []
    for k in range(n):
        doc["rows"][(k * 37) % 200]["value"] = k
        out.append(copy.deepcopy(doc))
    return out


async def start(node_factory: NodeFactory, store: str = "memory") -> Node:
    return await node_factory(store=store, namespaces=NS)


class RawJson:
    """A raw WebSocket JSON subscriber that applies deltas with the reference decoder."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.base: bytes | None = None
        self.docs: list[tuple[int, Any, bool]] = []  # offset, document, came as a delta

    async def recv(self) -> dict[str, Any]:
        _op, text = await self.ws.recv_event()
        obj = orjson.loads(text)
        if obj.get("op") == "msg":
            if obj.get("delta") is True:
                assert self.base is not None, "a delta before any full message"
                data = _pyref.fossil_apply(self.base, obj["data"].encode())
                self.docs.append((obj["off"], orjson.loads(data), True))
                self.base = data
            else:
                key = b'"off":%d,"data":' % obj["off"]
                self.base = text[text.index(key) + len(key) : -1]
                assert orjson.loads(self.base) == obj["data"]
                self.docs.append((obj["off"], obj["data"], False))
        return obj

    async def until(self, n: int) -> None:
        async with deadline(10):
            while len(self.docs) < n:
                await self.recv()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_every_subscriber_gets_the_same_documents(
    node_factory: NodeFactory, store: str
) -> None:
    node = await start(node_factory, store)
    tcp = f"tcp://127.0.0.1:{node.config.tcp_port}"
    ws = f"ws://127.0.0.1:{node.config.ws_port}/ws"
    clients = [await connect(u) for u in (tcp, ws, tcp, ws)]
    try:
        subs = [
            await clients[0].subscribe("doc:1", delta="fossil"),
            await clients[1].subscribe("doc:1", delta="fossil"),
            await clients[2].subscribe("doc:1"),
            await clients[3].subscribe("doc:1"),
        ]
        raw = RawJson(await WsClient.connect(node.config.ws_port))
        raw.ws.send_json({"op": "sub", "ch": "doc:1", "delta": "fossil", "id": 1})
        assert (await raw.recv())["op"] == "subscribed"
        docs = documents(20)
        for d in docs:
            await clients[2].publish("doc:1", d)
        for s in subs:
            got = [await asyncio.wait_for(s.get(), 5) for _ in docs]
            assert [m.data for m in got] == docs
            assert [m.offset for m in got] == list(range(1, 21))
        await raw.until(20)
        assert [d for _o, d, _x in raw.docs] == docs
        assert [x for _o, _d, x in raw.docs] == [False] + [True] * 19  # full first
        assert subs[0].deltas == subs[1].deltas == 19
        assert subs[0].delta_failures == subs[1].delta_failures == 0
        assert subs[2].deltas == 0  # asked for none
        hub = node.hub
        assert hub.deltas == 19  # once per message, whatever the number of subscribers
        assert hub.delta_out * 20 < hub.delta_in  # the 1% change: far smaller
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_recovery_is_full_then_deltas(node_factory: NodeFactory, store: str) -> None:
    """A subscribe with since: the recovered messages full; the first live one a delta
    against the last recovered (it is the channel's latest), so no extra full one. A
    subscribe whose recovery is empty has no base here: the next message is full."""
    node = await start(node_factory, store)
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    try:
        docs = documents(8)
        for d in docs[:5]:
            await pub.publish("doc:r", d)
        epoch = node.hub.channels["doc:r"].epoch
        raw = RawJson(await WsClient.connect(node.config.ws_port))
        since = {"off": 2, "epoch": epoch}
        raw.ws.send_json({"op": "sub", "ch": "doc:r", "since": since, "delta": "fossil"})
        reply = await raw.recv()
        assert reply["op"] == "subscribed" and reply["recovered"] is True
        await raw.until(3)
        await pub.publish("doc:r", docs[5])
        await raw.until(4)
        assert [(o, x) for o, _d, x in raw.docs] == [(3, False), (4, False), (5, False), (6, True)]
        assert [d for _o, d, _x in raw.docs] == docs[2:6]

        late = RawJson(await WsClient.connect(node.config.ws_port))
        since = {"off": 6, "epoch": epoch}  # up to date: nothing recovered, no base
        late.ws.send_json({"op": "sub", "ch": "doc:r", "since": since, "delta": "fossil"})
        assert (await late.recv())["recovered"] is True
        await pub.publish("doc:r", docs[6])
        await pub.publish("doc:r", docs[7])
        await late.until(2)
        assert [(o, x) for o, _d, x in late.docs] == [(7, False), (8, True)]
        assert [d for _o, d, _x in late.docs] == docs[6:8]
    finally:
        await pub.aclose()


async def test_sdk_reconnect_recovers_and_keeps_applying(node_factory: NodeFactory) -> None:
    node = await start(node_factory)
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    for url in (
        f"tcp://127.0.0.1:{node.config.tcp_port}",
        f"ws://127.0.0.1:{node.config.ws_port}/ws",
    ):
        client = await connect(url)
        try:
            ch = f"doc:{url[:3]}"
            sub = await client.subscribe(ch, delta="fossil")
            docs = documents(12)
            for d in docs[:4]:
                await pub.publish(ch, d)
            got = [await asyncio.wait_for(sub.get(), 5) for _ in range(4)]
            assert client._conn is not None
            client._conn.abort()  # the connection is lost
            for d in docs[4:8]:
                await pub.publish(ch, d)
            got += [await asyncio.wait_for(sub.get(), 10) for _ in range(4)]  # recovered
            for d in docs[8:]:
                await pub.publish(ch, d)
            got += [await asyncio.wait_for(sub.get(), 5) for _ in range(4)]
            assert [m.data for m in got] == docs
            assert [m.offset for m in got] == list(range(1, 13))
            assert sub.gaps == 0 and sub.delta_failures == 0
            assert sub.deltas >= 6  # 2..4, then after the recovery
        finally:
            await client.aclose()
    await pub.aclose()


async def test_epoch_change_starts_full(node_factory: NodeFactory) -> None:
    node = await start(node_factory)
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    client = await connect(f"ws://127.0.0.1:{node.config.ws_port}/ws")
    try:
        sub = await client.subscribe("doc:e", delta="fossil")
        docs = documents(6)
        for d in docs[:3]:
            await pub.publish("doc:e", d)
        got = [await asyncio.wait_for(sub.get(), 5) for _ in range(3)]
        ch = node.hub.channels["doc:e"]
        node.hub._adopt(ch, "newepoch0001", 0)  # history lost: everyone resubscribes
        async with deadline(5):
            while sub.epoch != "newepoch0001" or len(ch.subs) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert ch.dbase is None  # the base went with the epoch
        for d in docs[3:]:
            await pub.publish("doc:e", d)
        got += [await asyncio.wait_for(sub.get(), 5) for _ in range(3)]
        assert [m.data for m in got] == docs
        assert [m.offset for m in got] == [1, 2, 3, 1, 2, 3]
        assert sub.delta_failures == 0 and sub.deltas == 4  # 2, 3, then 2, 3 of the new one
    finally:
        await client.aclose()
        await pub.aclose()


async def test_a_delta_that_cannot_apply_resubscribes(node_factory: NodeFactory) -> None:
    """A client whose base is wrong fails the checksum, resubscribes with since and gets
    the message full: nothing lost, nothing twice."""
    node = await start(node_factory)
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    client = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    try:
        sub = await client.subscribe("doc:x", delta="fossil")
        docs = documents(6)
        for d in docs[:2]:
            await pub.publish("doc:x", d)
        got = [await asyncio.wait_for(sub.get(), 5) for _ in range(2)]
        assert sub._base is not None
        sub._base = sub._base.replace(b"row", b"ROW", 1)  # a corrupted base
        for d in docs[2:]:
            await pub.publish("doc:x", d)
        got += [await asyncio.wait_for(sub.get(), 5) for _ in range(4)]
        assert [m.data for m in got] == docs
        assert [m.offset for m in got] == list(range(1, 7))
        assert sub.delta_failures == 1 and sub.gaps == 0
    finally:
        await client.aclose()
        await pub.aclose()


async def test_without_the_namespace_setting_delta_changes_nothing(
    node_factory: NodeFactory,
) -> None:
    node = await start(node_factory)
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    raw = RawJson(await WsClient.connect(node.config.ws_port))
    try:
        raw.ws.send_json({"op": "sub", "ch": "plain", "delta": "fossil"})
        assert (await raw.recv())["op"] == "subscribed"
        for d in documents(3):
            await pub.publish("plain", d)
        await raw.until(3)
        assert [x for _o, _d, x in raw.docs] == [False] * 3
        assert node.hub.deltas == 0
    finally:
        await pub.aclose()


async def test_a_bad_delta_value_is_a_bad_request(node_factory: NodeFactory) -> None:
    node = await start(node_factory)
    raw = await WsClient.connect(node.config.ws_port)
    raw.send_json({"op": "sub", "ch": "doc:1", "delta": "zstd"})
    reply = await raw.recv_json()
    assert reply["op"] == "error" and reply["code"] == 102 and "delta" in reply["reason"]


def test_the_namespace_setting_is_checked() -> None:
    assert check_namespaces({"doc": {"delta": "fossil"}}) == {"doc": {"delta": "fossil"}}
    with pytest.raises(ValueError, match=r"namespaces\.doc\.delta"):
        check_namespaces({"doc": {"delta": "xdelta"}})
    with pytest.raises(ValueError, match=r"namespaces\.doc\.delta"):
        check_namespaces({"doc": {"delta": True}})


async def test_latest_value_recovery_then_deltas(node_factory: NodeFactory) -> None:
    """recovery = "cache" (a state channel) and deltas compose: a resubscriber gets the
    latest message, full, then deltas against it."""
    node = await node_factory(
        store="memory", namespaces={"state": {"delta": "fossil", "recovery": "cache"}}
    )
    pub = await connect(f"tcp://127.0.0.1:{node.config.tcp_port}")
    try:
        docs = documents(7)
        for d in docs[:5]:
            await pub.publish("state:1", d)
        epoch = node.hub.channels["state:1"].epoch
        raw = RawJson(await WsClient.connect(node.config.ws_port))
        since = {"off": 1, "epoch": epoch}
        raw.ws.send_json({"op": "sub", "ch": "state:1", "since": since, "delta": "fossil"})
        assert (await raw.recv())["recovered"] is True
        await raw.until(1)
        for d in docs[5:]:
            await pub.publish("state:1", d)
        await raw.until(3)
        assert [(o, x) for o, _d, x in raw.docs] == [(5, False), (6, True), (7, True)]
        assert [d for _o, d, _x in raw.docs] == docs[4:]
    finally:
        await pub.aclose()
