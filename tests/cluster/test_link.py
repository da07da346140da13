"""Node links: batched frames in order, one frame per tick, handshake checks, heartbeats
that find a dead peer, reconnect after a restart, TLS; in-process and as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastim import _core
from fastim.cluster import frames as F
from fastim.cluster.frames import Deliver, Forward, ForwardAck, LinkFrame
from fastim.cluster.link import (
    LinkHandler,
    Links,
    LinkServer,
    client_context,
    link_peers,
    server_context,
    split_address,
)
from fastim.cluster.membership import NodeInfo

from ._etcd import free_port

ROOT = Path(__file__).resolve().parents[2]

FAST: dict[str, Any] = {"heartbeat": 0.2, "timeout": 1.0, "backoff": (0.02, 0.2)}


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


class Recorder(LinkHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.batches: list[tuple[str, int]] = []
        self.peers: list[tuple[str, bool]] = []

    def on_deliver(self, peer: str, items: list[Deliver]) -> None:
        self.batches.append(("deliver", len(items)))
        self.events.extend(("deliver", peer, d) for d in items)

    def on_forward(self, peer: str, items: list[Forward]) -> None:
        self.batches.append(("forward", len(items)))
        self.events.extend(("forward", peer, f) for f in items)

    def on_forward_ack(self, peer: str, items: list[ForwardAck]) -> None:
        self.batches.append(("ack", len(items)))
        self.events.extend(("ack", peer, a) for a in items)

    def on_control(self, peer: str, message: dict[str, Any]) -> None:
        self.batches.append(("control", 1))
        self.events.append(("control", peer, message))

    def on_peer(self, peer: str, connected: bool) -> None:
        self.peers.append((peer, connected))

    def delivered(self) -> list[Deliver]:
        return [e[2] for e in self.events if e[0] == "deliver"]


Endpoint = tuple[LinkServer, Links, Recorder]


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., Awaitable[Endpoint]]]:
    """``endpoint(node_id, **links_kw)``: a LinkServer + Links pair (cluster "c")."""
    made: list[Endpoint] = []

    async def make(node_id: str, port: int = 0, cluster: str = "c", **kw: Any) -> Endpoint:
        rec = Recorder()
        server = LinkServer(
            node_id, cluster, rec, port=port, timeout=kw.pop("server_timeout", 1.0),
            ssl=kw.pop("server_ssl", None),
        )  # fmt: skip
        await server.start()
        links = Links(node_id, cluster, **{**FAST, **kw})
        made.append((server, links, rec))
        return server, links, rec

    yield make
    for server, links, _ in made:
        await links.close()
        await server.close()


# --------------------------------------------------------------------------- codecs


names = st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 255)
data = st.binary(max_size=300)


@given(st.lists(st.tuples(names, names, st.integers(0, 2**64 - 1), data), max_size=20))
def test_deliver_batches_round_trip(items: list[tuple[str, str, int, bytes]]) -> None:
    payload = F.pack_batch(len(items), b"".join(F.pack_deliver(*i) for i in items))
    assert F.unpack_deliver(payload) == [Deliver(*i) for i in items]
    if payload[4:]:
        with pytest.raises(F.LinkDecodeError):
            F.unpack_deliver(payload[:-1])


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), names, data), max_size=20))
def test_forward_batches_round_trip(items: list[tuple[int, str, bytes]]) -> None:
    payload = F.pack_batch(len(items), b"".join(F.pack_forward(*i) for i in items))
    assert F.unpack_forward(payload) == [Forward(*i) for i in items]
    with pytest.raises(F.LinkDecodeError):
        F.unpack_forward(payload + b"x")


@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), names,
                  st.integers(0, 65535), st.text(max_size=50)),
        max_size=20,
    )
)  # fmt: skip
def test_forward_ack_batches_round_trip(items: list[tuple[int, int, str, int, str]]) -> None:
    payload = F.pack_batch(len(items), b"".join(F.pack_forward_ack(*i) for i in items))
    assert F.unpack_forward_ack(payload) == [ForwardAck(*i) for i in items]


def test_codec_edges() -> None:
    with pytest.raises(ValueError, match="channel over 255 bytes"):
        F.pack_deliver("x" * 256, "e", 1, b"{}")
    assert F.unpack_goaway(F.pack_goaway(2, "wrong cluster")) == (2, "wrong cluster")
    with pytest.raises(F.LinkDecodeError):
        F.unpack_goaway(b"\x00")
    with pytest.raises(F.LinkDecodeError):
        F.unpack_deliver(b"\x00\x00\x00\x01\x01\xff\x00")  # bad UTF-8 in the channel
    assert split_address("[::1]:7") == ("::1", 7)
    for bad in ("h", "h:x", ":1", "h:0"):
        with pytest.raises(ValueError):
            split_address(bad)
    table = {
        "a": NodeInfo("a", {"link": "h:1"}),
        "b": NodeInfo("b", {"link": "h:2"}),
        "c": NodeInfo("c", {"tcp": "tcp://h:3"}),
    }
    assert link_peers(table, "a") == {"b": "h:2"}
    # link frame types do not overlap the client protocol's
    from fastim.protocol import FrameType

    assert not {int(t) for t in LinkFrame} & {int(t) for t in FrameType}


# --------------------------------------------------------------------------- in process


async def test_one_frame_per_tick_in_order(endpoints: Callable[..., Awaitable[Endpoint]]) -> None:
    sb, _, rb = await endpoints("b")
    _, la, _ = await endpoints("a")
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None and await link.wait_up(5)
    assert rb.peers == [("a", True)]
    off = 0
    for _tick in range(3):
        for _ in range(1000):
            off += 1
            assert la.deliver("b", "room:1", "ep", off, b'{"n":%d}' % off)
        await asyncio.sleep(0)  # end of the tick: one frame, one write
    await until(lambda: len(rb.delivered()) == 3000, 5, "3000 deliveries")
    assert [d.offset for d in rb.delivered()] == list(range(1, 3001))
    assert rb.delivered()[0] == Deliver("room:1", "ep", 1, b'{"n":1}')
    assert rb.batches == [("deliver", 1000)] * 3
    assert sb.frames_in[LinkFrame.DELIVER] == 3
    assert link.frames_out == 3 and link.items_out == 3000 and link.dropped == 0


async def test_mixed_kinds_keep_call_order(endpoints: Callable[..., Awaitable[Endpoint]]) -> None:
    sb, _, rb = await endpoints("b")
    _, la, _ = await endpoints("a")
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None and await link.wait_up(5)
    link.deliver("c", "e", 1, b"1")
    link.deliver("c", "e", 2, b"2")
    link.forward(7, "c", b'"pub"')
    link.control({"op": "interest", "ch": ["c"]})
    link.forward_ack(7, 3, "e")
    link.forward_ack(8, 0, "", 114, "store down")
    link.deliver("c", "e", 3, b"3")
    await until(lambda: len(rb.events) == 7, 5, "7 items")
    assert [e[0] for e in rb.events] == [
        "deliver", "deliver", "forward", "control", "ack", "ack", "deliver"
    ]  # fmt: skip
    assert rb.batches == [("deliver", 2), ("forward", 1), ("control", 1), ("ack", 2),
                          ("deliver", 1)]  # fmt: skip
    assert rb.events[5][2] == ForwardAck(8, 0, "", 114, "store down")
    assert rb.events[3][2] == {"op": "interest", "ch": ["c"]}


async def test_big_bursts_are_split_into_bounded_frames(
    endpoints: Callable[..., Awaitable[Endpoint]],
) -> None:
    sb, _, rb = await endpoints("b")
    _, la, _ = await endpoints("a")
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None and await link.wait_up(5)
    blob = b'"' + b"x" * 10_000 + b'"'
    for i in range(1, 201):  # ~2 MB in one tick
        link.deliver("big", "e", i, blob)
    await until(lambda: len(rb.delivered()) == 200, 10, "200 deliveries")
    assert [d.offset for d in rb.delivered()] == list(range(1, 201))
    assert 2_000_000 // F.BATCH_BYTES <= link.frames_out <= 2_000_000 // F.BATCH_BYTES + 2


async def test_three_nodes_full_mesh(endpoints: Callable[..., Awaitable[Endpoint]]) -> None:
    nodes = {n: await endpoints(n) for n in ("a", "b", "c")}
    table = {n: NodeInfo(n, {"link": s.address}) for n, (s, _, _) in nodes.items()}
    for n, (_, links, _) in nodes.items():
        links.sync(link_peers(table, n))
    for n, (_, links, _) in nodes.items():
        for lk in links.links.values():
            assert await lk.wait_up(5), (n, lk)
        assert set(links.links) == set(nodes) - {n}
    for n, (_, links, _) in nodes.items():
        for i in range(1, 51):
            for peer_id in links.links:
                links.deliver(peer_id, f"from-{n}", "e", i, b"0")
    for n, (_, _, rec) in nodes.items():
        await until(lambda rec=rec: len(rec.delivered()) == 100, 5, f"{n} gets 100")  # type: ignore[misc]
        by_sender: dict[str, list[int]] = {}
        for kind, sender, d in rec.events:
            assert kind == "deliver" and d.channel == f"from-{sender}"
            by_sender.setdefault(sender, []).append(d.offset)
        assert by_sender == {p: list(range(1, 51)) for p in nodes if p != n}
    # a node leaves the table: its links close, the others keep theirs
    _, la, _ = nodes["a"]
    la.sync(link_peers({k: v for k, v in table.items() if k != "c"}, "a"))
    assert set(la.links) == {"b"} and not la.deliver("c", "x", "e", 1, b"0")


async def test_a_stall_of_this_process_does_not_drop_its_links(
    endpoints: Callable[..., Awaitable[Endpoint]],
) -> None:
    """The process itself did not run for longer than the link timeout (a burst of work:
    tens of thousands of connections closing at once): what the peers sent meanwhile is
    unread, so the silence is its own. Its links stay up (both ends here are that
    process), judged again once the loop has read its sockets."""
    nodes = {n: await endpoints(n) for n in ("a", "b")}
    table = {n: NodeInfo(n, {"link": s.address}) for n, (s, _, _) in nodes.items()}
    for n, (_, links, _) in nodes.items():
        links.sync(link_peers(table, n))
    for n, (_, links, _) in nodes.items():
        for lk in links.links.values():
            assert await lk.wait_up(5), (n, lk)
    time.sleep(2.5)  # noqa: ASYNC251 - the loop blocked on purpose: over the 1 s link timeout
    await asyncio.sleep(1.5)  # a few heartbeats after
    for n, (server, links, _) in nodes.items():
        for lk in links.links.values():
            assert lk.state == "up" and lk.connects == 1, (n, lk, lk.last_error)
        assert set(server.peers) == set(nodes) - {n}


async def test_reconnects_after_the_peer_restarts(
    endpoints: Callable[..., Awaitable[Endpoint]],
) -> None:
    port = free_port()
    sb, _, rb = await endpoints("b", port=port)
    states: list[tuple[str, bool]] = []
    _, la, _ = await endpoints("a", on_state=lambda p, up: states.append((p, up)))
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None and await link.wait_up(5)
    assert la.deliver("b", "ch", "e", 1, b"1")
    await until(lambda: len(rb.delivered()) == 1, 5, "first delivery")
    await sb.close()  # the peer goes away (GOAWAY shutdown)
    await until(lambda: link.state != "up", 5, "link down")
    assert not la.deliver("b", "ch", "e", 2, b"2") and link.dropped == 1
    sb2 = LinkServer("b", "c", rb, port=port, timeout=1.0)
    await sb2.start()
    try:
        took = await until(lambda: link.state == "up", 5, "link up again")
        assert took < 2.0
        assert la.deliver("b", "ch", "e", 3, b"3")
        await until(lambda: len(rb.delivered()) == 2, 5, "delivery after restart")
        assert [d.offset for d in rb.delivered()] == [1, 3]
        assert states == [("b", True), ("b", False), ("b", True)]
        assert link.connects == 2
        st = la.status()["b"]
        assert st["state"] == "up" and st["dropped"] == 1 and st["items_out"] == 2
    finally:
        await la.close()
        await sb2.close()


async def _silent_peer(node: str, cluster: str = "c") -> tuple[asyncio.Server, list[bytes]]:
    """A fake acceptor: answers HELLO with WELCOME, then never says anything again."""
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dec = _core.FrameDecoder(F.LINK_MAX_FRAME)
        welcomed = False
        while True:
            chunk = await r.read(65536)
            if not chunk:
                return
            got.append(chunk)
            for ftype, _ in dec.feed(chunk):
                if ftype == LinkFrame.HELLO and not welcomed:
                    welcomed = True
                    w.write(_core.encode_frame(
                        LinkFrame.WELCOME, b'{"node":"%s","cluster":"%s","version":1}'
                        % (node.encode(), cluster.encode())))  # fmt: skip

    return await asyncio.start_server(handle, "127.0.0.1", 0), got


async def test_heartbeat_timeout_detects_a_silent_peer() -> None:
    server, got = await _silent_peer("b")
    port = server.sockets[0].getsockname()[1]
    links = Links("a", "c", **FAST)
    try:
        links.sync({"b": f"127.0.0.1:{port}"})
        link = links.get("b")
        assert link is not None and await link.wait_up(5)
        t0 = time.monotonic()
        await until(lambda: link.state != "up", 5, "the dead peer is noticed")
        took = time.monotonic() - t0
        assert 0.8 < took < 2.5, took  # timeout 1.0 s, checked every heartbeat (0.2 s)
        assert "no answer" in link.last_error
        assert sum(len(c) for c in got) > 9 * 3  # HELLO and some PINGs were sent
    finally:
        await links.close()
        server.close()


async def test_handshake_refusals(endpoints: Callable[..., Awaitable[Endpoint]]) -> None:
    sb, _, rb = await endpoints("b", cluster="other")
    _, la, _ = await endpoints("a")
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None
    await until(lambda: "cluster" in link.last_error, 5, "refused: other cluster")
    assert "WRONG_CLUSTER" in link.last_error and link.state != "up"
    # the routing table says b is at an address where node x answers
    sx, _, _ = await endpoints("x")
    la.sync({"b": sx.address})
    other = la.get("b")
    assert other is not None
    await until(lambda: "not 'b'" in other.last_error, 5, "refused: another node")
    assert other.connects == 0 and rb.peers == []


async def test_acceptor_drops_silent_and_malformed_dialers(
    endpoints: Callable[..., Awaitable[Endpoint]],
) -> None:
    sb, _, rb = await endpoints("b", server_timeout=0.5)
    host, port = split_address(sb.address)
    # silent: no HELLO at all
    r, w = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    assert await asyncio.wait_for(r.read(), 3) == b""
    assert 0.4 < time.monotonic() - t0 < 2.0
    w.close()
    # garbage instead of a frame: GOAWAY (protocol), then closed
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    out = await asyncio.wait_for(r.read(), 3)
    dec = _core.FrameDecoder(F.LINK_MAX_FRAME)
    frames = dec.feed(out)
    assert frames and frames[0][0] == LinkFrame.GOAWAY
    assert F.unpack_goaway(frames[0][1])[0] == F.GoawayCode.PROTOCOL
    w.close()
    # a frame before HELLO
    r, w = await asyncio.open_connection(host, port)
    w.write(_core.encode_frame(LinkFrame.DELIVER, F.pack_batch(0, b"")))
    frames = dec.__class__(F.LINK_MAX_FRAME).feed(await asyncio.wait_for(r.read(), 3))
    assert F.unpack_goaway(frames[0][1])[0] == F.GoawayCode.BAD_HANDSHAKE
    w.close()
    assert rb.events == [] and rb.peers == []


async def test_a_newer_link_from_the_same_node_replaces_the_old(
    endpoints: Callable[..., Awaitable[Endpoint]],
) -> None:
    sb, _, rb = await endpoints("b")
    _, l1, _ = await endpoints("a")
    l1.sync({"b": sb.address})
    first = l1.get("b")
    assert first is not None and await first.wait_up(5)
    l2 = Links("a", "c", **FAST)  # "a" restarted before b noticed the old link die
    try:
        l2.sync({"b": sb.address})
        second = l2.get("b")
        assert second is not None and await second.wait_up(5)
        assert second.deliver("ch", "e", 1, b"1")
        await until(lambda: len(rb.delivered()) == 1, 5, "delivery on the new link")
        assert list(sb.peers) == ["a"] and rb.peers == [("a", True)]
    finally:
        await l2.close()


async def test_slow_peer_is_cut_at_the_cap_and_reconnected() -> None:
    """A peer that stops reading: the ring fills to its cap, the link is dropped (what was
    queued is lost, counted), and it reconnects."""
    paused: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dec = _core.FrameDecoder(F.LINK_MAX_FRAME)
        while True:
            chunk = await r.read(65536)
            if not chunk:
                return
            for ftype, _ in dec.feed(chunk):
                if ftype == LinkFrame.HELLO:
                    w.write(_core.encode_frame(
                        LinkFrame.WELCOME, b'{"node":"b","cluster":"c","version":1}'))  # fmt: skip
                    paused.append(w)
                    cast(asyncio.Transport, w.transport).pause_reading()  # never reads again
                    await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    links = Links("a", "c", heartbeat=5.0, timeout=30.0, backoff=(0.02, 0.2), cap=1 << 20)
    try:
        links.sync({"b": f"127.0.0.1:{port}"})
        link = links.get("b")
        assert link is not None and await link.wait_up(5)
        blob = b'"' + b"y" * 65_000 + b'"'
        i = 0
        while link.state == "up" and i < 5000:  # far more than socket buffers + 1 MiB
            i += 1
            link.deliver("ch", "e", i, blob)
            await asyncio.sleep(0)
        assert link.state != "up", "never cut"
        await until(lambda: link.connects == 2, 5, "reconnected")
    finally:
        await links.close()
        server.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), used as its own CA."""
    d = tmp_path_factory.mktemp("tls")
    crt, key = str(d / "node.crt"), str(d / "node.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", key, "-out", crt, "-subj", "/CN=fastim-node",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


async def test_tls_links_with_client_certificates(
    endpoints: Callable[..., Awaitable[Endpoint]], cert: tuple[str, str]
) -> None:
    crt, key = cert
    sb, _, rb = await endpoints("b", server_ssl=server_context(crt, key, cafile=crt))
    _, la, _ = await endpoints("a", ssl=client_context(crt, crt, key))
    la.sync({"b": sb.address})
    link = la.get("b")
    assert link is not None and await link.wait_up(5)
    for i in range(1, 101):
        link.deliver("secure", "e", i, b"1")
    await until(lambda: len(rb.delivered()) == 100, 5, "100 over TLS")
    assert [d.offset for d in rb.delivered()] == list(range(1, 101))
    # without a client certificate: refused by the TLS handshake, never up
    _, lc, _ = await endpoints("c", ssl=client_context(crt))
    lc.sync({"b": sb.address})
    nocert = lc.get("b")
    assert nocert is not None and not await nocert.wait_up(1.0)
    # plaintext to a TLS port: never up either
    _, ld, _ = await endpoints("d")
    ld.sync({"b": sb.address})
    plain = ld.get("b")
    assert plain is not None and not await plain.wait_up(1.0)
    assert [p for p, _ in rb.peers] == ["a"]


# --------------------------------------------------------------------------- processes


class PeerProc:
    """tests/cluster/_linkpeer.py as a child process, its stdout read line by line."""

    def __init__(self, node: str, port: int) -> None:
        self.node, self.port = node, port
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.lines = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.cluster._linkpeer", self.node, "c", str(self.port),
            cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        await until(lambda: any(x.startswith("ready") for x in self.lines), 20, "peer ready")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().strip())

    def last_offset(self) -> int:
        for line in reversed(self.lines):
            if line.startswith("deliver"):
                return int(line.split()[2])
        return 0

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=2)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_process_peer_stopped_killed_and_restarted() -> None:
    port = free_port()
    peer = PeerProc("b", port)
    await peer.start()
    states: list[bool] = []
    links = Links("a", "c", **FAST, on_state=lambda p, up: states.append(up))
    try:
        links.sync({"b": f"127.0.0.1:{port}"})
        link = links.get("b")
        assert link is not None and await link.wait_up(10)
        for i in range(1, 2001):
            link.deliver("ch", "e", i, b"{}")
            if i % 100 == 0:
                await asyncio.sleep(0)
        await until(lambda: peer.last_offset() == 2000, 10, "2000 delivered in order")
        assert not any(x.startswith("gap") for x in peer.lines)
        # frozen (SIGSTOP): up to the kernel, dead to the heartbeat
        peer.signal(signal.SIGSTOP)
        took = await until(lambda: link.state != "up", 5, "stopped peer noticed")
        assert took < 2.5
        # killed and started again on the same port: the link comes back by itself
        await peer.kill()
        await peer.start()
        await until(lambda: link.state == "up", 10, "reconnected to the new process")
        for i in range(1, 101):
            link.deliver("ch", "e", i, b"{}")
        await until(lambda: peer.last_offset() == 100, 10, "delivered after restart")
        assert "peer a up" in peer.lines
        assert states == [True, False, True]
    finally:
        await links.close()
        await peer.kill()


def test_link_port_refuses_a_fastim_client() -> None:
    """A client HELLO (type 0x01) on the link port is an unknown frame type: closed."""

    async def main() -> bytes:
        server = LinkServer("b", "c", LinkHandler())
        await server.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(_core.encode_frame(0x01, b"\x01\x01{}"))
            out = await asyncio.wait_for(r.read(), 3)
            w.close()
            return out
        finally:
            await server.close()

    out = asyncio.run(main())
    frames = _core.FrameDecoder(F.LINK_MAX_FRAME).feed(out)
    assert frames[0][0] == LinkFrame.GOAWAY
    assert F.unpack_goaway(frames[0][1])[0] == F.GoawayCode.PROTOCOL
