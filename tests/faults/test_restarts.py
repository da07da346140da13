"""Issue P7: a node restarted or killed (kill -9) never makes a client drop or skip a
message, in the default configuration and on every store.

The three observations of the issue, each reproduced as it was seen:

1. ``fastim serve`` with no store flags, 50 acked publishes, kill -9, start again in the
   same directory: a subscribe with ``since`` recovers them all (the default store is
   the sqlite file ``fastim.db`` in the working directory).
2. A direct message sent after a restart on the memory store (the inbox numbers from 1
   again) reaches the recipient's application; it is not dropped as a copy of the seq 1
   it had before (inbox epochs).
3. A channel message published after a restart on the memory store, before the
   subscriber came back, reaches it: recovery from an older epoch delivers the current
   epoch from its start, after a Gap.

Then each store (sqlite by default, memory, redis) through a graceful restart and a kill -9
in the middle of a channel stream and a direct-message stream: every message the node
still holds reaches the application once, in order, and on ``memory`` the application is
told exactly what was lost. And 20 kill -9 cycles in a row on the default store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect

from fastim.client import Backoff, DirectGap, DirectMessage, Gap, Message, Sent
from fastim.errors import ConnectionClosed, RequestError

from ._markers import channel_marker, dm_marker
from ._node import NodeProc
from .test_kill9 import client, eventually, progress, windowed, within

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


async def raw_sub(
    url: str, ch: str, since: dict[str, Any] | None, want: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A plain WebSocket client's ``sub`` (the wire, as any client sees it): the reply
    and the first ``want`` messages after it (fewer if none come for 1 s)."""
    cmd: dict[str, Any] = {"op": "sub", "ch": ch, "id": 1}
    if since is not None:
        cmd["since"] = since
    async with ws_connect(url) as ws:
        await ws.send(orjson.dumps(cmd).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        msgs: list[dict[str, Any]] = []
        while len(msgs) < want:
            try:
                msgs.append(orjson.loads(await asyncio.wait_for(ws.recv(), 1.0)))
            except asyncio.TimeoutError:
                break
    return reply, msgs


# ----------------------------------------------------------------------- the observations


async def test_default_store_keeps_every_acked_message_across_kill9(
    nodes: Callable[..., NodeProc], tmp_path: Path
) -> None:
    node = nodes()  # no store flag: the defaults, as `fastim serve` / `./dev serve`
    await node.astart()
    try:
        first, _ = await raw_sub(node.ws_url, "news", None, 0)
        epoch = first["epoch"]
        pub = await client(node.tcp_url)
        offs = [await pub.publish("news", {"i": i}) for i in range(50)]
        assert offs == list(range(1, 51))
        await pub.aclose()
        await node.akill()
        assert (tmp_path / "fastim.db").exists(), "the default store is a file in the cwd"
        await node.astart()
        reply, msgs = await raw_sub(node.ws_url, "news", {"off": 1, "epoch": epoch}, 49)
        assert (reply["op"], reply["epoch"], reply["off"], reply["recovered"]) == (
            "subscribed",
            epoch,
            50,
            True,
        ), reply
        assert [(m["off"], m["data"]["i"]) for m in msgs] == [(o, o - 1) for o in range(2, 51)]
    finally:
        node.stop()


async def test_a_direct_message_after_a_restart_is_not_dropped_as_a_copy(
    nodes: Callable[..., NodeProc],
) -> None:
    node = nodes("--store", "memory", "--dm-retry", "0.5")
    await node.astart()
    alice = await client(node.tcp_url, user="alice")
    bob = await client(node.ws_url, user="bob")
    try:
        gaps: list[DirectGap] = []
        got: list[DirectMessage] = []

        async def read() -> None:
            async for dm in bob.direct_messages(on_gap=gaps.append):
                got.append(dm)

        reader = asyncio.ensure_future(read())
        before = [await alice.send("bob", {"n": n}) for n in (1, 2, 3)]
        await eventually(lambda: len(got) == 3 and bob.inbox.acked == 3, what="3 dms, acked")
        await node.akill()
        await node.astart()
        after = await within(alice.send("bob", {"n": 4}))  # retried until the node is back
        assert after.seq == 1 and after.epoch not in ("", before[0].epoch), after
        await eventually(lambda: len(got) == 4, what=f"the dm sent after the restart: {got}")
        reader.cancel()
        assert [(d.seq, d.data["n"], d.epoch) for d in got] == [
            (1, 1, before[0].epoch),
            (2, 2, before[0].epoch),
            (3, 3, before[0].epoch),
            (1, 4, after.epoch),
        ]
        # told: nothing of the old numbering was lost (all 3 had been taken), new one here
        assert gaps == [DirectGap(before[0].epoch, 3, after.epoch)]
        assert bob.inbox.duplicates == 0 or bob.inbox.delivered == 1
        await eventually(lambda: bob.inbox.acked == 1, what="the ack in the new epoch")
        st = await within(bob.inbox_state())
        assert st == (1, 1, after.epoch)
    finally:
        await alice.aclose()
        await bob.aclose()
        node.stop()


async def test_an_ack_of_a_lost_numbering_is_not_repeated(
    nodes: Callable[..., NodeProc],
) -> None:
    """An ack made after the node lost the inbox (memory store restarted) names the old
    epoch: the node changes nothing and says so, and the SDK does not send it again
    and again until a message of the new numbering comes."""
    node = nodes("--store", "memory")
    await node.astart()
    alice = await client(node.tcp_url, user="alice")
    bob = await client(node.ws_url, user="bob")
    try:
        dms = bob.direct_messages(auto_ack=False)
        for n in (1, 2, 3):
            await alice.send("bob", {"n": n})
        got = [await within(dms.get()) for _ in range(3)]
        await node.akill()
        await node.astart()
        await eventually(lambda: bob.connected, what="bob reconnected")
        sent: list[dict[str, Any]] = []
        real = bob._cmd

        async def counting(cmd: dict[str, Any], *a: Any, **kw: Any) -> Any:
            sent.append(cmd)
            return await real(cmd, *a, **kw)

        bob._cmd = counting  # type: ignore[method-assign]
        bob.ack(got[-1].seq)  # taken in the old numbering
        await eventually(lambda: len(sent) >= 1, what="the ack")
        await within(bob.ping())  # a round trip after the ack's answer
        await within(bob.ping())
        acks = [c for c in sent if c.get("op") == "ack"]
        assert acks == [{"op": "ack", "seq": 3, "epoch": got[0].epoch}], acks
        assert bob.inbox.acked == 0
    finally:
        await alice.aclose()
        await bob.aclose()
        node.stop()


async def test_a_channel_message_after_a_restart_is_not_skipped(
    nodes: Callable[..., NodeProc],
) -> None:
    node = nodes("--store", "memory")
    await node.astart()
    pub = await client(node.tcp_url)
    # this subscriber comes back 2 s after the node went away: later than the publisher
    slow = Backoff(base=2.0, factor=1.0, max=2.0, jitter="none")
    subc = await client(node.ws_url, backoff=slow)
    try:
        gaps: list[Gap] = []
        sub = await within(subc.subscribe("news", on_gap=gaps.append))
        received: list[Message] = []

        async def read() -> None:
            async for msg in sub:
                received.append(msg)

        reader = asyncio.ensure_future(read())
        for i in range(5):
            await pub.publish("news", {"i": i})
        await eventually(lambda: len(received) == 5, what="5 messages live")
        old_epoch = sub.epoch
        await node.akill()
        await node.astart()
        offs = [await within(pub.publish("news", {"i": i})) for i in range(5, 8)]
        assert offs == [1, 2, 3]  # a new epoch: the memory store lost the old one
        assert subc.reconnects == 0, "the subscriber came back too early for this test"
        # the wire, as a client that follows the protocol sees it
        reply, msgs = await raw_sub(node.ws_url, "news", {"off": 5, "epoch": old_epoch}, 3)
        assert reply["recovered"] is False and reply["epoch"] != old_epoch
        assert [(m["off"], m["data"]["i"]) for m in msgs] == [(1, 5), (2, 6), (3, 7)]
        # the SDK: the gap, then the new epoch from its start, then live ones
        await eventually(lambda: len(received) == 8, 10, f"the new epoch's 3: {received}")
        await pub.publish("news", {"i": 8})
        await eventually(lambda: len(received) == 9, what="live after recovery")
        reader.cancel()
        assert [(m.offset, m.data["i"]) for m in received] == [
            (1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (1, 5), (2, 6), (3, 7), (4, 8),
        ]  # fmt: skip
        assert gaps == [Gap("news", old_epoch, 5, sub.epoch, 3, "epoch")]
    finally:
        await pub.aclose()
        await subc.aclose()
        node.stop()


# ---------------------------------------------------------------- every store, both ways


@pytest.fixture(params=["sqlite", "memory", "redis"])
def any_store(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """(store, ``fastim serve`` arguments): the default (sqlite, no flag), memory, redis."""
    if request.param == "sqlite":
        return "sqlite", []
    if request.param == "memory":
        return "memory", ["--store", "memory"]
    server = request.getfixturevalue("shared_redis")
    prefix = f"restart{uuid.uuid4().hex[:8]}"
    return "redis", ["--store", "redis", "--redis-url", server.url, "--redis-prefix", prefix]


@pytest.mark.parametrize("how", ["restart", "kill9"])
async def test_streams_across_a_restart_on_every_store(
    nodes: Callable[..., NodeProc], any_store: tuple[str, list[str]], how: str
) -> None:
    """A channel stream and a direct-message stream, the node restarted (SIGTERM, then
    start) or killed (SIGKILL, then start) a third of the way through."""
    kind, args = any_store
    node = nodes(*args, "--history-size", "5000", "--dm-retry", "0.5")
    await node.astart()
    n, ndm = 300, 120
    pub = await client(node.tcp_url)
    subc = await client(node.ws_url, user="bob")
    alice = await client(node.tcp_url, user="alice", send_timeout=30.0)
    try:
        gaps: list[Gap] = []
        dgaps: list[DirectGap] = []
        sub = await within(subc.subscribe("stream", on_gap=gaps.append))
        received: list[Message] = []
        got: list[DirectMessage] = []

        async def read() -> None:
            async for msg in sub:
                received.append(msg)

        async def read_dms() -> None:
            async for dm in subc.direct_messages(on_gap=dgaps.append):
                got.append(dm)

        readers = [asyncio.ensure_future(read()), asyncio.ensure_future(read_dms())]
        acked: list[tuple[int, int, str]] = []  # (number, offset, epoch when acked)
        failed: list[int] = []
        epoch_of: list[str] = [sub.epoch]

        async def publish(i: int) -> None:
            try:
                off = await pub.publish("stream", {"i": i})
                acked.append((i, off, epoch_of[-1]))
            except (ConnectionClosed, RequestError, asyncio.TimeoutError):
                failed.append(i)

        sent: dict[int, Sent] = {}

        async def send(i: int) -> None:
            sent[i] = await alice.send("bob", {"i": i})  # retried until acknowledged

        steps: list[str] = []

        async def bounce() -> None:
            await eventually(lambda: len(acked) >= n // 3 and len(sent) >= ndm // 3)
            loop = asyncio.get_running_loop()
            steps.append(f"stop at {len(acked)} acked, {len(sent)} sent, t={loop.time():.2f}")
            if how == "kill9":
                await node.akill()
            else:
                await node.astop()  # SIGTERM: a graceful drain
            if kind == "memory":
                # an ack the old node sent before it died may still be read after this
                # point: which epoch an ack belongs to is known only once the new node
                # is up (nothing of the old one is left to read by then)
                epoch_of.append("either")
            steps.append(f"stopped t={loop.time():.2f}")
            await asyncio.sleep(0.2)
            steps.append(f"starting t={loop.time():.2f}")
            await node.astart()
            if kind == "memory":
                epoch_of.append("new")  # publishes acked from now on are the new epoch's
            steps.append(f"up at {len(acked)} acked, {len(sent)} sent, t={loop.time():.2f}")

        await within(
            asyncio.gather(windowed(n, 8, publish), windowed(ndm, 4, send), bounce()),
            90,
            lambda: progress(
                node,
                steps,
                f"{len(acked)} acked, {len(failed)} failed, {len(sent)} sent, "
                f"{len(received)} received, {len(got)} dms got",
            ),
        )
        # settle: everything the node holds has had time to arrive
        last = max(off for _, off, e in acked if e == epoch_of[-1])
        await eventually(
            lambda: sub.offset >= last and (kind != "memory" or len(gaps) == 1),
            30,
            f"the subscriber to reach {last}: at {sub.epoch}/{sub.offset}, gaps {gaps}",
        )
        first_epoch = sent[0].epoch
        new_sends = {i for i, s in sent.items() if kind != "memory" or s.epoch != first_epoch}
        await eventually(
            lambda: {d.data["i"] for d in got} >= new_sends,
            30,
            f"direct messages: {len(got)} of {len(sent)}",
        )
        # anything extra (a duplicate) arrives before a marker sent last
        await channel_marker(pub, "stream", received)
        await dm_marker(alice, "bob", got)
        for r in readers:
            r.cancel()

        numbers = [m.data["i"] for m in received]
        assert len(set(numbers)) == len(numbers), "a message reached the application twice"
        assert len(acked) + len(failed) == n
        dm_numbers = [d.data["i"] for d in got]
        assert len(set(dm_numbers)) == len(dm_numbers), "a direct message came twice"
        assert sorted(sent) == list(range(ndm))
        if kind != "memory":
            # nothing lost: offsets 1..top once, in order; every acked one; no gap
            assert [m.offset for m in received] == list(range(1, len(received) + 1))
            by_off = {m.offset: m.data["i"] for m in received}
            assert all(by_off.get(off) == i for i, off, _ in acked), "an acked one is missing"
            assert gaps == [] and dgaps == []
            assert [d.seq for d in got] == list(range(1, ndm + 1))
            assert sorted(dm_numbers) == list(range(ndm))
            return
        # memory: the old epoch up to the gap, the gap saying where it ends, the new
        # epoch whole; what was lost is exactly what the gap says (acked, above it)
        assert len(gaps) == 1 and gaps[0].reason == "epoch", gaps
        gap = gaps[0]
        cut = next(k for k, m in enumerate(received) if m.offset == 1 and k > 0)
        old, new = received[:cut], received[cut:]
        assert gap.epoch != gap.last_epoch
        assert [m.offset for m in old] == list(range(1, gap.last_offset + 1))
        assert [m.offset for m in new] == list(range(1, len(new) + 1))
        by_new = {m.offset: m.data["i"] for m in new}
        assert all(by_new.get(off) == i for i, off, e in acked if e == "new"), "new one lost"
        lost = {i for i, off, e in acked if e == epoch_of[0] and off > gap.last_offset}
        assert lost.isdisjoint(numbers)
        # direct messages: the same shape (one DirectGap between the two numberings)
        assert len(dgaps) == 1, dgaps
        dgap = dgaps[0]
        dold = [d for d in got if d.epoch == dgap.last_epoch]
        dnew = [d for d in got if d.epoch == dgap.epoch]
        assert dold + dnew == got
        assert [d.seq for d in dold] == list(range(1, dgap.last_seq + 1))
        assert [d.seq for d in dnew] == list(range(1, len(dnew) + 1))
        assert {i for i, s in sent.items() if s.epoch == dgap.epoch} <= set(dm_numbers)
    finally:
        await pub.aclose()
        await subc.aclose()
        await alice.aclose()


async def test_twenty_kill9_cycles_on_the_default_store(
    nodes: Callable[..., NodeProc],
) -> None:
    """kill -9 twenty times in a row under a channel stream and a direct-message stream:
    not one acknowledged message lost, not one duplicate at the application."""
    # the default store; a history that holds the whole run (the publisher is not paced,
    # and a subscriber 128 messages behind would otherwise be told "trimmed", correctly)
    node = nodes("--dm-retry", "0.5", "--history-size", "100000")
    await node.astart()
    pub = await client(node.tcp_url)
    subc = await client(node.ws_url, user="bob")
    alice = await client(node.tcp_url, user="alice", send_timeout=60.0)
    stop = asyncio.Event()
    try:
        gaps: list[Any] = []
        sub = await within(subc.subscribe("cycles", on_gap=gaps.append))
        received: list[Message] = []
        got: list[DirectMessage] = []

        async def read() -> None:
            async for msg in sub:
                received.append(msg)

        async def read_dms() -> None:
            async for dm in subc.direct_messages(on_gap=gaps.append):
                got.append(dm)

        acked: dict[int, int] = {}
        sent: dict[int, Sent] = {}

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                try:
                    acked[i] = await pub.publish("cycles", {"i": i})
                except (ConnectionClosed, RequestError, asyncio.TimeoutError):
                    await asyncio.sleep(0.01)
                i += 1

        async def sender() -> None:
            i = 0
            while not stop.is_set():
                sent[i] = await alice.send("bob", {"i": i})
                i += 1

        tasks = [asyncio.ensure_future(c()) for c in (read, read_dms, publisher, sender)]

        def progressed(a0: int, s0: int) -> Callable[[], bool]:
            return lambda: len(acked) >= a0 + 15 and len(sent) >= s0 + 3

        for cycle in range(20):
            await eventually(
                progressed(len(acked), len(sent)),
                30,
                f"progress before kill {cycle + 1}: {len(acked)} acked, {len(sent)} sent",
            )
            await node.akill()
            await node.astart()
        stop.set()
        await within(asyncio.gather(*tasks[2:]), 60)
        top = max(acked.values())
        await eventually(lambda: sub.offset >= top, 30, f"subscriber at {sub.offset} of {top}")
        await eventually(
            lambda: len(got) >= len(sent), 30, f"{len(got)} of {len(sent)} direct messages"
        )
        # anything extra (a duplicate) arrives before a marker sent last
        await channel_marker(pub, "cycles", received)
        await dm_marker(alice, "bob", got)
        for t in tasks[:2]:
            t.cancel()
        assert node.starts == 21
        assert gaps == []
        offsets = [m.offset for m in received]
        assert offsets == list(range(1, len(received) + 1)), "out of order or missing"
        by_off = {m.offset: m.data["i"] for m in received}
        assert all(by_off.get(off) == i for i, off in acked.items()), "an acked message lost"
        numbers = [m.data["i"] for m in received]
        assert len(numbers) == len(set(numbers)), "a duplicate at the application"
        assert sorted(d.data["i"] for d in got) == sorted(sent), "a dm lost or duplicated"
        assert [d.seq for d in got] == list(range(1, len(got) + 1))
    finally:
        stop.set()
        await pub.aclose()
        await subc.aclose()
        await alice.aclose()
        node.stop()
