"""Broadcast frames by reference: a tick's frames go once into the flusher's arena and
the rings of subscribers that write to their own socket refer to them (P10, item 0).

Real socketpairs. What a subscriber receives must be byte for byte what it received when
every ring copied every frame: the order of its messages and of its other bytes
(replies between two messages), across channels, formats, partial writes, pauses,
closes, and fan-outs made while a flush runs. A hypothesis model checks random
sequences of all of these against the bytes each ring was given.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastim import _core


class Recorder:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def is_closing(self) -> bool:
        return False


class Sub:
    """A subscriber: a ring writing to one end of a socketpair, read at the other."""

    def __init__(self, flusher: _core.Flusher, fmt: int = _core.FMT_WS_JSON) -> None:
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.tr = Recorder()
        self.ring = _core.OutRing(flusher, self.tr, fmt=fmt, cap=64 << 20)
        self.ring.set_fd(self.a.fileno())
        self.got = b""

    def read(self) -> bytes:
        while True:
            try:
                chunk = self.b.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.got += chunk
        return self.got + b"".join(self.tr.chunks)

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _subs(flusher: _core.Flusher, n: int) -> Iterator[Sub]:
    return (Sub(flusher) for _ in range(n))


def _frames(data: bytes, fmt: int = _core.FMT_WS_JSON) -> tuple[bytes | None, ...]:
    out: list[bytes | None] = [None] * _core.N_FORMATS
    out[fmt] = data
    return tuple(out)


def test_a_broadcast_is_not_copied_into_each_ring() -> None:
    flusher = _core.Flusher(None)
    subs = list(_subs(flusher, 3))
    s = _core.SubscriberSet()
    for sub in subs:
        s.add(sub.ring)
    for i in range(5):
        assert s.fanout(_frames(b"m%d;" % i)) == 3
    assert flusher.shared == 15
    assert flusher.arena_bytes == 5 * 3  # each frame once
    for sub in subs:
        assert len(sub.ring) == 15 and sub.ring.capacity == 0  # no buffer of its own
    assert flusher.flush() == 3
    assert flusher.arena_bytes == 0
    for sub in subs:
        assert sub.read() == b"m0;m1;m2;m3;m4;"
        assert sub.tr.chunks == []
        sub.close()


def test_replies_between_messages_keep_their_place() -> None:
    flusher = _core.Flusher(None)
    one, two = _subs(flusher, 2)
    s = _core.SubscriberSet()
    s.add(one.ring)
    s.add(two.ring)
    s.fanout(_frames(b"A1;"))
    one.ring.append(b"reply;")  # its run is copied, then the reply
    s.fanout(_frames(b"A2;"))
    flusher.flush()
    assert one.read() == b"A1;reply;A2;"
    assert two.read() == b"A1;A2;"
    one.close()
    two.close()


def test_channels_that_interleave_in_a_tick() -> None:
    """The arena holds every frame of the tick in order: a ring in one channel only
    skips the other's frames (its run breaks, it copies), one in both keeps its run."""
    flusher = _core.Flusher(None)
    one, both = _subs(flusher, 2)
    ch1, ch2 = _core.SubscriberSet(), _core.SubscriberSet()
    ch1.add(one.ring)
    ch1.add(both.ring)
    ch2.add(both.ring)
    ch1.fanout(_frames(b"a1;"))
    ch2.fanout(_frames(b"b1;"))
    ch1.fanout(_frames(b"a2;"))
    flusher.flush()
    assert one.read() == b"a1;a2;"
    assert both.read() == b"a1;b1;a2;"
    one.close()
    both.close()


