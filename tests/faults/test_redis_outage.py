"""Fault tests: the Redis under a running node (a real process) goes away, then returns.

* hung (SIGSTOP, then SIGCONT) and stopped (SIGTERM, then started again on its port);
* meanwhile a publish fails with STORE_UNAVAILABLE within about ``redis_timeout`` (it
  never hangs), the node stays up (a ping round trip works, connections stay), and a
  direct message in flight is retried by the SDK with its cid;
* once Redis is back, publishes succeed again, the subscriber has every acknowledged
  message exactly once and in order, and the direct message arrives once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from store._redis import RedisServer  # type: ignore[import-not-found]

from fastim.client import Backoff, Client, DirectMessage, Message, connect
from fastim.errors import RequestError
from fastim.protocol import ErrorCode

from ._markers import channel_marker, dm_marker
from ._node import NodeProc

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

T = TypeVar("T")
REDIS_TIMEOUT = 0.5


async def within(aw: Awaitable[T], seconds: float = 20.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def eventually(cond: Callable[[], bool], seconds: float = 20.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.01)


async def client(url: str, **kwargs: Any) -> Client:
    kwargs.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("request_timeout", 10.0)
    return await connect(url, **kwargs)


@pytest.mark.parametrize("outage", ["sigstop", "restart"])
async def test_redis_outage_fails_fast_and_recovers(
    nodes: Callable[..., NodeProc], tmp_path: Path, outage: str
) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(str(tmp_path / "redis"))
    redis.start()
    try:
        node = nodes(
            "--store", "redis", "--redis-url", redis.url,
            "--redis-timeout", str(REDIS_TIMEOUT), "--dm-retry", "0.5",
        )  # fmt: skip
        await node.astart()
        pub = await client(node.tcp_url, user="alice")
        subc = await client(node.ws_url, user="bob")
        try:
            await run_outage(node, redis, outage, pub, subc)
        finally:
            await pub.aclose()
            await subc.aclose()
    finally:
        redis.kill()


async def run_outage(
    node: NodeProc, redis: RedisServer, outage: str, pub: Client, subc: Client
) -> None:
    loop = asyncio.get_running_loop()
    sub = await within(subc.subscribe("r"))
    received: list[Message] = []
    dms: list[DirectMessage] = []

    async def read() -> None:
        async for msg in sub:
            received.append(msg)

    async def read_dms() -> None:
        async for dm in subc.direct_messages():
            dms.append(dm)

    readers = [asyncio.ensure_future(read()), asyncio.ensure_future(read_dms())]
    acked: dict[int, int] = {}  # number -> offset
    for i in range(5):
        acked[i] = await within(pub.publish("r", {"i": i}))

    # ---- Redis goes away
    if outage == "sigstop":
        redis.pause()  # hung: connections stay open, nothing answers
    else:
        redis.stop()  # gone: connections refused (blocks the loop ~0.1 s: no thread, see _node)
    failures = 0
    for i in range(5, 8):
        start = loop.time()
        with pytest.raises(RequestError) as err:
            await within(pub.publish("r", {"i": i}), 10)
        took = loop.time() - start
        assert err.value.code == ErrorCode.STORE_UNAVAILABLE, err.value
        assert took < REDIS_TIMEOUT + 1.5, f"a failing publish took {took:.2f}s"
        failures += 1
    # the node is up and serving: round trips, its connections, requests that need no store
    assert await within(pub.ping(), 5) < 1.0
    assert await within(subc.ping(), 5) < 1.0
    assert node.alive and pub.connected and subc.connected
    assert pub.reconnects == 0 and subc.reconnects == 0
    # a direct message sent now is retried by the SDK (same cid) until Redis is back
    sending = asyncio.ensure_future(pub.send("bob", {"during": outage}, timeout=30))
    await asyncio.sleep(1.0)
    assert not sending.done()

    # ---- Redis returns
    if outage == "sigstop":
        redis.resume()
    else:
        redis.start()
    for i in range(8, 60):
        try:
            acked[i] = await within(pub.publish("r", {"i": i}), 10)
        except RequestError as e:  # the store's connections come back on their next use
            assert e.code == ErrorCode.STORE_UNAVAILABLE
            await asyncio.sleep(0.05)
    assert len([i for i in acked if i >= 8]) >= 45, "publishing did not recover"
    sent = await within(sending, 30)
    await eventually(
        lambda: len(dms) >= 1,
        what=f"the direct message sent during the outage ({sent}); inbox {subc.inbox.__dict__}",
    )

    last = max(acked.values())
    await eventually(lambda: sub.offset >= last, what="the subscriber to catch up")
    # a duplicate would come before a marker sent last
    await channel_marker(pub, "r", received)
    await dm_marker(pub, "bob", dms)
    for r in readers:
        r.cancel()
    offsets = [m.offset for m in received]
    numbers = [m.data["i"] for m in received]
    assert offsets == list(range(1, len(received) + 1)), (offsets, node.log())  # no hole
    assert len(set(numbers)) == len(numbers), "a message came twice"
    by_offset = {m.offset: m.data["i"] for m in received}
    assert all(by_offset.get(off) == i for i, off in acked.items()), "an acked message is lost"
    # a publish that timed out in a hung Redis may have been applied once it woke up
    # (its outcome was unknown, it was not acknowledged): then it is here, once
    assert set(numbers) - set(acked) <= set(range(5, 8)) | set(range(8, 60))
    assert sub.gaps == 0 and failures == 3
    assert [(d.seq, d.mid, d.data) for d in dms] == [(sent.seq, sent.mid, {"during": outage})]
