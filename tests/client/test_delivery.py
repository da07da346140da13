"""The SDK's delivery guarantees against a real node: recovery across reconnects (each
message once, in order; gaps surfaced), direct messages (each seq once, in order, acked;
sends retried with the same cid), presence; and, against scripted servers, what a real
node will not do on demand (a dropped send, a hole in the sequence, a new epoch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from fastim import _core, protocol
from fastim.client import (
    Backoff,
    Client,
    DirectMessage,
    Gap,
    Message,
    Sent,
    Since,
    connect,
)
from fastim.errors import ConnectionClosed, RequestError
from fastim.node import Node
from fastim.protocol import ErrorCode, FrameType

T = TypeVar("T")
NodeFactory = Callable[..., Awaitable[Node]]


async def within(aw: Awaitable[T], seconds: float = 10.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def eventually(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def url(node: Node, transport: str = "tcp") -> str:
    if transport == "tcp":
        return f"tcp://127.0.0.1:{node.tcp_port}"
    return f"ws://127.0.0.1:{node.ws_port}/ws"


async def fast(target: str | Node, transport: str = "tcp", **kwargs: Any) -> Client:
    """connect() with quick reconnects (each client its own Backoff: it is stateful)."""
    kwargs.setdefault("backoff", Backoff(base=0.02, factor=2.0, max=0.2))
    kwargs.setdefault("connect_timeout", 2.0)
    where = target if isinstance(target, str) else url(target, transport)
    return await connect(where, **kwargs)


def drop(client: Client) -> None:
    """Cut the client's connection under it, as a network failure would (no close)."""
    conn = client._conn
    assert conn is not None
    conn.abort()


@pytest.fixture(params=["memory", "sqlite"])
async def store_node(
    request: pytest.FixtureRequest, node_factory: NodeFactory, tmp_path: Path
) -> Callable[..., Awaitable[Node]]:
    """Nodes on the memory store (history in the hub) or sqlite (history in the store)."""
    kind = request.param

    async def make(**settings: Any) -> Node:
        if kind == "sqlite":
            settings.setdefault("store", "sqlite")
            settings.setdefault("store_path", str(tmp_path / "fastim.db"))
        return await node_factory(**settings)

    return make


async def take(sub: Any, n: int, seconds: float = 10.0) -> list[Any]:
    return [await within(sub.get(), seconds) for _ in range(n)]


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_every_message_once_in_order_across_dropped_connections(
    store_node: Callable[..., Awaitable[Node]], transport: str
) -> None:
    node = await store_node(history_size=1000)
    n = 300
    async with (
        await fast(node, transport) as pub,
        await fast(node, transport) as subc,
    ):
        gaps: list[Gap] = []
        sub = await within(subc.subscribe("feed", on_gap=gaps.append))
        assert sub.epoch and sub.offset == 0

        async def publish() -> list[int]:
            offs = []
            for i in range(n):
                offs.append(await within(pub.publish("feed", {"i": i})))
                if i % 5 == 0:
                    await asyncio.sleep(0.005)  # spread over the cuts
            return offs

        async def cut() -> None:
            for _ in range(5):
                await asyncio.sleep(0.04)
                await eventually(lambda: subc.connected)
                drop(subc)

        offs, _ = await within(asyncio.gather(publish(), cut()), 30)
        got = await take(sub, n)
        assert [m.offset for m in got] == offs == list(range(1, n + 1))
        assert [m.data["i"] for m in got] == list(range(n))
        await eventually(lambda: subc.reconnects == 5 and subc.connected)
        assert sub.gaps == 0 and gaps == []
        assert node.hub.recovered > 0  # messages were missed and recovered, not just live
        # and nothing came twice: a marker published last comes next (anything extra on
        # its way would come before it)
        mark = await within(pub.publish("feed", {"i": n}))
        assert mark == n + 1
        assert await within(sub.get()) == Message("feed", mark, {"i": n})
        assert sub.qsize() == 0


