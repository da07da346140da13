"""A fastim node: listeners, the hub, the shared timer wheel, the flusher; start and stop.

Everything a node owns hangs off one :class:`Node`; sessions reach their hub, flusher
and wheel through it. ``await node.start()`` binds the listeners, ``await node.stop()``
is the graceful drain (stop accepting, flush, tell every client to reconnect, wait a
bounded time, drop the rest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
from typing import Any

from . import _core
from .api import HttpApi, Metrics, StoreProbe
from .api.http import memory_history
from .auth import Auth, tls_server_context
from .backend.events import Events
from .backend.outbox import Sender
from .backend.proxy import Proxy
from .cluster.runtime import Cluster, advertised_host, join_host_port
from .config import Config
from .delivery import Postman
from .heartbeat import TimerWheel
from .hub import Hub
from .protocol import SHUTDOWN_REASON, CloseCode
from .session import Session, SessionList
from .session.userlimit import UserLimit
from .store import Store, StoreError, open_store
from .transport import TcpSession, WsSession, sse
from .transport.origin import Origins
from .transport.ws import PROBE_HOLD, PROBE_RATE
from .workers.inboxes import MeshInboxes
from .workers.mesh import WorkerMesh
from .workers.role import WorkerRole, read_state

log = logging.getLogger("fastim")

SWEEP_EVERY = 5.0  # seconds between sweeps of idle channels


class Node:
    """One fastim server process's worth of state."""

    def __init__(self, config: Config | None = None, role: WorkerRole | None = None) -> None:
        config = (config or Config()).validate()
        if role is not None and role.count > 1:
            # each worker is named after the node (the welcome, logs, metrics say which)
            config = dataclasses.replace(config, node_id=f"{config.node_id}.{role.name}")
            if config.etcd_endpoints and config.link_port:
                # in a cluster each worker is a cluster node with its own link port
                config = dataclasses.replace(config, link_port=config.link_port + role.index)
        self.config = config
        #: one worker of a node started with ``--workers N`` (fastim/workers/), or None
        self.role: WorkerRole | None = role
        self.auth = Auth(self.config)  # tokens and channel rules (fastim/auth.py)
        #: the application's backend asked over HTTP (fastim/backend/proxy.py, docs/proxy.md)
        self.proxy = Proxy(self.config)
        #: max_connections_per_user over every worker and node (None: no limit)
        self.user_limit = UserLimit(self) if self.config.max_connections_per_user else None
        self.hub = Hub(self.config)
        # presence under namespace rules: the hub asks, the auth decides
        self.hub.presence_gate = lambda sub, ns, name: (
            not self.auth.refusal(ns, "presence", name, getattr(sub, "identity", None))
        )
        self.store: Store | None = None
        self.postman: Postman | None = None
        #: event webhooks (docs/events.md): None when events_url is '' (zero cost)
        self.events: Events | None = None
        self.event_sender: Sender | None = None
        self.sessions: SessionList[Session] = SessionList()
        self.flusher: _core.Flusher = _core.Flusher(None)
        self.wheel: TimerWheel
        self._servers: list[asyncio.Server] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self._drained: asyncio.Event | None = None
        self._last_sweep = 0.0
        self._sweep_task: asyncio.Future[None] | None = None
        self.tcp_port = 0
        self.ws_port = 0
        # counters (exported as metrics by a later issue)
        self.bytes_in = 0
        self.protocol_errors = 0
        self.http_rejects = 0
        self.slow_disconnects = 0
        self.heartbeat_timeouts = 0
        self.rate_limited = 0
        self.limit_refusals = 0
        #: which web pages may connect, and the refusals (fastim/transport/origin.py)
        self.origins = Origins(self.config)
        # observability and the server HTTP API (fastim/api/metrics.py, fastim/api/http.py)
        self.metrics = Metrics(self)
        self.api = HttpApi(self)
        self.store_probe: StoreProbe | None = None
        #: the cluster runtime (fastim/cluster/runtime.py) when etcd_endpoints is set
        self.cluster: Cluster | None = None
        #: the Redis stream consumer (fastim/ingest/) when ingest_redis_stream is set
        self.ingest: Any = None
        # per-address limits (addresses in ip_limits_exempt are not tracked at all)
        self._exempt = self.config.exempt_networks()
        self._exempt_cache: dict[str, bool] = {}
        self._ip_conns: dict[str, int] = {}
        self._ip_buckets: dict[str, _core.TokenBucket] = {}
        # an address over those limits: connections held until their request head
        # shows a probe, and the probes' own rate (PROBE_HOLD, PROBE_RATE)
        self._ip_held: dict[str, int] = {}
        self._probe_buckets: dict[str, _core.TokenBucket] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        # the store first: a node that cannot reach it must fail at start, not later
        role = self.role
        settings = cfg.store_settings()
        if role is not None:
            # the workers share the file; their supervisor holds its lock
            settings = dataclasses.replace(settings, shared=True)
        store = await open_store(settings)
        if (
            role is not None
            and role.count > 1
            and store.name == "memory"
            and not cfg.etcd_endpoints
        ):
            store = MeshInboxes(store)  # inboxes on their owner worker (attached below)
        self.store = store
        self.hub.store = self.store
        self.postman = Postman(self.store, cfg.dm_retry)
        if cfg.events_url:
            await self._start_events()
        self.flusher = _core.Flusher(loop.call_soon)
        self.flusher.pool_limit = cfg.ring_pool
        resolution = max(
            0.01,
            min(
                0.25,
                cfg.ping_interval / 4,
                cfg.pong_timeout / 4,
                cfg.close_timeout / 4,
                cfg.handshake_timeout / 4,
            ),
        )
        self.wheel = TimerWheel(loop, resolution=resolution, on_tick=self._on_tick)
        self.hub.now = self.wheel.now
        self.store_probe = StoreProbe(self.store, self.wheel.now)  # for /ready
        # both listeners speak TLS when tls_cert is set; the handshake gets the same
        # bound as the protocol's (sessions exist only once TLS is up)
        tls = tls_server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        tls_args: dict[str, Any] = (
            {"ssl": tls, "ssl_handshake_timeout": cfg.handshake_timeout} if tls else {}
        )
        # listeners are bound first (their ports go into the cluster registration) and
        # serve only once the node has joined: a node that cannot join fails here
        tls_args["start_serving"] = False
        try:
            if cfg.tcp_port:
                srv = await self._listen("tcp_port", lambda: TcpSession(self), tls_args)
                self._servers.append(srv)
                self.tcp_port = srv.sockets[0].getsockname()[1]
            if cfg.ws_port:
                srv = await self._listen("ws_port", lambda: WsSession(self), tls_args)
                self._servers.append(srv)
                self.ws_port = srv.sockets[0].getsockname()[1]
            if role is not None and role.count > 1 and not cfg.etcd_endpoints:
                # the workers of one node route among themselves; with etcd each worker
                # is a node of the cluster instead (docs/workers.md)
                mesh = WorkerMesh(self, role)
                self.cluster = mesh  # the hub's router, as a cluster's runtime is
                self.metrics.attach_workers(mesh, role.name, lambda: read_state(role.directory))
                if isinstance(self.store, MeshInboxes):
                    self.store.attach(mesh)
                hub = self.hub
                mesh.answers["history"] = lambda m: memory_history(
                    hub, str(m["ch"]), int(m["since"]), int(m["limit"])
                )
                self._answer_user_limit(mesh)
                # a stream's command POST may reach another worker: forwarded to its own
                sse.attach_workers(self, role.name, mesh.ask, mesh.answers)
                await mesh.start({})
            elif cfg.etcd_endpoints:
                host = advertised_host(cfg)
                addresses = {}
                if self.tcp_port:
                    addresses["tcp"] = join_host_port(host, self.tcp_port)
                if self.ws_port:
                    addresses["ws"] = join_host_port(host, self.ws_port)
                cluster = Cluster(self)
                self._answer_user_limit(cluster)
                await cluster.start(addresses)  # ClusterError: not joined, not serving
                self.cluster = cluster
            if cfg.ingest_redis_stream:
                from .ingest.redis_stream import StreamIngest  # needs redis-py: only if used

                self.ingest = StreamIngest(self)
                await self.ingest.start()  # an unreachable Redis: not started
            for srv in self._servers:
                await srv.start_serving()
        except BaseException:
            if self.ingest is not None:
                await self.ingest.close()
                self.ingest = None
            for srv in self._servers:
                srv.close()
            self._servers.clear()
            if self.cluster is not None:
                await self.cluster.close()
                self.cluster = None
            await self._stop_events()
            await self.store.close()
            raise
        self.wheel.start()
        log.info("fastim node %s listening: %s", cfg.node_id, " ".join(self.urls()))
        self.origins.warn_if_open()

    def _answer_user_limit(self, router: Cluster) -> None:
        """The questions other workers and nodes ask about this one's connections of a
        user (max_connections_per_user: fastim/session/userlimit.py)."""
        limit = self.user_limit
        if limit is not None:
            router.answers["user_conns"] = limit.answer_conns
            router.answers["user_close"] = limit.answer_close

    async def _listen(self, setting: str, factory: Any, tls_args: dict[str, Any]) -> asyncio.Server:
        """Bind the listener of ``setting`` (tcp_port, ws_port) on ``host``; a failure is
        an OSError that names both settings and the address, for the operator."""
        cfg = self.config
        port = getattr(cfg, setting)
        try:
            return await asyncio.get_running_loop().create_server(
                factory,
                cfg.host,
                port,
                backlog=cfg.backlog,
                reuse_address=True,
                # the workers of one node listen on the same port (the kernel spreads
                # connections over them); the supervisor holds it bound meanwhile
                reuse_port=self.role is not None,
                **tls_args,
            )
        except OSError as e:
            host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
            why = {
                errno.EADDRINUSE: f"another process listens there: change {setting}",
                errno.EADDRNOTAVAIL: "no interface of this machine has that address: change host",
                errno.EACCES: "ports below 1024 need privileges (CAP_NET_BIND_SERVICE)",
            }.get(e.errno or 0, "")
            what = os.strerror(e.errno) if e.errno else str(e)
            msg = f"{setting} {port} on host {cfg.host!r}: {host}:{port}: {what}"
            raise OSError(e.errno, msg + (f" ({why})" if why else "")) from e

    def urls(self) -> list[str]:
        cfg = self.config
        out = []
        tcp, ws = ("tls", "wss") if cfg.tls_cert else ("tcp", "ws")
        if self.tcp_port:
            out.append(f"{tcp}://{cfg.host}:{self.tcp_port}")
        if self.ws_port:
            out.append(f"{ws}://{cfg.host}:{self.ws_port}{cfg.ws_path}")
            if cfg.ws_echo_path:
                out.append(f"{ws}://{cfg.host}:{self.ws_port}{cfg.ws_echo_path} (echo)")
        return out

    def readiness(self) -> str | None:
        """None when the node should get traffic (``/ready`` 200); else why not (503)."""
        if self._stopping:
            return "shutting down"
        if not self._servers or self.store_probe is None:
            return "not listening yet"
        return self.store_probe.status(self.wheel.now)

    def ready_text(self) -> str:
        """The body of a 200 ``/ready``: "ready", with the cluster's state in a cluster.

        A degraded cluster (etcd unreachable) stays ready: the node serves its clients
        and the routes it knows, and every node would be degraded at once, so answering
        503 would take the whole cluster out of a load balancer.
        """
        cluster = self.cluster
        if cluster is None:
            return "ready"
        why = cluster.degraded()
        if why is not None:
            return f"ready, degraded: {why}; {cluster.summary()}"
        return f"ready; {cluster.summary()}"

    def _on_tick(self, now: float) -> None:
        self.hub.now = now
        if self.cluster is not None:
            self.cluster.on_tick(now)
        if self.store_probe is not None:
            self.store_probe.on_tick(now)
        if self.postman is not None:
            self.postman.on_tick(now)
        if now - self._last_sweep >= SWEEP_EVERY:
            self._last_sweep = now
            self.hub.sweep(now)
            self._prune_ip_buckets(now)
            sweeper = self.role is None or self.role.index == 0  # one worker sweeps the file
            if self.store is not None and self._sweep_task is None and sweeper:
                self._sweep_task = asyncio.ensure_future(self._sweep_store())

    async def _sweep_store(self) -> None:
        try:
            assert self.store is not None
            await self.store.sweep()
        except StoreError as e:
            log.warning("store sweep failed: %s", e)
        finally:
            self._sweep_task = None

    def admit(self, session: Session) -> tuple[int, str, str] | None:
        """Per-address limits for a new connection: None, or (HTTP status, reason, address).

        Applied at accept, so that connections that send nothing count too; on the
        WebSocket/HTTP port a refused connection may still be a probe, which the
        session tells from its request head (:meth:`hold`, :meth:`probe_admitted`).
        """
        cfg = self.config
        if not cfg.max_connections_per_ip and not cfg.connect_rate_per_ip:
            return None
        assert session.transport is not None
        peer = session.transport.get_extra_info("peername")
        if not peer or not isinstance(peer, tuple):
            return None  # a Unix socket: no address
        ip = str(peer[0])
        exempt = self._exempt_cache.get(ip)
        if exempt is None:
            try:
                addr = ipaddress.ip_address(ip)
                exempt = any(addr in net for net in self._exempt)
            except ValueError:
                exempt = False
            if len(self._exempt_cache) > 65536:
                self._exempt_cache.clear()
            self._exempt_cache[ip] = exempt
        if exempt:
            return None
        rate = cfg.connect_rate_per_ip
        if rate:
            bucket = self._ip_buckets.get(ip)
            if bucket is None:
                bucket = self._ip_buckets[ip] = _core.TokenBucket(rate, 2 * rate, self.wheel.now)
            if not bucket.take(self.wheel.now):
                return 429, f"over {rate:g} new connections per second from {ip}", ip
        n = self._ip_conns.get(ip, 0)
        if cfg.max_connections_per_ip and n >= cfg.max_connections_per_ip:
            return 503, f"{ip} holds the maximum of {cfg.max_connections_per_ip} connections", ip
        self._ip_conns[ip] = n + 1
        session.ip = ip
        return None

    def release(self, ip: str) -> None:
        n = self._ip_conns.get(ip, 0) - 1
        if n > 0:
            self._ip_conns[ip] = n
        else:
            self._ip_conns.pop(ip, None)

    def hold(self, ip: str) -> bool:
        """Keep a connection the per-address limits refused open until its request head
        says whether it is a probe: at most PROBE_HOLD at once per address."""
        n = self._ip_held.get(ip, 0)
        if n >= PROBE_HOLD:
            return False
        self._ip_held[ip] = n + 1
        return True

    def unhold(self, ip: str) -> None:
        n = self._ip_held.get(ip, 0) - 1
        if n > 0:
            self._ip_held[ip] = n
        else:
            self._ip_held.pop(ip, None)

    def probe_allowed(self, ip: str) -> bool:
        """A probe from an address over its client limits: within PROBE_RATE?"""
        now = self.wheel.now
        bucket = self._probe_buckets.get(ip)
        if bucket is None:
            bucket = self._probe_buckets[ip] = _core.TokenBucket(PROBE_RATE, 2 * PROBE_RATE, now)
        return bucket.take(now)

    def probe_admitted(self, session: Session) -> None:
        """A connection the limits admitted turned out to be a probe: it no longer counts
        among its address's connections, and its connect token is given back."""
        ip = session.ip
        if ip is None:
            return
        self.release(ip)
        session.ip = None
        bucket = self._ip_buckets.get(ip)
        if bucket is not None and bucket.available <= bucket.burst - 1:
            bucket.take(self.wheel.now, -1.0)

    def _prune_ip_buckets(self, now: float) -> None:
        """Forget connect-rate buckets that have refilled (an idle address costs nothing)."""
        for buckets in (self._ip_buckets, self._probe_buckets):
            full = []
            for ip, b in buckets.items():
                b.take(now, 0.0)  # refill up to now
                if b.available >= b.burst:
                    full.append(ip)
            for ip in full:
                del buckets[ip]

    def on_session_closed(self) -> None:
        if self._drained is not None and not self.sessions:
            self._drained.set()

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, flush, close every client with "reconnect"."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        cfg = self.config
        if self.cluster is not None:
            await self.cluster.leave()  # deregister first: the others reroute at once
        for srv in self._servers:
            srv.close()
        if self.ingest is not None:  # its batch in progress is published and acked
            await self.ingest.close(cfg.shutdown_timeout)
        await self.hub.close()  # publishes on their way to the store: stored and acked
        n = len(self.sessions)
        log.info("fastim node %s shutting down: closing %d connections", cfg.node_id, n)
        self._drained = asyncio.Event()
        for s in list(self.sessions):
            s.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
        self.flusher.flush()
        if self.sessions:
            try:
                await asyncio.wait_for(self._drained.wait(), cfg.shutdown_timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "fastim: %d connections did not close in time; dropping them",
                    len(self.sessions),
                )
                for s in list(self.sessions):
                    s.close_transport(abort=True)
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        if self.cluster is not None:
            await self.cluster.close()  # links after the drain: acks of the last publishes
        self.wheel.stop()
        if self.postman is not None:
            await self.postman.close()
        await self._stop_events()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        await self.api.close()
        await self.proxy.close()
        if self.store_probe is not None:
            await self.store_probe.close()
        if self.store is not None:
            await self.store.close()
        self._stopped.set()
        log.info("fastim node %s stopped", cfg.node_id)

    async def _start_events(self) -> None:
        """Event webhooks on: the emitter (beats first, so nothing is armed under a
        process the store does not know alive) and this process's sender."""
        cfg = self.config
        assert self.store is not None and self.postman is not None
        events = Events(self.store, cfg.node_id, cfg.events, cfg.events_lease)
        sender = Sender(
            self.store,
            events.run,
            cfg.events_url,
            timeout=cfg.events_timeout,
            batch=cfg.events_batch,
            retry_max=cfg.events_retry_max,
            lease=cfg.events_lease,
            secret=cfg.events_secret,
            headers=cfg.events_headers,
        )
        events.on_added = sender.wake
        await events.start()
        sender.start()
        self.events = self.hub.events = self.postman.events = events
        self.event_sender = sender

    async def _stop_events(self) -> None:
        """After the sessions closed: their disconnects into the store, then the sender
        stops and releases its lease (another process takes over at once)."""
        if self.events is not None:
            await self.events.stop()
        if self.event_sender is not None:
            await self.event_sender.stop()

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # handlers first: a signal that arrives just after "listening" must be graceful
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            raise  # start() released what it had opened
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
