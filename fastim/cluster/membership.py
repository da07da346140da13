"""Cluster membership: this node's registration in etcd and the routing table of live nodes.

**Keys.** A node registers ``<prefix>/<cluster>/nodes/<node_id>`` = JSON ``{"node",
"addresses": {"tcp", "ws", "link"}, "metadata": {"version", "started"}}`` under a lease
of ``ttl`` seconds that it refreshes every ``ttl/3``. If the node dies (kill -9, a
partition), the lease expires and etcd deletes the key by itself: no other node has to
decide that it is dead. A graceful stop revokes the lease, so the key goes at once.

**The routing table** (:attr:`Membership.nodes`, node id → :class:`NodeInfo`) is a
listing of ``nodes/`` at some revision R, then kept current by a watch from R+1. Every
event moves :attr:`Membership.revision` forward, so after any break the watch resumes at
``revision + 1`` and replays exactly what was missed: no change is lost and none is seen
twice. If etcd compacted that revision meanwhile (or its revision went backwards: a
restored or rebuilt etcd), the table is listed again and the difference reported as
join/leave/update events, so callbacks see the same thing either way.

**When etcd is unreachable** (down, hung, partitioned) the node is ``degraded``: it keeps
its table (known routes keep serving; links to dead peers notice by their heartbeats),
retries with exponential backoff and jitter over the configured endpoints, and is
``healthy`` again once it has re-checked its registration and resumed the watch. If it
was away longer than the lease TTL its lease expired and the others saw it leave: it
takes a new lease and registers again (a new ``incarnation``), and they see it join.

A registration is created with a transaction ("create if absent"), so two live processes
cannot share a node id: the second waits (the key of a crashed predecessor disappears
within its TTL) and fails with :class:`~fastim.cluster.NodeIdTaken` if the holder stays.

The session with etcd (connect, list, watch, resume, reconnect with backoff, the state)
is :class:`~fastim.cluster.etcd.EtcdSession`'s; this module gives it the registration
(``prepare``), the lease keep-alive (``alongside``) and the table (``listed``,
``changed``). The etcd client is ``aetcd`` (asyncio, gRPC), imported only when a
membership starts, so the rest of fastim does not need it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from .. import __version__
from ..config import Config
from ..config.endpoints import parse_endpoints
from . import ClusterError, NodeIdTaken
from .etcd import DEGRADED, HEALTHY, EtcdSession

__all__ = [
    "DEGRADED",
    "HEALTHY",
    "MemberEvent",
    "Membership",
    "NodeInfo",
    "parse_endpoints",
]

log = logging.getLogger("fastim.cluster")


def nodes_prefix(prefix: str, cluster: str) -> str:
    """The etcd key prefix under which a cluster's nodes register."""
    return f"{prefix.rstrip('/')}/{cluster}/nodes/"