async def test_gap_is_surfaced_when_history_is_too_short(
    store_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await store_node(history_size=3)
    slow = Backoff(base=0.5, factor=1.0, max=0.5, jitter="none")  # away long enough
    async with await fast(node) as pub, await fast(node, backoff=slow) as subc:
        seen: list[Any] = []
        sub = await within(subc.subscribe("short", on_gap=seen.append))
        await within(pub.publish("short", 0))
        seen.append(await within(sub.get()))
        epoch = sub.epoch
        drop(subc)
        for i in range(1, 10):  # nine messages while away: the node keeps three
            await within(pub.publish("short", i))
        await eventually(lambda: subc.connected and sub.gaps == 1)
        await within(pub.publish("short", 10))
        seen.extend(await take(sub, 4))
        gap = Gap("short", epoch, 1, epoch, 10, "trimmed")
        assert sub.last_gap == gap
        # in stream order: message 1, the gap, what the node still had (8..10), live 11
        assert seen == [
            Message("short", 1, 0),
            gap,
            *[Message("short", off, off - 1) for off in (8, 9, 10, 11)],
        ]


async def test_new_epoch_after_a_restart_of_a_memory_node_is_a_gap(
    node_factory: NodeFactory,
) -> None:
    node1 = await node_factory()
    client = await fast(node1)
    try:
        gaps: list[Gap] = []
        sub = await within(client.subscribe("news", on_gap=gaps.append))
        await within(client.publish("news", "before"))
        assert (await within(sub.get())).data == "before"
        old = sub.epoch
        await within(node1.stop())
        node2 = await node_factory(tcp_port=node1.tcp_port, ws_port=node1.ws_port)
        await eventually(lambda: sub.gaps == 1)
        assert sub.epoch != old
        async with await fast(node2) as other:
            assert await within(other.publish("news", "after")) == 1
        assert await within(sub.get()) == Message("news", 1, "after")
        assert gaps == [Gap("news", old, 1, sub.epoch, 0, "epoch")]
    finally:
        await client.aclose()


async def test_subscribe_since_resumes_in_another_client(
    store_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await store_node()
    async with await fast(node) as pub:
        async with await fast(node) as first:
            sub = await within(first.subscribe("resume"))
            for i in range(3):
                await within(pub.publish("resume", i))
            await take(sub, 3)
            saved = sub.since
        assert saved == Since(3, sub.epoch)
        for i in range(3, 6):
            await within(pub.publish("resume", i))
        async with await fast(node) as second:
            again = await within(second.subscribe("resume", since=saved))
            await within(pub.publish("resume", 6))
            got = await take(again, 4)
            assert [(m.offset, m.data) for m in got] == [(4, 3), (5, 4), (6, 5), (7, 6)]
            assert again.gaps == 0
            # a since from another history is a gap, then live messages only
            other = await within(second.subscribe("resume2", since=(5, "nope")))
            assert other.gaps == 1 and other.last_gap is not None
            assert other.last_gap.reason == "epoch"


# --------------------------------------------------------------------------- direct messages


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_direct_message_round_trip(
    store_node: Callable[..., Awaitable[Node]], transport: str
) -> None:
    node = await store_node()
    async with (
        await fast(node, transport, user="alice") as alice,
        await fast(node, transport, user="bob") as bob,
    ):
        assert bob.server_info.get("user") == "bob"
        sent = await within(alice.send("bob", {"text": "hi"}))
        assert isinstance(sent, Sent) and sent.seq == 1 and not sent.dup
        dms = bob.direct_messages()
        msg = await within(dms.get())
        assert msg == DirectMessage(1, sent.mid, "alice", {"text": "hi"}, sent.epoch)
        assert sent.epoch and len(sent.epoch) == 12
        # taken, so acked (in the background)
        await eventually(lambda: bob.inbox.acked == 1)
        assert tuple(await within(bob.inbox_state()))[:2] == (1, 1)
        # and back
        reply = await within(bob.send("alice", {"text": "hello"}))
        got = await within(alice.direct_messages().get())
        assert (got.seq, got.mid, got.sender, got.data) == (1, reply.mid, "bob", {"text": "hello"})


async def test_direct_messages_to_an_offline_user_arrive_on_connect(
    store_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await store_node()
    async with await fast(node, user="alice") as alice:
        for i in range(3):
            assert (await within(alice.send("carol", {"i": i}))).seq == i + 1
        async with await fast(node, user="carol") as carol:
            dms = carol.direct_messages()
            got = [await within(dms.get()) for _ in range(3)]
            assert [(m.seq, m.data["i"]) for m in got] == [(1, 0), (2, 1), (3, 2)]
            await within(alice.send("carol", {"i": 3}))
            live = await within(dms.get())
            assert (live.seq, live.data) == (4, {"i": 3})
            await eventually(lambda: carol.inbox.acked == 4)
        # everything was acked: a new connection of carol's gets nothing again
        async with await fast(node, user="carol") as carol2:
            await within(alice.send("carol", {"i": 4}))
            nxt = await within(carol2.direct_messages().get())
            assert (nxt.seq, nxt.data) == (5, {"i": 4})
            assert carol2.inbox.duplicates == 0


async def test_idempotent_send_same_cid_same_message(
    store_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await store_node()
    async with await fast(node, user="alice") as alice, await fast(node, user="bob") as bob:
        first = await within(alice.send("bob", {"n": 1}, cid="order-42"))
        again = await within(alice.send("bob", {"n": 1}, cid="order-42"))
        assert (again.mid, again.seq, again.dup) == (first.mid, first.seq, True)
        assert not first.dup
        other = await within(alice.send("bob", {"n": 2}))  # a fresh cid: a new message
        assert other.seq == first.seq + 1 and other.mid != first.mid
        dms = bob.direct_messages()
        got = [await within(dms.get()) for _ in range(2)]
        assert [m.data for m in got] == [{"n": 1}, {"n": 2}]
        # nothing else: a marker sent last comes next (a copy on its way would come first)
        mark = await within(alice.send("bob", {"n": 3}))
        assert mark.seq == other.seq + 1
        nxt = await within(dms.get())
        assert (nxt.seq, nxt.mid, nxt.data) == (mark.seq, mark.mid, {"n": 3})
        assert dms.qsize() == 0


async def test_ack_stops_the_nodes_retries(store_node: Callable[..., Awaitable[Node]]) -> None:
    node = await store_node(dm_retry=0.1)
    async with await fast(node, user="alice") as alice, await fast(node, user="dave") as dave:
        manual = dave.direct_messages(auto_ack=False)
        await within(alice.send("dave", "one"))
        msg = await within(manual.get())
        # not acked: the node sends it again (0.1 s, 0.2 s, ...); the SDK drops the copies
        await eventually(lambda: dave.inbox.duplicates >= 2, 5)
        assert manual.qsize() == 0
        dave.ack(msg.seq)
        await eventually(lambda: dave.inbox.acked == msg.seq)
        pm = node.postman
        assert pm is not None
        retried = pm.retried
        dups = dave.inbox.duplicates
        # the retry that was scheduled comes due and is dropped, not sent: then none is
        # left (a message sent again is scheduled again)
        await eventually(lambda: all(user != "dave" for _, _, user, _ in pm._due), 5)
        assert pm.retried == retried
        # and no copy is on its way: a marker sent last comes next
        mark = await within(alice.send("dave", "two"))
        nxt = await within(manual.get())
        assert (nxt.seq, nxt.mid) == (mark.seq, mark.mid) == (msg.seq + 1, mark.mid)
        assert dave.inbox.duplicates == dups and pm.retried == retried


async def test_replay_after_reconnect_is_deduplicated(
    store_node: Callable[..., Awaitable[Node]],
) -> None:
    node = await store_node()
    async with await fast(node, user="alice") as alice, await fast(node, user="erin") as erin:
        dms = erin.direct_messages(auto_ack=False)  # nothing acked: all replayed
        for i in range(3):
            await within(alice.send("erin", i))
        assert [(await within(dms.get())).data for _ in range(3)] == [0, 1, 2]
        drop(erin)
        await eventually(lambda: erin.inbox.duplicates >= 3)  # the replay on connect
        await within(alice.send("erin", 3))
        assert (await within(dms.get())).data == 3
        assert dms.qsize() == 0
        erin.ack(4)
        await eventually(lambda: erin.inbox.acked == 4)
        assert tuple(await within(erin.inbox_state()))[:2] == (4, 4)


async def test_direct_message_errors_carry_the_servers_code(node_factory: NodeFactory) -> None:
    node = await node_factory(inbox_max=2)
    async with await fast(node) as anon, await fast(node, user="alice") as alice:
        with pytest.raises(RequestError) as err:
            await within(anon.send("bob", 1))
        assert err.value.code == ErrorCode.NO_USER
        with pytest.raises(RequestError) as err:
            await within(anon.inbox_state())
        assert err.value.code == ErrorCode.NO_USER
        await within(alice.send("bob", 1))
        await within(alice.send("bob", 2))
        with pytest.raises(RequestError) as err:
            await within(alice.send("bob", 3))
        assert err.value.code == ErrorCode.INBOX_FULL
        with pytest.raises(ValueError):
            await alice.send("", 1)
        with pytest.raises(ValueError):
            await alice.send("bob", 1, cid="x" * 129)
        with pytest.raises(ValueError):
            anon.direct_messages()
        assert alice.connected and anon.connected  # none of these is fatal


# --------------------------------------------------------------------------- presence


async def test_presence(node_factory: NodeFactory) -> None:
    node = await node_factory(namespaces={"room": {"join_leave": True}})
    events: list[dict[str, Any]] = []
    async with (
        await fast(node, user="ann", on_event=events.append) as ann,
        await fast(node, "ws", user="ben") as ben,
        await fast(node) as anon,
    ):
        for c in (ann, ben, anon):
            await within(c.subscribe("room:1"))
        p = await within(anon.presence("room:1"))
        assert p["ch"] == "room:1" and p["count"] == 3 and sorted(p["users"]) == ["ann", "ben"]
        await eventually(lambda: {"op": "join", "ch": "room:1", "user": "ben"} in events)
        assert (await within(anon.presence("empty")))["count"] == 0
        await ben.aclose()
        await eventually(lambda: {"op": "leave", "ch": "room:1", "user": "ben"} in events)
        assert (await within(ann.presence("room:1")))["count"] == 2


# --------------------------------------------------------------------------- scripted servers

CLIENT_MASK = protocol.type_mask(protocol.CLIENT_FRAME_TYPES)


class Peer:
    """The server side of one connection to a scripted server (fastim over TCP)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = _core.FrameDecoder(allowed_types=CLIENT_MASK)
        self.frames: deque[tuple[int, bytes]] = deque()

    async def recv(self) -> tuple[int, bytes]:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def expect(self, ftype: int) -> bytes:
        while True:
            t, payload = await self.recv()
            if t == ftype:
                return payload

    async def cmd(self, op: str) -> dict[str, Any]:
        """The next JSON command with this op (others are skipped)."""
        while True:
            obj: dict[str, Any] = orjson.loads(await self.expect(FrameType.CMD))
            if obj.get("op") == op:
                return obj

    def send(self, ftype: int, payload: bytes) -> None:
        self.writer.write(_core.encode_frame(ftype, payload))

    def event(self, obj: dict[str, Any]) -> None:
        self.send(FrameType.EVENT, orjson.dumps(obj))

    async def handshake(self) -> dict[str, Any]:
        hello = await self.expect(FrameType.HELLO)
        info = {"node": "fake", "ping_interval": 25.0, "pong_timeout": 10.0}
        self.send(FrameType.WELCOME, b"\x01" + orjson.dumps(info))
        options: dict[str, Any] = orjson.loads(hello[2:])
        return options


Script = Callable[[Peer, int], Awaitable[None]]


class Scripted:
    """A loopback server that runs ``script(peer, n)`` for its n-th connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self.peers: list[Peer] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = Peer(reader, writer)
        self.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(peer, self.connections)
        except (EOFError, ConnectionError):
            pass
        except AssertionError as e:
            self.errors.append(e)
        finally:
            writer.close()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        if self.tasks:
            _done, stuck = await asyncio.wait(self.tasks, timeout=2.0)
            for t in stuck:
                t.cancel()
        assert not self.errors, self.errors


async def hold(peer: Peer) -> None:
    while True:
        await peer.recv()


async def test_user_goes_in_hello_options() -> None:
    seen: list[dict[str, Any]] = []

    async def script(peer: Peer, n: int) -> None:
        seen.append(await peer.handshake())
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url, user="zoé") as _client:
        await eventually(lambda: bool(seen))
    assert seen == [{"client": "fastim-py/0.1", "user": "zoé"}]


async def test_send_is_retried_with_the_same_cid_after_a_drop_and_a_store_error() -> None:
    attempts: list[dict[str, Any]] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        cmd = await peer.cmd("send")
        attempts.append(cmd)
        if n == 1:
            return  # connection lost before the reply: unknown outcome
        peer.event(
            {"op": "error", "code": ErrorCode.STORE_UNAVAILABLE, "reason": "down", "id": cmd["id"]}
        )
        cmd = await peer.cmd("send")
        attempts.append(cmd)
        sent = {"op": "sent", "to": "bob", "mid": "m1", "seq": 7, "dup": True, "id": cmd["id"]}
        peer.event(sent)
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url, user="alice") as client:
        sent = await within(client.send("bob", {"x": 1}))
        assert sent == Sent("m1", 7, True)
        assert len(attempts) == 3 and len({a["cid"] for a in attempts}) == 1
        assert len(attempts[0]["cid"]) == 32  # a uuid4 in hex
        assert all(a["to"] == "bob" and a["data"] == {"x": 1} for a in attempts)
        assert len({a["id"] for a in attempts}) == 3 and client.reconnects == 1


async def test_send_gives_up_at_its_deadline() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        while True:
            cmd = await peer.cmd("send")
            peer.event({"op": "error", "code": 114, "reason": "still down", "id": cmd["id"]})

    async with Scripted(script) as srv, await fast(srv.url, user="alice") as client:
        with pytest.raises(asyncio.TimeoutError) as err:
            await within(client.send("bob", 1, cid="c", timeout=0.5))
        cause = err.value.__cause__
        assert isinstance(cause, RequestError) and cause.code == ErrorCode.STORE_UNAVAILABLE


async def test_direct_messages_are_held_back_until_the_hole_is_filled() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()

        def dm(seq: int) -> None:
            peer.event({"op": "dm", "from": "x", "mid": f"m{seq}", "seq": seq, "data": seq})

        dm(5)  # the first one: where does the inbox start? (acked 4)
        cmd = await peer.cmd("inbox")
        peer.event({"op": "inbox", "acked": 4, "top": 5, "id": cmd["id"]})
        dm(7)  # 6 is missing, and not acknowledged: wait for it
        cmd = await peer.cmd("inbox")
        peer.event({"op": "inbox", "acked": 4, "top": 7, "id": cmd["id"]})
        # the client took that answer and asks again (a while later): still waiting for 6
        cmd = await peer.cmd("inbox")
        dm(6)
        dm(5)
        dm(7)  # copies
        dm(9)  # 8 was acknowledged by another connection of the user: skipped
        peer.event({"op": "inbox", "acked": 8, "top": 9, "id": cmd["id"]})
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url, user="u") as client:
        dms = client.direct_messages(auto_ack=False)
        got = [(await within(dms.get())).seq for _ in range(4)]
        assert got == [5, 6, 7, 9]
        assert client.inbox.duplicates == 2 and client.inbox.skipped == 0
        assert client.inbox.delivered == 9


async def test_acks_are_cumulative_and_one_at_a_time() -> None:
    acks: list[int] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        peer.event({"op": "dm", "from": "x", "mid": "a", "seq": 1, "data": 1})
        cmd = await peer.cmd("inbox")
        peer.event({"op": "inbox", "acked": 0, "top": 1, "id": cmd["id"]})
        for seq in range(2, 6):
            peer.event({"op": "dm", "from": "x", "mid": "a", "seq": seq, "data": seq})
        first = await peer.cmd("ack")
        acks.append(first["seq"])
        # while this ack is in flight, no other goes out: nothing comes before the
        # marker the client sends once it has taken all five
        marker = orjson.loads(await peer.expect(FrameType.CMD))
        assert marker["op"] == "inbox", marker
        peer.event({"op": "inbox", "acked": 0, "top": 5, "id": marker["id"]})
        peer.event({"op": "acked", "seq": first["seq"], "id": first["id"]})
        second = await peer.cmd("ack")
        acks.append(second["seq"])
        peer.event({"op": "acked", "seq": second["seq"], "id": second["id"]})
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url, user="u") as client:
        dms = client.direct_messages()
        assert [(await within(dms.get())).seq for _ in range(5)] == [1, 2, 3, 4, 5]
        # the marker: a request on the same connection, written after any ack taking
        # them started (those tasks are ready: one turn of the loop and they have written)
        await asyncio.sleep(0)
        await within(client.inbox_state())
        await eventually(lambda: client.inbox.acked == 5)
        assert acks[-1] == 5 and len(acks) == 2  # 1 (or more), then the highest taken


