"""One shared timer for every connection: a hashed timer wheel.

A Timer (or a Task) per connection costs memory and loop work for each of 100k idle
clients. Instead each session carries one deadline, and the wheel keeps sessions in
slots by deadline tick. One ``call_later`` chain ticks the wheel; a tick looks only at
the slot that is due, so the cost follows the number of deadlines that expire, not the
number of connections held.

What a deadline means is up to the session (``on_deadline``): ping an idle client,
close one that missed its pong, drop one that never finished its handshake or its
close handshake. Liveness is cheap to record: ``session.last_rx = wheel.now`` (a float
the wheel refreshes once per tick).

Time is the loop's (``loop.time()``) unless a ``clock`` is given: a test passes a fake
one, leaves the wheel unstarted and calls :meth:`TimerWheel.advance` itself after moving
the clock, so deadlines fire deterministically without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("fastim")


class Timed(Protocol):
    """What the wheel needs from a session."""

    wheel_tick: int  # the tick this session is filed under (-1: not filed)

    def on_deadline(self, now: float) -> float | None:
        """Called when the deadline passes; return the next deadline, or None to drop."""


class TimerWheel:
    """Deadlines at a resolution of ``resolution`` seconds, for any number of sessions."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        resolution: float = 0.25,
        slots: int = 512,
        on_tick: Callable[[float], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._loop = loop
        self._clock = loop.time if clock is None else clock
        self.resolution = resolution
        self._slots: list[set[Timed]] = [set() for _ in range(slots)]
        self._nslots = slots
        self._start = self._clock()
        self._tick = 0
        self.now = self._start
        self._handle: asyncio.TimerHandle | None = None
        self._on_tick = on_tick
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self.resolution, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick_of(self, deadline: float) -> int:
        t = math.ceil((deadline - self._start) / self.resolution)
        return max(t, self._tick + 1)

    def schedule(self, item: Timed, deadline: float) -> None:
        """File ``item`` to fire at ``deadline`` (loop time), replacing any earlier filing."""
        tick = self._tick_of(deadline)
        old = item.wheel_tick
        if old == tick:
            return
        if old >= 0:
            self._slots[old % self._nslots].discard(item)
        else:
            self._count += 1
        item.wheel_tick = tick
        self._slots[tick % self._nslots].add(item)

    def cancel(self, item: Timed) -> None:
        if item.wheel_tick >= 0:
            self._slots[item.wheel_tick % self._nslots].discard(item)
            item.wheel_tick = -1
            self._count -= 1

    def _run(self) -> None:
        self._handle = None
        self.advance()
        self._handle = self._loop.call_later(self.resolution, self._run)

    def advance(self) -> float:
        """One tick: fire what is due by the clock's time, run ``on_tick``; return the time.

        The started wheel calls it every ``resolution`` seconds; with a fake clock (and the
        wheel not started) the caller does, after moving the clock.
        """
        now = self._clock()
        self.now = now
        target = int((now - self._start) / self.resolution)
        # catch up every tick up to now (the loop may have been busy), at most one lap
        first = max(self._tick + 1, target - self._nslots + 1)
        for tick in range(first, target + 1):
            self._fire(tick, now)
        self._tick = max(self._tick, target)
        if self._on_tick is not None:
            try:
                self._on_tick(now)
            except Exception:
                log.exception("fastim: periodic task failed")
        return now

    def _fire(self, tick: int, now: float) -> None:
        slot = self._slots[tick % self._nslots]
        if not slot:
            return
        due = [item for item in slot if item.wheel_tick <= tick]
        for item in due:
            slot.discard(item)
            item.wheel_tick = -1
            self._count -= 1
        for item in due:
            try:
                nxt = item.on_deadline(now)
            except Exception:
                log.exception("fastim: deadline handler failed")
                continue
            if nxt is not None and item.wheel_tick < 0:
                self.schedule(item, nxt)
