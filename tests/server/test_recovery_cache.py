"""Latest-value recovery (``recovery = "cache"`` in a namespace): a (re)subscriber gets
only the channel's latest message instead of every one it missed — for channels that
carry a state (a price, a document, a score), not events. Over real sockets, on the
memory store, on sqlite (also after a restart: the latest read back from the store), and
with the SDK across a reconnect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastim.client import connect
from fastim.config import Config, ConfigError

from ._support import WsClient, deadline, wait_until

NAMESPACES = {"state": {"recovery": "cache", "history_size": 50}}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_cache_recovery_sends_only_the_latest(
    node_factory: Any, tmp_path: Path, store: str
) -> None:
    db = str(tmp_path / "c.db")
    node = await node_factory(store=store, store_path=db, namespaces=NAMESPACES)
    pub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        sub = await WsClient.connect(node.ws_port)
        r = await sub.request({"op": "sub", "ch": "state:price"}, "subscribed")
        epoch = r["epoch"]
        for i in range(1, 4):
            await pub.pub("state:price", {"v": i})
        assert [(await sub.msg())["off"] for _ in range(3)] == [1, 2, 3]
        for i in range(4, 11):  # while the subscriber was away
            await pub.pub("state:price", {"v": i})
        back = await WsClient.connect(node.ws_port)
        since = {"off": 3, "epoch": epoch}
        r = await back.request({"op": "sub", "ch": "state:price", "since": since}, "subscribed")
        assert (r["off"], r["epoch"], r["recovered"]) == (10, epoch, True)
        latest = await back.msg()
        assert (latest["off"], latest["data"]) == (10, {"v": 10})
        await pub.pub("state:price", {"v": 11})  # then live, nothing in between
        assert (await back.msg())["off"] == 11
        # history: N on a cache channel is the latest too
        h = await WsClient.connect(node.ws_port)
        r = await h.request({"op": "sub", "ch": "state:price", "history": 5}, "subscribed")
        assert r["recovered"] is True
        assert [(m := await h.msg())["off"], m["data"]] == [11, {"v": 11}]
        # up to date: nothing is sent again
        same = await WsClient.connect(node.ws_port)
        since = {"off": 11, "epoch": epoch}
        r = await same.request({"op": "sub", "ch": "state:price", "since": since}, "subscribed")
        assert r["recovered"] is True
        await pub.pub("state:price", {"v": 12})
        assert (await same.msg())["off"] == 12
        # a namespace with stream recovery (the default) still replays the gap
        await pub.pub("events:x", {"v": 1})
        ev = await WsClient.connect(node.ws_port)
        r = await ev.request({"op": "sub", "ch": "events:x", "history": 1}, "subscribed")
        e_epoch = r["epoch"]
        for i in range(2, 6):
            await pub.pub("events:x", {"v": i})
        ev2 = await WsClient.connect(node.ws_port)
        since = {"off": 1, "epoch": e_epoch}
        await ev2.request({"op": "sub", "ch": "events:x", "since": since}, "subscribed")
        assert [(await ev2.msg())["off"] for _ in range(4)] == [2, 3, 4, 5]


async def test_cache_recovery_after_a_restart_reads_the_latest_from_sqlite(
    node_factory: Any, tmp_path: Path
) -> None:
    db = str(tmp_path / "r.db")
    node = await node_factory(store_path=db, namespaces=NAMESPACES)
    pub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        r = await pub.request({"op": "sub", "ch": "state:doc"}, "subscribed")
        for i in range(1, 8):
            await pub.pub("state:doc", {"rev": i})
        doc_epoch = r["epoch"]
        assert doc_epoch
        await node.stop()
        node2 = await node_factory(store_path=db, namespaces=NAMESPACES)
        c = await WsClient.connect(node2.ws_port)
        since = {"off": 2, "epoch": doc_epoch}
        r = await c.request({"op": "sub", "ch": "state:doc", "since": since}, "subscribed")
        assert (r["off"], r["recovered"]) == (7, True)
        assert (await c.msg())["data"] == {"rev": 7}


async def test_sdk_reconnect_on_a_cache_channel_gets_the_latest(node_factory: Any) -> None:
    from fastim.client import Backoff

    node = await node_factory(namespaces=NAMESPACES)
    url = f"ws://127.0.0.1:{node.ws_port}/ws"
    async with deadline(20):
        pub = await connect(url)
        # a fixed 0.5 s before reconnecting: the changes below are all made by then
        c = await connect(url, user="carol", backoff=Backoff(base=0.5, max=0.5, jitter="none"))
        try:
            sub = await c.subscribe("state:score")
            await pub.publish("state:score", {"home": 0})
            assert (await sub.get()).data == {"home": 0}
            # carol's connection drops; the score changes 5 times meanwhile
            for s in list(node.sessions):
                if s.user == "carol":
                    s.close_transport(abort=True)
            await wait_until(lambda: not c.connected, what="carol disconnected")
            for i in range(1, 6):
                await pub.publish("state:score", {"home": i})
            nxt = await sub.get()
            assert nxt.data == {"home": 5} and nxt.offset == 6  # the state, not 5 changes
            assert c.reconnects == 1
        finally:
            await pub.aclose()
            await c.aclose()


def test_cache_needs_history() -> None:
    with pytest.raises(ConfigError, match=r"recovery.*history_size must be >= 1"):
        Config(namespaces={"s": {"recovery": "cache", "history_size": 0}}).validate()
    with pytest.raises(ConfigError, match="must be one of stream, cache"):
        Config(namespaces={"s": {"recovery": "latest"}}).validate()
