"""The sqlite store's event outbox (:mod:`fastim.backend`, docs/events.md): its tables and
the operations on them, as plain functions of a connection.

Writes run on the store's writer thread, inside its group-commit transaction
(:mod:`.sqlite_writer`), so an event appended in the same loop tick as a publish or an
inbox send costs no extra commit; reads run on the reader connection. Several workers of
one node share the file (each with its own writer): the lease and the claims are single
statements or run inside one ``BEGIN IMMEDIATE`` transaction, which SQLite serializes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .base import OutboxEntry, OutboxItem, OutboxStats

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the sender's keys stay valid
    ts   REAL NOT NULL,                      -- unix time of the add
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_armed (
    key  TEXT PRIMARY KEY,     -- "c:<client>" (a connection), "p:..." (a presence join)
    node TEXT NOT NULL,        -- the process that armed it: claimed when its beats stop
    ord  INTEGER NOT NULL,     -- claimed in (ord, rowid) order: leaves before disconnects
    lost BLOB NOT NULL         -- the event to emit, without ',"time":..}'
);
CREATE INDEX IF NOT EXISTS outbox_armed_node ON outbox_armed (node);
CREATE TABLE IF NOT EXISTS outbox_nodes (
    node    TEXT PRIMARY KEY,
    expires REAL NOT NULL      -- unix time after which the node counts as lost
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_lease (
    name    TEXT PRIMARY KEY,  -- 'sender'
    owner   TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
"""


def add(c: sqlite3.Connection, items: Sequence[OutboxItem], now: float) -> int:
    """Append the events, arming and disarming (see :class:`OutboxItem`)."""
    n = 0
    rows: list[tuple[float, bytes]] = []
    for item in items:
        if item.disarm is not None:
            cur = c.execute("DELETE FROM outbox_armed WHERE key = ?", (item.disarm,))
            if cur.rowcount == 0:
                continue  # claimed as lost by another node: emitted already
        if item.arm is not None:
            c.execute(
                "INSERT OR REPLACE INTO outbox_armed (key, node, ord, lost) VALUES (?, ?, ?, ?)",
                item.arm,
            )
        if item.data:  # b"": bookkeeping only (an arm whose own event kind is off)
            rows.append((now, item.data))
            n += 1
    if rows:
        c.executemany("INSERT INTO outbox (ts, data) VALUES (?, ?)", rows)
    return n


def read(c: sqlite3.Connection, limit: int) -> list[OutboxEntry]:
    rows = c.execute("SELECT id, data FROM outbox ORDER BY id LIMIT ?", (limit,)).fetchall()
    return [OutboxEntry(str(i), bytes(d)) for i, d in rows]


def remove(c: sqlite3.Connection, keys: Sequence[str]) -> None:
    c.executemany("DELETE FROM outbox WHERE id = ?", [(int(k),) for k in keys])


def stats(c: sqlite3.Connection) -> OutboxStats:
    row = c.execute("SELECT count(*), min(ts) FROM outbox").fetchone()
    armed = c.execute("SELECT count(*) FROM outbox_armed").fetchone()[0]
    return OutboxStats(int(row[0]), row[1], int(armed))


def lease(c: sqlite3.Connection, owner: str, ttl: float, now: float) -> bool:
    row = c.execute("SELECT owner, expires FROM outbox_lease WHERE name = 'sender'").fetchone()
    if row is not None and row[0] != owner and row[1] > now:
        return False
    if ttl <= 0:
        c.execute("DELETE FROM outbox_lease WHERE name = 'sender' AND owner = ?", (owner,))
        return False
    c.execute(
        "INSERT OR REPLACE INTO outbox_lease (name, owner, expires) VALUES ('sender', ?, ?)",
        (owner, now + ttl),
    )
    return True


def beat(c: sqlite3.Connection, node: str, ttl: float, now: float) -> None:
    c.execute(
        "INSERT OR REPLACE INTO outbox_nodes (node, expires) VALUES (?, ?)", (node, now + ttl)
    )


def claim(c: sqlite3.Connection, limit: int, now: float) -> int:
    """Move the armed events of nodes without a live beat into the outbox."""
    c.execute(
        "DELETE FROM outbox_nodes WHERE expires <= ? "
        "AND node NOT IN (SELECT node FROM outbox_armed)",
        (now,),
    )
    dead = [
        r[0]
        for r in c.execute(
            "SELECT DISTINCT a.node FROM outbox_armed a LEFT JOIN outbox_nodes n "
            "ON n.node = a.node WHERE n.expires IS NULL OR n.expires <= ?",
            (now,),
        ).fetchall()
    ]
    if not dead:
        return 0
    marks = ",".join("?" * len(dead))
    rows = c.execute(
        f"SELECT rowid, lost FROM outbox_armed WHERE node IN ({marks}) ORDER BY ord, rowid LIMIT ?",
        (*dead, limit),
    ).fetchall()
    tail = b',"time":%d}' % int(now * 1000)
    c.executemany("DELETE FROM outbox_armed WHERE rowid = ?", [(r[0],) for r in rows])
    c.executemany(
        "INSERT INTO outbox (ts, data) VALUES (?, ?)", [(now, bytes(r[1]) + tail) for r in rows]
    )
    if len(rows) < limit:
        c.executemany(
            "DELETE FROM outbox_nodes WHERE node = ? AND expires <= ?", [(d, now) for d in dead]
        )
    return len(rows)
