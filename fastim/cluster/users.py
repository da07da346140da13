"""User routes: which nodes hold connections of which users, kept in etcd.

**Keys.** A node that has at least one connection of user ``U`` writes
``<prefix>/<cluster>/users/<U>/<node_id>`` (empty value) under *the node's own lease*
(the one :class:`~fastim.cluster.membership.Membership` keeps alive). So a node that
dies takes its routes with it when its lease expires, and a graceful stop (which revokes
the lease) removes them at once: nobody has to clean up after anybody. A user with ten
connections on one node is one key; the key goes when the last of them closes. Node ids
never contain ``/``, so the last ``/`` of a key separates the user (which may contain
``/``) from the node.

**Batching.** Connections come and go by thousands per second on a busy node; a write
per attach would make etcd the bottleneck. :meth:`UserRoutes.add` and
:meth:`UserRoutes.discard` only mark the user dirty; a flush (``delay`` after the first
mark, and again as soon as the previous flush returned) compares what is wanted with
what is written and sends the difference as transactions of up to ``max_ops`` puts and
deletes (etcd refuses more than 128 operations per transaction by default). A user who
leaves and comes back within one batch window costs nothing.

**The cluster's routes** (:meth:`UserRoutes.nodes_of`) are a listing of ``users/`` then a
watch from the listing's revision + 1, resumed after any break at the last revision seen
(as membership does: no change lost, none seen twice), listed again when that revision
was compacted or etcd's revision went backwards (restored or rebuilt). The session
(connect, list, watch, reconnect with backoff) is an
:class:`~fastim.cluster.etcd.EtcdSession` of its own, over the membership's endpoints.

**Lease changes.** When membership loses its lease (etcd out of reach for over the TTL)
it registers again under a new one; the old lease's keys are gone. UserRoutes notices
the new ``lease_id`` (checked every ``check`` seconds and before every write), forgets
what it had written and writes every local user again under the new lease. Our own key
deleted behind our back (its lease expired) is written again the same way.

Who uses it: the cluster's direct-message router (:mod:`fastim.cluster.dm`) asks
``nodes_of(user)`` to know where to send a direct message, and is told through
``on_registered`` when a local user's route is in etcd (from then on the other nodes
find it, within their watch's latency).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from . import ClusterError
from .etcd import EtcdSession
from .membership import Membership

__all__ = ["UserRoutes", "users_prefix"]

log = logging.getLogger("fastim.cluster")

#: etcd's default --max-txn-ops is 128; stay well under it
MAX_OPS = 64


def users_prefix(prefix: str, cluster: str) -> str:
    """The etcd key prefix of a cluster's user routes."""
    return f"{prefix.rstrip('/')}/{cluster}/users/"


