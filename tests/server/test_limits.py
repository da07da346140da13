"""Limits an operator relies on: publish rate per connection, connections and new
connections per client address. Real sockets; a control client shows that the node keeps
serving everyone else while it refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastim import _core
from fastim.protocol import CloseCode, ErrorCode, FrameType, unpack_goaway

from ._support import Control, TcpClient, WsClient, deadline, http_exchange, upgrade_request

F = FrameType


async def test_publish_rate_refuses_then_closes_on_repeat(node_factory: Any) -> None:
    node = await node_factory(publish_rate=5.0, rate_limit_strikes=4)
    control = await Control(node).start()
    ws = await WsClient.connect(node.ws_port)
    async with deadline(15):
        for i in range(30):
            ws.send_json({"op": "pub", "ch": "r", "data": i, "id": i})
        code, _reason, before = await ws.recv_close()
        assert code == CloseCode.RATE_LIMITED
        replies = [orjson.loads(p) for op, p in before if op == _core.OP_TEXT]
        # the burst (twice the rate) is acknowledged, before the close; on the durable
        # default store its acks come when the store took them, after the refusals
        acks = sorted(r["id"] for r in replies if r["op"] == "puback")
        assert acks == list(range(10))
        errors = [r for r in replies if r["op"] == "error"]
        assert len(errors) == 3 and all(e["code"] == ErrorCode.RATE_LIMITED for e in errors)
        assert "publishes and sends per second" in errors[0]["reason"]
        assert node.rate_limited >= 4
        await control.roundtrip()
    await control.close()


async def test_publish_rate_refills(node_factory: Any) -> None:
    node = await node_factory(publish_rate=20.0)
    c = await TcpClient.connect(node.tcp_port)
    async with deadline(15):
        for _ in range(40):  # the burst
            await c.pub("refill", b"1")
        c.send_pub("refill", b"1", req_id=99)
        t, _p = await c.recv()
        assert t == F.ERROR
        await asyncio.sleep(0.35)  # ~7 tokens back
        assert await c.pub("refill", b"2") > 0
    await c.close()


async def test_connections_per_address(node_factory: Any) -> None:
    node = await node_factory(ip_limits_exempt="", max_connections_per_ip=3)
    async with deadline(15):
        held = [await WsClient.connect(node.ws_port) for _ in range(2)]
        held.append(await TcpClient.connect(node.tcp_port))  # type: ignore[arg-type]
        req, _key = upgrade_request(node.ws_port, "/ws")
        status, headers, body = await http_exchange(node.ws_port, req)
        assert status == 503 and headers["retry-after"] == "1"
        assert b"127.0.0.1 holds the maximum of 3 connections" in body
        tcp = await TcpClient.connect(node.tcp_port, hello=False)
        frames = await tcp.recv_all_until_eof()
        assert [t for t, _ in frames] == [F.GOAWAY]
        assert unpack_goaway(frames[0][1])[0] == CloseCode.RATE_LIMITED
        await held[0].close()  # room again
        for _ in range(50):
            if node._ip_conns.get("127.0.0.1") == 2:
                break
            await asyncio.sleep(0.02)
        again = await WsClient.connect(node.ws_port)
        await again.close()
        assert node.limit_refusals == 2
    for h in held[1:]:
        await h.close()


async def test_new_connections_per_second_per_address(node_factory: Any) -> None:
    node = await node_factory(ip_limits_exempt="", connect_rate_per_ip=2.0)
    async with deadline(15):
        ok = [await WsClient.connect(node.ws_port) for _ in range(4)]  # the burst
        req, _key = upgrade_request(node.ws_port, "/ws")
        status, headers, body = await http_exchange(node.ws_port, req)
        assert status == 429 and headers["retry-after"] == "1"
        assert b"new connections per second" in body
    for c in ok:
        await c.close()


async def test_loopback_is_exempt_by_default(node_factory: Any) -> None:
    node = await node_factory(connect_rate_per_ip=1.0, max_connections_per_ip=1)
    async with deadline(15):
        many = [await WsClient.connect(node.ws_port) for _ in range(10)]
        assert node.limit_refusals == 0
    for c in many:
        await c.close()


def test_bad_exempt_network_is_named() -> None:
    from fastim.config import Config, ConfigError

    with pytest.raises(ConfigError) as e:
        Config(ip_limits_exempt="10.0.0.0/8,not-a-net").validate()
    assert "ip_limits_exempt" in str(e.value)


# --------------------------------------------------------------------------- the bucket


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 100),
    steps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_token_bucket_never_exceeds_rate_plus_burst(
    rate: float, burst: int, steps: list[float]
) -> None:
    b = _core.TokenBucket(rate, burst, 0.0)
    now = 0.0
    granted = 0
    for dt in steps:
        now += dt
        if b.take(now):
            granted += 1
        assert 0 <= b.available <= burst
    assert granted <= burst + rate * now + 1e-6
    assert b.refused == len(steps) - granted


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        _core.TokenBucket(-1, 5)
    with pytest.raises(ValueError):
        _core.TokenBucket(1, 0)
