"""What only the sqlite store promises: restarts, kill -9, one process per file, group
commit, and a full disk reported instead of lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastim.store import HistoryLimits, InboxFull, InboxLimits, StoreUnavailable
from fastim.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]


async def test_close_and_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = await SqliteStore.open(path, HistoryLimits(size=50))
    first = await s.append("news", b"one")
    await s.append_many("news", [b"two", b"three"])
    await s.state("quiet")
    sent = await s.inbox_append("bob", b"hi", "c1", "alice")
    await s.inbox_append("bob", b"again")
    await s.inbox_ack("bob", 1)
    await s.close()

    s = await SqliteStore.open(path, HistoryLimits(size=50))
    try:
        h = await s.read("news", 0)
        assert h == (first.epoch, 3, [(1, b"one"), (2, b"two"), (3, b"three")])
        assert (await s.append("news", b"four")) == (4, first.epoch)
        assert (await s.state("quiet")).top == 0
        assert (await s.inbox_state("bob"))[:2] == (1, 2)
        assert [m.data for m in await s.inbox_read("bob", 0)] == [b"again"]
        assert (await s.inbox_append("bob", b"hi", "c1", "alice"))[:3] == (1, sent.msg_id, True)
    finally:
        await s.close()


async def test_one_process_per_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = await SqliteStore.open(path)
    try:
        with pytest.raises(StoreUnavailable, match="in use by another process"):
            await SqliteStore.open(path)
    finally:
        await s.close()
    s2 = await SqliteStore.open(path)  # the lock went with the first store
    await s2.close()


async def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="open failed"):
        await SqliteStore.open(blocker / "sub" / "s.db")


async def test_appends_of_one_tick_share_one_transaction(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "s.db", HistoryLimits(size=1000))
    try:
        await s.state("c")
        t0, j0 = s.transactions, s.jobs
        results = await asyncio.gather(*(s.append("c", b"%d" % i) for i in range(500)))
        assert sorted(r.offset for r in results) == list(range(1, 501))
        assert s.jobs - j0 == 500
        assert s.transactions - t0 <= 2, "500 appends queued in one tick: one commit"
    finally:
        await s.close()


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_synchronous_setting(tmp_path: Path, synchronous: str) -> None:
    s = await SqliteStore.open(tmp_path / "s.db", synchronous=synchronous)
    try:
        level = await s._write(lambda w: w.conn.execute("PRAGMA synchronous").fetchone()[0])
        assert level == {"normal": 1, "full": 2}[synchronous]
        mode = await s._write(lambda w: w.conn.execute("PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"
    finally:
        await s.close()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / "x.db", synchronous="off")


async def test_full_disk_fails_the_write_and_loses_nothing_acked(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "s.db", HistoryLimits(size=10_000))
    try:
        acked = [await s.append("c", b"x" * 100) for _ in range(5)]
        pages = await s._write(lambda w: w.conn.execute("PRAGMA page_count").fetchone()[0])
        # the writer's connection may not grow the file past a few more pages: SQLITE_FULL
        await s._write(lambda w: w.conn.execute(f"PRAGMA max_page_count = {pages + 3}"))
        with pytest.raises(StoreUnavailable, match="full"):
            for _ in range(200):
                acked.append(await s.append("c", os.urandom(4000)))
        with pytest.raises(StoreUnavailable, match="full"):
            await s.inbox_append("u", os.urandom(20_000))
        await s._write(lambda w: w.conn.execute("PRAGMA max_page_count = 1073741823"))
        nxt = await s.append("c", b"after")
        assert nxt.offset == acked[-1].offset + 1  # the failed appends took no offset
        h = await s.read("c", 0, limit=10_000)
        assert [off for off, _ in h.messages] == list(range(1, nxt.offset + 1))
    finally:
        await s.close()


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store._appender", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        acks = 0
        while acks < 3000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            acks += line.startswith("ack ")
        assert acks >= 3000, f"appender stopped early: {proc.stderr.read() if proc.stderr else ''}"
        proc.send_signal(signal.SIGKILL)  # mid-stream: it is appending as fast as it can
        rest, _ = proc.communicate(timeout=10)
        lines += rest.splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    epoch = lines[0].split()[1]
    acked = {int(p[1]): b"t" + p[2].encode() for p in (ln.split() for ln in lines) if p[0] == "ack"}
    inbox = {int(p[1]): (p[2], b"t" + p[3].encode()) for p in (ln.split() for ln in lines)
             if len(p) == 4 and p[0] == "inbox"}  # fmt: skip

    async def check() -> None:
        s = await SqliteStore.open(path, HistoryLimits(size=1_000_000), InboxLimits(10**6))
        try:
            h = await s.read("c", 0, limit=10**6)
            assert h.epoch == epoch
            stored = dict(h.messages)
            assert h.top >= max(acked)
            missing = [off for off in acked if stored.get(off) != acked[off]]
            assert not missing, f"acknowledged but lost: {missing[:10]}"
            assert sorted(stored) == list(range(1, h.top + 1))  # no hole either
            msgs = {m.seq: (m.msg_id, m.data) for m in await s.inbox_read("u", 0, 10**6)}
            assert all(msgs.get(seq) == v for seq, v in inbox.items())
            assert (await s.append("c", b"after")).offset == h.top + 1
        finally:
            await s.close()

    asyncio.run(check())


async def test_a_failing_job_does_not_fail_its_neighbours(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "s.db", inbox=InboxLimits(max_unacked=3))
    try:

        def broken(w: object) -> None:
            raise RuntimeError("boom")

        results = await asyncio.gather(
            s.append("c", b"1"),
            s._write(broken),
            s.append("c", b"2"),
            *(s.inbox_append("u", b"%d" % i) for i in range(5)),
            return_exceptions=True,
        )
        assert [r.offset for r in results[0:3:2]] == [1, 2]  # type: ignore[union-attr]
        assert isinstance(results[1], StoreUnavailable) and "boom" in str(results[1])
        assert sum(isinstance(r, InboxFull) for r in results[3:]) == 2
        assert (await s.read("c", 0)).messages == [(1, b"1"), (2, b"2")]
        assert (await s.inbox_state("u"))[:2] == (0, 3)
        assert s.transactions >= 1
    finally:
        await s.close()


async def test_inboxes_of_a_file_from_before_epochs_get_one(tmp_path: Path) -> None:
    """A database written before inboxes had epochs opens, and each inbox gets an epoch
    that then stays the same across restarts."""
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE inboxes (user TEXT PRIMARY KEY, top INTEGER NOT NULL, "
        "acked INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO inboxes VALUES ('bob', 2, 1);"
    )
    conn.close()
    s = await SqliteStore.open(str(db))
    try:
        st = await s.inbox_state("bob")
        assert st[:2] == (1, 2) and len(st.epoch) == 12
    finally:
        await s.close()
    s = await SqliteStore.open(str(db))
    try:
        assert await s.inbox_state("bob") == st
        assert (await s.inbox_append("bob", b"x"))[::3] == (3, st.epoch)
    finally:
        await s.close()
