"""Proxy hooks against a real backend (tests/backend/_app.py: aiohttp on loopback) and
real clients (the ``websockets`` library, raw TCP): connect by cookie, channel vetoes,
publishes refused, rewritten and persisted, rpc, refresh, and a backend that is down,
slow or broken (its breaker opens, clients get 120, it closes again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fastim.node import Node
from fastim.protocol import CloseCode, ErrorCode, FrameType, pack_hello, unpack_goaway
from tests.conftest import NodeFactory
from tests.server._support import TcpClient, deadline, http_exchange, wait_until

from ._app import Backend, serve

T = 5.0


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async for b in serve(Backend()):
        yield b


async def ws_connect(node: Node, sid: str | None = None) -> ClientConnection:
    headers = {"Cookie": f"theme=dark; sid={sid}"} if sid else {}
    return await connect(
        f"ws://127.0.0.1:{node.ws_port}/ws", additional_headers=headers, open_timeout=T
    )


async def recv(ws: ClientConnection, op: str, timeout: float = T) -> dict[str, Any]:
    """The next message with ``op`` (others before it are skipped)."""
    async with deadline(timeout):
        while True:
            msg: dict[str, Any] = orjson.loads(await ws.recv())
            if msg.get("op") == op:
                return msg


async def request(ws: ClientConnection, obj: dict[str, Any], op: str) -> dict[str, Any]:
    """Send a command with an id; its reply (``op``) or error, whichever comes."""
    rid = obj.setdefault("id", int(time.monotonic() * 1e6) % 1_000_000_000)
    await ws.send(orjson.dumps(obj).decode())
    async with deadline(T):
        while True:
            msg: dict[str, Any] = orjson.loads(await ws.recv())
            if msg.get("id") == rid and msg.get("op") in (op, "error"):
                return msg


async def closed_with(ws: ClientConnection) -> tuple[int, str, list[dict[str, Any]]]:
    """Read to the close; (code, reason, JSON messages before it)."""
    before = []
    try:
        async with deadline(T):
            async for m in ws:
                before.append(orjson.loads(m))
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or "", before


async def proxied(node_factory: NodeFactory, backend: Backend, *hooks: str, **kw: Any) -> Node:
    return await node_factory(**backend.hook_urls(*hooks), **kw)


# ---------------------------------------------------------------------- connect


async def test_connect_by_cookie_gives_the_user_its_channels_and_data(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "connect")
    ws = await ws_connect(node, "s-alice")
    welcome = await request(ws, {"op": "hello"}, "welcome")
    assert welcome["user"] == "alice"
    assert welcome["data"] == {"greeting": "hello alice"}
    # the connect hook's channels are subscribed by the node, no request of the client's
    subscribed = {(await recv(ws, "subscribed"))["ch"] for _ in range(2)}
    assert subscribed == {"news", "inbox:alice"}
    # what the backend was sent: the cookie (configured headers only), Centrifugo's fields
    [(hook, body, headers)] = backend.requests
    assert hook == "connect"
    assert headers["cookie"] == "theme=dark; sid=s-alice"
    assert "sec-websocket-key" not in headers and headers["content-type"] == "application/json"
    assert body["transport"] == "websocket" and body["protocol"] == "json"
    assert body["encoding"] == "json" and len(body["client"]) == 36 and body["user"] == ""
    # a message to a server-side channel reaches it; presence knows the user
    node.hub.publish("news", b'{"n":1}')
    msg = await recv(ws, "msg")
    assert (msg["ch"], msg["data"]) == ("news", {"n": 1})
    assert node.hub.presence("news")["users"] == ["alice"]
    await ws.close()


async def test_a_cookie_the_backend_sets_is_not_sent_for_another_connection(
    node_factory: NodeFactory, backend: Backend
) -> None:
    # a host name: aiohttp's default cookie jar keeps no cookie of a bare IP address
    node = await node_factory(proxy_connect_url=f"http://localhost:{backend.port}/connect")
    for sid in ("s-alice", "s-bob"):
        ws = await ws_connect(node, sid)
        await request(ws, {"op": "hello"}, "welcome")
        await ws.close()
    cookies = [h["cookie"] for hook, _, h in backend.requests if hook == "connect"]
    assert cookies == ["theme=dark; sid=s-alice", "theme=dark; sid=s-bob"]


async def test_connect_refusals_close_the_connection(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "connect")
    # no cookie: the backend's disconnect, code and reason as it gave them
    code, reason, _ = await closed_with(await ws_connect(node))
    assert (code, reason) == (4501, "unauthorized")
    # the backend's error: its code to the client, then 4501 (do not retry as is)
    code, reason, before = await closed_with(await ws_connect(node, "s-mallory"))
    assert code == CloseCode.AUTH_FAILED and reason == "banned"
    assert [(m["op"], m["code"]) for m in before] == [("error", 403)]


async def test_commands_sent_before_the_answer_wait_for_it(
    node_factory: NodeFactory, backend: Backend
) -> None:
    """A client that subscribes right after the upgrade gets the connect hook's user
    for it: the sub waited for the answer, then the subscribe hook saw alice."""
    node = await proxied(node_factory, backend, "connect", "subscribe", "publish")
    backend.mode, backend.slow_for = "slow", 0.3
    ws = await ws_connect(node, "s-alice")
    await ws.send(orjson.dumps({"op": "sub", "ch": "private:alice", "id": 1}).decode())
    await ws.send(
        orjson.dumps({"op": "pub", "ch": "chat:a", "data": {"text": "x"}, "id": 2}).decode()
    )
    await asyncio.sleep(0.05)
    backend.mode = "ok"  # the connect hook is still asleep: these wait behind it
    got = [orjson.loads(await ws.recv()) for _ in range(4)]
    ops = [(m["op"], m.get("id"), m.get("ch")) for m in got]
    assert ("subscribed", 1, "private:alice") in ops and ("puback", 2, "chat:a") in ops
    assert [h for h, _, _ in backend.requests] == ["connect", "subscribe", "publish"]
    assert backend.bodies("subscribe")[0]["user"] == "alice"
    assert backend.stored == [{"id": 1, "by": "alice", "text": "x", "channel": "chat:a"}]
    await ws.close()


async def test_tcp_connect_hook_at_hello_with_its_data(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "connect")
    c = await TcpClient.connect(node.tcp_port, hello=False)
    c.send(FrameType.HELLO, pack_hello(1, 1, orjson.dumps({"data": {"sid": "s-bob"}})))
    p = await c.expect(FrameType.WELCOME)
    info = orjson.loads(p[1:])
    assert info["user"] == "bob"
    body = backend.bodies("connect")[0]
    assert body["transport"] == "tcp" and body["protocol"] == "fastim"
    assert body["data"] == {"sid": "s-bob"}
    # refused over TCP (no session): GOAWAY with the backend's disconnect code and reason
    c2 = await TcpClient.connect(node.tcp_port, hello=False)
    c2.send(FrameType.HELLO, pack_hello(1, 1, b"{}"))
    assert unpack_goaway(await c2.expect(FrameType.GOAWAY)) == (4501, "unauthorized")


# ---------------------------------------------------------------------- subscribe


async def test_subscribe_hook_vetoes_channels(node_factory: NodeFactory, backend: Backend) -> None:
    node = await proxied(
        node_factory,
        backend,
        "connect",
        "subscribe",
        namespaces={"open": {"proxy_subscribe": False}},
    )
    ws = await ws_connect(node, "s-alice")
    refused = await request(ws, {"op": "sub", "ch": "secret:plans"}, "subscribed")
    assert (refused["op"], refused["code"], refused["reason"]) == (
        "error",
        403,
        "permission denied",
    )
    refused = await request(ws, {"op": "sub", "ch": "private:bob"}, "subscribed")
    assert refused["code"] == 403 and refused["reason"] == "not your channel"
    ok = await request(ws, {"op": "sub", "ch": "private:alice", "data": {"x": 1}}, "subscribed")
    assert ok["op"] == "subscribed"
    assert backend.bodies("subscribe")[-1]["data"] == {"x": 1}
    # a namespace with proxy_subscribe = false does not ask the backend
    n = len(backend.bodies("subscribe"))
    ok = await request(ws, {"op": "sub", "ch": "open:lobby"}, "subscribed")
    assert ok["op"] == "subscribed" and len(backend.bodies("subscribe")) == n
    # the connection stayed up through the refusals (they are not fatal)
    assert (await request(ws, {"op": "ping"}, "pong"))["op"] == "pong"
    await ws.close()


# ---------------------------------------------------------------------- publish


async def test_publish_refused_rewritten_persisted_in_order(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "connect", "publish")
    alice = await ws_connect(node, "s-alice")
    bob = await ws_connect(node, "s-bob")
    await request(bob, {"op": "sub", "ch": "chat:room"}, "subscribed")
    refused = await request(
        alice, {"op": "pub", "ch": "chat:room", "data": {"text": "spam!"}}, "puback"
    )
    assert (refused["op"], refused["code"], refused["reason"]) == ("error", 1000, "no spam here")
    # 30 publishes sent back to back: each asked the backend, all in order
    for i in range(30):
        cmd = {"op": "pub", "ch": "chat:room", "data": {"text": f"m{i}"}, "id": 100 + i}
        await alice.send(orjson.dumps(cmd).decode())
    acks = [await recv(alice, "puback") for _ in range(30)]
    assert [a["id"] for a in acks] == list(range(100, 130))
    assert [a["off"] for a in acks] == sorted(a["off"] for a in acks)
    got = [(await recv(bob, "msg"))["data"] for _ in range(30)]
    # the subscribers get the backend's row (its id and author), not the client's data
    assert got == [{"id": i + 1, "by": "alice", "text": f"m{i}"} for i in range(30)]
    assert [r["text"] for r in backend.stored] == [f"m{i}" for i in range(30)]
    # a channel outside chat: allowed unchanged
    ok = await request(alice, {"op": "pub", "ch": "other", "data": {"text": "plain"}}, "puback")
    assert ok["op"] == "puback"
    await alice.close()
    await bob.close()


# ---------------------------------------------------------------------- rpc


async def test_rpc_through_the_connection(node_factory: NodeFactory, backend: Backend) -> None:
    node = await proxied(node_factory, backend, "connect", "rpc")
    ws = await ws_connect(node, "s-bob")
    r = await request(ws, {"op": "rpc", "method": "sum", "data": {"numbers": [1, 2, 39]}}, "rpc")
    assert r["data"] == {"sum": 42}
    r = await request(ws, {"op": "rpc", "method": "whoami"}, "rpc")
    assert r["data"] == {"user": "bob", "meta": {"sid": "s-bob"}}  # the connect hook's meta
    r = await request(ws, {"op": "rpc", "method": "nope"}, "rpc")
    assert (r["op"], r["code"], r["reason"]) == ("error", 404, "no method 'nope'")
    await ws.close()
    # a node without the rpc hook: NOT_AVAILABLE, the connection stays
    plain = await node_factory()
    ws = await ws_connect(plain)
    r = await request(ws, {"op": "rpc", "method": "sum"}, "rpc")
    assert r["code"] == ErrorCode.NOT_AVAILABLE
    assert (await request(ws, {"op": "ping"}, "pong"))["op"] == "pong"
    await ws.close()


# ---------------------------------------------------------------------- failures


async def metric(node: Node, name: str) -> float:
    """A sample's value from the node's /metrics (0 when absent)."""
    _status, _h, body = await http_exchange(
        node.ws_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_backend_down_opens_the_breaker_which_closes_again(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(
        node_factory,
        backend,
        "subscribe",
        proxy_breaker_failures=3,
        proxy_breaker_cooldown=0.5,
    )
    ws = await ws_connect(node)
    backend.mode = "down"
    for i in range(3):
        r = await request(ws, {"op": "sub", "ch": f"room:{i}"}, "subscribed")
        assert r["code"] == ErrorCode.BACKEND_UNAVAILABLE and "HTTP 500" in r["reason"]
    asked = len(backend.requests)
    # open: the next ones fail at once, without a request to the backend
    t0 = time.monotonic()
    for i in range(5):
        r = await request(ws, {"op": "sub", "ch": f"room:x{i}"}, "subscribed")
        assert r["code"] == ErrorCode.BACKEND_UNAVAILABLE and "circuit breaker open" in r["reason"]
    assert time.monotonic() - t0 < 0.5 and len(backend.requests) == asked
    assert await metric(node, 'fastim_proxy_breaker_state{hook="subscribe"}') == 2
    assert (
        await metric(node, 'fastim_proxy_requests_total{hook="subscribe",outcome="breaker_open"}')
        == 5
    )
    # the backend recovers; after the cooldown one probe goes through and closes it
    backend.mode = "ok"
    await asyncio.sleep(0.6)
    r = await request(ws, {"op": "sub", "ch": "room:back"}, "subscribed")
    assert r["op"] == "subscribed"
    assert await metric(node, 'fastim_proxy_breaker_state{hook="subscribe"}') == 0
    assert await metric(node, 'fastim_proxy_breaker_opened_total{hook="subscribe"}') == 1
    await ws.close()


async def test_backend_unreachable_and_connect_hook_down(
    node_factory: NodeFactory, backend: Backend
) -> None:
    """A backend that is gone (connection refused): connects fail with 120 and close
    4004 (reconnect later); the node's other clients carry on."""
    node = await proxied(node_factory, backend, "connect", proxy_breaker_failures=100)
    ok = await ws_connect(node, "s-alice")
    assert (await request(ok, {"op": "hello"}, "welcome"))["user"] == "alice"
    backend.port, dead = 1, backend.port  # point nowhere: nothing listens on port 1
    node.proxy.hooks["connect"].url = "http://127.0.0.1:1/connect"
    code, _reason, before = await closed_with(await ws_connect(node, "s-alice"))
    assert code == CloseCode.BACKEND_UNAVAILABLE
    assert before[0]["code"] == ErrorCode.BACKEND_UNAVAILABLE
    assert "could not be reached" in before[0]["reason"]
    assert (await request(ok, {"op": "ping"}, "pong"))["op"] == "pong"
    assert dead != 1
    await ok.close()


