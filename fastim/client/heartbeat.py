"""The client's heartbeat: a PING after ``ping_interval`` of the connection, and the
connection dropped after ``ping_interval + pong_timeout`` without a byte from the node.

The node names both in WELCOME (:meth:`Heartbeat.configure`); a node that names no
``ping_interval`` gets no pings and no silence check. One :class:`Heartbeat` serves a
client's successive connections: started on each new one, stopped when it ends. The
reader records when bytes arrive (:attr:`Heartbeat.last_rx`); a PONG needs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

from ..errors import ConnectionClosed
from ..protocol import CloseCode
from .connection import Connection

__all__ = ["Heartbeat"]

log = logging.getLogger("fastim.client")


class Heartbeat:
    """Pings one connection at a time and tells when it has gone silent.

    ``on_silent(conn, why)`` is called (from a timer) when nothing came from the node
    for ``ping_interval + pong_timeout``: the connection is to be dropped with ``why``.
    """

    def __init__(self, on_silent: Callable[[Connection, ConnectionClosed], None]) -> None:
        self._on_silent = on_silent
        self.ping_interval = 0.0  # 0: no heartbeat
        self.dead_after = 0.0
        #: loop time of the last bytes from the node
        self.last_rx = 0.0
        self._next_ping = 0.0
        self._conn: Connection | None = None
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, info: dict[str, Any]) -> None:
        """Take ``ping_interval`` and ``pong_timeout`` from a WELCOME's info."""
        ping = info.get("ping_interval")
        pong = info.get("pong_timeout")
        self.ping_interval = float(ping) if isinstance(ping, (int, float)) and ping > 0 else 0.0
        pong_t = float(pong) if isinstance(pong, (int, float)) and pong > 0 else 10.0
        self.dead_after = self.ping_interval + pong_t if self.ping_interval else 0.0

    def start(self, conn: Connection) -> None:
        """Watch ``conn`` (a new connection) from now on."""
        self.stop()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.last_rx = now
        if not self.ping_interval:
            return
        self._conn = conn
        self._next_ping = now + self.ping_interval
        self._timer = loop.call_at(self._next_ping, self._beat)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn = None

    def _beat(self) -> None:
        """Timer callback: ping every ping_interval; drop a connection gone silent."""
        self._timer = None
        conn = self._conn
        if conn is None or conn.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        silent = now - self.last_rx
        if silent >= self.dead_after:
            why = ConnectionClosed(
                CloseCode.HEARTBEAT_TIMEOUT, f"nothing from the server for {silent:.1f}s"
            )
            log.info("fastim client: %s", why.reason)
            self._on_silent(conn, why)
            return
        if now >= self._next_ping:
            try:
                conn.send_ping(struct.pack("!d", now))
            except ConnectionClosed:
                return
            self._next_ping = now + self.ping_interval
        wake = min(self._next_ping, self.last_rx + self.dead_after)
        self._timer = loop.call_at(wake, self._beat)
