"""OutRing, Flusher and HistoryRing, on both impls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Sink:
    """A transport stand-in that records every write()."""

    def __init__(self, log: list[tuple[str, bytes]] | None = None, name: str = "") -> None:
        self.writes: list[bytes] = []
        self.log = log
        self.name = name

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.log is not None:
            self.log.append((self.name, bytes(data)))


class Scheduler:
    """Records what the Flusher asks to run at the end of the tick."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def __call__(self, callback: Callable[[], object]) -> None:
        self.calls.append(callback)


# ---------------------------------------------------------------- OutRing


def test_defaults(impl: ModuleType) -> None:
    sink = Sink()
    ring = impl.OutRing(None, sink)
    assert ring.fmt == impl.FMT_TCP
    assert ring.cap == 4 * 1024 * 1024
    assert ring.transport is sink
    assert ring.on_overflow is None
    assert len(ring) == 0
    assert ring.capacity == 0
    assert not (ring.dirty or ring.paused or ring.closed or ring.overflowed)


def test_attributes_are_settable(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink(), fmt=impl.FMT_WS_JSON, cap=10)
    assert (ring.fmt, ring.cap) == (impl.FMT_WS_JSON, 10)
    other = Sink()
    ring.transport = other
    ring.on_overflow = print
    assert ring.transport is other
    assert ring.on_overflow is print


def test_append_and_take_in_order(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink())
    assert ring.append(b"abc")
    assert ring.append(bytearray(b"de"))
    assert ring.append(memoryview(b"xfgh")[1:])
    assert len(ring) == 8
    assert ring.capacity >= 8
    assert ring.dirty
    assert ring.take() == b"abcdefgh"
    assert len(ring) == 0
    assert ring.capacity == 0
    assert ring.take() == b""


def test_take_returns_bytes(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink())
    ring.append(bytearray(b"x"))
    assert type(ring.take()) is bytes


