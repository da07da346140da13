"""Egress per node of a large fastim cluster: a calculation over the real placement code.

What it answers: with 100 nodes × 10,000 subscribers each, how much does each node send
to the other nodes (node links) and to its clients, when a channel's messages go flat
from the owner to every node, or down the k-ary broadcast tree (k = 2, 4, 8, 16), with or
without pruning the parts of the tree that have no subscribers? And how many hops does a
message take? Nothing is sent: it is a calculation, but the owner and the trees are the
ones a cluster would use, from ``fastim.cluster.placement.ranking`` / ``tree`` over
``--nodes`` node ids, so the spread of owners and interior positions is the real one.

The model (every number is a flag):

* **Nodes**: ``--nodes`` (100) ids ``node-000``.. Each has ``--subs-per-node`` (10,000)
  client connections, placed on nodes uniformly at random (a load balancer).
* **Workload "hot"**: one channel published at ``--hot-rate`` (1,000) msg/s, with
  ``--hot-per-node`` (1,000) subscribers on *every* node (a broadcast: 100,000
  subscribers).
* **Workload "mix"**: ``--channels`` (10,000) channels, each published at
  ``--mix-rate`` (1) msg/s; each client subscribes to one of them, chosen by Zipf
  popularity (exponent ``--zipf``, 1.0): channel of rank r has about
  ``M r^-s / H`` subscribers (M = all clients = 1,000,000; the top one ~100,000, rank
  1,000 ~100, the last ~10), each on a uniformly random node.
* **"all"**: both at once (per-node figures add up; writes do not, see below).
* **Publishers** sit on a uniformly random node: a publish on a node that is not the
  owner is one FORWARD to the owner and one FORWARD_ACK back (counted as link egress of
  the publisher's node and of the owner, in every scheme).
* **Schemes** (what the owner does with a numbered message):
  ``flat``: a DELIVER to every other node; ``flat-pruned``: only to nodes with
  subscribers; ``tree-k``: down the k-ary tree over all live nodes (each node sends
  to its ≤ k children); ``tree-k-pruned``: the same tree, but a node sends only to the
  children whose subtree holds a subscriber (relay-only nodes stay in it);
  ``interest-k``: the tree over the owner and the nodes with subscribers only (what
  ``tree(channel, owner + interested nodes, k)`` gives: the owner is the top of the
  ranking in any subset that holds it).
* **Link messages** are DELIVER entries (one per message per link); **link bytes** are
  entry sizes from ``fastim.cluster.frames`` (``pack_deliver`` of a ``--size``-byte
  message on a typical channel name, ``pack_forward``, ``pack_forward_ack``) plus the
  frame and batch headers per write.
* **Writes**: links batch per loop tick (docs/cluster.md: one frame, one write per link
  per tick). With ``--tick-hz`` (1,000) ticks/s and Poisson arrivals at λ msg/s on a
  link, a link makes ``T (1 - e^(-λ/T))`` writes/s, against λ with one write per message.
  Writes of several workloads on the same link share ticks: "all" is recomputed from the
  summed per-link rates.
* **Client egress** is each node's deliveries to its own subscribers (the same in every
  scheme: every node delivers locally what reaches it), with the client MSG frame size
  (9-byte header + offset + channel + data).
* **Hops**: from the owner to the node of each subscriber (0 on the owner itself);
  "mean" is weighted by deliveries; add one hop when the publisher is not on the
  owner (probability (n-1)/n). ``--hop-ms`` (1.0: a loop tick under load plus a LAN
  one-way) turns the deepest path into a latency estimate.

Not modelled: CPU per message (see the measured bench, cluster_e2e.py), retransmission
(links never retransmit), membership changes, the TCP/IP overhead per write.

    .venv/bin/python benchmarks/cluster_model.py               # the tables
    .venv/bin/python benchmarks/cluster_model.py --json > /tmp/model.json
    .venv/bin/python benchmarks/cluster_model.py --nodes 30 --channels 2000 --ks 4,8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim.cluster import frames  # noqa: E402
from fastim.cluster.placement import max_depth, ranking, tree  # noqa: E402

FRAME_HEADER = 9  # fastim framing: type, length, CRC-32
BATCH_HEADER = 4  # u32 count
EPOCH = "a1b2c3d4e5f6"  # hub.new_epoch(): 12 hex characters


@dataclass
class Sizes:
    """Bytes of one entry of each kind, from the real codecs."""

    deliver: int
    forward: int
    forward_ack: int
    client_msg: int

    @classmethod
    def of(cls, size: int, channel: str) -> Sizes:
        data = b"x" * size
        return cls(
            deliver=len(frames.pack_deliver(channel, EPOCH, 1 << 40, data)),
            forward=len(frames.pack_forward(1 << 40, channel, data)),
            forward_ack=len(frames.pack_forward_ack(1 << 40, 1 << 40, EPOCH, 0, "")),
            client_msg=FRAME_HEADER + 8 + 1 + len(channel.encode()) + size,
        )


@dataclass
class Acc:
    """What one scheme costs under one workload: per directed link, its message rate
    by kind; per node, its clients' deliveries; hop statistics."""

    n: int
    deliver: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    forward: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    ack: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    max_hops: int = 0
    hop_weight: float = 0.0  # deliveries/s
    hop_sum: float = 0.0  # deliveries/s × hops

    def merge(self, other: Acc) -> Acc:
        out = Acc(self.n)
        for name in ("deliver", "forward", "ack"):
            mine, theirs, dst = getattr(self, name), getattr(other, name), getattr(out, name)
            for key in set(mine) | set(theirs):
                dst[key] = mine.get(key, 0.0) + theirs.get(key, 0.0)
        out.max_hops = max(self.max_hops, other.max_hops)
        out.hop_weight = self.hop_weight + other.hop_weight
        out.hop_sum = self.hop_sum + other.hop_sum
        return out


