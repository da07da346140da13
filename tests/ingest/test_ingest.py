"""Publish from a Redis stream (docs/ingest.md), end to end: a real redis-server, real
``fastim serve`` processes (one node, ``--workers 2``, a node killed with ``kill -9``),
real subscribers through the SDK. Nothing is mocked.

What each test would catch: an entry published twice (a duplicate key, a redelivery),
an entry lost or left pending (XPENDING not empty), entries of one channel out of
order, a poison entry that blocks the ones after it or vanishes without a dead letter,
an entry acked while the store was down.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import urllib.request
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from fastim.client import connect

GROUP = "fastim"


async def _wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


async def _pending(r: aioredis.Redis, *streams: str) -> int:
    n = 0
    for s in streams:
        n += int((await r.xpending(s, GROUP))["pending"])
    return n


async def _collect(url: str, channels: list[str], got: dict[str, list[Any]]) -> Any:
    """A subscriber of ``channels`` that appends each message's data to ``got``."""
    client = await connect(url)
    subs = [await client.subscribe(c) for c in channels]

    async def pump(sub: Any, ch: str) -> None:
        while True:
            m = await sub.get()
            got[ch].append(m.data)

    tasks = [asyncio.ensure_future(pump(s, c)) for s, c in zip(subs, channels, strict=True)]
    return client, tasks