def test_formats_each_have_their_arena() -> None:
    flusher = _core.Flusher(None)
    js, tcp = Sub(flusher, _core.FMT_WS_JSON), Sub(flusher, _core.FMT_TCP)
    s = _core.SubscriberSet()
    s.add(js.ring)
    s.add(tcp.ring)
    for i in range(3):
        fr: list[bytes | None] = [None] * _core.N_FORMATS
        fr[_core.FMT_WS_JSON] = b"j%d" % i
        fr[_core.FMT_TCP] = b"t%d" % i
        s.fanout(tuple(fr))
    assert flusher.shared == 6
    flusher.flush()
    assert js.read() == b"j0j1j2"
    assert tcp.read() == b"t0t1t2"
    js.close()
    tcp.close()


def test_what_the_kernel_does_not_take_is_copied_and_goes_to_the_transport() -> None:
    flusher = _core.Flusher(None)
    sub = Sub(flusher)
    sub.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s = _core.SubscriberSet()
    s.add(sub.ring)
    frame = bytes(range(256)) * 256  # 64 KiB a frame
    for _ in range(16):
        s.fanout(_frames(frame))
    flusher.flush()
    assert flusher.arena_bytes == 0
    assert len(sub.tr.chunks) == 1  # the rest, copied, to the transport
    assert sub.read() == frame * 16
    sub.close()


def test_a_paused_ring_keeps_a_copy_until_resumed() -> None:
    flusher = _core.Flusher(None)
    sub = Sub(flusher)
    s = _core.SubscriberSet()
    s.add(sub.ring)
    s.fanout(_frames(b"x1;"))
    sub.ring.pause()  # after the reference was taken
    s.fanout(_frames(b"x2;"))  # paused: copied
    flusher.flush()
    assert flusher.arena_bytes == 0
    assert sub.read() == b""
    assert len(sub.ring) == 6 and sub.ring.capacity > 0
    sub.ring.resume()
    flusher.flush()
    assert sub.read() == b"x1;x2;"
    sub.close()


def test_a_closed_ring_drops_its_run() -> None:
    flusher = _core.Flusher(None)
    gone, stays = _subs(flusher, 2)
    s = _core.SubscriberSet()
    s.add(gone.ring)
    s.add(stays.ring)
    s.fanout(_frames(b"m;"))
    gone.ring.close()
    assert len(gone.ring) == 0
    flusher.flush()
    assert gone.read() == b""
    assert stays.read() == b"m;"
    gone.close()
    stays.close()


def test_a_fanout_made_while_flushing_is_copied() -> None:
    """A callback of the flush (here an SSE ring's on_flush) may fan out: the arenas
    are emptied when the flush ends, so what it appends is a copy, sent next flush."""
    flusher = _core.Flusher(None)
    first, later = _subs(flusher, 2)
    s = _core.SubscriberSet()
    s.add(later.ring)
    calls: list[int] = []

    def on_flush() -> None:
        if not calls:
            calls.append(1)
            s.fanout(_frames(b"during;"))

    first.ring.on_flush = on_flush
    first.ring.append(b"x")
    flusher.flush()
    assert flusher.arena_bytes == 0
    assert later.ring.capacity > 0  # a copy of its own
    flusher.flush()
    assert later.read() == b"during;"
    first.close()
    later.close()


def test_changing_format_keeps_the_bytes() -> None:
    flusher = _core.Flusher(None)
    sub = Sub(flusher)
    s = _core.SubscriberSet()
    s.add(sub.ring)
    s.fanout(_frames(b"one;"))
    s.remove(sub.ring)
    sub.ring.fmt = _core.FMT_TCP  # its run was in the JSON arena
    s2 = _core.SubscriberSet()
    s2.add(sub.ring)
    s2.fanout(_frames(b"two;", _core.FMT_TCP))
    flusher.flush()
    assert sub.read() == b"one;two;"
    sub.close()


def test_rings_of_two_flushers_in_one_set() -> None:
    f1, f2 = _core.Flusher(None), _core.Flusher(None)
    one, two = Sub(f1), Sub(f2)
    s = _core.SubscriberSet()
    s.add(one.ring)
    s.add(two.ring)
    s.fanout(_frames(b"a;"))
    s.fanout(_frames(b"b;"))
    assert f1.arena_bytes == 4 and f2.arena_bytes == 4
    f1.flush()
    f2.flush()
    assert one.read() == b"a;b;" and two.read() == b"a;b;"
    one.close()
    two.close()


