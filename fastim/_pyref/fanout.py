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
        #: member -> takes the alternate frames of fanout (a delta subscriber in sync)
        self._rings: dict[OutRing, bool] = {}

    def add(self, ring: OutRing) -> bool:
        """False if already present."""
        if ring in self._rings:
            return False
        self._rings[ring] = False
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

    def set_alt(self, ring: OutRing, on: bool = True) -> bool:
        """Mark a member as taking ``fanout``'s ``alt`` frames; False if not a member."""
        if ring not in self._rings:
            return False
        self._rings[ring] = bool(on)
        return True

    def is_alt(self, ring: object) -> bool:
        return bool(self._rings.get(ring, False))  # type: ignore[call-overload]

    def alt_count(self, fmt: int = -1) -> int:
        """Members marked alt (of format ``fmt``; every format for -1)."""
        return sum(1 for r, a in self._rings.items() if a and (fmt < 0 or r.fmt == fmt))

    def fanout(
        self, frames: tuple[bytes | None, ...], alt: tuple[bytes | None, ...] | None = None
    ) -> int:
        """Append ``frames[ring.fmt]`` to every member's ring; return the deliveries.

        Members whose frame is None (or missing from a short tuple) are skipped; a ring
        over its cap refuses the append and marks itself overflowed (its flusher then
        calls ``on_overflow``). With ``alt``, members marked alt take ``alt[ring.fmt]``
        instead, or ``frames[ring.fmt]`` where that is None.
        """
        for tup in (frames, alt or ()):
            if any(f is not None and type(f) is not bytes for f in tup[:N_FORMATS]):
                raise TypeError("frames must be bytes or None")
        delivered = 0
        for ring, is_alt in self._rings.items():
            frame = frames[ring.fmt] if ring.fmt < len(frames) else None
            if is_alt and alt is not None and ring.fmt < len(alt) and alt[ring.fmt] is not None:
                frame = alt[ring.fmt]
            if frame is not None and ring.append(frame):
                delivered += 1
        return delivered

    def rings(self) -> list[OutRing]:
        return list(self._rings)
