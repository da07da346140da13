"""Node links: persistent connections that carry fastim frames from one node to another.

Each node *dials* one link to every peer in the routing table (:class:`Links`) and
*accepts* the links its peers dial (:class:`LinkServer`, on ``link_port``). A link carries
traffic one way, from the dialer to the acceptor (the acceptor only answers the
handshake and heartbeats), so a pair of nodes has two connections, one per direction.
That keeps every link the same simple thing: no tie-breaking over who dials whom, no
half-open duel when both restart at once, and a node's outbound queue to a peer is one
ring whose order is exactly the order of the sends.

**Batching.** ``deliver`` / ``forward`` / ``forward_ack`` append one packed entry to the
link's open batch; at the end of the loop tick (one ``call_soon`` per link per tick) the
batch is sealed into one frame (``fastim._core.encode_frame``) and appended to the link's
``OutRing``, and the ``Flusher`` writes each ring once per tick. So a burst of 10,000
messages to a peer in one tick costs one frame (a few if over ``BATCH_BYTES``) and one
``write``, as for client connections. A send of another kind seals the open batch first,
so frames leave in exactly the order of the calls.

**Heartbeats.** The dialer sends PING every ``heartbeat`` seconds; the acceptor answers
PONG. A dialer that hears nothing for ``timeout`` seconds declares the peer dead, drops
the connection and reconnects; an acceptor that hears nothing (no frames, no pings) for
``timeout`` closes its end. A stopped (SIGSTOP) or partitioned peer is thus noticed in
``timeout`` seconds, which TCP itself would take minutes to do.

**Reconnect.** A link that is down redials with exponential backoff and jitter
(``backoff`` = first delay, cap; :func:`fastim.tasks.backoff_delay`), so a restarted node
is not dialed by everyone at once. The handshake checks both ends: HELLO names the
cluster and the node the dialer expects, WELCOME names the node that answered, and a
mismatch (another cluster, or another node now on that address) is refused with GOAWAY.

**Delivery promise: in order while up, at most once.** Sends while a link is down return
False and are counted in ``dropped``; what is queued when a link breaks is lost. Links
do not retransmit: the hub's reliability comes from offsets and the store (a node that
sees a gap in a channel's offsets recovers it from history), not from the transport.

**TLS.** Pass an ``ssl.SSLContext`` to both ends (:func:`server_context`,
:func:`client_context`; with a CA on the server side, both ends present certificates).

**Modules.** This one has the dialing end (:class:`Link`, :class:`Links`) and the helpers;
the accepting end (:class:`LinkServer`, :class:`LinkHandler`) is in
:mod:`fastim.cluster.link_server` and the connection both ends use in
:mod:`fastim.cluster.link_conn`; import them all from here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from .. import _core
from ..tasks import Background, backoff_delay
from .frames import (
    BATCH_BYTES,
    DIALER_ACCEPTS,
    LINK_MAX_FRAME,
    LINK_VERSION,
    GoawayCode,
    LinkDecodeError,
    LinkFrame,
    pack_batch,
    pack_deliver,
    pack_dm,
    pack_forward,
    pack_forward_ack,
    pack_forward_key,
    pack_goaway,
    unpack_goaway,
)
from .link_conn import LINK_CAP, LinkConn
from .link_server import LinkHandler, LinkServer

__all__ = [
    "LINK_CAP",
    "Link",
    "LinkHandler",
    "LinkRefused",
    "LinkServer",
    "Links",
    "client_context",
    "link_peers",
    "server_context",
    "split_address",
]

log = logging.getLogger("fastim.cluster")

_PING = int(LinkFrame.PING)
_PONG = int(LinkFrame.PONG)
_T = struct.Struct(">d")


class LinkRefused(ConnectionError):
    """The other end refused the handshake (GOAWAY) or answered as another node."""


#: a link address naming a Unix-domain socket (the workers of one node: fastim/workers)
UNIX_PREFIX = "unix:"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError naming the address.

    ``unix:<path>`` → (path, 0): a Unix-domain socket on this machine."""
    if address.startswith(UNIX_PREFIX) and len(address) > len(UNIX_PREFIX):
        return address[len(UNIX_PREFIX) :], 0
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _AddressOf(Protocol):
    @property
    def addresses(self) -> Mapping[str, str]: ...


def link_peers(nodes: Mapping[str, _AddressOf], self_id: str) -> dict[str, str]:
    """node id → link address, for every node of a routing table but ``self_id`` that
    advertises one (what :meth:`Links.sync` takes)."""
    out = {}
    for node_id, info in nodes.items():
        addr = info.addresses.get("link")
        if node_id != self_id and addr:
            out[node_id] = addr
    return out


