"""docs/events.md's receiver, copied from the page as a reader would and run as it is
(only its port changed): a real node sends it a user's connect and disconnect, which land
in its SQLite file, and its "online" table is empty again once the client is gone."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastim.client import connect
from tests.conftest import free_port, start_node_process

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def receiver_block() -> str:
    part = DOC.read_text().split("## Writing a receiver", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", part, re.S)
    assert blocks, "docs/events.md has a python block under 'Writing a receiver'"
    return blocks[0]


def rows(db: Path, sql: str) -> list[Any]:
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def visit(ws_port: int) -> None:
    """dora connects, is welcomed, and goes away."""
    client = await connect(f"ws://127.0.0.1:{ws_port}/ws", user="dora")
    await client.ping()
    await client.aclose()


def test_the_documented_receiver_gets_connect_and_disconnect(tmp_path: Path) -> None:
    port = free_port()
    code = receiver_block().replace("port=8080", f"port={port}")
    (tmp_path / "receiver.py").write_text(code)
    app = subprocess.Popen(
        [sys.executable, "receiver.py"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    node = None
    try:
        node = start_node_process(
            "--events-url", f"http://127.0.0.1:{port}/fastim/events",
            "--events-secret", "a-long-random-string",
        )  # fmt: skip
        asyncio.run(visit(node.ws_port))
        db = tmp_path / "events.db"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kinds = [t for (t,) in rows(db, "SELECT type FROM events WHERE user = 'dora'")]
            if "disconnect" in kinds:
                break
            if app.poll() is not None:
                pytest.fail(f"the receiver exited with {app.returncode}")
            time.sleep(0.1)
        assert sorted(kinds) == ["connect", "disconnect"], kinds
        assert rows(db, "SELECT * FROM online") == []
    finally:
        if node is not None:
            node.terminate()
        app.terminate()
        app.wait(10)