async def _stop(client: Any, tasks: list[asyncio.Future[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def test_10k_entries_with_duplicates_two_workers_once_in_order(
    redis_server: Any, supervised: Any
) -> None:
    """10,000 entries over 8 channels and 4 stream shards, ~15% of them repeating an
    earlier idempotency key (some in the same batch, some much later): two workers of
    one node share the group; every distinct entry is published exactly once, in the
    producer's order per channel, and the streams end with nothing pending."""
    streams = [f"in:{i}" for i in range(4)]
    node = supervised(
        2,
        "--ingest-redis-stream", ",".join(streams),
        "--redis-url", redis_server.url,
        "--ingest-claim-idle", "2",
        "--ingest-batch", "100",
    )  # fmt: skip
    await node.start()
    r: Any = aioredis.from_url(redis_server.url)
    # both workers hold streams (the fair share is 2 each) before the producer starts
    lease = f"fastim:ingest:{GROUP}:lease:"

    async def split() -> bool:
        holders = [await r.get(lease + s) for s in streams]
        return None not in holders and len(set(holders)) == 2

    await _wait(split, 30, "the two workers share the four streams")
    channels = [f"ch{i}" for i in range(8)]
    got: dict[str, list[Any]] = {c: [] for c in channels}
    client, tasks = await _collect(node.tcp_url, channels, got)
    rng = random.Random(7)
    expected: dict[str, list[int]] = {c: [] for c in channels}
    sent: list[tuple[str, int]] = []  # (channel, seq) of each distinct entry
    pipe = r.pipeline(transaction=False)
    n_entries = 0
    for i in range(8500):
        ch = channels[rng.randrange(8)]
        expected[ch].append(i)
        sent.append((ch, i))
        shard = streams[zlib.crc32(ch.encode()) % 4]
        fields = {"channel": ch, "data": orjson.dumps({"i": i}), "idempotency_key": f"k{i}"}
        pipe.xadd(shard, fields)
        n_entries += 1
        if i % 6 == 0 and i:  # a duplicate: an earlier entry again, same key
            ch2, j = sent[rng.randrange(max(0, len(sent) - 300), len(sent))]
            pipe.xadd(
                streams[zlib.crc32(ch2.encode()) % 4],
                {"channel": ch2, "data": orjson.dumps({"i": j}), "idempotency_key": f"k{j}"},
            )
            n_entries += 1
        if len(pipe) >= 500:
            await pipe.execute()
    await pipe.execute()
    assert n_entries >= 9900
    while n_entries < 10_000:  # exactly 10,000: the rest are duplicates of the first ones
        ch, j = sent[n_entries % 100]
        await r.xadd(
            streams[zlib.crc32(ch.encode()) % 4],
            {"channel": ch, "data": orjson.dumps({"i": j}), "idempotency_key": f"k{j}"},
        )
        n_entries += 1

    total = sum(len(v) for v in expected.values())
    await _wait(lambda: sum(len(v) for v in got.values()) >= total, 120, "all published")
    await asyncio.sleep(1.0)  # a duplicate published late would show here
    for c in channels:
        assert [d["i"] for d in got[c]] == expected[c], f"channel {c}: order or duplicates"
    assert await _pending(r, *streams) == 0
    # both consumers read entries: each one of the group's consumers on some stream
    readers: set[Any] = set()
    for s in streams:
        for c in await r.xinfo_consumers(s, GROUP):
            readers.add(c["name"])
    assert readers == {b"faults.w0", b"faults.w1"}, readers
    await _stop(client, tasks)
    await r.aclose()


async def test_poison_entries_dead_lettered_dms_sent_rest_goes_on(
    redis_server: Any, nodes: Any
) -> None:
    """Malformed entries go to ``STREAM:dead`` with their reason (and the original fields)
    and do not block the entries after them; ``user`` entries are direct messages, once
    per idempotency key."""
    node = nodes("--ingest-redis-stream", "events", "--redis-url", redis_server.url)
    await node.astart()
    r: Any = aioredis.from_url(redis_server.url)
    got: dict[str, list[Any]] = {"news": []}
    client, tasks = await _collect(node.tcp_url, ["news"], got)
    bob = await connect(node.tcp_url, user="bob")
    poison: list[tuple[dict[str, Any], str]] = [
        ({"data": b"{}"}, "fields"),  # neither channel nor user
        ({"channel": "news", "user": "bob", "data": b"{}"}, "fields"),  # both
        ({"channel": "news", "data": b"{not json"}, "json"),
        ({"channel": "news"}, "fields"),  # no data
        ({"channel": "bad\x01name", "data": b"1"}, "name"),
        ({"channel": "news", "data": b'"' + b"x" * (1 << 20) + b'"'}, "size"),
        ({"channel": "news", "data": b"1", "idempotency_key": "k" * 200}, "key"),
    ]
    ids = []
    for i in range(20):
        ids.append(await r.xadd("events", {"channel": "news", "data": orjson.dumps({"i": i})}))
        if i < len(poison):
            await r.xadd("events", poison[i][0])
    for i in range(3):  # the second and third are the same send: one DM
        key = "dm-1" if i else "dm-0"
        await r.xadd(
            "events", {"user": "bob", "from": "billing", "data": orjson.dumps({"n": i}), "key": key}
        )

    await _wait(lambda: len(got["news"]) >= 20, 20, "the good entries published")
    assert [d["i"] for d in got["news"]] == list(range(20))
    dms = []

    async def read_dms() -> None:
        async for m in bob.direct_messages():
            dms.append((m.sender, m.data))

    t = asyncio.ensure_future(read_dms())
    await _wait(lambda: len(dms) >= 2, 20, "the direct messages")
    await asyncio.sleep(0.5)
    t.cancel()
    assert dms == [("billing", {"n": 0}), ("billing", {"n": 1})]
    await _wait(lambda: _dead_count(r, "events:dead", len(poison)), 10, "the dead letters")
    dead = await r.xrange("events:dead")
    assert [f[b"reason_kind"].decode() for _i, f in dead] == [k for _f, k in poison]
    for (_i, f), (orig, _k) in zip(dead, poison, strict=True):
        assert f[b"reason"] and f[b"entry_id"] and f[b"consumer"] == b"fault-node"
        for k, v in orig.items():
            assert f[k.encode()] == (v if isinstance(v, bytes) else v.encode())
    assert await _pending(r, "events") == 0
    m = _metrics(node.ws_port)
    assert 'fastim_ingest_dead_lettered_total{kind="json"} 1.0' in m
    assert "fastim_ingest_sent_total 2.0" in m
    await bob.aclose()
    await _stop(client, tasks)
    await r.aclose()


async def _dead_count(r: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await r.xlen(stream)) >= n


async def test_kill9_mid_batch_pending_taken_over_by_another_consumer(
    redis_server: Any, nodes: Any
) -> None:
    """A node killed with kill -9 while it has entries read and not acked: another
    consumer (a node with another name, after ``ingest_claim_idle``) takes the stream
    and its pending entries. Every entry with a key is published or sent exactly once,
    in order: direct messages by the inbox's cid, channel entries by the key the store
    recorded in the append's own transaction (an entry stored by the killed node and
    not yet recorded as seen is recognised when b takes it); nothing stays pending."""
    args = ("--ingest-redis-stream", "jobs", "--redis-url", redis_server.url,
            "--ingest-claim-idle", "2", "--ingest-batch", "50",
            "--history-size", "5000")  # fmt: skip
    a = nodes(*args, "--ingest-consumer", "a")
    await a.astart()
    r: Any = aioredis.from_url(redis_server.url)
    n = 4000
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        if i % 2:
            f = {"user": "carol", "data": orjson.dumps({"i": i}), "key": f"k{i}"}
        else:
            f = {"channel": "work", "data": orjson.dumps({"i": i}), "key": f"k{i}"}
        pipe.xadd("jobs", f)
    await pipe.execute()
    # kill it with a batch in flight (read, not acked): frozen (SIGSTOP) until the
    # stream shows entries pending, thawed and frozen again if it was between batches
    await _wait(lambda: _read_at_least(r, 100), 30, "node a started on the stream")
    assert a.proc is not None
    for _ in range(200):
        os.kill(a.proc.pid, signal.SIGSTOP)
        if await _pending(r, "jobs") > 0:
            break
        os.kill(a.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("node a never had a batch in flight when frozen")
    await a.akill()
    b = nodes(*args, "--ingest-consumer", "b")
    b.tcp_port, b.ws_port = a.tcp_port, a.ws_port  # the same node, in its clients' eyes
    await b.astart()
    await _wait(lambda: _all_acked(r, n), 60, "every entry acked by b")
    assert await _pending(r, "jobs") == 0
    assert "took over" in b.log()
    # the channel from its start (the sqlite file survives the kill)
    client = await connect(b.tcp_url)
    # another epoch: every message the channel keeps, from its start
    sub = await client.subscribe("work", since=(0, "another"), on_gap=lambda *a: None)
    seen: list[int] = []
    await _wait(lambda: _drain(sub, seen, n // 2), 30, "the channel's history")
    await client.aclose()
    assert list(dict.fromkeys(seen)) == list(range(0, n, 2)), "an entry lost or out of order"
    assert seen == list(range(0, n, 2)), "a channel entry published twice"
    carol = await connect(b.tcp_url, user="carol")
    dms: list[int] = []

    async def read() -> None:
        async for m in carol.direct_messages():
            dms.append(m.data["i"])

    t = asyncio.ensure_future(read())
    await _wait(lambda: len(dms) >= n // 2, 60, "carol's direct messages")
    await asyncio.sleep(0.5)
    t.cancel()
    await carol.aclose()
    assert dms == list(range(1, n, 2)), "a direct message lost, twice or out of order"
    await r.aclose()


async def test_an_entry_stored_but_not_recorded_as_seen_is_not_published_again(
    redis_server: Any, supervised: Any
) -> None:
    """The state a ``kill -9`` leaves between the store's commit and the consumer's
    ``MULTI``, made on purpose: every entry was stored, then its seen key is deleted
    and the same entries (same keys) come again. Two workers on the default sqlite
    store, channels owned by either (so some publishes are forwarded to the other
    worker with their key): each entry is stored and delivered once, the repeats are
    acked with nothing pending."""
    node = supervised(
        2,
        "--ingest-redis-stream", "again",
        "--redis-url", redis_server.url,
        "--ingest-claim-idle", "2",
        "--ingest-batch", "50",
    )  # fmt: skip
    await node.start()
    r: Any = aioredis.from_url(redis_server.url)
    channels = [f"c{i}" for i in range(6)]
    got: dict[str, list[Any]] = {c: [] for c in channels}
    client, tasks = await _collect(node.tcp_url, channels, got)
    entries = [
        {"channel": channels[i % 6], "data": orjson.dumps({"i": i}), "idempotency_key": f"e{i}"}
        for i in range(300)
    ]

    async def add_all() -> None:
        pipe = r.pipeline(transaction=False)
        for f in entries:
            pipe.xadd("again", f)
        await pipe.execute()

    async def settled() -> bool:
        info = await r.xinfo_groups("again")
        return bool(info) and int(info[0]["lag"] or 0) == 0 and int(info[0]["pending"]) == 0

    await add_all()
    await _wait(lambda: sum(map(len, got.values())) >= 300, 60, "the first 300 published")
    await _wait(settled, 30, "the first 300 acked")
    seen = [k async for k in r.scan_iter(match=f"fastim:ingest:{GROUP}:seen:*")]
    assert len(seen) == 300
    await r.delete(*seen)  # as if the consumer died after the store, before its MULTI
    await add_all()
    await _wait(settled, 60, "the second 300 acked")
    await asyncio.sleep(1.0)  # a copy published late would show here
    for k, c in enumerate(channels):
        assert [d["i"] for d in got[c]] == list(range(k, 300, 6)), f"{c}: twice or lost"
    await _stop(client, tasks)
    # the store too: a new subscriber from the start of each channel gets each once
    check = await connect(node.tcp_url)
    for k, c in enumerate(channels):
        sub = await check.subscribe(c, since=(0, "another"), on_gap=lambda *a: None)
        stored: list[int] = []

        def drained(s: Any = sub, st: list[int] = stored) -> Any:
            return _drain(s, st, 50)

        await _wait(drained, 30, f"{c}'s history")
        assert stored == list(range(k, 300, 6))
    await check.aclose()
    await r.aclose()


async def _read_at_least(r: aioredis.Redis, n: int) -> bool:
    info = await r.xinfo_groups("jobs")
    return bool(info) and int(info[0]["entries-read"] or 0) >= n


async def _all_acked(r: aioredis.Redis, n: int) -> bool:
    info = await r.xinfo_groups("jobs")
    return bool(info) and int(info[0]["lag"] or 0) == 0 and int(info[0]["pending"]) == 0


async def _drain(sub: Any, seen: list[int], n: int) -> bool:
    while True:
        try:
            m = await asyncio.wait_for(sub.get(), 0.2)
        except asyncio.TimeoutError:
            return len(set(seen)) >= n
        seen.append(m.data["i"])


async def test_store_down_entries_stay_pending_then_published_once(
    redis_server: Any, nodes: Any, tmp_path: Any
) -> None:
    """The node's store (another Redis) down: the entries are not acked (they stay
    pending, retried with backoff); once it is back they are published, once each, in
    order."""
    from store._redis import RedisServer  # type: ignore[import-not-found]

    d = tmp_path / "store-redis"
    d.mkdir()
    store = RedisServer(str(d))
    store.start()
    try:
        node = nodes(
            "--store", "redis", "--redis-url", store.url, "--redis-timeout", "0.5",
            "--ingest-redis-stream", "q", "--ingest-redis-url", redis_server.url,
        )  # fmt: skip
        await node.astart()
        r: Any = aioredis.from_url(redis_server.url)
        got: dict[str, list[Any]] = {"live": []}
        client, tasks = await _collect(node.tcp_url, ["live"], got)
        for i in range(50):
            await r.xadd("q", {"channel": "live", "data": orjson.dumps({"i": i}), "key": f"a{i}"})
        await _wait(lambda: len(got["live"]) >= 50, 20, "published before the outage")
        store.stop()
        for i in range(50, 300):
            await r.xadd("q", {"channel": "live", "data": orjson.dumps({"i": i}), "key": f"a{i}"})
        await asyncio.sleep(3)
        assert await _pending(r, "q") > 0, "entries acked while the store was down"
        assert len(got["live"]) == 50
        store.start()
        await _wait(lambda: _all_acked_q(r), 40, "acked once the store is back")
        await _wait(lambda: len(got["live"]) >= 300, 20, "published once the store is back")
        await asyncio.sleep(0.5)
        assert [d["i"] for d in got["live"]] == list(range(300))
        assert "fastim_ingest_retries_total 0.0" not in _metrics(node.ws_port)
        await _stop(client, tasks)
        await r.aclose()
    finally:
        store.kill()


async def _all_acked_q(r: aioredis.Redis) -> bool:
    info = await r.xinfo_groups("q")
    return int(info[0]["lag"] or 0) == 0 and int(info[0]["pending"]) == 0
