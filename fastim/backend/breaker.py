"""A circuit breaker per proxy hook: fail fast while the backend is down, probe, recover.

The seed article's lesson (SEED.md, chapter on the logic layer): a dependency that is down
must not take every caller down with it. Without a breaker, each connect, subscribe or
publish waits ``proxy_timeout`` for a backend that will not answer, connections pile up
in that wait, and when the backend comes back it is hit by every retry at once. With
one, after ``failures`` consecutive failures the hook is *open*: requests fail at once
with BACKEND_UNAVAILABLE (120) for ``cooldown`` seconds; then it is *half open* and lets
exactly one probe request through; a success closes it, a failure opens it again for
another cooldown.

Consecutive failures rather than a failure ratio: a hook's traffic varies from one
request a minute to thousands a second, and "N in a row" needs no window to tune.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
HALF_OPEN = "half_open"
OPEN = "open"
#: the value of the ``fastim_proxy_breaker_state`` gauge per state
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    """Closed → (``failures`` in a row) → open → (``cooldown``) → half open → one probe."""

    __slots__ = ("_clock", "cooldown", "failures", "opened", "opened_at", "probing", "streak")

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self.streak = 0  # consecutive failures
        self.opened_at: float | None = None  # None: closed
        self.probing = False  # half open: the one probe request is out
        self.opened = 0  # times the breaker opened (a counter for /metrics)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self.probing or self._clock() - self.opened_at >= self.cooldown:
            return HALF_OPEN
        return OPEN

    def allow(self) -> bool:
        """May a request go to the backend now? (Half open: only the first asker.)"""
        if self.opened_at is None:
            return True
        if self.probing or self._clock() - self.opened_at < self.cooldown:
            return False
        self.probing = True  # this request is the probe
        return True

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self.opened_at))

    def success(self) -> None:
        self.streak = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.streak += 1
        if self.probing or (self.opened_at is None and self.streak >= self.failures):
            self.opened += 1
            self.opened_at = self._clock()  # open (again, after a failed probe): a cooldown
            self.probing = False
