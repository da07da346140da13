"""Server-side subscriptions: the node subscribes a connection by itself to its token's
``subs`` (and a connect hook's ``channels``: tests/backend), and, with
``personal_channels``, to its user's ``#<user>``; a client that comes back gives where it
was (``subs`` in its hello or its upgrade URL) and the node recovers from there. Over
real sockets, raw WebSocket and TCP clients."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import jwt
import orjson

from fastim.protocol import ErrorCode, FrameType, pack_hello

from ._support import TcpClient, WsClient, deadline, http_exchange, upgrade_request

SECRET = "a-test-secret-of-at-least-32-bytes!!"
F = FrameType


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600, **claims}, SECRET, "HS256")


async def server_subscribed(
    ws: WsClient, n: int, msgs: list[dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The next ``n`` subscribed events without an id (the node's own), by channel; the
    messages that come among them (recovered ones) go to ``msgs``."""
    out: dict[str, dict[str, Any]] = {}
    while len(out) < n:
        r = await ws.recv_json()
        if r.get("op") != "subscribed":
            if msgs is not None and r.get("op") == "msg":
                msgs.append(r)
            continue
        assert "id" not in r, r
        out[r["ch"]] = r
    return out


async def ask(ws: WsClient, obj: dict[str, Any]) -> dict[str, Any]:
    """A command's reply or error (messages before it are skipped)."""
    obj = {**obj, "id": ws.next_id}
    ws.next_id += 1
    ws.send_json(obj)
    while True:
        r = await ws.recv_json()
        if r.get("id") == obj["id"]:
            return r


async def refused_upgrade(port: int, path: str) -> tuple[int, str]:
    req, _key = upgrade_request(port, path)
    status, _headers, body = await http_exchange(port, req)
    return status, body.decode()


async def test_token_subs_claim_subscribes_and_recovers(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    pub = await WsClient.connect(node.ws_port, f"/ws?token={token('pub')}")
    async with deadline(20):
        t = token("alice", subs=["news", "alerts"])
        ws = await WsClient.connect(node.ws_port, f"/ws?token={t}")
        subs = await server_subscribed(ws, 2)
        assert set(subs) == {"news", "alerts"}
        epoch = subs["news"]["epoch"]
        for i in range(1, 4):
            await pub.pub("news", {"i": i})
        assert [(await ws.msg())["off"] for _ in range(3)] == [1, 2, 3]
        # gone; two more published; back with where it was: recovered by the node
        ws.writer.close()
        for i in range(4, 6):
            await pub.pub("news", {"i": i})
        where = urllib.parse.quote(orjson.dumps({"news": {"off": 3, "epoch": epoch}}))
        back = await WsClient.connect(node.ws_port, f"/ws?token={t}&subs={where}")
        recovered: list[dict[str, Any]] = []
        subs = await server_subscribed(back, 2, recovered)
        assert subs["news"]["recovered"] is True and subs["news"]["off"] == 5
        assert [m["data"]["i"] for m in recovered] == [4, 5]
        # a subscribe of the client's own to a server-side channel: already subscribed
        r = await ask(back, {"op": "sub", "ch": "alerts"})
        assert r["op"] == "error" and r["code"] == ErrorCode.ALREADY_SUBSCRIBED


async def test_tcp_hello_token_and_positions(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    pub = await WsClient.connect(node.ws_port, f"/ws?token={token('pub')}")
    async with deadline(20):
        for i in range(1, 6):
            await pub.pub("feed", {"i": i})
        r = await pub.request({"op": "sub", "ch": "feed"}, "subscribed")
        opts = {
            "token": token("bob", subs={"feed": {}}),
            "subs": {"feed": {"off": 2, "epoch": r["epoch"]}},
        }
        c = await TcpClient.connect(node.tcp_port, hello=False)
        c.send(F.HELLO, pack_hello(1, 1, orjson.dumps(opts)))
        await c.expect(F.WELCOME)
        await c.expect(F.SUBSCRIBED)
        offs = [(await c.msg())[0] for _ in range(3)]
        assert offs == [3, 4, 5]


async def test_bad_positions_are_refused_clearly(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    t = token("carol", subs=["x"])
    async with deadline(10):
        status, body = await refused_upgrade(node.ws_port, f"/ws?token={t}&subs=%7Bnope")
        assert status == 400 and 'query parameter "subs"' in body
        bad = urllib.parse.quote('{"x": {"off": -1, "epoch": "e"}}')
        status, body = await refused_upgrade(node.ws_port, f"/ws?token={t}&subs={bad}")
        assert status == 400 and "since.off" in body


async def test_personal_channel_of_every_connection(node_factory: Any) -> None:
    node = await node_factory(personal_channels=1)
    async with deadline(20):
        a1 = await WsClient.connect(node.ws_port)
        a2 = await WsClient.connect(node.ws_port)
        for ws in (a1, a2):
            await ws.request({"op": "hello", "user": "alice"}, "welcome")
            assert set(await server_subscribed(ws, 1)) == {"#alice"}
        # the server publishes to her personal channel: every connection of hers gets it
        node.hub.publish("#alice", b'{"note":"for alice"}')  # as /api/publish does
        for ws in (a1, a2):
            m = await ws.msg()
            assert (m["ch"], m["data"]) == ("#alice", {"note": "for alice"})
        # clients neither subscribe nor publish there
        eve = await WsClient.connect(node.ws_port)
        await eve.request({"op": "hello", "user": "eve"}, "welcome")
        r = await ask(eve, {"op": "sub", "ch": "#alice"})
        assert r["code"] == ErrorCode.PERMISSION_DENIED and "personal" in r["reason"]
        r = await ask(eve, {"op": "pub", "ch": "#alice", "data": 1})
        assert r["code"] == ErrorCode.PERMISSION_DENIED
        # off (the default): "#..." is an ordinary channel name, nobody is subscribed
        plain = await node_factory()
        p = await WsClient.connect(plain.ws_port)
        await p.request({"op": "hello", "user": "alice"}, "welcome")
        r = await ask(p, {"op": "sub", "ch": "#alice"})
        assert r["op"] == "subscribed"