_fanout = st.tuples(st.just("fanout"), st.integers(0, 2), st.binary(min_size=1, max_size=40))
_ops = st.lists(
    st.one_of(
        _fanout,
        _fanout,
        _fanout,
        st.tuples(st.just("append"), st.integers(0, 3), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("pause"), st.integers(0, 3)),
        st.tuples(st.just("resume"), st.integers(0, 3)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("join"), st.integers(0, 2), st.integers(0, 3)),
        st.tuples(st.just("leave"), st.integers(0, 2), st.integers(0, 3)),
    ),
    min_size=3,
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
@example([("fanout", 0, b"a"), ("fanout", 1, b"b"), ("fanout", 0, b"c")])  # a run breaks
@example([("fanout", 2, b"a"), ("pause", 3), ("flush",), ("fanout", 0, b"bb"), ("resume", 3)])
def test_model_every_ring_gets_its_bytes_in_order(ops: list[tuple[Any, ...]]) -> None:
    """Random channels (sets), members, fan-outs, replies, pauses and flushes: each
    subscriber receives exactly the bytes it was given, in the order given."""
    flusher = _core.Flusher(None)
    subs = [Sub(flusher) for _ in range(4)]
    sets = [_core.SubscriberSet() for _ in range(3)]
    members: list[set[int]] = [{0, 1}, {1, 2}, {0, 1, 2, 3}]
    for k, m in enumerate(members):
        for i in m:
            sets[k].add(subs[i].ring)
    want = [b""] * 4
    try:
        for op in ops:
            kind = op[0]
            if kind == "fanout":
                k, data = op[1], op[2]
                assert isinstance(k, int) and isinstance(data, bytes)
                sets[k].fanout(_frames(data))
                for i in members[k]:
                    want[i] += data
            elif kind == "append":
                i, data = op[1], op[2]
                assert isinstance(i, int) and isinstance(data, bytes)
                subs[i].ring.append(data)
                want[i] += data
            elif kind == "pause":
                assert isinstance(op[1], int)
                subs[op[1]].ring.pause()
            elif kind == "resume":
                assert isinstance(op[1], int)
                subs[op[1]].ring.resume()
            elif kind == "flush":
                flusher.flush()
                assert flusher.arena_bytes == 0
            elif kind == "join":
                k, i = op[1], op[2]
                assert isinstance(k, int) and isinstance(i, int)
                sets[k].add(subs[i].ring)
                members[k].add(i)
            elif kind == "leave":
                k, i = op[1], op[2]
                assert isinstance(k, int) and isinstance(i, int)
                sets[k].remove(subs[i].ring)
                members[k].discard(i)
        for sub in subs:
            sub.ring.resume()
        flusher.flush()
        for i, sub in enumerate(subs):
            assert sub.read() == want[i], f"subscriber {i}"
    finally:
        for sub in subs:
            sub.close()


def test_a_flush_called_from_a_flush_callback_leaves_the_outer_runs_alone() -> None:
    flusher = _core.Flusher(None)
    first, second = _subs(flusher, 2)
    s = _core.SubscriberSet()
    s.add(first.ring)
    s.add(second.ring)
    calls: list[int] = []

    def on_flush() -> None:
        if not calls:
            calls.append(1)
            first.ring.append(b"+")  # dirty again: the nested flush sends it
            flusher.flush()

    first.ring.on_flush = on_flush
    s.fanout(_frames(b"m1;"))
    s.fanout(_frames(b"m2;"))
    flusher.flush()
    flusher.flush()
    assert first.read() == b"m1;m2;+"
    assert second.read() == b"m1;m2;"
    assert flusher.arena_bytes == 0
    first.close()
    second.close()