async def test_resubscribe_event_recovers_the_new_epoch() -> None:
    subs: list[dict[str, Any]] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        sub = await peer.expect(FrameType.SUB)
        _op, req_id, ch, _ = protocol.unpack_request(FrameType.SUB, sub)
        assert isinstance(req_id, int)
        peer.send(
            FrameType.SUBSCRIBED, protocol.pack_subscribed(req_id, 0, ch.encode(), "e1", False)
        )
        for off in (1, 2):
            peer.send(FrameType.MSG, protocol.pack_msg(off, ch.encode(), b'"old"'))
        peer.event({"op": "resubscribe", "ch": ch, "epoch": "e2"})
        cmd = await peer.cmd("sub")
        subs.append(cmd)
        peer.event(
            {"op": "subscribed", "ch": ch, "off": 2, "epoch": "e2", "recovered": True,
             "id": cmd["id"]}
        )  # fmt: skip
        for off in (1, 2, 3):
            peer.send(FrameType.MSG, protocol.pack_msg(off, ch.encode(), b'"new"'))
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url) as client:
        sub = await within(client.subscribe("c"))
        got = await take(sub, 5)
        assert [(m.offset, m.data) for m in got] == [
            (1, "old"), (2, "old"), (1, "new"), (2, "new"), (3, "new"),
        ]  # fmt: skip
        assert subs[0]["since"] == {"off": 0, "epoch": "e2"}
        assert sub.gaps == 0 and sub.epoch == "e2"


