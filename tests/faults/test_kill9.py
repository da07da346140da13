"""Fault tests: a real node process killed with SIGKILL in the middle of a stream, then
started again on the same ports and the same store, while SDK clients keep going.

What must hold at the application (through the SDK), with the sqlite and the redis store:

* channel: every publish that was acknowledged reaches the subscriber exactly once, in
  order; unacknowledged ones (in flight at the kill) may or may not, never twice;
* direct messages: every send (the SDK retries unacknowledged ones with the same cid
  until acknowledged) reaches the recipient exactly once, in send order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from fastim.client import Backoff, Client, DirectMessage, Message, Sent, connect
from fastim.errors import ConnectionClosed, RequestError

from ._markers import channel_marker, dm_marker
from ._node import NodeProc

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

T = TypeVar("T")


async def within(
    aw: Awaitable[T], seconds: float = 30.0, progress: Callable[[], str] | None = None
) -> T:
    """``aw`` within ``seconds``; on timeout say how far it got (``progress()``)."""
    try:
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        if progress is None:
            raise
        raise AssertionError(f"not done within {seconds}s: {progress()}") from None


async def eventually(cond: Callable[[], bool], seconds: float = 20.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.01)


async def client(url: str, **kwargs: Any) -> Client:
    kwargs.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("request_timeout", 10.0)
    return await connect(url, **kwargs)


async def windowed(n: int, window: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(0)`` .. ``one(n - 1)``, started in order, at most ``window`` at a time (so
    that several are in flight when the node dies)."""
    slots = asyncio.Semaphore(window)

    async def run(i: int) -> None:
        try:
            await one(i)
        finally:
            slots.release()

    tasks = []
    for i in range(n):
        await slots.acquire()
        tasks.append(asyncio.ensure_future(run(i)))
        if i % 8 == 0:
            await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)


async def kill_and_restart(
    node: NodeProc, when: Callable[[], bool], steps: list[str], down: float = 0.3
) -> None:
    """Once ``when()`` holds: SIGKILL the node, leave it dead ``down`` seconds, start it.

    ``steps`` records when each step began (loop time), for the message of a timeout.
    """
    loop = asyncio.get_running_loop()
    steps.append(f"wait {loop.time():.2f}")
    await eventually(when, what="the stream to reach the kill point")
    steps.append(f"kill {loop.time():.2f}")
    await node.akill()
    steps.append(f"dead {loop.time():.2f}")
    await asyncio.sleep(down)
    steps.append(f"start {loop.time():.2f}")
    await node.astart()
    steps.append(f"up {loop.time():.2f}")


def progress(node: NodeProc, steps: list[str], what: str) -> str:
    now = asyncio.get_running_loop().time()
    return f"{what}; kill/restart steps {steps} (now {now:.2f}); node {node.state()}: {node.log()}"


async def test_channel_stream_survives_kill9(
    nodes: Callable[..., NodeProc], store_args: list[str]
) -> None:
    node = nodes(*store_args, "--history-size", "5000")
    await node.astart()
    n = 600
    pub = await client(node.tcp_url)
    subc = await client(node.ws_url)
    try:
        sub = await within(subc.subscribe("stream"))
        received: list[Message] = []

        async def read() -> None:
            async for msg in sub:
                received.append(msg)

        reader = asyncio.ensure_future(read())
        acked: list[tuple[int, int]] = []  # (number, offset)
        failed: list[int] = []

        async def publish(i: int) -> None:
            try:
                acked.append((i, await pub.publish("stream", {"i": i})))
            except (ConnectionClosed, RequestError, asyncio.TimeoutError):
                failed.append(i)  # unknown outcome: not retried (no idempotency key)

        steps: list[str] = []
        await within(
            asyncio.gather(
                windowed(n, 8, publish),
                kill_and_restart(node, lambda: len(acked) >= n // 3, steps),
            ),
            60,
            lambda: progress(node, steps, f"{len(acked)} acked, {len(failed)} failed"),
        )
        last_off = max(off for _, off in acked)
        await eventually(lambda: sub.offset >= last_off, what="the subscriber to catch up")
        # anything extra (a duplicate) arrives before a marker published last
        await channel_marker(pub, "stream", received)
        reader.cancel()

        numbers = [m.data["i"] for m in received]
        offsets = [m.offset for m in received]
        # in offset order, nothing missing on the channel (offsets 1..top), each once
        assert offsets == list(range(1, len(received) + 1)), offsets
        assert len(set(numbers)) == len(numbers), "a message came twice"
        by_offset = {m.offset: m.data["i"] for m in received}
        assert all(by_offset.get(off) == i for i, off in acked), "an acked message is missing"
        assert len(acked) + len(failed) == n and len(acked) > n // 3
        assert set(numbers) - {i for i, _ in acked} <= set(failed)
        assert sub.gaps == 0 and subc.reconnects >= 1 and pub.reconnects >= 1
        assert node.starts == 2
    finally:
        await pub.aclose()
        await subc.aclose()


async def test_direct_messages_survive_kill9(
    nodes: Callable[..., NodeProc], store_args: list[str]
) -> None:
    node = nodes(*store_args, "--dm-retry", "0.5")
    await node.astart()
    n = 300
    alice = await client(node.tcp_url, user="alice", send_timeout=30.0)
    bob = await client(node.ws_url, user="bob")
    try:
        got: list[DirectMessage] = []

        async def read() -> None:
            async for dm in bob.direct_messages():
                got.append(dm)

        reader = asyncio.ensure_future(read())
        sent: dict[int, Sent] = {}

        async def send(i: int) -> None:
            sent[i] = await alice.send("bob", {"i": i})  # retried until acknowledged

        steps: list[str] = []
        await within(
            asyncio.gather(
                windowed(n, 4, send),
                kill_and_restart(node, lambda: len(sent) >= n // 3, steps),
            ),
            60,
            lambda: progress(node, steps, f"{len(sent)} sent, {len(got)} got"),
        )
        await eventually(lambda: len(got) >= n, what=f"{n} direct messages (have {len(got)})")
        await eventually(lambda: bob.inbox.acked == n, what="bob's acks")
        marker = await dm_marker(alice, "bob", got)  # anything extra arrives before it
        assert marker.seq == n + 1  # and nothing else was stored
        reader.cancel()

        # each exactly once, in the inbox's order (seq), as the sender was told
        assert sorted(d.data["i"] for d in got) == list(range(n)), "lost or duplicated"
        assert [d.seq for d in got] == list(range(1, n + 1))
        assert {s.seq: (i, s.mid) for i, s in sent.items()} == {
            d.seq: (d.data["i"], d.mid) for d in got
        }
        assert all(d.sender == "alice" for d in got)
        assert alice.reconnects >= 1 and bob.reconnects >= 1
        await eventually(lambda: bob.inbox.acked == n + 1, what="the marker's ack")
        state = await within(bob.inbox_state())
        assert tuple(state)[:2] == (n + 1, n + 1)  # every one acked, the marker last
    finally:
        await alice.aclose()
        await bob.aclose()
