"""Direct messages across nodes: the glue between the Postman, user routes and links.

On one node the :class:`~fastim.delivery.Postman` stores a direct message in the
recipient's inbox, answers the sender and delivers it to the recipient's connections
there. In a cluster the store is shared (Redis: sequences are assigned atomically there,
whichever node stores), so the only missing piece is reaching the recipient's
connections on the *other* nodes. :class:`DmRouter` is that piece:

* the Postman tells it when a user's first connection arrives on this node and when the
  last one leaves (``present`` / ``absent``); it keeps the route
  ``<prefix>/<cluster>/users/<user>/<node_id>`` in etcd through :class:`UserRoutes`
  (batched, bound to the node's lease);
* after a message is stored here, ``relay`` sends it as a DM link frame (type 0x48, one
  batched frame per peer per tick) to every other node the routes name for the recipient;
* a DM frame from a peer goes to :meth:`Postman.deliver_remote`, which delivers to the
  local connections and retries them until acknowledged.

What makes it reliable is not the link (links are at most once) but the inbox: a node
re-reads the inbox state before each retry and when a sequence seems to be missing, and
reads the inbox of a user whose route is not in etcd yet (see ``fastim/delivery/rechecks.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from ..delivery import Postman
from .frames import DmEntry
from .link import Links
from .users import UserRoutes

__all__ = ["DmRouter"]

log = logging.getLogger("fastim.cluster")


class DmRouter:
    """Routes direct messages between this node's Postman and the other nodes.

    Create it once the Postman, the user routes and the links exist; it installs itself
    as ``postman.relay`` and as the routes' ``on_registered`` callback. Route link
    frames of type DM to :meth:`on_dm`.
    """

    def __init__(self, node_id: str, postman: Postman, routes: UserRoutes, links: Links) -> None:
        if routes.node_id != node_id:
            raise ValueError(f"routes of node {routes.node_id!r} given to node {node_id!r}")
        self.node_id = node_id
        self.postman = postman
        self.routes = routes
        self.links = links
        #: counters: messages sent to peers, sends refused (link down), frames entries in
        self.relayed = 0
        self.relay_dropped = 0
        self.received = 0
        self.resyncs = 0
        postman.relay = self
        routes.on_registered = postman.routed

    async def start(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Start the user routes (after the membership started: they use its lease).

        ``wait=False``: do not wait for the first listing (the node has joined already;
        until the map is current, ``relay`` sends to every peer)."""
        await self.routes.start(timeout, wait)

    async def stop(self) -> None:
        """Stop writing and following routes (before the membership stops: its lease
        revocation then removes this node's routes everywhere at once).

        The Postman keeps relaying: a message stored here during the drain still goes
        out through the links until they close (to every peer, as the route map is no
        longer followed)."""
        await self.routes.stop()

    # the Postman's Relay protocol
    def present(self, user: str) -> None:
        self.routes.add(user)

    def absent(self, user: str) -> None:
        self.routes.discard(user)

    def registered(self, user: str) -> bool:
        return self.routes.is_registered(user)

    def relay(self, user: str, seq: int, event: bytes) -> None:
        """Send a message stored here to every other node holding connections of ``user``.

        A node whose link is down misses it: its own inbox checks (before retries, on a
        gap) find it in the store, and a client reconnecting anywhere gets it replayed.
        """
        routes = self.routes
        # etcd out of reach: the map may miss users who connected elsewhere since;
        # every peer gets the message (a node without the user drops it)
        nodes = routes.routes.get(user, ()) if routes.healthy else self.links.links
        for node in nodes:
            if node == self.node_id:
                continue
            if self.links.dm(node, user, seq, event):
                self.relayed += 1
            else:
                self.relay_dropped += 1

    # from the LinkServer's handler
    def on_dm(self, peer: str, items: list[DmEntry]) -> None:
        """A DM frame from ``peer``: deliver each message to the local connections."""
        self.received += len(items)
        deliver = self.postman.deliver_remote
        for item in items:
            deliver(item.user, item.seq, item.event)

    def on_peer(self, peer: str, connected: bool) -> None:
        """A peer's link into this node came up: DM frames it sent while the link was
        down (or that were queued when it broke) are lost, so every local user's inbox
        is re-checked (one ``inbox_state`` each; a read only where something is missing)."""
        if connected:
            self.resyncs += 1
            self.postman.recheck_all(0.05)

    def status(self) -> dict[str, Any]:
        p = self.postman
        return {
            "relayed": self.relayed,
            "relay_dropped": self.relay_dropped,
            "received": self.received,
            "resyncs": self.resyncs,
            "remote_dups": p.remote_dups,
            "rechecks": p.rechecks,
            "filled": p.filled,
            "routes": self.routes.status(),
        }
