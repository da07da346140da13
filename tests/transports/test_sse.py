"""Server-Sent Events and HTTP streaming through raw HTTP clients (fastim/transport/sse.py).

The bytes a browser's EventSource or fetch reads: response headers, the session event,
messages as events, event ids that carry every channel's position (a reconnect with
``Last-Event-ID`` recovers all of them through the history), heartbeats as comments,
commands by POST, and the refusals (origin, token, bad input) as plain 4xx answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import jwt
import orjson
import pytest

from fastim import _core
from fastim.client import connect
from fastim.transport import sse

from ._http import Stream, post, request, whole

SECRET = "s3cret-s3cret-s3cret-s3cret-0123456789"


def token(sub: str = "alice", ttl: float = 60) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


async def publish(port: int, ch: str, *items: Any) -> list[int]:
    """Publish from a real WebSocket client (the SDK): offsets."""
    async with await connect(f"ws://127.0.0.1:{port}/ws") as c:
        return [await c.publish(ch, item) for item in items]


async def msgs(s: Stream, n: int) -> list[tuple[str, int, Any]]:
    out: list[tuple[str, int, Any]] = []
    while len(out) < n:
        obj = await s.data()
        if obj["op"] == "msg":
            out.append((obj["ch"], obj["off"], obj["data"]))
    return out


async def drain(s: Stream, quiet: float = 0.5) -> list[Any]:
    """Every data event until the stream is quiet for ``quiet`` seconds."""
    out: list[Any] = []
    while True:
        try:
            ev = await s.event(timeout=quiet)
        except asyncio.TimeoutError:
            return out
        if ev.data is not None:
            out.append(ev.json)


def msgs_of(objs: list[Any]) -> list[tuple[str, int, Any]]:
    return [(o["ch"], o["off"], o["data"]) for o in objs if o["op"] == "msg"]


async def last_id(s: Stream, want: dict[str, int]) -> str:
    """Read until an id event whose offsets are ``want``; return it."""
    while True:
        ev = await s.event()
        if ev.id is not None and {k: v[1] for k, v in orjson.loads(ev.id).items()} == want:
            return ev.id


async def test_sse_shape_and_messages(node: Any) -> None:
    port = node.ws_port
    s = await request(port, "GET", "/sse?ch=a&ch=b", headers={"Accept": "text/event-stream"})
    assert s.status == 200
    assert s.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert "no-cache" in (s.header("Cache-Control") or "")
    assert s.header("X-Accel-Buffering") == "no"  # nginx: do not buffer this response
    assert (await s.event()).retry == sse.RETRY_MS
    first = await s.data()
    assert first["op"] == "session" and first["transport"] == "sse" and len(first["sid"]) == 24
    assert {(await s.data())["ch"] for _ in "ab"} == {"a", "b"}  # subscribed, both
    await publish(port, "a", {"text": "x\ny"}, 2)
    await publish(port, "b", [3])
    got = await msgs(s, 3)
    assert got == [("a", 1, {"text": "x\ny"}), ("a", 2, 2), ("b", 1, [3])]
    # one encode for every SSE subscriber: the ring's format is the core's FMT_SSE
    assert node.hub.channels["a"].subs.count(_core.FMT_SSE) == 1
    await s.close()


async def test_raw_line_breaks_in_data_stay_in_one_event(node: Any) -> None:
    """A TCP client may publish pretty-printed JSON: its line breaks become spaces."""
    s = await request(node.ws_port, "GET", "/sse?ch=p")
    await s.until("subscribed")
    hub = node.hub
    hub.publish("p", b'{\n  "a": 1\r\n}', lambda r: None)
    assert (await msgs(s, 1)) == [("p", 1, {"a": 1})]
    await s.close()


async def test_last_event_id_recovers_every_channel(node: Any) -> None:
    port = node.ws_port
    s = await request(port, "GET", "/sse?ch=a&ch=b")
    await s.until("subscribed")
    await publish(port, "a", 1)
    await publish(port, "b", 10)
    ident = await last_id(s, {"a": 1, "b": 1})
    await s.close()
    # missed while away, on both channels
    await publish(port, "a", 2, 3)
    await publish(port, "b", 20)
    s = await request(port, "GET", "/sse?ch=a&ch=b", headers={"Last-Event-ID": ident})
    assert s.status == 200
    got = await drain(s)
    replies = [o for o in got if o["op"] == "subscribed"]
    assert len(replies) == 2 and all(r["recovered"] for r in replies), got
    assert sorted(msgs_of(got)) == [("a", 2, 2), ("a", 3, 3), ("b", 2, 20)]  # once each
    await s.close()
    # the query form (EventSource polyfills cannot set the header)
    s = await request(port, "GET", f"/sse?ch=a&lastEventId={quote(ident)}")
    got = await drain(s)
    assert [o["recovered"] for o in got if o["op"] == "subscribed"] == [True]
    assert msgs_of(got) == [("a", 2, 2), ("a", 3, 3)]
    await s.close()


async def test_an_unknown_epoch_is_a_gap(node: Any) -> None:
    port = node.ws_port
    await publish(port, "g", 1)
    ident = orjson.dumps({"g": ["000000000000", 0]}).decode()
    s = await request(port, "GET", "/sse?ch=g", headers={"Last-Event-ID": ident})
    r = await s.until("subscribed")
    assert r["recovered"] is False and r["off"] == 1  # the client learns it missed some
    await s.close()


async def test_heartbeat_comments(node_factory: Any) -> None:
    node = await node_factory(ping_interval=0.5)
    s = await request(node.ws_port, "GET", "/sse?ch=h")
    t0 = time.monotonic()
    while True:
        ev = await s.event(timeout=3)
        if "ping" in ev.comments:
            break
    assert time.monotonic() - t0 < 2.5
    assert s.reader.at_eof() is False  # no pong needed: the stream stays open
    await s.close()


async def test_http_stream_commands_by_post(node: Any) -> None:
    port = node.ws_port
    s = await request(port, "POST", "/stream")
    assert s.status == 200 and s.header("Content-Type") == "text/event-stream; charset=utf-8"
    first = await s.data()
    assert first["transport"] == "http_stream"
    sid = first["sid"]
    assert await post(port, sid, {"op": "hello", "id": 1}, {"op": "sub", "ch": "c", "id": 2}) == 204
    assert [(await s.data())["op"] for _ in "ab"] == ["welcome", "subscribed"]
    assert await post(port, sid, {"op": "pub", "ch": "c", "data": {"n": 1}, "id": 3}) == 204
    got = await drain(s)
    assert sorted(o["op"] for o in got) == ["msg", "puback"]
    assert msgs_of(got) == [("c", 1, {"n": 1})]
    # a bad command: its error on the stream, then the stream's close (as on a WebSocket)
    assert await post(port, sid, {"op": "nope"}) == 204
    err = await s.until("error")
    assert "unknown op" in err["reason"]
    close = await s.until("close")
    assert close["code"] >= 4000
    # the stream is gone: a POST for it is refused with a reason
    await asyncio.sleep(0.1)
    status, _, body = await whole(port, "POST", f"/stream/{sid}", body=b'{"op":"ping"}')
    assert status == 404 and b"no such stream" in body


async def test_refusals(node_factory: Any) -> None:
    node = await node_factory(max_subscriptions=2, max_message=1000)
    port = node.ws_port
    cases: list[tuple[str, str, dict[str, str], bytes, int, bytes]] = [
        ("POST", "/sse?ch=a", {}, b"", 405, b"use GET"),
        ("GET", "/sse?ch=", {}, b"", 400, b'"ch"'),
        ("GET", "/sse?ch=a&ch=b&ch=c", {}, b"", 400, b"at most 2"),
        ("GET", "/sse?ch=a", {"Last-Event-ID": "garbage"}, b"", 400, b"Last-Event-ID"),
        ("GET", "/sse?ch=a", {"Last-Event-ID": '{"a":[1,2]}'}, b"", 400, b"position of 'a'"),
        ("POST", "/stream/nosuchsid", {}, b"{}", 404, b"no such stream"),
        ("GET", "/stream/x", {}, b"", 405, b"use POST"),
        ("DELETE", "/stream", {}, b"", 405, b"GET or POST"),
        ("POST", "/stream/x", {}, b"x" * 2000, 413, b"max_message"),
        ("GET", "/sse?ch=a", {"Origin": "https://evil.example"}, b"", 403, b"cross-origin"),
    ]
    for method, target, headers, body, status, why in cases:
        got, _, text = await whole(port, method, target, headers=headers, body=body)
        assert (got, why in text) == (status, True), (method, target, got, text)
    # too many commands in one POST
    s = await request(port, "POST", "/stream")
    sid = (await s.data())["sid"]
    status, _, text = await whole(
        port, "POST", f"/stream/{sid}", body=b"{}\n" * (sse.MAX_POST_COMMANDS + 1)
    )
    assert status == 400 and b"commands per POST" in text
    await s.close()


async def test_cross_origin_allowed_gets_cors(node_factory: Any) -> None:
    app = "https://app.example"
    node = await node_factory(allowed_origins=[app])
    port = node.ws_port
    s = await request(port, "GET", "/sse?ch=a", headers={"Origin": app})
    assert s.status == 200
    assert s.header("Access-Control-Allow-Origin") == app
    assert s.header("Access-Control-Allow-Credentials") == "true"
    sid = (await s.data())["sid"]
    # commands for it from another page (even an allowed one) are refused
    status, _, _ = await whole(
        port, "POST", f"/sse/{sid}", headers={"Origin": "https://evil.example"}, body=b"{}"
    )
    assert status == 403
    status, head, _ = await whole(
        port, "POST", f"/sse/{sid}", headers={"Origin": app}, body=b'{"op":"ping","id":1}'
    )
    assert status == 204 and f"Access-Control-Allow-Origin: {app}" in head
    assert (await s.until("pong"))["id"] == 1
    await s.close()


async def test_auth_by_token(node_factory: Any) -> None:
    node = await node_factory(jwt_secret=SECRET)
    port = node.ws_port
    status, _, text = await whole(port, "GET", "/sse?ch=a")
    assert status == 401 and b"needs a token" in text
    status, _, text = await whole(port, "GET", "/sse?ch=a&token=not.a.jwt")
    assert status == 401
    s = await request(port, "GET", f"/sse?ch=a&token={token()}")
    assert s.status == 200
    assert (await s.until("subscribed"))["ch"] == "a"
    await s.close()
    # a stream without channels may authenticate in its hello, like a WebSocket
    s = await request(port, "POST", "/stream")
    sid = (await s.data())["sid"]
    assert await post(port, sid, {"op": "sub", "ch": "a", "id": 1}) == 204
    assert "authenticate first" in (await s.until("error"))["reason"]
    assert (await s.until("close"))["code"] == 4501
    await s.close()
    s = await request(port, "POST", "/stream")
    sid = (await s.data())["sid"]
    await post(port, sid, {"op": "hello", "token": token("bob"), "id": 1})
    assert (await s.until("welcome"))["user"] == "bob"
    await s.close()


async def test_rate_limit_applies_to_posted_publishes(node_factory: Any) -> None:
    node = await node_factory(publish_rate=2.0)
    port = node.ws_port
    s = await request(port, "POST", "/stream")
    sid = (await s.data())["sid"]
    cmds = [{"op": "pub", "ch": "r", "data": i, "id": i} for i in range(8)]
    await post(port, sid, *cmds)
    codes = []
    for _ in range(8):
        obj = await s.data()
        codes.append(obj["op"] if obj["op"] != "error" else obj["code"])
        if obj["op"] == "close":
            break
    assert "puback" in codes and any(c != "puback" for c in codes), codes
    await s.close()


async def test_slow_sse_reader_is_closed(node_factory: Any) -> None:
    """An SSE reader that does not read is a slow consumer like any other."""
    node = await node_factory(outbound_cap=64 * 1024, store="memory")
    port = node.ws_port
    s = await request(port, "GET", "/sse?ch=big")
    await s.until("subscribed")
    s.writer.transport.pause_reading()  # type: ignore[attr-defined]
    big = orjson.dumps("x" * 8000)
    for _ in range(100):
        for _ in range(50):
            node.hub.publish("big", big, lambda r: None)
        await asyncio.sleep(0.01)
        if node.slow_disconnects:
            break
    assert node.slow_disconnects >= 1
    await s.close()


@pytest.mark.parametrize("path", ["/sse", "/stream"])
async def test_streams_are_dropped_on_close(node: Any, path: str) -> None:
    before = sse.streams_open()
    s = await request(node.ws_port, "GET", path)
    await s.data()
    assert sse.streams_open() == before + 1
    await s.close()
    for _ in range(50):
        if sse.streams_open() == before:
            break
        await asyncio.sleep(0.02)
    assert sse.streams_open() == before


async def test_a_delta_subscriber_on_a_stream_gets_full_messages(node_factory: Any) -> None:
    """Deltas have no SSE form: a stream that asks for them on a delta namespace gets
    every message whole (the core's fan-out falls back to the full frame), the same
    documents as a WebSocket delta subscriber."""
    node = await node_factory(namespaces={"doc": {"delta": "fossil"}})
    port = node.ws_port
    s = await request(port, "POST", "/stream")
    sid = (await s.data())["sid"]
    sub = {"op": "sub", "ch": "doc:1", "id": 2, "delta": "fossil"}
    assert await post(port, sid, {"op": "hello", "id": 1}, sub) == 204
    assert [(await s.data())["op"] for _ in "ab"] == ["welcome", "subscribed"]
    docs = [{"title": "t", "body": "x" * 400 + str(i)} for i in range(4)]
    async with await connect(f"ws://127.0.0.1:{port}/ws") as c:
        for d in docs:
            await c.publish("doc:1", d)
    got = [await s.until("msg") for _ in docs]
    assert [m["data"] for m in got] == docs and not any(m.get("delta") for m in got)
    await s.close()
