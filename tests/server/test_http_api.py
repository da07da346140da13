"""The server HTTP API (fastim/api/http.py, docs/api.md) over real sockets.

Requests are written by hand (raw HTTP/1.1 on the WebSocket port), so what is tested is
what any HTTP client sees: status, headers and JSON bodies. Publishes and sends made
through the API must reach real subscribers and recipients exactly as a client's would.
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

from fastim.api import OPENAPI, ROUTES
from fastim.node import Node
from fastim.protocol import CloseCode, ErrorCode, FrameType, pack_hello, unpack_goaway
from fastim.store import StoreUnavailable

from ._support import Control, TcpClient, WsClient, deadline, http_exchange

KEY = "test-api-key-0123456789abcdef"
F = FrameType


def raw_request(
    method: str,
    path: str,
    body: Any = None,
    key: str | None = KEY,
    headers: bytes = b"",
    content_type: bytes = b"application/json",
) -> bytes:
    """One HTTP/1.1 request; ``body`` is JSON-encoded unless it is bytes already."""
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), path.encode())
    if key is not None:
        head += b"Authorization: Bearer %s\r\n" % key.encode()
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(data))
    return head + headers + b"\r\n" + data


async def call(
    node: Node, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body) of one API request."""
    status, headers, raw = await http_exchange(node.ws_port, raw_request(method, path, body, **kw))
    assert headers["content-type"] == "application/json", headers
    return status, headers, orjson.loads(raw)


@pytest.fixture
async def api_node(node_factory: Any) -> Node:
    node: Node = await node_factory(api_key=KEY)
    return node


@pytest.fixture(scope="module")
def redis_for_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-api")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store_api_node(
    request: pytest.FixtureRequest, node_factory: Any, tmp_path: Path
) -> AsyncIterator[Node]:
    """A node with the API on, on each store (channel history takes different paths)."""
    settings: dict[str, Any] = {"store": request.param, "api_key": KEY}
    if request.param == "sqlite":
        settings["store_path"] = str(tmp_path / "api.db")
    elif request.param == "redis":
        server = request.getfixturevalue("redis_for_api")
        settings["redis_url"] = server.url
        settings["redis_prefix"] = "api" + os.urandom(6).hex()  # a fresh keyspace
    yield await node_factory(**settings)


async def user_ws(node: Node, user: str) -> WsClient:
    ws = await WsClient.connect(node.ws_port)
    welcome = await ws.request({"op": "hello", "user": user}, "welcome")
    assert welcome["user"] == user
    return ws


# --------------------------------------------------------------------------- access


async def test_api_is_off_without_a_key(node: Node) -> None:
    for path in ROUTES:
        status, _h, body = await call(node, "GET", path)
        assert status == 404, path
        assert "api_key" in body["error"]


@pytest.mark.parametrize(
    "key, extra",
    [
        (None, b""),
        ("wrong-key-0123456789abcdef", b""),
        (KEY[:-1], b""),
        (None, b"Authorization: Basic " + KEY.encode() + b"\r\n"),
        (None, b"X-API-Key: not-the-key\r\n"),
    ],
)
async def test_missing_or_wrong_key_is_401(api_node: Node, key: str | None, extra: bytes) -> None:
    status, headers, body = await call(
        api_node, "POST", "/api/publish", {"channel": "a", "data": 1}, key=key, headers=extra
    )
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert "API key" in body["error"]
    assert api_node.hub.published == 0


async def test_bearer_and_x_api_key_both_work(api_node: Node) -> None:
    status, _h, body = await call(api_node, "POST", "/api/publish", {"channel": "a", "data": 1})
    assert (status, body["offset"]) == (200, 1)
    status, _h, body = await call(
        api_node,
        "POST",
        "/api/publish",
        {"channel": "a", "data": 2},
        key=None,
        headers=b"X-API-Key: " + KEY.encode() + b"\r\n",
    )
    assert (status, body["offset"]) == (200, 2)
    status, _h, body = await call(
        api_node,
        "POST",
        "/api/publish",
        {"channel": "a", "data": 3},
        key=None,
        headers=b"authorization: bearer " + KEY.encode() + b"\r\n",
    )
    assert (status, body["offset"]) == (200, 3)


