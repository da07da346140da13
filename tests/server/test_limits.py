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

from ._support import (
    Control,
    TcpClient,
    WsClient,
    deadline,
    http_exchange,
    open_tcp,
    read_http_response,
    upgrade_request,
    wait_until,
)

F = FrameType
KEY = "test-api-key-0123456789abcdef"


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


# --------------------------------------------------------------------------- probes (P8)


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def _probes_answer(port: int, times: int = 2) -> None:
    for _ in range(times):
        for path, body in (("/health", b"ok"), ("/ready", b"ready"), ("/metrics", b"fastim_")):
            status, _h, got = await _get(port, path)
            assert status == 200 and body in got, (path, status, got[:200])


async def test_probes_are_answered_from_an_address_at_its_connection_limit(
    node_factory: Any,
) -> None:
    """A load balancer's probe or Prometheus behind the same NAT as the clients must see a
    healthy node as healthy exactly when that address is at its limit."""
    node = await node_factory(ip_limits_exempt="", max_connections_per_ip=2, api_key=KEY)
    async with deadline(15):
        held = [await WsClient.connect(node.ws_port) for _ in range(2)]
        await _probes_answer(node.ws_port)
        assert node.limit_refusals == 0
        # everything else from that address is still refused
        req, _key = upgrade_request(node.ws_port, "/ws")
        status, headers, body = await http_exchange(node.ws_port, req)
        assert status == 503 and headers["retry-after"] == "1"
        assert b"holds the maximum of 2 connections" in body
        status, _h, _b = await _get(node.ws_port, "/demo/")
        assert status == 503
        status, _h, body = await _get(node.ws_port, "/api/presence?channel=a")
        assert status == 503 and b"maximum" in body  # an API request is a client's too
        tcp = await TcpClient.connect(node.tcp_port, hello=False)
        frames = await tcp.recv_all_until_eof()
        assert unpack_goaway(frames[0][1])[0] == CloseCode.RATE_LIMITED
        assert node.limit_refusals == 4
        assert node._ip_conns == {"127.0.0.1": 2} and node._ip_held == {}
    for h in held:
        await h.close()


async def test_probes_are_answered_over_the_connect_rate_and_cost_it_nothing(
    node_factory: Any,
) -> None:
    node = await node_factory(ip_limits_exempt="", connect_rate_per_ip=1.0)  # burst 2
    async with deadline(15):
        first = await WsClient.connect(node.ws_port)  # one token left
        await _probes_answer(node.ws_port, 3)  # under the limit: the token is given back
        second = await WsClient.connect(node.ws_port)  # ...so a client still gets it
        await _probes_answer(node.ws_port, 2)  # over the limit now: still answered
        req, _key = upgrade_request(node.ws_port, "/ws")
        status, headers, body = await http_exchange(node.ws_port, req)
        assert status == 429 and headers["retry-after"] == "1"
        assert b"new connections per second" in body
        assert node.limit_refusals == 1
    await first.close()
    await second.close()


async def test_an_address_over_its_limits_holds_few_connections_without_a_request(
    node_factory: Any,
) -> None:
    """What protects the node from a flood while probes get through: an address over its
    limits may keep only PROBE_HOLD connections open that have not sent their request
    head yet; the next ones are refused at once, unread, as before."""
    from fastim.transport.ws import PROBE_HOLD

    node = await node_factory(ip_limits_exempt="", max_connections_per_ip=1)
    async with deadline(15):
        client = await WsClient.connect(node.ws_port)
        silent = [await open_tcp(node.ws_port) for _ in range(PROBE_HOLD)]
        await wait_until(lambda: node._ip_held.get("127.0.0.1") == PROBE_HOLD)
        reader, writer = await open_tcp(node.ws_port)  # one more: refused without a word
        status, headers, _head = await read_http_response(reader)
        assert status == 503 and headers["retry-after"] == "1"
        writer.close()
        for _r, w in silent:
            w.close()
        await wait_until(lambda: not node._ip_held)
        await _probes_answer(node.ws_port, 1)
        assert node._ip_conns == {"127.0.0.1": 1}
    await client.close()


async def test_a_silent_connection_over_the_limits_gets_the_limit_answer(
    node_factory: Any,
) -> None:
    node = await node_factory(ip_limits_exempt="", max_connections_per_ip=1, handshake_timeout=0.5)
    async with deadline(15):
        client = await WsClient.connect(node.ws_port)
        reader, writer = await open_tcp(node.ws_port)
        status, _headers, _head = await read_http_response(reader)  # after handshake_timeout
        assert status == 503
        writer.close()
        await wait_until(lambda: not node._ip_held)
    await client.close()


async def test_probes_from_an_address_over_its_limits_have_a_rate_of_their_own(
    node_factory: Any,
) -> None:
    from fastim.transport.ws import PROBE_RATE

    node = await node_factory(ip_limits_exempt="", max_connections_per_ip=1)
    loop = asyncio.get_running_loop()
    async with deadline(30):
        client = await WsClient.connect(node.ws_port)
        statuses: list[int] = []
        t0 = loop.time()
        while 429 not in statuses and len(statuses) < 500:
            statuses.append((await _get(node.ws_port, "/health"))[0])
        elapsed = loop.time() - t0
        assert statuses[: int(2 * PROBE_RATE)] == [200] * int(2 * PROBE_RATE)  # the burst
        assert statuses[-1] == 429  # ...but not a flood
        assert statuses.count(200) <= 2 * PROBE_RATE + PROBE_RATE * elapsed + 1
    await client.close()
