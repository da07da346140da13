"""Observability: ``/metrics`` in the Prometheus text format, the publish latency
histogram, and the store probe behind ``/ready``.

Why the counters are read at scrape time. The node already counts what matters in plain
integer attributes (``hub.published``, ``hub.delivered``, ``flusher.bytes_written``,
``node.bytes_in``...), most of them bumped in C or once per batch. Wrapping each in a
prometheus-client ``Counter`` would add a locked Python call per message or per
delivery on the fan-out path; instead one custom collector reads the attributes when
Prometheus scrapes (every 15 s or so) and reports them as counters and gauges. Gauges
that need a walk (connections by transport, subscriptions) cost O(connections) or
O(channels) per scrape, not per message.

The one thing measured per message is the publish latency (:class:`LatencyHistogram`):
a bisect and two additions, with no lock, since the event loop is the only writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .. import __version__
from ..backend.breaker import STATE_VALUE
from ..backend.proxy import Proxy
from ..cluster.runtime import Cluster
from ..hub.stats import LATENCY_BUCKETS as LATENCY_BUCKETS
from ..hub.stats import LatencyHistogram as LatencyHistogram
from ..store import Store, StoreError
from ..transport import TcpSession, WsSession
from .event_metrics import event_metrics
from .host import ApiHost

log = logging.getLogger("fastim")


#: seconds between two store probes (``/ready``)
PROBE_EVERY = 2.0
#: a probe that takes longer than this fails
PROBE_TIMEOUT = 5.0
#: the inbox the probe reads (read-only, in every store): any user id would do
PROBE_USER = "fastim:ready-probe"


class StoreProbe:
    """Whether the store answers: a cheap read every :data:`PROBE_EVERY` seconds, cached.

    ``/ready`` must answer at once and must not hit the store per request (a load
    balancer may ask every second from many places), so it reads the last result. The
    node's timer tick starts a probe when one is due and none is running.
    """

    def __init__(
        self,
        store: Store,
        now: float,
        every: float = PROBE_EVERY,
        timeout: float = PROBE_TIMEOUT,
        spawn: Callable[[Any], asyncio.Future[None]] = asyncio.ensure_future,
    ) -> None:
        self.store = store
        self.every = every
        self.timeout = timeout
        self._spawn = spawn
        #: the store was just opened by the node, so it answered a moment ago
        self.ok = True
        self.reason = ""
        self.checked = now
        self.failures = 0
        self._started = now
        self._task: asyncio.Future[None] | None = None

    def on_tick(self, now: float) -> None:
        if self._task is None and now - self._started >= self.every:
            self._started = now
            self._task = self._spawn(self._probe())

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self.store.inbox_state(PROBE_USER), self.timeout)
        except (StoreError, asyncio.TimeoutError) as e:
            why = str(e) or f"no reply in {self.timeout:g}s"
            if self.ok:
                log.warning("store probe failed: %s", why)
            self.ok = False
            self.reason = f"store did not answer: {why}"
            self.failures += 1
        else:
            if not self.ok:
                log.info("store probe: the store answers again")
            self.ok = True
            self.reason = ""
        finally:
            self.checked = loop.time()
            self._task = None

    def status(self, now: float) -> str | None:
        """None if the store answered lately; else why the node is not ready."""
        if not self.ok:
            return self.reason
        overdue = self.every + self.timeout + 1.0
        if now - self.checked > overdue:
            return f"store did not answer a probe for {now - self.checked:.1f}s"
        return None

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class NodeCollector:
    """Reads a node's counters when Prometheus scrapes (see the module docstring)."""

    def __init__(self, node: ApiHost) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        hub = node.hub
        postman = node.postman
        flusher = node.flusher

        info = GaugeMetricFamily(
            "fastim_node_info",
            "this node: its id, version and store",
            labels=["node", "version", "store"],
        )
        info.add_metric([node.config.node_id, __version__, node.config.store], 1)
        yield info
        yield _gauge(
            "fastim_ready",
            "1 when /ready answers 200 (listening, store answers)",
            0 if node.readiness() is not None else 1,
        )

        conns = GaugeMetricFamily(
            "fastim_connections",
            "open client connections; http: WebSocket port, not (yet) upgraded",
            labels=["transport"],
        )
        for transport, n in sorted(connections_by_transport(node).items()):
            conns.add_metric([transport], n)
        yield conns
        yield _gauge(
            "fastim_subscriptions",
            "channel subscriptions of all connections",
            sum(len(ch.subs) for ch in hub.channels.values()),
        )
        yield _gauge("fastim_channels", "channels in node memory", len(hub.channels))
        yield _gauge(
            "fastim_channels_idle", "channels without subscribers kept for history", len(hub.idle)
        )

        yield _counter("fastim_messages_published", "channel messages published", hub.published)
        yield _counter(
            "fastim_deliveries",
            "channel messages and events appended to subscribers' rings",
            hub.delivered,
        )
        yield _counter(
            "fastim_messages_recovered", "messages sent by subscribe-with-since", hub.recovered
        )
        yield _counter("fastim_bytes_received", "bytes received from clients", node.bytes_in)
        yield _counter(
            "fastim_bytes_sent", "bytes written to clients by the flusher", flusher.bytes_written
        )
        yield _counter("fastim_writes", "socket writes made by the flusher", flusher.writes)
        yield _gauge(
            "fastim_ring_pool_bytes", "out-ring buffers pooled for reuse", flusher.pool_bytes
        )

        yield _counter(
            "fastim_slow_consumer_disconnects",
            "connections closed with 4001: outbound buffer over outbound_cap",
            node.slow_disconnects,
        )
        yield _counter(
            "fastim_heartbeat_timeouts",
            "connections closed with 4000: no pong in time",
            node.heartbeat_timeouts,
        )
        yield _counter(
            "fastim_rate_limited",
            "publishes and sends refused with RATE_LIMITED (116)",
            node.rate_limited,
        )
        yield _counter(
            "fastim_connection_limit_refusals",
            "connections refused by the per-address limits (429/503, GOAWAY 4002)",
            node.limit_refusals,
        )
        yield _counter(
            "fastim_protocol_errors",
            "connections failed for a protocol violation",
            node.protocol_errors,
        )
        yield _counter(
            "fastim_http_rejects", "plain HTTP requests answered 4xx or 5xx", node.http_rejects
        )
        yield _counter(
            "fastim_origin_refused",
            "WebSocket upgrades refused with 403: a browser page of an origin not allowed",
            node.origins.refused,
        )

        store_errors = CounterMetricFamily(
            "fastim_store_errors",
            "store calls that failed (part: hub = channels, postman = inboxes)",
            labels=["part"],
        )
        store_errors.add_metric(["hub"], hub.store_errors)
        store_errors.add_metric(["postman"], postman.store_errors if postman is not None else 0)
        yield store_errors

        yield _counter(
            "fastim_direct_messages_sent",
            "direct messages stored in an inbox (dup included)",
            postman.sent if postman is not None else 0,
        )
        yield _counter(
            "fastim_direct_messages_delivered",
            "direct messages written to a recipient's connection (first sends and replays)",
            postman.delivered if postman is not None else 0,
        )
        yield _counter(
            "fastim_direct_messages_retried",
            "unacknowledged direct messages sent again",
            postman.retried if postman is not None else 0,
        )

        auth = node.auth
        tokens = CounterMetricFamily(
            "fastim_auth_tokens", "connect tokens presented, by result", labels=["result"]
        )
        tokens.add_metric(["verified"], auth.verified)
        tokens.add_metric(["refused"], auth.failed)
        yield tokens
        yield _counter(
            "fastim_auth_denied",
            "requests refused by channel rules or a token's channels claim (118)",
            auth.denied,
        )
        yield _counter(
            "fastim_auth_expired",
            "connections closed because their token expired (no refresh in time)",
            auth.expired,
        )

        deflater = hub.deflater
        yield _counter(
            "fastim_deflate_messages",
            "messages compressed (once for all subscribers)",
            deflater.messages,
        )
        yield _counter("fastim_deflate_bytes_in", "bytes before compression", deflater.bytes_in)
        yield _counter("fastim_deflate_bytes_out", "bytes after compression", deflater.bytes_out)

        api = getattr(node, "api", None)
        if api is not None:
            reqs = CounterMetricFamily(
                "fastim_api_requests", "server HTTP API requests", labels=["route", "status"]
            )
            for (route, status), n in sorted(api.requests.items()):
                reqs.add_metric([route, str(status)], n)
            yield reqs

        proxy = getattr(node, "proxy", None)
        if proxy:
            yield from proxy_metrics(proxy)

        cluster = getattr(node, "cluster", None)
        if cluster is not None:
            yield from cluster_metrics(cluster)
            # the workers' mesh adds its own (fastim/workers/mesh.py: a layer above)
            mesh_families = getattr(cluster, "metric_families", None)
            if mesh_families is not None:
                yield from mesh_families()

        ingest = getattr(node, "ingest", None)  # fastim/ingest/ (a sibling: not imported)
        if ingest is not None:
            yield from ingest.metric_families()
        events = getattr(node, "events", None)
        if events is not None:  # event webhooks (docs/events.md#metrics)
            yield from event_metrics(events, getattr(node, "event_sender", None))

        lat = hub.latency
        yield HistogramMetricFamily(
            "fastim_publish_latency_seconds",
            "from a publish reaching the hub to the end of its fan-out to every subscriber's "
            "ring (memory channels: the fan-out; durable ones: the store append too)",
            buckets=lat.buckets(),
            sum_value=lat.sum,
        )


