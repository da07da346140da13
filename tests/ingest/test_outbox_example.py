"""examples/outbox_relay/ as its README runs it: a real node, a real Redis, the backend
and the relay as processes; every outbox row published (or sent) once although the
relay sent every row twice, and the outbox empty at the end."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastim.client import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "outbox_relay"


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


async def test_outbox_relay_example(redis_server: Any, nodes: Any, tmp_path: Path) -> None:
    node = nodes("--ingest-redis-stream", "events", "--redis-url", redis_server.url)
    await node.astart()
    db = str(tmp_path / "orders.db")
    assert "placed 6 orders" in _run(str(EXAMPLE / "backend.py"), db, "6")
    relay = [str(EXAMPLE / "relay.py"), db, redis_server.url, "events"]
    assert "relayed 12 rows" in _run(*relay, "--no-delete", "--once")  # a "crashed" relay
    assert "relayed 12 rows" in _run(*relay, "--once")  # sends them all again, deletes
    assert sqlite3.connect(db).execute("SELECT count(*) FROM outbox").fetchone() == (0,)

    client = await connect(node.tcp_url)
    orders = []
    for c in range(3):
        sub = await client.subscribe(f"orders:customer{c}", since=(0, "x"), on_gap=lambda *a: None)
        while True:
            try:
                m = await asyncio.wait_for(sub.get(), 1.0)
            except asyncio.TimeoutError:
                break
            orders.append((c, m.data["order"]))
    await client.aclose()
    assert sorted(orders) == sorted((i % 3, i + 1) for i in range(6))
    alice = await connect(node.tcp_url, user="customer0")
    dms: list[int] = []

    async def read() -> None:
        async for m in alice.direct_messages():
            dms.append(m.data["order"])

    t = asyncio.ensure_future(read())
    await asyncio.sleep(1.5)
    t.cancel()
    await alice.aclose()
    assert dms == [1, 4]
