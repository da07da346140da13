"""The receiving side of tree delivery, in one process: duplicates, gaps, epochs, loading.

A real hub on a real (sqlite) store and the real ``Cluster`` of a node "b" in a
two-node view where "a" owns the channel; DELIVER batches are handed to
``Cluster.on_deliver`` as the link server would. No links are opened (``links`` is
None: nothing is passed on), so what is checked is what this node delivers to its own
subscribers, read from the channel's history ring (every local delivery appends to it).
The process tests (test_cluster_nodes.py) cover the same paths end to end but cannot
force a gap or a DELIVER racing a subscribe's store read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from fastim import _core
from fastim.cluster.frames import Deliver
from fastim.cluster.placement import owner
from fastim.cluster.runtime import Cluster
from fastim.config import Config
from fastim.hub import Channel
from fastim.node import Node
from fastim.store import open_store


def channel_owned_by_a() -> str:
    return next(f"ch-{i}" for i in range(1000) if owner(f"ch-{i}", ["a", "b"]) == "a")


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(Config(node_id="b", store="sqlite", store_path=str(tmp_path / "s.db")))
    n.store = await open_store(n.config.store_settings())
    n.hub.store = n.store
    yield n
    await n.hub.close()
    await n.store.close()


def make_cluster(node: Node) -> Cluster:
    c = Cluster(node)
    c.placement.update(["a", "b"])
    node.hub.router = c
    return c


def delivered(ch: Channel) -> list[int]:
    h = ch.history
    if not len(h):
        return []
    return [o for o in range(h.first_offset, ch.offset + 1) if h.get(o) is not None]


async def test_duplicates_dropped_gap_filled_from_the_store(node: Node) -> None:
    cluster = make_cluster(node)
    hub, store = node.hub, node.store
    assert store is not None
    name = channel_owned_by_a()
    first, epoch = await store.append_many(name, [b'{"i":%d}' % i for i in range(1, 6)])
    assert first == 1
    ch = cast(Channel, hub.channel(name))
    hub.adopt(ch, epoch, 2)  # this node has delivered up to 2
    cluster.on_deliver("a", [Deliver(name, epoch, 2, b'{"i":2}')])
    assert cluster.duplicates == 1 and ch.offset == 2
    # 5 arrives, 3 and 4 were lost on the way: read from the store, then 5, then 6
    cluster.on_deliver("a", [Deliver(name, epoch, 5, b'{"i":5}')])
    cluster.on_deliver("a", [Deliver(name, epoch, 6, b'{"i":6}')])  # held meanwhile
    assert ch.offset == 2 and name in cluster._filling
    for _ in range(100):
        if ch.offset == 6:
            break
        await asyncio.sleep(0.01)
    assert delivered(ch) == [3, 4, 5, 6]
    assert cluster.gaps == 1
    h = ch.history
    assert h.get(3)[0] == b'{"i":3}'  # type: ignore[index]


async def test_deliver_while_a_subscribe_loads_the_channel_is_held(node: Node) -> None:
    cluster = make_cluster(node)
    hub, store = node.hub, node.store
    assert store is not None
    name = channel_owned_by_a()
    _first, epoch = await store.append_many(name, [b"1", b"2", b"3"])
    ch = cast(Channel, hub.channel(name))
    assert ch.durable and not ch.loaded
    # 3 and 4 come down the tree while the subscribe reads the store (which has 1..3)
    cluster.on_deliver("a", [Deliver(name, epoch, 3, b"3"), Deliver(name, epoch, 4, b"4")])
    assert ch.offset == 0
    hub.adopt(ch, epoch, 3)  # the store's answer
    cluster.loaded(ch)
    assert ch.offset == 4 and delivered(ch) == [4]
    assert not cluster._unloaded


async def test_another_epoch_resets_the_channel(node: Node) -> None:
    cluster = make_cluster(node)
    hub = node.hub
    name = channel_owned_by_a()
    ch = cast(Channel, hub.channel(name))
    hub.adopt(ch, "old", 10)
    cluster.on_deliver("a", [Deliver(name, "new", 1, b"1")])
    assert (ch.epoch, ch.offset) == ("new", 1)


async def test_a_channel_nobody_here_follows_is_not_created(node: Node) -> None:
    cluster = make_cluster(node)
    name = channel_owned_by_a()
    cluster.on_deliver("a", [Deliver(name, "e", 1, b"1")])
    assert name not in node.hub.channels
    assert cluster.tree_in == 1


class _Sink:
    def write(self, data: bytes) -> None:
        pass


async def test_a_link_coming_back_catches_up_from_the_store(node: Node) -> None:
    """A message lost with a link is delivered when the parent's link comes back, not
    only when the channel's next message shows the gap."""
    cluster = make_cluster(node)
    hub, store = node.hub, node.store
    assert store is not None
    name = channel_owned_by_a()
    assert cluster.placement.parent(name, "b") == "a"
    _first, epoch = await store.append_many(name, [b"1", b"2", b"3"])
    ch = cast(Channel, hub.channel(name))
    hub.adopt(ch, epoch, 1)
    ring = _core.OutRing(_core.Flusher(None), _Sink(), _core.FMT_TCP, 1 << 20)
    hub.join(name, ring)
    cluster.on_peer("c", True)  # not this channel's parent: nothing to do
    await asyncio.sleep(0.05)
    assert ch.offset == 1
    cluster.on_peer("a", True)
    for _ in range(100):
        if ch.offset == 3:
            break
        await asyncio.sleep(0.01)
    assert delivered(ch) == [2, 3] and cluster.resyncs == 1
