"""``--broadcast K``: K messages, one at a time, each to every subscriber; time to the last.

After every subscriber is connected and subscribed (and the node's memory has settled,
and the node has been watched idle for ``--idle-window`` seconds: see runner.py), the
publisher publishes one message, waits until every subscriber has it (or ``--drain``
seconds), waits out the rest of ``--broadcast-gap``, and publishes the next.

Every connection is tracked, not a sample: a connection counts its messages with the
compiled parsers as in the other modes, and its ``wake`` (called once per read that
brought messages) is a :class:`Reach`, which hands the messages new since its last read
to the worker's :class:`Tracker`: per message, how many connections have it, and the
CLOCK_MONOTONIC time of the first and of the last of them (a connection counting by
strides counts a message when its frame header arrives; the rest of a small message
comes in the same read or the next). The k-th message a connection receives is
message k (messages are published one at a time, each only once everyone has the one
before), so counting is enough to tell them apart; a connection that ends with more
than K messages got a duplicate, fewer lost one, and the sampled connections check
every message's sequence number as in the other modes. When every
connection of a worker has message k, the worker tells the publisher (``("reached", k,
t)`` down its pipe), which is how the publisher knows it may go on
(publisher.broadcast, the publisher's side).

The time from publish to the last delivery of message k is the latest last time over
the worker processes and the probe, minus the stamp the message carries (the processes
share CLOCK_MONOTONIC); it includes the generator's own reading of its sockets, which on
a small machine shares the cores with the node.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from .counting import WorkerResult, _Sub


class Tracker:
    """One process's tally of the broadcast: per message 1..K, the connections that
    received it and the first and last time (CLOCK_MONOTONIC ns) one did."""

    def __init__(self, k: int, n: int, pipe: Connection | None = None) -> None:
        self.k = k
        self.n = n  # connections tracked: a message every one has is reported
        self.pipe = pipe
        self.reached = [0] * (k + 1)  # [0] unused: messages are 1..K
        self.first_ns = [0] * (k + 1)
        self.last_ns = [0] * (k + 1)
        self.extra = 0  # messages beyond the K-th, over all connections
        #: the messages every connection has, each reported once
        self.done: set[int] = set()
        self.on_done: Callable[[int], None] | None = None

    def hit(self, seen: int, count: int, now: int) -> None:
        """A connection went from ``seen`` to ``count`` messages at ``now``."""
        for j in range(seen + 1, count + 1):
            if j > self.k:
                self.extra += 1
                continue
            self.reached[j] += 1
            if not self.first_ns[j]:
                self.first_ns[j] = now
            if now > self.last_ns[j]:
                self.last_ns[j] = now
            if self.reached[j] == self.n:
                self.done.add(j)
                if self.pipe is not None:
                    self.pipe.send(("reached", j, self.last_ns[j]))
                if self.on_done is not None:
                    self.on_done(j)

    def into(self, res: WorkerResult) -> None:
        res.bcast_reached = self.reached[1:]
        res.bcast_first_ns = self.first_ns[1:]
        res.bcast_last_ns = self.last_ns[1:]


class Reach:
    """A connection's ``wake`` in broadcast mode: after a read that brought messages,
    tells the tracker which ones (by count: the k-th received is message k)."""

    __slots__ = ("seen", "sub", "tracker")

    def __init__(self, sub: _Sub, tracker: Tracker) -> None:
        self.sub = sub
        self.tracker = tracker
        self.seen = sub.count

    def set(self) -> None:
        c = self.sub.count
        if c > self.seen:
            self.tracker.hit(self.seen, c, time.monotonic_ns())
            self.seen = c


def track(subs: list[_Sub], k: int, pipe: Connection | None = None) -> Tracker:
    """Track the broadcast's K messages on every connection of ``subs`` still open."""
    live = [s for s in subs if not s.closed]
    tracker = Tracker(k, len(live), pipe)
    for s in live:
        s.wake = Reach(s, tracker)
    return tracker


def time_to_last_ms(
    k: int, t_pub_ns: list[int], parts: list[WorkerResult]
) -> tuple[list[float | None], list[int]]:
    """Per message: publish → its last delivery over every process's connections (ms;
    None when no connection got it), and how many connections got it."""
    out: list[float | None] = []
    reached: list[int] = []
    for j in range(k):
        last = max((p.bcast_last_ns[j] for p in parts if len(p.bcast_last_ns) > j), default=0)
        n = sum(p.bcast_reached[j] for p in parts if len(p.bcast_reached) > j)
        reached.append(n)
        ok = last and j < len(t_pub_ns)
        out.append(round((last - t_pub_ns[j]) / 1e6, 3) if ok else None)
    return out, reached


def finite(xs: list[float | None]) -> list[float]:
    return [x for x in xs if x is not None and not math.isnan(x)]