# --------------------------------------------------------------------------- publish


async def test_publish_reaches_subscribers_of_every_transport(store_api_node: Node) -> None:
    node = store_api_node
    ws = await WsClient.connect(node.ws_port)
    tcp = await TcpClient.connect(node.tcp_port)
    async with deadline(10):
        await ws.sub("news")
        await tcp.sub("news")
        status, _h, body = await call(
            node, "POST", "/api/publish", {"channel": "news", "data": {"text": "hi"}}
        )
        assert status == 200
        off, epoch = body["offset"], body["epoch"]
        assert off == 1 and isinstance(epoch, str) and epoch
        m = await ws.msg()
        assert (m["ch"], m["off"], m["data"]) == ("news", off, {"text": "hi"})
        assert await tcp.msg() == (off, "news", b'{"text":"hi"}')
        # the epoch is the channel's: a subscriber with since in it recovers
        ws2 = await WsClient.connect(node.ws_port)
        reply = await ws2.request(
            {"op": "sub", "ch": "news", "since": {"off": 0, "epoch": epoch}}, "subscribed"
        )
        assert reply["recovered"] is True and reply["epoch"] == epoch
        assert (await ws2.msg())["data"] == {"text": "hi"}
    for c in (ws, ws2, tcp):
        await c.close()


async def test_publish_with_an_idempotency_key_is_stored_once(store_api_node: Node) -> None:
    """A backend that retries a publish (a timeout, a 503) with the same key: the retry
    is answered with the first offset and ``duplicate``, and not delivered again, on
    every store (memory: the owner's memory; sqlite, redis: the store's append)."""
    node = store_api_node
    ws = await WsClient.connect(node.ws_port)
    async with deadline(10):
        await ws.sub("orders")

        async def publish(data: Any, key: str | None) -> dict[str, Any]:
            body: dict[str, Any] = {"channel": "orders", "data": data}
            if key is not None:
                body["idempotency_key"] = key
            status, _h, answer = await call(node, "POST", "/api/publish", body)
            assert status == 200, answer
            return dict(answer)

        first = await publish({"n": 1}, "order-1")
        assert first["offset"] == 1 and "duplicate" not in first
        assert (await publish({"n": 2}, None))["offset"] == 2
        again = await publish({"n": 1}, "order-1")
        assert again == {**first, "duplicate": True}
        assert (await publish({"n": 3}, "order-3"))["offset"] == 3
        assert [(await ws.msg())["data"] for _ in range(3)] == [{"n": 1}, {"n": 2}, {"n": 3}]
        for bad in ("", "x" * 129, 7):
            status, _h, answer = await call(
                node,
                "POST",
                "/api/publish",
                {"channel": "orders", "data": 0, "idempotency_key": bad},
            )
            assert status == 400 and answer["field"] == "idempotency_key", answer
    await ws.close()


async def test_durable_publish_store_failure_is_503(node_factory: Any, tmp_path: Path) -> None:
    node = await node_factory(api_key=KEY, store="sqlite", store_path=str(tmp_path / "f.db"))
    ws = await WsClient.connect(node.ws_port)
    await ws.sub("news")

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise StoreUnavailable("sqlite store: disk on fire")

    assert node.store is not None
    node.store.append_many = broken
    status, _h, body = await call(node, "POST", "/api/publish", {"channel": "news", "data": 1})
    assert status == 503
    assert body["code"] == ErrorCode.STORE_UNAVAILABLE
    assert "disk on fire" in body["error"]
    # neither stored nor delivered: with the store back, a marker published next gets the
    # channel's first offset and is the subscriber's first message
    del node.store.append_many
    status, _h, body = await call(node, "POST", "/api/publish", {"channel": "news", "data": 2})
    assert (status, body["offset"]) == (200, 1)
    m = await ws.msg()
    assert (m["ch"], m["off"], m["data"]) == ("news", 1, 2)
    await ws.close()