async def test_an_incomplete_epoch_change_is_a_gap() -> None:
    """``resubscribe`` with ``complete: false`` (the old epoch was numbered by another
    node or worker, now gone): messages after the client's offset may be lost, so the
    application meets a Gap (reason epoch) before the new epoch's messages."""
    gaps: list[Gap] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        sub = await peer.expect(FrameType.SUB)
        _op, req_id, ch, _ = protocol.unpack_request(FrameType.SUB, sub)
        assert isinstance(req_id, int)
        peer.send(
            FrameType.SUBSCRIBED, protocol.pack_subscribed(req_id, 0, ch.encode(), "e1", False)
        )
        for off in (1, 2):
            peer.send(FrameType.MSG, protocol.pack_msg(off, ch.encode(), b'"old"'))
        peer.event({"op": "resubscribe", "ch": ch, "epoch": "e2", "complete": False})
        cmd = await peer.cmd("sub")
        peer.event(
            {"op": "subscribed", "ch": ch, "off": 1, "epoch": "e2", "recovered": True,
             "id": cmd["id"]}
        )  # fmt: skip
        peer.send(FrameType.MSG, protocol.pack_msg(1, ch.encode(), b'"new"'))
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url) as client:
        sub = await within(client.subscribe("c", on_gap=gaps.append))
        got = await take(sub, 3)
        assert [(m.offset, m.data) for m in got] == [(1, "old"), (2, "old"), (1, "new")]
        assert gaps == [Gap("c", "e1", 2, "e2", 0, "epoch")]
        assert sub.gaps == 1 and sub.epoch == "e2"


