"""``max_connections_per_user`` across the nodes of a cluster (real processes, etcd,
memory store): a user's connection on one node counts against one on another, found
through the user routes and asked over the node links."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fastim.protocol import CloseCode

from ._nodes import Nodes


@pytest.fixture(params=["refuse_new", "close_oldest"])
def two(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Nodes]:
    extra = ("--max-connections-per-user", "1", "--user-limit-policy", request.param)
    nodes = Nodes(tmp_path, 2, *extra, store="memory")
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()


async def hello(url: str, user: str) -> ClientConnection:
    ws = await connect(url, open_timeout=10)
    await ws.send(orjson.dumps({"op": "hello", "id": 1, "user": user}).decode())
    while orjson.loads(await ws.recv()).get("op") != "welcome":
        pass
    return ws


async def alive(ws: ClientConnection) -> bool:
    """Answers a ping (after its limit check: commands wait for it)."""
    try:
        await ws.send('{"op":"ping","id":2}')
        while orjson.loads(await asyncio.wait_for(ws.recv(), 10)).get("op") != "pong":
            pass
        return True
    except ConnectionClosed:
        return False


async def close_code(ws: ClientConnection) -> int | None:
    """The close code the node sends within 10 s (None: still open)."""

    async def drain() -> None:
        async for _ in ws:
            pass

    try:
        await asyncio.wait_for(drain(), 10)
    except (ConnectionClosed, asyncio.TimeoutError):
        pass
    return ws.close_code


async def wait_routed(nodes: Nodes, n: int) -> None:
    """Node 1's user routes hold ``n`` users (a batched etcd write, then its watch)."""
    for _ in range(200):
        for line in nodes[1].metrics().splitlines():
            if line.startswith("fastim_cluster_user_routes ") and float(line.split()[1]) >= n:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("node 1 never saw the user's route")


async def test_one_connection_per_user_over_two_nodes(two: Nodes) -> None:
    policy = "refuse_new" if "refuse_new" in " ".join(two.extra) else "close_oldest"
    first = await hello(two[0].ws_url, "alice")
    assert await alive(first)
    await wait_routed(two, 1)
    second = await hello(two[1].ws_url, "alice")
    if policy == "refuse_new":
        assert await close_code(second) == CloseCode.TOO_MANY_CONNECTIONS
        assert await alive(first)
    else:
        assert await close_code(first) == CloseCode.REPLACED
        assert await alive(second)
    other = await hello(two[1].ws_url, "bob")  # another user: not counted
    assert await alive(other)
