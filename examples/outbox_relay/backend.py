"""The backend's side of the outbox pattern: one database transaction writes the
business row and the outbox row, so either both exist or neither (docs/ingest.md).

    python backend.py orders.db 10        # place 10 orders (each with its outbox row)
"""

from __future__ import annotations

import json
import sqlite3
import sys

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the idempotency key fastim remembers
    channel TEXT,                          -- or a user, for a direct message
    user TEXT,
    data TEXT NOT NULL                     -- a JSON document
);
"""


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
    db.executescript(SCHEMA)
    return db


def place_order(db: sqlite3.Connection, customer: str, total: float) -> int:
    """The order and its event in ONE transaction: a crash between the two cannot leave
    an order nobody hears about, nor an event about an order that does not exist."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cur = db.execute("INSERT INTO orders (customer, total) VALUES (?, ?)", (customer, total))
        order_id = int(cur.lastrowid or 0)
        event = {"order": order_id, "customer": customer, "total": total}
        db.execute(
            "INSERT INTO outbox (channel, data) VALUES (?, ?)",
            (f"orders:{customer}", json.dumps(event)),
        )
        db.execute(
            "INSERT INTO outbox (user, data) VALUES (?, ?)",
            (customer, json.dumps({"text": f"order {order_id} received", "order": order_id})),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return order_id


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    db = open_db(path)
    for i in range(n):
        place_order(db, f"customer{i % 3}", 10.0 + i)
    print(f"placed {n} orders")


if __name__ == "__main__":
    main()
