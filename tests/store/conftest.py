"""Fixtures of the store tests: a store of each kind, and real redis-server processes.

``store`` is parametrized over memory, sqlite and redis, so every contract test runs the
same assertions against all three. The Redis server is shared by the session (each store
gets its own key prefix); tests that stop or pause Redis start their own.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastim.store import HistoryLimits, InboxLimits, MemoryStore, Store
from fastim.store.redis import RedisStore
from fastim.store.sqlite import SqliteStore

from ._redis import RedisServer

KINDS = ("memory", "sqlite", "redis")

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop, pause and restart."""
    server = RedisServer(_mkdir(tmp_path / "redis"))
    server.start()
    yield server
    server.kill()


def _mkdir(p: Path) -> str:
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StoreFactory]:
    """Open stores of ``kind`` with the given limits; all are closed at the end.

    Successive stores of one test share their data (the same sqlite file, the same Redis
    prefix) so a test can close one and open the next as a restart.
    """
    stores: list[Store] = []
    prefix = f"t{os.getpid()}-{next(_prefixes)}"
    path = tmp_path / "store.db"
    server: RedisServer | None = None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")

    async def make(
        limits: HistoryLimits | None = None, inbox: InboxLimits | None = None, **kw: Any
    ) -> Store:
        s: Store
        if kind == "memory":
            s = MemoryStore(limits, inbox, **kw)
        elif kind == "sqlite":
            s = await SqliteStore.open(path, limits, inbox, **kw)
        else:
            assert server is not None
            s = await RedisStore.open(server.url, limits, inbox, prefix=prefix, **kw)
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()