async def test_a_resubscribe_the_store_refused_is_tried_again() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        if n == 1:
            sub = await peer.expect(FrameType.SUB)
            _op, req_id, ch, _ = protocol.unpack_request(FrameType.SUB, sub)
            assert isinstance(req_id, int)
            peer.send(
                FrameType.SUBSCRIBED,
                protocol.pack_subscribed(req_id, 4, ch.encode(), "e1", False),
            )
            peer.send(FrameType.MSG, protocol.pack_msg(5, ch.encode(), b"5"))
            await asyncio.sleep(0.05)
            return
        cmd = await peer.cmd("sub")
        assert cmd["since"] == {"off": 5, "epoch": "e1"}
        peer.event({"op": "error", "code": 114, "reason": "store down", "id": cmd["id"]})
        cmd = await peer.cmd("sub")
        assert cmd["since"] == {"off": 5, "epoch": "e1"}
        peer.event(
            {"op": "subscribed", "ch": "r", "off": 6, "epoch": "e1", "recovered": True,
             "id": cmd["id"]}
        )  # fmt: skip
        peer.send(FrameType.MSG, protocol.pack_msg(6, b"r", b"6"))
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url) as client:
        sub = await within(client.subscribe("r"))
        assert [m.data for m in await take(sub, 2)] == [5, 6]
        assert sub.active and sub.gaps == 0


