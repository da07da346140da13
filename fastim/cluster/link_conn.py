"""One node-link connection, either end (:mod:`fastim.cluster.link` has the whole story).

:class:`LinkConn` is the asyncio protocol of a link connection: frames come in through
the compiled ``FrameDecoder`` and go to its owner (a :class:`ConnOwner`: the dialing
``Link`` or the ``LinkServer``); frames go out through an ``OutRing`` that the flusher
writes once per loop tick, cut when more than ``cap`` bytes wait (too slow a peer).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from .. import _core
from ..errors import FastimError
from .frames import GoawayCode, LinkFrame, pack_goaway

__all__ = ["LINK_CAP", "ConnOwner", "LinkConn"]

log = logging.getLogger("fastim.cluster")

#: bytes one link may queue before it is cut as too slow (then it reconnects)
LINK_CAP = 64 << 20


class ConnOwner(Protocol):
    """The owner of a connection: a dialing Link or the LinkServer."""

    def conn_made(self, conn: LinkConn) -> None: ...
    def frame(self, conn: LinkConn, ftype: int, payload: bytes) -> None: ...
    def conn_lost(self, conn: LinkConn, exc: Exception | None) -> None: ...


class LinkConn(asyncio.Protocol):
    """One link connection, either end: frames in through the compiled decoder, frames out
    through an OutRing that the flusher writes once per tick."""

    def __init__(
        self, end: ConnOwner, flusher: _core.Flusher, cap: int, max_frame: int, accepts: bytes
    ) -> None:
        self.end = end
        self.flusher = flusher
        self.cap = cap
        self.decoder = _core.FrameDecoder(max_frame, accepts)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ring: _core.OutRing | None = None
        self.last_rx = self.loop.time()
        self.peer: str | None = None
        self.lost = asyncio.Event()
        self.closing = False
        self.bytes_in = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.ring = _core.OutRing(
            self.flusher, self.transport, _core.FMT_TCP, self.cap, self._overflow
        )
        self.last_rx = self.loop.time()
        self.end.conn_made(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        self.bytes_in += len(data)
        try:
            frames = self.decoder.feed(data)
        except FastimError as e:
            self.fail(GoawayCode.PROTOCOL, f"bad link frame: {e}")
            return
        for ftype, payload in frames:
            if self.closing:
                return
            self.end.frame(self, ftype, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.ring is not None:
            self.ring.close()
        self.lost.set()
        self.end.conn_lost(self, exc)

    def pause_writing(self) -> None:
        if self.ring is not None:
            self.ring.pause()

    def resume_writing(self) -> None:
        if self.ring is not None:
            self.ring.resume()

    def _overflow(self) -> None:
        log.warning("link %s: over %d bytes queued, closing it (too slow)", self.peer, self.cap)
        self.abort()

    def send(self, ftype: int, payload: bytes) -> bool:
        ring = self.ring
        if ring is None or self.closing:
            return False
        return bool(ring.append(_core.encode_frame(ftype, payload)))

    def close(self) -> None:
        """Close after writing what is queued."""
        if self.closing:
            return
        self.closing = True
        t = self.transport
        if t is not None:
            if self.ring is not None and len(self.ring):
                t.write(self.ring.take())
            t.close()

    def fail(self, code: int, reason: str) -> None:
        """Tell the other end why (GOAWAY), then close."""
        if not self.closing:
            log.warning("link %s: closing: %s", self.peer or "(handshake)", reason)
            self.send(LinkFrame.GOAWAY, pack_goaway(code, reason))
        self.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
