"""The accepting end of node links: :class:`LinkServer` and the :class:`LinkHandler` it
hands what peers send to (:mod:`fastim.cluster.link` has the whole story).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as _ssl
from collections.abc import Callable
from typing import Any

import orjson

from .. import _core
from .frames import (
    ACCEPTOR_ACCEPTS,
    LINK_MAX_FRAME,
    LINK_VERSION,
    Deliver,
    DmEntry,
    Forward,
    ForwardAck,
    GoawayCode,
    LinkDecodeError,
    LinkFrame,
    unpack_deliver,
    unpack_dm,
    unpack_forward,
    unpack_forward_ack,
    unpack_forward_key,
    unpack_goaway,
)
from .link_conn import LINK_CAP, LinkConn

__all__ = ["LinkHandler", "LinkServer"]

log = logging.getLogger("fastim.cluster")

_PING = int(LinkFrame.PING)
_PONG = int(LinkFrame.PONG)


class LinkHandler:
    """What a node does with what its peers send. Subclass and override what you need.

    Every method runs in the event loop, synchronously, once per received frame (a batch
    arrives as one list, in the order sent). ``peer`` is the sender's node id, checked at
    the handshake. An exception is logged and the link stays up.
    """

    def on_forward(self, peer: str, items: list[Forward]) -> None:
        """Publishes to channels this node owns (answer each with ``forward_ack``)."""

    def on_forward_ack(self, peer: str, items: list[ForwardAck]) -> None:
        """The owner's answers to publishes this node forwarded."""

    def on_deliver(self, peer: str, items: list[Deliver]) -> None:
        """Numbered messages coming down a channel's broadcast tree."""

    def on_control(self, peer: str, message: dict[str, Any]) -> None:
        """A CONTROL frame's JSON object."""

    def on_dm(self, peer: str, items: list[DmEntry]) -> None:
        """Stored direct messages for users with connections on this node (a DM frame)."""

    def on_peer(self, peer: str, connected: bool) -> None:
        """A peer's link into this node came up (handshake done) or went away."""


