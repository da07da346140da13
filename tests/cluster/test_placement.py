"""Placement: rendezvous ownership and the k-ary broadcast tree, as properties."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastim.cluster import placement as P

node_ids = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12
)
node_sets = st.sets(node_ids, min_size=1, max_size=40)
channels = st.text(min_size=1, max_size=40)
ks = st.integers(min_value=2, max_value=9)


def test_score_is_stable_across_processes() -> None:
    # pinned: any change of the hash moves every channel in every running cluster
    assert P.score("news", "node-1") == int.from_bytes(
        __import__("hashlib").blake2b(b"news\0node-1", digest_size=8).digest(), "big"
    )
    assert (
        P.owner("news", ["node-1", "node-2", "node-3"])
        == P.ranking("news", ["node-3", "node-2", "node-1"])[0]
    )


@given(channels, node_sets)
def test_owner_is_the_first_of_the_ranking_and_order_free(ch: str, nodes: set[str]) -> None:
    order = P.ranking(ch, nodes)
    assert sorted(order) == sorted(nodes)
    assert P.owner(ch, nodes) == order[0]
    assert P.ranking(ch, sorted(nodes, reverse=True)) == order
    assert P.owner(ch, []) is None


@given(st.lists(channels, min_size=1, max_size=50, unique=True), node_sets, node_ids)
def test_a_join_moves_only_channels_to_the_new_node(
    chans: list[str], nodes: set[str], new: str
) -> None:
    if new in nodes:
        return
    for ch, old, now in P.moved(chans, nodes, nodes | {new}):
        assert now == new, (ch, old, now)
    # and a channel the new node does not win keeps its owner
    for ch in chans:
        if P.owner(ch, nodes | {new}) != new:
            assert P.owner(ch, nodes) == P.owner(ch, nodes | {new})


@given(st.lists(channels, min_size=1, max_size=50, unique=True), node_sets)
def test_a_leave_moves_only_the_leavers_channels_to_their_runner_up(
    chans: list[str], nodes: set[str]
) -> None:
    if len(nodes) < 2:
        return
    gone = sorted(nodes)[0]
    rest = nodes - {gone}
    for ch, old, now in P.moved(chans, nodes, rest):
        assert old == gone
        assert now == P.ranking(ch, nodes)[1]


@given(channels, node_sets, ks)
def test_the_tree_spans_every_node_once_within_the_depth_bound(
    ch: str, nodes: set[str], k: int
) -> None:
    t = P.tree(ch, nodes, k)
    root = P.owner(ch, nodes)
    assert root is not None
    assert set(t) == nodes
    reached = [c for kids in t.values() for c in kids]
    assert len(reached) == len(set(reached)) == len(nodes) - 1  # everyone once, but the root
    assert root not in reached
    # walk down from the root: depth bound, and parent() agrees with children()
    depth = {root: 0}
    todo = [root]
    while todo:
        n = todo.pop()
        kids = P.children(ch, n, nodes, k)
        assert kids == t[n] and len(kids) <= k
        for c in kids:
            assert P.parent(ch, c, nodes, k) == n
            depth[c] = depth[n] + 1
            todo.append(c)
    assert set(depth) == nodes
    assert max(depth.values()) <= P.max_depth(len(nodes), k)
    assert P.parent(ch, root, nodes, k) is None


@given(channels, node_sets, ks)
def test_placement_cache_agrees_with_the_functions(ch: str, nodes: set[str], k: int) -> None:
    p = P.Placement(nodes, k)
    assert p.owner(ch) == P.owner(ch, nodes)
    for n in nodes:
        assert p.children(ch, n) == P.children(ch, n, nodes, k)
        assert p.parent(ch, n) == P.parent(ch, n, nodes, k)
        assert p.is_owner(ch, n) == (n == P.owner(ch, nodes))
    assert p.children(ch, "not-a-member") == [] and p.parent(ch, "not-a-member") is None


def test_placement_update_reports_changes_and_drops_the_cache() -> None:
    p = P.Placement({"a": 1, "b": 2}, k=2)
    g = p.generation
    assert not p.update(["b", "a"]) and p.generation == g
    before = p.owner("x")
    assert p.update(["a", "b", "c"]) and p.generation == g + 1
    assert p.owner("x") == P.owner("x", ["a", "b", "c"])
    assert before in ("a", "b")
    with pytest.raises(ValueError):
        P.Placement(["a"], k=1)


@pytest.mark.parametrize(
    ("n", "k", "bound"),
    [(1, 2, 0), (2, 2, 1), (3, 2, 2), (4, 2, 2), (9, 3, 2), (10, 3, 3), (100, 8, 3), (65, 8, 3)],
)
def test_depth_bound_values(n: int, k: int, bound: int) -> None:
    assert P.max_depth(n, k) == bound
    # the heap's actual depth never exceeds it
    assert P.depth(n - 1, k) <= bound


@settings(deadline=None, max_examples=5)
@given(st.integers(min_value=3, max_value=12), st.sampled_from([2, 4, 8]))
def test_load_spreads_over_channels(n: int, k: int) -> None:
    """Over many channels, each node owns ~1/n of them and forwards a fair share of the
    tree edges (egress): the per-channel order spreads interior positions."""
    nodes = [f"node-{i}" for i in range(n)]
    chans = [f"room:{i}" for i in range(4000)]
    owners: Counter[str] = Counter()
    egress: Counter[str] = Counter()
    p = P.Placement(nodes, k)
    for ch in chans:
        owners[p.owner(ch) or ""] += 1
        for node in nodes:
            egress[node] += len(p.children(ch, node))
    mean = len(chans) / n
    # binomial: sd = sqrt(N p (1-p)) < sqrt(mean); allow 5 sd
    assert max(abs(c - mean) for c in owners.values()) < 5 * mean**0.5 + 1, owners
    assert set(owners) == set(nodes)
    e = list(egress.values())
    assert sum(e) == len(chans) * (n - 1)  # every node but the root receives each message once
    # a node's egress varies less than +-25% around the mean (flat fan-out from the
    # owner would give the owner n-1 and every other node 0 per channel)
    assert max(e) < 1.25 * statistics.mean(e) and min(e) > 0.75 * statistics.mean(e), egress


def test_moving_one_node_keeps_most_tree_edges() -> None:
    """A join changes few parent links: the tree is a function of a stable ranking."""
    nodes = [f"n{i}" for i in range(20)]
    chans = [f"c{i}" for i in range(500)]
    same = total = 0
    for ch in chans:
        before = {n: P.parent(ch, n, nodes, 4) for n in nodes}
        after = {n: P.parent(ch, n, [*nodes, "new"], 4) for n in nodes}
        same += sum(before[n] == after[n] for n in nodes)
        total += len(nodes)
    assert same / total > 0.5
