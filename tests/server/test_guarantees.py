"""Delivery guarantees over real sockets: recovery with epochs, direct messages, presence.

Each test runs on a node with the memory, the sqlite and the redis store (a real
redis-server): channel history in node memory vs. in a durable store take different
paths through the hub (synchronous vs. one append per channel per tick).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from store._redis import RedisServer  # type: ignore[import-not-found]

from fastim import _core
from fastim.node import Node
from fastim.protocol import ErrorCode, FrameType, pack_hello, unpack_msg, unpack_subscribed

from ._support import TcpClient, WsClient, deadline

F = FrameType
STORES = ["memory", "sqlite", "redis"]


@pytest.fixture(scope="module")
def redis_for_guarantees(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-guarantees")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=STORES)
async def store_node(
    request: pytest.FixtureRequest, node_factory: Any, tmp_path: Path
) -> AsyncIterator[Any]:
    """A factory of nodes on one store (the same sqlite file / redis prefix each call)."""
    kind = request.param
    settings: dict[str, Any] = {"store": kind}
    if kind == "sqlite":
        settings["store_path"] = str(tmp_path / "fastim.db")
    elif kind == "redis":
        server = request.getfixturevalue("redis_for_guarantees")
        settings["redis_url"] = server.url
        settings["redis_prefix"] = "t" + os.urandom(6).hex()  # one history per test

    async def make(**more: Any) -> Node:
        node: Node = await node_factory(**{**settings, **more})
        return node

    yield make


async def _msgs(ws: WsClient, n: int) -> list[dict[str, Any]]:
    return [await ws.msg() for _ in range(n)]


# --------------------------------------------------------------------------- recovery


async def test_recovery_after_reconnect_is_gapless_then_live(store_node: Any) -> None:
    node = await store_node(history_size=100)
    pub = await WsClient.connect(node.ws_port)
    sub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        r = await sub.request({"op": "sub", "ch": "news"}, "subscribed")
        epoch, off0 = r["epoch"], r["off"]
        assert r["recovered"] is False
        for i in range(5):
            await pub.pub("news", {"i": i})
        got = await _msgs(sub, 5)
        assert [m["off"] for m in got] == [off0 + 1 + i for i in range(5)]
        last = got[-1]["off"]
        await sub.close()
        for i in range(5, 12):  # missed while away
            await pub.pub("news", {"i": i})
        back = await WsClient.connect(node.ws_port)
        r = await back.request(
            {"op": "sub", "ch": "news", "since": {"off": last, "epoch": epoch}}, "subscribed"
        )
        assert r["recovered"] is True and r["epoch"] == epoch and r["off"] == last + 7
        missed = await _msgs(back, 7)
        assert [m["data"]["i"] for m in missed] == list(range(5, 12))
        assert [m["off"] for m in missed] == list(range(last + 1, last + 8))
        await pub.pub("news", {"i": 12})  # then live, no duplicate, no gap
        live = await back.msg()
        assert live["data"] == {"i": 12} and live["off"] == last + 8
    for c in (pub, back):
        await c.close()


async def test_too_long_a_gap_is_not_recovered(store_node: Any) -> None:
    node = await store_node(history_size=3)
    pub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        first = await pub.pub("short", {"i": 0})
        epoch = (await pub.request({"op": "sub", "ch": "short"}, "subscribed"))["epoch"]
        for i in range(1, 10):
            await pub.pub("short", {"i": i})
        back = await WsClient.connect(node.ws_port)
        r = await back.request(
            {"op": "sub", "ch": "short", "since": {"off": first, "epoch": epoch}}, "subscribed"
        )
        assert r["recovered"] is False
        # what the node still had is sent, in order
        kept = await _msgs(back, 3)
        assert [m["data"]["i"] for m in kept] == [7, 8, 9]
    await pub.close()
    await back.close()


async def test_another_epoch_is_not_recovered_and_the_current_one_is_sent_whole(
    store_node: Any,
) -> None:
    """A position in an older epoch: recovered false (what that epoch had after it may
    be lost), then every message of the current epoch still kept, from its start, then
    live ones (issue P7: answering live only skipped what was published in between)."""
    node = await store_node()
    c = await WsClient.connect(node.ws_port)
    async with deadline(10):
        await c.pub("ep", {"a": 1})
        await c.pub("ep", {"a": 2})
        r = await c.request(
            {"op": "sub", "ch": "ep", "since": {"off": 7, "epoch": "not-this-one"}}, "subscribed"
        )
        assert r["recovered"] is False and r["epoch"] != "not-this-one" and r["off"] == 2
        got = [await c.msg(), await c.msg()]
        assert [(m["off"], m["data"]) for m in got] == [(1, {"a": 1}), (2, {"a": 2})]
        await c.pub("ep", {"a": 3})
        assert (await c.msg())["data"] == {"a": 3}  # then live
    await c.close()


async def test_sqlite_history_survives_a_restart_with_its_epoch(
    node_factory: Any, tmp_path: Path
) -> None:
    db = str(tmp_path / "restart.db")
    node = await node_factory(store="sqlite", store_path=db)
    c = await WsClient.connect(node.ws_port)
    async with deadline(20):
        r = await c.request({"op": "sub", "ch": "dur"}, "subscribed")
        epoch = r["epoch"]
        offs = [await c.pub("dur", {"i": i}) for i in range(4)]
        await _msgs(c, 4)
    await c.close()
    await node.stop()
    node2 = await node_factory(store="sqlite", store_path=db)
    c2 = await WsClient.connect(node2.ws_port)
    async with deadline(20):
        r = await c2.request(
            {"op": "sub", "ch": "dur", "since": {"off": offs[1], "epoch": epoch}}, "subscribed"
        )
        assert r == {**r, "epoch": epoch, "recovered": True, "off": offs[-1]}
        assert [m["data"]["i"] for m in await _msgs(c2, 2)] == [2, 3]
        assert await c2.pub("dur", {"i": 4}) == offs[-1] + 1
    await c2.close()


async def test_binary_clients_recover_through_cmd_frames(store_node: Any) -> None:
    node = await store_node()
    tcp = await TcpClient.connect(node.tcp_port)
    async with deadline(20):
        await tcp.sub("bin")
        offs = [await tcp.pub("bin", b'{"n":%d}' % i) for i in range(3)]
        for _ in range(3):
            await tcp.msg()
        # the SUB frame's reply carries the epoch now
        again = await TcpClient.connect(node.tcp_port)
        again.send(F.SUB, b"\x00\x00\x00\x09" + bytes((3,)) + b"bin")
        _rid, off, ch, epoch, recovered = unpack_subscribed(await again.expect(F.SUBSCRIBED))
        assert (off, ch, recovered) == (offs[-1], "bin", False) and len(epoch) == 12
        cmd = {"op": "sub", "ch": "bin", "since": {"off": offs[0], "epoch": epoch}, "id": 5}
        third = await TcpClient.connect(node.tcp_port)
        third.send(F.CMD, orjson.dumps(cmd))
        reply = orjson.loads(await third.expect(F.EVENT))
        assert reply["op"] == "subscribed" and reply["recovered"] is True and reply["id"] == 5
        got = [await third.msg() for _ in range(2)]
        assert [(o, d) for o, _c, d in got] == [(offs[1], b'{"n":1}'), (offs[2], b'{"n":2}')]
    for c in (tcp, again, third):
        await c.close()


# --------------------------------------------------------------------------- users and DMs


async def _user(node: Node, name: str) -> WsClient:
    c = await WsClient.connect(node.ws_port)
    r = await c.request({"op": "hello", "user": name}, "welcome")
    assert r["user"] == name
    return c


async def test_direct_message_reaches_every_connection_and_is_idempotent(
    store_node: Any,
) -> None:
    node = await store_node()
    async with deadline(20):
        alice = await _user(node, "alice")
        bob1 = await _user(node, "bob")
        bob2 = await _user(node, "bob")
        sent = await alice.request(
            {"op": "send", "to": "bob", "data": {"text": "hi"}, "cid": "c-1"}, "sent"
        )
        assert sent["seq"] == 1 and sent["dup"] is False and sent["to"] == "bob"
        epoch = sent["epoch"]  # the inbox's: seq counts within it
        assert isinstance(epoch, str) and len(epoch) == 12
        for b in (bob1, bob2):
            dm = await b.recv_json()
            assert dm == {
                "op": "dm",
                "epoch": epoch,
                "from": "alice",
                "mid": sent["mid"],
                "seq": 1,
                "data": {"text": "hi"},
            }
        again = await alice.request(
            {"op": "send", "to": "bob", "data": {"text": "hi"}, "cid": "c-1"}, "sent"
        )
        assert (again["mid"], again["seq"], again["dup"], again["epoch"]) == (
            sent["mid"],
            1,
            True,
            epoch,
        )
        # an ack naming another epoch (a client still in an old numbering) changes nothing
        stale = await bob1.request({"op": "ack", "seq": 1, "epoch": "0123456789ab"}, "acked")
        assert (stale["seq"], stale["epoch"]) == (0, epoch)
        acked = await bob1.request({"op": "ack", "seq": 1, "epoch": epoch}, "acked")
        assert (acked["seq"], acked["epoch"]) == (1, epoch)
        st = await bob2.request({"op": "inbox"}, "inbox")
        assert (st["acked"], st["top"], st["epoch"]) == (1, 1, epoch)
        bob2.send_json({"op": "ack", "seq": 1, "epoch": 7})  # a bad field: named, closed
        bad = await bob2.recv_json()
        assert bad["code"] == ErrorCode.BAD_REQUEST and '"epoch"' in bad["reason"]
    for c in (alice, bob1, bob2):
        await c.close()


async def test_offline_messages_arrive_on_connect_then_live(store_node: Any) -> None:
    node = await store_node()
    async with deadline(20):
        alice = await _user(node, "alice")
        for i in range(3):
            await alice.request({"op": "send", "to": "carol", "data": {"i": i}}, "sent")
        carol = await WsClient.connect(node.ws_port)
        carol.send_json({"op": "hello", "user": "carol", "id": 1})
        welcome = await carol.recv_json()
        assert welcome["op"] == "welcome"
        backlog = [await carol.recv_json() for _ in range(3)]
        assert [(d["op"], d["seq"], d["data"]["i"]) for d in backlog] == [
            ("dm", 1, 0),
            ("dm", 2, 1),
            ("dm", 3, 2),
        ]
        await carol.request({"op": "ack", "seq": 2}, "acked")
        await alice.request({"op": "send", "to": "carol", "data": {"i": 3}}, "sent")
        live = await carol.recv_json()
        assert (live["seq"], live["data"]) == (4, {"i": 3})
        # a second connection of carol's gets only what is unacknowledged: 3 and 4
        carol2 = await WsClient.connect(node.ws_port)
        carol2.send_json({"op": "hello", "user": "carol"})
        assert (await carol2.recv_json())["op"] == "welcome"
        assert [(await carol2.recv_json())["seq"] for _ in range(2)] == [3, 4]
    for c in (alice, carol, carol2):
        await c.close()


async def test_unacked_direct_messages_are_retried_until_acked(store_node: Any) -> None:
    node = await store_node(dm_retry=0.2)
    async with deadline(20):
        alice = await _user(node, "alice")
        dave = await _user(node, "dave")
        await alice.request({"op": "send", "to": "dave", "data": 1}, "sent")
        first = await dave.recv_json()
        retry = await dave.recv_json(timeout=3)
        assert retry == first  # the same message again, since it was not acked
        dave.send_json({"op": "ack", "seq": first["seq"]})
        await dave.pump(1.2)  # well past the next (doubled) retry times
        assert not [e for e in dave.events if orjson.loads(e[1]).get("op") == "dm"]
    for c in (alice, dave):
        await c.close()


async def test_user_commands_need_a_user_and_bad_fields_are_named(store_node: Any) -> None:
    node = await store_node()
    async with deadline(10):
        anon = await WsClient.connect(node.ws_port)
        r = await anon.request({"op": "send", "to": "x", "data": 1}, "error")
        assert r["code"] == ErrorCode.NO_USER
        eve = await _user(node, "eve")
        eve.send_json({"op": "send", "to": "", "data": 1, "id": 3})
        err = await eve.recv_json()
        assert err["code"] == ErrorCode.BAD_REQUEST and '"to"' in err["reason"]
    await anon.close()
    await eve.close()


async def test_tcp_user_from_hello_options(store_node: Any) -> None:
    node = await store_node()
    async with deadline(10):
        tcp = await TcpClient.connect(node.tcp_port, hello=False)
        tcp.send(F.HELLO, pack_hello(1, 1, b'{"user":"frank"}'))
        info = orjson.loads((await tcp.expect(F.WELCOME))[1:])
        assert info["user"] == "frank"
        alice = await _user(node, "alice")
        await alice.request({"op": "send", "to": "frank", "data": {"x": 1}}, "sent")
        dm = orjson.loads(await tcp.expect(F.EVENT))
        assert dm["op"] == "dm" and dm["from"] == "alice" and dm["data"] == {"x": 1}
        tcp.send(F.CMD, b'{"op":"ack","seq":1,"id":9}')
        assert orjson.loads(await tcp.expect(F.EVENT)) == {
            "op": "acked",
            "seq": 1,
            "epoch": dm["epoch"],
            "id": 9,
        }
    await tcp.close()
    await alice.close()


# --------------------------------------------------------------------------- presence


async def test_presence_and_join_leave(node_factory: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "ns.toml"
    cfg.write_text("[namespaces.room]\njoin_leave = true\n")
    from fastim.config import build

    settings = {k: v for k, v in vars(build(cfg)).items() if k == "namespaces"}
    node = await node_factory(**settings)
    async with deadline(10):
        a = await _user(node, "ann")
        b = await _user(node, "ben")
        anon = await WsClient.connect(node.ws_port)
        await a.sub("room:1")
        await b.sub("room:1")
        assert await a.recv_json() == {"op": "join", "ch": "room:1", "user": "ben"}
        await anon.sub("room:1")
        p = await anon.request({"op": "presence", "ch": "room:1"}, "presence")
        assert p["count"] == 3 and sorted(p["users"]) == ["ann", "ben"]
        await b.close()
        assert await a.recv_json() == {"op": "leave", "ch": "room:1", "user": "ben"}
        assert await anon.recv_json() == {"op": "leave", "ch": "room:1", "user": "ben"}
        # other namespaces do not announce
        await a.sub("lobby")
        await anon.sub("lobby")
        p = await anon.request({"op": "presence", "ch": "lobby"}, "presence")
        assert p["count"] == 2 and p["users"] == ["ann"]
    await a.close()
    await anon.close()


async def test_history_that_went_back_under_the_node_starts_a_new_epoch(
    node_factory: Any, redis_for_guarantees: RedisServer
) -> None:
    """Redis restored from an older snapshot keeps the channel's epoch with a lower top.
    The node must not give the offsets it delivered again (subscribers would drop the
    new messages as duplicates): it moves the channel to a new epoch, subscribers get
    ``resubscribe``, and a subscribe with the old position is not 'recovered'."""
    import redis.asyncio as aioredis

    prefix = "t" + os.urandom(6).hex()
    node = await node_factory(
        store="redis", redis_url=redis_for_guarantees.url, redis_prefix=prefix
    )
    pub = await WsClient.connect(node.ws_port)
    sub = await WsClient.connect(node.ws_port)
    async with deadline(20):
        r = await sub.request({"op": "sub", "ch": "news"}, "subscribed")
        epoch = r["epoch"]
        for i in range(5):
            assert await pub.pub("news", {"i": i}) == i + 1
        assert [m["off"] for m in await _msgs(sub, 5)] == [1, 2, 3, 4, 5]
        # what a restore of a snapshot taken after offset 2 looks like: same epoch, top 2
        r_ = aioredis.from_url(redis_for_guarantees.url)
        base = f"{prefix}:ch:{{news}}"
        kept: Any = await r_.xrange(base + ":s", "-", "2-0")
        async with r_.pipeline(transaction=True) as tx:
            tx.delete(base + ":s")
            for entry_id, fields in kept:
                tx.xadd(base + ":s", fields, id=entry_id)
            tx.hset(base + ":m", "top", 2)
            await tx.execute()
        await r_.aclose()
        off = await pub.pub("news", {"i": "after the restore"})
        assert off == 3
        ev = await sub.recv_json()
        assert ev["op"] == "resubscribe" and ev["ch"] == "news" and ev["epoch"] != epoch, ev
        again = await sub.request(
            {"op": "sub", "ch": "news", "since": {"off": 5, "epoch": epoch}}, "subscribed"
        )
        assert (again["epoch"], again["off"], again["recovered"]) == (ev["epoch"], 3, False)
        # the new epoch from its start (it kept what the restore kept), then live: the
        # messages after the old position are not skipped (the first two are the
        # restored copies of 1 and 2: after a restore the client is told by the gap)
        got = [await sub.msg() for _ in range(3)]
        assert [(m["off"], m["data"]["i"]) for m in got] == [
            (1, 0),
            (2, 1),
            (3, "after the restore"),
        ]
        assert await pub.pub("news", {"i": "live"}) == 4
        m = await sub.msg()
        assert (m["off"], m["data"]) == (4, {"i": "live"})
    await pub.close()
    await sub.close()


async def test_durable_publish_fails_loudly_when_redis_is_gone(
    node_factory: Any, tmp_path: Path
) -> None:
    (tmp_path / "r").mkdir()
    server = RedisServer(str(tmp_path / "r"))
    server.start()
    try:
        node = await node_factory(store="redis", redis_url=server.url, redis_timeout=0.5)
        c = await WsClient.connect(node.ws_port)
        live = await WsClient.connect(node.ws_port)
        async with deadline(30):
            await live.sub("r")
            assert await c.pub("r", {"ok": 1}) == 1
            server.pause()  # hung: no reply
            err = await c.request({"op": "pub", "ch": "r", "data": {"ok": 2}}, "error")
            assert err["code"] == ErrorCode.STORE_UNAVAILABLE
            assert "not stored" in err["reason"]
            await c.request({"op": "ping"}, "pong")  # the node is still serving
            server.resume()
            acked = None
            for i in range(50):
                c.send_json({"op": "pub", "ch": "r", "data": {"ok": 3}, "id": 100 + i})
                r = await c.recv_json()
                assert r["op"] in ("puback", "error") and r["id"] == 100 + i
                if r["op"] == "puback":
                    acked = r["off"]
                    break
                await asyncio.sleep(0.1)
            assert acked is not None, "publishing did not recover after Redis came back"
            # the publish that timed out may have been stored after all (its outcome was
            # unknown): a live subscriber then gets it too, in order, never a hole
            offs = [(await live.msg())["off"] for _ in range(acked)]
            assert offs == list(range(1, acked + 1))
        await c.close()
        await live.close()
    finally:
        server.stop()


def test_event_frames_decode_with_the_client_type_table() -> None:
    # EVENT is in the client's accepted types: a decoder built from the table takes it
    from fastim.protocol import SERVER_FRAME_TYPES, type_mask

    dec = _core.FrameDecoder(1 << 20, type_mask(SERVER_FRAME_TYPES))
    frame = _core.encode_frame(F.EVENT, b'{"op":"join"}')
    assert dec.feed(frame) == [(F.EVENT, b'{"op":"join"}')]
    assert unpack_msg(b"\x00" * 8 + b"\x01a{}") == (0, "a", b"{}")
