"""A memory channel's DELIVER lost between workers (a link that dropped it) is filled
from the owner's history ring before the messages after it: the subscriber on the other
worker gets every offset, in order, with no jump.

Two real workers in this process (``Node`` with a ``WorkerRole``, real Unix-socket
links); the loss is injected on the owner's link to the other worker (its batch refuses
two entries, as a link that is down does), nothing else is replaced.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fastim.client import connect
from fastim.cluster.placement import owner
from fastim.config import Config
from fastim.node import Node
from fastim.workers.role import WorkerRole

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[list[Node]]:
    sockets = tempfile.mkdtemp(prefix="fg")
    # each on its own port (in one process: the test connects to the worker it wants)
    nodes = [
        Node(
            Config(
                tcp_port=_free_port(),
                ws_port=0,
                store="memory",
                node_id="g",
                connect_rate_per_ip=0,
            ),
            WorkerRole(i, 2, sockets),
        )
        for i in range(2)
    ]
    await asyncio.gather(*(n.start() for n in nodes))
    yield nodes
    await asyncio.gather(*(n.stop() for n in nodes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_lost_deliver_is_filled_from_the_owner(pair: list[Node]) -> None:
    w0, w1 = pair
    name = next(f"g{i}" for i in range(100) if owner(f"g{i}", ["w0", "w1"]) == "w0")
    sub = await connect(f"tcp://127.0.0.1:{w1.tcp_port}")
    pub = await connect(f"tcp://127.0.0.1:{w0.tcp_port}")
    stream = await sub.subscribe(name)
    for i in (1, 2):
        assert await pub.publish(name, {"i": i}) == i
    got = [(await asyncio.wait_for(stream.get(), 5)).offset for _ in range(2)]
    assert got == [1, 2]
    assert w0.cluster is not None and w0.cluster.links is not None
    link: Any = w0.cluster.links.links["w1"]
    real = link.append_entry
    lost: list[bytes] = []

    def lossy(ftype: int, entry: bytes) -> bool:
        if len(lost) < 2:
            lost.append(entry)
            return False  # as a link that is down: the entry is dropped
        return bool(real(ftype, entry))

    link.append_entry = lossy
    for i in (3, 4, 5):
        assert await pub.publish(name, {"i": i}) == i
    got += [(await asyncio.wait_for(stream.get(), 5)).offset for _ in range(3)]
    assert len(lost) == 2
    assert got == [1, 2, 3, 4, 5]  # 3 and 4 from the owner's ring, then 5
    assert stream.gaps == 0
    assert w1.cluster is not None and w1.cluster.gaps == 1
    await sub.aclose()
    await pub.aclose()
