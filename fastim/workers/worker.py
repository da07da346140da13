"""A worker process of ``fastim serve --workers N``: one node's ``serve_forever`` plus the
liveness pings its supervisor (:mod:`fastim.workers.supervisor`) waits for.

``fastim serve`` runs :func:`run_worker` instead of ``Node.serve_forever`` when
``_FASTIM_WORKER`` is set (:meth:`WorkerRole.from_env`): whatever ``workers`` says, a
worker never supervises. The node is built by the caller (``fastim.cli``): this layer
sits below ``fastim.node`` and does not import it.

The pings go down the pipe whose write end is ``role.ping_fd``: ``R`` once the node
serves (its listeners accept), then ``.`` every :data:`PING_EVERY` seconds from the event
loop, so a loop that stops turning (a blocking call, SIGSTOP) stops them and the
supervisor replaces the worker after its hang timeout. Writes never block: a full pipe
(the supervisor is slow to read) drops a ping. A closed pipe (EPIPE) means the
supervisor is gone (killed with SIGKILL, say): the worker then stops as on SIGTERM rather
than serve on, orphaned, holding the ports and the store's file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

from .role import PING_EVERY, WorkerRole

log = logging.getLogger("fastim")


class Serving(Protocol):
    """What :func:`run_worker` needs of a node (:class:`fastim.node.Node`)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Pinger:
    """Writes ``R``, then ``.`` every ``every`` seconds, to ``fd`` from the running loop.

    ``on_gone`` is called once when the pipe is closed at the other end (EPIPE).
    """

    def __init__(self, fd: int, on_gone: Callable[[], None], every: float = PING_EVERY) -> None:
        self.fd = fd
        self.every = every
        self.on_gone = on_gone
        self.gone = False
        self._handle: asyncio.TimerHandle | None = None
        if fd >= 0:
            os.set_blocking(fd, False)

    def start(self) -> None:
        """The node serves: say ``R`` now, then keep pinging."""
        if self.fd < 0:
            return
        self._write(b"R")
        self._schedule()

    def _schedule(self) -> None:
        if not self.gone:
            self._handle = asyncio.get_running_loop().call_later(self.every, self._tick)

    def _tick(self) -> None:
        self._write(b".")
        self._schedule()

    def _write(self, byte: bytes) -> None:
        if self.gone:
            return
        try:
            os.write(self.fd, byte)
        except BlockingIOError:
            pass  # the pipe is full: the supervisor reads late, this ping is not needed
        except (BrokenPipeError, OSError) as e:
            self.gone = True
            log.error(
                "worker: the supervisor is gone (ping pipe: %s); stopping",
                os.strerror(e.errno) if e.errno else e,
            )
            self.on_gone()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        self.gone = True


async def run_worker(node: Serving, role: WorkerRole) -> None:
    """``Node.serve_forever`` for a worker: start, ping ``R`` and then ``.``, run until
    SIGTERM or SIGINT (or the supervisor's end of the pipe closes), stop gracefully.

    ``node`` must already carry ``role`` (its listeners share the node's ports with
    ``SO_REUSEPORT``). The pings go on while the node drains, until it has stopped.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # handlers first: a signal that arrives just after "listening" must be graceful
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pinger = Pinger(role.ping_fd, stop.set)
    try:
        try:
            await node.start()
        except BaseException:
            pinger.close()
            raise  # start() released what it had opened
        pinger.start()
        try:
            await stop.wait()
        finally:
            try:
                await node.stop()
            finally:
                pinger.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
