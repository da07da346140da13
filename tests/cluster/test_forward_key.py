"""Publishes with an idempotency key, forwarded to the channel's owner (FORWARD_KEY, 0x49).

The codec (round trip, fixed test vectors: FORWARD is byte for byte what it was), keyed
and plain forwards over a real link in order, and the owner's side: a keyed forward
received twice (a retry after a lost answer) is stored once on a real sqlite store,
both answered with the same offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastim.cluster import frames as F
from fastim.cluster.frames import Forward, ForwardAck, LinkFrame
from fastim.cluster.link import LinkHandler, Links, LinkServer
from fastim.cluster.placement import owner
from fastim.cluster.runtime import Cluster
from fastim.config import Config
from fastim.node import Node
from fastim.store import open_store

names = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)
keys = st.text(min_size=1, max_size=128)


@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), names, st.binary(max_size=300), keys), max_size=20
    )
)
def test_forward_key_batches_round_trip(items: list[tuple[int, str, bytes, str]]) -> None:
    payload = F.pack_batch(
        len(items), b"".join(F.pack_forward_key(r, c, d, k) for r, c, d, k in items)
    )
    assert F.unpack_forward_key(payload) == [Forward(r, c, d, k) for r, c, d, k in items]
    if items:
        with pytest.raises(F.LinkDecodeError):
            F.unpack_forward_key(payload[:-1])
    with pytest.raises(F.LinkDecodeError):
        F.unpack_forward_key(payload + b"x")


def test_vectors() -> None:
    """FORWARD is unchanged (a node of the earlier version reads it as before), and
    FORWARD_KEY is the FORWARD entry with ``u16 len`` + the key after the channel."""
    assert int(LinkFrame.FORWARD_KEY) == 0x49
    assert F.ACCEPTOR_ACCEPTS[LinkFrame.FORWARD_KEY] == 1
    assert F.DIALER_ACCEPTS[LinkFrame.FORWARD_KEY] == 0
    plain = F.pack_batch(1, F.pack_forward(7, "news", b'{"a":1}'))
    assert plain.hex() == "00000001" + "0000000000000007" + "046e657773" + "00000007" + (
        b'{"a":1}'.hex()
    )
    assert F.unpack_forward(plain) == [Forward(7, "news", b'{"a":1}', None)]
    keyed = F.pack_batch(1, F.pack_forward_key(7, "news", b'{"a":1}', "é1"))
    assert (
        keyed.hex()
        == ("00000001" + "0000000000000007" + "046e657773" + "0003" + "c3a931" + "00000007")
        + b'{"a":1}'.hex()
    )
    assert F.unpack_forward_key(keyed) == [Forward(7, "news", b'{"a":1}', "é1")]
    with pytest.raises(F.LinkDecodeError):
        F.unpack_forward_key(
            F.pack_batch(1, bytes.fromhex("0000000000000007046e65777300") + b"\x02\xff\xfe")
        )


class Recorder(LinkHandler):
    def __init__(self) -> None:
        self.batches: list[list[Forward]] = []

    def on_forward(self, peer: str, items: list[Forward]) -> None:
        self.batches.append(items)


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def test_keyed_and_plain_forwards_arrive_in_order() -> None:
    rec = Recorder()
    server = LinkServer("b", "c", rec, timeout=2.0)
    await server.start()
    links = Links("a", "c", heartbeat=0.2, timeout=1.0, backoff=(0.02, 0.2))
    try:
        links.sync({"b": server.address})
        link = links.get("b")
        assert link is not None and await link.wait_up(5)
        for i in range(1, 101):
            key = f"k{i}" if i % 3 else None
            assert links.forward("b", i, "ch", b'{"i":%d}' % i, key)
        await until(lambda: sum(map(len, rec.batches)) == 100, 5, "100 forwards arrive")
        got = [f for b in rec.batches for f in b]
        assert [f.ref for f in got] == list(range(1, 101))
        assert [f.key for f in got] == [f"k{i}" if i % 3 else None for i in range(1, 101)]
        assert server.frames_in[LinkFrame.FORWARD_KEY] >= 1
        assert server.frames_in[LinkFrame.FORWARD] >= 1
    finally:
        await links.close()
        await server.close()


# ------------------------------------------------------------------ the owner's side


class AckLinks:
    """What the owner's Cluster answers on: FORWARD_ACK entries, recorded."""

    def __init__(self) -> None:
        self.acks: list[tuple[Any, ...]] = []
        self.links: dict[str, Any] = {}  # no link to the tree's children: nothing down

    def forward_ack(
        self, peer: str, ref: int, offset: int, epoch: str = "", code: int = 0, reason: str = ""
    ) -> bool:
        self.acks.append((peer, ref, offset, epoch, code, reason))
        return True


def channel_owned_by(me: str) -> str:
    return next(f"ch-{i}" for i in range(1000) if owner(f"ch-{i}", ["a", "b"]) == me)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(Config(node_id="a", store="sqlite", store_path=str(tmp_path / "s.db")))
    n.store = await open_store(n.config.store_settings())
    n.hub.store = n.store
    yield n
    await n.hub.close()
    await n.store.close()


async def test_the_owner_stores_a_retried_keyed_forward_once(node: Node) -> None:
    cluster = Cluster(node)
    cluster.placement.update(["a", "b"])
    node.hub.router = cluster
    links = AckLinks()
    cluster.links = links  # type: ignore[assignment]
    name = channel_owned_by("a")
    cluster.on_forward("b", [Forward(1, name, b'{"n":1}', "evt-1"), Forward(2, name, b'{"n":2}')])
    await until(lambda: len(links.acks) == 2, 5, "two acks")
    # the sender timed out and retries evt-1 (and a new keyed one), in another frame
    cluster.on_forward(
        "b", [Forward(3, name, b'{"n":1}', "evt-1"), Forward(4, name, b'{"n":3}', "evt-3")]
    )
    await until(lambda: len(links.acks) == 4, 5, "four acks")
    acks = {ref: (off, code, reason) for _p, ref, off, _e, code, reason in links.acks}
    assert acks == {
        1: (1, 0, ""),
        2: (2, 0, ""),
        3: (1, 0, "duplicate"),  # the retry: the first offset, and it says so
        4: (3, 0, ""),
    }
    assert node.store is not None
    h = await node.store.read(name, 0)
    assert [d for _, d in h.messages] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert node.hub.duplicates == 1


async def test_a_keyed_publish_to_a_channel_owned_elsewhere_is_forwarded_with_its_key(
    node: Node,
) -> None:
    cluster = Cluster(node)
    cluster.placement.update(["a", "b"])
    node.hub.router = cluster
    sent: list[tuple[Any, ...]] = []
    answers: list[Any] = []

    class SendLinks:
        def forward(
            self, peer: str, ref: int, channel: str, data: bytes, key: str | None = None
        ) -> bool:
            sent.append((peer, channel, data, key))
            return True

    cluster.links = SendLinks()  # type: ignore[assignment]
    name = channel_owned_by("b")
    assert node.hub.publish(name, b'{"x":1}', answers.append, "k-9") is None
    assert node.hub.publish(name, b'{"x":2}', answers.append) is None
    assert sent == [("b", name, b'{"x":1}', "k-9"), ("b", name, b'{"x":2}', None)]
    # the owner's answers (refs 1, 2 in order): the keyed one was a repeat there
    cluster.on_forward_ack(
        "b", [ForwardAck(1, 4, "ep", 0, "duplicate"), ForwardAck(2, 9, "ep", 0, "")]
    )
    assert [(a.offset, a.duplicate) for a in answers] == [(4, True), (9, False)]
