"""``max_connections_per_user``: on one node, and over the workers of ``--workers 2``
(real worker processes: the count crosses the Unix-socket links), with both policies:
``refuse_new`` closes the new connection (4511), ``close_oldest`` the oldest (4512)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fastim.config import Config, ConfigError
from fastim.protocol import CloseCode
from tests.workers._workers import Workers

from ._support import deadline


async def hello(url: str, user: str) -> tuple[ClientConnection, str]:
    """A connection of ``user``; (it, the node or worker that welcomed it)."""
    ws = await connect(url, open_timeout=5)
    await ws.send(orjson.dumps({"op": "hello", "id": 1, "user": user}).decode())
    while True:
        msg = orjson.loads(await ws.recv())
        if msg.get("op") == "welcome":
            return ws, str(msg["node"])


async def closed(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """The close code the node sends within ``timeout`` (None: still open)."""
    try:
        async with deadline(timeout):
            async for _ in ws:
                pass
    except (ConnectionClosed, TimeoutError):
        pass
    except Exception as e:  # the deadline's own timeout
        if "nothing for" not in str(e) and not isinstance(e, AssertionError):
            raise
    return ws.close_code


async def stays_open(ws: ClientConnection) -> bool:
    await ws.send('{"op":"ping","id":9}')
    try:
        async with deadline(3):
            while True:
                if orjson.loads(await ws.recv()).get("op") == "pong":
                    return True
    except ConnectionClosed:
        return False


async def test_refuse_new_on_one_node(node_factory: Any) -> None:
    node = await node_factory(max_connections_per_user=2)
    url = f"ws://127.0.0.1:{node.ws_port}/ws"
    a, _ = await hello(url, "alice")
    b, _ = await hello(url, "alice")
    c, _ = await hello(url, "alice")
    assert await closed(c) == CloseCode.TOO_MANY_CONNECTIONS
    assert await stays_open(a) and await stays_open(b)
    other, _ = await hello(url, "bob")  # another user: not counted
    assert await stays_open(other)
    await a.close()  # one of alice's goes: a new one fits again
    d, _ = await hello(url, "alice")
    assert await stays_open(d)
    assert node.user_limit is not None and node.user_limit.refused == 1


async def test_close_oldest_on_one_node(node_factory: Any) -> None:
    node = await node_factory(max_connections_per_user=2, user_limit_policy="close_oldest")
    url = f"ws://127.0.0.1:{node.ws_port}/ws"
    a, _ = await hello(url, "alice")
    b, _ = await hello(url, "alice")
    c, _ = await hello(url, "alice")
    assert await closed(a) == CloseCode.REPLACED
    assert await stays_open(b) and await stays_open(c)


@pytest.mark.parametrize("policy", ["refuse_new", "close_oldest"])
async def test_the_limit_crosses_workers(tmp_path: Path, policy: str) -> None:
    w = Workers(tmp_path, 2, max_connections_per_user=1, user_limit_policy=policy)
    await w.start()
    try:
        # alice's first connection, on w0 (tries that land on w1 alone are closed again)
        first = None
        for _ in range(40):
            ws, node = await hello(w.ws_url, "alice")
            if node.endswith(".w0"):
                first = ws
                break
            await ws.close()
        assert first is not None, "no connection landed on w0"
        assert await stays_open(first)  # its own check is done (commands wait for it)
        # then one on w1: the count is over the workers
        for _ in range(40):
            ws, node = await hello(w.ws_url, "alice")
            if node.endswith(".w1"):
                break
            await ws.close()
        else:
            raise AssertionError("no connection landed on w1")
        if policy == "refuse_new":
            assert await closed(ws) == CloseCode.TOO_MANY_CONNECTIONS
            assert await stays_open(first)
        else:
            assert await closed(first) == CloseCode.REPLACED
            assert await stays_open(ws)
    finally:
        w.stop()


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_connections_per_user: must be >= 0"):
        Config(max_connections_per_user=-1).validate()
    with pytest.raises(ConfigError, match="user_limit_policy: must be refuse_new or close_oldest"):
        Config(user_limit_policy="newest").validate()
