"""Issue P10: a node of several workers joins a cluster as one cluster node per worker.

``fastim serve --workers 2`` with ``etcd_endpoints``: each worker registers as
``<node_id>.w<i>`` in etcd, and the cluster's routing (forwarding to the owner, the
broadcast tree, user routes) carries messages between the workers, and between them and
a single-process node of the same cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from faults._node import NodeProc, free_port  # type: ignore[import-not-found]
from store._redis import RedisServer  # type: ignore[import-not-found]
from workers._node import Supervised  # type: ignore[import-not-found]
from workers.test_mesh import client, spread, worker_of  # type: ignore[import-not-found]

from fastim.cluster.membership import parse_endpoints

from ._etcd import EtcdServer

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

PREFIX = "/fastim-workers"


@pytest.fixture(scope="module")
def wredis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-cw")))
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def cluster(
    tmp_path: Path, etcd: EtcdServer, wredis: RedisServer
) -> AsyncIterator[tuple[Supervised, NodeProc, str]]:
    name = "cw" + uuid.uuid4().hex[:8]
    common = [
        "--store", "redis", "--redis-url", wredis.url, "--redis-prefix", name,
        "--etcd-endpoints", etcd.endpoint, "--cluster-name", name,
        "--etcd-prefix", PREFIX, "--node-lease-ttl", "2",
    ]  # fmt: skip
    sup = Supervised(tmp_path, 2, *common)
    single = NodeProc(tmp_path, free_port(), free_port(), *common)
    await sup.start()
    await single.astart()
    try:
        yield sup, single, name
    finally:
        sup.stop()
        single.stop()


async def registered(etcd: EtcdServer, cluster: str) -> set[str]:
    import aetcd  # type: ignore[import-untyped]

    host, port = parse_endpoints(etcd.endpoint)[0]
    prefix = f"{PREFIX}/{cluster}/nodes/".encode()
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        r = await c.get_prefix(prefix)
        return {bytes(kv.key[len(prefix) :]).decode() for kv in r}


async def test_each_worker_is_a_cluster_node(
    cluster: tuple[Supervised, NodeProc, str], etcd: EtcdServer
) -> None:
    sup, single, name = cluster
    assert await registered(etcd, name) == {"faults.w0", "faults.w1", "fault-node"}
    subs = await spread(sup.tcp_url, 4, 2)
    subs.append(await client(single.tcp_url))
    streams = [await s.subscribe("news") for s in subs]
    await asyncio.sleep(0.5)  # the trees know every node
    pubs = await spread(sup.tcp_url, 2, 2)
    pubs.append(await client(single.tcp_url))
    offs = [await pubs[i % 3].publish("news", {"i": i}) for i in range(30)]
    assert offs == list(range(1, 31))
    for s, c in zip(streams, subs, strict=True):
        got = [(await asyncio.wait_for(s.get(), 10)).offset for _ in range(30)]
        assert got == offs, worker_of(c)
    for c in subs + pubs:
        await c.aclose()
