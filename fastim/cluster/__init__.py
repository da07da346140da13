"""The foundations of a fastim cluster: membership, placement, node links.

- :mod:`fastim.cluster.membership`: this node's registration in etcd under a lease it
  keeps alive, and the routing table of live nodes, kept by a watch that resumes after
  etcd hiccups (needs the ``cluster`` extra: ``aetcd``). Its session with etcd, and
  that of the user routes (:mod:`fastim.cluster.users`), is an
  :class:`~fastim.cluster.etcd.EtcdSession` (:mod:`fastim.cluster.etcd`).
- :mod:`fastim.cluster.placement`: which node owns a channel (rendezvous hashing) and the
  k-ary broadcast tree of a channel: pure functions of the channel and the live nodes.
- :mod:`fastim.cluster.link` and :mod:`fastim.cluster.frames`: persistent node-to-node
  connections carrying batched fastim frames, with heartbeats, reconnect and TLS (the
  accepting end in ``link_server``, the connection of either end in ``link_conn``).

- :mod:`fastim.cluster.runtime`: :class:`~fastim.cluster.runtime.Cluster`, what
  ``Node.start`` creates when ``etcd_endpoints`` is set: the three above wired to the hub
  (publish forwarding to the owner, tree delivery, ownership moves). See docs/cluster.md.
"""

from __future__ import annotations


class ClusterError(Exception):
    """The cluster cannot be joined or used (etcd unreachable at start, node id taken)."""


class NodeIdTaken(ClusterError):
    """Another live node holds this node id's registration (its lease is being kept alive)."""