async def test_closing_ends_the_direct_message_iterator() -> None:
    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        await hold(peer)

    async with Scripted(script) as srv:
        client = await fast(srv.url, user="u")
        dms = client.direct_messages()

        async def drain() -> list[Any]:
            return [m async for m in dms]

        reader = asyncio.ensure_future(drain())
        await asyncio.sleep(0.05)
        await client.aclose()
        assert await within(reader) == []
        with pytest.raises(ConnectionClosed):
            await client.send("x", 1)


async def test_an_epoch_left_before_is_resumed_where_it_was_left() -> None:
    # an epoch is never reused; a store that answered with a wrong epoch for a while (see
    # the redis fault test) flips a channel to another epoch and back: the client must
    # not take the old epoch's offsets for new ones
    subs: list[dict[str, Any]] = []

    async def script(peer: Peer, n: int) -> None:
        await peer.handshake()
        _op, req_id, ch, _ = protocol.unpack_request(
            FrameType.SUB, await peer.expect(FrameType.SUB)
        )
        assert isinstance(req_id, int)
        peer.send(
            FrameType.SUBSCRIBED, protocol.pack_subscribed(req_id, 0, ch.encode(), "e1", False)
        )
        for off in (1, 2, 3):
            peer.send(FrameType.MSG, protocol.pack_msg(off, ch.encode(), b'"e1"'))
        for epoch, top in (("bad", 0), ("e1", 3)):
            peer.event({"op": "resubscribe", "ch": ch, "epoch": epoch})
            cmd = await peer.cmd("sub")
            subs.append(cmd["since"])
            peer.event(
                {"op": "subscribed", "ch": ch, "off": top, "epoch": epoch, "recovered": True,
                 "id": cmd["id"]}
            )  # fmt: skip
        for off in (1, 2, 3, 4):  # a replay from the start of e1 would bring 1..3 again
            peer.send(FrameType.MSG, protocol.pack_msg(off, ch.encode(), b'"e1"'))
        peer.send(FrameType.MSG, protocol.pack_msg(5, ch.encode(), b'"marker"'))  # last
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url) as client:
        sub = await within(client.subscribe("f"))
        got = await take(sub, 5)
        # 1..4, and nothing before the marker the server sent last
        assert [m.offset for m in got] == [1, 2, 3, 4, 5] and got[4].data == "marker"
        assert subs == [{"off": 0, "epoch": "bad"}, {"off": 3, "epoch": "e1"}]
        assert sub.qsize() == 0


async def test_an_inbox_the_node_could_not_read_makes_the_client_connect_again() -> None:
    # a node whose store failed while replaying the inbox to a new connection says so
    # (an error without a request id) and will not replay on that connection
    async def script(peer: Peer, n: int) -> None:
        opts = await peer.handshake()
        assert opts["user"] == "u"
        if n == 1:
            peer.event({"op": "error", "code": 114, "reason": "inbox unavailable: down"})
        else:
            peer.event({"op": "dm", "from": "x", "mid": "m", "seq": 1, "data": "replayed"})
            cmd = await peer.cmd("inbox")
            peer.event({"op": "inbox", "acked": 0, "top": 1, "id": cmd["id"]})
        await hold(peer)

    async with Scripted(script) as srv, await fast(srv.url, user="u") as client:
        dm = await within(client.direct_messages().get(), 5)
        assert dm.data == "replayed" and srv.connections == 2 and client.reconnects == 1
