"""Event webhooks end to end: real ``fastim serve`` processes, real clients (the SDK), a
real HTTP backend (tests/events/conftest.py), the default sqlite store and Redis.

What must hold (docs/events.md): every kind of event arrives with its fields; a backend
that fails, is down or is slow gets every event, per user in order, once it answers
2xx; a ``kill -9`` of the node in the middle of a stream loses no event, and the
connections the killed node held get a ``disconnect`` with reason ``node_lost``.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faults._node import NodeProc  # type: ignore[import-not-found]

from fastim.client import connect

from .conftest import Receiver, config_file, events_args

Events = list[dict[str, Any]]


def _of(events: Events, kind: str, **match: Any) -> Events:
    return [e for e in events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]


async def test_every_event_type_arrives_with_its_fields(
    receiver: Receiver, nodes: Callable[..., NodeProc], tmp_path: Path
) -> None:
    node = nodes(
        *events_args(receiver, "--config", config_file(tmp_path), "--events-secret", "s3cret-value")
    )
    await node.astart()
    alice = await connect(node.tcp_url, user="alice")
    bob = await connect(node.ws_url, user="bob")
    room = await alice.subscribe("room:1")
    await bob.subscribe("room:1")
    await alice.publish("feed:x", {"n": 1})
    await alice.publish("plain", {"n": 2})  # no events_publish: no event
    sent = await alice.send("bob", {"hi": 1})
    await room.unsubscribe()
    await alice.aclose()
    await receiver.wait(lambda ev: bool(_of(ev, "disconnect", user="alice")), 10)
    ev = receiver.unique()
    (c,) = _of(ev, "connect", user="alice")
    assert c["node"] == "fault-node" and isinstance(c["time"], int) and c["client"]
    client = c["client"]
    (s,) = _of(ev, "subscribe", user="alice")
    assert (s["channel"], s["client"]) == ("room:1", client)
    (j,) = _of(ev, "join", user="alice")
    assert j["channel"] == "room:1"
    (p,) = _of(ev, "publish")
    assert (p["channel"], p["offset"], p["data"]) == ("feed:x", 1, {"n": 1})
    assert p["epoch"]
    (d,) = _of(ev, "dm")
    assert (d["user"], d["sender"], d["seq"], d["mid"]) == ("bob", "alice", sent.seq, sent.mid)
    (u,) = _of(ev, "unsubscribe", user="alice")
    assert (u["channel"], u["client"]) == ("room:1", client)
    (leave,) = _of(ev, "leave", user="alice")
    assert leave["channel"] == "room:1"
    (x,) = _of(ev, "disconnect", user="alice")
    assert (x["client"], x["reason"]) == (client, "client_closed")
    # alice's events in the order they happened
    mine = [e["type"] for e in ev if e.get("user") == "alice" and e["type"] != "dm"]
    assert mine == ["connect", "subscribe", "join", "unsubscribe", "leave", "disconnect"]
    assert len({e["id"] for e in ev}) == len(ev)
    h = receiver.headers[-1]
    assert h["Authorization"] == "Bearer s3cret-value" and h["X-Test"] == "yes"
    # a graceful stop: bob's disconnect says why
    await node.astop()
    await node.astart()
    await receiver.wait(lambda ev: bool(_of(ev, "disconnect", user="bob")), 10)
    (bx,) = _of(receiver.unique(), "disconnect", user="bob")
    assert bx["reason"] == "shutdown" and bx["code"] == 1001
    assert "node_lost" not in [e.get("reason") for e in receiver.unique()]
    await bob.aclose()


async def _stream(url: str, users: int, channels: int) -> None:
    """Each user connects, subscribes to ``channels`` channels one after the other, and
    leaves: per user, connect, subscribe c0..cN, disconnect."""

    async def one(i: int) -> None:
        c = await connect(url, user=f"u{i}", reconnect=False)
        for k in range(channels):
            await c.subscribe(f"c{k}")
        await c.aclose()

    await asyncio.gather(*(one(i) for i in range(users)))


def _check_per_user_order(events: Events, users: int, channels: int) -> None:
    by: dict[str, list[str]] = defaultdict(list)
    for e in events:
        by[e["user"]].append(e["type"] if e["type"] != "subscribe" else e["channel"])
    want = ["connect", *[f"c{k}" for k in range(channels)], "disconnect"]
    assert set(by) == {f"u{i}" for i in range(users)}
    for user, got in by.items():
        assert got == want, f"{user}: {got}"


async def test_a_failing_down_and_slow_backend_gets_everything_in_order(
    receiver: Receiver, nodes: Callable[..., NodeProc]
) -> None:
    node = nodes(*events_args(receiver, "--events-batch", "7"))
    await node.astart()
    receiver.mode = "fail"
    users, channels = 12, 5
    await _stream(node.tcp_url, users, channels)
    total = users * (channels + 2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(receiver.attempts) < 3:  # retried with backoff, nothing acknowledged
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    assert receiver.batches == []
    await receiver.stop()  # down: connection refused
    await asyncio.sleep(1.0)
    await receiver.start()
    receiver.mode = "slow"
    receiver.delay = 1.5  # over events_timeout: the sender gives up and sends it again
    n = len(receiver.attempts)
    while len(receiver.attempts) < n + 2:
        assert loop.time() < deadline + 10
        await asyncio.sleep(0.05)
    receiver.mode = "ok"
    await receiver.wait(lambda ev: len(ev) == total, 20)
    _check_per_user_order(receiver.unique(), users, channels)
    assert len(receiver.events()) >= total  # the timed-out batches came twice: dedup by id


async def test_kill9_in_the_middle_loses_nothing_and_reports_the_lost_connections(
    receiver: Receiver, nodes: Callable[..., NodeProc], store_args: list[str]
) -> None:
    node = nodes(*events_args(receiver, "--events-batch", "5", *store_args))
    await node.astart()
    receiver.mode = "slow"
    receiver.delay = 0.25  # 5 events per 0.25 s: a stream of about 2 s
    users, channels = 6, 4
    await _stream(node.tcp_url, users, channels)  # 36 events, then some held open
    held = [await connect(node.tcp_url, user=f"h{i}", reconnect=False) for i in range(4)]
    for i, c in enumerate(held):
        await c.subscribe(f"hc{i}")
    total = users * (channels + 2) + 2 * len(held)
    # an event is in the store one loop tick and one group commit after its action (the
    # client's reply does not wait for it: docs/events.md, "The window"); then kill -9
    await asyncio.sleep(0.3)
    assert 0 < len(receiver.unique()) < total  # in the middle of the stream
    await node.akill()
    got_before = len(receiver.unique())
    receiver.mode = "ok"
    await node.astart()  # the same store, a new run of the node
    # the held connections: one disconnect each, reason node_lost, after lease expiry
    await receiver.wait(lambda ev: len(_of(ev, "disconnect", reason="node_lost")) == 4, 20)
    await asyncio.sleep(1.0)  # anything more (a second disconnect) would arrive now
    ev = receiver.unique()
    assert got_before < total
    _check_per_user_order([e for e in ev if e["user"].startswith("u")], users, channels)
    for i in range(len(held)):
        mine = [(e["type"], e.get("reason")) for e in ev if e["user"] == f"h{i}"]
        assert mine == [("connect", None), ("subscribe", None), ("disconnect", "node_lost")]
        (con,) = _of(ev, "connect", user=f"h{i}")
        (x,) = _of(ev, "disconnect", user=f"h{i}")
        assert x["client"] == con["client"] and x["node"] == "fault-node"
    assert len(ev) == total + len(held)
    for c in held:
        await c.aclose()


async def test_takeover_when_the_sending_worker_is_killed(
    receiver: Receiver, tmp_path: Path
) -> None:
    from workers._node import Supervised  # type: ignore[import-not-found]

    node = Supervised(tmp_path, 2, *events_args(receiver, "--events-batch", "3"))
    await node.start()
    try:
        receiver.mode = "fail"
        users, channels = 8, 3
        await _stream(node.tcp_url, users, channels)
        await asyncio.sleep(0.3)  # every event in the store (docs/events.md, "The window")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not receiver.attempts:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        sender = receiver.headers[-1]["X-Fastim-Sender"]  # "faults.w<i>~<run>"
        index = int(sender.split(".w")[1].split("~")[0])
        node.signal(index, signal.SIGKILL)
        receiver.mode = "ok"
        total = users * (channels + 2)
        await receiver.wait(
            lambda ev: len([e for e in ev if e["user"].startswith("u")]) == total, 20
        )
        _check_per_user_order(
            [e for e in receiver.unique() if e["user"].startswith("u")], users, channels
        )
        senders = {h["X-Fastim-Sender"] for h in receiver.headers[-3:]}
        assert sender not in senders  # another process took over
    finally:
        node.stop()


async def test_events_off_registers_nothing(nodes: Callable[..., NodeProc], tmp_path: Path) -> None:
    node = nodes()
    await node.astart()
    c = await connect(node.tcp_url, user="alice")
    await c.subscribe("x")
    await c.aclose()
    await node.astop()
    db = sqlite3.connect(tmp_path / "fastim.db")
    for table in ("outbox", "outbox_armed", "outbox_nodes", "outbox_lease"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    db.close()
