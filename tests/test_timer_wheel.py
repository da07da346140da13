"""The shared timer wheel: deadlines fire once, in time, for many items, with no Timer each."""

from __future__ import annotations

import asyncio

from fastim.heartbeat import TimerWheel


class Item:
    def __init__(self, name: str, again: float | None = None) -> None:
        self.name = name
        self.wheel_tick = -1
        self.fired: list[float] = []
        self.again = again

    def on_deadline(self, now: float) -> float | None:
        self.fired.append(now)
        if self.again is not None and len(self.fired) < 3:
            return now + self.again
        return None


async def test_deadlines_fire_once_and_in_order() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.02, slots=8)
    wheel.start()
    t0 = loop.time()
    items = [Item(f"i{k}") for k in range(50)]
    for k, it in enumerate(items):
        wheel.schedule(it, t0 + 0.02 * (k % 10))
    assert len(wheel) == 50
    await asyncio.sleep(0.5)  # longer than one lap of 8 slots x 20 ms: wrapping is exercised
    wheel.stop()
    for k, it in enumerate(items):
        assert len(it.fired) == 1, it.name
        assert it.fired[0] >= t0 + 0.02 * (k % 10) - 1e-6
    assert len(wheel) == 0


async def test_reschedule_replaces_and_cancel_removes() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.02, slots=16)
    wheel.start()
    a, b, c = Item("a"), Item("b", again=0.05), Item("c")
    now = loop.time()
    wheel.schedule(a, now + 0.05)
    wheel.schedule(a, now + 0.2)  # moved later
    wheel.schedule(b, now + 0.02)
    wheel.schedule(c, now + 0.05)
    wheel.cancel(c)
    assert len(wheel) == 2
    await asyncio.sleep(0.1)
    assert a.fired == []  # not at its first deadline
    await asyncio.sleep(0.3)
    wheel.stop()
    assert len(a.fired) == 1 and a.fired[0] >= now + 0.2 - 1e-6
    assert len(b.fired) == 3  # re-armed by its own return value, twice
    assert c.fired == []


async def test_a_stalled_loop_catches_up() -> None:
    import time

    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.01, slots=4)
    wheel.start()
    items = [Item(str(k)) for k in range(20)]
    now = loop.time()
    for k, it in enumerate(items):
        wheel.schedule(it, now + 0.01 * k)
    time.sleep(0.3)  # noqa: ASYNC251 - block the loop on purpose, for many laps
    await asyncio.sleep(0.05)
    wheel.stop()
    assert all(len(it.fired) == 1 for it in items)