async def test_slow_backend_times_out_and_garbage_is_refused(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "publish", proxy_timeout=0.2)
    ws = await ws_connect(node)
    backend.mode, backend.slow_for = "slow", 2.0
    t0 = time.monotonic()
    r = await request(ws, {"op": "pub", "ch": "a", "data": 1}, "puback")
    assert r["code"] == ErrorCode.BACKEND_UNAVAILABLE
    assert "did not answer within 0.2s" in r["reason"]
    assert time.monotonic() - t0 < 1.5
    backend.mode = "garbage"
    r = await request(ws, {"op": "pub", "ch": "a", "data": 1}, "puback")
    assert r["code"] == ErrorCode.BACKEND_UNAVAILABLE and "not a JSON object" in r["reason"]
    backend.mode = "badcode"
    r = await request(ws, {"op": "pub", "ch": "a", "data": 1}, "puback")
    assert r["code"] == ErrorCode.BACKEND_UNAVAILABLE and "400..1999" in r["reason"]
    assert node.hub.published == 0  # neither was published
    await ws.close()


# ---------------------------------------------------------------------- refresh


async def test_refresh_extends_then_expires(node_factory: NodeFactory, backend: Backend) -> None:
    node = await proxied(node_factory, backend, "connect", "refresh")
    # whole seconds, as Centrifugo's expire_at (the app sends int(...)): margins of 1 s
    backend.expire_at = time.time() + 1.5
    backend.refresh_to = time.time() + 3.5
    ws = await ws_connect(node, "s-alice")
    assert (await request(ws, {"op": "hello"}, "welcome"))["user"] == "alice"
    # the first expire_at came: the refresh hook extended it
    await wait_until(lambda: backend.bodies("refresh"), 5, "the first refresh")
    assert (await request(ws, {"op": "ping"}, "pong"))["op"] == "pong"
    assert backend.bodies("refresh")[0]["user"] == "alice"
    backend.expired_users.add("alice")  # the next refresh says the session is over
    code, _reason, _ = await closed_with(ws)
    assert code == CloseCode.EXPIRED
    assert len(backend.bodies("refresh")) == 2


