"""Publish from a Redis stream: the node consumes ``ingest_redis_stream`` (docs/ingest.md).

A backend XADDs entries (``channel`` or ``user``, ``data``, optional ``idempotency_key``)
to one or more Redis streams; every node of the deployment reads them through one
consumer group, publishes each entry to its channel (or sends it to its user's inbox)
through the same path as the HTTP API, and XACKs it only once the node acknowledged it
(stored, for a durable channel or an inbox). It is the relay end of the *outbox
pattern*: the backend writes its database row and its outbox row in one transaction,
and a relay moves outbox rows to the stream (``examples/outbox_relay/``).

Why it is built this way:

* **One consumer per stream at a time (a lease), streams as shards.** A consumer group
  splits entries between its consumers one by one, so two nodes would publish the
  entries of one channel concurrently and in no particular order. Instead each stream
  has a lease in Redis (``SET NX PX``, renewed every third of ``ingest_claim_idle``);
  only its holder reads it, so every stream is consumed in order. Work is shared by
  giving several streams (shards; the producer picks ``hash(channel) % n``) to several
  consumers: each takes at most its fair share (streams / live consumers, consumers
  counted by a heartbeat in a sorted set) and gives back what it holds above it.
* **Take-over of a dead consumer.** A lease that was not renewed for
  ``ingest_claim_idle`` seconds (a node killed with ``kill -9``) is taken by another
  consumer, which first claims (``XAUTOCLAIM``) every pending entry of the stream, then
  reads its own pending entries, then new ones: nothing is skipped, and the order of
  the stream is kept.
* **Ack after the node acked.** A channel entry goes through :meth:`Hub.publish` (the
  durable ack comes after the store took it); a ``user`` entry through the store's
  ``inbox_append`` and :meth:`Postman.deliver`, as ``/api/send`` does. Only then, in
  one ``MULTI``: ``SET`` of the idempotency key (for ``ingest_idempotency_window``),
  ``XADD`` of the batch's poison entries to the dead-letter stream, ``XACK``.
* **Exactly once per key, across a crash.** The key also goes with the publish: the
  channel's owner records it in the store's append itself (``Store.append_keyed``, one
  transaction with the message; a ``user`` entry's key is the send's ``cid``), so an
  entry stored by a consumer killed before its ``MULTI`` is recognised when it comes
  again and is not stored twice. The ``MGET`` of the seen keys is the fast path that
  skips the hub for entries whose ``MULTI`` went through.
* **Order per channel.** The entries of one batch go to the hub in stream order; the hub
  keeps publish order per channel (one store append per channel in flight, and the
  publishes queued in one tick go in one ``append_many``: all stored or none). A
  channel this node does not own (a cluster, workers) is published one entry at a time,
  since forwarded publishes of one channel may be answered separately. A transient
  failure (store down, owner not routed) leaves the entry and every later entry of its
  channel pending; they are retried, in order, with backoff, before the stream is read
  further.
* **Poison vs transient.** A malformed entry can never succeed: it goes to the
  dead-letter stream with its reason at once and does not block the ones after it. A
  store outage can: it is waited out, however long. An entry delivered more than
  ``ingest_max_deliveries`` times (consumers died or restarted while on it) is poison.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..codes import ErrorCode
from ..config import Config
from ..delivery import Postman
from ..errors import ProtocolError
from ..hub import Hub, HubError, Published
from ..protocol import validate_channel
from ..session.commands import CID_MAX
from ..store import InboxFull, InboxMessage, Store, StoreError

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as e:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "ingest_redis_stream needs redis-py with hiredis: pip install 'fastim[redis]'"
    ) from e

log = logging.getLogger("fastim.ingest")

#: refusals worth retrying: the entry is fine, the node could not take it now
TRANSIENT = frozenset(
    {
        ErrorCode.STORE_UNAVAILABLE,
        ErrorCode.NOT_ROUTED,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.LIMIT_EXCEEDED,
    }
)
#: milliseconds one XREADGROUP blocks waiting for new entries
BLOCK_MS = 500
#: first and longest wait between two attempts at a transient failure (seconds)
RETRY_FIRST, RETRY_MAX = 0.1, 5.0

# a heartbeat: this consumer is alive until ARGV[2] ms from Redis's clock; returns the
# number of live consumers (expired ones are removed)
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""
# renew a lease this consumer holds (1), or say it does not (0)
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""
# take a free lease, or keep the one this consumer holds (1); 0: another holds it
_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# claim up to 1000 pending entries of any consumer (JUSTID: their delivery count is not
# raised; it is when this consumer reads them); returns {next cursor, entries claimed}
_CLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'COUNT', 1000, 'JUSTID')
return {r[1], #r[2]}
"""
# give a lease back, if this consumer still holds it
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IngestHost(Protocol):
    """The node, as the stream consumer sees it."""

    @property
    def config(self) -> Config: ...

    @property
    def hub(self) -> Hub: ...

    @property
    def store(self) -> Store | None: ...

    @property
    def postman(self) -> Postman | None: ...


