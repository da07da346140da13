"""The workers of one node, one node to clients: the cluster's routing over Unix sockets.

A node started with ``--workers N`` is N processes sharing its ports (``SO_REUSEPORT``: the
kernel spreads connections over them). Each worker runs a :class:`WorkerMesh`, which is
the cluster runtime (:class:`~fastim.cluster.runtime.Cluster`) with three parts swapped:

- **Membership is fixed by the supervisor**: the workers are ``w0`` … ``w<N-1>``
  (:class:`~fastim.workers.role.WorkerRole`), each listening for links on
  ``<dir>/w<i>.sock``. No etcd. A worker's *view* is itself plus the peers its outbound
  link reaches: a worker that dies (its socket closes) or hangs (its link goes silent
  for the link timeout, 3 s) leaves every view, its channels move to the next worker of
  their rendezvous ranking (the cluster's owner rule), and they move back when the
  supervisor's replacement links up.
- **Delivery goes only to followers**, not down a tree of every node: a worker that has a
  channel (a subscriber there, or recent history) *follows* it at the owner (CONTROL
  ``follow``, acknowledged), and the owner sends each message of the channel to its
  followers (DELIVER), nothing to the other workers. A subscribe on a worker that does
  not own the channel registers first and reads the channel's state after the owner's
  acknowledgement, so every message published after that state reaches it (earlier ones
  are below the state: duplicates, dropped). When a link comes up the follower sends
  its whole list again (``reset``), and when an owner changes the followers register at
  the new owner, then catch up what was published before the owner had them: durable
  channels from the store, memory channels from the owner's history ring. A follow the
  owner does not acknowledge in time (lost, or the owner stalled) is sent again in the
  background, with a growing pause, until it is, and is caught up the same way then
  (:meth:`WorkerMesh._retry_follows`).
- **Direct messages go to every worker** (N is the number of cores: a handful of link
  entries per message), instead of user routes in etcd; a worker without a connection
  of the recipient drops the entry. What makes them reliable is the inbox in the shared
  store, as in a cluster (fastim/cluster/dm.py).

Presence is asked of every worker and summed (:meth:`WorkerMesh.presence`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from ..cluster.dm import DmRouter
from ..cluster.link import Links, LinkServer
from ..cluster.placement import Placement, moved
from ..cluster.runtime import ASK_TIMEOUT as RUNTIME_ASK_TIMEOUT
from ..cluster.runtime import Cluster, ClusterHost
from ..hub import Channel, HubError, Since
from .role import WorkerRole

log = logging.getLogger("fastim.workers")

#: seconds a follow waits for the owner's acknowledgement; then the subscribe goes on (it
#: is not held longer) and the follow is sent again in the background until it is
#: acknowledged, then what was published meanwhile is caught up (``_retry_follows``)
FOLLOW_TIMEOUT = 3.0
#: the longest wait for the acknowledgement of a follow sent again: the wait starts at
#: FOLLOW_TIMEOUT and doubles up to this (a worker stalled for minutes is asked again
#: every few seconds, not in a tight loop, and not given up on)
FOLLOW_RETRY_MAX = 10.0
#: seconds a starting worker waits for its links to the others before serving anyway
#: (a worker that is not up is not in the view: its channels are served by the others)
START_WAIT = 5.0
#: seconds a presence question waits for the other workers (the runtime's ask bound)
ASK_TIMEOUT = RUNTIME_ASK_TIMEOUT


class FollowerPlacement(Placement):
    """Owners by rendezvous hash over the live workers; a channel's "children" are the
    workers that follow it (owner only), its "parent" its owner.

    The tree receiver (fastim/cluster/tree.py) passes a DELIVER on to
    ``children(channel, me)``: here nobody but the owner has children, so a message is
    sent once by its owner to each follower and never further.
    """

    def __init__(self, nodes: Iterable[str] = ()) -> None:
        super().__init__(nodes, k=2)  # k unused: no tree
        #: channel -> workers following it (owner side)
        self.followers: dict[str, set[str]] = {}

    def children(self, channel: str, node_id: str) -> list[str]:
        f = self.followers.get(channel)
        if not f or not self.is_owner(channel, node_id):
            return []
        return list(f)

    def parent(self, channel: str, node_id: str) -> str | None:
        owner = self.owner(channel)
        return None if owner == node_id else owner


class _Routes:
    """The DM router's user routes for workers: none kept, every DM goes to every worker
    (``healthy`` False is the DmRouter's "send to all peers"), and a local user is
    reachable at once (nothing to publish), so ``is_registered`` is True."""

    healthy = False
    routes: Mapping[str, set[str]] = {}

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.on_registered: Any = None

    def add(self, user: str) -> None:
        pass

    def discard(self, user: str) -> None:
        pass

    def is_registered(self, user: str) -> bool:
        return True

    async def start(self, timeout: float = 10.0, wait: bool = True) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        # the keys of UserRoutes.status (metrics): nothing is written anywhere
        return {"mode": "every worker", "users": 0, "pending": 0, "txns": 0}


class _Unacked:
    """The channels whose follow at one owner was not acknowledged in time: sent again
    by :meth:`WorkerMesh._retry_follows` until they are.

    Kept per owner (not per follow) so that many follows timing out together, as when
    every worker stalls under load, are sent again as one follow per round, not one
    per subscribe.
    """

    __slots__ = ("names", "refs", "wake")

    def __init__(self) -> None:
        #: channels not acknowledged yet
        self.names: set[str] = set()
        #: the follows sent for them (an answer to any of them counts, however late)
        self.refs: list[int] = []
        #: set when some of them were acknowledged, or the link went down
        self.wake = asyncio.Event()


class WorkerMesh(Cluster):
    """One worker's routing among the workers of its node. See the module docstring."""

    def __init__(self, node: ClusterHost, role: WorkerRole) -> None:
        super().__init__(node)
        self.role = role
        self.me = role.name
        self.placement: FollowerPlacement = FollowerPlacement([self.me])
        #: the workers this one reaches (itself included)
        self.view: set[str] = {self.me}
        #: follows sent and not answered: ref -> (owner, channels, the waiting caller's
        #: future, None for a follow sent again in the background)
        self._follow_waits: dict[int, tuple[str, list[str], asyncio.Future[None] | None]] = {}
        #: owner -> channels whose follow there is being sent again (_retry_follows)
        self._unacked: dict[str, _Unacked] = {}
        #: durable channels registered late while a subscribe was reading their state:
        #: caught up from the store once it is read (:meth:`loaded`)
        self._resync_loaded: set[str] = set()
        #: acknowledgements for a peer whose link was not up yet
        self._unsent: dict[str, list[dict[str, Any]]] = {}
        self._control["follow"] = self._on_follow
        self._control["followed"] = self._on_followed
        self._control["unfollow"] = self._on_unfollow
        self._control["refollow"] = self._on_refollow
        self._control["pres"] = self._on_pres
        self._control["pres_ev"] = self._on_pres_ev
        #: owner side: channel -> user -> workers where the user is in the channel
        self.present: dict[str, dict[str, set[str]]] = {}
        self.answers["presence"] = self._local_presence
        # counters
        self.follows_sent = 0  # every follow sent, retries included
        self.follows_received = 0
        self.follow_retries = 0  # follows sent again: not acknowledged within FOLLOW_TIMEOUT
        self.view_changes = 0

    # ------------------------------------------------------------------ life

    async def start(self, addresses: dict[str, str]) -> None:
        node = self.node
        role = self.role
        self.server = LinkServer(
            self.me,
            "workers",
            self,
            path=role.socket_path(),
            flusher=node.flusher,
        )
        await self.server.start()
        # a local socket: retry often (a replacement worker is reachable within 0.25 s)
        self.links = Links(
            self.me,
            "workers",
            flusher=node.flusher,
            on_state=self._link_state,
            backoff=(0.02, 0.25),
        )
        self.links.sync(
            {n: "unix:" + role.socket_path(i) for i, n in enumerate(role.names) if n != self.me}
        )
        self.hub.router = self
        if node.postman is not None:
            self.dm = DmRouter(self.me, node.postman, _Routes(self.me), self.links)  # type: ignore[arg-type]
            self.dm_handler = self.dm.on_dm
        # serve once the others are reachable and reach this one (or START_WAIT passed:
        # those are down): a worker that serves before the others count it in their
        # views would number channels they number too (for a moment, until they do)
        links = self.links
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT
        await asyncio.gather(
            *(link.wait_up(START_WAIT) for link in links.links.values()),
            return_exceptions=True,
        )
        server = self.server
        while loop.time() < deadline:  # (polled: the server has no event for it)
            if all(p in server.peers for p in links.links if links.is_up(p)):
                break
            await asyncio.sleep(0.01)
        up = sorted(p for p in links.links if links.is_up(p))
        log.info(
            "worker %s of %d: links to %s", self.me, role.count, ", ".join(up) or "no other worker"
        )

    async def leave(self) -> None:
        """Nothing to deregister: the others see this worker's links close."""

    # ------------------------------------------------------------------ view

    def _link_state(self, peer: str, up: bool) -> None:
        if up:
            self.view.add(peer)
        else:
            self.view.discard(peer)
            # the follows waiting for an answer from it: refollow on link up sends
            # everything again (``reset``), with its own catch-up
            unacked = self._unacked.pop(peer, None)
            if unacked is not None:
                unacked.wake.set()
            for fs in self.placement.followers.values():
                fs.discard(peer)
            self._presence_gone(peer)
            for fut, who in list(self._answers.values()):
                if who == peer and not fut.done():
                    fut.set_result({"error": f"worker {peer} is not reachable"})
            super()._link_state(peer, up)  # forwards and state requests waiting on it
        self.view_changes += 1
        self._apply_view()
        if up and self.links is not None:
            for reply in self._unsent.pop(peer, ()):
                self.links.control(peer, reply)
        if up:
            # register everything this worker has that the peer now owns (``reset``:
            # it may have restarted, or missed an unfollow), and ask the peer to do the
            # same here: when this link was down this worker forgot the peer's follows
            self._refollow(peer)
            if self.links is not None:
                self.links.control(peer, {"op": "refollow"})
        self._presence_here()

    def _refollow(self, peer: str) -> None:
        """Send ``peer`` everything this worker follows that ``peer`` owns (a reset)."""
        names = [n for n in self.hub.channels if self.placement.owner(n) == peer]
        self._run(self._follow_at(peer, names, reset=True))

    def _on_refollow(self, peer: str, msg: dict[str, Any]) -> None:
        """``peer``'s link to this worker came (back) up, and it forgot what this worker
        follows there (a link that flapped one way only, under load): send it again."""
        self._refollow(peer)
        self._presence_here()

    def _apply_view(self) -> None:
        before = self.placement.nodes
        if not self.placement.update(self.view):
            return
        changes = moved(list(self.hub.channels), before, self.placement.nodes)
        self._ownership(changes)
        if changes:
            # durable channels that moved here: what the old owner stored and did not
            # send on comes from the store now, not with the channel's next message
            self.resync()
        # channels that moved to another worker: follow them there, then catch up
        regroup: dict[str, list[str]] = {}
        for name, _old, new in changes:
            if new is not None and new != self.me:
                regroup.setdefault(new, []).append(name)
        for owner, names in regroup.items():
            if self.links is not None and self.links.is_up(owner):
                self._run(self._follow_at(owner, names, reset=False))

    async def _follow_at(self, owner: str, names: list[str], reset: bool) -> None:
        """Register ``names`` at ``owner`` and wait for its acknowledgement; then catch
        them up (messages published before it had this worker as a follower). Not
        acknowledged in time: sent again in the background, caught up when it is."""
        if await self._follow(owner, names, reset):
            await self._catch_up(owner, names)

    async def _follow(self, owner: str, names: list[str], reset: bool = False) -> bool:
        """Send ``owner`` a follow of ``names``; True when it acknowledged it within
        FOLLOW_TIMEOUT.

        False otherwise; then, while the link is up, the follow is handed to
        :meth:`_retry_follows`, which sends it again until it is acknowledged and then
        catches the channels up (:meth:`_catch_up`): the caller goes on as before (a
        subscribe is not held longer), and what is published meanwhile is not lost
        for good, as it was when a follow lost under load was never sent again.
        """
        links = self.links
        if links is None:
            return False
        ref = next(self._refs)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._follow_waits[ref] = (owner, names, fut)
        if not links.control(owner, {"op": "follow", "ref": ref, "ch": names, "reset": reset}):
            del self._follow_waits[ref]
            return False
        self.follows_sent += 1
        try:
            await asyncio.wait_for(fut, FOLLOW_TIMEOUT)
        except asyncio.TimeoutError:
            log.debug(
                "worker %s: no answer from %s to follow %d channels", self.me, owner, len(names)
            )
            if not self._retry_later(owner, names, ref):
                self._follow_waits.pop(ref, None)
            return False
        except BaseException:
            self._follow_waits.pop(ref, None)
            raise
        return True  # (_on_followed removed it)

    def _retry_later(self, owner: str, names: Iterable[str], ref: int) -> bool:
        """Hand a follow ``owner`` did not acknowledge in time to the background retry
        (started if it is not running); False when the link to it is down: refollow on
        link up sends everything again then."""
        links = self.links
        if links is None or not links.is_up(owner):
            return False
        unacked = self._unacked.get(owner)
        if unacked is None:
            unacked = self._unacked[owner] = _Unacked()
            self._run(self._retry_follows(owner, unacked))
        unacked.names.update(names)
        unacked.refs.append(ref)
        return True

    async def _retry_follows(self, owner: str, unacked: _Unacked) -> None:
        """Send ``owner`` the follows it did not acknowledge, one follow per round, until
        every one is acknowledged, then catch them up (:meth:`_on_followed`).

        Each round waits for the answer FOLLOW_TIMEOUT at first, twice as long each
        time it does not come, up to FOLLOW_RETRY_MAX. A channel leaves the rounds when
        this worker no longer holds it (dropped) or ``owner`` no longer owns it (the
        view changed: the new owner is followed by :meth:`_apply_view`); every round
        ends when the link to ``owner`` goes down (refollow on link up sends all). The
        follows are not ``reset``: a reset sent late could erase a follow the owner
        took in between (the owner's follow is a set add: sending it again is harmless).
        """
        loop = asyncio.get_running_loop()
        wait = FOLLOW_TIMEOUT
        rounds = 0
        try:
            while self._unacked.get(owner) is unacked:
                hub, placement = self.hub, self.placement
                unacked.names = {
                    n for n in unacked.names if n in hub.channels and placement.owner(n) == owner
                }
                names = sorted(unacked.names)
                links = self.links
                if not names or links is None or not links.is_up(owner):
                    return
                ref = next(self._refs)
                self._follow_waits[ref] = (owner, names, None)
                unacked.refs.append(ref)
                msg = {"op": "follow", "ref": ref, "ch": names, "reset": False}
                if not links.control(owner, msg):
                    return
                rounds += 1
                self.follows_sent += 1
                self.follow_retries += 1
                log.warning(
                    "worker %s: %s did not acknowledge following %d channels: sent again "
                    "(round %d, waiting %gs)",
                    self.me,
                    owner,
                    len(names),
                    rounds,
                    wait,
                )
                # until this round's channels are acknowledged (by this follow or an
                # earlier one answered late), or the round's time is up
                deadline = loop.time() + wait
                while (
                    self._unacked.get(owner) is unacked
                    and not unacked.names.isdisjoint(names)
                    and (left := deadline - loop.time()) > 0
                ):
                    unacked.wake.clear()
                    try:
                        await asyncio.wait_for(unacked.wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
                if unacked.names.isdisjoint(names):
                    wait = FOLLOW_TIMEOUT  # answered: channels added meanwhile start afresh
                else:
                    wait = min(wait * 2, FOLLOW_RETRY_MAX)
        finally:
            if self._unacked.get(owner) is unacked:
                del self._unacked[owner]
            for r in unacked.refs:
                self._follow_waits.pop(r, None)

    async def _catch_up(self, owner: str, names: Iterable[str]) -> None:
        """``names`` were just registered at ``owner`` (after a view change, a link that
        came back, or a follow acknowledged late): deliver here what it published
        before, which it did not send to this worker.

        Durable channels from the store (:meth:`_resync`); one whose state a subscribe
        is still reading once it is read (:meth:`loaded`). Memory channels with
        subscribers from the owner's history ring (:meth:`_fill_now_from_owner`): their
        next message would show the gap, but a quiet channel would hold what was missed
        back until then, without a sign.
        """
        hub = self.hub
        durable: list[str] = []
        memory: list[Channel] = []
        for name in names:
            ch = hub.channels.get(name)
            if ch is None or self.placement.owner(name) != owner:
                continue  # dropped, or moved again (its new owner's follow catches up)
            if ch.durable:
                if ch.loaded:
                    durable.append(name)
                else:
                    self._resync_loaded.add(name)
            elif ch.loaded and len(ch.subs):
                memory.append(ch)
        if durable and hub.store is not None:
            await self._resync(durable)
        if memory:
            await asyncio.gather(*(self._fill_now_from_owner(ch) for ch in memory))

    async def _fill_now_from_owner(self, ch: Channel) -> None:
        """A memory channel's messages after its offset here, asked of its owner (its
        history ring), delivered before the DELIVERs that come meanwhile (held).

        What the ring no longer has stays a jump in offsets (subscribers see a Gap);
        an owner in another epoch (the channel moved, its history was lost) makes the
        subscribers resubscribe, told the old epoch may be incomplete.
        """
        name = ch.name
        if name in self._filling:
            return  # a gap is being filled from the owner already: the same question
        self._filling[name] = []
        try:
            reply = await self.state(name, Since(ch.offset, ch.epoch, False))
            epoch = reply.get("epoch")
            if epoch != ch.epoch:
                self.hub.adopt(ch, str(epoch), int(reply.get("offset", 0)))
            else:
                for o, d in reply.get("messages", ()):
                    if int(o) > ch.offset:
                        self.hub.deliver_routed(ch, int(o), str(d).encode())
        except HubError as e:
            log.warning("worker %s: could not catch %r up from its owner: %s", self.me, name, e)
        finally:
            self._release_held(name)

    def loaded(self, ch: Channel) -> None:
        """Hub: a durable channel's state was read from the store. If it was registered
        at its owner late (after the subscribe went on without the acknowledgement),
        messages published between that state and the registration came nowhere:
        catch it up from the store."""
        super().loaded(ch)
        if ch.name in self._resync_loaded:
            self._resync_loaded.discard(ch.name)
            if self.hub.store is not None:
                self._run(self._resync([ch.name]))

    # ------------------------------------------------------------------ router hooks

    async def follow(self, channel: str) -> None:
        """Hub: a subscribe here is about to read ``channel``'s state (this worker does
        not own it): register at the owner first. Not acknowledged within FOLLOW_TIMEOUT:
        the subscribe goes on as before, the follow is sent again in the background and
        what it missed meanwhile is caught up once it is acknowledged (:meth:`_follow`)."""
        owner = self.placement.owner(channel)
        if owner is not None and owner != self.me:
            await self._follow(owner, [channel])

    def dropped(self, channel: str) -> None:
        """Hub: ``channel`` is gone from this worker: the owner may stop sending it."""
        self._resync_loaded.discard(channel)
        owner = self.placement.owner(channel)
        if owner is not None and owner != self.me and self.links is not None:
            self.links.control(owner, {"op": "unfollow", "ch": [channel]})

    # ------------------------------------------------------------------ owner side

    def _on_follow(self, peer: str, msg: dict[str, Any]) -> None:
        names = msg.get("ch")
        if not isinstance(names, list):
            return
        followers = self.placement.followers
        if msg.get("reset"):
            for fs in followers.values():
                fs.discard(peer)
        for name in names:
            if isinstance(name, str):
                followers.setdefault(name, set()).add(peer)
        self.follows_received += 1
        reply = {"op": "followed", "ref": msg.get("ref")}
        if self.links is not None and not self.links.control(peer, reply):
            # this worker's link to ``peer`` is not up yet (both just started): the
            # acknowledgement goes when it is
            self._unsent.setdefault(peer, []).append(reply)

    def _on_followed(self, peer: str, msg: dict[str, Any]) -> None:
        """``peer`` acknowledged a follow: wake its caller; channels whose follow is being
        sent again (:meth:`_retry_follows`) are registered now, and caught up, since
        messages published before were not sent here."""
        ref = msg.get("ref")
        entry = self._follow_waits.pop(ref, None) if isinstance(ref, int) else None
        if entry is None:
            return
        owner, names, fut = entry
        if fut is not None and not fut.done():
            fut.set_result(None)
        unacked = self._unacked.get(owner)
        if unacked is None:
            return
        acked = unacked.names.intersection(names)
        if acked:
            unacked.names -= acked
            unacked.wake.set()
            self._run(self._catch_up(owner, sorted(acked)))

    def _on_unfollow(self, peer: str, msg: dict[str, Any]) -> None:
        followers = self.placement.followers
        for name in msg.get("ch") or ():
            fs = followers.get(name)
            if fs is not None:
                fs.discard(peer)
                if not fs:
                    del followers[name]

    def _answer_state(self, peer: str, msg: dict[str, Any]) -> None:
        """A memory channel's state asked by a subscribe on ``peer``: it follows it from
        now on (registered before the answer is sent: nothing published after the state
        is missed)."""
        name = msg.get("ch")
        if isinstance(name, str):
            self.placement.followers.setdefault(name, set()).add(peer)
        super()._answer_state(peer, msg)

    # ------------------------------------------------------------------ presence

    def _local_presence(self, msg: dict[str, Any]) -> dict[str, Any]:
        ch = self.hub.channels.get(str(msg.get("ch")))
        if ch is None:
            return {"count": 0, "users": []}
        return {"count": len(ch.subs), "users": list(ch.users)}

    async def presence(self, name: str) -> dict[str, Any]:
        """The channel's presence over every worker: subscriber counts summed, users
        merged (a user connected to two workers is listed once)."""
        out = self.hub.presence(name)
        answers = await self.ask_all("presence", {"ch": name})
        count = int(out.get("count", 0))
        users: dict[str, None] = dict.fromkeys(out.get("users", []))
        for a in answers.values():
            v = a.get("value")
            if not isinstance(v, dict):
                continue
            count += int(v.get("count", 0))
            for u in v.get("users", ()):
                users.setdefault(str(u), None)
        out["count"] = count
        if "users" in out:
            out["users"] = list(users)[: self.config.presence_max]
        return out

    # join/leave over the workers: the owner keeps, per channel and user, the workers
    # where the user has a connection in the channel; a join is announced when the first
    # worker gets one, a leave when the last one loses it (or dies)

    def announce(self, ch: Channel, op: str, user: str) -> bool:
        """Hub: ``user``'s first (join) or last (leave) connection here in ``ch``. False:
        the owner cannot be told, announce it here only."""
        owner = self.placement.owner(ch.name)
        if owner is None:
            return False
        if owner == self.me:
            self._presence_change(self.me, ch.name, op, user)
            return True
        links = self.links
        msg = {"op": "pres", "ch": ch.name, "ev": op, "user": user}
        return links is not None and links.control(owner, msg)

    def _on_pres(self, peer: str, msg: dict[str, Any]) -> None:
        name, op, user = msg.get("ch"), msg.get("ev"), msg.get("user")
        if isinstance(name, str) and op in ("join", "leave") and isinstance(user, str):
            self._presence_change(peer, name, str(op), user, bool(msg.get("quiet")))

    def _presence_here(self) -> None:
        """The view changed: tell each channel's owner (maybe a new one) who is in it
        here, quietly (they joined before; only the owner's bookkeeping was missing)."""
        links = self.links
        for name, ch in self.hub.channels.items():
            if not ch.users or not ch.ns.join_leave:
                continue
            owner = self.placement.owner(name)
            for user in ch.users:
                if owner == self.me:
                    self._presence_change(self.me, name, "join", user, quiet=True)
                elif owner is not None and links is not None:
                    msg = {"op": "pres", "ch": name, "ev": "join", "user": user, "quiet": True}
                    links.control(owner, msg)

    def _presence_change(
        self, worker: str, name: str, op: str, user: str, quiet: bool = False
    ) -> None:
        users = self.present.setdefault(name, {})
        where = users.setdefault(user, set())
        if op == "join":
            first = not where
            where.add(worker)
            if first and not quiet:
                self._emit(name, op, user)
            return
        if worker not in where:
            return
        where.discard(worker)
        if not where:
            del users[user]
            if not users:
                del self.present[name]
            self._emit(name, op, user)

    def _emit(self, name: str, op: str, user: str) -> None:
        """A node-wide join/leave: announced here and by every follower."""
        events = self.hub.events
        if events is not None:
            events.presence(name, op, user)  # decided here, by the channel's owner
        self._on_pres_ev(self.me, {"ch": name, "ev": op, "user": user})
        links = self.links
        if links is None:
            return
        msg = {"op": "pres_ev", "ch": name, "ev": op, "user": user}
        for peer in self.placement.followers.get(name, ()):
            links.control(peer, msg)

    def _on_pres_ev(self, peer: str, msg: dict[str, Any]) -> None:
        ch = self.hub.channels.get(str(msg.get("ch")))
        op, user = str(msg.get("ev")), str(msg.get("user"))
        if ch is not None and ch.ns.join_leave:
            # a join: the joining connection is here already, and must not hear it
            self.hub.announce_here(ch, op, user, skip=user if op == "join" else None)

    def _presence_gone(self, worker: str) -> None:
        """A worker left the view: its users left every channel they were in there."""
        for name in list(self.present):
            for user, where in list(self.present.get(name, {}).items()):
                if worker in where:
                    self._presence_change(worker, name, "leave", user)

    # ------------------------------------------------------------------ reporting

    def metric_families(self) -> Iterator[Metric]:
        """For /metrics (fastim/api/metrics.py reads it through the node's cluster)."""
        yield CounterMetricFamily(
            "fastim_worker_follows_sent",
            "follows sent to the owner worker of a channel (retries included)",
            value=self.follows_sent,
        )
        yield CounterMetricFamily(
            "fastim_worker_follows_received",
            "follows received from other workers, as a channel's owner",
            value=self.follows_received,
        )
        yield CounterMetricFamily(
            "fastim_worker_follow_retries",
            "follows sent again: the owner did not acknowledge within the follow timeout "
            "(3 s) or the last retry's wait (lost, or the owner stalled)",
            value=self.follow_retries,
        )

    def degraded(self) -> str | None:
        links = self.links
        if links is None:
            return None
        down = sorted(p for p in links.links if not links.is_up(p))
        if not down:
            return None
        return f"workers {', '.join(down)} not reachable (being replaced)"

    def summary(self) -> str:
        up, total = self.links_up()
        return f"worker {self.me} of {self.role.count}, {up}/{total} links up"

    def moved_here(self, ch: Channel) -> bool:
        return self.placement.is_owner(ch.name, self.me)
