"""Issue P10: the workers of one node are one node to clients.

Real worker processes on one port (``SO_REUSEPORT``), started directly (the supervisor
has its own tests): a publish on any worker reaches every subscriber on every worker, in
order, acked with the channel's offset; direct messages reach a user's connections on
any worker; presence and join/leave count every worker; a killed worker's clients
reconnect to the others and lose nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastim.client import Backoff, Client, connect

from ._workers import Workers

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from store._redis import RedisServer  # type: ignore[import-not-found]

    server = RedisServer(str(tmp_path_factory.mktemp("redis-workers")))
    server.start()
    yield server.url
    server.kill()


@pytest.fixture
async def workers(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    made: list[Workers] = []

    async def make(n: int = 2, **settings: Any) -> Workers:
        if settings.get("store") == "redis":  # a fresh prefix in the module's redis-server
            settings["redis_url"] = request.getfixturevalue("redis_url")
            settings["redis_prefix"] = "w" + uuid.uuid4().hex[:8]
        w = Workers(tmp_path, n, **settings)
        made.append(w)
        await w.start()
        return w

    yield make
    for w in made:
        w.stop()


async def client(url: str, **kw: Any) -> Client:
    kw.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.25))
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("request_timeout", 10.0)
    return await connect(url, **kw)


def worker_of(c: Client) -> str:
    """The worker a client landed on: the node id in its welcome ends with it."""
    return str(c.server_info["node"]).rsplit(".", 1)[-1]


async def spread(url: str, n: int, workers: int, **kw: Any) -> list[Client]:
    """``n`` clients, with at least one on each of the ``workers`` (the kernel picks the
    worker of a connection: open more until each has one; close the extras)."""
    out: list[Client] = []
    extra: list[Client] = []
    for _ in range(400):
        c = await client(url, **kw)
        have = {worker_of(x) for x in out}
        if worker_of(c) not in have or len(have) == workers:
            out.append(c)
        else:
            extra.append(c)
        if len(out) >= n and len({worker_of(x) for x in out}) == workers:
            break
    for c in extra:
        await c.aclose()
    assert len({worker_of(x) for x in out}) == workers, "connections never reached every worker"
    return out


@pytest.mark.parametrize("store", ["sqlite", "memory", "redis"])
async def test_publish_on_any_worker_reaches_every_subscriber_in_order(
    workers: Callable[..., Any], store: str
) -> None:
    w = await workers(2, store=store)
    subs = await spread(w.tcp_url, 8, 2)
    pubs = await spread(w.tcp_url, 4, 2)
    got: dict[int, list[int]] = {k: [] for k in range(len(subs))}
    streams = [await s.subscribe("room") for s in subs]

    async def read(k: int) -> None:
        async for m in streams[k]:
            got[k].append(m.offset)
            if len(got[k]) == 60:
                return

    readers = [asyncio.ensure_future(read(k)) for k in range(len(subs))]
    offs = [await pubs[i % len(pubs)].publish("room", {"i": i}) for i in range(30)]
    offs += await asyncio.gather(
        *(pubs[i % len(pubs)].publish("room", {"i": i}) for i in range(30, 60))
    )
    assert sorted(offs) == list(range(1, 61)), "acks carry the channel's offsets, each once"
    assert offs[:30] == list(range(1, 31)), (
        "sequential publishes from any worker are numbered in order"
    )
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    for k in got:
        assert got[k] == list(range(1, 61)), f"subscriber {k} on {worker_of(subs[k])}"
    for c in subs + pubs:
        await c.aclose()


async def test_history_and_recovery_on_another_worker(workers: Callable[..., Any]) -> None:
    w = await workers(2)
    pubs = await spread(w.tcp_url, 2, 2)
    first = await pubs[0].subscribe("hist")  # learns the channel's epoch
    for i in range(20):
        await pubs[i % 2].publish("hist", {"i": i})
    await asyncio.wait_for(first.get(), 5)
    epoch = first.epoch
    assert epoch
    # a subscriber on each worker recovers from offset 5, whichever owns the channel
    for c in pubs:
        late = await client(w.tcp_url)
        while worker_of(late) != worker_of(c):
            await late.aclose()
            late = await client(w.tcp_url)
        sub = await late.subscribe("hist", since=(5, epoch))
        offs = [(await asyncio.wait_for(sub.get(), 5)).offset for _ in range(15)]
        assert offs == list(range(6, 21)), worker_of(c)
        await late.aclose()
    for c in pubs:
        await c.aclose()


@pytest.mark.parametrize("store", ["sqlite", "memory", "redis"])
async def test_direct_messages_reach_a_user_on_every_worker(
    workers: Callable[..., Any], store: str
) -> None:
    # memory: each inbox lives on one worker (fastim/workers/inboxes.py)
    w = await workers(2, store=store)
    bobs = await spread(w.tcp_url, 2, 2, user="bob")
    alices = await spread(w.tcp_url, 2, 2, user="alice")
    seen: list[list[int]] = [[], []]

    async def read(k: int) -> None:
        async for dm in bobs[k].direct_messages():
            seen[k].append(dm.data["i"])
            if len(seen[k]) == 20:
                return

    readers = [asyncio.ensure_future(read(k)) for k in range(2)]
    await asyncio.sleep(0.2)
    sent = [await alices[i % 2].send("bob", {"i": i}) for i in range(20)]
    assert [s.seq for s in sent] == list(range(1, 21)), "one inbox, numbered in order"
    for _ in range(200):
        if set(seen[0]) | set(seen[1]) == set(range(20)):
            break
        await asyncio.sleep(0.05)
    # every message reaches bob; a connection may skip one the other acked first (the
    # SDK's "read on another device"), but none is lost, duplicated or reordered
    union = sorted(set(seen[0]) | set(seen[1]))
    assert union == list(range(20)), seen
    for s in seen:
        assert s == sorted(set(s)), s
    for r in readers:
        r.cancel()
    for c in bobs + alices:
        await c.aclose()


async def test_presence_and_join_leave_count_every_worker(workers: Callable[..., Any]) -> None:
    w = await workers(2, namespaces={"club": {"presence": True, "join_leave": True}})
    raw: list[dict[str, Any]] = []
    watchers = await spread(w.tcp_url, 2, 2, user="watcher", on_event=raw.append)
    for c in watchers:
        await c.subscribe("club:x")
    await asyncio.sleep(0.3)
    raw.clear()
    users: list[Client] = []
    for name in ("ann", "ben", "cat", "dan"):
        users += await spread(w.tcp_url, 2, 2, user=name)  # one on each worker
    for c in users:
        await c.subscribe("club:x")
    p = await watchers[0].presence("club:x")
    assert p["count"] == len(watchers) + len(users)
    assert sorted(p["users"]) == ["ann", "ben", "cat", "dan", "watcher"]
    await asyncio.sleep(1.0)
    events = sorted((e["op"], e["user"]) for e in raw if e.get("ch") == "club:x")
    # each user joined the node once, though each has a connection on both workers;
    # both watchers (one per worker) heard each join once
    assert events == sorted(2 * [("join", u) for u in ("ann", "ben", "cat", "dan")]), events
    raw.clear()
    ann = [c for c in users if c.user == "ann"]
    await ann[0].aclose()  # ann is still in the channel through her other worker
    await asyncio.sleep(0.5)
    assert [e for e in raw if e.get("op") == "leave"] == []
    await ann[1].aclose()
    for _ in range(100):
        if len([e for e in raw if e.get("op") == "leave"]) >= 2:
            break
        await asyncio.sleep(0.05)
    assert sorted((e["op"], e["user"]) for e in raw) == [("leave", "ann"), ("leave", "ann")]
    for c in users + watchers:
        await c.aclose()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a text exposition (AssertionError if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def get(url: str, key: str = "") -> str:
    reader, writer = await asyncio.open_connection(*url.split("//")[1].split("/")[0].split(":"))
    path = "/" + url.split("//")[1].split("/", 1)[1]
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


async def test_messages_go_only_to_workers_that_follow_the_channel(
    workers: Callable[..., Any],
) -> None:
    from fastim.cluster.placement import owner

    w = await workers(3, store="memory")
    names = ["w0", "w1", "w2"]
    chan = "solo"
    own = owner(chan, names)
    assert own is not None
    follower = next(n for n in names if n != own)
    idle = next(n for n in names if n not in (own, follower))
    sub = await client(w.tcp_url)
    while worker_of(sub) != follower:
        await sub.aclose()
        sub = await client(w.tcp_url)
    stream = await sub.subscribe(chan)
    pubs = await spread(w.tcp_url, 3, 3)
    for i in range(30):
        await pubs[i % 3].publish(chan, {"i": i})
    offs = [(await asyncio.wait_for(stream.get(), 5)).offset for _ in range(30)]
    assert offs == list(range(1, 31))
    text = await get(w.http + "/metrics")  # the whole node, whichever worker answers
    tree = "fastim_cluster_tree_deliveries_total"
    assert metric(text, tree, direction="out", worker=own) == 30  # to the follower only
    assert metric(text, tree, direction="in", worker=follower) == 30
    assert metric(text, tree, direction="in", worker=idle) == 0, "a worker without it got it"
    published = sum(metric(text, "fastim_messages_published_total", worker=n) for n in names)
    assert published == 60  # numbered on the owner, delivered on the follower
    for c in [sub, *pubs]:
        await c.aclose()


async def test_memory_store_a_dead_worker_costs_its_share(workers: Callable[..., Any]) -> None:
    """On the memory store a worker that dies takes the channels and inboxes it owned:
    the survivor starts new epochs, and the clients are told (Gap, DirectGap), as after
    a restart of a one-process node on the memory store; nothing is silently skipped."""
    from fastim.client import DirectGap, Gap
    from fastim.cluster.placement import owner

    w = await workers(2, store="memory")
    names = ["w0", "w1"]
    chan = next(f"m{i}" for i in range(100) if owner(f"m{i}", names) == "w0")
    user = next(f"u{i}" for i in range(100) if owner("\x00inbox:" + f"u{i}", names) == "w0")
    # the clients sit on w1, the survivor
    sub = await client(w.tcp_url, user=user)
    while worker_of(sub) != "w1":
        await sub.aclose()
        sub = await client(w.tcp_url, user=user)
    gaps: list[Any] = []
    stream = await sub.subscribe(chan, on_gap=gaps.append)
    got: list[tuple[int, Any]] = []
    dms: list[Any] = []

    async def read() -> None:
        async for m in stream:
            got.append((m.offset, m.data["i"]))

    async def read_dm() -> None:
        async for dm in sub.direct_messages(on_gap=dms.append):
            dms.append((dm.seq, dm.data["n"]))

    readers = [asyncio.ensure_future(read()), asyncio.ensure_future(read_dm())]
    for i in range(3):
        await sub.publish(chan, {"i": i})
        await sub.send(user, {"n": i})
    for _ in range(200):
        if len(got) == 3 and len(dms) == 3:
            break
        await asyncio.sleep(0.02)
    await w.kill(0)  # the owner of the channel and of the inbox
    for i in range(3, 5):  # refused while the survivor's view still has w0: retried
        for _ in range(100):
            try:
                await sub.publish(chan, {"i": i})
                break
            except Exception:
                await asyncio.sleep(0.1)
        await sub.send(user, {"n": i})
    for _ in range(200):
        if len(got) >= 5 and len(dms) >= 6:
            break
        await asyncio.sleep(0.02)
    for r in readers:
        r.cancel()
    assert got[:3] == [(1, 0), (2, 1), (3, 2)]
    assert got[3:] == [(1, 3), (2, 4)], got  # the new epoch, from its start
    assert len(gaps) == 1 and isinstance(gaps[0], Gap) and gaps[0].reason == "epoch", gaps
    assert dms[:3] == [(1, 0), (2, 1), (3, 2)]
    assert isinstance(dms[3], DirectGap) and dms[3].last_seq == 3, dms
    assert dms[4:] == [(1, 3), (2, 4)], dms
    await sub.aclose()


async def test_memory_history_is_the_owners_on_every_worker(workers: Callable[..., Any]) -> None:
    """/api/history of a memory channel answers the owner worker's history whichever
    worker takes the request (the others ask the owner)."""
    import orjson

    key = "workers-api-key-0123456789abcdef"
    w = await workers(2, store="memory", api_key=key)
    pub = await client(w.tcp_url)
    for i in range(5):
        await pub.publish("mem", {"i": i})
    seen = set()
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        body = orjson.loads(await get(w.http + "/api/history?channel=mem&since=1", key))
        assert [m["offset"] for m in body["messages"]] == [2, 3, 4, 5], body
        assert [m["data"]["i"] for m in body["messages"]] == [1, 2, 3, 4]
        assert body["top"] == 5
        seen.add(body["epoch"])
    assert len(seen) == 1
    await pub.aclose()