async def test_broadcast_gives_one_result_per_channel(api_node: Node) -> None:
    subs = {}
    for ch in ("a", "b", "c"):
        subs[ch] = await WsClient.connect(api_node.ws_port)
        await subs[ch].sub(ch)
    await call(api_node, "POST", "/api/publish", {"channel": "b", "data": 0})
    status, _h, body = await call(
        api_node, "POST", "/api/broadcast", {"channels": ["a", "b", "c"], "data": {"n": 1}}
    )
    assert status == 200
    results = body["results"]
    assert [r["channel"] for r in results] == ["a", "b", "c"]
    assert [r["offset"] for r in results] == [1, 2, 1]
    assert all(isinstance(r["epoch"], str) for r in results)
    for ch, ws in subs.items():
        m = await ws.msg()
        if ch == "b":
            assert m["data"] == 0
            m = await ws.msg()
        assert m["data"] == {"n": 1}
        await ws.close()


async def test_broadcast_reports_a_failing_channel_and_publishes_the_others(
    node_factory: Any,
) -> None:
    node = await node_factory(api_key=KEY, max_channels=1)
    status, _h, body = await call(
        node, "POST", "/api/broadcast", {"channels": ["one", "two"], "data": 1}
    )
    assert status == 200
    ok, refused = body["results"]
    assert ok["channel"] == "one" and ok["offset"] == 1
    assert refused["channel"] == "two" and refused["code"] == ErrorCode.LIMIT_EXCEEDED
    assert "error" in refused and "offset" not in refused


# --------------------------------------------------------------------------- send


async def test_send_reaches_the_user_and_is_idempotent(store_api_node: Node) -> None:
    node = store_api_node
    bob = await user_ws(node, "bob")
    bob2 = await user_ws(node, "bob")  # every connection of the user gets it
    async with deadline(10):
        msg = {"to": "bob", "from": "backend", "data": {"t": 1}, "cid": "c-1"}
        status, _h, sent = await call(node, "POST", "/api/send", msg)
        assert status == 200
        assert sent["seq"] == 1 and sent["dup"] is False and sent["mid"]
        for ws in (bob, bob2):
            dm = await ws.recv_json()
            assert dm == {
                "op": "dm",
                "epoch": sent["epoch"],
                "from": "backend",
                "mid": sent["mid"],
                "seq": 1,
                "data": {"t": 1},
            }
        status, _h, again = await call(node, "POST", "/api/send", msg)
        assert status == 200
        assert again == {"mid": sent["mid"], "seq": 1, "epoch": sent["epoch"], "dup": True}
        # without "from": a message from nobody in particular
        status, _h, anon = await call(node, "POST", "/api/send", {"to": "bob", "data": "x"})
        assert (status, anon["seq"], anon["dup"]) == (200, 2, False)
        dm = await bob.recv_json()
        assert dm["seq"] == 2 and dm["from"] is None
    assert node.postman is not None and node.postman.sent == 3
    await bob.close()
    await bob2.close()


async def test_send_to_an_offline_user_waits_in_the_inbox(api_node: Node) -> None:
    status, _h, sent = await call(api_node, "POST", "/api/send", {"to": "carol", "data": 7})
    assert status == 200
    carol = await user_ws(api_node, "carol")
    dm = await carol.recv_json()
    assert (dm["op"], dm["seq"], dm["mid"], dm["data"]) == ("dm", 1, sent["mid"], 7)
    await carol.close()


async def test_send_to_a_full_inbox_is_429(node_factory: Any) -> None:
    node = await node_factory(api_key=KEY, inbox_max=1)
    assert (await call(node, "POST", "/api/send", {"to": "dan", "data": 1}))[0] == 200
    status, _h, body = await call(node, "POST", "/api/send", {"to": "dan", "data": 2})
    assert status == 429
    assert body["code"] == ErrorCode.INBOX_FULL and "dan" in body["error"]