class UserRoutes:
    """This node's user registrations in etcd, and the cluster's map user → node ids.

    ``await start()`` lists the routes and starts a background task that writes this
    node's changes in batches and follows the watch, reconnecting (with backoff, over
    the membership's endpoints) until ``await stop()``. Local users are declared with
    :meth:`add` / :meth:`discard` (set semantics: the caller counts connections).
    """

    def __init__(
        self,
        membership: Membership,
        *,
        delay: float = 0.005,
        max_ops: int = MAX_OPS,
        check: float = 0.25,
        backoff: tuple[float, float] = (0.1, 2.0),
        on_registered: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.membership = membership
        self.node_id = membership.node_id
        self.delay = delay
        self.max_ops = max(1, min(int(max_ops), 128))
        self.check = check
        self.backoff = backoff
        #: told (in the loop) which local users' routes were just written to etcd
        self.on_registered = on_registered
        self._prefix_b = users_prefix(membership.prefix, membership.cluster).encode()
        # local side: wanted (connections here), written (key in etcd under _lease), dirty
        self._wanted: set[str] = set()
        #: user -> etcd revision of the put that wrote its key
        self._written: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._lease = 0
        # cluster side: user -> node ids, from the listing + watch
        self._routes: dict[str, set[str]] = {}
        self._epoch = b""
        self._kick = asyncio.Event()
        #: counters: transactions sent, puts and deletes in them, re-registrations after
        #: a lease change (listings and resumes: see status())
        self.txns = 0
        self.puts = 0
        self.deletes = 0
        self.reregistrations = 0
        self._etcd = EtcdSession(
            "user routes",
            membership.endpoints,
            self._prefix_b,
            prepare=self._prepare,
            listed=self._listed,
            changed=self._apply,
            alongside=self._writer,
            request_timeout=membership.request_timeout,
            backoff=backoff,
            keys_only=True,
        )

    # ------------------------------------------------------------------ local users

    def add(self, user: str) -> None:
        """``user`` has a connection on this node (again): make sure its route exists."""
        if user not in self._wanted:
            self._wanted.add(user)
            self._mark(user)

    def discard(self, user: str) -> None:
        """``user``'s last connection on this node closed: remove its route."""
        if user in self._wanted:
            self._wanted.discard(user)
            self._mark(user)

    def _mark(self, user: str) -> None:
        self._dirty.add(user)
        self._kick.set()

    def is_registered(self, user: str) -> bool:
        """Whether ``user``'s route on this node is written in etcd under the live lease."""
        return user in self._written and self._lease == self.membership.lease_id

    @property
    def local(self) -> frozenset[str]:
        return frozenset(self._wanted)

    @property
    def pending(self) -> int:
        """Local changes not written yet."""
        return len(self._dirty)

    # ------------------------------------------------------------------ cluster map

    def nodes_of(self, user: str) -> frozenset[str]:
        """The node ids holding connections of ``user`` (this node included, as etcd says)."""
        nodes = self._routes.get(user)
        return frozenset(nodes) if nodes else frozenset()

    @property
    def routes(self) -> Mapping[str, set[str]]:
        """The whole map user → node ids (read-only use)."""
        return self._routes

    @property
    def healthy(self) -> bool:
        """The map is current: a session with etcd is up (and we are not stopping)."""
        return self._etcd.up

    @property
    def revision(self) -> int:
        """The etcd revision the route map reflects (the watch resumes after it)."""
        return self._etcd.revision

    @property
    def last_error(self) -> str:
        return self._etcd.last_error

    @property
    def relists(self) -> int:
        """Full listings of the routes."""
        return self._etcd.relists

    @property
    def resumes(self) -> int:
        """Watches resumed after a break."""
        return self._etcd.resumes

    def status(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "local": len(self._wanted),
            "written": len(self._written),
            "pending": len(self._dirty),
            "users": len(self._routes),
            "revision": self.revision,
            "txns": self.txns,
            "puts": self.puts,
            "deletes": self.deletes,
            "relists": self.relists,
            "resumes": self.resumes,
            "reregistrations": self.reregistrations,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 10.0, wait: bool = True) -> None:
        """List the routes and start following them; ClusterError if etcd does not answer
        within ``timeout``. With ``wait=False`` return at once: the listing is made in the
        background (``healthy`` tells when the map is current)."""
        self._etcd.start()
        if not wait:
            return
        if not await self._etcd.started(timeout):
            await self.stop()
            raise ClusterError(
                f"user routes: no answer from etcd in {timeout:g}s: "
                f"{self.last_error or 'no answer'}"
            ) from None

    async def stop(self) -> None:
        """Stop writing and following. The keys stay until the node's lease goes (the
        membership revokes it on a graceful stop: then they go at once)."""
        await self._etcd.stop()

    # ------------------------------------------------------------------ internals

    async def _prepare(self, client: Any) -> None:
        """Before each session's watch: was etcd restored or rebuilt meanwhile? Then its
        revision is behind ours (a resumed watch would wait for revisions that already
        mean something else), or membership saw the cluster's epoch key change: list again."""
        etcd = self._etcd
        epoch = self.membership.epoch
        if self._epoch and epoch != self._epoch:
            etcd.relist_needed = True
        self._epoch = epoch
        if etcd.revision and not etcd.relist_needed:
            # an empty range (no user starts with 0xff in UTF-8): just the header
            probe = await client.get_prefix(self._prefix_b + b"\xff", keys_only=True)
            now = int(probe.header.revision)
            if now < etcd.revision:
                log.warning(
                    "user routes: etcd is at revision %d, behind the %d seen: listing again",
                    now,
                    etcd.revision,
                )
                etcd.relist_needed = True

    def _split(self, key: bytes) -> tuple[str, str] | None:
        rest = bytes(key[len(self._prefix_b) :]).decode("utf-8", "replace")
        user, sep, node = rest.rpartition("/")
        if not sep or not user or not node:
            return None
        return user, node

    def _listed(self, r: Any) -> None:
        """A full listing (the session sets the revision after): the map, and what of
        ours etcd has."""
        routes: dict[str, set[str]] = {}
        mine: set[str] = set()
        for kv in r:
            parts = self._split(kv.key)
            if parts is None:
                continue
            user, node = parts
            routes.setdefault(user, set()).add(node)
            if node == self.node_id and int(kv.lease) == self._lease:
                mine.add(user)
        self._routes = routes
        # what etcd has of ours is what is written; anything else must be written again
        lost = set(self._written) - mine
        for user in lost:
            del self._written[user]
        self._dirty |= lost & self._wanted
        stale = mine - self._wanted
        for user in stale:
            self._written.setdefault(user, 0)
        self._dirty |= stale
        if self._dirty:
            self._kick.set()

    def _apply(self, ev: Any) -> None:
        kv = ev.kv
        parts = self._split(kv.key)
        if parts is None:
            return
        user, node = parts
        if ev.kind == "PUT":
            self._routes.setdefault(user, set()).add(node)
            return
        nodes = self._routes.get(user)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self._routes[user]
        rev = self._written.get(user)
        if node == self.node_id and rev is not None and int(kv.mod_revision) > rev:
            # deleted after our last put, and not by our writer (it forgets the user
            # before its delete): the lease expired. Write it again.
            del self._written[user]
            if user in self._wanted:
                log.warning(
                    "user routes: route of %r vanished (lease expired?): writing again", user
                )
                self._mark(user)

    async def _writer(self, client: Any) -> None:
        """Flush the dirty users in batches; watch for a new membership lease."""
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.check)
            except asyncio.TimeoutError:
                pass
            lease = self.membership.lease_id
            if lease != self._lease:
                self._new_lease(lease)
            if not self._dirty or not self._lease:
                self._kick.clear()
                continue
            if self.delay > 0:
                await asyncio.sleep(self.delay)  # let a burst of attaches gather
            self._kick.clear()
            await self._flush(client)

    def _new_lease(self, lease: int) -> None:
        """Membership registered again (new lease): the old lease's keys are gone (or
        going); everything local is written again under the new one."""
        if self._lease and self._wanted:
            log.info(
                "user routes: node lease changed (%x -> %x): writing %d users again",
                self._lease,
                lease,
                len(self._wanted),
            )
            self.reregistrations += 1
        self._lease = lease
        self._written.clear()
        self._dirty |= self._wanted
        if self._dirty:
            self._kick.set()

    async def _flush(self, client: Any) -> None:
        tx = client.transactions
        while self._dirty:
            lease = self._lease
            batch: list[str] = []
            ops: list[Any] = []
            puts: list[str] = []
            for user in list(self._dirty):
                if len(ops) >= self.max_ops:
                    break
                self._dirty.discard(user)
                want, have = user in self._wanted, user in self._written
                if want == have:
                    continue  # left and came back within the window: nothing to write
                batch.append(user)
                key = self._prefix_b + user.encode() + b"/" + self.node_id.encode()
                if want:
                    ops.append(tx.put(key, b"", lease))
                    puts.append(user)
                else:
                    ops.append(tx.delete(key))
            if not ops:
                return
            for user in batch:
                if user not in puts:
                    # forgotten before the delete is sent: its watch event is ours
                    self._written.pop(user, None)
            try:
                _ok, resp = await client.transaction(compare=[], success=ops, failure=[])
            except BaseException:
                # outcome unknown: try again next time (a put or delete twice is harmless)
                for user in batch:
                    if user not in puts:
                        self._written.setdefault(user, 0)
                self._dirty.update(batch)
                raise
            self.txns += 1
            self.puts += len(puts)
            self.deletes += len(ops) - len(puts)
            if lease != self._lease:
                continue  # the lease changed meanwhile: _new_lease marked everyone
            rev = _txn_revision(resp)
            for user in puts:
                self._written[user] = rev
            # users that changed again while the transaction was in flight are dirty
            # again and get the next batch
            done = [u for u in puts if u in self._wanted]
            if done and self.on_registered is not None:
                try:
                    self.on_registered(done)
                except Exception:
                    log.exception("user routes: on_registered callback failed")


def _txn_revision(responses: list[Any]) -> int:
    """The revision a transaction committed at (from its first put or delete)."""
    for r in responses:
        for name in ("response_put", "response_delete_range"):
            if r.HasField(name):
                return int(getattr(r, name).header.revision)
    return 0
