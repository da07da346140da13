"""SubscriberSet: membership and batch fan-out into OutRings, on both impls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


class Scheduler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, callback: object) -> None:
        self.calls += 1


def test_formats(impl: ModuleType) -> None:
    assert (impl.FMT_TCP, impl.FMT_WS_BINARY, impl.FMT_WS_JSON, impl.N_FORMATS) == (0, 1, 2, 6)
    assert (impl.FMT_WS_BINARY_DEFLATE, impl.FMT_WS_JSON_DEFLATE, impl.FMT_SSE) == (3, 4, 5)


def test_fanout_covers_the_deflate_formats(impl: ModuleType) -> None:
    """Six formats: a ring takes frames[fmt]; short tuples mean None for the rest."""
    flusher = impl.Flusher()
    subs = impl.SubscriberSet()
    rings = [impl.OutRing(flusher, Sink(), fmt=f) for f in range(impl.N_FORMATS) for _ in "ab"]
    for r in rings:
        subs.add(r)
    assert [subs.count(f) for f in range(impl.N_FORMATS)] == [2] * impl.N_FORMATS
    assert subs.count(impl.N_FORMATS) == 0
    frames = (b"t", b"b", b"j", b"bz", b"jz", b"sse")
    assert subs.fanout(frames) == 12
    assert [r.take() for r in rings] == [f for f in frames for _ in "ab"]
    assert subs.fanout((b"t", None, b"j")) == 4  # the deflate formats get nothing
    assert [r.take() for r in rings] == [b"t", b"t", b"", b"", b"j", b"j"] + [b""] * 6
    assert subs.fanout((None, None, None, None, b"jz")) == 2
    assert [len(r) for r in rings] == [0] * 8 + [2, 2, 0, 0]


def test_add_remove_contains_count(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    a = impl.OutRing(None, Sink(), fmt=impl.FMT_TCP)
    b = impl.OutRing(None, Sink(), fmt=impl.FMT_WS_JSON)
    c = impl.OutRing(None, Sink(), fmt=impl.FMT_WS_JSON)
    assert len(subs) == 0
    assert a not in subs
    assert subs.add(a)
    assert not subs.add(a)
    assert subs.add(b)
    assert subs.add(c)
    assert len(subs) == 3
    assert a in subs and b in subs and c in subs
    assert "not a ring" not in subs
    assert [subs.count(f) for f in range(3)] == [1, 0, 2]
    assert set(subs.rings()) == {a, b, c}
    assert subs.remove(b)
    assert not subs.remove(b)
    assert b not in subs
    assert len(subs) == 2
    assert [subs.count(f) for f in range(3)] == [1, 0, 1]
    assert set(subs.rings()) == {a, c}
    assert subs.remove(a) and subs.remove(c)
    assert len(subs) == 0
    assert subs.rings() == []
    assert [subs.count(f) for f in range(3)] == [0, 0, 0]


def test_fanout_delivers_each_ring_its_format(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    subs = impl.SubscriberSet()
    sinks = [Sink() for _ in range(6)]
    rings = [impl.OutRing(flusher, s, fmt=i % 3) for i, s in enumerate(sinks)]
    for r in rings:
        subs.add(r)
    frames = (b"tcp-frame", b"ws-binary-frame", b'{"ws":"json"}')
    assert subs.fanout(frames) == 6
    assert subs.fanout((b"2", b"22", b"222")) == 6
    assert [len(r) for r in rings] == [len(frames[i % 3]) + 1 + i % 3 for i in range(6)]
    assert flusher.flush() == 6
    for i, sink in enumerate(sinks):
        assert sink.writes == [frames[i % 3] + [b"2", b"22", b"222"][i % 3]]


def test_fanout_skips_formats_without_a_frame(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    subs = impl.SubscriberSet()
    tcp = impl.OutRing(flusher, Sink(), fmt=impl.FMT_TCP)
    wsb = impl.OutRing(flusher, Sink(), fmt=impl.FMT_WS_BINARY)
    wsj = impl.OutRing(flusher, Sink(), fmt=impl.FMT_WS_JSON)
    for r in (tcp, wsb, wsj):
        subs.add(r)
    assert subs.fanout((b"t", None, b"j")) == 2
    assert (len(tcp), len(wsb), len(wsj)) == (1, 0, 1)
    assert not wsb.dirty
    assert flusher.pending == 2
    assert subs.fanout((None, None, None)) == 0
    assert flusher.pending == 2


def test_fanout_with_no_members(impl: ModuleType) -> None:
    assert impl.SubscriberSet().fanout((b"a", b"b", b"c")) == 0


def test_fanout_overflowed_ring_does_not_stop_the_others(impl: ModuleType) -> None:
    flusher = impl.Flusher()
    subs = impl.SubscriberSet()
    overflows: list[int] = []
    sinks = [Sink() for _ in range(5)]
    rings = [
        impl.OutRing(
            flusher,
            s,
            cap=3 if i == 2 else 1000,
            on_overflow=lambda i=i: overflows.append(i),
        )
        for i, s in enumerate(sinks)
    ]
    for r in rings:
        subs.add(r)
    assert subs.fanout((b"12", None, None)) == 5
    assert subs.fanout((b"34", None, None)) == 4
    assert rings[2].overflowed
    assert not any(r.overflowed for i, r in enumerate(rings) if i != 2)
    assert len(rings[2]) == 2
    assert flusher.flush() == 4
    assert overflows == [2]
    assert [s.writes for s in sinks] == [[b"1234"]] * 2 + [[]] + [[b"1234"]] * 2


def test_fanout_to_closed_ring_is_not_counted(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    live = impl.OutRing(None, Sink())
    dead = impl.OutRing(None, Sink())
    subs.add(live)
    subs.add(dead)
    dead.close()
    assert subs.fanout((b"x", None, None)) == 1
    assert len(live) == 1 and len(dead) == 0


def test_fanout_frames_must_be_bytes(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    subs.add(impl.OutRing(None, Sink()))
    with pytest.raises(TypeError):
        subs.fanout((bytearray(b"x"), None, None))


def test_removed_ring_gets_nothing(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    rings = [impl.OutRing(None, Sink()) for _ in range(10)]
    for r in rings:
        subs.add(r)
    for r in rings[::3]:
        subs.remove(r)
    assert subs.fanout((b"m", None, None)) == 6
    assert [len(r) for r in rings] == [0 if i % 3 == 0 else 1 for i in range(10)]


def test_changing_fmt_of_a_member_keeps_counts_consistent(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    ring = impl.OutRing(None, Sink(), fmt=impl.FMT_TCP)
    subs.add(ring)
    # a member's format is fixed: the set counts members per format
    with pytest.raises(ValueError, match="SubscriberSet"):
        ring.fmt = impl.FMT_WS_JSON
    assert ring.fmt == impl.FMT_TCP
    assert [subs.count(f) for f in range(3)] == [int(ring.fmt == f) for f in range(3)]
    assert subs.fanout((b"t", b"b", b"j")) == 1
    assert ring.take() == (b"t", b"b", b"j")[ring.fmt]
    assert subs.remove(ring)
    assert [subs.count(f) for f in range(3)] == [0, 0, 0]


def test_fmt_is_free_again_once_no_set_holds_the_ring(impl: ModuleType) -> None:
    ring = impl.OutRing(None, Sink())
    first, second = impl.SubscriberSet(), impl.SubscriberSet()
    first.add(ring)
    second.add(ring)
    ring.fmt = impl.FMT_TCP  # setting the same format is fine
    first.remove(ring)
    with pytest.raises(ValueError):
        ring.fmt = impl.FMT_WS_BINARY
    del second  # dropping the set releases its members
    ring.fmt = impl.FMT_WS_BINARY
    assert ring.fmt == impl.FMT_WS_BINARY


def test_thousand_rings_receive_in_order_with_one_write_per_tick(impl: ModuleType) -> None:
    sched = Scheduler()
    flusher = impl.Flusher(sched)
    subs = impl.SubscriberSet()
    sinks = [Sink() for _ in range(1000)]
    rings = [impl.OutRing(flusher, s, fmt=i % 3) for i, s in enumerate(sinks)]
    for r in rings:
        assert subs.add(r)
    assert [subs.count(f) for f in range(3)] == [334, 333, 333]
    messages = [tuple(f"{fmt}:{n};".encode() for fmt in range(3)) for n in range(5)]
    for frames in messages:
        assert subs.fanout(frames) == 1000
    assert sched.calls == 1
    assert flusher.pending == 1000
    assert flusher.flush() == 1000
    for i, sink in enumerate(sinks):
        assert sink.writes == [b"".join(m[i % 3] for m in messages)]
    # second tick
    assert subs.fanout((b"a", b"b", b"c")) == 1000
    assert sched.calls == 2
    assert flusher.flush() == 1000
    assert all(len(s.writes) == 2 and s.writes[1] == b"abc"[i % 3 : i % 3 + 1]
               for i, s in enumerate(sinks))  # fmt: skip
    assert flusher.writes == 2000


@SLOW
@given(
    ops=st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 11)), max_size=80),
    fmts=st.lists(st.integers(0, 2), min_size=12, max_size=12),
)
def test_membership_matches_a_set(
    impl: ModuleType, ops: list[tuple[str, int]], fmts: list[int]
) -> None:
    pool = [impl.OutRing(None, Sink(), fmt=f) for f in fmts]
    subs = impl.SubscriberSet()
    model: set[int] = set()
    for op, i in ops:
        if op == "add":
            assert subs.add(pool[i]) == (i not in model)
            model.add(i)
        else:
            assert subs.remove(pool[i]) == (i in model)
            model.discard(i)
        assert len(subs) == len(model)
        assert all((pool[j] in subs) == (j in model) for j in range(len(pool)))
        assert [subs.count(f) for f in range(3)] == [
            sum(1 for j in model if fmts[j] == f) for f in range(3)
        ]
        members = subs.rings()
        assert len(members) == len(model)
        assert {id(r) for r in members} == {id(pool[j]) for j in model}
    for r in pool:
        r.take()
    assert subs.fanout((b"0", b"1", b"2")) == len(model)
    assert [r.take() for r in pool] == [
        str(fmts[j]).encode() if j in model else b"" for j in range(len(pool))
    ]


# ---------------------------------------------------------------- memory safety
# Run in a child process: a bug here is a segfault, which must fail one test, not
# kill the whole run.

ROOT = Path(__file__).resolve().parents[2]

MUTATE_DURING_FANOUT = """
import importlib, sys
mod = importlib.import_module(sys.argv[1])
subs = mod.SubscriberSet()
rings = []

