"""Memory-store inboxes on a node of several workers: each user's inbox lives on one worker.

The sqlite and redis stores are shared by the workers (one file, one server): any worker
appends to any inbox, in a transaction. The memory store is per process, so without
this a direct message stored on the sender's worker would be invisible to the
recipient's connections on another worker (their acks, replays and re-checks read their
own worker's memory). :class:`MeshInboxes` wraps the worker's memory store: channel
history stays local (a memory channel lives with its owner worker), and every inbox
operation runs on the inbox's owner worker (rendezvous hash of the user over the
workers in view, as channels), asked over the workers' links.

What a worker's death costs: the inboxes it owned (a memory store keeps nothing): the
next message gets a new inbox epoch on the worker that owns the user now, and clients
report the gap (``DirectGap``, ``onDirectGap``). An inbox operation whose owner does not
answer within the ask timeout is a :class:`~fastim.store.StoreUnavailable` (the client
retries a send with its client id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..store import (
    AckOutOfRange,
    Appended,
    ChannelState,
    History,
    HistoryLimits,
    InboxAppended,
    InboxFull,
    InboxMessage,
    InboxState,
    KeyedAppended,
    OutboxEntry,
    OutboxItem,
    OutboxStats,
    Store,
    StoreError,
    StoreUnavailable,
)
from ..store.base import IDEMPOTENCY_WINDOW

if TYPE_CHECKING:
    from .mesh import WorkerMesh

#: the rendezvous key of a user's inbox (a prefix no channel name has)
_KEY = "\x00inbox:"


class MeshInboxes(Store):
    """The worker's memory store, with inboxes on their owner worker. See the module doc."""

    name = "memory"

    def __init__(self, local: Store) -> None:
        super().__init__(local.limits, local.inbox_limits)
        self.local = local
        self.mesh: WorkerMesh | None = None
        #: inbox operations sent to another worker, and those that got no answer
        self.remote_calls = 0
        self.remote_failures = 0

    def attach(self, mesh: WorkerMesh) -> None:
        """Serve the other workers' inbox calls for the users this worker owns."""
        self.mesh = mesh
        mesh.answers["inbox"] = self._serve

    # -- channels: this worker's own

    async def append(
        self, channel: str, data: bytes, limits: HistoryLimits | None = None
    ) -> Appended:
        return await self.local.append(channel, data, limits)

    async def append_many(
        self, channel: str, items: Sequence[bytes], limits: HistoryLimits | None = None
    ) -> Appended:
        return await self.local.append_many(channel, items, limits)

    async def append_keyed(
        self,
        channel: str,
        items: Sequence[bytes],
        keys: Sequence[str | None],
        limits: HistoryLimits | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> KeyedAppended:
        return await self.local.append_keyed(channel, items, keys, limits, window)

    async def read(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History:
        return await self.local.read(channel, since, limit, limits)

    async def peek(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History | None:
        return await self.local.peek(channel, since, limit, limits)

    async def state(self, channel: str, limits: HistoryLimits | None = None) -> ChannelState:
        return await self.local.state(channel, limits)

    async def restart_epoch(
        self, channel: str, seen_epoch: str, limits: HistoryLimits | None = None
    ) -> ChannelState:
        return await self.local.restart_epoch(channel, seen_epoch, limits)

    async def sweep(self) -> int:
        return await self.local.sweep()

    async def close(self) -> None:
        await self.local.close()

    # -- the event outbox: each worker's own (a memory store is per process)

    async def outbox_add(self, items: Sequence[OutboxItem]) -> int:
        return await self.local.outbox_add(items)

    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        return await self.local.outbox_read(limit)

    async def outbox_remove(self, keys: Sequence[str]) -> None:
        await self.local.outbox_remove(keys)

    async def outbox_stats(self) -> OutboxStats:
        return await self.local.outbox_stats()

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        return await self.local.outbox_lease(owner, ttl)

    async def outbox_beat(self, node: str, ttl: float) -> None:
        await self.local.outbox_beat(node, ttl)

    async def outbox_claim(self, limit: int = 1000) -> int:
        return await self.local.outbox_claim(limit)

    # -- inboxes: on the owner worker

    async def inbox_append(
        self,
        user: str,
        data: bytes,
        client_msg_id: str | None = None,
        sender: str | None = None,
    ) -> InboxAppended:
        r = await self._call(user, "append", [data.decode(), client_msg_id, sender])
        if r is None:
            return await self.local.inbox_append(user, data, client_msg_id, sender)
        return InboxAppended(int(r[0]), str(r[1]), bool(r[2]), str(r[3]))

    async def inbox_read(self, user: str, after_seq: int, limit: int = 1000) -> list[InboxMessage]:
        r = await self._call(user, "read", [after_seq, limit])
        if r is None:
            return await self.local.inbox_read(user, after_seq, limit)
        return [InboxMessage(int(m[0]), str(m[1]), m[2], str(m[3]).encode(), str(m[4])) for m in r]

    async def inbox_ack(self, user: str, seq: int, epoch: str | None = None) -> InboxState:
        r = await self._call(user, "ack", [seq, epoch])
        if r is None:
            return await self.local.inbox_ack(user, seq, epoch)
        return InboxState(int(r[0]), int(r[1]), str(r[2]))

    async def inbox_state(self, user: str) -> InboxState:
        r = await self._call(user, "state", [])
        if r is None:
            return await self.local.inbox_state(user)
        return InboxState(int(r[0]), int(r[1]), str(r[2]))

    async def inbox_restart_epoch(self, user: str, seen_epoch: str) -> InboxState:
        r = await self._call(user, "restart", [seen_epoch])
        if r is None:
            return await self.local.inbox_restart_epoch(user, seen_epoch)
        return InboxState(int(r[0]), int(r[1]), str(r[2]))

    async def _call(self, user: str, fn: str, args: list[Any]) -> Any:
        """The owner's answer to ``fn`` for ``user``'s inbox; None: this worker owns it."""
        mesh = self.mesh
        owner = mesh.placement.owner(_KEY + user) if mesh is not None else None
        if mesh is None or owner is None or owner == mesh.me:
            return None
        self.remote_calls += 1
        answer = await mesh.ask(owner, "inbox", {"fn": fn, "user": user, "args": args})
        if answer is None:
            self.remote_failures += 1
            raise StoreUnavailable(
                f"memory store: the inbox of {user!r} is on worker {owner}, which did not answer"
            )
        if answer.get("error") is not None:
            raise StoreUnavailable(f"memory store, worker {owner}: {answer['error']}")
        value = answer.get("value")
        if isinstance(value, dict) and "__error__" in value:
            err = value["__error__"]
            kind = err.get("kind")
            if kind == "InboxFull":
                raise InboxFull(user, int(err.get("limit", 0)))
            if kind == "AckOutOfRange":
                raise AckOutOfRange(user, int(err.get("seq", 0)), int(err.get("top", 0)))
            raise StoreUnavailable(str(err.get("reason", "inbox call failed")))
        return value

    async def _serve(self, msg: dict[str, Any]) -> Any:
        """Another worker's inbox call, for a user this worker owns. Errors of the store
        travel back as ``{"kind", ...}`` and are raised again there."""
        fn, user, args = str(msg.get("fn")), str(msg.get("user")), list(msg.get("args") or [])
        store = self.local
        try:
            if fn == "append":
                a = await store.inbox_append(user, str(args[0]).encode(), args[1], args[2])
                return list(a)
            if fn == "read":
                msgs = await store.inbox_read(user, int(args[0]), int(args[1]))
                return [[m.seq, m.msg_id, m.sender, m.data.decode(), m.epoch] for m in msgs]
            if fn == "ack":
                return list(await store.inbox_ack(user, int(args[0]), args[1]))
            if fn == "state":
                return list(await store.inbox_state(user))
            if fn == "restart":
                return list(await store.inbox_restart_epoch(user, str(args[0])))
        except InboxFull as e:
            return {"__error__": {"kind": "InboxFull", "limit": e.limit}}
        except AckOutOfRange as e:
            return {"__error__": {"kind": "AckOutOfRange", "seq": e.seq, "top": e.top}}
        except StoreError as e:
            return {"__error__": {"kind": "StoreError", "reason": str(e)}}
        return {"__error__": {"kind": "StoreError", "reason": f"unknown inbox call {fn!r}"}}