async def test_expire_at_without_refresh_hook_closes(
    node_factory: NodeFactory, backend: Backend
) -> None:
    node = await proxied(node_factory, backend, "connect")
    backend.expire_at = time.time() + 0.5
    ws = await ws_connect(node, "s-bob")
    t0 = time.monotonic()
    code, reason, _ = await closed_with(ws)
    assert code == CloseCode.EXPIRED and "expired" in reason
    assert 0.2 < time.monotonic() - t0 < 3.0


async def test_sdk_rpc_over_tcp(node_factory: NodeFactory, backend: Backend) -> None:
    """The Python SDK's rpc() over the TCP transport (CMD frames), on a node whose
    users are declared (no connect hook): the backend sees the declared user."""
    from fastim.client import connect as sdk_connect
    from fastim.errors import RequestError

    node = await proxied(node_factory, backend, "rpc")
    async with await sdk_connect(f"tcp://127.0.0.1:{node.tcp_port}", user="carol") as c:
        assert await c.rpc("sum", {"numbers": [20, 22]}) == {"sum": 42}
        assert (await c.rpc("whoami"))["user"] == "carol"
        with pytest.raises(RequestError) as e:
            await c.rpc("missing")
        assert e.value.code == 404
    body = backend.bodies("rpc")[0]
    assert (body["transport"], body["protocol"]) == ("tcp", "fastim")


