"""etcd sessions: the connect / list / watch / reconnect loop of membership and user routes.

A node keeps two things in etcd, each through a session of its own (one gRPC
connection): its membership (:mod:`fastim.cluster.membership`: its key under a lease it
keeps alive, and the routing table of the cluster's nodes) and its users' routes
(:mod:`fastim.cluster.users`). Both follow one key prefix the same way, and
:class:`EtcdSession` is that way; what differs is given to it as hooks.

**A session** connects to one of the endpoints (the next one after each failure), runs
``prepare`` (membership registers, or re-checks its lease; user routes check whether
etcd was restored or rebuilt), opens the watch, and is ``healthy``. Then ``alongside``
(membership: the lease keep-alive; user routes: the batched writer) runs next to the
watch until either of them ends or fails, which ends the session. Every etcd call has
``request_timeout``, so a hung etcd ends it too.

**The watch** resumes after any break at ``revision + 1``: what changed meanwhile is
replayed in order, once. When that revision was compacted (etcd refuses the watch, or
accepts it and cancels it at once) or the user found etcd restored or rebuilt (it sets
``relist_needed``), the prefix is listed again (``listed``) and watched from the
listing's revision + 1. Every event moves ``revision`` forward before ``changed`` sees it.

**Reconnect.** A session that fails before it was healthy is tried again after an
exponential backoff with jitter (:func:`fastim.tasks.backoff_delay`; ``backoff`` = first
delay, cap) that grows with each failure; after a healthy session ends it starts over
from the first delay. ``state`` is ``starting`` until the first session is healthy, then
``healthy`` or ``degraded`` (no session up; what the user knows is kept), and
``stopped`` after :meth:`EtcdSession.stop`.

The etcd client is ``aetcd`` (asyncio, gRPC), imported only when a session starts, so
the rest of fastim does not need it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..tasks import backoff_delay, until_one_ends
from . import ClusterError

__all__ = [
    "DEGRADED",
    "HEALTHY",
    "STARTING",
    "STOPPED",
    "EtcdSession",
    "describe",
    "import_aetcd",
]

log = logging.getLogger("fastim.cluster")

STARTING = "starting"
HEALTHY = "healthy"
DEGRADED = "degraded"
STOPPED = "stopped"


def import_aetcd() -> Any:
    """The ``aetcd`` module; ClusterError naming the extra to install if it is missing."""
    try:
        import aetcd  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the extra is part of `test`
        raise ClusterError(
            "clustering needs the etcd client: pip install 'fastim[cluster]' (aetcd)"
        ) from None
    return aetcd


def describe(e: BaseException) -> str:
    """``"Type: message"`` (or just the type when there is no message), for last_error."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class EtcdSession:
    """Sessions with etcd following one key prefix, one after the other until stopped.

    ``label`` starts its log lines ("cluster main", "user routes"). The hooks, each
    called with the session's aetcd client or with what etcd sent:

    - ``prepare(client)``: before the watch opens, at every session; may set
      ``relist_needed``. An exception fails the session.
    - ``listed(response)``: a full listing of the prefix (``get_prefix``; keys only with
      ``keys_only``); ``revision`` becomes the listing's after it returns.
    - ``changed(event)``: one watch event, in etcd's order. It may return an awaitable,
      awaited before the next event (membership re-registers there).
    - ``alongside(client)``: runs next to the watch for the whole session.

    ``start()`` starts the loop; :meth:`started` waits for the first healthy session.
    """

    def __init__(
        self,
        label: str,
        endpoints: Sequence[tuple[str, int]],
        prefix: bytes,
        *,
        prepare: Callable[[Any], Awaitable[None]],
        listed: Callable[[Any], None],
        changed: Callable[[Any], Awaitable[None] | None],
        alongside: Callable[[Any], Coroutine[Any, Any, None]],
        request_timeout: float,
        backoff: tuple[float, float],
        keys_only: bool = False,
    ) -> None:
        if not endpoints:
            raise ClusterError("no etcd endpoint given")
        self.label = label
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.request_timeout = request_timeout
        self.backoff = backoff
        self.keys_only = keys_only
        self._prepare = prepare
        self._listed = listed
        self._changed = changed
        self._alongside = alongside
        self.state = STARTING
        self.last_error = ""
        #: the etcd revision the user's view reflects (the watch resumes after it)
        self.revision = 0
        #: set by ``prepare`` when etcd lost its data: the next watch lists again first
        self.relist_needed = False
        #: True from stop() on
        self.stopping = False
        #: the client of the session in progress (None between sessions)
        self.client: Any = None
        #: counters: sessions opened, full listings, watches resumed
        self.sessions = 0
        self.relists = 0
        self.resumes = 0
        self._ep = 0
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._state_cbs: list[Callable[[str], None]] = []

    @property
    def up(self) -> bool:
        """A session is healthy and the loop is not stopping."""
        return self.state == HEALTHY and not self.stopping

    def on_state(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(state)`` when the state changes; returns an unsubscriber."""
        self._state_cbs.append(callback)
        return lambda: self._state_cbs.remove(callback)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the session loop (in the running event loop)."""
        if self._task is not None:
            raise RuntimeError("already started")
        self._started = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._run())

    async def started(self, timeout: float) -> bool:
        """Wait until a session was healthy once: True, or False after ``timeout``."""
        assert self._started is not None, "start() first"
        try:
            await asyncio.wait_for(asyncio.shield(self._started), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """End the session in progress and the loop; the state becomes ``stopped``."""
        self.stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._set_state(STOPPED)

    # ------------------------------------------------------------------ internals

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for cb in list(self._state_cbs):
            try:
                cb(state)
            except Exception:
                log.exception("%s: state callback failed", self.label)

    async def _run(self) -> None:
        attempt = 0
        while not self.stopping:
            was_up = False
            try:
                was_up = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = describe(e)
                if err != self.last_error:
                    log.warning("%s: etcd: %s", self.label, err)
                self.last_error = err
                self._ep += 1  # next endpoint, if there are several
            if self.stopping:
                break
            if self.state == HEALTHY:
                self._set_state(DEGRADED)
            attempt = 0 if was_up else attempt + 1
            await asyncio.sleep(backoff_delay(attempt, *self.backoff))

    async def _session(self) -> bool:
        """One connection to etcd: prepare, catch up, then ``alongside`` + the watch until
        either fails. Returns True when a session that got healthy ends (reconnect at
        once); raises when it never got that far (reconnect after a growing backoff)."""
        aetcd = import_aetcd()
        host, port = self.endpoints[self._ep % len(self.endpoints)]
        client = aetcd.Client(host=host, port=port, timeout=self.request_timeout)
        self.client = client
        self.sessions += 1
        healthy = False
        try:
            await self._prepare(client)
            watch = await self._open_watch(client, aetcd)
            healthy = True
            self.last_error = ""
            self._set_state(HEALTHY)
            if self._started is not None and not self._started.done():
                self._started.set_result(None)
            await until_one_ends(self._alongside(client), self._follow(client, watch, aetcd))
            raise ClusterError("etcd session ended")
        except Exception as e:
            if healthy:
                # tell _run that this session was up: reconnect without a long backoff
                self.last_error = describe(e)
                log.warning("%s: etcd session lost: %s", self.label, self.last_error)
                self._ep += 1
                return True
            raise
        finally:
            self.client = None
            try:
                await asyncio.wait_for(client.close(), 2.0)
            except Exception:
                pass

    async def _open_watch(self, client: Any, aetcd: Any) -> Any:
        """Resume the watch after the last revision seen; list again if it cannot."""
        if self.revision and not self.relist_needed:
            try:
                watch = await client.watch_prefix(self.prefix, start_revision=self.revision + 1)
            except aetcd.RevisionCompactedError as e:
                self._compacted(e)
            else:
                self.resumes += 1
                return watch
        await self._relist(client)
        return await client.watch_prefix(self.prefix, start_revision=self.revision + 1)

    def _compacted(self, e: Any) -> None:
        log.info(
            "%s: revision %d compacted (now %s): listing again",
            self.label,
            self.revision + 1,
            e.compacted_revision,
        )

    async def _relist(self, client: Any) -> None:
        r = await client.get_prefix(self.prefix, keys_only=self.keys_only)
        self._listed(r)
        self.revision = int(r.header.revision)
        self.relist_needed = False
        self.relists += 1

    async def _follow(self, client: Any, watch: Any, aetcd: Any) -> None:
        while True:
            try:
                async for ev in watch:
                    self.revision = max(self.revision, int(ev.kv.mod_revision))
                    then = self._changed(ev)
                    if then is not None:
                        await then
            except aetcd.RevisionCompactedError as e:
                # etcd accepts a watch from a compacted revision, then cancels it
                self._compacted(e)
                await self._relist(client)
                watch = await client.watch_prefix(self.prefix, start_revision=self.revision + 1)
                continue
            raise ClusterError("etcd watch ended")
