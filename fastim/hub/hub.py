"""Channels, their subscribers, offsets and history; publish and fan-out.

A publish is encoded once per wire format that has subscribers (a fastim MSG frame, that
frame inside a WebSocket binary frame, a JSON text frame, and each WebSocket frame
compressed with permessage-deflate), in one compiled pass (:func:`_core.encode_msg`), and
then :meth:`SubscriberSet.fanout` appends the right one to every subscriber's out-ring in
C. Nothing here runs per subscriber in Python: a message is compressed once, however many
subscribers negotiated compression.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import Any, cast

import orjson

from .. import _core
from ..backend.events import Conn, Events
from ..config import Config
from ..protocol import ErrorCode
from ..store import Store, StoreError
from ..store.base import KeyWindow, new_epoch
from ..tasks import Background
from .channel import Channel, encode_event
from .deflate import Deflater
from .interfaces import (
    Done,
    HubError,
    PresenceGate,
    Published,
    Replies,
    Router,
    Since,
    Subscriber,
    store_refusal,
)
from .stats import LatencyHistogram

log = logging.getLogger("fastim")

#: publishes one channel may have waiting for the store before new ones are refused
MAX_PENDING = 10_000
#: no delta is made of (or against) data larger than this: bounds the work per message
DELTA_MAX_INPUT: int = _core.DELTA_MAX_INPUT


class Hub:
    """All channels of this node: offsets, history, fan-out, recovery, presence.

    Channels of a durable namespace, with a durable store (sqlite, redis), take their
    offsets from the store: publishes made in one loop tick go to the store in one
    ``append_many`` per channel (one transaction / one script call), and are delivered
    and acknowledged when it returns; one append per channel is in flight at a time, so
    delivery follows offset order. Other channels are numbered and kept here, and a
    publish is delivered and acknowledged at once.
    """

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store = store
        self.namespaces = config.namespace_table()
        self.channels: dict[str, Channel] = {}
        #: channels with no subscribers, kept for their history until ``history_ttl``
        self.idle: dict[str, Channel] = {}
        #: loop time, refreshed by the node's timer tick
        self.now = 0.0
        self.published = 0
        self.delivered = 0
        self.store_errors = 0
        self.recovered = 0
        #: publishes not stored again: their idempotency key was taken (Hub.publish)
        self.duplicates = 0
        #: delta namespaces (docs/delta.md): messages that went out as a delta to the
        #: subscribers in sync, and the data and delta bytes of those messages
        self.deltas = 0
        self.delta_in = 0
        self.delta_out = 0
        #: publish arrival → end of its fan-out, once per message (fastim.api.metrics)
        self.latency = LatencyHistogram()
        #: compresses each message once for every permessage-deflate subscriber
        self.deflater = Deflater(config.ws_compression or 6, config.ws_compression_min_size)
        self._dirty: list[Channel] = []
        self._kick_scheduled = False
        self._tasks = Background("hub")
        #: the cluster runtime when this node is in a cluster (fastim/cluster/runtime.py):
        #: publishes of channels owned elsewhere go to it, deliveries go down the tree
        self.router: Router | None = None
        #: who may see a channel's presence when its namespace restricts it (the node
        #: sets it from its auth); None: everyone
        self.presence_gate: PresenceGate | None = None
        #: event webhooks (fastim/backend/events.py); None when events_url is off
        self.events: Events | None = None

    @property
    def durable_store(self) -> bool:
        return self.store is not None and self.store.name != "memory"

    def channel(self, name: str, create: bool = True) -> Channel | None:
        ch = self.channels.get(name)
        if ch is None and create:
            if len(self.channels) >= self.config.max_channels:
                raise HubError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"node holds the maximum of {self.config.max_channels} channels",
                )
            ns = self.namespaces.of(name)
            ch = Channel(name, ns, durable=self.durable_store and ns.durable)
            ch.idle_since = self.now
            router = self.router
            if router is not None and not ch.durable and not router.owns(name):
                # a memory channel numbered by another node: its epoch and offset come
                # from the owner (the first DELIVER, or a subscribe asks for them)
                ch.loaded = False
            self.channels[name] = ch
            self.idle[name] = ch
        return ch

    def _drop(self, name: str) -> None:
        ch = self.channels.get(name)
        if ch is not None and (ch.pending or ch.inflight):
            return  # publishes on their way to the store: keep it
        if ch is not None and _remembers(ch, self.now):
            # idempotency keys of a memory channel live in it: idle until they expire
            ch.idle_since = self.now
            self.idle[name] = ch
            return
        if self.channels.pop(name, None) is not None and self.router is not None:
            self.router.dropped(name)  # nothing here follows it any more
        self.idle.pop(name, None)

    # ------------------------------------------------------------------ publish

    def publish(
        self, name: str, data: bytes, done: Done | None = None, key: str | None = None
    ) -> int | None:
        """Publish ``data`` (a JSON document, validated by the caller).

        In memory: assign the next offset, keep it, deliver, return the offset.
        Durable: queue it for the store and return None; ``done(Published(offset,
        epoch))`` runs after the store took it and it was delivered, a refusal if the store
        failed (then it was neither stored nor delivered).

        In a cluster, a channel owned by another node is forwarded to its owner and
        ``done`` runs with the owner's answer (always None returned).

        ``key``: an idempotency key. A publish whose key the channel took within
        ``idempotency_window`` (in its current epoch) is not stored or delivered again:
        it is answered with the first one's offset (``Published.duplicate``; returned,
        for a memory channel). Durable channels record the key in the store's append
        (:meth:`Store.append_keyed`: one transaction with the message, so a crash cannot
        separate them); memory channels in this node's memory, as their history. The key
        travels with a forward: the owner decides.
        """
        router = self.router
        if router is not None and not router.owns(name):
            if key is None:
                router.forward(name, data, done or _ignore)
            else:
                router.forward(name, data, done or _ignore, key)
            return None
        ch = self.channel(name)
        assert ch is not None
        if not ch.durable:
            if key is not None:
                return self._publish_keyed_here(ch, data, key)
            t0 = perf_counter()
            off = ch.offset + 1
            self._deliver(ch, off, data)
            if ch.ns.events_publish and self.events is not None:
                self.events.published(name, off, ch.epoch, data)
            self.latency.observe(perf_counter() - t0)
            if len(ch.subs) == 0 and ch.ns.history_size == 0:
                self._drop(name)
            return off
        if len(ch.pending) >= MAX_PENDING:
            raise HubError(
                ErrorCode.STORE_UNAVAILABLE,
                f"the store is behind: {len(ch.pending)} publishes to {name!r} wait for it",
            )
        if key is not None:
            if ch.keyed is None:
                ch.keyed = {}
            ch.keyed[len(ch.pending)] = key
        ch.pending.append((data, done or _ignore, perf_counter()))
        if not ch.inflight and len(ch.pending) == 1:
            self._dirty.append(ch)
            if not self._kick_scheduled:
                self._kick_scheduled = True
                asyncio.get_running_loop().call_soon(self._kick)
        return None

    def _publish_keyed_here(self, ch: Channel, data: bytes, key: str) -> int:
        """A keyed publish to a memory channel this node numbers: the key is looked up
        and recorded here (a restart forgets it, as it forgets the history)."""
        now = self.now
        seen = ch.seen
        if seen is not None:
            seen.forget(now)
            off = seen.get(key, ch.epoch, now)
            if off is not None:
                self.duplicates += 1
                return off
        t0 = perf_counter()
        off = ch.offset + 1
        self._deliver(ch, off, data)
        self.latency.observe(perf_counter() - t0)
        if ch.ns.events_publish and self.events is not None:
            self.events.published(ch.name, off, ch.epoch, data)
        window = self.config.idempotency_window
        if window > 0:
            if seen is None:
                seen = ch.seen = KeyWindow()
            seen.add(key, off, ch.epoch, now + window)
        elif len(ch.subs) == 0 and ch.ns.history_size == 0:
            self._drop(ch.name)
        # else kept (idle) while it remembers keys, even without history or subscribers
        return off

    def _deliver(self, ch: Channel, off: int, data: bytes) -> None:
        prev = ch.offset
        ch.offset = off
        if ch.history.capacity:
            ch.history.append(off, (data, self.now))
        self.published += 1
        if len(ch.subs):
            frames = ch.encode(off, data, self.deflater)
            if ch.ns.delta:
                self.delivered += self._fanout_delta(ch, off, prev, data, frames)
            else:
                self.delivered += ch.subs.fanout(frames)
        else:
            ch.idle_since = self.now
        if ch.ns.delta:
            ch.dbase = data if len(data) <= DELTA_MAX_INPUT else None
        if self.router is not None:
            self.router.down(ch, off, data)

    def _fanout_delta(
        self, ch: Channel, off: int, prev: int, data: bytes, frames: tuple[bytes | None, ...]
    ) -> int:
        """Deliver a message of a delta namespace: one delta against the channel's
        previous message, made and encoded once, to the subscribers marked alt (they
        had that message: docs/delta.md), the full frames to everyone else. Full to
        all when there is no base (first message, after an epoch change or a jump in
        offsets) or the delta is not smaller. Subscribers waiting for their first full
        message are marked alt afterwards: now they have it."""
        subs = ch.subs
        base = ch.dbase
        alt = None
        if (
            base is not None
            and off == prev + 1
            and len(data) <= DELTA_MAX_INPUT
            and subs.alt_count()
        ):
            delta = _core.fossil_delta(base, data, True)
            if len(delta) < len(data):
                alt = ch.encode_delta(off, delta)
                self.deltas += 1
                self.delta_in += len(data)
                self.delta_out += len(delta)
        n = subs.fanout(frames, alt)
        wait = ch.dwait
        if wait is not None:
            ch.dwait = None
            for ring in wait:
                subs.set_alt(ring)
        return n

    def deliver_routed(self, ch: Channel, off: int, data: bytes) -> None:
        """A message numbered by the owner (it came down the tree): deliver it here."""
        self._deliver(ch, off, data)

    async def fill(self, ch: Channel, top: int) -> None:
        """Fill a durable channel's gap below ``top`` from the store (see _fill)."""
        await self._fill(ch, top)

    def adopt(self, ch: Channel, epoch: str, top: int) -> None:
        """Align the channel with the owner's (epoch, top); another epoch: resubscribe.

        The owner is another node (or worker): what it numbered in the old epoch may not
        all have come here, so the subscribers are told their old epoch may be
        incomplete (``complete: false``)."""
        self._adopt(ch, epoch, top, complete=False)

    def renumber(self, ch: Channel) -> None:
        """This node now numbers a memory channel: a new epoch (subscribers resubscribe,
        told the old epoch may be incomplete: its owner was another node)."""
        self._adopt(ch, new_epoch(), 0, complete=False)

    def recover(self, ch: Channel, since: Since) -> tuple[Since, list[tuple[int, bytes]]]:
        """Messages after ``since`` from this node's history ring (for another node);
        ``since`` resolved first when it asks for the newest N, or is in an older epoch
        (then the current epoch from its start: see :meth:`_rebase`)."""
        since = self._rebase(ch, since)[0]
        if since.off >= ch.offset:
            return since, []
        return since, self._recover(ch, since.off, [])[1]

    def _kick(self) -> None:
        """Once per tick: one store append per channel with queued publishes."""
        self._kick_scheduled = False
        dirty, self._dirty = self._dirty, []
        for ch in dirty:
            if ch.pending and not ch.inflight:
                batch, ch.pending = ch.pending, []
                keyed, ch.keyed = ch.keyed, None
                ch.inflight = True
                self._run(self._append(ch, batch, keyed))

    async def _append(
        self,
        ch: Channel,
        batch: list[tuple[bytes, Done, float]],
        keyed: dict[int, str] | None = None,
    ) -> None:
        store = self.store
        assert store is not None
        repeats: dict[int, int] | None = None  # position -> the first one's offset
        try:
            try:
                if keyed is None:
                    first, epoch = await store.append_many(
                        ch.name, [b[0] for b in batch], ch.ns.limits
                    )
                else:
                    first, epoch, repeats = await self._append_keyed(ch, batch, keyed)
            except StoreError as e:
                self.store_errors += 1
                log.warning("publish to %r not stored: %s", ch.name, e)
                reason = f"not stored (not delivered, not acknowledged): {e}"
                refused = store_refusal(reason)
                for _d, done, _t in batch:
                    done(refused)
                return
            if ch.loaded and epoch == ch.epoch and first - 1 > ch.offset:
                await self._fill(ch, first - 1)
            elif ch.loaded and epoch == ch.epoch and first - 1 < ch.offset:
                epoch = await self._went_back(ch, epoch, first - 1)
            self._adopt(ch, epoch, first - 1)
            if repeats is None:
                for i, (data, done, t0) in enumerate(batch):
                    off = first + i
                    self._deliver(ch, off, data)
                    self.latency.observe(perf_counter() - t0)
                    if ch.ns.events_publish and self.events is not None:
                        self.events.published(ch.name, off, epoch, data)
                    done(Published(off, epoch))
            else:
                self._settle_keyed(ch, batch, first, epoch, repeats)
        finally:
            ch.inflight = False
            if ch.pending:
                self._dirty.append(ch)
                if not self._kick_scheduled:
                    self._kick_scheduled = True
                    asyncio.get_running_loop().call_soon(self._kick)

    async def _append_keyed(
        self, ch: Channel, batch: list[tuple[bytes, Done, float]], keyed: dict[int, str]
    ) -> tuple[int, str, dict[int, int]]:
        """The store append of a batch with idempotency keys: (first new offset, epoch,
        the repeats: position -> the offset its key got the first time)."""
        store = self.store
        assert store is not None
        keys = [keyed.get(i) for i in range(len(batch))]
        got = await store.append_keyed(
            ch.name, [b[0] for b in batch], keys, ch.ns.limits, self.config.idempotency_window
        )
        pairs = enumerate(zip(got.offsets, got.duplicate, strict=True))
        repeats = {i: off for i, (off, dup) in pairs if dup}
        return got.offset, got.epoch, repeats

    def _settle_keyed(
        self,
        ch: Channel,
        batch: list[tuple[bytes, Done, float]],
        first: int,
        epoch: str,
        repeats: dict[int, int],
    ) -> None:
        """Deliver the new messages of a keyed batch (consecutive from ``first``) and
        answer every publish; a repeat is answered with its first offset, not delivered
        (the first one was, or :meth:`_fill` just did)."""
        off = first - 1
        answers: list[tuple[Done, Published]] = []
        for i, (data, done, t0) in enumerate(batch):
            orig = repeats.get(i)
            if orig is not None:
                self.duplicates += 1
                answers.append((done, Published(orig, epoch, duplicate=True)))
                continue
            off += 1
            self._deliver(ch, off, data)
            self.latency.observe(perf_counter() - t0)
            if ch.ns.events_publish and self.events is not None:
                self.events.published(ch.name, off, epoch, data)
            answers.append((done, Published(off, epoch)))
        for done, result in answers:  # after the deliveries: a repeat may name a later one
            done(result)

    async def _went_back(self, ch: Channel, epoch: str, top: int) -> str:
        """The store numbers from ``top`` + 1 in the epoch this node already delivered up
        to ``ch.offset`` in: its history went back (restored from an older backup, a Redis
        restarted from an older snapshot). Giving those offsets again would make clients
        drop the new messages as duplicates of ones they saw, so the channel moves to a
        new epoch (subscribers get ``resubscribe``, then a Gap, never a silent loss).
        Returns that epoch: the store's, or one of this node's if the store cannot say.
        """
        log.warning(
            "channel %r: the store is at offset %d of epoch %s, behind the %d this node "
            "delivered (restored from an older snapshot?): starting a new epoch",
            ch.name,
            top,
            epoch,
            ch.offset,
        )
        store = self.store
        assert store is not None
        try:
            return (await store.restart_epoch(ch.name, epoch, ch.ns.limits)).epoch
        except StoreError as e:
            self.store_errors += 1
            log.warning("channel %r: could not restart the epoch in the store: %s", ch.name, e)
            return new_epoch()  # the next append brings the store's back: another change

    async def _fill(self, ch: Channel, top: int) -> None:
        """Deliver messages the store has below ``top`` that this node never delivered.

        A publish whose store call failed (timeout) may have been applied after all; the
        next append then starts past it. Its subscribers get it here, in order, so live
        delivery has no hole. What cannot be read (trimmed, store down) stays a gap,
        visible to clients as a jump in offsets (they recover with ``since``).
        """
        store = self.store
        assert store is not None
        try:
            while ch.offset < top:
                hist = await store.read(
                    ch.name, ch.offset, min(1000, top - ch.offset), ch.ns.limits
                )
                msgs = [(o, d) for o, d in hist.messages if ch.offset < o <= top]
                if hist.epoch != ch.epoch or not msgs or msgs[0][0] != ch.offset + 1:
                    return
                for off, data in msgs:
                    self._deliver(ch, off, data)
        except StoreError as e:
            log.warning("channel %r: could not read back offsets to %d: %s", ch.name, top, e)

    def _adopt(self, ch: Channel, epoch: str, top: int, complete: bool = True) -> None:
        """The store says the channel is at (epoch, top): align what this node holds.

        ``complete``: every message of the old epoch went through this node (it numbered
        them), so its subscribers have them all."""
        if ch.loaded and epoch == ch.epoch and top == ch.offset:
            return
        if ch.loaded and epoch != ch.epoch:
            self._epoch_changed(ch, epoch, complete)
        elif ch.loaded and top != ch.offset:
            log.warning("channel %r: store at %d, node at %d", ch.name, top, ch.offset)
        ch.epoch = epoch
        ch.offset = top
        ch.loaded = True
        ch.history = _core.HistoryRing(ch.ns.history_size)  # the cache no longer fits
        ch.dbase = None  # the message at the new offset was not delivered here

    def _epoch_changed(self, ch: Channel, epoch: str, complete: bool = True) -> None:
        """History was lost: tell subscribers to subscribe again (and recover what exists).

        ``complete`` False: messages of the old epoch may never have reached this node
        (its owner was another node or worker, which is gone or lost them): the event
        says so, and the client reports a gap after its last offset."""
        log.warning("channel %r lost its history: epoch %s -> %s", ch.name, ch.epoch, epoch)
        rings = ch.subs.rings()
        if rings:
            ev: dict[str, Any] = {"op": "resubscribe", "ch": ch.name, "epoch": epoch}
            if not complete:
                ev["complete"] = False
            ch.subs.fanout(encode_event(orjson.dumps(ev)))
        ch.dwait = None
        ch.dbase = None
        for ring in rings:
            ch.subs.remove(ring)
            owner = ring.on_overflow  # the subscriber (see interfaces.Subscriber)
            subs = getattr(owner, "subs", None)
            if subs and ch.name in subs:
                subs.remove(ch.name)
        ch.users.clear()

    # ------------------------------------------------------------------ subscribe

    def subscribe(
        self, session: Subscriber, replies: Replies, req_id: Any, name: str, since: Since | None
    ) -> None:
        """Subscribe ``session``: reply, recovered messages, then live ones, in order.

        The caller has checked the name, the limits, and added ``name`` to
        ``session.subs`` (so a second subscribe is refused while this one loads).
        Synchronous when the channel's state and the needed history are in memory.
        """
        ch = self.channel(name)
        assert ch is not None
        stale = False
        if since is not None and ch.loaded:
            since, stale = self._rebase(ch, since)
        if ch.loaded and (since is None or self._servable(ch, since)):
            self._finish_subscribe(session, replies, req_id, ch, since, [], stale)
            return
        self._run(self._subscribe_async(session, replies, req_id, ch, since, stale))

    @staticmethod
    def _resolve(ch: Channel, since: Since) -> Since:
        """A request for the newest ``since.off`` messages, as a position in the channel."""
        return Since(max(0, ch.offset - since.off), ch.epoch)

    @classmethod
    def _rebase(cls, ch: Channel, since: Since) -> tuple[Since, bool]:
        """``since`` as a position in the channel's current history, and whether it was
        in an older epoch (``stale``).

        A subscriber from an older epoch has lost what that epoch had after its offset,
        but not what the current epoch holds: it recovers the current epoch from its
        start (offset 0), and the reply says ``recovered: false``. Answering it with
        live messages only would skip the ones published in the new epoch before it
        came back, although the node still has them.
        """
        if since.last:
            return cls._resolve(ch, since), False
        if since.epoch != ch.epoch:
            return Since(0, ch.epoch), True
        return since, False

    def _servable(self, ch: Channel, since: Since) -> bool:
        """Can recovery from ``since`` be answered from memory (or is it hopeless)?"""
        if since.epoch != ch.epoch or since.off >= ch.offset:
            return True
        if ch.ns.recovery == "cache":
            since = Since(ch.offset - 1, since.epoch)  # only the latest is sent
        if not ch.durable:
            # one node: the ring is the history; in a cluster a node that does not own
            # the channel asks the owner for what its own ring lacks
            router = self.router
            if router is None or router.owns(ch.name):
                return True
            return self._covers(ch, max(since.off, ch.offset - self.config.recovery_max))
        h = ch.history
        return len(h) > 0 and h.first_offset <= since.off + 1

    async def _subscribe_async(
        self,
        session: Subscriber,
        replies: Replies,
        req_id: Any,
        ch: Channel,
        since: Since | None,
        stale: bool = False,
    ) -> None:
        """``stale``: ``since`` was already rebased from an older epoch (:meth:`_rebase`)."""
        store = self.store
        assert store is not None
        prefix: list[tuple[int, bytes]] = []
        try:
            router = self.router
            if not ch.durable and router is not None and not router.owns(ch.name):
                # a memory channel owned by another node: its numbering and history are
                # there (the owner resolves a "history": N request against its own state)
                state = await router.state(ch.name, since)
                if not ch.loaded:
                    self._adopt(ch, str(state["epoch"]), int(state["offset"]))
                if since is not None and (since.last or since.epoch != state["epoch"]):
                    # the owner resolved it (the newest N, or an older epoch: from 0)
                    stale = not since.last
                    since = Since(int(state.get("since", 0)), str(state["epoch"]))
                if since is not None and since.epoch == ch.epoch == state["epoch"]:
                    prefix = [
                        (int(o), d.encode())
                        for o, d in state["messages"]
                        if since.off < int(o) <= ch.offset
                    ]
            elif not ch.loaded:
                if router is not None and not router.owns(ch.name):
                    # registered at the owner before the state is read: every message
                    # published after that state comes here (workers: fastim/workers/mesh.py)
                    await router.follow(ch.name)
                epoch, top = await store.state(ch.name, ch.ns.limits)
                if not ch.loaded:
                    self._adopt(ch, epoch, top)
                    if router is not None:
                        router.loaded(ch)  # messages that came down the tree meanwhile
            if since is not None and not stale:
                since, stale = self._rebase(ch, since)
            if (
                ch.durable
                and since is not None
                and since.epoch == ch.epoch
                and since.off < ch.offset
            ):
                after = max(since.off, ch.offset - self.config.recovery_max)
                if ch.ns.recovery == "cache":
                    after = max(after, ch.offset - 1)  # the latest message is all it gets
                while not self._covers(ch, after):
                    hist = await store.read(ch.name, after, 1000, ch.ns.limits)
                    if hist.epoch != ch.epoch:
                        break  # lost meanwhile: not recovered
                    msgs = [(o, d) for o, d in hist.messages if o <= ch.offset]
                    if not msgs:
                        break
                    prefix.extend(msgs)
                    after = msgs[-1][0]
                    if after >= ch.offset:
                        break
        except (StoreError, HubError) as e:
            code = ErrorCode.STORE_UNAVAILABLE
            if isinstance(e, HubError):
                code = ErrorCode(e.code)
            else:
                self.store_errors += 1
            if session.subs and ch.name in session.subs:
                session.subs.remove(ch.name)
            session.send(replies.error(req_id, code, f"cannot subscribe to {ch.name!r}: {e}"))
            return
        self._finish_subscribe(session, replies, req_id, ch, since, prefix, stale)

    @staticmethod
    def _covers(ch: Channel, after: int) -> bool:
        h = ch.history
        return after >= ch.offset or (len(h) > 0 and h.first_offset <= after + 1)

    def _finish_subscribe(
        self,
        session: Subscriber,
        replies: Replies,
        req_id: Any,
        ch: Channel,
        since: Since | None,
        prefix: list[tuple[int, bytes]],
        stale: bool = False,
    ) -> None:
        """Reply, queue the recovered messages, join: all in this tick. ``stale``: the
        subscriber's position was in an older epoch, so recovery is never complete."""
        ring = session.ring
        if not session.is_open() or ring is None or not session.subs or ch.name not in session.subs:
            return  # closed or unsubscribed meanwhile
        if self.channels.get(ch.name) is not ch:
            self.channels[ch.name] = ch  # swept while loading: it is in use again
        recovered = False
        msgs: list[tuple[int, bytes]] = []
        if since is not None and since.epoch == ch.epoch and since.off <= ch.offset:
            after = since.off
            if ch.ns.recovery == "cache" and after < ch.offset:
                # a channel that carries a state: the latest message is the state, what
                # came before it is not worth replaying (recovered: nothing is missing)
                after = ch.offset - 1
            recovered, msgs = self._recover(ch, after, prefix)
            recovered = recovered and not stale
        session.send(replies.subscribed(req_id, ch.name, ch.offset, ch.epoch, recovered))
        fmt = ring.fmt
        for off, data in msgs:
            session.send(ch.encode_one(fmt, off, data))
        self.recovered += len(msgs)
        if self.events is not None:  # before the join it may cause
            self.events.subscribed(cast("Conn", session), ch.name)
        self.join(ch.name, ring, session.user)
        if ch.ns.delta and ch.name in (getattr(session, "delta", None) or ()):
            self._delta_join(ch, ring, msgs)

    @staticmethod
    def _delta_join(ch: Channel, ring: _core.OutRing, msgs: list[tuple[int, bytes]]) -> None:
        """A subscriber that asked for deltas joined: deltas from the next message if
        the last message it just got (recovery) is the channel's base, else the next
        one full first (``dwait``). A subscriber without recovered messages may hold no
        base at all (a ``since`` saved by an earlier run): full first."""
        if msgs and msgs[-1][0] == ch.offset and ch.dbase is not None and msgs[-1][1] == ch.dbase:
            ch.subs.set_alt(ring)
            return
        if ch.dwait is None:
            ch.dwait = []
        ch.dwait.append(ring)

    def join(self, name: str, ring: _core.OutRing, user: str | None = None) -> Channel:
        """Add ``ring`` to the channel's subscribers now (no reply, no recovery)."""
        ch = self.channel(name)
        assert ch is not None
        if user is not None:
            n = ch.users.get(user, 0)
            ch.users[user] = n + 1
            if n == 0 and ch.ns.join_leave:
                self.announce(ch, "join", user)  # to the others: before adding this one
        ch.subs.add(ring)
        self.idle.pop(name, None)
        return ch

    def _recover(
        self, ch: Channel, since: int, prefix: list[tuple[int, bytes]]
    ) -> tuple[bool, list[tuple[int, bytes]]]:
        """Messages (since, ch.offset] from ``prefix`` then the history ring; complete?"""
        top = ch.offset
        limit = self.config.recovery_max
        complete = top - since <= limit
        start = max(since, top - limit)
        out: list[tuple[int, bytes]] = []
        expect = start + 1
        for off, data in prefix:
            if off < expect:
                continue
            if off > expect:
                complete = False
            out.append((off, data))
            expect = off + 1
        h = ch.history
        ttl = ch.ns.history_ttl
        oldest = self.now - ttl if ttl and not ch.durable else None
        if expect <= top and len(h):
            first = max(expect, h.first_offset)
            if first > expect:
                complete = False
            for off in range(first, top + 1):
                item = h.get(off)
                if item is None:
                    complete = False
                    continue
                data, at = cast("tuple[bytes, float]", item)
                if oldest is not None and at < oldest:
                    complete = False  # expired
                    continue
                out.append((off, data))
            expect = top + 1
        if expect <= top:
            complete = False
        return complete, out

    def unsubscribe(self, name: str, session: Subscriber) -> bool:
        ring = session.ring
        return ring is not None and self.leave(name, ring, session.user)

    def leave(self, name: str, ring: _core.OutRing, user: str | None = None) -> bool:
        """Remove ``ring`` from the channel's subscribers; False if it was not one."""
        ch = self.channels.get(name)
        if ch is None or not ch.subs.remove(ring):
            return False
        if ch.dwait is not None and ring in ch.dwait:
            ch.dwait.remove(ring)  # a later subscribe without deltas must not get them
        if user is not None and user in ch.users:
            n = ch.users[user] - 1
            if n:
                ch.users[user] = n
            else:
                del ch.users[user]
                if ch.ns.join_leave:
                    self.announce(ch, "leave", user)
        if len(ch.subs) == 0:
            if ch.ns.history_size == 0 or ch.offset == 0:
                self._drop(name)
            else:
                ch.idle_since = self.now
                self.idle[name] = ch
        return True

    # ------------------------------------------------------------------ presence

    def announce(self, ch: Channel, op: str, user: str) -> None:
        """``user``'s first connection here joined ``ch`` (``op`` "join") or its last
        one left ("leave"): tell the channel's subscribers (:meth:`announce_here`).

        On a node of several workers the channel's owner decides, over every worker,
        whether the user joined or left the *node* (fastim/workers/mesh.py), and each
        worker then announces it to its own subscribers.
        """
        relay = getattr(self.router, "announce", None)
        if relay is not None and relay(ch, op, user):
            return
        if self.events is not None:
            self.events.presence(ch.name, op, user)  # decided here: the event is ours
        self.announce_here(ch, op, user)

    def announce_here(self, ch: Channel, op: str, user: str, skip: str | None = None) -> None:
        """A join/leave event to the channel's subscribers here that may see its presence
        (but the connections of user ``skip``: a join relayed by the owner arrives after
        the joining connection was added).

        Under ``allow_presence = any`` (the default) that is every subscriber: one
        encode, the compiled fan-out. Otherwise each subscriber is checked against the
        rule (a join names a user, which is presence): rare events, so a Python loop.
        """
        if not len(ch.subs):
            return
        body = orjson.dumps({"op": op, "ch": ch.name, "user": user})
        if ch.ns.allow_presence == "any" and (skip is None or skip not in ch.users):
            self.delivered += ch.subs.fanout(encode_event(body))
            return
        gate = self.presence_gate
        for ring in ch.subs.rings():
            sub = ring.on_overflow  # the subscriber (see interfaces.Subscriber)
            if not isinstance(sub, Subscriber):
                continue
            if skip is not None and sub.user == skip:
                continue
            if gate is not None and not gate(sub, ch.ns, ch.name):
                continue
            sub.send(sub.replies.event(body))
            self.delivered += 1

    def presence(self, name: str) -> dict[str, Any]:
        ch = self.channels.get(name)
        out: dict[str, Any] = {"op": "presence", "ch": name, "count": 0}
        ns = ch.ns if ch is not None else self.namespaces.of(name)
        if ch is not None:
            out["count"] = len(ch.subs)
        if ns.presence:
            users = list(ch.users) if ch is not None else []
            out["users"] = users[: self.config.presence_max]
        return out

    async def presence_all(self, name: str) -> dict[str, Any]:
        """:meth:`presence` over every process of this node: the workers of a node
        started with ``--workers`` (fastim/workers/mesh.py) are asked and summed; a
        cluster node answers for itself (docs/cluster.md)."""
        ask = getattr(self.router, "presence", None)
        if ask is None:
            return self.presence(name)
        return dict(await ask(name))

    def answer_presence(
        self, session: Subscriber, replies: Replies, req_id: Any, name: str
    ) -> None:
        """A ``presence`` request: answered now on one process, after the other workers
        answered on a node of several."""
        if getattr(self.router, "presence", None) is None:
            session.send(replies.obj(self.presence(name), req_id))
            return

        async def ask() -> None:
            p = await self.presence_all(name)
            if session.is_open():
                session.send(replies.obj(p, req_id))

        self._run(ask())

    # ------------------------------------------------------------------ upkeep

    def sweep(self, now: float) -> int:
        """Forget idle channels whose history has expired; return how many.

        An idle channel (no subscribers) stays while it may still serve recovery: for
        ``history_ttl`` after it became idle (durable ones are in the store anyway).
        """
        ttl = self.config.history_ttl or 300.0
        dead = [
            name
            for name, ch in self.idle.items()
            if now - ch.idle_since >= (ch.ns.history_ttl or ttl)
            and not ch.pending
            and not _remembers(ch, now)
        ]
        for name in dead:
            self._drop(name)
        return len(dead)

    def _run(self, coro: Any) -> None:
        self._tasks.run(coro)

    async def close(self) -> None:
        """Wait (briefly) for publishes on their way to the store, then stop."""
        if self._dirty:
            self._kick()
        await self._tasks.wait(5.0)
        await self._tasks.cancel()


def _ignore(result: Published) -> None:
    pass


def _remembers(ch: Channel, now: float) -> bool:
    """Does the (memory) channel still hold idempotency keys within their window?"""
    seen = ch.seen
    if seen is None:
        return False
    seen.forget(now)
    return bool(seen.keys)
