"""OutRing.set_fd: flushes write to the socket from C, and hand the rest to the transport.

Real socketpairs; the "transport" is a recorder standing in for the asyncio transport
the ring would otherwise call (it only has to take bytes and say if it is closing).
"""

from __future__ import annotations

import socket

import pytest

from fastim import _core


class Recorder:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_flush_writes_to_the_socket_without_the_transport() -> None:
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        tr = Recorder()
        ring = _core.OutRing(flusher, tr)
        ring.set_fd(a.fileno())
        assert ring.direct_fd == a.fileno()
        ring.append(b"hello ")
        ring.append(b"world")
        assert flusher.flush() == 1
        assert tr.chunks == []
        assert _drain(b) == b"hello world"
        assert len(ring) == 0 and ring.capacity == 0  # idle: no buffer kept
        assert flusher.bytes_written == 11


def test_what_the_kernel_does_not_take_goes_to_the_transport_in_order() -> None:
    a, b = _pair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        flusher = _core.Flusher(None)
        tr = Recorder()
        ring = _core.OutRing(flusher, tr, cap=64 << 20)
        ring.set_fd(a.fileno())
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers
        ring.append(payload)
        flusher.flush()
        direct = _drain(b)
        assert 0 < len(direct) < len(payload)
        assert len(tr.chunks) == 1
        assert direct + tr.chunks[0] == payload


def test_a_wrapped_ring_goes_out_in_one_sendmsg_in_order() -> None:
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        tr = Recorder()
        ring = _core.OutRing(flusher, tr)
        ring.pause()  # fill, consume part, so that the next bytes wrap around
        ring.append(b"A" * 400)
        ring.set_fd(a.fileno())
        ring.resume()
        flusher.flush()
        assert _drain(b) == b"A" * 400
        ring.append(b"x" * 300)
        ring.append(b"y" * 300)
        flusher.flush()
        assert _drain(b) == b"x" * 300 + b"y" * 300
        assert tr.chunks == []


class Unasked(Recorder):
    """A transport the flusher must not ask whether it is closing (no Python call)."""

    def is_closing(self) -> bool:
        raise AssertionError("the flusher asked the transport")


def test_a_direct_flush_makes_no_python_call() -> None:
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        tr = Unasked()
        ring = _core.OutRing(flusher, tr)
        ring.set_fd(a.fileno())
        ring.append(b"fast")
        assert flusher.flush() == 1
        assert _drain(b) == b"fast" and tr.chunks == []


def test_a_closing_transport_gets_the_bytes_not_the_fd() -> None:
    # once the transport closes, its fd number may belong to another connection: whoever
    # closes it sets the fd to -1 first (the session), and flushes go to the transport
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        tr = Unasked()
        ring = _core.OutRing(flusher, tr)
        ring.set_fd(a.fileno())
        ring.set_fd(-1)
        ring.append(b"late")
        flusher.flush()
        assert tr.chunks == [b"late"]
        assert _drain(b) == b""


def test_a_closed_ring_gives_up_its_fd() -> None:
    a, b = _pair()
    with a, b:
        ring = _core.OutRing(_core.Flusher(None), Recorder())
        ring.set_fd(a.fileno())
        ring.close()
        assert ring.direct_fd == -1


class ClosesOnWrite(Recorder):
    """A transport whose write fails and closes it (asyncio's _fatal_error)."""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.closing = True


def test_a_transport_that_closes_on_write_stops_direct_writes() -> None:
    a, b = _pair()
    with a:
        b.close()
        flusher = _core.Flusher(None)
        tr = ClosesOnWrite()
        ring = _core.OutRing(flusher, tr)
        ring.set_fd(a.fileno())
        ring.append(b"to nobody")
        flusher.flush()  # EPIPE: the rest goes to the transport, which closes
        assert tr.chunks == [b"to nobody"]
        assert ring.direct_fd == -1  # the next flushes do not touch the fd
        ring.append(b"later")
        flusher.flush()
        assert tr.chunks == [b"to nobody", b"later"]


def test_a_dead_peer_hands_the_bytes_to_the_transport() -> None:
    a, b = _pair()
    with a:
        b.close()
        flusher = _core.Flusher(None)
        tr = Recorder()
        ring = _core.OutRing(flusher, tr)
        ring.set_fd(a.fileno())
        ring.append(b"to nobody")
        flusher.flush()  # EPIPE: no SIGPIPE (MSG_NOSIGNAL), the transport meets the error
        assert tr.chunks == [b"to nobody"]


