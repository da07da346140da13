"""What the hub measures of itself: the publish latency histogram (fastim/stats.py, where
the proxy hooks' latency histograms come from too)."""

from __future__ import annotations

from ..stats import LATENCY_BUCKETS as LATENCY_BUCKETS
from ..stats import LatencyHistogram as LatencyHistogram