async def test_send_store_failure_is_503(api_node: Node) -> None:
    async def broken(*_a: Any, **_k: Any) -> Any:
        raise StoreUnavailable("redis store: gone")

    assert api_node.store is not None and api_node.postman is not None
    api_node.store.inbox_append = broken  # type: ignore[method-assign]
    status, _h, body = await call(api_node, "POST", "/api/send", {"to": "x", "data": 1})
    assert status == 503 and body["code"] == ErrorCode.STORE_UNAVAILABLE
    assert "retry with the same cid" in body["error"]
    assert api_node.postman.store_errors == 1


# --------------------------------------------------------------------------- presence, history


async def test_presence_counts_connections_and_lists_users(api_node: Node) -> None:
    alice = await user_ws(api_node, "alice")
    bob = await user_ws(api_node, "bob")
    anon = await WsClient.connect(api_node.ws_port)
    for c in (alice, bob, anon):
        await c.sub("room:1")
    status, _h, body = await call(api_node, "GET", "/api/presence?channel=room%3A1")
    assert status == 200
    assert body["channel"] == "room:1" and body["count"] == 3
    assert sorted(body["users"]) == ["alice", "bob"]
    status, _h, body = await call(api_node, "GET", "/api/presence?channel=empty")
    assert (status, body) == (200, {"channel": "empty", "count": 0, "users": []})
    for c in (alice, bob, anon):
        await c.close()


async def test_history_pages_through_what_the_channel_keeps(store_api_node: Node) -> None:
    node = store_api_node
    epoch = ""
    for i in range(1, 6):
        status, _h, body = await call(
            node, "POST", "/api/publish", {"channel": "h", "data": {"i": i}}
        )
        assert status == 200
        epoch = body["epoch"]
    status, _h, hist = await call(node, "GET", "/api/history?channel=h&since=2&limit=2")
    assert status == 200
    assert (hist["channel"], hist["epoch"], hist["top"]) == ("h", epoch, 5)
    assert hist["messages"] == [{"offset": 3, "data": {"i": 3}}, {"offset": 4, "data": {"i": 4}}]
    status, _h, hist = await call(node, "GET", "/api/history?channel=h")
    assert [m["offset"] for m in hist["messages"]] == [1, 2, 3, 4, 5]
    status, _h, hist = await call(node, "GET", "/api/history?channel=h&since=5")
    assert hist["messages"] == [] and hist["top"] == 5
    status, _h, hist = await call(node, "GET", "/api/history?channel=never")
    assert (status, hist["top"], hist["messages"]) == (200, 0, [])


# --------------------------------------------------------------------------- disconnect


