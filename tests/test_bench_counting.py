"""The load generator's message counting, which must be exact however bytes are chunked.

Count-only subscribers skip per-message parsing once the stream is regular ("stride"
mode, see fastim.bench.counting._Sub); these tests build server streams with interleaved pings and
messages whose size changes (fastim's JSON offset gaining a digit), cut them into random
chunks, and compare the count with the truth. Sampled subscribers must also report
reordering and duplicates.
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from fastim import _core
from fastim.bench import Target, WorkerResult, make_payload, spread_sample
from fastim.bench.counting import _TcpSub, _WsSub
from fastim.client.connection import ws_accept
from fastim.protocol import FrameType, pack_msg


class _Sink:
    """Stands in for a transport: collects what the subscriber writes (pongs)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _switching(request: bytes, subprotocol: str | None = "fastim.json") -> bytes:
    """A server's 101 response to the upgrade ``request``."""
    key = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0].decode()
    proto = b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode() if subprotocol else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n%s\r\n" % (ws_accept(key).encode(), proto)
    )


def _chunks(stream: bytes, rng: random.Random) -> list[bytes]:
    out = []
    i = 0
    while i < len(stream):
        # mostly small cuts (headers split across reads), sometimes large ones
        k = rng.choice((1, 2, 3, 7, 50, 300, 4096, 70000))
        out.append(stream[i : i + rng.randint(1, k)])
        i += len(out[-1])
    return out


def _ws_stream(rng: random.Random, n: int, fastim: bool) -> tuple[bytes, int, int]:
    """(stream, data messages, pings) as a server sends them."""
    parts = []
    pings = 0
    for off in range(1, n + 1):
        payload = make_payload(off, 64)
        if fastim:  # the JSON envelope's length grows with the offset's digits
            payload = b'{"op":"msg","ch":"bench","off":%d,"data":%s}' % (off * 997, payload)
        parts.append(_core.ws_encode(_core.OP_TEXT, payload))
        if rng.random() < 0.01:
            parts.append(
                _core.ws_encode(_core.OP_PING, bytes([0x81, 0x7E, 1, 2])[: rng.randint(0, 4)])
            )
            pings += 1
        if rng.random() < 0.005:  # a large message: 16-bit length
            parts.append(_core.ws_encode(_core.OP_TEXT, make_payload(0, 300)))
            n += 1
    return b"".join(parts), n, pings


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fastim", [False, True])
async def test_ws_count_is_exact_whatever_the_chunking(seed: int, fastim: bool) -> None:
    rng = random.Random(seed)
    stream, n, pings = _ws_stream(rng, 3000, fastim)
    kind = "ws" if fastim else "peer"
    sub = _WsSub(Target(kind, "127.0.0.1", 1), "bench", False, False, WorkerResult())
    sink = _Sink()
    sub.transport = sink  # type: ignore[assignment]
    sub.head = None  # upgraded
    sub.awaiting_reply = False
    for c in _chunks(stream, rng):
        sub.data_received(c)
    assert sub.count == n
    assert len(sink.written) == pings  # every ping answered with a pong
    assert sub.strides >= 1  # the fast path was used
    assert not sub.out.errors


