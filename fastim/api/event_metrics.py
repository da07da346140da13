"""The event-webhook metrics (docs/events.md#metrics), a block of ``/metrics``.

Apart from :mod:`.metrics` so that file only gains the call. The outbox figures are the
store's (the same on every worker of a node sharing it): refreshed by each process about
once a second (:meth:`fastim.backend.events.Events._beats`), not read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..backend.events import Events
from ..backend.outbox import STATES, Sender


def event_metrics(events: Events, sender: Sender | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "fastim_events_outbox_depth",
        "events in the store's outbox, not yet delivered",
        events.depth,
    )
    age = 0.0 if events.oldest is None else max(0.0, time.time() - events.oldest)
    yield GaugeMetricFamily(
        "fastim_events_outbox_oldest_age_seconds",
        "age of the oldest undelivered event (0: none)",
        age,
    )
    yield GaugeMetricFamily(
        "fastim_events_armed",
        "open connections and presence joins whose disconnect/leave is armed for a crash",
        events.armed,
    )
    yield CounterMetricFamily(
        "fastim_events_emitted", "events this process queued for the outbox", events.emitted
    )
    yield CounterMetricFamily(
        "fastim_events_dropped",
        "events dropped before the outbox (the store was down for long: queue full)",
        events.dropped,
    )
    if sender is None:
        return
    yield CounterMetricFamily(
        "fastim_events_delivered", "events delivered with a 2xx", sender.delivered_events
    )
    yield CounterMetricFamily(
        "fastim_events_delivered_batches", "POSTs answered 2xx", sender.delivered_batches
    )
    yield CounterMetricFamily(
        "fastim_events_claimed",
        "disconnect/leave events of lost processes this process emitted (node_lost)",
        sender.claimed,
    )
    failures = CounterMetricFamily(
        "fastim_events_failures",
        "failed POSTs and store calls of the sender, by kind",
        labels=["kind"],
    )
    for kind, n in sorted(sender.failures.items()):
        failures.add_metric([kind], n)
    yield failures
    state = GaugeMetricFamily(
        "fastim_events_sender_state",
        "1 for this process's sender state (standby: another process sends)",
        labels=["state"],
    )
    for s in STATES:
        state.add_metric([s], 1.0 if sender.state == s else 0.0)
    yield state
