"""Tasks a component starts and does not await.

asyncio keeps only a weak reference to a running task, so a fire-and-forget
``ensure_future`` may be collected mid-flight; and a failure nobody awaits is reported
only when the task is garbage-collected, if ever. The hub, the postman, the cluster
runtime and the node links each start such tasks (store appends, inbox syncs, state
requests, link dials): :class:`Background` keeps them referenced, logs a failure when it
happens, and lets the owner wait for them or cancel them when it closes.

The loops that keep a connection up (node links, etcd sessions) wait
:func:`backoff_delay` between attempts and run a session's halves with
:func:`until_one_ends`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("fastim")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Future[Any]"]


class Background:
    """A set of running tasks, named ``what`` in the log when one fails."""

    __slots__ = ("_spawn", "_tasks", "what")

    def __init__(self, what: str, spawn: Spawn | None = None) -> None:
        self.what = what
        self._spawn: Spawn = spawn or asyncio.ensure_future
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def run(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        """Start ``coro`` (through ``spawn``: tests may run it eagerly) and keep it."""
        task = self._spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task failed", self.what, exc_info=task.exception())

    async def wait(self, timeout: float) -> None:
        """Let the running tasks finish, for at most ``timeout`` seconds."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def cancel(self) -> None:
        """Cancel what still runs and wait until it has stopped."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def backoff_delay(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 after a connection that was up):
    ``first`` doubled per attempt up to ``cap``, times a jitter in [0.5, 1], so the nodes
    that lost the same peer (or etcd) do not all come back at once.

    The server's one backoff (node links, etcd sessions); the client SDK has its own
    (:class:`fastim.client.backoff.Backoff`), so that it needs nothing of the server.
    """
    return min(cap, first * (1 << min(attempt, 30))) * random.uniform(0.5, 1.0)


async def until_one_ends(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run ``coros`` side by side until one of them ends, then cancel the others.

    An etcd session is a keepalive (or writer) loop next to a watch: either one failing
    ends the session. Raises the exception of a coroutine that failed; returns when one
    ended without an error (the caller decides what that means).
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        exc = t.exception()
        if exc is not None:
            raise exc