def zipf_counts(channels: int, total: int, s: float) -> list[int]:
    """Subscribers per channel by rank: about ``total * r^-s / H``, at least 1."""
    weights = [r**-s for r in range(1, channels + 1)]
    h = sum(weights)
    return [max(1, round(total * w / h)) for w in weights]


def place(m: int, n: int, rng: random.Random) -> dict[int, int]:
    """Where ``m`` subscribers land on ``n`` nodes (uniformly at random): node → count."""
    if m >= 50 * n:  # many: a node's share is close to m/n; sample cheaply around it
        base = [rng.gauss(m / n, math.sqrt(m / n)) for _ in range(n)]
        scale = m / sum(base)
        return {i: max(1, round(b * scale)) for i, b in enumerate(base)}
    return dict(Counter(rng.choices(range(n), k=m)))


def _children_flat(order: list[str], subs: dict[str, int], pruned: bool) -> dict[str, list[str]]:
    owner = order[0]
    return {owner: [x for x in order[1:] if not pruned or x in subs]}


def _prune(t: dict[str, list[str]], order: list[str], subs: dict[str, int]) -> dict[str, list[str]]:
    """Drop the subtrees of ``t`` that hold no subscriber (heap order: children after
    their parent, so one pass from the end decides every node)."""
    has: dict[str, bool] = {}
    for x in reversed(order):
        has[x] = x in subs or any(has[c] for c in t[x])
    return {x: [c for c in t[x] if has[c]] for x in order if has[x] or x == order[0]}


def _walk(
    acc: Acc,
    children: dict[str, list[str]],
    owner: str,
    rate: float,
    subs: dict[str, int],
    index: dict[str, int],
) -> None:
    """Count every edge of the delivery graph (rate msg/s each) and the hops to each
    subscriber's node; fail loudly if one is not reached (a scheme that loses messages
    would be a bug in the model)."""
    n = acc.n
    depth = {owner: 0}
    queue = deque([owner])
    deliver = acc.deliver
    while queue:
        p = queue.popleft()
        pi = index[p] * n
        d = depth[p] + 1
        for c in children.get(p, ()):
            deliver[pi + index[c]] += rate
            depth[c] = d
            queue.append(c)
    for node, count in subs.items():
        hops = depth.get(node)
        if hops is None:
            raise AssertionError(f"subscriber node {node} not reached from {owner}")
        w = rate * count
        acc.hop_weight += w
        acc.hop_sum += w * hops
        if hops > acc.max_hops:
            acc.max_hops = hops


def _forwards(acc: Acc, owner: int, rate: float) -> None:
    """Publishers on a uniformly random node: FORWARD to the owner, FORWARD_ACK back."""
    n = acc.n
    share = rate / n
    for j in range(n):
        if j != owner:
            acc.forward[j * n + owner] += share
            acc.ack[owner * n + j] += share


