"""Fixtures of the stream-ingest tests: a real redis-server, real ``fastim serve`` nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults._fixtures import nodes  # type: ignore[import-not-found]  # noqa: F401 (fixture)
from store._redis import RedisServer  # type: ignore[import-not-found]
from workers._node import Supervised  # type: ignore[import-not-found]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (fails, never skips, when not installed)."""
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(str(d))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """``supervised(n, *serve_args)``: ``fastim serve --workers n`` (not started)."""
    made: list[Supervised] = []

    def make(n: int, *args: str) -> Supervised:
        s = Supervised(tmp_path, n, *args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
