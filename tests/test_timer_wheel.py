"""The shared timer wheel: deadlines fire once, in time, for many items, with no Timer each.

Driven by a fake clock: the wheel is not started, the test moves the clock and calls
``advance()`` (what each tick of a started wheel does), so every check is exact and
nothing sleeps. The resolution is a power of two, so tick times are exact floats.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import pytest

from fastim.heartbeat import TimerWheel

RES = 0.25
T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


Log = list[tuple[str, float]]


class Item:
    """A timed item that records when it fired (in its own list and in a shared log)."""

    def __init__(
        self,
        name: str,
        log: Log | None = None,
        again: Callable[[float], float | None] | None = None,
    ) -> None:
        self.name = name
        self.wheel_tick = -1
        self.fired: list[float] = []
        self.log = log
        self.again = again

    def on_deadline(self, now: float) -> float | None:
        self.fired.append(now)
        if self.log is not None:
            self.log.append((self.name, now))
        return self.again(now) if self.again is not None else None


def at(tick: int) -> float:
    """The clock's time at the wheel's ``tick``."""
    return T0 + tick * RES


def make(
    slots: int = 8, on_tick: Callable[[float], object] | None = None
) -> tuple[TimerWheel, Clock]:
    """A wheel on a fake clock, never started (so its loop is never used)."""
    clock = Clock()
    loop = asyncio.new_event_loop()
    loop.close()
    wheel = TimerWheel(loop, resolution=RES, slots=slots, on_tick=on_tick, clock=clock)
    return wheel, clock


def tick_to(wheel: TimerWheel, clock: Clock, tick: int) -> None:
    """Move the clock to ``tick`` and run that one tick (as a wheel on time does)."""
    clock.t = at(tick)
    assert wheel.advance() == clock.t
    assert wheel.now == clock.t


def run_ticks(wheel: TimerWheel, clock: Clock, first: int, last: int) -> None:
    for tick in range(first, last + 1):
        tick_to(wheel, clock, tick)


# ---------------------------------------------------------------------------- scheduling


def test_a_deadline_fires_once_at_the_first_tick_not_before_it() -> None:
    wheel, clock = make()
    assert wheel.now == T0 and len(wheel) == 0
    between = Item("between")  # 1.1 s: between ticks 4 (1.0 s) and 5 (1.25 s)
    on_tick = Item("on a tick")  # exactly tick 4
    wheel.schedule(between, T0 + 1.1)
    wheel.schedule(on_tick, at(4))
    assert len(wheel) == 2
    run_ticks(wheel, clock, 1, 3)
    assert between.fired == [] and on_tick.fired == []
    tick_to(wheel, clock, 4)
    assert between.fired == [] and on_tick.fired == [at(4)]
    tick_to(wheel, clock, 5)
    assert between.fired == [at(5)]
    assert len(wheel) == 0 and between.wheel_tick == on_tick.wheel_tick == -1
    run_ticks(wheel, clock, 6, 30)  # more than three laps: nothing fires again
    assert between.fired == [at(5)] and on_tick.fired == [at(4)]


def test_a_deadline_already_past_fires_at_the_next_tick() -> None:
    wheel, clock = make()
    run_ticks(wheel, clock, 1, 10)
    late, now = Item("late"), Item("now")
    wheel.schedule(late, T0)  # ten ticks ago
    wheel.schedule(now, wheel.now)
    run_ticks(wheel, clock, 11, 11)
    assert late.fired == [at(11)] and now.fired == [at(11)]
    assert len(wheel) == 0


def test_a_late_tick_fires_with_the_clocks_time() -> None:
    wheel, clock = make()
    it = Item("it")
    wheel.schedule(it, at(2))
    clock.t = at(2) + 0.1  # the loop ran the tick a little late
    assert wheel.advance() == at(2) + 0.1
    assert it.fired == [at(2) + 0.1] and wheel.now == at(2) + 0.1


def test_deadlines_past_the_wheels_span_wait_for_their_lap() -> None:
    # 8 slots of 0.25 s: the wheel spans 2 s. Ticks 3, 11, 19 and 43 share slot 3.
    wheel, clock = make(slots=8)
    log: Log = []
    items = {tick: Item(f"t{tick}", log) for tick in (3, 11, 19, 43, 100)}
    for tick, it in items.items():
        wheel.schedule(it, at(tick))
    for tick in range(1, 101):
        tick_to(wheel, clock, tick)
        fired_now = [name for name, t in log if t == at(tick)]
        assert fired_now == ([f"t{tick}"] if tick in items else []), tick
        assert len(wheel) == len([t for t in items if t > tick])
    for tick, it in items.items():
        assert it.fired == [at(tick)]


def test_many_timers_in_one_slot() -> None:
    wheel, clock = make(slots=8)
    now = [Item(f"now{k}") for k in range(1000)]
    next_lap = [Item(f"lap{k}") for k in range(500)]  # the same slot, one lap later
    for it in now:
        wheel.schedule(it, at(5))
    for it in next_lap:
        wheel.schedule(it, at(5 + 8))
    assert len(wheel) == 1500
    run_ticks(wheel, clock, 1, 4)
    assert not any(it.fired for it in now + next_lap)
    tick_to(wheel, clock, 5)
    assert all(it.fired == [at(5)] for it in now)
    assert not any(it.fired for it in next_lap)
    assert len(wheel) == 500
    run_ticks(wheel, clock, 6, 13)
    assert all(it.fired == [at(5)] for it in now)
    assert all(it.fired == [at(13)] for it in next_lap)
    assert len(wheel) == 0


def test_deadlines_fire_in_deadline_order_whatever_the_order_of_scheduling() -> None:
    wheel, clock = make(slots=16)
    log: Log = []
    rng = random.Random(7)
    deadlines = {f"i{k}": T0 + rng.uniform(0.0, 12.0) for k in range(300)}  # six laps
    names = list(deadlines)
    rng.shuffle(names)
    for name in names:
        wheel.schedule(Item(name, log), deadlines[name])
    run_ticks(wheel, clock, 1, 49)
    assert sorted(name for name, _ in log) == sorted(deadlines)  # each once
    for name, fired in log:
        # at the first tick at or after its deadline
        assert deadlines[name] <= fired < deadlines[name] + RES, name
    # ticks in order (the order within one tick is not specified)
    assert [t for _, t in log] == sorted(t for _, t in log)


# ---------------------------------------------------------------------- reschedule, cancel


def test_reschedule_replaces_the_earlier_filing() -> None:
    wheel, clock = make(slots=8)
    later, earlier, same = Item("later"), Item("earlier"), Item("same")
    wheel.schedule(later, at(2))
    wheel.schedule(later, at(20))  # moved later, past the span
    wheel.schedule(earlier, at(6))
    wheel.schedule(earlier, at(3))  # moved earlier
    wheel.schedule(same, at(4))
    wheel.schedule(same, at(4) - 0.1)  # the same tick: nothing changes
    assert len(wheel) == 3
    run_ticks(wheel, clock, 1, 30)
    assert later.fired == [at(20)]
    assert earlier.fired == [at(3)]
    assert same.fired == [at(4)]
    assert len(wheel) == 0
    # filed again after it fired
    wheel.schedule(earlier, at(32))
    assert len(wheel) == 1
    run_ticks(wheel, clock, 31, 32)
    assert earlier.fired == [at(3), at(32)] and len(wheel) == 0


def test_cancel_removes_and_is_idempotent() -> None:
    wheel, clock = make(slots=8)
    a, b, never = Item("a"), Item("b"), Item("never")
    wheel.schedule(a, at(2))
    wheel.schedule(b, at(2))
    wheel.cancel(a)
    wheel.cancel(a)  # twice: no-op
    wheel.cancel(never)  # never filed: no-op
    assert len(wheel) == 1 and a.wheel_tick == -1
    run_ticks(wheel, clock, 1, 20)
    assert a.fired == [] and never.fired == [] and b.fired == [at(2)]
    assert len(wheel) == 0
    wheel.cancel(b)  # after it fired: no-op
    assert len(wheel) == 0
    # cancelled, then filed again
    wheel.schedule(a, at(25))
    wheel.cancel(a)
    wheel.schedule(a, at(27))
    run_ticks(wheel, clock, 21, 40)
    assert a.fired == [at(27)] and len(wheel) == 0


def test_the_handlers_return_value_rearms_it() -> None:
    wheel, clock = make(slots=8)

    def three_times(it: Item) -> Callable[[float], float | None]:
        return lambda now: now + 0.6 if len(it.fired) < 3 else None

    again = Item("again")
    again.again = three_times(again)
    wheel.schedule(again, at(1))
    # a handler that files itself and returns None stays filed where it put itself

    def refile(now: float) -> None:
        if len(itself.fired) == 1:
            wheel.schedule(itself, now + 2.0)

    itself = Item("itself", again=refile)
    wheel.schedule(itself, at(1))

    # ... and its own filing wins over a deadline it also returns
    def refile_and_return(now: float) -> float | None:
        if len(both.fired) == 1:
            wheel.schedule(both, now + 2.0)
            return now + 0.5
        return None

    both = Item("both", again=refile_and_return)
    wheel.schedule(both, at(1))
    run_ticks(wheel, clock, 1, 20)
    # 0.6 s after each: ceil to the next tick, 3 ticks later
    assert again.fired == [at(1), at(4), at(7)]
    assert itself.fired == [at(1), at(9)]
    assert both.fired == [at(1), at(9)]
    assert len(wheel) == 0


def test_a_failing_handler_is_logged_and_the_others_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wheel, clock = make(slots=8)

    def boom(now: float) -> float | None:
        raise RuntimeError("boom")

    bad = Item("bad", again=boom)
    good = [Item(f"g{k}") for k in range(10)]
    wheel.schedule(bad, at(3))
    for it in good:
        wheel.schedule(it, at(3))
    with caplog.at_level(logging.ERROR, logger="fastim"):
        run_ticks(wheel, clock, 1, 12)
    assert bad.fired == [at(3)]  # once: dropped, not re-armed
    assert all(it.fired == [at(3)] for it in good)
    assert len(wheel) == 0
    assert [r.getMessage() for r in caplog.records] == ["fastim: deadline handler failed"]


# ---------------------------------------------------------------- catching up, on_tick


def test_a_late_tick_catches_up_in_order() -> None:
    wheel, clock = make(slots=8)
    log: Log = []
    rng = random.Random(3)
    ticks = [rng.randint(1, 7) for _ in range(100)]
    for k, tick in enumerate(ticks):
        wheel.schedule(Item(f"i{k}", log), at(tick))
    clock.t = at(7) + 0.1  # the loop was busy for most of a lap: one advance
    wheel.advance()
    assert sorted(name for name, _ in log) == sorted(f"i{k}" for k in range(100))
    assert {t for _, t in log} == {at(7) + 0.1}  # all now, each once
    fired_ticks = [ticks[int(name[1:])] for name, _ in log]
    assert fired_ticks == sorted(fired_ticks)  # the missed ticks in order
    assert len(wheel) == 0


def test_a_loop_stalled_for_laps_fires_everything_due_once_and_nothing_early() -> None:
    wheel, clock = make(slots=4)
    items = [Item(f"i{k}") for k in range(20)]
    for k, it in enumerate(items):
        wheel.schedule(it, at(k + 1))  # ticks 1..20: five laps of 4 slots
    far = Item("far")
    wheel.schedule(far, at(40))
    clock.t = at(30) + 0.1  # blocked for 30 ticks: the last lap's slots hold them all
    wheel.advance()
    assert all(it.fired == [at(30) + 0.1] for it in items)
    assert far.fired == [] and len(wheel) == 1  # not early: its lap has not come
    run_ticks(wheel, clock, 31, 39)
    assert far.fired == [] and all(len(it.fired) == 1 for it in items)
    tick_to(wheel, clock, 40)
    assert far.fired == [at(40)] and len(wheel) == 0


def test_on_tick_gets_each_ticks_time_and_its_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks: list[float] = []

    def on_tick(now: float) -> None:
        ticks.append(now)
        if len(ticks) == 2:
            raise RuntimeError("periodic")

    wheel, clock = make(on_tick=on_tick)
    it = Item("it")
    wheel.schedule(it, at(3))
    with caplog.at_level(logging.ERROR, logger="fastim"):
        run_ticks(wheel, clock, 1, 4)
    assert ticks == [at(1), at(2), at(3), at(4)]
    assert it.fired == [at(3)]
    assert [r.getMessage() for r in caplog.records] == ["fastim: periodic task failed"]


# ------------------------------------------------------------------- the started wheel


async def test_a_started_wheel_ticks_on_the_loops_clock() -> None:
    """Without a clock: the loop's time, ticks by ``call_later`` (no fake here, no sleep:
    the test waits for the deadline's own event)."""
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.01, slots=8)
    fired = asyncio.Event()

    class Waker(Item):
        def on_deadline(self, now: float) -> float | None:
            fired.set()
            return super().on_deadline(now)

    it = Waker("it")
    deadline = loop.time() + 0.05
    wheel.schedule(it, deadline)
    wheel.start()
    wheel.start()  # idempotent: one chain of ticks
    try:
        await asyncio.wait_for(fired.wait(), 10)
    finally:
        wheel.stop()
    assert len(it.fired) == 1 and it.fired[0] >= deadline
    assert wheel.now >= deadline and len(wheel) == 0
    wheel.stop()  # idempotent
