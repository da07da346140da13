"""Event webhooks, the sending side: the outbox of the store, POSTed to ``events_url`` in
order, at least once (docs/events.md).

Why one sender per store, behind a lease: the outbox is one ordered log (per sqlite
file, shared by a node's workers; per Redis prefix, shared by a cluster). If a single
process sends it, oldest first, one batch in flight, retrying that same batch until a
2xx, then the backend receives the events in outbox order, and so every user's events in
the order they happened: per-user order holds by construction, with no per-user
bookkeeping. Every process runs a :class:`Sender`; the one holding the lease (a row /
key with its owner and an expiry, renewed before each request and during back-offs)
sends, the others stand by and try to take the lease every ``events_lease / 3``
seconds. When the holder dies (``kill -9``), its lease expires and another process
takes over, resending the batch that was in flight (the backend deduplicates by id).

The holder also claims the armed events of dead processes (:meth:`Store.outbox_claim`:
their connections' ``disconnect`` with reason ``node_lost``) about once a second.

Memory: one batch (``events_batch`` events) at a time; a backlog of millions stays in
the store. The HTTP client is aiohttp on the event loop (nothing blocks it), one
keep-alive connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..store import OutboxEntry, Store, StoreError
from ..tasks import backoff_delay

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("fastim.events")

#: seconds between looks at an empty outbox (events of other processes; a local add
#: wakes the sender at once)
POLL = 0.25
#: seconds between claims of dead processes' armed events
CLAIM_EVERY = 1.0
#: first retry delay (doubling, jittered, up to events_retry_max)
RETRY_FIRST = 0.1

STATES = ("standby", "idle", "sending", "retrying", "stopped")


class Sender:
    """POSTs the outbox to ``url`` while this process holds the sender lease."""

    def __init__(
        self,
        store: Store,
        owner: str,
        url: str,
        *,
        timeout: float,
        batch: int,
        retry_max: float,
        lease: float,
        secret: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.url = url
        self.timeout = timeout
        self.batch = batch
        self.retry_max = retry_max
        self.lease = lease
        self._headers = {
            "Content-Type": "application/json",
            "X-Fastim-Sender": owner,  # which process sent: for the operator's logs
            **(headers or {}),
        }
        if secret:
            self._headers["Authorization"] = f"Bearer {secret}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._last_claim = 0.0
        self._lease_until = 0.0
        #: standby (another process sends), idle, sending, retrying, stopped
        self.state = "standby"
        # counters (fastim.api.metrics)
        self.delivered_events = 0
        self.delivered_batches = 0
        self.claimed = 0
        self.takeovers = 0
        self.failures: dict[str, int] = {"status": 0, "timeout": 0, "connection": 0, "store": 0}

    def wake(self) -> None:
        """Events were added here: look now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop sending and release the lease (another process takes over at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.state != "standby":
            try:
                await self.store.outbox_lease(self.owner, 0)
            except StoreError:
                pass
        self.state = "stopped"
        if self._http is not None:
            await self._http.close()

    # ------------------------------------------------------------------ the loop

    async def _hold(self) -> bool:
        """Take or renew the lease; False: another process holds it (or the store failed)."""
        try:
            held = await self.store.outbox_lease(self.owner, self.lease)
        except StoreError as e:
            self.failures["store"] += 1
            log.warning("events: lease: %s", e)
            return False
        if held:
            if self.state == "standby":
                self.takeovers += 1
                log.info("events: %s sends the outbox", self.owner)
            self._lease_until = time.monotonic() + self.lease
        return held

    async def _nap(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> None:
        import aiohttp  # here, not at import: ~23 MB per process, for nodes with events only

        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=30)
        self._http = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            skip_auto_headers=("User-Agent",),
        )
        while True:
            if not await self._hold():
                self.state = "standby"
                await asyncio.sleep(self.lease / 3)
                continue
            try:
                now = time.monotonic()
                if now - self._last_claim >= CLAIM_EVERY:
                    self._last_claim = now
                    n = await self.store.outbox_claim()
                    if n:
                        self.claimed += n
                        log.info("events: %d events of lost processes claimed", n)
                batch = await self.store.outbox_read(self.batch)
            except StoreError as e:
                self.failures["store"] += 1
                log.warning("events: outbox read failed: %s", e)
                await asyncio.sleep(min(1.0, self.lease / 3))
                continue
            if not batch:
                self.state = "idle"
                await self._nap(min(POLL, self.lease / 3))
                continue
            if await self._deliver(batch):
                try:
                    await self.store.outbox_remove([e.key for e in batch])
                except StoreError as e:
                    # sent but still in the outbox: sent again later (at least once)
                    self.failures["store"] += 1
                    log.warning("events: outbox remove failed: %s", e)

    async def _deliver(self, batch: list[OutboxEntry]) -> bool:
        """POST ``batch`` until a 2xx (True), retrying with backoff and jitter; False if
        the lease was lost meanwhile (the new holder sends it)."""
        body = b'{"events":[' + b",".join(e.data for e in batch) + b"]}"
        attempt = 0
        self.state = "sending"
        while True:
            late = time.monotonic() + self.timeout > self._lease_until - self.lease / 3
            if late and not await self._hold():
                self.state = "standby"
                return False
            kind = await self._post(body)
            if kind is None:
                self.delivered_events += len(batch)
                self.delivered_batches += 1
                return True
            self.failures[kind] += 1
            self.state = "retrying"
            delay = backoff_delay(attempt, RETRY_FIRST, self.retry_max)
            attempt += 1
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    "events: POST of %d events failed (%s, attempt %d), retrying in %.2fs",
                    len(batch),
                    kind,
                    attempt,
                    delay,
                )
            # sleep in slices short enough to keep the lease
            end = time.monotonic() + delay
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(left, self.lease / 3))
                if not await self._hold():
                    self.state = "standby"
                    return False

    async def _post(self, body: bytes) -> str | None:
        """One POST: None on a 2xx, else the failure kind."""
        import aiohttp  # (imported by _run already: a dict lookup here)

        assert self._http is not None
        try:
            async with self._http.post(self.url, data=body, headers=self._headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return None
                return "status"
        except asyncio.TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError):
            return "connection"