class LinkServer:
    """Accepts the links peers dial into this node and hands their frames to ``handler``.

    Checks each HELLO (cluster name, the node id the dialer expects), answers PINGs,
    closes connections silent for ``timeout`` seconds, and keeps one connection per peer
    node (a newer one replaces an older: the peer reconnected before this end noticed).
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        handler: LinkHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: _ssl.SSLContext | None = None,
        timeout: float = 3.0,
        max_frame: int = LINK_MAX_FRAME,
        flusher: _core.Flusher | None = None,
        path: str = "",
    ) -> None:
        self.node_id = node_id
        #: a Unix-domain socket to listen on instead of host:port (workers of one node)
        self.path = path
        self.cluster = cluster
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl = ssl
        self.timeout = timeout
        self.max_frame = max_frame
        self._flusher = flusher
        self.flusher: _core.Flusher
        self._server: asyncio.Server | None = None
        self._conns: set[LinkConn] = set()
        #: connected peers: node id → connection (handshake done)
        self.peers: dict[str, LinkConn] = {}
        self._watchdog: asyncio.Task[None] | None = None
        #: frames received per type, and handler failures
        self.frames_in: dict[int, int] = {}
        self.handler_errors = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.flusher = self._flusher or _core.Flusher(loop.call_soon)

        def factory() -> LinkConn:
            return LinkConn(self, self.flusher, LINK_CAP, self.max_frame, ACCEPTOR_ACCEPTS)

        if self.path:
            # the workers of one node: a Unix-domain socket in their private directory
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a worker that was killed
            self._server = await loop.create_unix_server(factory, self.path)
        else:
            self._server = await loop.create_server(
                factory, self.host, self.port, ssl=self.ssl, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
        self._watchdog = asyncio.ensure_future(self._watch())

    @property
    def address(self) -> str:
        if self.path:
            return "unix:" + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        every = self.timeout / 3
        last = loop.time()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            stalled = now - last > 2 * every
            last = now
            if stalled:
                # this process did not run for a while (a burst of work, a stop): what
                # the peers sent meanwhile is unread, so their silence is ours; judge
                # on the next round, once the loop has read its sockets
                continue
            for conn in list(self._conns):
                if now - conn.last_rx > self.timeout:
                    what = "no HELLO" if conn.peer is None else "silent"
                    log.warning(
                        "link from %s: %s for %.1fs, closing",
                        conn.peer or "(unknown)",
                        what,
                        now - conn.last_rx,
                    )
                    conn.abort()

    # the ConnOwner protocol, for accepted connections
    def conn_made(self, conn: LinkConn) -> None:
        self._conns.add(conn)

    def conn_lost(self, conn: LinkConn, exc: Exception | None) -> None:
        self._conns.discard(conn)
        peer = conn.peer
        if peer is not None and self.peers.get(peer) is conn:
            del self.peers[peer]
            self._call(self.handler.on_peer, peer, False)

    def frame(self, conn: LinkConn, ftype: int, payload: bytes) -> None:
        self.frames_in[ftype] = self.frames_in.get(ftype, 0) + 1
        peer = conn.peer
        if peer is None:
            self._hello(conn, ftype, payload)
            return
        h = self.handler
        try:
            if ftype == LinkFrame.DELIVER:
                self._call(h.on_deliver, peer, unpack_deliver(payload))
            elif ftype == LinkFrame.FORWARD:
                self._call(h.on_forward, peer, unpack_forward(payload))
            elif ftype == LinkFrame.FORWARD_KEY:
                self._call(h.on_forward, peer, unpack_forward_key(payload))
            elif ftype == LinkFrame.FORWARD_ACK:
                self._call(h.on_forward_ack, peer, unpack_forward_ack(payload))
            elif ftype == LinkFrame.DM:
                self._call(h.on_dm, peer, unpack_dm(payload))
            elif ftype == _PING:
                conn.send(_PONG, payload)
            elif ftype == LinkFrame.CONTROL:
                msg = orjson.loads(payload)
                if not isinstance(msg, dict):
                    raise LinkDecodeError("CONTROL is not a JSON object")
                self._call(h.on_control, peer, msg)
            elif ftype == LinkFrame.GOAWAY:
                code, reason = unpack_goaway(payload)
                log.info("link from %s: goodbye (%d): %s", peer, code, reason)
                conn.close()
            else:
                conn.fail(GoawayCode.PROTOCOL, f"unexpected frame type 0x{ftype:02x}")
        except (LinkDecodeError, orjson.JSONDecodeError) as e:
            conn.fail(GoawayCode.PROTOCOL, f"malformed frame 0x{ftype:02x}: {e}")

    def _hello(self, conn: LinkConn, ftype: int, payload: bytes) -> None:
        if ftype != LinkFrame.HELLO:
            conn.fail(GoawayCode.BAD_HANDSHAKE, "the first frame must be HELLO")
            return
        try:
            hello = orjson.loads(payload)
            node, cluster, version = hello["node"], hello["cluster"], hello["version"]
            expect = hello.get("expect")
            if not isinstance(node, str) or not node:
                raise TypeError("node")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            conn.fail(GoawayCode.BAD_HANDSHAKE, "malformed HELLO")
            return
        if version != LINK_VERSION:
            conn.fail(
                GoawayCode.BAD_HANDSHAKE, f"link version {version!r} (this node: {LINK_VERSION})"
            )
            return
        if cluster != self.cluster:
            conn.fail(
                GoawayCode.WRONG_CLUSTER,
                f"this node is in cluster {self.cluster!r}, not {cluster!r}",
            )
            return
        if expect is not None and expect != self.node_id:
            conn.fail(GoawayCode.WRONG_NODE, f"this is node {self.node_id!r}, not {expect!r}")
            return
        if node == self.node_id:
            conn.fail(GoawayCode.WRONG_NODE, f"node {node!r} dialed itself")
            return
        old = self.peers.get(node)
        if old is not None:
            old.peer = None  # its loss must not report the new link's peer as gone
            old.fail(GoawayCode.REPLACED, "replaced by a newer link from the same node")
        conn.peer = node
        self.peers[node] = conn
        conn.send(
            LinkFrame.WELCOME,
            orjson.dumps({"node": self.node_id, "cluster": self.cluster, "version": LINK_VERSION}),
        )
        if old is None:
            self._call(self.handler.on_peer, node, True)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.handler_errors += 1
            log.exception("link handler %s failed", getattr(fn, "__name__", fn))

    async def close(self) -> None:
        """Stop accepting; tell connected peers (GOAWAY) and close their links."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            if conn.peer is not None:
                conn.fail(GoawayCode.SHUTDOWN, "node shutting down")
            else:
                conn.abort()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
