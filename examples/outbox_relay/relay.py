"""The relay of the outbox pattern: moves outbox rows to the Redis stream fastim reads,
then deletes them (docs/ingest.md).

    python relay.py orders.db redis://127.0.0.1:6379/0 events          # runs until ^C
    python relay.py orders.db redis://127.0.0.1:6379/0 events --once   # drain, then exit

A row is deleted only after its XADD succeeded; a relay that dies in between sends the
row again when it restarts. That is safe: the row's id is the entry's idempotency key,
and fastim publishes a key it has seen (within ingest_idempotency_window) only once.
``--no-delete`` leaves the rows in place, to show exactly that.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
import zlib

import redis


def stream_of(base: str, shards: int, target: str) -> str:
    """With several streams (``ingest_redis_stream = "events:0,events:1,..."``), one
    channel always goes to the same shard: its entries stay in order."""
    if shards <= 1:
        return base
    return f"{base}:{zlib.crc32(target.encode()) % shards}"


def relay_once(db: sqlite3.Connection, r: redis.Redis, stream: str, shards: int,
               delete: bool = True, batch: int = 500) -> int:  # fmt: skip
    """Move one batch of outbox rows, oldest first; the number moved."""
    rows = db.execute(
        "SELECT id, channel, user, data FROM outbox ORDER BY id LIMIT ?", (batch,)
    ).fetchall()
    if not rows:
        return 0
    pipe = r.pipeline(transaction=False)
    for row_id, channel, user, data in rows:
        fields = {"data": data, "idempotency_key": f"outbox-{row_id}"}
        if channel is not None:
            fields["channel"] = channel
        else:
            fields["user"] = user
        pipe.xadd(stream_of(stream, shards, channel or f"user:{user}"), fields)
    pipe.execute()  # raises if Redis did not take them: the rows stay, sent again later
    if delete:
        db.execute("DELETE FROM outbox WHERE id <= ?", (rows[-1][0],))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("redis_url")
    ap.add_argument("stream")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--once", action="store_true", help="drain the outbox, then exit")
    ap.add_argument("--no-delete", action="store_true", help="send, keep the rows")
    a = ap.parse_args()
    db = sqlite3.connect(a.db, isolation_level=None)
    r = redis.Redis.from_url(a.redis_url)
    moved = 0
    while True:
        n = relay_once(db, r, a.stream, a.shards, delete=not a.no_delete)
        moved += n
        if a.once and (n == 0 or a.no_delete):
            break
        if n == 0:
            time.sleep(0.2)
    print(f"relayed {moved} rows")


if __name__ == "__main__":
    main()
