"""Fixtures of the event-webhook tests: a real HTTP backend (an aiohttp application on
127.0.0.1, a free port) that records what fastim POSTs, and can answer 500, be slow, or
be down; fastim nodes are real ``fastim serve`` processes (tests/faults/_node.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from faults._fixtures import (  # type: ignore[import-not-found]  # noqa: F401 (fixtures)
    nodes,
    shared_redis,
    store_args,
)
from faults._node import free_port  # type: ignore[import-not-found]


class Receiver:
    """The backend: every POST is recorded (``attempts``), and those it answered 2xx
    (``batches``). ``mode``: "ok", "fail" (500), "slow" (``delay`` seconds, then 200)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.mode = "ok"
        self.delay = 0.0
        self.attempts: list[list[dict[str, Any]]] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        events = body["events"]
        self.attempts.append(events)
        self.headers.append(dict(request.headers))
        if self.mode == "fail":
            return web.Response(status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        self.batches.append(events)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Down: the port refuses connections until :meth:`start`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- what arrived

    def events(self) -> list[dict[str, Any]]:
        """Every event answered 2xx, in arrival order, duplicates included."""
        return [e for b in self.batches for e in b]

    def unique(self) -> list[dict[str, Any]]:
        """What a backend that deduplicates by id keeps, in arrival order; a second
        copy of an id must be the same event."""
        seen: dict[str, dict[str, Any]] = {}
        out = []
        for e in self.events():
            first = seen.get(e["id"])
            if first is None:
                seen[e["id"]] = e
                out.append(e)
            else:
                assert first == e, f"two different events with id {e['id']}: {first} {e}"
        return out

    async def wait(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred(self.unique()):
            if loop.time() > deadline:
                kinds = [(e["type"], e.get("user"), e.get("reason")) for e in self.unique()]
                raise AssertionError(f"not received within {timeout}s; have {kinds}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def config_file(tmp_path: Path) -> str:
    """A config with a join/leave namespace ("room") and a publish-events one ("feed")."""
    path = tmp_path / "events.toml"
    path.write_text(
        "[namespaces.room]\njoin_leave = true\n\n[namespaces.feed]\nevents_publish = true\n"
        '\n[events_headers]\nX-Test = "yes"\n'
    )
    return str(path)


def events_args(receiver: Receiver, *more: str) -> list[str]:
    return [
        "--events-url", receiver.url,
        "--events-lease", "1",
        "--events-retry-max", "0.5",
        "--events-timeout", "1",
        *more,
    ]  # fmt: skip