@dataclass(frozen=True)
class NodeInfo:
    """One node of the routing table: how to reach it, and what it said about itself."""

    node_id: str
    #: "tcp", "ws" (client URLs) and "link" (``host:port`` of its LinkServer)
    addresses: Mapping[str, str] = field(default_factory=dict)
    #: "version" (fastim's), "started" (unix time); free-form beyond that
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: etcd create revision of its key: a new value means the node registered anew
    #: (it restarted with the same id, or lost its lease): state kept about it is stale
    incarnation: int = 0
    #: the etcd lease its key is bound to
    lease: int = 0

    @property
    def link(self) -> str | None:
        return self.addresses.get("link") or None

    def value(self) -> bytes:
        """The JSON stored in etcd."""
        return orjson.dumps(
            {
                "node": self.node_id,
                "addresses": dict(self.addresses),
                "metadata": dict(self.metadata),
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def from_value(cls, node_id: str, value: bytes, incarnation: int, lease: int) -> NodeInfo:
        """Parse a registration; ValueError if it is not one."""
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        addresses = doc.get("addresses", {})
        metadata = doc.get("metadata", {})
        if not isinstance(addresses, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()
        ):
            raise ValueError("addresses: not an object of strings")
        if not isinstance(metadata, dict):
            raise ValueError("metadata: not an object")
        return cls(node_id, addresses, metadata, incarnation, lease)


class MemberEvent(NamedTuple):
    """A change of the routing table: ``kind`` is ``join``, ``leave`` or ``update``.

    ``info`` is the new entry (for ``leave``: the last one known).
    """

    kind: str
    node_id: str
    info: NodeInfo


class Membership:
    """This node's membership of one cluster, and its view of the others.

    ``await start()`` registers and lists the cluster (raising ClusterError if that is not
    possible within its timeout), then a background task keeps the lease alive, follows
    the watch and reconnects as needed until ``await stop()``.

    ``nodes`` always holds this node itself. Change callbacks (:meth:`on_change`) are
    about the *other* nodes and run synchronously in the event loop, in etcd's order.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        cluster: str,
        node_id: str,
        *,
        addresses: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        prefix: str = "/fastim",
        ttl: int = 5,
        request_timeout: float | None = None,
        backoff: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if not self.endpoints:
            raise ClusterError("no etcd endpoint given")
        if not node_id or "/" in node_id:
            raise ClusterError(f"node id must be non-empty without '/': {node_id!r}")
        self.cluster = cluster
        self.node_id = node_id
        self.prefix = prefix
        self.ttl = int(ttl)
        #: per etcd call: a hung etcd is noticed within keepalive interval + this
        self.request_timeout = request_timeout or min(5.0, max(0.5, self.ttl / 3))
        self.backoff = backoff
        meta = {"version": _version(), "started": round(time.time(), 3)}
        meta.update(metadata or {})
        self.info = NodeInfo(node_id, dict(addresses or {}), meta)
        self._prefix_b = nodes_prefix(prefix, cluster).encode()
        self._key = self._prefix_b + node_id.encode()
        self._epoch_key = f"{prefix.rstrip('/')}/{cluster}/epoch".encode()
        self._epoch = b""
        self._nodes: dict[str, NodeInfo] = {node_id: self.info}
        self.lease_id = 0
        self._own_rev = 0
        self._lost_self = False
        self._taken = False
        self._was_degraded = False
        #: registrations written (the other counters are the session's: see status())
        self.registrations = 0
        self._reg_lock = asyncio.Lock()
        self._change_cbs: list[Callable[[MemberEvent], None]] = []
        self._etcd = EtcdSession(
            f"cluster {cluster}",
            self.endpoints,
            self._prefix_b,
            prepare=self._prepare,
            listed=self._listed,
            changed=self._changed,
            alongside=self._keepalive,
            request_timeout=self.request_timeout,
            backoff=backoff,
        )
        self._etcd.on_state(self._log_state)

    @classmethod
    def from_config(cls, config: Config, addresses: Mapping[str, str], **kw: Any) -> Membership:
        """A membership with the node's cluster settings (``etcd_endpoints`` must be set)."""
        return cls(
            config.etcd_endpoints,
            config.cluster_name,
            config.node_id,
            addresses=addresses,
            prefix=config.etcd_prefix,
            ttl=config.node_lease_ttl,
            **kw,
        )

    # ------------------------------------------------------------------ reading

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """The routing table: node id → info, this node included (read-only view)."""
        return self._nodes

    @property
    def state(self) -> str:
        """``starting``, ``healthy``, ``degraded`` (etcd out of reach) or ``stopped``."""
        return self._etcd.state

    @property
    def healthy(self) -> bool:
        return self._etcd.state == HEALTHY

    @property
    def revision(self) -> int:
        """The etcd revision the table reflects (the watch resumes after it)."""
        return self._etcd.revision

    @property
    def epoch(self) -> bytes:
        """The value of the cluster's epoch key when this node last registered (b"" before
        that): another value later means etcd lost its data (restored or rebuilt)."""
        return self._epoch

    @property
    def last_error(self) -> str:
        return self._etcd.last_error

    @property
    def relists(self) -> int:
        """Full listings of the table."""
        return self._etcd.relists

    @property
    def resumes(self) -> int:
        """Watches resumed after a break."""
        return self._etcd.resumes

    @property
    def sessions(self) -> int:
        """Sessions with etcd opened."""
        return self._etcd.sessions

    def status(self) -> dict[str, Any]:
        """For /ready and metrics."""
        return {
            "state": self.state,
            "cluster": self.cluster,
            "node": self.node_id,
            "nodes": len(self._nodes),
            "revision": self.revision,
            "lease": self.lease_id,
            "registrations": self.registrations,
            "relists": self.relists,
            "resumes": self.resumes,
            "last_error": self.last_error,
        }

    def on_change(self, callback: Callable[[MemberEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every change of another node; returns an unsubscriber."""
        self._change_cbs.append(callback)
        return lambda: self._change_cbs.remove(callback)

    def on_state(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(state)`` when the state changes (healthy, degraded, stopped)."""
        return self._etcd.on_state(callback)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float | None = None) -> None:
        """Register and list the cluster; ClusterError if not done within ``timeout``
        (default: the lease TTL + 5 s, long enough for a crashed predecessor's key with
        the same node id to expire)."""
        self._etcd.start()
        wait = timeout if timeout is not None else self.ttl + 5.0
        if not await self._etcd.started(wait):
            err = self.last_error or "no answer"
            await self.stop(deregister=False)
            eps = ",".join(f"{h}:{p}" for h, p in self.endpoints)
            cls = NodeIdTaken if self._taken else ClusterError
            raise cls(
                f"could not join cluster {self.cluster!r} through etcd at {eps} "
                f"within {wait:g}s: {err}"
            ) from None

    async def stop(self, deregister: bool = True) -> None:
        """Leave: revoke the lease (others see this node go at once) and stop.

        ``deregister=False`` just stops, as a crash would look to the others: the key
        stays until its lease expires.
        """
        self._etcd.stopping = True
        client = self._etcd.client
        if deregister and client is not None and self.lease_id and self.state == HEALTHY:
            # in a task of its own: if the session's client closes under it, gRPC cancels
            # the call, and that CancelledError must not pass for a cancellation of stop()
            revoke = asyncio.ensure_future(client.revoke_lease(self.lease_id))
            done, _ = await asyncio.wait({revoke}, timeout=self.request_timeout)
            if not done:
                revoke.cancel()
            err = "timed out" if not done else "cancelled" if revoke.cancelled() else None
            if err is None and revoke.exception() is not None:
                err = str(revoke.exception())
            if err is not None:
                log.info("cluster %s: could not revoke the lease on stop: %s", self.cluster, err)
        await self._etcd.stop()

    # ------------------------------------------------------------------ internals

    def _log_state(self, state: str) -> None:
        if state == DEGRADED:
            log.warning(
                "cluster %s: etcd unreachable: degraded (serving %d known nodes)",
                self.cluster,
                len(self._nodes),
            )
        elif state == HEALTHY and self._was_degraded:
            log.info(
                "cluster %s: etcd reachable again: healthy at revision %d",
                self.cluster,
                self.revision,
            )
        self._was_degraded = state == DEGRADED

    def _emit(self, kind: str, node_id: str, info: NodeInfo) -> None:
        if node_id == self.node_id:
            return
        ev = MemberEvent(kind, node_id, info)
        for cb in list(self._change_cbs):
            try:
                cb(ev)
            except Exception:
                log.exception("cluster: change callback failed")

    async def _prepare(self, client: Any) -> None:
        """Register, or check the registration (each session's first step, and again when
        our key was deleted behind our back)."""
        async with self._reg_lock:
            await self._register(client)

    async def _register(self, client: Any) -> None:
        """Make sure our key exists, bound to a live lease of ours (called under _reg_lock)."""
        if self._etcd.stopping:
            return
        if self.lease_id:
            r = await client.refresh_lease(self.lease_id)
            if r is None or r.TTL <= 0:
                log.warning(
                    "cluster %s: lease of node %s expired (etcd out of reach for over %ds): "
                    "registering again",
                    self.cluster,
                    self.node_id,
                    self.ttl,
                )
                self.lease_id = 0
        if not self.lease_id:
            lease = await client.lease(self.ttl)
            self.lease_id = lease.id
        key, value = self._key, self.info.value()
        tx = client.transactions
        ok, resp = await client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, value, self.lease_id)],
            failure=[tx.get(key)],
        )
        if ok:
            rev = int(resp[0].response_put.header.revision)
            self._own_rev = rev
            self.registrations += 1
            log.info(
                "cluster %s: node %s registered (lease %x, ttl %ds)",
                self.cluster,
                self.node_id,
                self.lease_id,
                self.ttl,
            )
        else:
            if not resp or not resp[0]:
                raise ClusterError("registration transaction failed without a key")
            _, kv = resp[0][0]
            rev = int(kv.header.revision)
            if kv.lease != self.lease_id:
                self._taken = True
                raise NodeIdTaken(
                    f"node id {self.node_id!r} is held by another registration "
                    f"(lease {kv.lease:x}); waiting for it to expire"
                )
            self._own_rev = max(self._own_rev, int(kv.mod_revision))
            if kv.value != value:
                r = await client.put(key, value, lease=self.lease_id)
                self._own_rev = rev = int(r.header.revision)
        epoch = await self._etcd_epoch(client)
        if self._epoch and epoch != self._epoch:
            log.warning(
                "cluster %s: etcd lost its data (restored or rebuilt): listing again",
                self.cluster,
            )
            self._etcd.relist_needed = True
        elif rev < self.revision:
            log.warning(
                "cluster %s: etcd is at revision %d, behind the %d seen before: listing again",
                self.cluster,
                rev,
                self.revision,
            )
            self._etcd.relist_needed = True
        self._epoch = epoch
        self._lost_self = False
        self._taken = False

    async def _etcd_epoch(self, client: Any) -> bytes:
        """The cluster's epoch key: created once, never leased, so a different (or missing)
        value means etcd's data is not the data this node saw (a restore or a rebuild), and
        a watch resumed at an old revision would miss changes: the table is listed again."""
        key = self._epoch_key
        tx = client.transactions
        fresh = os.urandom(8).hex().encode()
        ok, resp = await client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, fresh)], failure=[tx.get(key)]
        )
        if ok:
            return fresh
        return bytes(resp[0][0][0])

    def _listed(self, r: Any) -> None:
        """A full listing (the session sets the revision after): report the difference."""
        seen: dict[str, NodeInfo] = {}
        for kv in r:
            info = self._parse(kv)
            if info is not None:
                seen[info.node_id] = info
        old = self._nodes
        for node_id, info in seen.items():
            before = old.get(node_id)
            old[node_id] = info
            if before is None:
                self._emit("join", node_id, info)
            elif before != info:
                self._emit("update", node_id, info)
        for node_id in [n for n in old if n not in seen and n != self.node_id]:
            self._emit("leave", node_id, old.pop(node_id))

    def _parse(self, kv: Any) -> NodeInfo | None:
        node_id = bytes(kv.key[len(self._prefix_b) :]).decode("utf-8", "replace")
        try:
            return NodeInfo.from_value(node_id, kv.value, int(kv.create_revision), int(kv.lease))
        except ValueError as e:
            log.warning("cluster %s: ignoring bad registration of %r: %s", self.cluster, node_id, e)
            return None

    def _changed(self, ev: Any) -> Awaitable[None] | None:
        """A watch event; our own key deleted behind our back: register again (awaited by
        the session before the next event)."""
        self._apply(ev)
        if self._lost_self and not self._etcd.stopping:
            return self._prepare(self._etcd.client)
        return None

    def _apply(self, ev: Any) -> None:
        kv = ev.kv
        rev = int(kv.mod_revision)
        node_id = bytes(kv.key[len(self._prefix_b) :]).decode("utf-8", "replace")
        if ev.kind == "PUT":
            info = self._parse(kv)
            if info is None:
                return
            before = self._nodes.get(node_id)
            self._nodes[node_id] = info
            if before is None:
                self._emit("join", node_id, info)
            elif before != info:
                self._emit("update", node_id, info)
        else:
            if node_id == self.node_id:
                if rev > self._own_rev and not self._etcd.stopping:
                    log.warning(
                        "cluster %s: this node's key was deleted (lease expired?): "
                        "registering again",
                        self.cluster,
                    )
                    self._lost_self = True
                return
            gone = self._nodes.pop(node_id, None)
            if gone is not None:
                self._emit("leave", node_id, gone)

    async def _keepalive(self, client: Any) -> None:
        """Next to the watch for the whole session: refresh the lease every TTL/3."""
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            r = await client.refresh_lease(self.lease_id)
            if (r is None or r.TTL <= 0) and not self._etcd.stopping:
                async with self._reg_lock:
                    await self._register(client)


def _version() -> str:

    return __version__