def test_capacity_is_released_when_idle(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    ring = impl.OutRing(flusher, Sink())
    ring.append(b"x" * 1000)
    assert ring.capacity >= 1000
    flusher.flush()
    assert ring.capacity == 0
    ring.append(b"y")
    ring.close()
    assert ring.capacity == 0


def test_many_appends_wrap_around(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink(), cap=1000)
    expected = bytearray()
    for i in range(200):
        chunk = bytes([i]) * (i % 13 + 1)
        assert ring.append(chunk)
        expected += chunk
        if i % 17 == 16:
            half = ring.take()
            assert half == expected
            expected.clear()
    assert ring.take() == expected


def test_cap(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink(), cap=10)
    assert ring.append(b"123456")
    assert ring.append(b"7890")  # exactly the cap
    assert not ring.overflowed
    assert not ring.append(b"x")
    assert ring.overflowed
    assert len(ring) == 10
    assert ring.take() == b"1234567890"  # nothing of the refused append was stored
    assert ring.overflowed  # stays set


def test_cap_refuses_a_single_oversized_append(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink(), cap=4)
    assert not ring.append(b"12345")
    assert ring.overflowed
    assert len(ring) == 0


def test_empty_append_is_a_noop(impl: ModuleType) -> None:
    flusher = impl.Flusher(Scheduler())
    ring = impl.OutRing(flusher, Sink(), cap=0)
    assert ring.append(b"")
    assert not ring.dirty
    assert not ring.overflowed
    assert flusher.pending == 0


def test_close_drops_data_and_refuses_appends(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink())
    ring.append(b"pending")
    ring.close()
    assert ring.closed
    assert len(ring) == 0
    assert ring.capacity == 0
    assert not ring.append(b"more")
    assert not ring.append(b"")
    assert len(ring) == 0
    assert not ring.overflowed


def test_pause_resume_flags(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink())
    ring.pause()
    assert ring.paused
    assert ring.append(b"x")  # appends still buffer while paused
    ring.resume()
    assert not ring.paused
    assert len(ring) == 1


# ---------------------------------------------------------------- Flusher


def test_one_schedule_and_one_write_per_ring_per_tick(impl: ModuleType) -> None:
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    a_sink, b_sink = Sink(), Sink()
    a = impl.OutRing(flusher, a_sink)
    b = impl.OutRing(flusher, b_sink)
    assert flusher.pending == 0
    a.append(b"a1")
    assert len(sched.calls) == 1
    assert flusher.pending == 1
    b.append(b"b1")
    a.append(b"a2")
    b.append(b"b2")
    assert len(sched.calls) == 1
    assert flusher.pending == 2
    assert sched.calls[0]() == 2  # the scheduled callback is the flush
    assert a_sink.writes == [b"a1a2"]
    assert b_sink.writes == [b"b1b2"]
    assert (flusher.writes, flusher.bytes_written) == (2, 8)
    assert flusher.pending == 0
    assert not a.dirty and not b.dirty
    assert a.capacity == 0 and b.capacity == 0
    # next tick: a new schedule
    b.append(b"b3")
    assert len(sched.calls) == 2
    assert flusher.flush() == 1
    assert b_sink.writes == [b"b1b2", b"b3"]
    assert (flusher.writes, flusher.bytes_written) == (3, 10)


def test_flush_with_nothing_dirty(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    assert flusher.flush() == 0
    assert flusher.writes == 0
    assert flusher.bytes_written == 0


def test_flush_order_is_dirty_order(impl: ModuleType) -> None:
    log: list[tuple[str, bytes]] = []
    flusher = impl.Flusher()
    rings = {name: impl.OutRing(flusher, Sink(log, name)) for name in "abcde"}
    for name in "dbeac":
        rings[name].append(name.encode())
    rings["a"].append(b"!")
    assert flusher.flush() == 5
    assert log == [("d", b"d"), ("b", b"b"), ("e", b"e"), ("a", b"a!"), ("c", b"c")]


def test_paused_ring_keeps_its_data_until_resumed(impl: ModuleType) -> None:
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    sink = Sink()
    ring = impl.OutRing(flusher, sink)
    ring.append(b"held")
    ring.pause()
    assert flusher.flush() == 0
    assert sink.writes == []
    assert len(ring) == 4
    assert not ring.dirty
    assert flusher.pending == 0
    ring.append(b"+")  # dirty again, still paused
    assert flusher.flush() == 0
    ring.resume()
    assert ring.dirty
    assert flusher.pending == 1
    assert len(sched.calls) == 3
    assert flusher.flush() == 1
    assert sink.writes == [b"held+"]


def test_resume_without_data_does_not_dirty(impl: ModuleType) -> None:
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    ring = impl.OutRing(flusher, Sink())
    ring.pause()
    ring.resume()
    assert not ring.dirty
    assert flusher.pending == 0
    assert sched.calls == []


def test_closed_ring_is_skipped(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    sink, other = Sink(), Sink()
    ring = impl.OutRing(flusher, sink)
    ring2 = impl.OutRing(flusher, other)
    ring.append(b"never sent")
    ring2.append(b"sent")
    ring.close()
    assert flusher.flush() == 1
    assert sink.writes == []
    assert other.writes == [b"sent"]
    assert flusher.pending == 0


def test_overflow_calls_back_and_writes_nothing(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    calls: list[str] = []
    sink = Sink()
    ring = impl.OutRing(flusher, sink, cap=4, on_overflow=lambda: calls.append("over"))
    assert ring.append(b"1234")
    assert not ring.append(b"5")
    assert flusher.pending == 1
    assert flusher.flush() == 0
    assert calls == ["over"]
    assert sink.writes == []
    assert flusher.writes == 0


def test_overflow_without_callback(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    sink = Sink()
    ring = impl.OutRing(flusher, sink, cap=1)
    assert not ring.append(b"12")
    assert ring.dirty  # so the flusher gets to see the overflow
    assert flusher.flush() == 0
    assert sink.writes == []


def test_overflow_callback_errors_are_logged_and_do_not_stop_the_flush(
    impl: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    flusher = impl.Flusher()
    calls: list[str] = []

    def boom() -> None:
        calls.append("boom")
        raise RuntimeError("callback failed")

    before, after = Sink(), Sink()
    ring_before = impl.OutRing(flusher, before)
    bad = impl.OutRing(flusher, Sink(), cap=1, on_overflow=boom)
    bad2 = impl.OutRing(flusher, Sink(), cap=1, on_overflow=lambda: calls.append("second"))
    ring_after = impl.OutRing(flusher, after)
    ring_before.append(b"x")
    bad.append(b"too long")
    bad2.append(b"too long")
    ring_after.append(b"y")
    with caplog.at_level(logging.ERROR, logger="fastim"):
        assert flusher.flush() == 2
    assert calls == ["boom", "second"]
    assert before.writes == [b"x"]
    assert after.writes == [b"y"]
    assert any("callback failed" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert all(r.name.startswith("fastim") for r in caplog.records)


def test_rings_dirtied_during_a_flush_wait_for_the_next(impl: ModuleType) -> None:
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    early_sink = Sink()
    early = impl.OutRing(flusher, early_sink)

    def on_overflow() -> None:
        early.append(b"from callback")  # early was already flushed this tick

    over = impl.OutRing(flusher, Sink(), cap=1, on_overflow=on_overflow)
    early.append(b"first")
    over.append(b"xx")
    assert len(sched.calls) == 1
    assert flusher.flush() == 1
    assert early_sink.writes == [b"first"]
    assert flusher.pending == 1
    assert early.dirty
    assert len(sched.calls) == 2  # a new tick was asked for
    assert flusher.flush() == 1
    assert early_sink.writes == [b"first", b"from callback"]


def test_overflow_is_reported_once(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    calls: list[str] = []
    ring = impl.OutRing(flusher, Sink(), cap=2, on_overflow=lambda: calls.append("over"))
    assert not ring.append(b"abc")
    assert flusher.flush() == 0
    assert calls == ["over"]
    assert not ring.append(b"abc")  # already overflowed: the flusher was told
    assert not ring.dirty
    assert flusher.pending == 0
    assert flusher.flush() == 0
    assert calls == ["over"]
    assert ring.overflowed


def test_transport_write_errors_are_logged_and_do_not_stop_the_flush(
    impl: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise ConnectionResetError("gone")

    flusher = impl.Flusher()
    good = Sink()
    broken = impl.OutRing(flusher, Broken())
    ring = impl.OutRing(flusher, good)
    broken.append(b"lost")
    ring.append(b"kept")
    with caplog.at_level(logging.ERROR, logger="fastim"):
        assert flusher.flush() == 1
    assert good.writes == [b"kept"]
    assert flusher.writes == 1
    assert flusher.bytes_written == 4
    assert len(broken) == 0
    assert any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("fmt", [-1, 6, 1000])
def test_fmt_out_of_range_is_refused(impl: ModuleType, fmt: int) -> None:
    with pytest.raises(ValueError):
        impl.OutRing(None, Sink(), fmt=fmt)
    ring = impl.OutRing(None, Sink())
    # fmt may be read-only, or checked when set; it must never hold a bad value
    with pytest.raises((ValueError, AttributeError, TypeError)):
        ring.fmt = fmt
    assert ring.fmt == impl.FMT_TCP


def test_negative_cap_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.OutRing(None, Sink(), cap=-1)


def test_ring_without_flusher(impl: ModuleType) -> None:
    sink = Sink()
    ring = impl.OutRing(None, sink)
    assert ring.append(b"abc")
    assert ring.dirty
    assert ring.take() == b"abc"
    assert sink.writes == []


def test_large_payload_single_write(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    sink = Sink()
    ring = impl.OutRing(flusher, sink)
    chunk = bytes(range(256)) * 256  # 64 KiB
    for _ in range(40):
        assert ring.append(chunk)
    assert flusher.flush() == 1
    assert sink.writes == [chunk * 40]
    assert flusher.bytes_written == len(chunk) * 40


# ---------------------------------------------------------------- random op sequences

ring_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 40)),
        st.tuples(st.just("take"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("pause"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("resume"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
        st.tuples(st.just("run_scheduled"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def run_ring_ops(mod: ModuleType, ops: list[tuple[str, int, int]], caps: list[int]) -> list[object]:
    """Apply ``ops`` to a flusher with three rings; return everything observable."""
    log: list[tuple[str, bytes]] = []
    sched = Scheduler()
    flusher = mod.Flusher(sched)
    overflows: list[int] = []
    rings = [
        mod.OutRing(
            flusher,
            Sink(log, str(i)),
            cap=cap,
            on_overflow=lambda i=i: overflows.append(i),
        )
        for i, cap in enumerate(caps)
    ]
    seen: list[object] = []
    counter = 0
    for op, i, n in ops:
        ring = rings[i]
        if op == "append":
            counter += 1
            result: object = ring.append(bytes([counter % 256]) * n)
        elif op == "take":
            result = ring.take()
        elif op == "flush":
            result = flusher.flush()
        elif op == "run_scheduled":
            result = [cb() for cb in sched.calls]
            sched.calls.clear()
        else:
            result = getattr(ring, op)()
        state = [(len(r), r.dirty, r.paused, r.closed, r.overflowed) for r in rings]
        for r in rings:
            assert r.capacity >= len(r)
            if len(r) == 0 and not r.dirty:
                assert r.capacity == 0
        seen.append(
            (
                op,
                result,
                state,
                flusher.pending,
                flusher.writes,
                flusher.bytes_written,
                len(sched.calls),
                list(log),
                list(overflows),
            )
        )
    return seen


@SLOW
@given(ops=ring_ops, caps=st.lists(st.integers(0, 100), min_size=3, max_size=3))
def test_agree_on_ring_op_sequences(
    core: ModuleType, ref: ModuleType, ops: list[tuple[str, int, int]], caps: list[int]
) -> None:
    assert run_ring_ops(core, ops, caps) == run_ring_ops(ref, ops, caps)


@SLOW
@given(ops=ring_ops, caps=st.lists(st.integers(0, 100), min_size=3, max_size=3))
def test_ring_op_sequences_match_a_model(
    impl: ModuleType, ops: list[tuple[str, int, int]], caps: list[int]
) -> None:
    """Every byte a ring accepted comes out once, in order, unless the ring was closed."""
    log: list[tuple[str, bytes]] = []
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    rings = [impl.OutRing(flusher, Sink(log, str(i)), cap=cap) for i, cap in enumerate(caps)]
    pending = [b"", b"", b""]  # the model: what each ring holds
    closed = [False, False, False]
    for step, (op, i, n) in enumerate(ops):
        ring = rings[i]
        if op == "append":
            data = bytes([step % 256]) * n
            fits = len(pending[i]) + n <= caps[i]
            assert ring.append(data) == (not closed[i] and (n == 0 or fits))
            if not closed[i] and fits:
                pending[i] += data
        elif op == "take":
            assert ring.take() == pending[i]
            pending[i] = b""
        elif op == "close":
            ring.close()
            closed[i] = True
            pending[i] = b""
        elif op in ("flush", "run_scheduled"):
            log.clear()
            if op == "flush":
                flusher.flush()
            else:
                for callback in sched.calls:
                    callback()
                sched.calls.clear()
            for name, data in log:
                j = int(name)
                assert data == pending[j]  # all of it, in one write
                assert not (rings[j].paused or rings[j].overflowed or closed[j])
                pending[j] = b""
            assert len(log) == len({name for name, _ in log})
        else:
            getattr(ring, op)()
        assert [len(r) for r in rings] == [len(p) for p in pending]


# ---------------------------------------------------------------- HistoryRing


def test_history_basics(impl: ModuleType) -> None:
    h = impl.HistoryRing(3)
    assert h.capacity == 3
    assert (len(h), h.first_offset, h.last_offset) == (0, 0, 0)
    assert h.since(0) == []
    assert h.since(1) is None
    assert h.get(1) is None
    h.append(1, "a")
    h.append(2, "b")
    assert (len(h), h.first_offset, h.last_offset) == (2, 1, 2)
    assert h.since(0) == [(1, "a"), (2, "b")]
    assert h.since(1) == [(2, "b")]
    assert h.since(2) == []
    assert h.since(3) is None
    h.append(3, "c")
    h.append(4, "d")
    assert (len(h), h.first_offset, h.last_offset) == (3, 2, 4)
    assert h.get(1) is None
    assert h.get(2) == "b"
    assert h.get(4) == "d"
    assert h.get(5) is None
    assert h.since(0) is None  # message 1 was evicted
    assert h.since(1) == [(2, "b"), (3, "c"), (4, "d")]
    assert h.since(3) == [(4, "d")]


def test_history_starts_at_any_offset(impl: ModuleType) -> None:
    h = impl.HistoryRing(2)
    h.append(1000, "x")
    assert (h.first_offset, h.last_offset) == (1000, 1000)
    assert h.since(999) == [(1000, "x")]
    assert h.since(998) is None
    with pytest.raises(ValueError):
        h.append(1002, "gap")
    with pytest.raises(ValueError):
        h.append(1000, "again")
    h.append(1001, "y")
    assert h.since(999) == [(1000, "x"), (1001, "y")]


@pytest.mark.parametrize("offset", [0, -1])
def test_history_offsets_start_at_one(impl: ModuleType, offset: int) -> None:
    h = impl.HistoryRing(2)
    with pytest.raises((ValueError, OverflowError)):
        h.append(offset, "x")
    assert h.last_offset == 0
    assert len(h) == 0


def test_history_negative_capacity_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.HistoryRing(-1)


def test_history_keeps_object_identity(impl: ModuleType) -> None:
    h = impl.HistoryRing(2)
    item = object()
    h.append(1, item)
    assert h.get(1) is item
    assert h.since(0) == [(1, item)]


def test_history_capacity_zero(impl: ModuleType) -> None:
    h = impl.HistoryRing(0)
    assert h.since(0) == []
    h.append(1, "a")
    h.append(2, "b")
    assert (len(h), h.first_offset, h.last_offset) == (0, 0, 2)
    assert h.get(2) is None
    assert h.since(2) == []
    assert h.since(1) is None
    assert h.since(3) is None
    with pytest.raises(ValueError):
        h.append(4, "c")


def test_history_releases_evicted_items(impl: ModuleType) -> None:
    import gc
    import weakref

    class Item:
        pass

    h = impl.HistoryRing(2)
    first = Item()
    ref = weakref.ref(first)
    h.append(1, first)
    del first
    h.append(2, Item())
    h.append(3, Item())
    gc.collect()
    assert ref() is None


history_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(-1, 2)),  # offset = last + 1 + delta
        st.tuples(st.just("get"), st.integers(-8, 2)),  # offset = last + delta
        st.tuples(st.just("since"), st.integers(-8, 2)),
    ),
    max_size=50,
)


def run_history(
    mod: ModuleType, capacity: int, start: int, ops: list[tuple[str, int]]
) -> list[object]:
    h = mod.HistoryRing(capacity)
    out: list[object] = []
    for op, delta in ops:
        last = h.last_offset
        if op == "append":
            offset = (start if last == 0 else last + 1) + delta
            try:
                h.append(offset, f"m{offset}")
                result: object = "ok"
            except (ValueError, OverflowError) as exc:
                result = type(exc).__name__
        else:
            offset = max(last + delta, 0)
            result = getattr(h, op)(offset)
        out.append((op, result, len(h), h.first_offset, h.last_offset))
    return out


@SLOW
@given(capacity=st.integers(0, 6), start=st.integers(1, 5), ops=history_ops)
def test_agree_on_history_op_sequences(
    core: ModuleType, ref: ModuleType, capacity: int, start: int, ops: list[tuple[str, int]]
) -> None:
    assert run_history(core, capacity, start, ops) == run_history(ref, capacity, start, ops)


@SLOW
@given(capacity=st.integers(0, 6), start=st.integers(1, 5), ops=history_ops)
def test_history_matches_a_list_model(
    impl: ModuleType, capacity: int, start: int, ops: list[tuple[str, int]]
) -> None:
    h = impl.HistoryRing(capacity)
    appended: list[int] = []  # every offset ever appended
    for op, delta in ops:
        last = appended[-1] if appended else 0
        if op == "append":
            offset = (start if not appended else last + 1) + delta
            valid = offset >= 1 if not appended else delta == 0
            if valid:
                h.append(offset, f"m{offset}")
                appended.append(offset)
            else:
                with pytest.raises((ValueError, OverflowError)):
                    h.append(offset, "bad")
            continue
        kept = appended[-capacity:] if capacity else []
        first = kept[0] if kept else last + 1
        offset = max(last + delta, 0)
        assert len(h) == len(kept)
        assert h.last_offset == last
        assert h.first_offset == (kept[0] if kept else 0)
        if op == "get":
            assert h.get(offset) == (f"m{offset}" if offset in kept else None)
        elif offset > last or offset < first - 1:
            assert h.since(offset) is None
        else:
            assert h.since(offset) == [(o, f"m{o}") for o in kept if o > offset]


def test_on_flush_appends_into_the_same_write(impl: ModuleType) -> None:
    """on_flush runs while the ring is still dirty: its bytes leave in the same write,
    after what was queued (an SSE connection's event id follows its messages)."""
    flusher = impl.Flusher()
    sink = Sink()
    ring = impl.OutRing(flusher, sink)
    calls: list[int] = []

    def tail() -> None:
        calls.append(1)
        ring.append(b"|id")

    ring.on_flush = tail
    ring.append(b"msg")
    assert flusher.flush() == 1
    assert b"".join(sink.writes) == b"msg|id"
    assert calls == [1] and not ring.dirty and flusher.pending == 0
    assert flusher.flush() == 0 and calls == [1]  # nothing queued: not called