async def test_connect_hook_channels_recover_from_the_url_position(
    node_factory: NodeFactory, backend: Backend
) -> None:
    """A client back after a drop gives where its server-side channels were (``subs``
    in its upgrade URL, as fastim.js does): the node recovers them from there."""
    import urllib.parse

    node = await proxied(node_factory, backend, "connect")
    ws = await ws_connect(node, "s-alice")
    first = {(await recv(ws, "subscribed"))["ch"]: None for _ in range(2)}
    assert set(first) == {"news", "inbox:alice"}
    for i in range(1, 6):
        node.hub.publish("news", orjson.dumps({"i": i}))
    got = [await recv(ws, "msg") for _ in range(5)]
    await ws.close()
    epoch = node.hub.channels["news"].epoch
    where = urllib.parse.quote(orjson.dumps({"news": {"off": 2, "epoch": epoch}}).decode())
    back = await connect(
        f"ws://127.0.0.1:{node.ws_port}/ws?subs={where}",
        additional_headers={"Cookie": "sid=s-alice"},
        open_timeout=T,
    )
    seen: list[dict[str, Any]] = []
    async with deadline(T):
        while len([m for m in seen if m.get("op") == "msg"]) < 3:
            seen.append(orjson.loads(await back.recv()))
    news = next(m for m in seen if m.get("op") == "subscribed" and m["ch"] == "news")
    assert news["recovered"] is True
    assert [m["data"]["i"] for m in seen if m.get("op") == "msg"] == [3, 4, 5]
    assert [m["off"] for m in got] == [1, 2, 3, 4, 5]
    await back.close()
