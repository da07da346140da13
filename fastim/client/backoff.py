"""Reconnect delays: exponential backoff with jitter."""

from __future__ import annotations

import random
from typing import Literal

__all__ = ["Backoff", "Jitter"]

Jitter = Literal["full", "equal", "none"]


class Backoff:
    """Exponential backoff with jitter, for the delay before each reconnect attempt.

    Attempt *n* (counting from 0 since the last :meth:`reset`) has the ceiling
    ``min(max, base * factor ** n)``; the delay drawn for it is

    * ``jitter="full"`` (the default): uniform in ``[0, ceiling]`` (spreads a crowd of
      clients that lost the same server over the whole window: no thundering herd),
    * ``jitter="equal"``: uniform in ``[ceiling / 2, ceiling]``,
    * ``jitter="none"``: exactly ``ceiling``.

    A Backoff is stateful: give each client its own.

    Args:
        base: ceiling of the first attempt, in seconds (> 0).
        factor: growth of the ceiling per attempt (>= 1).
        max: cap on the ceiling, in seconds (>= base).
        jitter: ``"full"``, ``"equal"`` or ``"none"``.
        rng: source of randomness (a seeded ``random.Random`` for reproducible tests).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        base: float = 0.1,
        factor: float = 2.0,
        max: float = 10.0,
        jitter: Jitter = "full",
        rng: random.Random | None = None,
    ) -> None:
        if not base > 0:
            raise ValueError(f"base must be > 0, got {base}")
        if not factor >= 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not max >= base:
            raise ValueError(f"max must be >= base, got max={max} base={base}")
        if jitter not in ("full", "equal", "none"):
            raise ValueError(f"jitter must be 'full', 'equal' or 'none', got {jitter!r}")
        self.base = float(base)
        self.factor = float(factor)
        self.max = float(max)
        self.jitter: Jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempts = 0
        self._ceiling = self.base

    @property
    def attempts(self) -> int:
        """Delays drawn since the last reset."""
        return self._attempts

    def ceiling(self) -> float:
        """The upper bound of the delay :meth:`next` will draw next."""
        return self._ceiling

    def next(self) -> float:
        """Draw the delay before the next attempt and advance.

        Returns:
            Seconds to wait, in ``[0, max]``.
        """
        cap = self._ceiling
        self._attempts += 1
        self._ceiling = min(self.max, cap * self.factor)
        if self.jitter == "full":
            return self._rng.uniform(0.0, cap)
        if self.jitter == "equal":
            return cap / 2 + self._rng.uniform(0.0, cap / 2)
        return cap

    def reset(self) -> None:
        """Start over from ``base`` (after a successful connect)."""
        self._attempts = 0
        self._ceiling = self.base

    def __repr__(self) -> str:
        return (
            f"Backoff(base={self.base}, factor={self.factor}, max={self.max}, "
            f"jitter={self.jitter!r}, attempts={self._attempts})"
        )
