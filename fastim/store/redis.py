"""The shared store: Redis (redis-py's asyncio client with hiredis), for clusters of nodes.

Every operation is one Lua script run with EVALSHA (EVAL when Redis answers NOSCRIPT, as
after a restart), so each is atomic in Redis: offset assignment, the epoch check, the
append and the trims happen together or not at all, whatever the number of nodes.

Key layout (``P`` = the ``redis_prefix`` setting; ``{...}`` is a Redis Cluster hash tag,
so all keys of one channel or one user sit in one slot and a script may touch them all):

=====================  ======  ==========================================================
``P:ch:{name}:m``      hash    ``epoch``, ``top`` (last offset), ``ts`` (last append, ms)
``P:ch:{name}:s``      stream  one entry per kept message, id ``<offset>-0``, fields
                               ``t`` (Redis time of the append, ms) and ``d`` (data)
``P:ch:{name}:k``      hash    idempotency key of a publish (``append_keyed``) ->
                               ``"<epoch> <offset> <expiry ms>"``
``P:ch:{name}:kt``     zset    those keys scored by expiry, to forget them
``P:in:{user}:m``      hash    ``top`` (last sequence), ``acked``
``P:in:{user}:s``      stream  unacked messages, id ``<seq>-0``: ``i`` msg id, ``s``
                               sender (absent for none), ``d`` data
``P:in:{user}:d``      hash    dedup key -> ``"<seq> <msg_id> <ms>"``
``P:in:{user}:t``      zset    dedup key scored by its time, to expire old keys
=====================  ======  ==========================================================

Trimming: by count with ``XTRIM MINID ~`` (approximate: Redis drops whole stream nodes of
up to 100 entries, so up to ~100 extra entries may stay), by age by scanning the stream's
oldest entries; reads apply both limits exactly, so the slack is never visible. A channel
with ``meta_ttl`` gets ``PEXPIRE`` on both keys at each append: an idle channel vanishes
by itself. Timestamps are Redis's ``TIME``, so the nodes' clocks do not matter.

Losing keys: if the meta hash is gone (eviction, FLUSHDB, a Redis restart without
persistence) the channel starts a new epoch; if the stream is gone but the hash says
messages were appended, the scripts notice and start a new epoch as well, so a history
loss is never presented as a complete one. Run Redis with ``maxmemory-policy
noeviction`` and AOF (``appendonly yes``) to lose nothing on a Redis restart.

Commands issued in one event-loop tick are sent as one pipeline (one write, one round
trip, one connection), which is Redis's form of group commit. No command is retried by
the client: a write whose reply was lost may have been applied, so the caller gets
:class:`StoreUnavailable` instead of a silent duplicate. redis-py reconnects by itself
on the next call once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .base import (
    IDEMPOTENCY_WINDOW,
    AckOutOfRange,
    Appended,
    ChannelState,
    History,
    HistoryLimits,
    InboxAppended,
    InboxFull,
    InboxLimits,
    InboxMessage,
    InboxState,
    KeyedAppended,
    OutboxEntry,
    OutboxItem,
    OutboxStats,
    Store,
    StoreUnavailable,
    check_read_args,
    dedup_key,
    new_epoch,
    new_msg_id,
)

# `name as name`: defined here before, still importable from here
from .redis_scripts import APPEND as APPEND
from .redis_scripts import INBOX_ACK as INBOX_ACK
from .redis_scripts import INBOX_APPEND as INBOX_APPEND
from .redis_scripts import INBOX_READ as INBOX_READ
from .redis_scripts import INBOX_RESTART_EPOCH as INBOX_RESTART_EPOCH
from .redis_scripts import READ as READ
from .redis_scripts import RESTART_EPOCH as RESTART_EPOCH
from .redis_scripts import SCRIPTS, Script

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, RedisError
except ImportError as e:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "the redis store needs redis-py with hiredis: pip install 'fastim[redis]'"
    ) from e

T = TypeVar("T")


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# one queued call: the script, keys, args, how to turn the reply into a result, its future
_Call = tuple[Script, list[str], list[Any], Callable[[Any], Any], "asyncio.Future[Any]"]


class RedisStore(Store):
    """History and inboxes in Redis. Open with ``await RedisStore.open(url)``."""

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        prefix: str = "fastim",
        timeout: float = 2.0,
    ) -> None:
        super().__init__(limits, inbox)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"redis prefix must not contain braces, got {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self._where = f"redis store {redact(url)}"
        # No retries: a command that timed out may have run, and running it again would
        # append twice. Failures surface as StoreUnavailable; the next call reconnects.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            decode_responses=False,
        )
        self._pending: list[_Call] = []
        self._inflight: set[asyncio.Task[None]] = set()
        #: scripts are known to Redis (False after an error or a NOSCRIPT: load them again)
        self._loaded = False
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        prefix: str = "fastim",
        timeout: float = 2.0,
    ) -> RedisStore:
        """Connect and load the scripts; raise :class:`StoreUnavailable` if Redis is not there."""
        store = cls(url, limits, inbox, prefix, timeout)
        try:
            await store._redis.ping()
            await store._load_scripts()
        except RedisError as e:
            await store._redis.aclose()
            raise StoreUnavailable(f"{store._where}: cannot connect: {e}") from e
        return store

    async def _load_scripts(self) -> None:
        for script in SCRIPTS.values():
            await self._redis.script_load(script.source)
        self._loaded = True

    # ------------------------------------------------------------------- the call batcher

    async def _call(
        self, script: str, keys: list[str], args: list[Any], parse: Callable[[Any], T]
    ) -> T:
        """Queue one script call; the calls of one loop tick go out as one pipeline."""
        if self._closed:
            raise StoreUnavailable(f"{self._where} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((SCRIPTS[script], keys, args, parse, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._pipeline(batch, evalsha=True)
            redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if redo:  # Redis restarted and forgot the scripts: nothing ran, run with EVAL
                self._loaded = False
                again = await self._pipeline([batch[i] for i in redo], evalsha=False)
                for i, r in zip(redo, again, strict=True):
                    replies[i] = r
        except (RedisError, OSError) as e:
            self._loaded = False
            # A timed-out pipeline can leave its replies unread on the socket; a later
            # pipeline on that connection would read them as its own (an append parsed
            # another call's reply: epoch "54"). Drop every connection: the next call
            # reconnects with a clean stream.
            with contextlib.suppress(Exception):
                await self._redis.connection_pool.disconnect(inuse_connections=True)
            err = StoreUnavailable(f"{self._where}: {type(e).__name__}: {e}")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        except BaseException as e:  # cancelled by close(), or a bug: nobody waits for ever
            err = StoreUnavailable(f"{self._where}: {type(e).__name__}: {e}")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            raise
        for (_, _, _, parse, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(
                    StoreUnavailable(f"{self._where}: {type(reply).__name__}: {reply}")
                )
                continue
            try:
                fut.set_result(parse(reply))
            except Exception as e:  # InboxFull, AckOutOfRange
                fut.set_exception(e)

    async def _pipeline(self, batch: list[_Call], evalsha: bool) -> list[Any]:
        # decided once: another batch may set _loaded while this one awaits its replies,
        # and stripping (or not) the SCRIPT LOAD replies must match what was sent, else
        # every reply goes to the wrong caller
        load = evalsha and not self._loaded
        async with self._redis.pipeline(transaction=False) as pipe:
            if load:
                for script in SCRIPTS.values():
                    pipe.execute_command("SCRIPT", "LOAD", script.source)
            for script, keys, args, _, _ in batch:
                head = ("EVALSHA", script.sha) if evalsha else ("EVAL", script.source)
                pipe.execute_command(*head, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if load:
            loads, replies = replies[: len(SCRIPTS)], replies[len(SCRIPTS) :]
            self._loaded = not any(isinstance(r, Exception) for r in loads)
        return replies

    # ------------------------------------------------------------------------------- keys

    def _ch(self, channel: str) -> list[str]:
        base = f"{self.prefix}:ch:{{{channel}}}"
        return [base + ":m", base + ":s"]

    def _in(self, user: str) -> list[str]:
        base = f"{self.prefix}:in:{{{user}}}"
        return [base + ":m", base + ":s", base + ":d", base + ":t"]

    @staticmethod
    def _ms(seconds: float | None) -> int:
        return 0 if seconds is None else max(1, round(seconds * 1000))

    # ------------------------------------------------------------------- channel history

    async def append(
        self, channel: str, data: bytes, limits: HistoryLimits | None = None
    ) -> Appended:
        return await self.append_many(channel, (data,), limits)

    async def append_many(
        self, channel: str, items: Sequence[bytes], limits: HistoryLimits | None = None
    ) -> Appended:
        lim = self._limits(limits)
        args = [new_epoch(), self._ms(lim.meta_ttl), lim.size, self._ms(lim.ttl), *items]
        return await self._call("append", self._ch(channel), args, _parse_appended)

    async def append_keyed(
        self,
        channel: str,
        items: Sequence[bytes],
        keys: Sequence[str | None],
        limits: HistoryLimits | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> KeyedAppended:
        """One script (``append_keyed``): the lookup of the keys, the append of the new
        items and the record of their keys are one atomic step in Redis."""
        if len(keys) != len(items):
            raise ValueError(f"{len(keys)} keys for {len(items)} items")
        lim = self._limits(limits)
        args = [
            new_epoch(),
            self._ms(lim.meta_ttl),
            lim.size,
            self._ms(lim.ttl),
            self._ms(window) if window > 0 else 0,
            len(items),
            *["" if k is None else k for k in keys],
            *items,
        ]
        base = f"{self.prefix}:ch:{{{channel}}}"
        script_keys = [base + ":m", base + ":s", base + ":k", base + ":kt"]
        return await self._call("append_keyed", script_keys, args, _parse_keyed)

    async def read(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History:
        check_read_args(since, limit)
        lim = self._limits(limits)
        args = [new_epoch(), self._ms(lim.meta_ttl), since, limit, lim.size, self._ms(lim.ttl)]
        return await self._call("read", self._ch(channel), args, _parse_history)

    async def peek(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History | None:
        check_read_args(since, limit)
        lim = self._limits(limits)
        args = ["", self._ms(lim.meta_ttl), since, limit, lim.size, self._ms(lim.ttl)]
        return await self._call("read", self._ch(channel), args, _parse_peek)

    async def state(self, channel: str, limits: HistoryLimits | None = None) -> ChannelState:
        h = await self.read(channel, 0, 0, limits)
        return ChannelState(h.epoch, h.top)

    async def restart_epoch(
        self, channel: str, seen_epoch: str, limits: HistoryLimits | None = None
    ) -> ChannelState:
        lim = self._limits(limits)
        args = [new_epoch(), self._ms(lim.meta_ttl), seen_epoch, new_epoch()]
        return await self._call("restart_epoch", self._ch(channel), args, _parse_state)

    # ----------------------------------------------------------------------------- inboxes

    async def inbox_append(
        self,
        user: str,
        data: bytes,
        client_msg_id: str | None = None,
        sender: str | None = None,
    ) -> InboxAppended:
        lim = self.inbox_limits
        key = "" if client_msg_id is None else dedup_key(sender, client_msg_id)
        args = [
            data,
            key,
            "0" if sender is None else "1",
            sender or "",
            new_msg_id(),
            lim.max_unacked,
            self._ms(lim.dedup_window) if lim.dedup_window > 0 else 0,
            new_epoch(),
        ]

        def parse(reply: Any) -> InboxAppended:
            seq, msg_id, dup, epoch = reply
            if seq < 0:
                raise InboxFull(user, lim.max_unacked)
            return InboxAppended(int(seq), _s(msg_id), bool(dup), _s(epoch))

        return await self._call("inbox_append", self._in(user), args, parse)

    async def inbox_read(self, user: str, after_seq: int, limit: int = 1000) -> list[InboxMessage]:
        check_read_args(after_seq, limit)
        return await self._call(
            "inbox_read", self._in(user)[:2], [after_seq, limit], _parse_inbox_messages
        )

    async def inbox_ack(self, user: str, seq: int, epoch: str | None = None) -> InboxState:
        def parse(reply: Any) -> InboxState:
            acked, top, refused, current = reply
            if refused:
                raise AckOutOfRange(user, seq, int(top))
            return InboxState(int(acked), int(top), _s(current))

        args = [seq, "0" if epoch is None else "1", epoch or ""]
        return await self._call("inbox_ack", self._in(user)[:2], args, parse)

    async def inbox_state(self, user: str) -> InboxState:
        def parse(reply: Any) -> InboxState:
            return InboxState(int(reply[0]), int(reply[1]), _s(reply[2]))

        return await self._call("inbox_read", self._in(user)[:2], [0, 0], parse)

    async def inbox_restart_epoch(self, user: str, seen_epoch: str) -> InboxState:
        def parse(reply: Any) -> InboxState:
            return InboxState(int(reply[0]), int(reply[1]), _s(reply[2]))

        args = [seen_epoch, new_epoch()]
        return await self._call("inbox_restart_epoch", self._in(user)[:1], args, parse)

    # ------------------------------------------------------------------------------ upkeep

    # ------------------------------------------------------------------------ event outbox

    @property
    def _ev(self) -> list[str]:
        return [f"{self.prefix}:ev:{{o}}"]

    async def outbox_add(self, items: Sequence[OutboxItem]) -> int:
        args: list[Any] = []
        for it in items:
            key, node, order, lost = it.arm if it.arm is not None else ("", "", 0, b"")
            args += [it.data, key, node, order, lost, it.disarm or ""]
        if not args:
            return 0
        return await self._call("outbox_add", self._ev, args, int)

    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        def parse(reply: Any) -> list[OutboxEntry]:
            out = []
            for sid, fv in reply:
                f = dict(zip(fv[::2], fv[1::2], strict=True))
                out.append(OutboxEntry(_s(sid), bytes(f[b"d"])))
            return out

        return await self._call("outbox_read", self._ev, [limit], parse)

    async def outbox_remove(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call("outbox_remove", self._ev, list(keys), int)

    async def outbox_stats(self) -> OutboxStats:
        def parse(reply: Any) -> OutboxStats:
            first = _s(reply[1])
            oldest = int(first.split("-")[0]) / 1000 if first else None
            return OutboxStats(int(reply[0]), oldest, int(reply[2]))

        return await self._call("outbox_stats", self._ev, [], parse)

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        ms = max(0, round(ttl * 1000))
        return await self._call("outbox_lease", self._ev, [owner, ms], lambda r: int(r) == 1)

    async def outbox_beat(self, node: str, ttl: float) -> None:
        await self._call("outbox_beat", self._ev, [node, self._ms(ttl)], int)

    async def outbox_claim(self, limit: int = 1000) -> int:
        return await self._call("outbox_claim", self._ev, [limit], int)

    async def close(self) -> None:
        """Send what is queued, wait for the replies, close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._redis.aclose()


def _parse_appended(reply: Any) -> Appended:
    return Appended(int(reply[0]), _s(reply[1]))


def _parse_keyed(reply: Any) -> KeyedAppended:
    it = iter(reply[2:])
    pairs = list(zip(it, it, strict=True))
    return KeyedAppended(
        int(reply[0]), _s(reply[1]), [int(o) for o, _ in pairs], [bool(d) for _, d in pairs]
    )


def _parse_state(reply: Any) -> ChannelState:
    return ChannelState(_s(reply[0]), int(reply[1]))


def _parse_history(reply: Any) -> History:
    it = iter(reply[2:])
    return History(
        _s(reply[0]), int(reply[1]), [(int(off), data) for off, data in zip(it, it, strict=True)]
    )


def _parse_peek(reply: Any) -> History | None:
    return None if not reply[0] else _parse_history(reply)


def _parse_inbox_messages(reply: Any) -> list[InboxMessage]:
    epoch = _s(reply[2])
    it = iter(reply[3:])
    return [
        InboxMessage(int(seq), _s(mid), None if sender is None else _s(sender), data, epoch)
        for seq, mid, sender, data in zip(it, it, it, it, strict=True)
    ]