def test_paused_ring_does_not_write_until_resumed() -> None:
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        ring = _core.OutRing(flusher, Recorder())
        ring.set_fd(a.fileno())
        ring.pause()
        ring.append(b"wait")
        flusher.flush()
        assert _drain(b) == b""
        ring.resume()
        flusher.flush()
        assert _drain(b) == b"wait"


def test_set_fd_rejects_nonsense() -> None:
    ring = _core.OutRing(_core.Flusher(None), Recorder())
    with pytest.raises(ValueError):
        ring.set_fd(-5)
    ring.set_fd(-1)
    assert ring.direct_fd == -1


# --------------------------------------------------------------------------- buffer pool


def test_emptied_buffers_are_pooled_and_reused() -> None:
    flusher = _core.Flusher(None)
    tr = Recorder()
    rings = [_core.OutRing(flusher, tr) for _ in range(10)]
    for r in rings:
        r.append(b"m" * 700)  # a 1 KiB buffer each
        assert r.capacity == 1024
    assert flusher.pool_bytes == 0
    flusher.flush()
    assert all(r.capacity == 0 for r in rings)  # idle rings hold nothing...
    assert flusher.pool_bytes == 10 * 1024  # ...the flusher keeps the buffers
    rings[0].append(b"n" * 600)
    assert flusher.pool_bytes == 9 * 1024  # taken from the pool
    flusher.flush()
    assert tr.chunks == [b"m" * 700] * 10 + [b"n" * 600]
    flusher.trim_pool()
    assert flusher.pool_bytes == 0


def test_pool_keeps_at_most_its_limit_and_not_big_buffers() -> None:
    flusher = _core.Flusher(None)
    flusher.pool_limit = 4096
    rings = [_core.OutRing(flusher, Recorder()) for _ in range(8)]
    for r in rings:
        r.append(b"x" * 1000)
    big = _core.OutRing(flusher, Recorder(), cap=1 << 22)
    big.append(b"y" * 200_000)  # 256 KiB: beyond the largest size class
    flusher.flush()
    assert flusher.pool_bytes == 4096


def test_closed_and_collected_rings_return_their_buffers() -> None:
    flusher = _core.Flusher(None)
    a = _core.OutRing(flusher, Recorder())
    b = _core.OutRing(flusher, Recorder())
    a.append(b"1" * 100)
    b.append(b"2" * 100)
    a.close()
    assert flusher.pool_bytes == 512
    b.pause()
    flusher.flush()  # b is paused: it keeps its bytes, and leaves the dirty list
    assert b.capacity == 512
    del b
    assert flusher.pool_bytes == 1024


def test_rings_without_a_flusher_use_malloc() -> None:
    r = _core.OutRing(None, Recorder())
    r.append(b"z" * 3000)
    assert r.capacity == 4096
    assert r.take() == b"z" * 3000
    assert r.capacity == 0


@pytest.mark.parametrize("direct", [False, True])
def test_a_ring_starts_where_its_last_flush_ended(direct: bool) -> None:
    """A ring that needed 8 KiB in its last tick takes an 8 KiB buffer at its next first
    append (no growing from 512 bytes, copying at each doubling: P10 item 0), and a
    tick that needed less brings the next one's start down; idle, it holds nothing."""
    a, b = _pair()
    with a, b:
        flusher = _core.Flusher(None)
        tr = Recorder()
        ring = _core.OutRing(flusher, tr)
        if direct:
            ring.set_fd(a.fileno())
        assert ring.capacity == 0
        for _ in range(3):
            ring.append(b"m" * 2500)  # 7,500 bytes: 512 -> ... -> 8 KiB
        assert ring.capacity == 8192
        flusher.flush()
        assert ring.capacity == 0  # idle: the buffer went to the pool
        assert flusher.pool_bytes >= 8192
        ring.append(b"n" * 100)
        assert ring.capacity == 8192  # the last tick's size, at once
        flusher.flush()
        ring.append(b"o" * 100)
        assert ring.capacity == 512  # the last tick needed 100 bytes
        flusher.flush()
        sent = _drain(b) if direct else b"".join(tr.chunks)
        assert sent == b"m" * 7500 + b"n" * 100 + b"o" * 100