@pytest.mark.parametrize("seed", range(4))
async def test_tcp_count_is_exact_whatever_the_chunking(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    n = 0
    for off in range(1, 3001):
        size = 64 if off < 2000 else 80  # a change of message size mid-stream
        parts.append(
            _core.encode_frame(FrameType.MSG, pack_msg(off, b"bench", make_payload(off, size)))
        )
        n += 1
        if rng.random() < 0.01:
            parts.append(_core.encode_frame(FrameType.PING, b"\x00\x00\x00\x0e\x10"))
    sub = _TcpSub(Target("tcp", "127.0.0.1", 1), "bench", False, True, WorkerResult())
    sub.transport = _Sink()  # type: ignore[assignment]
    sub.ready.set_result(None)
    for c in _chunks(b"".join(parts), rng):
        sub.data_received(c)
    assert sub.count == n
    assert sub.strides >= 1
    assert not sub.out.errors


async def test_sampled_subscriber_sees_reordering_and_duplicates() -> None:
    out = WorkerResult()
    sub = _WsSub(Target("peer", "127.0.0.1", 1), "bench", True, False, out)
    sub.transport = _Sink()  # type: ignore[assignment]
    sub.head = None
    seqs = [1, 2, 3, 5, 4, 4, 6]
    sub.data_received(b"".join(_core.ws_encode(_core.OP_TEXT, make_payload(s, 64)) for s in seqs))
    assert sub.count == len(seqs)
    assert out.reordered == 1 and out.lost_sampled == 1  # 5 came before 4
    assert out.duplicates == 2  # 4 after 5, and 4 again
    assert len(out.latencies_us) == len(seqs)
    assert all(0 <= x < 10e6 for x in out.latencies_us)


def test_payload_has_the_asked_size_and_fields() -> None:
    for size in (40, 64, 1000):
        p = make_payload(123456, size)
        assert len(p) == size
        d = orjson.loads(p)
        assert d["s"] == 123456 and isinstance(d["t"], int)


def test_spread_sample_covers_the_whole_range() -> None:
    s = spread_sample(10_000, 20)
    assert len(s) == 20 and min(s) == 0 and max(s) >= 9000
    assert spread_sample(5, 20) == set(range(5))
    assert spread_sample(5, 0) == set()


async def test_fastim_ws_subscriber_waits_for_the_reply_then_counts() -> None:
    out = WorkerResult()
    sub = _WsSub(Target("ws", "127.0.0.1", 1, "/ws"), "bench", False, True, out)
    sink = _Sink()
    sub.connection_made(sink)  # type: ignore[arg-type]
    assert sink.written[0].startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol: fastim.json" in sink.written[0]
    reply = _core.ws_encode(_core.OP_TEXT, b'{"op":"subscribed","ch":"bench","off":0,"id":1}')
    sub.data_received(_switching(sink.written[0]))
    # the subscribe went out masked, right after the upgrade
    parser = _core.WSParser(1 << 20)
    assert orjson.loads(parser.feed(sink.written[1])[0][1]) == {"op": "sub", "ch": "bench", "id": 1}
    assert not sub.ready.done()
    msg = _core.ws_encode(
        _core.OP_TEXT, b'{"op":"msg","ch":"bench","off":1,"data":%s}' % make_payload(1, 64)
    )
    sub.data_received(reply + msg)
    await asyncio.wait_for(sub.ready, 1)
    assert sub.count == 1


@pytest.mark.parametrize(
    ("kind", "answer", "why"),
    [
        ("ws", b"HTTP/1.1 404 Not Found\r\n\r\n", "refused"),
        (
            "ws",
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            "Sec-WebSocket-Accept",
        ),
        ("peer", None, "subprotocol"),  # a peer was offered none
        ("ws", b"HTTP/1.1 101 OK\r\nX: " + b"a" * 20000, "exceeds"),
    ],
)
async def test_ws_subscriber_checks_the_upgrade_as_the_client_does(
    kind: str, answer: bytes | None, why: str
) -> None:
    out = WorkerResult()
    sub = _WsSub(Target(kind, "127.0.0.1", 1, "/ws"), "bench", False, False, out)
    sink = _Sink()
    sub.connection_made(sink)  # type: ignore[arg-type]
    sub.data_received(answer if answer is not None else _switching(sink.written[0]))
    with pytest.raises(ConnectionError, match=why):
        await asyncio.wait_for(sub.ready, 1)
    assert len(out.errors) == 1 and why in out.errors[0]
    assert sub.count == 0 and sub.head is not None


async def test_ws_subscriber_of_a_peer_offers_no_subprotocol() -> None:
    sub = _WsSub(Target("peer", "h", 8765, "/"), "bench", False, False, WorkerResult())
    sink = _Sink()
    sub.connection_made(sink)  # type: ignore[arg-type]
    assert sink.written[0].startswith(b"GET / HTTP/1.1\r\nHost: h:8765\r\n")
    assert b"Sec-WebSocket-Protocol" not in sink.written[0]
    assert b"User-Agent: fastim-bench\r\n" in sink.written[0]
    sub.data_received(_switching(sink.written[0], None) + _core.ws_encode(_core.OP_TEXT, b"{}"))
    await asyncio.wait_for(sub.ready, 1)
    assert sub.count == 1 and not sub.out.errors
