"""The cluster runtime of one node: membership, placement and links wired to the hub.

:class:`Cluster` is what ``Node.start`` creates when ``etcd_endpoints`` is set. It owns
the three foundations (``membership``, ``placement``, ``links`` + ``server``) and is the
hub's ``router``: the hub asks it two things on its hot path and nothing else.

- ``owns(channel)``: is this node the channel's owner? If not, ``Hub.publish`` hands the
  publish to :meth:`Cluster.forward`, which sends it to the owner over a link under a
  fresh ``ref`` with a deadline (:data:`FORWARD_TIMEOUT`, checked on the node's timer
  tick); the client's ``done`` runs when the owner's FORWARD_ACK comes back (with the
  owner's offset), or refused (``NOT_ROUTED``, 119) when the link is down,
  goes down, or no ack came in time. Never a silent loss: every forwarded publish is
  answered once.
- ``down(channel, offset, data)``: after a message was delivered locally, send it to this
  node's children in the channel's tree (DELIVER). Every node does the same on receipt,
  so a message reaches every node once.

Why a separate object rather than cluster code in the hub: a node without etcd pays one
``is not None`` per publish and per delivery, and everything that knows about nodes,
links and etcd lives here, where the direct-message routing (``fastim/cluster/users.py``)
hooks in too (:meth:`on_change`, :meth:`register_control`, ``dm_handler``).

Receiving side (:class:`fastim.cluster.link.LinkHandler`): ``on_forward`` publishes on the
owner (through the store for durable channels) and acks after the store took it;
``on_deliver`` drops offsets at or below the channel's (duplicates while views differ),
fills a gap of a durable channel from the store before going on (later messages of
that channel wait meanwhile) and lets a memory channel jump; a different epoch is the
hub's resubscribe path.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .. import _core
from ..config import Config
from ..delivery import Postman
from ..hub import Channel, Done, Hub, HubError, Published, Since
from ..protocol import ErrorCode
from ..tasks import Background
from . import ClusterError
from .dm import DmRouter
from .frames import Deliver, Forward, ForwardAck, LinkFrame, pack_deliver
from .link import LinkHandler, Links, LinkServer, client_context, link_peers, server_context
from .membership import MemberEvent, Membership
from .placement import Placement, moved
from .tree import HOLD_MAX as HOLD_MAX
from .tree import TreeReceiver
from .users import UserRoutes

log = logging.getLogger("fastim.cluster")

#: seconds a peer has to answer an ``ask`` (it is left out of ``ask_all`` after that)
ASK_TIMEOUT = 2.0


class ClusterHost(Protocol):
    """The node, as its cluster runtime sees it (the node implements it; the cluster
    never imports the node): its settings, its hub (the cluster is the hub's
    :class:`~fastim.hub.Router`), its flusher (links write through it) and its postman
    (direct messages cross nodes through it)."""

    config: Config
    hub: Hub
    flusher: _core.Flusher
    postman: Postman | None


_DELIVER = int(LinkFrame.DELIVER)

#: seconds a forwarded publish waits for the owner's ack before the client is told
#: "not routed, retry": above the store's own timeout (redis_timeout, 2 s) plus a link's
#: heartbeat timeout (3 s), so a slow but working owner answers first
FORWARD_TIMEOUT = 6.0
#: the reason of a successful FORWARD_ACK (code 0) for a keyed publish the owner had taken
#: before: a node of an earlier version ignores the reason of a success
DUPLICATE = "duplicate"
#: seconds a subscribe on a non-owner waits for the owner's state of a memory channel
STATE_TIMEOUT = 3.0
#: seconds they are kept: past the store's timeout, nobody is loading the channel
HOLD_SECONDS = 10.0


def link_tls(config: Any) -> tuple[Any, Any]:
    """(server, client) SSL contexts for links from the ``link_tls_*`` settings: mutual TLS,
    every node presenting its certificate signed by ``link_tls_ca`` (None, None: plain)."""
    cert, key, ca = config.link_tls_cert, config.link_tls_key, config.link_tls_ca
    if not cert:
        return None, None
    return server_context(cert, key, ca), client_context(ca, cert, key)


class Cluster(TreeReceiver, LinkHandler):
    """One node's membership in a cluster, and the hub's router. See the module docstring.

    Attributes other modules hook into: ``membership`` (:class:`Membership`),
    ``placement`` (:class:`Placement`), ``links`` (:class:`Links`, outbound), ``server``
    (:class:`LinkServer`, inbound), ``me`` (this node id).
    """

    def __init__(self, node: ClusterHost) -> None:
        cfg = node.config
        self.node = node
        self.hub = node.hub
        self.config = cfg
        self.me: str = cfg.node_id
        self.placement = Placement(k=cfg.tree_k)
        self.membership: Membership | None = None
        self.links: Links | None = None
        self.server: LinkServer | None = None
        #: loop time, refreshed by the node's timer tick; starts at the wheel's (a forward
        #: made before the first tick must not get a deadline in the past)
        wheel = getattr(node, "wheel", None)  # None: a node not started (tests)
        self.now = wheel.now if wheel is not None else asyncio.get_event_loop().time()
        self._refs = itertools.count(1)
        #: forwarded publishes waiting for their ack: ref -> (done, owner)
        self._forwards: dict[int, tuple[Done, str]] = {}
        #: state requests (memory channels) waiting for the owner: ref -> (future, owner)
        self._states: dict[int, tuple[asyncio.Future[dict[str, Any]], str]] = {}
        #: (deadline, ref) in the order sent, so in deadline order
        self._deadlines: deque[tuple[float, int]] = deque()
        #: durable channels whose gap is being read from the store: DELIVERs held meanwhile
        self._filling: dict[str, list[Deliver]] = {}
        #: durable channels whose state a subscribe is reading: DELIVERs held meanwhile,
        #: and when the first was held (dropped after HOLD_SECONDS: nobody is loading it)
        self._unloaded: dict[str, list[Deliver]] = {}
        self._unloaded_at: dict[str, float] = {}
        self._change_cbs: list[Callable[[MemberEvent | None], None]] = []
        self._control: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "state": self._answer_state,
            "state_reply": self._state_reply,
            "ask": self._on_ask,
            "answer": self._on_answer,
        }
        #: handlers of ``ask`` questions from the other nodes (workers): op -> fn(message)
        #: -> a JSON value, or an awaitable of one
        self.answers: dict[str, Any] = {}
        self._asks = itertools.count(1)
        self._answers: dict[int, tuple[asyncio.Future[dict[str, Any]], str]] = {}
        #: set by the direct-message routing: called with (peer, items) per DM frame
        self.dm_handler: Callable[[str, list[Any]], None] | None = None
        #: direct messages across nodes (fastim/cluster/dm.py), set by start()
        self.dm: DmRouter | None = None
        self._tasks = Background("cluster")
        # counters (fastim/api/metrics.py)
        self.forwards_sent = 0
        self.forwards_acked = 0
        self.forwards_failed = 0
        self.forwards_received = 0
        self.tree_in = 0
        self.tree_out = 0
        self.tree_dropped = 0
        self.duplicates = 0
        self.gaps = 0
        self.ownership_moves = 0
        self.resyncs = 0

    # ------------------------------------------------------------------ life

    async def start(self, addresses: dict[str, str]) -> None:
        """Listen for links, register in etcd, dial the peers; ClusterError if it cannot join.

        ``addresses`` are the client listeners' advertised ``host:port`` (tcp, ws); the
        link address is added here. With ``link_port`` 0 the link server takes a free
        port: it is registered in etcd, so peers find it.
        """
        cfg = self.config
        node = self.node
        server_ssl, client_ssl = link_tls(cfg)
        self.server = LinkServer(
            self.me,
            cfg.cluster_name,
            self,
            host=cfg.host,
            port=cfg.link_port,
            ssl=server_ssl,
            flusher=node.flusher,
        )
        try:
            await self.server.start()
        except OSError as e:
            raise ClusterError(
                f"cannot listen for node links on {cfg.host}:{cfg.link_port}: {e}"
            ) from None
        try:
            self.links = Links(
                self.me,
                cfg.cluster_name,
                ssl=client_ssl,
                flusher=node.flusher,
                on_state=self._link_state,
            )
            host = advertised_host(cfg)
            addrs = {**addresses, "link": join_host_port(host, self.server.port)}
            self.membership = Membership.from_config(cfg, addrs)
            self.membership.on_change(self._changed)
            self.membership.on_state(self._membership_state)
            await self.membership.start()
        except BaseException:
            await self.close()
            raise
        self._changed(None)
        self.hub.router = self
        if node.postman is not None:
            try:  # user routes under this node's lease, DM frames through the links
                self.dm = await self._attach_dm(node.postman)
            except BaseException:
                await self.close()
                raise
        log.info(
            "node %s joined cluster %r: %d nodes, links on %s",
            self.me,
            cfg.cluster_name,
            len(self.membership.nodes),
            addrs["link"],
        )

    async def leave(self) -> None:
        """Deregister (others reroute at once); links stay up for the drain."""
        if self.dm is not None:
            await self.dm.stop()  # before the lease goes: its revocation removes the routes
        if self.membership is not None:
            await self.membership.stop()

    async def close(self) -> None:
        """Close links and the link server; answer what still waits (node stopping)."""
        self.hub.router = None
        for ref in list(self._forwards):
            self._fail_forward(ref, "this node is shutting down")
        for ref in list(self._states):
            self._fail_state(ref, "this node is shutting down")
        if self.dm is not None:
            await self.dm.stop()
        if self.membership is not None and self.membership.state != "stopped":
            await self.membership.stop()
        if self.links is not None:
            await self.links.close()
        if self.server is not None:
            await self.server.close()
        await self._tasks.cancel()

    def on_change(self, callback: Callable[[MemberEvent | None], None]) -> None:
        """Call ``callback(event)`` after each membership change was applied (placement
        updated, links synced); ``None`` once at start."""
        self._change_cbs.append(callback)

    def register_control(self, op: str, handler: Callable[[str, dict[str, Any]], None]) -> None:
        """Route CONTROL messages ``{"op": op, ...}`` to ``handler(peer, message)``."""
        self._control[op] = handler

    # ------------------------------------------------------------------ membership

    def _changed(self, ev: MemberEvent | None) -> None:
        m = self.membership
        links = self.links
        if m is None or links is None:
            return
        before = self.placement.nodes
        if self.placement.update(m.nodes):
            self._ownership(moved(list(self.hub.channels), before, self.placement.nodes))
        links.sync(link_peers(m.nodes, self.me))
        if ev is not None and ev.kind != "update":
            self.resync()  # parents changed: what was on its way may be lost
        waiting = {o for _d, o in self._forwards.values()} | {o for _f, o in self._states.values()}
        for peer in waiting - set(m.nodes):
            self._peer_gone(peer, f"{peer}, the channel's owner, left the cluster")
        for cb in self._change_cbs:
            try:
                cb(ev)
            except Exception:
                log.exception("cluster change callback failed")

    def _ownership(self, changes: Iterable[tuple[str, str | None, str | None]]) -> None:
        """Channels that moved: a memory channel this node now owns starts a new epoch.

        Its history was the old owner's, which may still be numbering in the same epoch
        (a split) or be gone: continuing its offsets would give two messages one offset.
        A durable channel needs nothing: its next append returns the store's numbering
        (Hub._append fills or adopts), so order continues.
        """
        hub = self.hub
        for name, _old, new in changes:
            self.ownership_moves += 1
            if new != self.me:
                continue
            ch = hub.channels.get(name)
            if ch is not None and not ch.durable:
                hub.renumber(ch)

    def _membership_state(self, state: str) -> None:
        log.info("cluster membership %s", state)

    async def _attach_dm(self, postman: Postman) -> DmRouter:
        """Wire direct messages into this started runtime: user routes under its
        membership's lease, DM frames out through its links and in through its
        ``dm_handler``. Does not wait for etcd (see :meth:`DmRouter.start`)."""
        membership, links = self.membership, self.links
        if membership is None or links is None:
            raise RuntimeError("the cluster runtime is not started")
        router = DmRouter(self.me, postman, UserRoutes(membership), links)
        self.dm_handler = router.on_dm
        try:
            # routes are soft state: a slow first listing must not fail a node that has
            # joined; until it is done every DM goes to every peer
            await router.start(wait=False)
        except BaseException:
            self.dm_handler = None
            await router.stop()
            raise
        return router

    # ------------------------------------------------------------------ router (hub hooks)

    def owns(self, channel: str) -> bool:
        return self.placement.is_owner(channel, self.me)

    def forward(self, channel: str, data: bytes, done: Done, key: str | None = None) -> None:
        """Send a publish to the channel's owner; ``done`` runs once with its answer.
        ``key``: its idempotency key (a FORWARD_KEY): the owner publishes with it."""
        owner = self.placement.owner(channel)
        links = self.links
        ref = next(self._refs)
        if owner is None or links is None or not links.forward(owner, ref, channel, data, key):
            self.forwards_failed += 1
            done(
                Published.refused(
                    ErrorCode.NOT_ROUTED,
                    f"not published: the owner of {channel!r} ({owner}) is not reachable "
                    "from this node, retry",
                )
            )
            return
        self.forwards_sent += 1
        self._forwards[ref] = (done, owner)
        self._deadlines.append((self.now + FORWARD_TIMEOUT, ref))

    def down(self, ch: Channel, offset: int, data: bytes) -> None:
        """After local delivery: the message to this node's children in the channel's tree."""
        kids = self.placement.children(ch.name, self.me)
        if kids:
            self._send_down(kids, ch.name, ch.epoch, offset, data)

    def _send_down(self, kids: list[str], name: str, epoch: str, offset: int, data: bytes) -> None:
        links = self.links
        if links is None:
            return
        # one DELIVER entry for every child (packing is ~0.7 µs; Link.deliver would pack
        # it once per child): the same bytes go into each link's open batch
        entry = pack_deliver(name, epoch, offset, data)
        get = links.links.get
        for kid in kids:
            link = get(kid)
            if link is not None and link.append_entry(_DELIVER, entry):
                self.tree_out += 1
            else:
                self.tree_dropped += 1  # link down: the child fills the gap later

    async def follow(self, channel: str) -> None:
        """Nothing to register: every node of a channel's tree gets its messages."""

    def dropped(self, channel: str) -> None:
        """Nothing to withdraw (the tree does not depend on who follows what)."""

    async def state(self, channel: str, since: Since | None) -> dict[str, Any]:
        """A memory channel's (epoch, offset) and messages after ``since`` from its owner.

        Raises HubError (NOT_ROUTED) when the owner cannot be asked or does not answer.
        """
        owner = self.placement.owner(channel)
        links = self.links
        ref = next(self._refs)
        msg: dict[str, Any] = {"op": "state", "ref": ref, "ch": channel}
        if since is not None:
            msg["since"] = [since.off, since.epoch, since.last]
        if owner is None or links is None or not links.control(owner, msg):
            raise HubError(
                ErrorCode.NOT_ROUTED,
                f"the owner of {channel!r} ({owner}) is not reachable from this node, retry",
            )
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._states[ref] = (fut, owner)
        self._deadlines.append((self.now + STATE_TIMEOUT, ref))
        reply = await fut
        if "error" in reply:
            raise HubError(ErrorCode.NOT_ROUTED, str(reply["error"]))
        return reply

    # ------------------------------------------------------------------ timers, link state

    def on_tick(self, now: float) -> None:
        """The node's timer tick: answer forwards and state requests past their deadline."""
        self.now = now
        if self._unloaded_at:
            for name in [n for n, t in self._unloaded_at.items() if now - t > HOLD_SECONDS]:
                del self._unloaded_at[name]
                self._unloaded.pop(name, None)
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            ref = dl.popleft()[1]
            if ref in self._forwards:
                owner = self._forwards[ref][1]
                self._fail_forward(
                    ref,
                    f"no answer from {owner}, the channel's owner, within {FORWARD_TIMEOUT:g}s: "
                    "it may or may not have been published, retry",
                )
            elif ref in self._states:
                self._fail_state(ref, f"no answer from the owner within {STATE_TIMEOUT:g}s")

    def _fail_forward(self, ref: int, reason: str) -> None:
        entry = self._forwards.pop(ref, None)
        if entry is not None:
            self.forwards_failed += 1
            entry[0](Published.refused(ErrorCode.NOT_ROUTED, reason))

    def _fail_state(self, ref: int, reason: str) -> None:
        entry = self._states.pop(ref, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result({"error": reason})

    def _link_state(self, peer: str, up: bool) -> None:
        """An outbound link went down: what waits on it will not be answered."""
        if not up:
            self._peer_gone(peer, f"the link to {peer}, the channel's owner, went down")

    def _peer_gone(self, peer: str, why: str) -> None:
        for ref in [r for r, (_d, owner) in self._forwards.items() if owner == peer]:
            self._fail_forward(ref, f"{why}: it may or may not have been published, retry")
        for ref in [r for r, (_f, owner) in self._states.items() if owner == peer]:
            self._fail_state(ref, why)

    # ------------------------------------------------------------------ LinkHandler

    def on_forward(self, peer: str, items: list[Forward]) -> None:
        """Publishes forwarded to this node as the owner: publish, ack after the store."""
        hub = self.hub
        links = self.links
        if links is None:
            return
        for ref, name, data, key in items:
            self.forwards_received += 1
            if not self.placement.is_owner(name, self.me):
                links.forward_ack(
                    peer,
                    ref,
                    0,
                    "",
                    ErrorCode.NOT_ROUTED,
                    f"{self.me} does not own {name!r} in its view (the cluster is changing), retry",
                )
                continue
            try:
                ch = hub.channel(name)
                assert ch is not None
                before = ch.offset
                off = hub.publish(name, data, _Ack(links, peer, ref, ch), key)
            except HubError as e:
                links.forward_ack(peer, ref, 0, "", e.code, e.reason)
                continue
            if off is not None:  # a memory channel; a keyed repeat has an older offset
                dup = key is not None and off <= before
                links.forward_ack(peer, ref, off, ch.epoch, 0, DUPLICATE if dup else "")

    def on_forward_ack(self, peer: str, items: list[ForwardAck]) -> None:
        for ref, off, epoch, code, reason in items:
            entry = self._forwards.pop(ref, None)
            if entry is None:
                continue  # answered already (deadline, link down)
            done = entry[0]
            if code:
                self.forwards_failed += 1
                done(Published.refused(code, reason))
                continue
            self.forwards_acked += 1
            # the owner's offset, in the owner's epoch
            done(Published(off, epoch, duplicate=reason == DUPLICATE))

    # ------------------------------------------------------------------ questions to peers

    async def ask_all(
        self, op: str, args: dict[str, Any], peers: Iterable[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Ask every reachable peer (a worker of the node, a node of the cluster) ``op``
        (an entry of their ``answers``), or only ``peers``; their replies by peer name (a
        peer that does not answer within ASK_TIMEOUT is left out)."""
        links = self.links
        if links is None:
            return {}
        loop = asyncio.get_running_loop()
        waits: dict[str, asyncio.Future[dict[str, Any]]] = {}
        for peer in list(links.links) if peers is None else [p for p in peers if p in links.links]:
            ref = next(self._asks)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            if links.control(peer, {"op": "ask", "ask": op, "ref": ref, **args}):
                self._answers[ref] = (fut, peer)
                waits[peer] = fut
        out: dict[str, dict[str, Any]] = {}
        if waits:
            done, _ = await asyncio.wait(waits.values(), timeout=ASK_TIMEOUT)
            out = {p: f.result() for p, f in waits.items() if f in done}
        for ref in [r for r, (f, _p) in self._answers.items() if f.done() or f in waits.values()]:
            self._answers.pop(ref, None)
        return out

    async def ask(self, peer: str, op: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """Ask one peer ``op``: its answer (``value`` or ``error``), None when it cannot
        be asked or does not answer within ASK_TIMEOUT."""
        links = self.links
        if links is None:
            return None
        ref = next(self._asks)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not links.control(peer, {"op": "ask", "ask": op, "ref": ref, **args}):
            return None
        self._answers[ref] = (fut, peer)
        try:
            return await asyncio.wait_for(fut, ASK_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        finally:
            self._answers.pop(ref, None)

    async def ask_owner(self, channel: str, op: str, args: dict[str, Any]) -> Any:
        """Ask the owner of ``channel`` ``op``: its value, None when it did not answer."""
        owner = self.placement.owner(channel)
        if owner is None or owner == self.me:
            return None
        answer = await self.ask(owner, op, args)
        if answer is None or "error" in answer:
            return None
        return answer.get("value")

    def _on_ask(self, peer: str, msg: dict[str, Any]) -> None:
        fn = self.answers.get(str(msg.get("ask")))
        reply: dict[str, Any] = {"op": "answer", "ref": msg.get("ref")}
        if fn is None:
            reply["error"] = f"unknown question {msg.get('ask')!r}"
        else:
            try:
                value = fn(msg)
            except Exception as e:  # a question must get an answer
                log.exception("%s: answering %r", self.me, msg.get("ask"))
                reply["error"] = str(e)
            else:
                if inspect.isawaitable(value):
                    self._run(self._answer_later(peer, reply, value))
                    return
                reply["value"] = value
        if self.links is not None:
            self.links.control(peer, reply)

    async def _answer_later(self, peer: str, reply: dict[str, Any], value: Any) -> None:
        try:
            reply["value"] = await value
        except Exception as e:
            log.exception("%s: answering %s", self.me, peer)
            reply["error"] = str(e)
        if self.links is not None:
            self.links.control(peer, reply)

    def _on_answer(self, peer: str, msg: dict[str, Any]) -> None:
        ref = msg.get("ref")
        entry = self._answers.pop(ref, None) if isinstance(ref, int) else None
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    def on_control(self, peer: str, message: dict[str, Any]) -> None:
        handler = self._control.get(str(message.get("op")))
        if handler is None:
            log.debug("CONTROL from %s with unknown op %r", peer, message.get("op"))
            return
        handler(peer, message)

    def on_dm(self, peer: str, items: list[Any]) -> None:
        if self.dm_handler is not None:
            self.dm_handler(peer, items)

    def on_peer(self, peer: str, connected: bool) -> None:
        if connected:
            self.resync(peer)
        if self.dm is not None:
            self.dm.on_peer(peer, connected)  # a link came back: DM frames may be lost

    # ------------------------------------------------------------------ memory channel state

    def _answer_state(self, peer: str, msg: dict[str, Any]) -> None:
        """The owner's side of :meth:`state`: epoch, offset, messages after ``since``."""
        links = self.links
        ref, name = msg.get("ref"), msg.get("ch")
        if links is None or not isinstance(name, str):
            return
        if not self.placement.is_owner(name, self.me):
            links.control(
                peer,
                {"op": "state_reply", "ref": ref, "error": f"{self.me} does not own {name!r}"},
            )
            return
        hub = self.hub
        try:
            ch = hub.channel(name)
        except HubError as e:
            links.control(peer, {"op": "state_reply", "ref": ref, "error": e.reason})
            return
        assert ch is not None
        reply: dict[str, Any] = {
            "op": "state_reply",
            "ref": ref,
            "epoch": ch.epoch,
            "offset": ch.offset,
            "messages": [],
        }
        since = msg.get("since")
        if isinstance(since, list) and len(since) == 3:
            resolved, msgs = hub.recover(ch, Since(int(since[0]), str(since[1]), bool(since[2])))
            reply["since"] = resolved.off
            reply["messages"] = [[o, d.decode()] for o, d in msgs]
        links.control(peer, reply)

    def _state_reply(self, peer: str, msg: dict[str, Any]) -> None:
        ref = msg.get("ref")
        entry = self._states.pop(ref, None) if isinstance(ref, int) else None
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    # ------------------------------------------------------------------ reporting

    def links_up(self) -> tuple[int, int]:
        links = self.links
        if links is None:
            return 0, 0
        return sum(1 for p in links.links if links.is_up(p)), len(links.links)

    def degraded(self) -> str | None:
        """Why the cluster part is degraded (membership not healthy), or None."""
        m = self.membership
        if m is None or m.healthy:
            return None
        why = f": {m.last_error}" if m.last_error else ""
        return f"cluster membership {m.state}{why} (serving with the last known routes)"

    def summary(self) -> str:
        m = self.membership
        up, total = self.links_up()
        n = len(m.nodes) if m is not None else 0
        state = m.state if m is not None else "stopped"
        return f"cluster {self.config.cluster_name}: {n} nodes, {up}/{total} links up, {state}"

    def _run(self, coro: Any) -> None:
        self._tasks.run(coro)


class _Ack:
    """The owner's ``done`` for a forwarded publish: answer FORWARD_ACK to the sender."""

    __slots__ = ("ch", "links", "peer", "ref")

    def __init__(self, links: Links, peer: str, ref: int, ch: Channel) -> None:
        self.links = links
        self.peer = peer
        self.ref = ref
        self.ch = ch

    def __call__(self, result: Published) -> None:
        refusal = result.refusal
        if refusal is None:
            reason = DUPLICATE if result.duplicate else ""
            self.links.forward_ack(self.peer, self.ref, result.offset, result.epoch, 0, reason)
        else:
            self.links.forward_ack(self.peer, self.ref, 0, "", refusal.code, refusal.reason)


def advertised_host(config: Any) -> str:
    """The host other nodes and clients reach this node at (``advertise_host`` or ``host``)."""
    return str(config.advertise_host or config.host)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