async def test_disconnect_closes_every_connection_of_the_user(api_node: Node) -> None:
    node = api_node
    control = await Control(node).start()
    alice_ws = await user_ws(node, "alice")
    alice_tcp = await TcpClient.connect(node.tcp_port, hello=False)
    alice_tcp.send(F.HELLO, pack_hello(1, 1, b'{"user":"alice"}'))
    await alice_tcp.expect(F.WELCOME)
    bob = await user_ws(node, "bob")
    async with deadline(10):
        status, _h, body = await call(
            node, "POST", "/api/disconnect", {"user": "alice", "reason": "account closed"}
        )
        assert (status, body) == (200, {"disconnected": 2})
        code, reason, _before = await alice_ws.recv_close()
        assert (code, reason) == (CloseCode.DISCONNECTED, "account closed")
        frames = await alice_tcp.recv_all_until_eof()
        assert frames[-1][0] == F.GOAWAY
        assert unpack_goaway(frames[-1][1]) == (CloseCode.DISCONNECTED, "account closed")
        assert not CloseCode.should_reconnect(CloseCode.DISCONNECTED)
        # bob and everybody else go on
        assert (await bob.request({"op": "ping"}, "pong"))["op"] == "pong"
        await control.roundtrip()
        status, _h, body = await call(node, "POST", "/api/disconnect", {"user": "nobody"})
        assert (status, body) == (200, {"disconnected": 0})
    await bob.close()
    await control.close()


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "method, path, body, status, field",
    [
        ("POST", "/api/publish", {"data": 1}, 400, "channel"),
        ("POST", "/api/publish", {"channel": "a"}, 400, "data"),
        ("POST", "/api/publish", {"channel": 5, "data": 1}, 400, "channel"),
        ("POST", "/api/publish", {"channel": "", "data": 1}, 400, "channel"),
        ("POST", "/api/publish", {"channel": "a\x01", "data": 1}, 400, "channel"),
        ("POST", "/api/publish", {"channel": "x" * 256, "data": 1}, 400, "channel"),
        ("POST", "/api/publish", {"channel": "a", "data": 1, "chanel": "b"}, 400, "chanel"),
        ("POST", "/api/broadcast", {"channels": [], "data": 1}, 400, "channels"),
        ("POST", "/api/broadcast", {"channels": "a", "data": 1}, 400, "channels"),
        ("POST", "/api/broadcast", {"channels": ["a", 7], "data": 1}, 400, "channels[1]"),
        ("POST", "/api/broadcast", {"channels": ["a"] * 1001, "data": 1}, 400, "channels"),
        ("POST", "/api/send", {"data": 1}, 400, "to"),
        ("POST", "/api/send", {"to": "u", "data": 1, "from": 3}, 400, "from"),
        ("POST", "/api/send", {"to": "u", "data": 1, "cid": ""}, 400, "cid"),
        ("POST", "/api/send", {"to": "u", "data": 1, "cid": "c" * 129}, 400, "cid"),
        ("POST", "/api/send", {"to": "u"}, 400, "data"),
        ("POST", "/api/disconnect", {}, 400, "user"),
        ("POST", "/api/disconnect", {"user": "u", "reason": "r" * 121}, 400, "reason"),
        ("GET", "/api/presence", None, 400, "channel"),
        ("GET", "/api/presence?channel=a&channel=b", None, 400, "channel"),
        ("GET", "/api/presence?chan=a", None, 400, "chan"),
        ("GET", "/api/history?channel=a&since=-1", None, 400, "since"),
        ("GET", "/api/history?channel=a&since=x", None, 400, "since"),
        ("GET", "/api/history?channel=a&limit=0", None, 400, "limit"),
        ("GET", "/api/history?channel=a&limit=1001", None, 400, "limit"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    api_node: Node, method: str, path: str, body: Any, status: int, field: str
) -> None:
    got, _h, answer = await call(api_node, method, path, body)
    assert got == status, answer
    assert answer["field"] == field, answer
    assert field.split("[")[0] in answer["error"]
    assert api_node.hub.published == 0


@pytest.mark.parametrize(
    "body, content_type, status, needle",
    [
        (b"{not json", b"application/json", 400, "not valid JSON"),
        (b"[1, 2]", b"application/json", 400, "JSON object"),
        (b"", b"application/json", 400, "not valid JSON"),
        (b'{"channel":"a","data":1}', b"text/plain", 415, "application/json"),
        (b'{"channel":"a","data":1}', b"application/x-www-form-urlencoded", 415, "JSON"),
    ],
)
async def test_bodies_that_are_not_a_json_object(
    api_node: Node, body: bytes, content_type: bytes, status: int, needle: str
) -> None:
    got, _h, answer = await call(api_node, "POST", "/api/publish", body, content_type=content_type)
    assert got == status and needle in answer["error"], answer


async def test_json_with_a_charset_parameter_is_json(api_node: Node) -> None:
    status, _h, body = await call(
        api_node,
        "POST",
        "/api/publish",
        {"channel": "a", "data": 1},
        content_type=b"application/json; charset=utf-8",
    )
    assert (status, body["offset"]) == (200, 1)


async def test_wrong_method_is_405_with_allow(api_node: Node) -> None:
    status, headers, body = await call(api_node, "GET", "/api/publish")
    assert status == 405 and headers["allow"] == "POST" and "POST" in body["error"]
    status, headers, _b = await call(api_node, "POST", "/api/history", {"channel": "a"})
    assert status == 405 and headers["allow"] == "GET"


async def test_unknown_route_is_404(api_node: Node) -> None:
    status, _h, body = await call(api_node, "GET", "/api/nope")
    assert status == 404 and "/api/nope" in body["error"]
    # without the key, nothing tells which routes exist
    status, _h, _b = await call(api_node, "GET", "/api/nope", key=None)
    assert status == 401


async def test_body_over_max_message_is_413(node_factory: Any) -> None:
    node = await node_factory(api_key=KEY, max_message=1024)
    big = {"channel": "a", "data": "x" * 2000}
    status, _h, body = await call(node, "POST", "/api/publish", big)
    assert status == 413 and "max_message" in body["error"]
    # chunked: no Content-Length to refuse up front, the running total decides
    data = orjson.dumps(big)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (data[:900], data[900:]))
    req = (
        (
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" % KEY.encode()
        )
        + chunked
        + b"0\r\n\r\n"
    )
    status, _h, raw = await http_exchange(node.ws_port, req)
    assert status == 413 and b"max_message" in raw
    assert node.hub.published == 0


