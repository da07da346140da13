"""The embedded durable store: one SQLite database file (stdlib ``sqlite3``, WAL mode).

Why it is built this way:

* **One writer thread, group commit.** SQLite calls block, so none runs on the event
  loop. Every write (append, inbox send, ack, sweep) becomes a *job*; jobs submitted
  during one event-loop tick are handed to the writer thread together, and the writer
  runs everything it finds queued in **one transaction**, then resolves the jobs'
  futures in one ``call_soon_threadsafe``. A node that publishes 500 messages in a tick
  pays for one commit, not 500. A job that is refused (a full inbox) writes nothing and
  does not disturb its neighbours. A caller's future resolves only after
  ``COMMIT`` returned: an acknowledged append is in the WAL file. The writer's side (its
  operations and the group commit) is :mod:`fastim.store.sqlite_writer`; this module
  keeps the file (lock, schema, connections), the reader and the async API.
* **Reads on a second connection, on their own thread.** WAL lets them run while the
  writer writes; each read is one read transaction, so epoch, top and messages come from
  one snapshot. A read sees every append whose call has returned.
* **Crash safety.** ``synchronous=NORMAL`` (the default) writes the WAL with ``write()``
  at commit and syncs it only at checkpoints: a committed transaction survives the
  process being killed (``kill -9``, OOM killer) but the last transactions may be lost
  if the *machine* loses power (the database stays consistent). ``synchronous=FULL``
  syncs the WAL at every commit and survives power loss too; group commit makes that
  affordable (one fsync per batch).
* **One process per file.** The writer caches channel state (top offset, epoch), so a
  second writer would corrupt the offset sequence; a lock file (``<path>.lock``,
  ``flock``) makes a second store on the same file fail at open with a clear error.
* **Lazy trimming.** Reads apply the count and age limits exactly; the writer deletes
  trimmed rows in batches (once the channel holds 1/8 more rows, or rows 1/8 of the ttl
  older, than the limits), and :meth:`SqliteStore.sweep` deletes forgotten channels and
  old dedup entries.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from . import sqlite_outbox
from .base import (
    IDEMPOTENCY_WINDOW,
    Appended,
    ChannelState,
    History,
    HistoryLimits,
    InboxAppended,
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
)
from .sqlite_writer import CACHE_SIZE as CACHE_SIZE
from .sqlite_writer import MAX_BATCH as MAX_BATCH
from .sqlite_writer import Writer, WriterThread

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

SYNCHRONOUS = ("normal", "full")

SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    cid     INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    epoch   TEXT NOT NULL,
    top     INTEGER NOT NULL,
    expires REAL              -- forgotten after this (unix time); NULL = never
);
CREATE INDEX IF NOT EXISTS channels_expires ON channels (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    cid  INTEGER NOT NULL,
    off  INTEGER NOT NULL,
    ts   REAL NOT NULL,       -- unix time of the append
    data BLOB NOT NULL,
    PRIMARY KEY (cid, off)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inboxes (
    user  TEXT PRIMARY KEY,
    top   INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    epoch TEXT NOT NULL DEFAULT ''  -- '' only in files written before inboxes had epochs
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_messages (
    user   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    sender TEXT,
    data   BLOB NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_dedup (
    user   TEXT NOT NULL,
    key    TEXT NOT NULL,     -- base.dedup_key(sender, client_msg_id)
    seq    INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    ts     REAL NOT NULL,
    PRIMARY KEY (user, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_dedup_ts ON inbox_dedup (ts);
CREATE TABLE IF NOT EXISTS channel_keys (
    cid     INTEGER NOT NULL,
    key     TEXT NOT NULL,    -- a publish's idempotency key (Store.append_keyed)
    off     INTEGER NOT NULL, -- the offset the keyed message got
    epoch   TEXT NOT NULL,    -- in this epoch: a key of another one (a cid reused) is void
    expires REAL NOT NULL,    -- unix time its window ends; swept
    PRIMARY KEY (cid, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS channel_keys_expires ON channel_keys (expires);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an earlier version up to :data:`SCHEMA`."""
    cols = {row[1] for row in conn.execute("PRAGMA table_info(inboxes)")}
    if "epoch" not in cols:
        conn.execute("ALTER TABLE inboxes ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")
    # inboxes from before epochs: each gets one now (their clients knew none)
    conn.execute("UPDATE inboxes SET epoch = lower(hex(randomblob(6))) WHERE epoch = ''")