def proxy_metrics(proxy: Proxy) -> Iterator[Metric]:
    """The proxy hooks (docs/proxy.md): requests by outcome, latency, breakers."""
    reqs = CounterMetricFamily(
        "fastim_proxy_requests",
        "proxy hook requests by outcome (ok, refused, disconnect: the backend's answers; "
        "timeout, http_error, connection_error, invalid: failures; breaker_open: not sent)",
        labels=["hook", "outcome"],
    )
    state = GaugeMetricFamily(
        "fastim_proxy_breaker_state",
        "a hook's circuit breaker: 0 closed, 1 half open (one probe), 2 open (failing fast)",
        labels=["hook"],
    )
    opened = CounterMetricFamily(
        "fastim_proxy_breaker_opened", "times a hook's circuit breaker opened", labels=["hook"]
    )
    inflight = GaugeMetricFamily(
        "fastim_proxy_inflight", "proxy hook requests waiting for the backend", labels=["hook"]
    )
    latency = HistogramMetricFamily(
        "fastim_proxy_latency_seconds",
        "a proxy hook request's time to its answer or failure (breaker_open not included)",
        labels=["hook"],
    )
    for name, hook in proxy.hooks.items():
        for outcome, n in hook.counts.items():
            reqs.add_metric([name, outcome], n)
        state.add_metric([name], STATE_VALUE[hook.breaker.state])
        opened.add_metric([name], hook.breaker.opened)
        inflight.add_metric([name], hook.inflight)
        latency.add_metric([name], hook.latency.buckets(), hook.latency.sum)
    yield reqs
    yield state
    yield opened
    yield inflight
    yield latency


