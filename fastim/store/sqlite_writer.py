"""The sqlite store's writer thread (:mod:`fastim.store.sqlite`): group commit.

Everything that writes runs here, on one thread with one connection:

* :class:`Writer` is what a job operates on: the connection and a cache of channel state
  (top offset, epoch, oldest and newest message), with one method per write (append,
  epoch restart, inbox send, ack, inbox epoch restart, sweep).
* :class:`WriterThread` is the thread and its queue. :meth:`WriterThread.submit` queues a
  job (a function of the :class:`Writer`) from the event loop; the jobs of one loop tick go
  over as one batch, the thread runs everything it finds queued (up to
  :data:`MAX_BATCH` jobs) in **one transaction**, and hands the results back in one
  ``call_soon_threadsafe``, after ``COMMIT`` returned.

The store itself (the file lock, the connections, the reader, the async API) is
:class:`fastim.store.sqlite.SqliteStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .base import (
    AckOutOfRange,
    Appended,
    ChannelState,
    HistoryLimits,
    InboxAppended,
    InboxFull,
    InboxLimits,
    InboxState,
    KeyedAppended,
    StoreError,
    StoreUnavailable,
    dedup_key,
    new_epoch,
    new_msg_id,
    plan_keyed,
    settle_keyed,
)

T = TypeVar("T")

#: most jobs one transaction takes; more wait for the next one
MAX_BATCH = 2000
#: entries of the writer's channel-state cache before the oldest are dropped
CACHE_SIZE = 65536
#: idempotency keys looked up per query (under SQLite's oldest limit of 999 parameters)
KEYS_PER_QUERY = 500


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


class Writer:
    """What the writer thread's jobs operate on: its connection and its cache.

    Used only from the writer thread. Methods raise :class:`StoreError` subclasses for
    refusals (before writing anything) and let ``sqlite3.Error`` through. ``clock`` and
    ``inbox`` are the store's.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        clock: Callable[[], float],
        inbox: InboxLimits,
        shared: bool = False,
    ) -> None:
        #: other processes write the file too (the workers of one node): a cached
        #: channel row is checked against the file before use (one indexed SELECT)
        self.shared = shared
        self.conn = conn
        self.clock = clock
        self.inbox_limits = inbox
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
        if meta is not None and self.shared:
            row = self.conn.execute(
                "SELECT cid, epoch, top, expires FROM channels WHERE name = ?", (name,)
            ).fetchone()
            if row is None or tuple(row) != (meta.cid, meta.epoch, meta.top, meta.expires):
                meta = None  # another worker wrote it (an owner that moved): read it again
                self.cache.pop(name, None)
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
        now = self.clock()
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

    def append_keyed(
        self,
        name: str,
        items: list[bytes],
        keys: list[str | None],
        limits: HistoryLimits,
        window: float,
    ) -> KeyedAppended:
        """:meth:`append` of the items whose key the channel has not recorded, and their
        keys recorded, in the one transaction this job runs in."""
        now = self.clock()
        meta = self.channel(name, limits, now)
        c = self.conn
        wanted = list({k for k in keys if k is not None})
        known: dict[str, int] = {}
        for i in range(0, len(wanted), KEYS_PER_QUERY):
            part = wanted[i : i + KEYS_PER_QUERY]
            known.update(
                c.execute(
                    "SELECT key, off FROM channel_keys WHERE cid = ? AND epoch = ? "
                    f"AND expires > ? AND key IN ({','.join('?' * len(part))})",
                    (meta.cid, meta.epoch, now, *part),
                ).fetchall()
            )
        fresh, offsets, duplicate = plan_keyed(items, keys, known)
        first, epoch = self.append(name, [items[i] for i in fresh], limits)
        done = settle_keyed(fresh, offsets, duplicate, first, epoch)
        if window > 0:
            expires = now + window
            cid = self.cache[name].cid  # the append's row (a channel expired meanwhile: new)
            rows = [
                (cid, k, offsets[i], epoch, expires) for i in fresh if (k := keys[i]) is not None
            ]
            if rows:
                c.executemany(
                    "INSERT OR REPLACE INTO channel_keys (cid, key, off, epoch, expires) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
        return done

    def state(self, name: str, limits: HistoryLimits) -> ChannelState:
        meta = self.channel(name, limits, self.clock())
        return ChannelState(meta.epoch, meta.top)

    def restart_epoch(self, name: str, seen: str, limits: HistoryLimits) -> ChannelState:
        meta = self.channel(name, limits, self.clock())
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
        now = self.clock()
        lim = self.inbox_limits
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
        row = c.execute("SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)).fetchone()
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
        row = c.execute("SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)).fetchone()
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
        row = c.execute("SELECT top, acked, epoch FROM inboxes WHERE user = ?", (user,)).fetchone()
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
        now = self.clock()
        dead = c.execute(
            "SELECT cid, name FROM channels WHERE expires <= ? LIMIT 10000", (now,)
        ).fetchall()
        for cid, name in dead:
            c.execute("DELETE FROM messages WHERE cid = ?", (cid,))
            c.execute("DELETE FROM channels WHERE cid = ?", (cid,))
            self.cache.pop(name, None)
        cur = c.execute(
            "DELETE FROM inbox_dedup WHERE ts <= ?", (now - self.inbox_limits.dedup_window,)
        )
        keys = c.execute("DELETE FROM channel_keys WHERE expires <= ?", (now,))
        return len(dead) + max(cur.rowcount, 0) + max(keys.rowcount, 0)


#: a job: what to run on the writer, and the future its caller awaits
Job = tuple[Callable[[Writer], Any], "asyncio.Future[Any]"]
#: a job's future and its result or error, handed back to the event loop
Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


class WriterThread:
    """The writer thread, its queue, and the group commit.

    Made on the event loop by :meth:`SqliteStore.start` with the writer's connection;
    ``fail(what, error)`` makes the :class:`StoreUnavailable` a failed job gets.
    :meth:`start` starts the thread, :meth:`submit` queues a job, :meth:`stop` commits
    what is queued and waits for the thread to end.
    """

    def __init__(
        self,
        writer: Writer,
        loop: asyncio.AbstractEventLoop,
        fail: Callable[[str, BaseException], StoreUnavailable],
    ) -> None:
        self.writer = writer
        self.loop = loop
        self.fail = fail
        self._queue: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._pending: list[Job] = []
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="fastim-sqlite-writer", daemon=True)
        #: transactions committed and jobs they carried (jobs / transactions = batching)
        self.transactions = 0
        self.jobs = 0

    def start(self) -> None:
        self._thread.start()

    async def submit(self, fn: Callable[[Writer], T]) -> T:
        """Queue ``fn`` for the writer; jobs of one loop tick go over as one batch."""
        fut: asyncio.Future[T] = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self.flush)
        self._pending.append((fn, fut))
        return await fut

    def flush(self) -> None:
        """Hand what this tick queued to the thread."""
        batch, self._pending = self._pending, []
        if batch:
            self._queue.put(batch)

    async def stop(self) -> None:
        """Commit what is queued, then end the thread (which closes its connection)."""
        self.flush()
        self._queue.put(None)
        await asyncio.shield(self._stopped)
        self._thread.join()

    # ------------------------------------------------------------- on the writer thread

    def _run(self) -> None:
        """The writer thread: take what is queued, run it as one transaction, report."""
        w = self.writer
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
            self._drain(self.fail("writer thread", e))
            raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                w.conn.close()
            if not self.loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._set_stopped)

    def _transaction(self, w: Writer, jobs: list[Job]) -> list[Result]:
        """Run ``jobs`` in one transaction; each result is reported only if COMMIT worked.

        A refusal (:class:`InboxFull`, :class:`AckOutOfRange`) is raised before its job
        writes anything, so it fails that job alone. Any other error rolls the whole
        transaction back; the failing job gets the error and the others run again in a
        new transaction, once: if that fails too (a full disk fails every write), they
        all get the error. No savepoint per job: they cost half of an append's time.
        """
        failed: list[Result] = []
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
        self, w: Writer, jobs: list[Job]
    ) -> tuple[list[Result], tuple[int, StoreUnavailable] | None]:
        """One transaction over ``jobs``: (results, None) after COMMIT, or (_, (index of
        the job that failed or -1, the error)) after a rollback."""
        conn = w.conn
        done: list[Result] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return done, (-1, self.fail("begin", e))
        for i, (fn, fut) in enumerate(jobs):
            try:
                done.append((fut, fn(w), None))
            except StoreError as e:  # a refusal: nothing was written
                done.append((fut, None, e))
            except Exception as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                return done, (i, self.fail("write", e))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return done, (-1, self.fail("commit", e))
        self.transactions += 1
        self.jobs += len(done)
        return done, None

    def _deliver(self, results: list[Result]) -> None:
        loop = self.loop
        if loop.is_closed():
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
        if not self._stopped.done():
            self._stopped.set_result(None)


def _resolve(results: list[Result]) -> None:
    for fut, result, err in results:
        if fut.done():  # the caller was cancelled; the write happened all the same
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result)
