"""A follow the owner worker does not answer is sent again, and what was published while
the follower was not registered reaches its subscribers, in order, exactly once.

Seen in a 300,000-connection run (18 workers on 2 cores, every worker stalled for
seconds): a follow not acknowledged within FOLLOW_TIMEOUT was given up, the follower
stayed unregistered at the owner while the link was up, and its subscribers got nothing
more. Here the owner (or the follower) loses follow messages while the link stays up:

- a subscribe to a durable channel owned by the other worker (the subscribe path,
  ``WorkerMesh.follow``): the lost follow is retried, and the messages published before
  the retry was acknowledged come from the store;
- a memory channel whose owner forgot the follower (its link to it flapped) while the
  follower's refollow was lost (``_follow_at``): retried, and the messages published
  meanwhile come from the owner's history ring, before the channel's next message.

Two real workers in this process (``Node`` with a ``WorkerRole``, real Unix-socket links,
a shared sqlite file for the durable case), as tests/workers/test_gap_from_owner.py; the
loss is injected on a CONTROL handler, nothing else is replaced. FOLLOW_TIMEOUT is
shortened so the retries come within a second.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fastim.client import Client, connect
from fastim.cluster.placement import owner
from fastim.config import Config
from fastim.node import Node
from fastim.workers import mesh
from fastim.workers.mesh import WorkerMesh
from fastim.workers.role import WorkerRole

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

#: the follow timeout of these tests (3 s in production)
TIMEOUT = 0.3


class Lose:
    """A worker's CONTROL handler for ``op`` that loses every message while ``losing``
    (as a message lost on the way: the link stays up), and counts what it lost."""

    def __init__(self, worker: WorkerMesh, op: str) -> None:
        self.real = worker._control[op]
        self.lost: list[dict[str, Any]] = []
        self.losing = True
        worker._control[op] = self

    def __call__(self, peer: str, msg: dict[str, Any]) -> None:
        if self.losing:
            self.lost.append(msg)
            return
        self.real(peer, msg)


@pytest.fixture
async def pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[str], Awaitable[list[Node]]]]:
    """Two workers of one node in this process: ``await pair(store)``."""
    monkeypatch.setattr(mesh, "FOLLOW_TIMEOUT", TIMEOUT)
    made: list[Node] = []

    async def make(store: str) -> list[Node]:
        sockets = tempfile.mkdtemp(prefix="fr")
        nodes = [
            Node(
                Config(
                    tcp_port=_free_port(),  # each its own: the test picks the worker
                    ws_port=0,
                    store=store,
                    store_path=str(tmp_path / "fastim.db"),
                    node_id="f",
                    connect_rate_per_ip=0,
                ),
                WorkerRole(i, 2, sockets),
            )
            for i in range(2)
        ]
        await asyncio.gather(*(n.start() for n in nodes))
        made.extend(nodes)
        return nodes

    yield make
    await asyncio.gather(*(n.stop() for n in made))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mesh(node: Node) -> WorkerMesh:
    assert isinstance(node.cluster, WorkerMesh)
    return node.cluster


def _owned_by_w0(prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(100) if owner(f"{prefix}{i}", ["w0", "w1"]) == "w0")


async def _until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


async def _offsets(stream: Any, n: int) -> list[int]:
    return [(await asyncio.wait_for(stream.get(), 5)).offset for _ in range(n)]


async def _publish(pub: Client, name: str, numbers: range) -> None:
    for i in numbers:
        assert await pub.publish(name, {"i": i}) == i


def _followers(node: Node, name: str) -> set[str]:
    return _mesh(node).placement.followers.get(name, set())


@pytest.mark.parametrize("lost", ["follow", "followed"])
async def test_a_lost_follow_of_a_subscribe_is_sent_again(
    pair: Callable[[str], Awaitable[list[Node]]], lost: str
) -> None:
    """A subscribe on w1 to a durable channel w0 owns: its follow (or the answer to it)
    is lost until ``losing`` ends. The subscribe is answered after the first timeout as
    before; the follow is sent again until acknowledged; what was published before
    that comes from the store, then the rest from the owner, each message once."""
    w0, w1 = await pair("sqlite")
    m0, m1 = _mesh(w0), _mesh(w1)
    name = _owned_by_w0("d")
    loss = Lose(m0 if lost == "follow" else m1, lost)
    sub = await connect(f"tcp://127.0.0.1:{w1.tcp_port}")
    pub = await connect(f"tcp://127.0.0.1:{w0.tcp_port}")
    sent = m1.follows_sent  # (the refollows of the links coming up)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stream = await sub.subscribe(name)
    took = loop.time() - t0
    assert w1.hub.channels[name].durable
    assert len(loss.lost) >= 1  # (the first retry may be on its way already)
    assert TIMEOUT <= took < TIMEOUT + 1.0, took  # not held past the first timeout
    await _publish(pub, name, range(1, 4))
    # unanswered: sent again, and again (that round is lost too): nothing given up
    await _until(lambda: len(loss.lost) >= 3, "the follow sent again, twice")
    if lost == "follow":
        assert "w1" not in _followers(w0, name)  # 1-3 were not sent to w1
    loss.losing = False
    got = await _offsets(stream, 3)  # the store's, once the retry was acknowledged
    assert "w1" in _followers(w0, name)
    await _until(lambda: not m1._unacked, "the retry to end")
    await _publish(pub, name, range(4, 7))
    got += await _offsets(stream, 3)
    assert got == [1, 2, 3, 4, 5, 6]
    await asyncio.sleep(4 * TIMEOUT)  # no duplicate is on its way, no retry goes on
    assert stream.qsize() == 0 and stream.gaps == 0
    assert w1.hub.delivered == 6  # each message once to the subscriber's ring
    retries = m1.follow_retries
    assert retries >= 2 and m1.follows_sent - sent == retries + 1
    assert not m1._follow_waits and not m1._unacked  # nothing left behind
    text = w1.metrics.render().decode()
    assert f"fastim_worker_follow_retries_total {float(retries)}" in text
    await sub.aclose()
    await pub.aclose()


async def test_a_lost_refollow_is_sent_again_and_caught_up_from_the_owner(
    pair: Callable[[str], Awaitable[list[Node]]],
) -> None:
    """A memory channel w0 owns, with a subscriber on w1. w0's link to w1 flaps: w0
    forgets w1's follows and asks w1 to send them again (refollow), and that follow is
    lost. Messages published meanwhile are not sent to w1; once the follow, sent again,
    is acknowledged, w1 asks w0's history ring for them, so they arrive although the
    channel stays quiet, then the next message comes, each once and in order."""
    w0, w1 = await pair("memory")
    m0, m1 = _mesh(w0), _mesh(w1)
    name = _owned_by_w0("g")
    sub = await connect(f"tcp://127.0.0.1:{w1.tcp_port}")
    pub = await connect(f"tcp://127.0.0.1:{w0.tcp_port}")
    stream = await sub.subscribe(name)
    assert not w1.hub.channels[name].durable
    await _publish(pub, name, range(1, 3))
    got = await _offsets(stream, 2)
    loss = Lose(m0, "follow")
    assert m0.links is not None
    link: Any = m0.links.links["w1"]
    connects = link.connects
    link._conn.abort()  # w0's link to w1 breaks: w0 forgets w1's follows
    await _until(lambda: link.connects > connects and m0.links is not None, "w0's link back")
    await _until(lambda: len(loss.lost) >= 1, "w1's refollow (lost)")
    assert "w1" not in _followers(w0, name)
    assert m1.links is not None and m1.links.is_up("w0")  # w1's link stayed up
    await _publish(pub, name, range(3, 5))  # not sent to w1: it does not follow
    await _until(lambda: len(loss.lost) >= 2, "the follow sent again (and lost too)")
    loss.losing = False
    got += await _offsets(stream, 2)  # 3 and 4 from w0's ring: the channel is quiet
    assert "w1" in _followers(w0, name)
    await _publish(pub, name, range(5, 6))
    got += await _offsets(stream, 1)
    assert got == [1, 2, 3, 4, 5]
    await asyncio.sleep(4 * TIMEOUT)
    assert stream.qsize() == 0 and stream.gaps == 0
    assert w1.hub.delivered == 5
    assert m1.follow_retries >= 1
    assert not m1._follow_waits and not m1._unacked
    await sub.aclose()
    await pub.aclose()


async def test_a_retry_answered_while_the_subscribe_reads_the_store(
    pair: Callable[[str], Awaitable[list[Node]]],
) -> None:
    """The retry is acknowledged while the subscribe still reads the channel's state from
    the store (after the first timeout): what was published between that state and the
    registration comes from the store once the state is read, not with the next message."""
    w0, w1 = await pair("sqlite")
    m0, m1 = _mesh(w0), _mesh(w1)
    name = _owned_by_w0("s")
    store: Any = w1.hub.store
    real_state = store.state
    read, release = asyncio.Event(), asyncio.Event()

    async def slow_state(channel: str, *args: Any) -> Any:
        state = await real_state(channel, *args)
        if channel == name and not release.is_set():
            read.set()  # read: offset 0; the subscribe takes it once released
            await release.wait()
        return state

    store.state = slow_state
    loss = Lose(m0, "follow")
    sub = await connect(f"tcp://127.0.0.1:{w1.tcp_port}")
    pub = await connect(f"tcp://127.0.0.1:{w0.tcp_port}")
    subscribing = asyncio.ensure_future(sub.subscribe(name))
    await asyncio.wait_for(read.wait(), 5)
    assert "w1" not in _followers(w0, name)
    await _publish(pub, name, range(1, 4))  # after the state, before the registration
    loss.losing = False
    await _until(lambda: "w1" in _followers(w0, name), "the retry acknowledged")
    await _until(lambda: not m1._unacked, "the retry to end")
    assert not w1.hub.channels[name].loaded  # the subscribe is still reading
    release.set()
    stream = await asyncio.wait_for(subscribing, 5)
    got = await _offsets(stream, 3)  # from the store, once the state was taken
    await _publish(pub, name, range(4, 7))
    got += await _offsets(stream, 3)
    assert got == [1, 2, 3, 4, 5, 6]
    await asyncio.sleep(4 * TIMEOUT)
    assert stream.qsize() == 0 and stream.gaps == 0
    assert w1.hub.delivered == 6
    assert m1.follow_retries >= 1 and not m1._resync_loaded
    await sub.aclose()
    await pub.aclose()