def cluster_metrics(cluster: Cluster) -> Iterator[Metric]:
    """A node in a cluster: membership state, links, forwards, tree deliveries."""
    m = cluster.membership
    state = GaugeMetricFamily(
        "fastim_cluster_state",
        "1 for the membership's current state (healthy: etcd answers; degraded: it does "
        "not, known routes kept)",
        labels=["state"],
    )
    now = m.state if m is not None else "stopped"
    for s in ("starting", "healthy", "degraded", "stopped"):
        state.add_metric([s], 1 if s == now else 0)
    yield state
    yield _gauge(
        "fastim_cluster_nodes",
        "live nodes in this node's routing table, itself included",
        len(m.nodes) if m is not None else 0,
    )
    up, total = cluster.links_up()
    yield _gauge("fastim_cluster_links_up", "outbound node links up", up)
    yield _gauge("fastim_cluster_links", "outbound node links (one per peer)", total)
    fwd = CounterMetricFamily(
        "fastim_cluster_forwards",
        "publishes forwarded to the channel's owner, by outcome (sent; acked; failed: the "
        "client got NOT_ROUTED or the owner's error)",
        labels=["result"],
    )
    fwd.add_metric(["sent"], cluster.forwards_sent)
    fwd.add_metric(["acked"], cluster.forwards_acked)
    fwd.add_metric(["failed"], cluster.forwards_failed)
    yield fwd
    yield _counter(
        "fastim_cluster_forwards_received",
        "publishes other nodes forwarded to this node as the owner",
        cluster.forwards_received,
    )
    tree = CounterMetricFamily(
        "fastim_cluster_tree_deliveries",
        "channel messages down the broadcast tree (in: received from a parent; out: sent "
        "to children; dropped: a child's link was down)",
        labels=["direction"],
    )
    tree.add_metric(["in"], cluster.tree_in)
    tree.add_metric(["out"], cluster.tree_out)
    tree.add_metric(["dropped"], cluster.tree_dropped)
    yield tree
    yield _counter(
        "fastim_cluster_duplicates",
        "tree deliveries dropped as already delivered (views differ for a moment)",
        cluster.duplicates,
    )
    yield _counter(
        "fastim_cluster_gaps",
        "tree deliveries past the next offset (filled from the store, or a jump)",
        cluster.gaps,
    )
    yield _counter(
        "fastim_cluster_resyncs",
        "durable channels caught up from the store after a parent's link came back or the "
        "trees changed (messages lost on the way)",
        cluster.resyncs,
    )
    yield _counter(
        "fastim_cluster_ownership_moves",
        "channels in memory whose owner changed with the membership",
        cluster.ownership_moves,
    )
    dm = cluster.dm
    if dm is not None:
        st = dm.status()
        routes = st["routes"]
        yield _counter(
            "fastim_cluster_dm_relayed",
            "direct messages sent to the other nodes holding their recipient",
            st["relayed"],
        )
        yield _counter(
            "fastim_cluster_dm_relay_dropped",
            "direct messages a link could not take (found later by an inbox check)",
            st["relay_dropped"],
        )
        yield _counter(
            "fastim_cluster_dm_received",
            "direct messages received from other nodes",
            st["received"],
        )
        yield _counter(
            "fastim_cluster_dm_rechecks",
            "inbox re-reads for messages no frame brought (gaps, late routes, links back)",
            st["rechecks"],
        )
        yield _gauge(
            "fastim_cluster_user_routes", "users with a route in the cluster", routes["users"]
        )
        yield _gauge(
            "fastim_cluster_user_routes_pending",
            "local user routes not yet written",
            routes["pending"],
        )
        yield _counter(
            "fastim_cluster_user_route_txns", "etcd transactions of user routes", routes["txns"]
        )