async def test_chunked_body_and_expect_100_continue(api_node: Node) -> None:
    data = orjson.dumps({"channel": "a", "data": {"k": "v" * 100}})
    req = (
        (
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" % KEY.encode()
        )
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (data[:10], data[10:]))
        + b"0\r\n\r\n"
    )
    status, _h, raw = await http_exchange(api_node.ws_port, req)
    assert status == 200 and orjson.loads(raw)["offset"] == 1

    # Expect: 100-continue (curl sends it for bodies over 1 KiB): 100 first, then the answer
    data = orjson.dumps({"channel": "a", "data": "y" * 2000})
    reader, writer = await asyncio.open_connection("127.0.0.1", api_node.ws_port)
    writer.write(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
        % (KEY.encode(), len(data))
    )
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 100 Continue")
    writer.write(data)
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 200 OK") and b'"offset":2' in rest
    writer.close()


async def test_a_request_head_plus_body_over_16k_is_not_a_431(api_node: Node) -> None:
    data = {"channel": "a", "data": "z" * 40_000}
    status, _h, body = await call(api_node, "POST", "/api/publish", data)
    assert (status, body["offset"]) == (200, 1)


async def test_api_traffic_leaves_clients_served(api_node: Node) -> None:
    control = await Control(api_node).start()
    reqs = [call(api_node, "POST", "/api/publish", {"channel": "x", "data": i}) for i in range(20)]
    results, _ = await asyncio.gather(asyncio.gather(*reqs), control.roundtrip())
    assert sorted(r[2]["offset"] for r in results) == list(range(1, 21))
    await control.roundtrip()
    assert api_node.protocol_errors == 0
    await control.close()


# --------------------------------------------------------------------------- OpenAPI


async def test_openapi_document_describes_every_route(api_node: Node) -> None:
    status, _h, doc = await call(api_node, "GET", "/api/openapi.json", key=None)
    assert status == 200
    assert doc == orjson.loads(orjson.dumps(OPENAPI))
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["paths"]) == set(ROUTES), "every route documented, nothing else"
    for path, method in ROUTES.items():
        ops = doc["paths"][path]
        assert list(ops) == [method.lower()], path
        op = ops[method.lower()]
        assert op["operationId"] and "200" in op["responses"], path
        if method == "POST":
            assert op["requestBody"]["content"]["application/json"]["schema"]
        if path != "/api/openapi.json":
            assert "401" in op["responses"], path
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"]["name"] == "X-API-Key"

    # every $ref points at something in the document
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    found = list(refs(doc))
    assert found
    for ref in found:
        assert ref.startswith("#/")
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        assert isinstance(target, dict), ref

    # request schemas name exactly the fields the server accepts
    for path, schema in [
        ("/api/publish", "PublishRequest"),
        ("/api/broadcast", "BroadcastRequest"),
        ("/api/send", "SendRequest"),
        ("/api/disconnect", "DisconnectRequest"),
    ]:
        props = doc["components"]["schemas"][schema]["properties"]
        status, _h, body = await call(api_node, "POST", path, {**dict.fromkeys(props), "zz": 1})
        assert (status, body["field"]) == (400, "zz"), path


