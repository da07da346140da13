"""Latency histograms cheap enough for every message (the hub's publishes, the proxy hooks)."""

from __future__ import annotations

from bisect import bisect_left

#: upper bounds (seconds) of the publish latency buckets: a publish kept in memory takes
#: microseconds to its last subscriber's ring, one that waits for sqlite or Redis takes
#: a store round trip (sub-millisecond to seconds when the store struggles)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class LatencyHistogram:
    """A Prometheus-style histogram cheap enough to observe once per published message.

    prometheus-client's ``Histogram.observe`` takes a lock and walks the buckets; here the
    event loop is the only writer, so a bucket is found by bisection and bumped without a
    lock. The collector turns the counts into cumulative ``le`` buckets at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        #: per bucket, not cumulative; the last one is +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "<=")
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as the exposition format wants."""
        out: list[tuple[str, float]] = []
        total = 0
        counts = self.counts
        for i, bound in enumerate(self.bounds):
            total += counts[i]
            out.append((repr(bound), total))
        total += self.counts[-1]
        out.append(("+Inf", total))
        return out