def add_channel(
    accs: dict[str, Acc],
    name: str,
    rate: float,
    subs_idx: dict[int, int],
    nodes: list[str],
    index: dict[str, int],
) -> None:
    """One channel under every scheme (``accs``: scheme → accumulator)."""
    subs = {nodes[i]: c for i, c in subs_idx.items() if c > 0}
    order = ranking(name, nodes)  # the real owner-first ranking
    owner = order[0]
    trees: dict[int, dict[str, list[str]]] = {}
    for scheme, acc in accs.items():
        _forwards(acc, index[owner], rate)
        parts = scheme.split("-")
        if parts[0] == "flat":
            children = _children_flat(order, subs, pruned=len(parts) == 2)
        elif parts[0] == "interest":
            children = tree(name, [owner, *subs], int(parts[1]))
        else:  # tree-k, tree-k-pruned
            k = int(parts[1])
            t = trees.get(k)
            if t is None:
                t = trees[k] = tree(name, nodes, k)
            children = _prune(t, order, subs) if len(parts) == 3 else t
        _walk(acc, children, owner, rate, subs, index)


def writes_per_s(rate: float, tick_hz: float) -> float:
    """Writes/s of a link batched per tick with Poisson arrivals at ``rate``."""
    return tick_hz * -math.expm1(-rate / tick_hz) if rate > 0 else 0.0


