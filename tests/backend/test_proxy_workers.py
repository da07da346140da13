"""Proxy hooks under ``--workers 2`` (real worker processes on shared ports): each
worker asks the backend for its own connections, and a publish rewritten by the
publish hook on one worker reaches the subscribers on the other, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.server._support import deadline
from tests.workers._workers import Workers

from ._app import Backend, serve


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async for b in serve(Backend()):
        yield b


async def recv(ws: ClientConnection, op: str, ch: str | None = None) -> dict[str, Any]:
    """The next ``op`` (of channel ``ch``, if given: the connect hook's server-side
    channels are subscribed too, and their ``subscribed`` come first)."""
    async with deadline(10):
        while True:
            msg: dict[str, Any] = orjson.loads(await ws.recv())
            if msg.get("op") == op and (ch is None or msg.get("ch") == ch):
                return msg


async def test_hooks_on_every_worker(tmp_path: Path, backend: Backend) -> None:
    w = Workers(tmp_path, 2, **backend.hook_urls("connect", "publish"))
    await w.start()
    try:
        # connections until each worker has one of alice's (the kernel spreads them)
        on: dict[str, ClientConnection] = {}
        extra: list[ClientConnection] = []
        for _ in range(40):
            ws = await connect(w.ws_url, additional_headers={"Cookie": "sid=s-alice"})
            await ws.send('{"op":"hello","id":1}')
            welcome = await recv(ws, "welcome")
            assert welcome["user"] == "alice"  # each worker asked the backend
            if welcome["node"] in on:
                extra.append(ws)
            else:
                on[welcome["node"]] = ws
            if len(on) == 2:
                break
        assert sorted(on) == ["wtest.w0", "wtest.w1"], f"one worker took every connection: {on}"
        a, b = on["wtest.w0"], on["wtest.w1"]
        await b.send('{"op":"sub","ch":"chat:x","id":2}')
        await recv(b, "subscribed", "chat:x")  # before any publish
        for i in range(20):
            cmd = {"op": "pub", "ch": "chat:x", "data": {"text": f"m{i}"}, "id": 10 + i}
            await a.send(orjson.dumps(cmd).decode())
        got = [(await recv(b, "msg", "chat:x"))["data"] for _ in range(20)]
        assert got == [{"id": i + 1, "by": "alice", "text": f"m{i}"} for i in range(20)]
        assert len(backend.bodies("connect")) == 2 + len(extra)
        for ws in [a, b, *extra]:
            await ws.close()
    finally:
        w.stop()
        await asyncio.sleep(0)