@dataclass
class Entry:
    """One stream entry, parsed: what to do with it, or why it is poison."""

    id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1
    channel: str | None = None
    user: str | None = None
    sender: str | None = None
    data: bytes = b""
    key: str | None = None
    #: poison: (kind, reason) — never retried
    poison: tuple[str, str] | None = None
    #: outcome of the last attempt: "published", "sent", "dup", or a transient reason
    done: str | None = None
    #: the channel offset or inbox seq, recorded with the idempotency key
    result: int = 0


class Poison(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Transient(Exception):
    """The node could not take the entry now; it stays pending and is retried."""


class StreamIngest:
    """Consumes the ingest streams on behalf of one node (one consumer of the group)."""

    def __init__(self, host: IngestHost) -> None:
        cfg = host.config
        self.host = host
        self.streams = [s.strip() for s in cfg.ingest_redis_stream.split(",") if s.strip()]
        self.url = cfg.ingest_redis_url or cfg.redis_url
        self.group = cfg.ingest_group
        self.consumer = cfg.ingest_consumer or cfg.node_id
        self.window = cfg.ingest_idempotency_window
        self.batch = cfg.ingest_batch
        self.lease_ms = int(cfg.ingest_claim_idle * 1000)
        self.max_deliveries = cfg.ingest_max_deliveries
        self.max_message = cfg.max_message
        self.timeout = cfg.redis_timeout
        base = f"{cfg.redis_prefix}:ingest:{self.group}"
        self._seen_prefix = f"{base}:seen:"
        self._consumers_key = f"{base}:consumers"
        self._lease_prefix = f"{base}:lease:"
        self._dead = {s: cfg.ingest_dead_letter or f"{s}:dead" for s in self.streams}
        self._redis: Any = None
        self._main: asyncio.Task[None] | None = None
        #: stream → its reading task, while this consumer holds the stream's lease
        self._workers: dict[str, asyncio.Task[None]] = {}
        #: stream → loop time until which the lease is surely ours
        self._held_until: dict[str, float] = {}
        #: streams to give back after their current batch (over the fair share)
        self._giving_back: set[str] = set()
        self._stopping = False
        self._wake = asyncio.Event()
        # counters, read by /metrics (metric_families)
        self.consumed = 0
        self.published = 0
        self.sent = 0
        self.duplicates = 0
        self.dead: Counter[str] = Counter()
        self.retries = 0
        self.takeovers = 0
        self.pending: dict[str, int] = {}
        self.lag: dict[str, int] = {}
        self.live_consumers = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and create the group (reading from the stream's start when it is new:
        entries added before the first node came up are published too). A Redis that
        cannot be reached fails the node's start, as the store does."""
        self._redis = aioredis.from_url(
            self.url,
            socket_timeout=self.timeout + BLOCK_MS / 1000,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        try:
            for s in self.streams:
                await self._create_group(s)
        except Exception as e:
            await self._redis.aclose()
            self._redis = None
            raise StoreError(f"ingest: redis {self.url}: {type(e).__name__}: {e}") from e
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._claim = self._redis.register_script(_CLAIM)
        self._main = asyncio.ensure_future(self._coordinate())
        log.info("ingest: consumer %r of group %r on %s", self.consumer, self.group, self.streams)

    async def _create_group(self, stream: str) -> None:
        try:
            await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def close(self, timeout: float = 5.0) -> None:
        """Finish the batches in progress (their entries are acked), give the leases
        back so another consumer takes the streams at once, and disconnect."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._workers.values())
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        if self._redis is not None:
            for s in self.streams:
                with contextlib.suppress(Exception):
                    await self._release(keys=[self._lease_prefix + s], args=[self.consumer])
            with contextlib.suppress(Exception):
                await self._redis.zrem(self._consumers_key, self.consumer)
            await self._redis.aclose()

    # ------------------------------------------------------------------ leases

    async def _coordinate(self) -> None:
        """Every third of a lease: heartbeat, renew, take free streams up to the fair
        share, give back what is over it, read the pending counts for /metrics."""
        loop = asyncio.get_running_loop()
        every = self.lease_ms / 3000
        while not self._stopping:
            try:
                await self._round(loop)
            except Exception as e:  # Redis down: the leases run out, the workers stop
                log.warning("ingest: %s: %s", type(e).__name__, e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)
            self._wake.clear()

    async def _round(self, loop: asyncio.AbstractEventLoop) -> None:
        r = self._redis
        live = int(
            await self._heartbeat(keys=[self._consumers_key], args=[self.consumer, self.lease_ms])
        )
        self.live_consumers = live
        share = -(-len(self.streams) // max(1, live))
        for s in list(self._workers):
            t0 = loop.time()
            if await self._renew(
                keys=[self._lease_prefix + s], args=[self.consumer, self.lease_ms]
            ):
                self._held_until[s] = t0 + self.lease_ms / 1000 * 0.9
            else:
                self._held_until[s] = 0.0  # someone else holds it: stop at once
        held = [s for s in self._workers if not self._workers[s].done()]
        if len(held) > share and not self._giving_back:
            self._giving_back.add(held[-1])  # one at a time: the others pick it up
        released = set()
        for s in self.streams:
            if s in self._workers and self._workers[s].done():
                del self._workers[s]
                if s in self._giving_back:
                    self._giving_back.discard(s)
                    released.add(s)
                    await self._release(keys=[self._lease_prefix + s], args=[self.consumer])
        for s in self.streams:
            if s in self._workers or s in released or len(self._workers) >= share:
                continue
            if self._stopping:
                break
            t0 = loop.time()
            if await self._acquire(
                keys=[self._lease_prefix + s], args=[self.consumer, self.lease_ms]
            ):
                self._held_until[s] = t0 + self.lease_ms / 1000 * 0.9
                self._workers[s] = asyncio.ensure_future(self._consume(s))
        for s in self.streams:
            with contextlib.suppress(Exception):
                info = await r.xpending(s, self.group)
                self.pending[s] = int(info["pending"])
                for g in await r.xinfo_groups(s):
                    if g["name"] in (self.group, self.group.encode()):
                        self.lag[s] = int(g.get("lag") or 0)

    def _holding(self, stream: str) -> bool:
        return (
            not self._stopping
            and stream not in self._giving_back
            and self._held_until.get(stream, 0.0) > asyncio.get_running_loop().time()
        )

    # ------------------------------------------------------------------ one stream

    async def _consume(self, stream: str) -> None:
        """Read ``stream`` while the lease is ours: the pending entries of every consumer
        first (claimed), then new ones, in stream order."""
        r = self._redis
        try:
            # claim what other consumers left pending (JUSTID: the delivery count goes up
            # once, when this consumer reads it below)
            cursor: Any = "0-0"
            claimed = 0
            while True:
                cursor, n = await self._claim(
                    keys=[stream], args=[self.group, self.consumer, cursor]
                )
                claimed += int(n)
                if cursor in (b"0-0", "0-0"):
                    break
            if claimed:
                self.takeovers += 1
                log.info("ingest: %s: took over %d pending entries", stream, claimed)
            last: Any = "0"
            backoff = RETRY_FIRST
            while self._holding(stream):
                try:
                    if last != ">":
                        got = await r.xreadgroup(
                            self.group, self.consumer, {stream: last}, count=self.batch
                        )
                        entries = got[0][1] if got else []
                        if not entries:
                            last = ">"
                            continue
                        last = entries[-1][0]
                        counts = await self._delivery_counts(stream, entries)
                    else:
                        got = await r.xreadgroup(
                            self.group,
                            self.consumer,
                            {stream: ">"},
                            count=self.batch,
                            block=BLOCK_MS,
                        )
                        entries = got[0][1] if got else []
                        counts = {}
                    if entries:
                        await self._batch(stream, entries, counts)
                    backoff = RETRY_FIRST
                except (RedisError, OSError) as e:
                    await self._pause(stream, e, backoff)
                    backoff = min(RETRY_MAX, backoff * 2)
                    last = "0"  # re-read what is pending: nothing read was lost
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ingest: %s: the consumer failed; the lease runs out", stream)
        finally:
            self._wake.set()  # the coordinator cleans up (and may take the stream again)

    async def _pause(self, stream: str, e: BaseException, wait: float) -> None:
        log.warning("ingest: %s: redis: %s: %s; again in %.1fs", stream, type(e).__name__, e, wait)
        await asyncio.sleep(wait)

    async def _delivery_counts(self, stream: str, entries: list[Any]) -> dict[bytes, int]:
        rows = await self._redis.xpending_range(
            stream,
            self.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries),
            consumername=self.consumer,
        )
        return {_b(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def _batch(self, stream: str, raw: list[Any], counts: dict[bytes, int]) -> None:
        """Publish or send one batch in stream order; ack what the node acked, dead-letter
        the poison; retry the transient failures (and what follows them on their
        channel or user) until they succeed or the lease is lost."""
        todo: list[Entry] = []
        for eid, fields in raw:
            eid = _b(eid)
            e = Entry(eid, dict(fields or {}), counts.get(eid, 1))
            self.consumed += 1
            if not fields:  # trimmed from the stream while pending: nothing to publish
                e.done = "gone"
            else:
                self._parse(e)
            todo.append(e)
        wait = RETRY_FIRST
        while todo:
            await self._attempt(todo)
            finished = [e for e in todo if e.done in ("published", "sent", "dup", "gone", "dead")]
            await self._commit(stream, finished)
            todo = [e for e in todo if e.done not in ("published", "sent", "dup", "gone", "dead")]
            if not todo:
                return
            self.retries += len(todo)
            log.warning(
                "ingest: %s: %d entries not taken (%s); again in %.1fs",
                stream,
                len(todo),
                todo[0].done,
                wait,
            )
            await asyncio.sleep(wait)
            wait = min(RETRY_MAX, wait * 2)
            if not self._holding(stream):
                return  # still pending: the next holder (or this one, later) retries

    def _parse(self, e: Entry) -> None:
        f = e.fields
        try:
            if e.deliveries > self.max_deliveries:
                raise Poison(
                    "deliveries",
                    f"delivered {e.deliveries} times, over ingest_max_deliveries "
                    f"({self.max_deliveries}): consumers died or restarted while on it",
                )
            ch, user = f.get(b"channel"), f.get(b"user")
            if (ch is None) == (user is None):
                raise Poison("fields", 'an entry names exactly one of "channel" and "user"')
            try:
                if ch is not None:
                    e.channel = validate_channel(ch.decode())
                    ns = self.host.hub.namespaces.of(e.channel)
                    if ns.allow_publish == "none":
                        raise Poison(
                            "refused",
                            f"namespace of {e.channel!r} refuses publishes (allow_publish none)",
                        )
                else:
                    assert user is not None
                    e.user = validate_channel(user.decode())
                sender = f.get(b"from")
                if sender is not None:
                    e.sender = validate_channel(sender.decode())
            except (ProtocolError, UnicodeDecodeError) as err:
                raise Poison("name", f"bad channel, user or from: {_reason(err)}") from None
            raw = f.get(b"data")
            if raw is None:
                raise Poison("fields", 'missing field "data"')
            try:
                e.data = orjson.dumps(orjson.loads(raw))
            except orjson.JSONDecodeError as err:
                raise Poison("json", f'field "data" is not JSON: {err}') from None
            if len(e.data) > self.max_message:
                raise Poison("size", f'field "data" is {len(e.data)} bytes, over max_message')
            key = f.get(b"idempotency_key", f.get(b"key"))
            if key is not None:
                try:
                    e.key = key.decode()
                except UnicodeDecodeError:
                    raise Poison("key", "idempotency_key is not UTF-8") from None
                if not 0 < len(e.key) <= CID_MAX:
                    raise Poison("key", f"idempotency_key must be 1..{CID_MAX} characters")
        except Poison as p:
            e.poison = (p.kind, p.reason)
            e.done = "dead"

    async def _attempt(self, todo: list[Entry]) -> None:
        """One attempt at every entry of ``todo`` not yet dead: the seen keys first, then
        the channels pipelined in order and the users one send at a time."""
        live = [e for e in todo if e.done != "dead" and e.done != "gone"]
        keyed = [e for e in live if e.key is not None]
        if keyed:
            seen = await self._redis.mget([self._seen_prefix + str(e.key) for e in keyed])
            for e, v in zip(keyed, seen, strict=True):
                if v is not None:
                    e.done = "dup"
        batch_keys: set[str] = set()
        by_channel: dict[str, list[Entry]] = {}
        by_user: dict[str, list[Entry]] = {}
        for e in live:
            if e.done == "dup":
                continue
            if e.key is not None:
                if e.key in batch_keys:
                    e.done = "dup"  # the same key twice in one batch: the first one counts
                    continue
                batch_keys.add(e.key)
            e.done = None
            if e.channel is not None:
                by_channel.setdefault(e.channel, []).append(e)
            else:
                assert e.user is not None
                by_user.setdefault(e.user, []).append(e)
        hub = self.host.hub
        router = hub.router
        jobs = []
        for name, entries in by_channel.items():
            if router is None or router.owns(name):
                jobs.append(self._publish_local(name, entries))
            else:
                jobs.append(self._one_by_one(entries, self._publish_one))
        for entries in by_user.values():
            jobs.append(self._one_by_one(entries, self._send_one))
        await asyncio.gather(*jobs)
        for e in live:
            if e.done == "dup":
                self.duplicates += 1

    async def _publish_local(self, name: str, entries: list[Entry]) -> None:
        """A channel this node numbers: every entry queued in this tick, in order, so the
        hub stores them in one append (all or none), then await the answers."""
        loop = asyncio.get_running_loop()
        waiting: list[tuple[Entry, asyncio.Future[Published]]] = []
        for i, e in enumerate(entries):
            fut: asyncio.Future[Published] = loop.create_future()
            try:
                off = self.host.hub.publish(name, e.data, _settle(fut), e.key)
            except HubError as err:
                self._refused(e, err.code, err.reason)
                if e.done == "dead":
                    continue  # poison: the ones after it go on
                for later in entries[i + 1 :]:
                    later.done = f"after a retry on {name!r}"
                break
            if off is not None:
                fut.set_result(Published(off, ""))
            waiting.append((e, fut))
        for e, fut in waiting:
            # one append for them all: stored together or refused together
            res = await fut
            if res.refusal is not None:
                self._refused(e, res.refusal.code, res.refusal.reason)
            else:
                self._published(e, res)

    def _published(self, e: Entry, res: Published) -> None:
        """The node took the entry; its key is recorded as seen in the commit. A repeat
        the store recognised (``duplicate``: stored before, by a consumer that died
        before recording the key as seen) counts as a duplicate, not a publish."""
        e.done, e.result = "published", res.offset
        if res.duplicate:
            self.duplicates += 1
        else:
            self.published += 1

    async def _publish_one(self, e: Entry) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Published] = loop.create_future()
        assert e.channel is not None
        try:
            off = self.host.hub.publish(e.channel, e.data, _settle(fut), e.key)
        except HubError as err:
            self._refused(e, err.code, err.reason)
            return
        res = Published(off, "") if off is not None else await fut
        if res.refusal is not None:
            self._refused(e, res.refusal.code, res.refusal.reason)
        else:
            self._published(e, res)

    async def _send_one(self, e: Entry) -> None:
        """As ``/api/send``: the inbox store, then delivery; the idempotency key is the
        send's ``cid``, so the inbox itself refuses a second copy."""
        store, postman = self.host.store, self.host.postman
        assert store is not None and postman is not None and e.user is not None
        try:
            res = await postman.stored(
                e.user, await store.inbox_append(e.user, e.data, e.key, e.sender)
            )
        except InboxFull as err:
            e.done, e.poison = "dead", ("inbox_full", str(err))
            return
        except StoreError as err:
            postman.store_errors += 1
            e.done = f"not sent: {err}"
            return
        postman.sent += 1
        if res.duplicate:
            e.done = "dup"
            return
        postman.deliver(e.user, InboxMessage(res.seq, res.msg_id, e.sender, e.data, res.epoch))
        e.done, e.result = "sent", res.seq
        self.sent += 1

    async def _one_by_one(self, entries: list[Entry], one: Callable[[Entry], Any]) -> None:
        """In order, one at a time; a transient failure leaves the rest for the retry."""
        for i, e in enumerate(entries):
            await one(e)
            if e.done not in ("published", "sent", "dup", "dead"):
                for later in entries[i + 1 :]:
                    later.done = "after a retry on the same channel or user"
                return

    def _refused(self, e: Entry, code: int, reason: str) -> None:
        if code in TRANSIENT:
            e.done = reason  # pending, retried
        else:
            e.done, e.poison = "dead", (f"refused_{code}", reason)

    async def _commit(self, stream: str, finished: list[Entry]) -> None:
        """In one MULTI: the idempotency keys of what was published or sent, the poison
        entries to the dead-letter stream, the XACK of them all. Retried while Redis is
        away and the lease holds (if it is lost, the entries come again: the keyed ones
        are recognised by the store's record of their key and not stored twice)."""
        if not finished:
            return
        wait = RETRY_FIRST
        while True:
            try:
                async with self._redis.pipeline(transaction=True) as p:
                    for e in finished:
                        if e.key is not None and e.done in ("published", "sent"):
                            p.set(self._seen_prefix + e.key, e.result, ex=max(1, int(self.window)))
                        if e.done == "dead":
                            assert e.poison is not None
                            kind, reason = e.poison
                            p.xadd(
                                self._dead[stream],
                                {
                                    **e.fields,
                                    b"reason": reason.encode(),
                                    b"reason_kind": kind.encode(),
                                    b"entry_id": e.id,
                                    b"stream": stream.encode(),
                                    b"consumer": self.consumer.encode(),
                                },
                            )
                    p.xack(stream, self.group, *[e.id for e in finished])
                    await p.execute()
            except (RedisError, OSError) as err:
                if not self._holding(stream):
                    log.warning("ingest: %s: ack lost (%s), lease gone", stream, err)
                    return
                log.warning("ingest: %s: ack failed (%s), again in %.1fs", stream, err, wait)
                await asyncio.sleep(wait)
                wait = min(RETRY_MAX, wait * 2)
                continue
            for e in finished:
                if e.done == "dead":
                    assert e.poison is not None
                    self.dead[e.poison[0]] += 1
                    log.warning("ingest: %s %s dead-lettered: %s", stream, e.id, e.poison[1])
            return

    # ------------------------------------------------------------------ metrics

    def metric_families(self) -> Iterator[Metric]:
        """For /metrics (fastim/api/metrics.py reads it through the node)."""
        c = [
            (
                "fastim_ingest_entries_consumed",
                "stream entries read (redeliveries too)",
                self.consumed,
            ),
            ("fastim_ingest_published", "entries published to their channel", self.published),
            ("fastim_ingest_sent", "entries sent to their user's inbox", self.sent),
            (
                "fastim_ingest_duplicates",
                "entries acked without publishing: their idempotency key was seen",
                self.duplicates,
            ),
            ("fastim_ingest_retries", "entries retried after a transient failure", self.retries),
            ("fastim_ingest_takeovers", "streams taken over with pending entries", self.takeovers),
        ]
        for name, doc, value in c:
            yield CounterMetricFamily(name, doc, value=value)
        dead = CounterMetricFamily(
            "fastim_ingest_dead_lettered",
            "poison entries moved to the dead-letter stream",
            labels=["kind"],
        )
        for kind, n in sorted(self.dead.items()):
            dead.add_metric([kind], n)
        yield dead
        pend = GaugeMetricFamily(
            "fastim_ingest_pending",
            "entries read and not acked yet, per stream (all consumers)",
            labels=["stream"],
        )
        lag = GaugeMetricFamily(
            "fastim_ingest_lag",
            "entries of the stream the group has not read yet",
            labels=["stream"],
        )
        held = GaugeMetricFamily(
            "fastim_ingest_streams_held",
            "streams whose lease this consumer holds",
            value=len(self._workers),
        )
        for s in self.streams:
            pend.add_metric([s], self.pending.get(s, 0))
            lag.add_metric([s], self.lag.get(s, 0))
        yield pend
        yield lag
        yield held


def _settle(fut: asyncio.Future[Published]) -> Callable[[Published], None]:
    def done(res: Published) -> None:
        if not fut.done():
            fut.set_result(res)

    return done


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _reason(err: BaseException) -> str:
    return getattr(err, "reason", None) or str(err)
