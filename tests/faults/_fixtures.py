"""Fixtures shared by the tests that run ``fastim serve`` as a process (tests/faults,
tests/events, tests/ingest): nodes on free ports, a real redis-server, a durable store.

Each directory's conftest imports the ones it uses (one definition, not a copy each).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store._redis import RedisServer  # type: ignore[import-not-found]

from ._node import NodeProc, free_port


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    """``nodes(*serve_args)``: a NodeProc on two free ports (not started), in the test's
    directory (the sqlite file is shared by the nodes made here); all are stopped at
    the end."""
    made: list[NodeProc] = []

    def make(*args: str) -> NodeProc:
        node = NodeProc(tmp_path, free_port(), free_port(), *args)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server per test module, for the tests that do not stop it (each uses
    its own prefix)."""
    server = RedisServer(str(tmp_path_factory.mktemp("redis-shared")))
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
def store_args(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """``fastim serve`` arguments of a durable store: a fresh sqlite file, or a fresh
    prefix in the shared redis-server."""
    if request.param == "sqlite":
        return ["--store", "sqlite", "--store-path", str(tmp_path / "fastim.db")]
    server = request.getfixturevalue("shared_redis")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return ["--store", "redis", "--redis-url", server.url, "--redis-prefix", prefix]