def connections_by_transport(node: ApiHost) -> dict[str, int]:
    """Open connections per transport: one pass over the node's sessions."""
    out = {"tcp": 0, "websocket": 0, "http": 0}
    for s in node.sessions:
        if isinstance(s, WsSession):
            out["websocket" if s.parser is not None else "http"] += 1
        elif isinstance(s, TcpSession):
            out["tcp"] += 1
    return out


class Metrics:
    """A node's registry: the node collector plus process, platform and GC metrics.

    A registry per node (not prometheus-client's global one): several nodes in one
    process (the tests) must not collide, and the node's numbers are its own.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, node: ApiHost) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self) -> bytes:
        """The text exposition of every metric, for ``GET /metrics``."""
        return generate_latest(self.registry)

    def attach_workers(
        self, mesh: Any, name: str, supervisor_state: Callable[[], dict[str, Any]]
    ) -> None:
        """This process is worker ``name`` of a node of several: ``/metrics`` answers for
        the whole node, every worker's metrics with a ``worker`` label (asked over the
        workers' links), plus the supervisor's restart counters."""
        self._mesh = mesh
        self._worker = name
        self._supervisor_state = supervisor_state
        mesh.answers["metrics"] = lambda _msg: self.render().decode()

    @property
    def whole_node(self) -> Callable[[], Awaitable[bytes]] | None:
        return self._render_node if getattr(self, "_mesh", None) is not None else None

    async def _render_node(self) -> bytes:
        texts = {self._worker: self.render().decode()}
        for peer, answer in (await self._mesh.ask_all("metrics", {})).items():
            value = answer.get("value")
            if isinstance(value, str):
                texts[peer] = value
        return merge_workers(texts) + supervisor_metrics(self._supervisor_state())


def merge_workers(texts: dict[str, str]) -> bytes:
    """The text expositions of several workers as one: each sample labelled with its
    worker (``worker="w0"``), each family once (sum them with ``sum without (worker)``)."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for sample in fam.samples:
                labels = {**sample.labels, "worker": worker}
                into.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


def supervisor_metrics(state: dict[str, Any]) -> bytes:
    """The supervisor's counters (``supervisor.json`` in the workers' directory)."""
    workers = state.get("workers") or []
    lines = [
        "# HELP fastim_workers workers of this node (the --workers setting)",
        "# TYPE fastim_workers gauge",
        f"fastim_workers {len(workers)}",
        "# HELP fastim_worker_restarts_total workers restarted by the supervisor after "
        "they died or hung, per worker",
        "# TYPE fastim_worker_restarts_total counter",
    ]
    lines += [
        f'fastim_worker_restarts_total{{worker="w{int(w.get("index", 0))}"}} '
        f"{int(w.get('restarts', 0))}"
        for w in workers
    ]
    lines += [
        "# HELP fastim_worker_hangs_total workers killed by the supervisor because they "
        "stopped answering (no liveness ping for worker_hang_timeout), per worker",
        "# TYPE fastim_worker_hangs_total counter",
    ]
    lines += [
        f'fastim_worker_hangs_total{{worker="w{int(w.get("index", 0))}"}} {int(w.get("hangs", 0))}'
        for w in workers
    ]
    return ("\n".join(lines) + "\n").encode()


class _Fixed:
    """A collector of metrics gathered already."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
