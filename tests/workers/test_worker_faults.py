"""Issue P10: a worker killed (kill -9) or hung (SIGSTOP) under a publish stream and a
direct-message stream, in a node of ``fastim serve --workers 2`` on the default store.

What must hold: the supervisor replaces the worker; the clients that were on it
reconnect (to the other worker or the replacement: the kernel picks) and recover every
acknowledged message, exactly once, in order; the clients on the other worker notice
nothing (no reconnect, no gap, every message once, in order).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fastim.client import DirectMessage, Message, Sent
from fastim.cluster.placement import owner
from fastim.errors import ConnectionClosed, RequestError

from ._node import Supervised
from .test_mesh import client, spread, worker_of

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Supervised] = []

    async def make(n: int = 2, *args: str) -> Supervised:
        s = Supervised(tmp_path, n, *args)
        made.append(s)
        await s.start()
        await s.wait_workers()
        return s

    yield make
    for s in made:
        s.stop()


async def eventually(cond: Callable[[], bool], seconds: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.02)


async def run_streams(
    node: Supervised, fault: Callable[[], Any], n_pub: int = 300, n_dm: int = 150
) -> None:
    """Subscribers and DM recipients on both workers; publishers and a sender on both;
    ``fault()`` once a third of the stream is acknowledged; then the checks."""
    chan = "stream"
    victim_name = owner(chan, ["w0", "w1"])  # the worker that numbers the channel
    assert victim_name is not None
    subs = await spread(node.tcp_url, 6, 2)
    pubs = await spread(node.tcp_url, 2, 2)
    bobs = await spread(node.ws_url, 2, 2, user="bob")
    alice = await client(node.tcp_url, user="alice", send_timeout=60.0)
    survivors = [c for c in subs + bobs if worker_of(c) != victim_name]
    assert survivors, "no client on the other worker"
    got: dict[int, list[Message]] = {k: [] for k in range(len(subs))}
    streams = [await s.subscribe(chan) for s in subs]

    async def read(k: int) -> None:
        async for m in streams[k]:
            got[k].append(m)

    dms: list[list[DirectMessage]] = [[], []]

    async def read_dm(k: int) -> None:
        async for dm in bobs[k].direct_messages():
            dms[k].append(dm)

    readers = [asyncio.ensure_future(read(k)) for k in range(len(subs))]
    readers += [asyncio.ensure_future(read_dm(k)) for k in range(2)]
    acked: list[tuple[int, int]] = []
    failed: list[int] = []
    sent: dict[int, Sent] = {}

    async def publish(i: int) -> None:
        try:
            acked.append((i, await pubs[i % 2].publish(chan, {"i": i})))
        except (ConnectionClosed, RequestError, asyncio.TimeoutError):
            failed.append(i)  # outcome unknown (in flight at the fault): not retried

    async def publishing() -> None:
        for i in range(n_pub):
            await publish(i)
            if i % 4 == 0:
                await asyncio.sleep(0.002)

    async def sending() -> None:
        for i in range(n_dm):
            sent[i] = await alice.send("bob", {"i": i})  # retried until acknowledged
            await asyncio.sleep(0.004)

    async def faulting() -> None:
        await eventually(lambda: len(acked) >= n_pub // 3, 30, "a third of the stream")
        await fault()

    reconnects_before = {id(c): c.reconnects for c in survivors}
    await asyncio.wait_for(asyncio.gather(publishing(), sending(), faulting()), 120)
    last = max(off for _, off in acked)
    await eventually(lambda: all(s.offset >= last for s in streams), 30, "subscribers catch up")
    await eventually(
        lambda: set(d.seq for d in dms[0] + dms[1]) >= {s.seq for s in sent.values()},
        30,
        "bob gets every direct message",
    )
    await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
    for r in readers:
        r.cancel()

    by_off = {off: i for i, off in acked}
    for k, msgs in got.items():
        offs = [m.offset for m in msgs]
        assert offs == sorted(set(offs)), f"subscriber {k}: out of order or twice"
        assert offs == list(range(1, len(offs) + 1)), f"subscriber {k}: a gap {offs}"
        seen = {m.offset: m.data["i"] for m in msgs}
        assert all(seen.get(off) == i for off, i in by_off.items()), f"{k} missed an acked one"
    assert len(acked) + len(failed) == n_pub and len(acked) > n_pub // 2
    for k in range(2):
        seqs = [d.seq for d in dms[k]]
        assert seqs == sorted(set(seqs)), f"bob {k}: a DM twice or out of order"
    assert sorted({d.data["i"] for d in dms[0] + dms[1]}) == list(range(n_dm))
    # the clients on the other worker noticed nothing
    for c in survivors:
        assert c.reconnects == reconnects_before[id(c)], "a client on the other worker reconnected"
    for s, c in zip(streams, subs, strict=True):
        if worker_of(c) != victim_name:
            assert s.gaps == 0
    for c in [*subs, *pubs, *bobs, alice]:
        await c.aclose()


async def test_kill9_worker_under_streams(node: Callable[..., Any]) -> None:
    sup = await node(2)
    before = await sup.wait_workers()
    victim = int(owner("stream", ["w0", "w1"])[1:])  # type: ignore[index]

    async def kill() -> None:
        sup.signal(victim, signal.SIGKILL)
        after = await sup.wait_workers(exclude={before[victim]})
        assert after[victim] != before[victim]

    await run_streams(sup, kill)
    assert "restart" in sup.log().lower()


async def test_sigstop_worker_is_replaced(node: Callable[..., Any]) -> None:
    sup = await node(2, "--worker-hang-timeout", "3")
    before = await sup.wait_workers()
    victim = int(owner("stream", ["w0", "w1"])[1:])  # type: ignore[index]

    async def stop() -> None:
        sup.signal(victim, signal.SIGSTOP)
        after = await sup.wait_workers(timeout=20, exclude={before[victim]})
        assert after[victim] != before[victim]

    await run_streams(sup, stop)