def summarize(
    acc: Acc, sizes: Sizes, client: list[float], tick_hz: float, hop_ms: float
) -> dict[str, Any]:
    """Per-node figures of one scheme under one workload."""
    n = acc.n
    msgs = [0.0] * n
    byts = [0.0] * n
    writes = [0.0] * n
    links: defaultdict[int, float] = defaultdict(float)
    for table, entry in (
        (acc.deliver, sizes.deliver),
        (acc.forward, sizes.forward),
        (acc.ack, sizes.forward_ack),
    ):
        for key, rate in table.items():
            src = key // n
            msgs[src] += rate
            byts[src] += rate * entry
            links[key] += rate
    for key, rate in links.items():
        w = writes_per_s(rate, tick_hz)
        writes[key // n] += w
        byts[key // n] += w * (FRAME_HEADER + BATCH_HEADER)
    deliver_only = [0.0] * n
    for key, rate in acc.deliver.items():
        deliver_only[key // n] += rate
    client_bytes = [c * sizes.client_msg for c in client]
    mean_hops = acc.hop_sum / acc.hop_weight if acc.hop_weight else 0.0
    return {
        "link_msgs_per_s": {"max": max(msgs), "mean": sum(msgs) / n},
        "deliver_msgs_per_s": {"max": max(deliver_only), "mean": sum(deliver_only) / n},
        "link_bytes_per_s": {"max": max(byts), "mean": sum(byts) / n},
        "link_writes_per_s": {"max": max(writes), "mean": sum(writes) / n},
        "links_used": len(links),
        "client_msgs_per_s": {"max": max(client), "mean": sum(client) / n},
        "client_bytes_per_s": {"max": max(client_bytes), "mean": sum(client_bytes) / n},
        "max_hops": acc.max_hops,
        "mean_hops": mean_hops,
        "max_latency_ms": (acc.max_hops + 1) * hop_ms,  # + the forward hop to the owner
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    n = args.nodes
    nodes = [f"node-{i:03d}" for i in range(n)]
    index = {x: i for i, x in enumerate(nodes)}
    ks = [int(k) for k in args.ks.split(",")]
    schemes = ["flat", "flat-pruned"]
    for k in ks:
        schemes += [f"tree-{k}", f"tree-{k}-pruned", f"interest-{k}"]
    sizes = Sizes.of(args.size, "ch-00000")

    # workloads: channel -> (rate, node index -> subscribers)
    hot = {"hot": (args.hot_rate, dict.fromkeys(range(n), args.hot_per_node))}
    total = n * args.subs_per_node
    counts = zipf_counts(args.channels, total, args.zipf)
    mix = {f"ch-{r:05d}": (args.mix_rate, place(m, n, rng)) for r, m in enumerate(counts)}

    results: dict[str, Any] = {}
    accs_by_workload: dict[str, dict[str, Acc]] = {}
    clients: dict[str, list[float]] = {}
    for wname, workload in (("hot", hot), ("mix", mix)):
        if wname == "hot" and args.hot_rate <= 0:
            continue
        accs = {s: Acc(n) for s in schemes}
        client = [0.0] * n
        for ch, (rate, subs_idx) in workload.items():
            add_channel(accs, ch, rate, subs_idx, nodes, index)
            for i, c in subs_idx.items():
                client[i] += rate * c
        accs_by_workload[wname] = accs
        clients[wname] = client
    if len(accs_by_workload) == 2:
        accs_by_workload["all"] = {
            s: accs_by_workload["hot"][s].merge(accs_by_workload["mix"][s]) for s in schemes
        }
        clients["all"] = [a + b for a, b in zip(clients["hot"], clients["mix"], strict=True)]
    for wname, accs in accs_by_workload.items():
        results[wname] = {
            s: summarize(acc, sizes, clients[wname], args.tick_hz, args.hop_ms)
            for s, acc in accs.items()
        }
    nodes_with_subs = [len([c for c in subs.values() if c]) for _, subs in mix.values()]
    return {
        "model": {
            "nodes": n,
            "subs_per_node": args.subs_per_node,
            "hot": {"rate": args.hot_rate, "subs_per_node": args.hot_per_node},
            "mix": {
                "channels": args.channels,
                "rate_each": args.mix_rate,
                "zipf": args.zipf,
                "subscribers_top": counts[0],
                "subscribers_median": sorted(counts)[len(counts) // 2],
                "subscribers_last": counts[-1],
                "nodes_with_subscribers_mean": sum(nodes_with_subs) / len(nodes_with_subs),
            },
            "size": args.size,
            "entry_bytes": sizes.__dict__,
            "tick_hz": args.tick_hz,
            "hop_ms": args.hop_ms,
            "ks": ks,
            "depth_bound": {k: max_depth(n, k) for k in ks},
            "seed": args.seed,
        },
        "results": results,
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }


def _fmt(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:,.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:,.0f}k"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}"


def render(out: dict[str, Any]) -> str:
    m = out["model"]
    lines = [
        f"{m['nodes']} nodes × {m['subs_per_node']:,} clients; hot: 1 channel at "
        f"{m['hot']['rate']:g} msg/s with {m['hot']['subs_per_node']:,} subscribers per node; "
        f"mix: {m['mix']['channels']:,} channels at {m['mix']['rate_each']:g} msg/s, Zipf "
        f"{m['mix']['zipf']:g} (subscribers top {m['mix']['subscribers_top']:,}, median "
        f"{m['mix']['subscribers_median']:,}, last {m['mix']['subscribers_last']:,}; "
        f"{m['mix']['nodes_with_subscribers_mean']:.1f} nodes with subscribers per channel "
        f"on average); {m['size']}-byte messages; {m['tick_hz']:g} ticks/s",
        "",
    ]
    for wname, res in out["results"].items():
        any_row = next(iter(res.values()))
        c = any_row["client_msgs_per_s"]
        cb = any_row["client_bytes_per_s"]
        lines.append(
            f"### {wname}: client egress per node {_fmt(c['mean'])} msg/s mean, "
            f"{_fmt(c['max'])} max ({cb['max'] / 1e6:,.1f} MB/s max), the same in every scheme"
        )
        lines.append("")
        lines.append(
            "| scheme | link msg/s per node, max | mean | link MB/s max | writes/s max (batched) "
            "| mean | links used | hops max | hops mean | latency max (ms) |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for scheme, r in res.items():
            lm, lb, lw = r["link_msgs_per_s"], r["link_bytes_per_s"], r["link_writes_per_s"]
            lines.append(
                f"| {scheme} | {_fmt(lm['max'])} | {_fmt(lm['mean'])} | {lb['max'] / 1e6:,.2f} "
                f"| {_fmt(lw['max'])} | {_fmt(lw['mean'])} | {r['links_used']:,} "
                f"| {r['max_hops']} | {r['mean_hops']:.2f} | {r['max_latency_ms']:g} |"
            )
        lines.append("")
    lines.append(f"(computed in {out['elapsed_s']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--subs-per-node", type=int, default=10_000)
    p.add_argument("--channels", type=int, default=10_000, help="channels of the mix")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the mix's popularity")
    p.add_argument("--mix-rate", type=float, default=1.0, help="msg/s per channel of the mix")
    p.add_argument(
        "--hot-rate", type=float, default=1000.0, help="msg/s of the hot channel (0: none)"
    )
    p.add_argument(
        "--hot-per-node", type=int, default=1000, help="hot channel subscribers per node"
    )
    p.add_argument("--size", type=int, default=200, help="message bytes (the JSON)")
    p.add_argument("--ks", default="2,4,8,16", help="tree fan-outs")
    p.add_argument("--tick-hz", type=float, default=1000.0, help="loop ticks per second under load")
    p.add_argument("--hop-ms", type=float, default=1.0, help="latency of one hop, ms")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.nodes < 2 or args.channels < 1 or args.subs_per_node < 1:
        p.error("--nodes >= 2, --channels >= 1, --subs-per-node >= 1")
    out = run(args)
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
