"""What only the redis store shows: failures of Redis itself, and its key layout.

Each test that stops or pauses Redis has a redis-server of its own (``own_redis``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from fastim.store import HistoryLimits, InboxLimits, StoreUnavailable
from fastim.store.redis import RedisStore, redact

from ._redis import RedisServer, free_port

_n = itertools.count()


@pytest.fixture
def p() -> str:
    """A key prefix of this test alone (the session's Redis is shared)."""
    return f"rt{next(_n)}"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def test_no_redis_at_open_is_a_clear_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"redis store {url}: cannot connect"):
        await RedisStore.open(url, timeout=1.0)
    assert time.monotonic() - t0 < 3


async def test_redis_stopped_then_back(own_redis: RedisServer) -> None:
    s = await RedisStore.open(own_redis.url, timeout=1.0)
    try:
        first = await s.append("c", b"1")
        await s.inbox_append("u", b"m", "c1", "a")
        own_redis.stop()
        for call in (s.append("c", b"lost"), s.append_many("c", [b"x"]), s.read("c", 0),
                     s.inbox_append("u", b"m2"), s.inbox_ack("u", 1)):  # fmt: skip
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="redis store"):
                await call
            assert time.monotonic() - t0 < 2.5, "a store error must come promptly"
        own_redis.start()  # same port, same directory: the AOF brings the data back
        deadline = time.monotonic() + 10
        while True:
            try:
                nxt = await s.append("c", b"2")
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        # the refused appends were never sent, so the sequence goes on where it was
        assert nxt == (2, first.epoch)
        assert (await s.read("c", 0)).messages == [(1, b"1"), (2, b"2")]
        assert (await s.inbox_append("u", b"m", "c1", "a")).duplicate
    finally:
        await s.close()


async def test_hung_redis_times_out_and_recovers(own_redis: RedisServer) -> None:
    s = await RedisStore.open(own_redis.url, timeout=0.5)
    try:
        await s.append("c", b"1")
        own_redis.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await s.append("c", b"maybe")
            assert time.monotonic() - t0 < 2.0
        finally:
            own_redis.resume()
        nxt = await s.append("c", b"3")
        # the timed-out append reached Redis before it hung: it may have been applied.
        # That is why a StoreUnavailable write is never acknowledged (docs/stores.md).
        assert nxt.offset in (2, 3)
        h = await s.read("c", 0)
        assert h.messages[0] == (1, b"1") and h.messages[-1] == (nxt.offset, b"3")
    finally:
        await s.close()


async def test_lost_keys_start_a_new_epoch(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(redis_server.url, prefix=p)
    try:
        a = await s.append("c", b"1")
        await raw.delete(f"{p}:ch:{{c}}:m")  # meta gone (eviction, flush)
        b = await s.append("c", b"x")
        assert b.offset == 1 and b.epoch != a.epoch
        await s.append("c", b"y")
        await raw.delete(f"{p}:ch:{{c}}:s")  # history gone but the meta says 2 messages
        h = await s.read("c", 0)
        assert h.epoch not in (a.epoch, b.epoch) and h.top == 0
    finally:
        await s.close()


async def test_a_lost_inbox_starts_a_new_epoch(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    """A flushed or evicted inbox numbers from 1 again: in a new epoch, so clients do
    not take its messages for copies of the old ones."""
    s = await RedisStore.open(redis_server.url, prefix=p)
    try:
        a = await s.inbox_append("bob", b"1")
        await s.inbox_append("bob", b"2")
        await raw.delete(f"{p}:in:{{bob}}:m")  # meta gone (eviction, flush)
        b = await s.inbox_append("bob", b"x")
        assert b.seq == 1 and b.epoch not in ("", a.epoch)
        assert await s.inbox_state("bob") == (0, 1, b.epoch)
        assert [(m.seq, m.data, m.epoch) for m in await s.inbox_read("bob", 0)] == [
            (1, b"x", b.epoch)
        ]
    finally:
        await s.close()


async def test_scripts_reload_after_script_flush(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(redis_server.url, prefix=p)
    try:
        await s.append("c", b"1")
        await raw.script_flush()
        results = await asyncio.gather(*(s.append("c", b"%d" % i) for i in range(2, 12)))
        assert sorted(r.offset for r in results) == list(range(2, 12))
        assert (await s.inbox_append("u", b"m")).seq == 1
    finally:
        await s.close()


async def test_one_tick_is_one_pipeline(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(redis_server.url, prefix=p)
    try:
        before = int((await raw.info("clients"))["connected_clients"])
        results = await asyncio.gather(
            *(s.append(f"c{i % 10}", b"%d" % i) for i in range(1000)),
            *(s.inbox_append(f"u{i % 10}", b"%d" % i) for i in range(200)),
        )
        assert len(results) == 1200
        after = int((await raw.info("clients"))["connected_clients"])
        assert after - before <= 2, "all calls of one tick share one connection"
        for i in range(10):
            assert (await s.state(f"c{i}")).top == 100
    finally:
        await s.close()


async def test_trimming_is_approximate_inside_and_exact_outside(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(redis_server.url, HistoryLimits(size=5), prefix=p)
    try:
        for i in range(1, 501):
            await s.append("c", b"%d" % i)
        kept = await raw.xlen(f"{p}:ch:{{c}}:s")
        assert 5 <= kept <= 5 + 200  # whole stream nodes (100 entries) go at once
        h = await s.read("c", 0)
        assert [off for off, _ in h.messages] == [496, 497, 498, 499, 500]
    finally:
        await s.close()


async def test_key_expiry_follows_meta_ttl(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(
        redis_server.url, HistoryLimits(size=5, ttl=10, meta_ttl=60), prefix=p
    )
    try:
        await s.append("c", b"1")
        for key in (f"{p}:ch:{{c}}:m", f"{p}:ch:{{c}}:s"):
            assert 50_000 < await raw.pttl(key) <= 60_000
        await s.append("d", b"1", HistoryLimits(size=5))  # no meta_ttl: keys persist
        assert await raw.pttl(f"{p}:ch:{{d}}:m") == -1
        # inbox keys never expire: the acked sequence must outlive any quiet period
        await s.inbox_append("u", b"m", "c", "s")
        assert await raw.pttl(f"{p}:in:{{u}}:m") == -1
    finally:
        await s.close()


async def test_dedup_entries_are_pruned(
    redis_server: RedisServer, raw: aioredis.Redis, p: str
) -> None:
    s = await RedisStore.open(redis_server.url, inbox=InboxLimits(dedup_window=0.2), prefix=p)
    try:
        for i in range(50):
            await s.inbox_append("u", b"m", f"c{i}", "s")
        assert await raw.hlen(f"{p}:in:{{u}}:d") == 50
        await asyncio.sleep(0.3)
        await s.inbox_append("u", b"m", "late", "s")
        assert await raw.hlen(f"{p}:in:{{u}}:d") == 1
        assert await raw.zcard(f"{p}:in:{{u}}:t") == 1
    finally:
        await s.close()


def test_errors_do_not_show_passwords() -> None:
    assert redact("redis://user:secret@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact("redis://:secret@host/0") == "redis://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    s = RedisStore("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in s._where