def schedule(callback):
    # runs inside fanout (first ring made dirty): empty the set under its feet
    for ring in subs.rings():
        subs.remove(ring)
    rings.clear()

flusher = mod.Flusher(schedule)
rings.extend(mod.OutRing(flusher, None) for _ in range(200))
for ring in rings:
    subs.add(ring)
del ring
try:
    subs.fanout((b"x", None, None))
except RuntimeError:
    pass
print("survived")
"""

OUT_OF_RANGE_FMT = """
import importlib, sys
mod = importlib.import_module(sys.argv[1])
for fmt in (3, 64, 1000, 1_000_000, -1, -100_000):
    subs = mod.SubscriberSet()
    ring = mod.OutRing(None, None, cap=1 << 60)
    try:
        ring.fmt = fmt
    except (ValueError, AttributeError, TypeError):
        pass
    try:
        subs.add(ring)
        subs.fanout((b"a", b"b", b"c"))
        subs.remove(ring)
    except (ValueError, IndexError):
        pass
print("survived")
"""


def run_child(impl: ModuleType, code: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code, impl.__name__],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def test_mutating_the_set_from_inside_fanout_does_not_crash(impl: ModuleType) -> None:
    child = run_child(impl, MUTATE_DURING_FANOUT)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert child.stdout.strip() == "survived"


def test_out_of_range_fmt_does_not_crash_fanout(impl: ModuleType) -> None:
    child = run_child(impl, OUT_OF_RANGE_FMT)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert child.stdout.strip() == "survived"
