"""Outbound buffers and channel history, the readable way.

Reference twin of the ring-buffer part of ``fastim._core``: :class:`OutRing` (a
connection's pending output, capped), :class:`Flusher` (one write per dirty ring per
event-loop tick) and :class:`HistoryRing` (the last messages of a channel, by offset).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from typing_extensions import Buffer

from .formats import FMT_TCP, N_FORMATS

DEFAULT_RING_CAP = 4 * 1024 * 1024

log = logging.getLogger("fastim")


class OutRing:
    """A connection's outbound bytes, capped at ``cap``, drained by its :class:`Flusher`."""

    def __init__(
        self,
        flusher: Flusher | None,
        transport: Any,
        fmt: int = FMT_TCP,
        cap: int = DEFAULT_RING_CAP,
        on_overflow: Callable[[], object] | None = None,
    ) -> None:
        if cap < 0:
            raise ValueError("cap must be >= 0")
        self._nsets = 0  # SubscriberSets holding this ring: its fmt is fixed meanwhile
        self._fmt: int = FMT_TCP
        self.fmt = fmt
        self.cap = cap
        self.transport = transport
        self.on_overflow = on_overflow
        #: None, or called by a flush before it writes this ring (an SSE connection's
        #: event id, which must follow the messages it covers, in the same write)
        self.on_flush: Callable[[], object] | None = None
        self._flusher = flusher
        self._data = bytearray()
        self._dirty = False
        self._paused = False
        self._closed = False
        self._overflowed = False

    @property
    def fmt(self) -> int:
        """Which of the pre-encoded frames of a fan-out this ring takes (FMT_*)."""
        return self._fmt

    @fmt.setter
    def fmt(self, fmt: int) -> None:
        if not 0 <= fmt < N_FORMATS:
            raise ValueError(f"fmt must be 0..{N_FORMATS - 1}, got {fmt}")
        if self._nsets and fmt != self._fmt:
            raise ValueError("cannot change fmt while the ring is in a SubscriberSet")
        self._fmt = fmt

    def append(self, data: Buffer) -> bool:
        """Queue ``data``; False (storing nothing) if closed or if it would pass ``cap``.

        The append that first passes the cap sets ``overflowed`` and makes the ring
        dirty, so that the next flush calls ``on_overflow``.
        """
        if self._closed:
            return False
        size = memoryview(data).nbytes
        if size == 0:
            return True
        if len(self._data) + size > self.cap:
            if not self._overflowed:
                self._overflowed = True
                self._mark_dirty()
            return False
        self._data += data
        self._mark_dirty()
        return True

    def take(self) -> bytes:
        """All pending bytes, in order; empties the ring."""
        data = bytes(self._data)
        self._data = bytearray()
        return data

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._data:
            self._mark_dirty()

    def close(self) -> None:
        """Drop pending bytes; later appends are ignored (return False)."""
        self._closed = True
        self._data = bytearray()

    def _mark_dirty(self) -> None:
        if self._dirty:
            return
        self._dirty = True
        if self._flusher is not None:
            self._flusher._enqueue(self)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def capacity(self) -> int:
        """Bytes allocated now (0 when idle); the reference reports what it holds."""
        return len(self._data)

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def overflowed(self) -> bool:
        return self._overflowed


class Flusher:
    """Drains every dirty OutRing once per event-loop tick (one write per ring)."""

    def __init__(self, schedule: Callable[[Callable[[], object]], object] | None = None) -> None:
        self._schedule = schedule
        self._scheduled = False  # a flush was asked for and has not run yet
        self._dirty: list[OutRing] = []
        self.writes = 0
        self.bytes_written = 0

    def _enqueue(self, ring: OutRing) -> None:
        self._dirty.append(ring)
        if not self._scheduled and self._schedule is not None:
            self._scheduled = True
            try:
                self._schedule(self.flush)
            except Exception:
                self._scheduled = False  # the next dirty ring tries again
                log.exception("could not schedule a flush")

    @property
    def pending(self) -> int:
        """Rings waiting for the next flush."""
        return len(self._dirty)

    def flush(self) -> int:
        """Write every dirty ring, oldest dirty first; return how many writes were made.

        Rings that become dirty while this runs (say, from an ``on_overflow``
        callback) wait for the next flush. Exceptions from ``on_overflow`` or
        ``transport.write`` are logged and do not stop the other rings.
        """
        rings, self._dirty = self._dirty, []
        self._scheduled = False
        writes = 0
        for ring in rings:
            if (
                ring.on_flush is not None
                and len(ring._data)
                and not (ring.closed or ring.overflowed or ring.paused)
            ):
                try:  # still dirty: what it appends leaves in this write
                    ring.on_flush()
                except Exception:
                    log.exception("on_flush callback failed")
            ring._dirty = False
            if ring.closed:
                continue
            if ring.overflowed:
                if ring.on_overflow is not None:
                    try:
                        ring.on_overflow()
                    except Exception:
                        log.exception("on_overflow callback failed")
                continue
            if ring.paused:
                continue  # resume() makes it dirty again
            data = ring.take()
            if not data:
                continue
            try:
                ring.transport.write(data)
            except Exception:
                log.exception("transport.write failed")
            else:
                writes += 1
                self.bytes_written += len(data)
        self.writes += writes
        return writes


class HistoryRing:
    """The last ``capacity`` messages of a channel, addressable by offset."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: deque[object] = deque(maxlen=capacity)
        self._last = 0

    def append(self, offset: int, item: object) -> None:
        """Raises ValueError unless offset == last_offset + 1 (any offset >= 1 at first)."""
        if self._last == 0 and offset < 1:
            raise ValueError(f"offsets start at 1, got {offset}")
        if self._last != 0 and offset != self._last + 1:
            raise ValueError(f"expected offset {self._last + 1}, got {offset}")
        self._items.append(item)
        self._last = offset

    def __len__(self) -> int:
        return len(self._items)

    @property
    def first_offset(self) -> int:
        """Offset of the oldest message kept (0 when empty)."""
        return self._last - len(self._items) + 1 if self._items else 0

    @property
    def last_offset(self) -> int:
        """Offset of the newest message appended (0 when nothing ever was)."""
        return self._last

    def get(self, offset: int) -> object | None:
        first = self._last - len(self._items) + 1
        if not self._items or not first <= offset <= self._last:
            return None
        return self._items[offset - first]

    def since(self, offset: int) -> list[tuple[int, object]] | None:
        """Messages after ``offset``, oldest first; None if some were evicted (or unknown)."""
        if offset > self._last:
            return None
        first = self._last - len(self._items) + 1  # last + 1 when nothing is kept
        if offset < first - 1:
            return None
        return [(off, self._items[off - first]) for off in range(offset + 1, self._last + 1)]
