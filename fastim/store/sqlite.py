"""The embedded durable store: one SQLite database file (stdlib ``sqlite3``, WAL mode).

Why it is built this way:

* **One writer thread, group commit.** SQLite calls block, so none runs on the event
  loop. Every write (append, inbox send, ack, sweep) becomes a *job*; jobs submitted
  during one event-loop tick are handed to the writer thread together, and the writer
  runs everything it finds queued in **one transaction**, then resolves the jobs'
  futures in one ``call_soon_threadsafe``. A node that publishes 500 messages in a tick
  pays for one commit, not 500. A job that is refused (a full inbox) writes nothing and
  does not disturb its neighbours. A caller's future resolves only after
  ``COMMIT`` returned: an acknowledged append is in the WAL file.
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
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .base import (
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
    Store,
    StoreError,
    StoreUnavailable,
    check_read_args,
    dedup_key,
    new_epoch,
    new_msg_id,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

SYNCHRONOUS = ("normal", "full")

#: most jobs one transaction takes; more wait for the next one
MAX_BATCH = 2000
#: entries of the writer's channel-state cache before the oldest are dropped
CACHE_SIZE = 65536

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
"""


def _slack(n: int) -> int:
    return max(8, n // 8)


class _Meta:
    """The writer's cached view of one channel row (and of its oldest/newest message)."""

    __slots__ = ("cid", "epoch", "expires", "last_ts", "low", "oldest", "top")

    def __init__(
        self,
        cid: int,
        epoch: str,
        top: int,
        expires: float | None,
        low: int,
        oldest: float | None,
        last_ts: float | None,
    ) -> None:
        self.cid = cid
        self.epoch = epoch
        self.top = top
        self.expires = expires
        #: lowest offset still stored (top + 1 when none)
        self.low = low
        #: time of that message, None when none
        self.oldest = oldest
        #: time of the newest message: appends never go below it
        self.last_ts = last_ts


class _Writer:
    """What the writer thread's jobs operate on: its connection and its cache.

    Used only from the writer thread. Methods raise :class:`StoreError` subclasses for
    refusals (before writing anything) and let ``sqlite3.Error`` through.
    """

    def __init__(self, conn: sqlite3.Connection, store: SqliteStore) -> None:
        self.conn = conn
        self.store = store
        self.cache: dict[str, _Meta] = {}

    # -- channels

    def _load(self, name: str) -> _Meta | None:
        c = self.conn
        row = c.execute(
            "SELECT cid, epoch, top, expires FROM channels WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        cid, epoch, top, expires = row
        first = c.execute(
            "SELECT off, ts FROM messages WHERE cid = ? ORDER BY off LIMIT 1", (cid,)
        ).fetchone()
        last = c.execute(
            "SELECT ts FROM messages WHERE cid = ? ORDER BY off DESC LIMIT 1", (cid,)
        ).fetchone()
        return _Meta(
            cid,
            epoch,
            top,
            expires,
            first[0] if first else top + 1,
            first[1] if first else None,
            last[0] if last else None,
        )

    def channel(self, name: str, limits: HistoryLimits, now: float) -> _Meta:
        meta = self.cache.get(name)
        if meta is None:
            meta = self._load(name)
        if meta is not None and meta.expires is not None and meta.expires <= now:
            self.conn.execute("DELETE FROM messages WHERE cid = ?", (meta.cid,))
            self.conn.execute("DELETE FROM channels WHERE cid = ?", (meta.cid,))
            meta = None
        if meta is None:
            epoch = new_epoch()
            expires = now + limits.meta_ttl if limits.meta_ttl is not None else None
            cur = self.conn.execute(
                "INSERT INTO channels (name, epoch, top, expires) VALUES (?, ?, 0, ?)",
                (name, epoch, expires),
            )
            assert cur.lastrowid is not None
            meta = _Meta(cur.lastrowid, epoch, 0, expires, 1, None, None)
        if self.cache.get(name) is not meta:
            if name not in self.cache and len(self.cache) >= CACHE_SIZE:
                del self.cache[next(iter(self.cache))]
            self.cache[name] = meta
        return meta

    def append(self, name: str, items: Sequence[bytes], limits: HistoryLimits) -> Appended:
        now = self.store._clock()
        meta = self.channel(name, limits, now)
        first = meta.top + 1
        if not items:
            return Appended(first, meta.epoch)
        c = self.conn
        cid = meta.cid
        ts = now if meta.last_ts is None else max(now, meta.last_ts)
        c.executemany(
            "INSERT INTO messages (cid, off, ts, data) VALUES (?, ?, ?, ?)",
            [(cid, first + i, ts, data) for i, data in enumerate(items)],
        )
        top = first + len(items) - 1
        expires = now + limits.meta_ttl if limits.meta_ttl is not None else None
        c.execute("UPDATE channels SET top = ?, expires = ? WHERE cid = ?", (top, expires, cid))
        meta.top, meta.expires, meta.last_ts = top, expires, ts
        if meta.oldest is None:
            meta.low, meta.oldest = first, ts
        size = limits.size
        trimmed = False
        if top - meta.low + 1 > size + _slack(size):
            meta.low = top - size + 1
            c.execute("DELETE FROM messages WHERE cid = ? AND off < ?", (cid, meta.low))
            trimmed = True
        ttl = limits.ttl
        if ttl is not None and meta.oldest is not None and meta.oldest <= now - ttl - ttl / 8:
            c.execute("DELETE FROM messages WHERE cid = ? AND ts <= ?", (cid, now - ttl))
            trimmed = True
        if trimmed:
            row = c.execute(
                "SELECT off, ts FROM messages WHERE cid = ? ORDER BY off LIMIT 1", (cid,)
            ).fetchone()
            meta.low, meta.oldest = (row[0], row[1]) if row else (top + 1, None)
        return Appended(first, meta.epoch)

    def state(self, name: str, limits: HistoryLimits) -> ChannelState:
        meta = self.channel(name, limits, self.store._clock())
        return ChannelState(meta.epoch, meta.top)

    def restart_epoch(self, name: str, seen: str, limits: HistoryLimits) -> ChannelState:
        meta = self.channel(name, limits, self.store._clock())
        if meta.epoch == seen:
            epoch = new_epoch()
            self.conn.execute("UPDATE channels SET epoch = ? WHERE cid = ?", (epoch, meta.cid))
            meta.epoch = epoch
        return ChannelState(meta.epoch, meta.top)

    # -- inboxes

    def inbox_append(
        self, user: str, data: bytes, client_msg_id: str | None, sender: str | None
    ) -> InboxAppended:
        c = self.conn
        now = self.store._clock()
        lim = self.store.inbox_limits
        key = None
        if client_msg_id is not None:
            key = dedup_key(sender, client_msg_id)
            hit = c.execute(
                "SELECT seq, msg_id, ts FROM inbox_dedup WHERE user = ? AND key = ?", (user, key)
            ).fetchone()
            hit = c.execute(
                "SELECT d.seq, d.msg_id, d.ts, i.epoch FROM inbox_dedup d "
                "JOIN inboxes i ON i.user = d.user WHERE d.user = ? AND d.key = ?",
                (user, key),
            ).fetchone()
            if hit is not None and now - hit[2] < lim.dedup_window:
                return InboxAppended(hit[0], hit[1], True, hit[3])
        row = c.execute(
            "SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)
        ).fetchone()
        top, acked, epoch = row if row else (0, 0, new_epoch())
        if top - acked >= lim.max_unacked:
            raise InboxFull(user, lim.max_unacked)
        seq = top + 1
        msg_id = new_msg_id()
        if row:
            c.execute("UPDATE inboxes SET top = ? WHERE user = ?", (seq, user))
        else:
            c.execute(
                "INSERT INTO inboxes (user, top, acked, epoch) VALUES (?, ?, 0, ?)",
                (user, seq, epoch),
            )
        c.execute(
            "INSERT INTO inbox_messages (user, seq, msg_id, sender, data) VALUES (?, ?, ?, ?, ?)",
            (user, seq, msg_id, sender, data),
        )
        if key is not None and lim.dedup_window > 0:
            c.execute(
                "INSERT OR REPLACE INTO inbox_dedup (user, key, seq, msg_id, ts) "
                "VALUES (?, ?, ?, ?, ?)",
                (user, key, seq, msg_id, now),
            )
        return InboxAppended(seq, msg_id, False, epoch)

    def inbox_ack(self, user: str, seq: int, epoch: str | None) -> InboxState:
        c = self.conn
        row = c.execute(
            "SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)
        ).fetchone()
        top, acked, current = row if row else (0, 0, "")
        if epoch is not None and epoch != current:
            return InboxState(acked, top, current)  # an ack of another numbering
        if seq > top:
            raise AckOutOfRange(user, seq, top)
        if seq > acked:
            c.execute("UPDATE inboxes SET acked = ? WHERE user = ?", (seq, user))
            c.execute("DELETE FROM inbox_messages WHERE user = ? AND seq <= ?", (user, seq))
            acked = seq
        return InboxState(acked, top, current)

    def inbox_restart_epoch(self, user: str, seen: str) -> InboxState:
        c = self.conn
        row = c.execute(
            "SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)
        ).fetchone()
        if row is None:
            return InboxState(0, 0)
        top, acked, epoch = row
        if epoch == seen:
            epoch = new_epoch()
            c.execute("UPDATE inboxes SET epoch = ? WHERE user = ?", (epoch, user))
        return InboxState(acked, top, epoch)

    # -- upkeep

    def sweep(self) -> int:
        c = self.conn
        now = self.store._clock()
        dead = c.execute(
            "SELECT cid, name FROM channels WHERE expires <= ? LIMIT 10000", (now,)
        ).fetchall()
        for cid, name in dead:
            c.execute("DELETE FROM messages WHERE cid = ?", (cid,))
            c.execute("DELETE FROM channels WHERE cid = ?", (cid,))
            self.cache.pop(name, None)
        cur = c.execute(
            "DELETE FROM inbox_dedup WHERE ts <= ?", (now - self.store.inbox_limits.dedup_window,)
        )
        return len(dead) + max(cur.rowcount, 0)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an earlier version up to :data:`SCHEMA`."""
    cols = {row[1] for row in conn.execute("PRAGMA table_info(inboxes)")}
    if "epoch" not in cols:
        conn.execute("ALTER TABLE inboxes ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")
    # inboxes from before epochs: each gets one now (their clients knew none)
    conn.execute("UPDATE inboxes SET epoch = lower(hex(randomblob(6))) WHERE epoch = ''")


_Job = tuple[Callable[[_Writer], Any], "asyncio.Future[Any]"]
#: a job's future and its result or error, handed back to the event loop
_Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


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
    ) -> None:
        super().__init__(limits, inbox)
        if synchronous.lower() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self._clock = clock
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._pending: list[_Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._stopped: asyncio.Future[None] | None = None
        #: transactions committed and jobs they carried (jobs / transactions = batching)
        self.transactions = 0
        self.jobs = 0

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        limits: HistoryLimits | None = None,
        inbox: InboxLimits | None = None,
        synchronous: str = "normal",
        clock: Callable[[], float] = time.time,
    ) -> SqliteStore:
        store = cls(path, limits, inbox, synchronous, clock)
        await store.start()
        return store

    def _fail(self, what: str, e: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"sqlite store {self.path}: {what} failed: {e}")

    # ------------------------------------------------------------------------ the threads

    async def start(self) -> None:
        """Take the file lock, create the schema, start the writer and reader threads."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopped = loop.create_future()
        try:
            await loop.run_in_executor(None, self._lock)
            conn = await loop.run_in_executor(None, self._connect, True)
        except (OSError, sqlite3.Error) as e:
            self._unlock()
            raise self._fail("open", e) from e
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="fastim-sqlite-writer", daemon=True
        )
        self._thread.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fastim-sqlite-reader")

    def _lock(self) -> None:
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
            _migrate(conn)
        return conn

    def _run(self, conn: sqlite3.Connection) -> None:
        """The writer thread: take what is queued, run it as one transaction, report."""
        w = _Writer(conn, self)
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                jobs = list(first)
                while len(jobs) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    jobs.extend(more)
                self._deliver(self._transaction(w, jobs))
        except BaseException as e:  # pragma: no cover - a bug: fail what waits, loudly
            self._drain(self._fail("writer thread", e))
            raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._set_stopped)

    def _transaction(self, w: _Writer, jobs: list[_Job]) -> list[_Result]:
        """Run ``jobs`` in one transaction; each result is reported only if COMMIT worked.

        A refusal (:class:`InboxFull`, :class:`AckOutOfRange`) is raised before its job
        writes anything, so it fails that job alone. Any other error rolls the whole
        transaction back; the failing job gets the error and the others run again in a
        new transaction, once: if that fails too (a full disk fails every write), they
        all get the error. No savepoint per job: they cost half of an append's time.
        """
        failed: list[_Result] = []
        for attempt in (1, 2):
            done, bad = self._attempt(w, jobs)
            if bad is None:
                return failed + done
            i, err = bad
            w.cache.clear()  # it may hold what the rollback undid
            if i < 0 or attempt == 2:  # BEGIN or COMMIT failed, or a second failure
                return failed + [(f, None, err) for _, f in jobs]
            failed.append((jobs[i][1], None, err))
            jobs = jobs[:i] + jobs[i + 1 :]
        raise AssertionError("unreachable")

    def _attempt(
        self, w: _Writer, jobs: list[_Job]
    ) -> tuple[list[_Result], tuple[int, StoreUnavailable] | None]:
        """One transaction over ``jobs``: (results, None) after COMMIT, or (_, (index of
        the job that failed or -1, the error)) after a rollback."""
        conn = w.conn
        done: list[_Result] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return done, (-1, self._fail("begin", e))
        for i, (fn, fut) in enumerate(jobs):
            try:
                done.append((fut, fn(w), None))
            except StoreError as e:  # a refusal: nothing was written
                done.append((fut, None, e))
            except Exception as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                return done, (i, self._fail("write", e))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return done, (-1, self._fail("commit", e))
        self.transactions += 1
        self.jobs += len(done)
        return done, None

    def _deliver(self, results: list[_Result]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(_resolve, results)

    def _drain(self, err: BaseException) -> None:
        """Fail every job still queued (the writer is gone)."""
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return
            if batch:
                self._deliver([(fut, None, err) for _, fut in batch])

    def _set_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None:
            state = "closed" if self._closed else "not started"
            raise StoreUnavailable(f"sqlite store {self.path} is {state}")
        return self._loop

    async def _write(self, fn: Callable[[_Writer], T]) -> T:
        """Queue ``fn`` for the writer; jobs of one loop tick go over as one batch."""
        loop = self._check_open()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((fn, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._queue.put(batch)

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

    # ------------------------------------------------------------------------------ upkeep

    async def sweep(self) -> int:
        """Delete forgotten channels (up to 10,000 a call) and expired dedup entries."""
        return await self._write(lambda w: w.sweep())

    async def close(self) -> None:
        """Commit what is queued, stop both threads, close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._thread is not None:
            self._queue.put(None)
            assert self._stopped is not None
            await asyncio.shield(self._stopped)
            self._thread.join()
        if self._reader is not None:
            rconn = self._rconn
            if rconn is not None:
                await asyncio.get_running_loop().run_in_executor(self._reader, rconn.close)
            self._reader.shutdown(wait=True)
        self._unlock()


def _resolve(results: list[_Result]) -> None:
    for fut, result, err in results:
        if fut.done():  # the caller was cancelled; the write happened all the same
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result)