# --------------------------------------------------------------------------- P8


async def test_history_of_a_channel_that_never_existed_creates_nothing(
    store_api_node: Node,
) -> None:
    """A read creates nothing: no channel in node memory (the channel gauge), no epoch
    in the store; the first publish then starts the channel as if nobody had looked."""
    node = store_api_node
    before = len(node.hub.channels)
    for _ in range(2):
        status, _h, hist = await call(node, "GET", "/api/history?channel=ghost&since=3")
        assert status == 200
        assert hist == {"channel": "ghost", "epoch": "", "top": 0, "messages": []}
    assert len(node.hub.channels) == before and "ghost" not in node.hub.channels
    assert node.store is not None and await node.store.peek("ghost", 0) is None
    status, _h, pub = await call(node, "POST", "/api/publish", {"channel": "ghost", "data": 1})
    assert status == 200 and pub["offset"] == 1 and pub["epoch"]
    status, _h, hist = await call(node, "GET", "/api/history?channel=ghost")
    assert (hist["epoch"], hist["top"]) == (pub["epoch"], 1)


async def test_the_key_is_checked_before_the_body_size(node_factory: Any) -> None:
    """docs/api.md: 401 first, whatever the path: a body over max_message from a caller
    without the key is a 401 (not a 413 that tells the limit), answered from the head
    alone; with the key it is a 413, also before the body is read. Every one counted."""
    node = await node_factory(api_key=KEY, max_message=1024)
    big = {"channel": "a", "data": "x" * 2000}
    # the head only: both answers come without a byte of the body
    for key, want in [(None, 401), ("wrong-key-0123456789abcdef", 401), (KEY, 413)]:
        head = raw_request("POST", "/api/publish", big, key=key).split(b"\r\n\r\n")[0]
        status, headers, raw = await http_exchange(node.ws_port, head + b"\r\n\r\n")
        assert status == want, raw
        if want == 401:
            assert headers["www-authenticate"].startswith("Bearer")
            assert b"max_message" not in raw
    # chunked, without the key: 401 too
    data = orjson.dumps(big)
    req = (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (data[:900], data[900:]))
        + b"0\r\n\r\n"
    )
    status, _h, _raw = await http_exchange(node.ws_port, req)
    assert status == 401
    # an unknown path without the key: 401, not 404 or 413
    status, _h, _b = await call(node, "POST", "/api/nope", big, key=None)
    assert status == 401
    # 413 for a data field over max_message, with the key, counted as well
    status, _h, _b = await call(node, "POST", "/api/publish", big)
    assert status == 413
    assert node.api.requests[("/api/publish", 401)] == 3
    assert node.api.requests[("/api/publish", 413)] == 2
    assert node.api.requests[("other", 401)] == 1
    status, _h, text = await http_exchange(node.ws_port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert b'fastim_api_requests_total{route="/api/publish",status="413"} 2.0' in text
    assert node.hub.published == 0


async def test_a_big_body_to_an_api_that_is_off_is_404(node_factory: Any) -> None:
    node = await node_factory(max_message=1024)
    big = {"channel": "a", "data": "x" * 2000}
    status, _h, body = await call(node, "POST", "/api/publish", big)
    assert status == 404 and "api_key" in body["error"]
