"""Fixtures of the cluster tests: real etcd servers, memberships, a partition proxy.

``etcd`` is one etcd for the whole session (each test gets its own cluster name, so
their keys never meet); tests that stop, pause, wipe or compact etcd take ``own_etcd``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastim.cluster.membership import Membership

from ._etcd import EtcdServer
from ._proxy import Proxy

_clusters = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(str(tmp_path_factory.mktemp("etcd")))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test alone, which it may stop, pause, wipe and compact."""
    d = tmp_path / "etcd"
    d.mkdir()
    server = EtcdServer(str(d))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cluster_name() -> str:
    return f"t{os.getpid()}-{next(_clusters)}"


MemberFactory = Callable[..., Awaitable[Membership]]


@pytest.fixture
async def members(cluster_name: str) -> AsyncIterator[Callable[..., Membership]]:
    """``members(node_id, endpoints, **kw)``: a Membership of this test's cluster (not
    started); every one is stopped at the end."""
    made: list[Membership] = []

    def make(node_id: str, endpoints: str, **kw: Any) -> Membership:
        kw.setdefault("ttl", 2)
        kw.setdefault("prefix", "/fastim-test")
        kw.setdefault("addresses", {"link": f"127.0.0.1:{1000 + len(made)}"})
        m = Membership(endpoints, kw.pop("cluster", cluster_name), node_id, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        await m.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[int], Awaitable[Proxy]]]:
    made: list[Proxy] = []

    async def make(port: int) -> Proxy:
        p = Proxy(port)
        await p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()