class SqliteStore(Store):
    """History and inboxes in one SQLite file. Open with ``await SqliteStore.open(path)``."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        super().__init__(limits, inbox)
        #: the file is shared by the workers of one node (their supervisor holds the
        #: lock): no lock taken here, and cached channel rows are checked before use
        self.shared = shared
        if synchronous.lower() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: WriterThread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> SqliteStore:
        store = cls(path, limits, inbox, synchronous, clock, shared)
        await store.start()
        return store

    @property
    def transactions(self) -> int:
        """Transactions the writer committed (jobs / transactions = batching)."""
        return 0 if self._writer is None else self._writer.transactions

    @property
    def jobs(self) -> int:
        """Jobs those transactions carried."""
        return 0 if self._writer is None else self._writer.jobs

    def _fail(self, what: str, e: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"sqlite store {self.path}: {what} failed: {e}")

    # ------------------------------------------------------------------------ the threads

    async def start(self) -> None:
        """Take the file lock, create the schema, start the writer and reader threads."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            await loop.run_in_executor(None, self._lock)
            conn = await loop.run_in_executor(None, self._open_writer)
        except (OSError, sqlite3.Error) as e:
            self._unlock()
            raise self._fail("open", e) from e
        writer = Writer(conn, self._clock, self.inbox_limits, shared=self.shared)
        self._writer = WriterThread(writer, loop, self._fail)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fastim-sqlite-reader")

    def _open_writer(self) -> sqlite3.Connection:
        """The writer's connection, schema created. Workers sharing the file take turns
        (switching to WAL and creating the schema need the database to themselves, and
        SQLite does not wait for that: "database is locked" at once)."""
        if not self.shared or fcntl is None:
            return self._connect(True)
        fd = os.open(self.path + ".open", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._connect(True)
        finally:
            os.close(fd)

    def _lock(self) -> None:
        if self.shared:
            return  # the supervisor of this node's workers holds it
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OSError(
                    f"database is in use by another process (lock {self.path}.lock)"
                ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _connect(self, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if writer:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.executescript(SCHEMA)
            conn.executescript(sqlite_outbox.SCHEMA)
            _migrate(conn)
        return conn

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None:
            state = "closed" if self._closed else "not started"
            raise StoreUnavailable(f"sqlite store {self.path} is {state}")
        return self._loop

    async def _write(self, fn: Callable[[Writer], T]) -> T:
        """Queue ``fn`` for the writer thread (one transaction per batch)."""
        self._check_open()
        assert self._writer is not None
        return await self._writer.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = self._check_open()
        assert self._reader is not None
        return await loop.run_in_executor(self._reader, self._in_reader, fn)

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._rconn is None:
                self._rconn = self._connect(False)
            conn = self._rconn
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._fail("read", e) from e

    # ------------------------------------------------------------------- channel history

    async def append(
        self, channel: str, data: bytes, limits: HistoryLimits | None = None
    ) -> Appended:
        lim = self._limits(limits)
        return await self._write(lambda w: w.append(channel, (data,), lim))

    async def append_many(
        self, channel: str, items: Sequence[bytes], limits: HistoryLimits | None = None
    ) -> Appended:
        lim = self._limits(limits)
        batch = list(items)
        return await self._write(lambda w: w.append(channel, batch, lim))

    async def append_keyed(
        self,
        channel: str,
        items: Sequence[bytes],
        keys: Sequence[str | None],
        limits: HistoryLimits | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> KeyedAppended:
        """The keys are looked up and recorded by the writer, in the transaction of the
        append (table ``channel_keys``): committed together or not at all."""
        lim = self._limits(limits)
        batch, ks = list(items), list(keys)
        if len(ks) != len(batch):
            raise ValueError(f"{len(ks)} keys for {len(batch)} items")
        return await self._write(lambda w: w.append_keyed(channel, batch, ks, lim, window))

    async def read(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History:
        check_read_args(since, limit)
        lim = self._limits(limits)
        for _ in range(3):
            h = await self._peek(channel, since, limit, lim)
            if h is not None:
                return h
            # never seen (or forgotten): the writer gives it an epoch
            st = await self._write(lambda w: w.state(channel, lim))
            if st.top == 0:
                return History(st.epoch, 0, [])
        raise StoreUnavailable(f"sqlite store {self.path}: channel {channel!r} keeps expiring")

    async def peek(
        self, channel: str, since: int, limit: int = 1000, limits: HistoryLimits | None = None
    ) -> History | None:
        check_read_args(since, limit)
        return await self._peek(channel, since, limit, self._limits(limits))

    async def _peek(
        self, channel: str, since: int, limit: int, lim: HistoryLimits
    ) -> History | None:
        """The reader's snapshot of an existing channel; None for one never seen or forgotten."""

        def run(conn: sqlite3.Connection) -> History | None:
            now = self._clock()
            row = conn.execute(
                "SELECT cid, epoch, top, expires FROM channels WHERE name = ?", (channel,)
            ).fetchone()
            if row is None or (row[3] is not None and row[3] <= now):
                return None
            cid, epoch, top, _ = row
            if limit == 0:
                return History(epoch, top, [])
            cutoff = now - lim.ttl if lim.ttl is not None else -1.0
            msgs = conn.execute(
                "SELECT off, data FROM messages WHERE cid = ? AND off > ? AND ts > ? "
                "ORDER BY off LIMIT ?",
                (cid, max(since, top - lim.size), cutoff, limit),
            ).fetchall()
            return History(epoch, top, msgs)

        return await self._read(run)

    async def state(self, channel: str, limits: HistoryLimits | None = None) -> ChannelState:
        h = await self.read(channel, 0, 0, limits)
        return ChannelState(h.epoch, h.top)

    async def restart_epoch(
        self, channel: str, seen_epoch: str, limits: HistoryLimits | None = None
    ) -> ChannelState:
        lim = self._limits(limits)
        return await self._write(lambda w: w.restart_epoch(channel, seen_epoch, lim))

    # ----------------------------------------------------------------------------- inboxes

    async def inbox_append(
        self,
        user: str,
        data: bytes,
        client_msg_id: str | None = None,
        sender: str | None = None,
    ) -> InboxAppended:
        return await self._write(lambda w: w.inbox_append(user, data, client_msg_id, sender))

    async def inbox_read(self, user: str, after_seq: int, limit: int = 1000) -> list[InboxMessage]:
        check_read_args(after_seq, limit)

        def run(conn: sqlite3.Connection) -> list[InboxMessage]:
            # one snapshot (reads run in a transaction) for the epoch and the messages
            row = conn.execute("SELECT epoch FROM inboxes WHERE user = ?", (user,)).fetchone()
            rows = conn.execute(
                "SELECT seq, msg_id, sender, data FROM inbox_messages "
                "WHERE user = ? AND seq > ? ORDER BY seq LIMIT ?",
                (user, after_seq, limit),
            ).fetchall()
            epoch = row[0] if row else ""
            return [InboxMessage(seq, mid, snd, data, epoch) for seq, mid, snd, data in rows]

        return await self._read(run)

    async def inbox_ack(self, user: str, seq: int, epoch: str | None = None) -> InboxState:
        return await self._write(lambda w: w.inbox_ack(user, seq, epoch))

    async def inbox_state(self, user: str) -> InboxState:
        def run(conn: sqlite3.Connection) -> InboxState:
            row = conn.execute(
                "SELECT acked, top, epoch FROM inboxes WHERE user = ?", (user,)
            ).fetchone()
            return InboxState(*row) if row else InboxState(0, 0)

        return await self._read(run)

    async def inbox_restart_epoch(self, user: str, seen_epoch: str) -> InboxState:
        return await self._write(lambda w: w.inbox_restart_epoch(user, seen_epoch))

    # ------------------------------------------------------------------------ event outbox

    async def outbox_add(self, items: Sequence[OutboxItem]) -> int:
        batch = list(items)
        clock = self._clock
        return await self._write(lambda w: sqlite_outbox.add(w.conn, batch, clock()))

    async def outbox_read(self, limit: int) -> list[OutboxEntry]:
        return await self._read(lambda c: sqlite_outbox.read(c, limit))

    async def outbox_remove(self, keys: Sequence[str]) -> None:
        batch = list(keys)
        await self._write(lambda w: sqlite_outbox.remove(w.conn, batch))

    async def outbox_stats(self) -> OutboxStats:
        return await self._read(sqlite_outbox.stats)

    async def outbox_lease(self, owner: str, ttl: float) -> bool:
        clock = self._clock
        return await self._write(lambda w: sqlite_outbox.lease(w.conn, owner, ttl, clock()))

    async def outbox_beat(self, node: str, ttl: float) -> None:
        clock = self._clock
        await self._write(lambda w: sqlite_outbox.beat(w.conn, node, ttl, clock()))

    async def outbox_claim(self, limit: int = 1000) -> int:
        clock = self._clock
        return await self._write(lambda w: sqlite_outbox.claim(w.conn, limit, clock()))

    # ------------------------------------------------------------------------------ upkeep

    async def sweep(self) -> int:
        """Delete forgotten channels (up to 10,000 a call), expired dedup entries and
        expired idempotency keys of channels."""
        return await self._write(lambda w: w.sweep())

    async def close(self) -> None:
        """Commit what is queued, stop both threads, close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await self._writer.stop()
        if self._reader is not None:
            rconn = self._rconn
            if rconn is not None:
                await asyncio.get_running_loop().run_in_executor(self._reader, rconn.close)
            self._reader.shutdown(wait=True)
        self._unlock()
