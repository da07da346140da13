"""Where a channel lives in a cluster: its owner, and the tree its messages travel down.

Everything here is a pure function of a channel name and the set of live node ids, so
every node computes the same answer from the same routing table without asking anyone.

**Owner: rendezvous (highest random weight) hashing.** Each (channel, node) pair gets a
score, ``blake2b(channel NUL node)``; the node with the highest score owns the channel.
When a node joins, it takes exactly the channels for which it now scores highest; when a
node leaves, only its channels move, each to its runner-up. No other channel changes
owner, so a membership change disturbs as little channel state (offsets, history
caches, subscriptions upstream) as possible. The hash is keyed on bytes, not Python's
``hash``, so it is the same in every process and every Python version.

**Broadcast tree: the ranking laid out as a k-ary heap.** The live nodes sorted by their
score for the channel (owner first) are placed in a k-ary heap: position ``i`` has
children ``k*i+1 .. k*i+k`` and parent ``(i-1)//k``. A message leaves the owner once per
child, not once per node, and reaches every node within ``ceil(log_k(n))`` hops. Since
the order is a different pseudo-random permutation per channel, each node is an
interior (forwarding) node of about the same share of channels: egress spreads across
the cluster instead of landing on the owners. The ranking is also stable: a join or a
leave shifts positions only behind the node that came or went, so most parent/child
edges of most channels survive a membership change.

:class:`Placement` caches rankings per channel for the hub's hot path (a publish asks
"who owns this?" and "whom do I forward to?"); the module functions compute afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "Placement",
    "children",
    "depth",
    "max_depth",
    "moved",
    "owner",
    "parent",
    "ranking",
    "score",
    "tree",
]


def _digest(channel: bytes, node: bytes) -> bytes:
    return hashlib.blake2b(channel + b"\0" + node, digest_size=8).digest()


def score(channel: str, node_id: str) -> int:
    """The rendezvous score of ``node_id`` for ``channel`` (a 64-bit integer)."""
    return int.from_bytes(_digest(channel.encode(), node_id.encode()), "big")


def ranking(channel: str, nodes: Iterable[str]) -> list[str]:
    """``nodes`` ordered by descending score for ``channel``: the owner first.

    Ties (a 64-bit collision) are broken by node id so every node agrees. Duplicates in
    ``nodes`` are ignored.
    """
    ch = channel.encode()
    scored = sorted(
        ((_digest(ch, n.encode()), n) for n in set(nodes)),
        key=lambda sn: (sn[0], sn[1]),
        reverse=True,
    )
    return [n for _, n in scored]


def owner(channel: str, nodes: Iterable[str]) -> str | None:
    """The node that owns ``channel`` among ``nodes`` (None when there is none)."""
    ch = channel.encode()
    best: tuple[bytes, str] | None = None
    for n in set(nodes):
        cand = (_digest(ch, n.encode()), n)
        if best is None or cand > best:
            best = cand
    return None if best is None else best[1]


def _check_k(k: int) -> None:
    if k < 2:
        raise ValueError(f"tree fan-out k must be >= 2, got {k}")


def _children_at(order: Sequence[str], i: int, k: int) -> list[str]:
    first = k * i + 1
    return list(order[first : first + k])


def children(channel: str, node_id: str, nodes: Iterable[str], k: int) -> list[str]:
    """The nodes ``node_id`` forwards ``channel``'s messages to (empty for a leaf).

    Empty too when ``node_id`` is not among ``nodes``: a node that is not in the tree
    forwards nothing.
    """
    _check_k(k)
    order = ranking(channel, nodes)
    try:
        i = order.index(node_id)
    except ValueError:
        return []
    return _children_at(order, i, k)


def parent(channel: str, node_id: str, nodes: Iterable[str], k: int) -> str | None:
    """The node ``node_id`` receives ``channel``'s messages from (None for the owner,
    or for a node not among ``nodes``)."""
    _check_k(k)
    order = ranking(channel, nodes)
    try:
        i = order.index(node_id)
    except ValueError:
        return None
    return None if i == 0 else order[(i - 1) // k]


def tree(channel: str, nodes: Iterable[str], k: int) -> dict[str, list[str]]:
    """The whole broadcast tree of ``channel``: node → its children (every node a key)."""
    _check_k(k)
    order = ranking(channel, nodes)
    return {n: _children_at(order, i, k) for i, n in enumerate(order)}


def depth(position: int, k: int) -> int:
    """Hops from the root to heap position ``position`` of a k-ary tree."""
    _check_k(k)
    d = 0
    while position > 0:
        position = (position - 1) // k
        d += 1
    return d


def max_depth(n: int, k: int) -> int:
    """The promised bound on the tree's depth for ``n`` nodes: ``ceil(log_k(n))``."""
    _check_k(k)
    if n <= 1:
        return 0
    # integer arithmetic: math.log is inexact at exact powers of k
    d, reach = 0, 1
    while reach < n:
        reach *= k
        d += 1
    return d


def moved(
    channels: Iterable[str], before: Iterable[str], after: Iterable[str]
) -> list[tuple[str, str | None, str | None]]:
    """The channels whose owner differs between two node sets: (channel, old, new).

    What the hub calls on a membership change to learn which of its channels it gained
    or lost (rendezvous hashing keeps that list to the joining or leaving node's share).
    """
    b, a = list(set(before)), list(set(after))
    out = []
    for ch in channels:
        old, new = owner(ch, b), owner(ch, a)
        if old != new:
            out.append((ch, old, new))
    return out


class Placement:
    """Owner and tree lookups over one set of live nodes, cached per channel.

    The hub keeps one, calls :meth:`update` from the membership change callback, and asks
    :meth:`owner` / :meth:`children` per publish. A ranking costs one 8-byte blake2b per
    live node (about 0.5 µs each); the cache holds up to ``cache_size`` channels and is
    dropped whole on a membership change (changes are rare, lookups are not).
    """

    def __init__(self, nodes: Iterable[str] = (), k: int = 8, cache_size: int = 100_000) -> None:
        _check_k(k)
        self.k = k
        self.cache_size = cache_size
        self._nodes: tuple[str, ...] = ()
        self._cache: dict[str, list[str]] = {}
        #: bumped by every update that changed the node set (a cheap "has it changed?")
        self.generation = 0
        self.update(nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The live node ids, sorted."""
        return self._nodes

    def update(self, nodes: Iterable[str] | Mapping[str, object]) -> bool:
        """Replace the node set (a mapping's keys are taken); True if it changed."""
        new = tuple(sorted(set(nodes)))
        if new == self._nodes:
            return False
        self._nodes = new
        self._cache.clear()
        self.generation += 1
        return True

    def ranking(self, channel: str) -> list[str]:
        """The channel's nodes, owner first (shared list: do not modify)."""
        order = self._cache.get(channel)
        if order is None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            order = self._cache[channel] = ranking(channel, self._nodes)
        return order

    def owner(self, channel: str) -> str | None:
        order = self.ranking(channel)
        return order[0] if order else None

    def is_owner(self, channel: str, node_id: str) -> bool:
        order = self.ranking(channel)
        return bool(order) and order[0] == node_id

    def children(self, channel: str, node_id: str) -> list[str]:
        order = self.ranking(channel)
        try:
            i = order.index(node_id)
        except ValueError:
            return []
        return _children_at(order, i, self.k)

    def parent(self, channel: str, node_id: str) -> str | None:
        order = self.ranking(channel)
        try:
            i = order.index(node_id)
        except ValueError:
            return None
        return None if i == 0 else order[(i - 1) // self.k]
