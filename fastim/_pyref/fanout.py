"""Batch fan-out, the readable way: a channel's subscriber rings, one append each.

Reference twin of the fan-out part of ``fastim._core``.
"""

from __future__ import annotations

from .formats import FMT_SSE as FMT_SSE
from .formats import FMT_TCP as FMT_TCP
from .formats import FMT_WS_BINARY as FMT_WS_BINARY
from .formats import FMT_WS_BINARY_DEFLATE as FMT_WS_BINARY_DEFLATE
from .formats import FMT_WS_JSON as FMT_WS_JSON
from .formats import FMT_WS_JSON_DEFLATE as FMT_WS_JSON_DEFLATE
from .formats import N_FORMATS as N_FORMATS
from .ring import OutRing


class SubscriberSet:
    """The subscribers of one channel (a dict here; a C array in the compiled core)."""

    def __init__(self) -> None:
        self._rings: dict[OutRing, None] = {}

    def add(self, ring: OutRing) -> bool:
        """False if already present."""
        if ring in self._rings:
            return False
        self._rings[ring] = None
        ring._nsets += 1
        return True

    def remove(self, ring: OutRing) -> bool:
        """False if absent."""
        if ring not in self._rings:
            return False
        del self._rings[ring]
        ring._nsets -= 1
        return True

    def __del__(self) -> None:
        for ring in self._rings:  # a dropped set no longer pins its members' fmt
            ring._nsets -= 1

    def __len__(self) -> int:
        return len(self._rings)

    def __contains__(self, ring: object) -> bool:
        return ring in self._rings

    def count(self, fmt: int) -> int:
        """Members whose ring takes format ``fmt``."""
        return sum(1 for ring in self._rings if ring.fmt == fmt)

    def fanout(self, frames: tuple[bytes | None, ...]) -> int:
        """Append ``frames[ring.fmt]`` to every member's ring; return the deliveries.

        Members whose frame is None (or missing from a short tuple) are skipped; a ring
        over its cap refuses the append and marks itself overflowed (its flusher then
        calls ``on_overflow``).
        """
        if any(frame is not None and type(frame) is not bytes for frame in frames[:N_FORMATS]):
            raise TypeError("frames must be bytes or None")
        delivered = 0
        for ring in self._rings:
            frame = frames[ring.fmt] if ring.fmt < len(frames) else None
            if frame is not None and ring.append(frame):
                delivered += 1
        return delivered

    def rings(self) -> list[OutRing]:
        return list(self._rings)
