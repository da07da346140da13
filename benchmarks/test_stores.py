"""Store benchmarks: append throughput per store, and reading 10k messages back.

Run: ``./dev bench -k stores`` (or ``pytest benchmarks/test_stores.py --benchmark-only``).
Each round appends 1,000 messages of 100 bytes to one channel:

* ``one_at_a_time``: ``await store.append(...)`` 1,000 times in a row — one round trip /
  one transaction per message, the publish path without batching;
* ``gathered_100``: 100 appends started in the same loop tick, awaited together, 10
  times — what a node sees when many clients publish at once (group commit);
* ``append_many_100``: ``append_many`` with 100 messages, 10 times — the node's own
  per-tick batching;
* ``append_keyed_100``: the same through ``append_keyed``, each message with a new
  idempotency key — what a keyed publish (API, stream ingest) adds.

``extra_info["msgs_per_s"]`` is the throughput of the mean round. sqlite-full is the
sqlite store with ``synchronous=FULL`` (an fsync per commit); Redis runs locally with AOF
(``appendfsync everysec``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from fastim.store import HistoryLimits, MemoryStore, Store
from fastim.store.redis import RedisStore
from fastim.store.sqlite import SqliteStore
from tests.store._redis import RedisServer

KINDS = ["memory", "sqlite", "sqlite-full", "redis"]
PAYLOAD = b'{"text":"' + b"x" * 89 + b'"}'  # 100 bytes
ROUND = 1000
LIMITS = HistoryLimits(size=20_000)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-bench")))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(params=KINDS)
def store(
    request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> Iterator[Store]:
    kind = request.param
    s: Store
    if kind == "memory":
        s = MemoryStore(LIMITS)
    elif kind.startswith("sqlite"):
        sync = "full" if kind == "sqlite-full" else "normal"
        s = loop.run_until_complete(SqliteStore.open(tmp_path / "b.db", LIMITS, synchronous=sync))
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"bench{os.getpid()}-{request.node.name}"
        s = loop.run_until_complete(RedisStore.open(server.url, LIMITS, prefix=prefix))
    yield s
    loop.run_until_complete(s.close())


def _bench(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    body: Callable[[], Coroutine[Any, Any, None]],
    msgs: int,
    rounds: int,
) -> None:
    benchmark.pedantic(lambda: loop.run_until_complete(body()), rounds=rounds, iterations=1)
    benchmark.extra_info["msgs_per_s"] = round(msgs / benchmark.stats.stats.mean)


def test_append_one_at_a_time(
    benchmark: Any, loop: asyncio.AbstractEventLoop, store: Store
) -> None:
    async def body() -> None:
        for _ in range(ROUND):
            await store.append("bench", PAYLOAD)

    _bench(benchmark, loop, body, ROUND, rounds=5)


def test_append_gathered_100(benchmark: Any, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    async def body() -> None:
        for _ in range(ROUND // 100):
            await asyncio.gather(*(store.append("bench", PAYLOAD) for _ in range(100)))

    _bench(benchmark, loop, body, ROUND, rounds=10)


def test_append_many_100(benchmark: Any, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    batch = [PAYLOAD] * 100

    async def body() -> None:
        for _ in range(ROUND // 100):
            await store.append_many("bench", batch)

    _bench(benchmark, loop, body, ROUND, rounds=10)


def test_append_keyed_100(benchmark: Any, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    """``append_many_100`` with an idempotency key on every message (all new): the cost
    of recording the keys in the same transaction / script (Store.append_keyed)."""
    batch = [PAYLOAD] * 100
    serial = iter(range(1 << 62))

    async def body() -> None:
        for _ in range(ROUND // 100):
            keys = [f"evt-{next(serial)}" for _ in range(100)]
            await store.append_keyed("bench", batch, keys)

    _bench(benchmark, loop, body, ROUND, rounds=10)


def test_read_10k_since_offset(
    benchmark: Any, loop: asyncio.AbstractEventLoop, store: Store
) -> None:
    async def fill() -> None:
        for _ in range(120):
            await store.append_many("bench", [PAYLOAD] * 100)

    loop.run_until_complete(fill())

    async def body() -> None:
        h = await store.read("bench", 2_000, limit=10_000)
        assert len(h.messages) == 10_000 and h.messages[0][0] == 2_001

    _bench(benchmark, loop, body, 10_000, rounds=10)