def server_context(certfile: str, keyfile: str, cafile: str | None = None) -> _ssl.SSLContext:
    """TLS for a LinkServer; with ``cafile``, dialers must present a certificate it signed."""
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = _ssl.CERT_REQUIRED
    return ctx


def client_context(
    cafile: str, certfile: str | None = None, keyfile: str | None = None
) -> _ssl.SSLContext:
    """TLS for dialing links: trust ``cafile``; present ``certfile`` when given (mutual TLS)."""
    ctx = _ssl.create_default_context(_ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def _code_name(code: int) -> str:
    try:
        return GoawayCode(code).name
    except ValueError:
        return str(code)


class Link:
    """The dialing end of one link, to one peer: reconnects by itself until closed.

    Created by :class:`Links`. ``state`` is ``down``, ``connecting`` or ``up`` (then
    ``closed``); sends work only while ``up`` and return False otherwise.
    """

    def __init__(self, links: Links, peer: str, address: str) -> None:
        self.links = links
        self.peer = peer
        self.address = address
        self.host, self.port = split_address(address)
        self.state = "down"
        self.loop = links.loop
        self._conn: LinkConn | None = None
        self._hs: asyncio.Future[None] | None = None
        self._closed = False
        # the open batch: its frame type, packed entries, count and bytes
        self._btype = 0
        self._buf: list[bytes] = []
        self._bcount = 0
        self._bbytes = 0
        self._scheduled = False
        #: counters: frames and entries sent, entries dropped (link down), connects made
        self.frames_out = 0
        self.items_out = 0
        self.dropped = 0
        self.connects = 0
        self.last_error = ""
        #: round trip of the last PING, seconds
        self.rtt: float | None = None
        self._up = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def __repr__(self) -> str:
        return f"<Link to {self.peer} at {self.address} {self.state}>"

    # ------------------------------------------------------------------ sending

    def deliver(self, channel: str, epoch: str, offset: int, data: bytes) -> bool:
        """Queue a channel message for the peer (a DELIVER entry). False if the link is down."""
        return self.append_entry(LinkFrame.DELIVER, pack_deliver(channel, epoch, offset, data))

    def forward(self, ref: int, channel: str, data: bytes, key: str | None = None) -> bool:
        """Queue a publish for the channel's owner (a FORWARD entry; with an idempotency
        key, a FORWARD_KEY entry)."""
        if key is None:
            return self.append_entry(LinkFrame.FORWARD, pack_forward(ref, channel, data))
        return self.append_entry(LinkFrame.FORWARD_KEY, pack_forward_key(ref, channel, data, key))

    def forward_ack(
        self, ref: int, offset: int, epoch: str = "", code: int = 0, reason: str = ""
    ) -> bool:
        """Queue the answer to a forwarded publish (a FORWARD_ACK entry)."""
        return self.append_entry(
            LinkFrame.FORWARD_ACK, pack_forward_ack(ref, offset, epoch, code, reason)
        )

    def dm(self, user: str, seq: int, event: bytes) -> bool:
        """Queue a stored direct message for the peer's connections of ``user`` (a DM entry)."""
        return self.append_entry(LinkFrame.DM, pack_dm(user, seq, event))

    def control(self, message: Mapping[str, Any]) -> bool:
        """Send one JSON object (a CONTROL frame), after anything queued before it."""
        conn = self._conn
        if conn is None:
            self.dropped += 1
            return False
        self._seal()
        self.frames_out += 1
        return conn.send(LinkFrame.CONTROL, orjson.dumps(message))

    def append_entry(self, ftype: int, entry: bytes) -> bool:
        """Queue one packed entry of a batched frame type (DELIVER, FORWARD, FORWARD_ACK,
        DM): for a caller that packs an entry once for several links. False if down."""
        if self._conn is None:
            self.dropped += 1
            return False
        if self._bcount and self._btype != ftype:
            self._seal()
        self._btype = ftype
        self._buf.append(entry)
        self._bcount += 1
        self._bbytes += len(entry)
        if self._bbytes >= BATCH_BYTES:
            self._seal()
        elif not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._seal_tick)
        return True

    def _seal_tick(self) -> None:
        self._scheduled = False
        self._seal()

    def _seal(self) -> None:
        """Turn the open batch into one frame in the ring (the flusher writes it)."""
        n = self._bcount
        if not n:
            return
        payload = pack_batch(n, b"".join(self._buf))
        self._buf = []
        self._bcount = self._bbytes = 0
        conn = self._conn
        if conn is None or not conn.send(self._btype, payload):
            self.dropped += n
            return
        self.frames_out += 1
        self.items_out += n

    def _drop_batch(self) -> None:
        self.dropped += self._bcount
        self._buf = []
        self._bcount = self._bbytes = 0

    # ------------------------------------------------------------------ connection

    async def wait_up(self, timeout: float) -> bool:
        """Wait until the link is up (True) or ``timeout`` passes (False)."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        links = self.links
        attempt = 0
        while not self._closed:
            was_up = False
            try:
                was_up = await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, LinkRefused) as e:
                err = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if err != self.last_error:
                    log.warning("link to %s at %s: %s", self.peer, self.address, err)
                self.last_error = err
            except Exception:
                log.exception("link to %s: unexpected error", self.peer)
            if self._closed:
                break
            attempt = 0 if was_up else attempt + 1
            await asyncio.sleep(backoff_delay(attempt, *links.backoff))

    async def _session(self) -> bool:
        """Connect, handshake, then heartbeat until the connection ends; True if it was up."""
        links = self.links
        self.state = "connecting"
        hs: asyncio.Future[None] = self.loop.create_future()
        self._hs = hs

        def factory() -> LinkConn:
            return LinkConn(self, links.flusher, links.cap, LINK_MAX_FRAME, DIALER_ACCEPTS)

        if self.address.startswith(UNIX_PREFIX):
            # a worker of the same node: no TLS (the socket's directory is private)
            connecting = self.loop.create_unix_connection(factory, self.host)
        else:
            connecting = self.loop.create_connection(
                factory,
                self.host,
                self.port,
                ssl=links.ssl,
                server_hostname=(links.server_hostname or self.host) if links.ssl else None,
            )
        _, conn = await asyncio.wait_for(connecting, links.timeout)
        up = False
        try:
            conn.peer = self.peer
            hello = {
                "node": links.node_id,
                "cluster": links.cluster,
                "version": LINK_VERSION,
                "expect": self.peer,
            }
            conn.send(LinkFrame.HELLO, orjson.dumps(hello))
            await asyncio.wait_for(hs, links.timeout)
            self._conn = conn
            self.state = "up"
            self.connects += 1
            self.last_error = ""
            up = True
            self._up.set()
            log.info("link to %s at %s up", self.peer, self.address)
            links._changed(self.peer, True)
            last = self.loop.time()
            while not conn.lost.is_set():
                try:
                    await asyncio.wait_for(conn.lost.wait(), links.heartbeat)
                except asyncio.TimeoutError:
                    now = self.loop.time()
                    silent = now - conn.last_rx
                    stalled = now - last > 2 * links.heartbeat
                    last = now
                    if stalled:
                        # this process did not run for a while: the peer's frames are
                        # unread, its silence is ours; ping, judge on the next round
                        conn.send(_PING, _T.pack(now))
                        continue
                    if silent > links.timeout:
                        self.last_error = f"no answer for {silent:.1f}s"
                        log.warning("link to %s: silent for %.1fs, dropping it", self.peer, silent)
                        conn.abort()
                        break
                    conn.send(_PING, _T.pack(self.loop.time()))
            return True
        finally:
            if not hs.done():
                hs.cancel()
            if self._conn is conn:
                self._conn = None
                self._drop_batch()
            conn.abort()
            self.state = "closed" if self._closed else "down"
            if up:
                self._up.clear()
                log.info("link to %s down", self.peer)
                links._changed(self.peer, False)

    # the ConnOwner protocol, for this link's connection
    def conn_made(self, conn: LinkConn) -> None:
        pass

    def frame(self, conn: LinkConn, ftype: int, payload: bytes) -> None:
        hs = self._hs
        if ftype == _PONG:
            if len(payload) == 8:
                self.rtt = self.loop.time() - _T.unpack(payload)[0]
        elif ftype == LinkFrame.WELCOME:
            try:
                info = orjson.loads(payload)
                node, cluster = info["node"], info["cluster"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                conn.fail(GoawayCode.BAD_HANDSHAKE, "malformed WELCOME")
                if hs is not None and not hs.done():
                    hs.set_exception(LinkRefused("malformed WELCOME"))
                return
            err = None
            if node != self.peer:
                err = f"{self.address} is node {node!r}, not {self.peer!r}"
            elif cluster != self.links.cluster:
                err = f"{self.address} is in cluster {cluster!r}, not {self.links.cluster!r}"
            if err is not None:
                conn.fail(GoawayCode.WRONG_NODE, err)
            if hs is not None and not hs.done():
                if err is None:
                    hs.set_result(None)
                else:
                    hs.set_exception(LinkRefused(err))
        elif ftype == LinkFrame.GOAWAY:
            try:
                code, reason = unpack_goaway(payload)
            except LinkDecodeError as e:
                code, reason = 0, str(e)
            msg = f"refused by {self.peer} ({_code_name(code)}): {reason}"
            if hs is not None and not hs.done():
                hs.set_exception(LinkRefused(msg))
            else:
                log.info("link to %s: %s", self.peer, msg)
            conn.close()

    def conn_lost(self, conn: LinkConn, exc: Exception | None) -> None:
        hs = self._hs
        if hs is not None and not hs.done():
            hs.set_exception(ConnectionResetError(f"closed during handshake: {exc or 'EOF'}"))

    async def close(self, goodbye: bool = True) -> None:
        """Stop for good: seal and write what is queued, GOAWAY, close."""
        self._closed = True
        conn = self._conn
        if conn is not None and goodbye:
            self._seal()
            conn.send(LinkFrame.GOAWAY, pack_goaway(GoawayCode.SHUTDOWN, "link closed"))
            conn.close()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.state = "closed"


class Links:
    """This node's outbound links: one :class:`Link` per peer of the routing table.

    :meth:`sync` takes the wanted peers (node id → ``host:port``, see :func:`link_peers`)
    and opens, closes or re-addresses links to match; the membership change callback
    calls it. ``on_state(peer, up)`` is told when a link comes up or goes down (the hub
    re-sends interest or resynchronises channels then). Create it inside the running loop.
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        heartbeat: float = 1.0,
        timeout: float = 3.0,
        backoff: tuple[float, float] = (0.05, 2.0),
        cap: int = LINK_CAP,
        flusher: _core.Flusher | None = None,
        on_state: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.backoff = backoff
        self.cap = cap
        self.loop = asyncio.get_running_loop()
        self.flusher = flusher if flusher is not None else _core.Flusher(self.loop.call_soon)
        self.on_state = on_state
        self.links: dict[str, Link] = {}
        self._tasks = Background("links")
        self._closed = False

    def sync(self, peers: Mapping[str, str]) -> None:
        """Make the set of links match ``peers`` (node id → link address)."""
        if self._closed:
            return
        for peer in list(self.links):
            link = self.links[peer]
            if peers.get(peer) != link.address:
                del self.links[peer]
                self._run(link.close())
        for peer, address in peers.items():
            if peer != self.node_id and peer not in self.links:
                self.links[peer] = Link(self, peer, address)

    def get(self, peer: str) -> Link | None:
        return self.links.get(peer)

    def is_up(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.state == "up"

    def deliver(self, peer: str, channel: str, epoch: str, offset: int, data: bytes) -> bool:
        link = self.links.get(peer)
        return link is not None and link.deliver(channel, epoch, offset, data)

    def forward(
        self, peer: str, ref: int, channel: str, data: bytes, key: str | None = None
    ) -> bool:
        link = self.links.get(peer)
        return link is not None and link.forward(ref, channel, data, key)

    def forward_ack(
        self, peer: str, ref: int, offset: int, epoch: str = "", code: int = 0, reason: str = ""
    ) -> bool:
        link = self.links.get(peer)
        return link is not None and link.forward_ack(ref, offset, epoch, code, reason)

    def dm(self, peer: str, user: str, seq: int, event: bytes) -> bool:
        link = self.links.get(peer)
        return link is not None and link.dm(user, seq, event)

    def control(self, peer: str, message: Mapping[str, Any]) -> bool:
        link = self.links.get(peer)
        return link is not None and link.control(message)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per peer: state, round trip, counters, last error (for /ready and metrics)."""
        return {
            peer: {
                "address": link.address,
                "state": link.state,
                "rtt": link.rtt,
                "frames_out": link.frames_out,
                "items_out": link.items_out,
                "dropped": link.dropped,
                "connects": link.connects,
                "last_error": link.last_error,
            }
            for peer, link in self.links.items()
        }

    def _changed(self, peer: str, up: bool) -> None:
        if self.on_state is not None:
            try:
                self.on_state(peer, up)
            except Exception:
                log.exception("links: on_state callback failed")

    def _run(self, coro: Any) -> None:
        self._tasks.run(coro)

    async def close(self) -> None:
        """Close every link (GOAWAY after what is queued)."""
        self._closed = True
        links, self.links = list(self.links.values()), {}
        if links:
            await asyncio.gather(*(link.close() for link in links))
        await self._tasks.wait(5.0)
