"""Does pruning a channel's tree to the nodes with subscribers pay off? What a tree hop costs.

Without interest routing every node of the cluster receives every message of every
channel (down the channel's k-ary tree) and passes it on, whether or not it has a
subscriber. Pruning would spare the nodes without subscribers that work, at the price
of interest bookkeeping (every node telling the others, per channel, when its first
subscriber comes and its last one goes, and again after every link or membership
change). This measures the work it would spare, with real node processes:

* ``single``: one node (no cluster), a publisher and ``--subs`` subscribers per channel
  on it: the CPU a message costs without any cluster.
* ``cluster``: ``--nodes`` nodes on a real etcd (memory store); the same publisher and
  subscribers on the channels' owner, no subscriber anywhere else: the owner's CPU per
  message (local delivery + DELIVER to its children) and each other node's (receive,
  decode, pass on to its own children, deliver to nobody): the cost pruning would save.
* ``cluster-interested``: the same, with ``--subs`` subscribers on every node as well:
  what a node with subscribers pays per message (for scale).

CPU is the node process's user + system time from ``/proc/<pid>/stat`` over the burst,
divided by the messages published. Publishes are pipelined by one raw TCP client
(batches of ``--batch``, each awaited), ``--size``-byte messages over ``--channels``
channels all owned by node n0. Linux only; needs etcd (``apt-get install etcd-server``).

    .venv/bin/python benchmarks/cluster_tree.py            # ~30 s
    .venv/bin/python benchmarks/cluster_tree.py --messages 200000 --nodes 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster._nodes import ClusterNode, Nodes  # type: ignore[import-not-found]  # noqa: E402
from server._support import TcpClient  # type: ignore[import-not-found]  # noqa: E402

from fastim.cluster.placement import owner  # noqa: E402
from fastim.protocol import FrameType  # noqa: E402

F = FrameType
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def channels_of(node_id: str, ids: list[str], n: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"bench-{i}"
        if owner(name, ids) == node_id:
            out.append(name)
        i += 1
    return out


async def subscribe_all(node: ClusterNode, chans: list[str], per: int) -> list[TcpClient]:
    clients = []
    for _ in range(per):
        c = await TcpClient.connect(node.tcp_port)
        for ch in chans:
            await c.sub(ch)
        clients.append(c)
    return clients


async def drain(clients: list[TcpClient], stop: asyncio.Event) -> None:
    """Read what subscribers get (so nothing backs up), until ``stop``."""

    async def one(c: TcpClient) -> None:
        while not stop.is_set():
            try:
                c.frames.clear()
                await c._fill(0.2)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except Exception:
                return

    await asyncio.gather(*(one(c) for c in clients))


async def burst(pub: TcpClient, chans: list[str], messages: int, size: int, batch: int) -> float:
    """Publish ``messages`` (round robin over ``chans``), pipelined; returns seconds."""
    data = b'{"p":"' + b"x" * max(0, size - 8) + b'"}'
    t0 = time.perf_counter()
    sent = 0
    while sent < messages:
        n = min(batch, messages - sent)
        for i in range(n):
            pub.send_pub(chans[(sent + i) % len(chans)], data)
        acks = 0
        while acks < n:
            t, p = await pub.recv(30)
            if t == F.PUBACK:
                acks += 1
            elif t == F.ERROR:
                raise RuntimeError(f"publish refused: {p!r}")
        sent += n
    return time.perf_counter() - t0


async def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    n = 1 if mode == "single" else args.nodes
    with tempfile.TemporaryDirectory() as d:
        nodes = Nodes(Path(d), n, "--tree-k", str(args.k), store="memory")
        if mode == "single":
            # one node: no etcd; the harness's node with the cluster settings dropped
            node = nodes[0]
            cmd = nodes.args()
            i = cmd.index("--etcd-endpoints")
            node.args = cmd[:i] + cmd[i + 2 :]
            node.spawn()
            while node.ready()[0] != 200:
                node.check_alive()
                await asyncio.sleep(0.05)
        else:
            await asyncio.to_thread(nodes.start)
        try:
            ids = [x.node_id for x in nodes.nodes]
            chans = channels_of("n0", ids, args.channels)
            subs = await subscribe_all(nodes[0], chans, args.subs)
            if mode == "cluster-interested":
                for node in nodes.nodes[1:]:
                    subs += await subscribe_all(node, chans, args.subs)
            stop = asyncio.Event()
            reader = asyncio.ensure_future(drain(subs, stop))
            pub = await TcpClient.connect(nodes[0].tcp_port)
            await burst(pub, chans, min(5000, args.messages), args.size, args.batch)  # warm up
            await asyncio.sleep(0.5)
            pids = [x.proc.pid for x in nodes.nodes if x.proc is not None]
            before = [cpu_seconds(p) for p in pids]
            secs = await burst(pub, chans, args.messages, args.size, args.batch)
            await asyncio.sleep(0.5)  # the tree's last deliveries
            after = [cpu_seconds(p) for p in pids]
            stop.set()
            await reader
            for c in [*subs, pub]:
                await c.close()
            per_msg = [(a - b) / args.messages * 1e6 for a, b in zip(after, before, strict=True)]
            return {
                "mode": mode,
                "nodes": n,
                "messages": args.messages,
                "publish_seconds": round(secs, 3),
                "rate": round(args.messages / secs),
                "cpu_us_per_message": [round(x, 2) for x in per_msg],
            }
        finally:
            await asyncio.to_thread(nodes.close)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="tree_k")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--subs", type=int, default=1, help="subscribers per channel per node")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--modes", default="single,cluster,cluster-interested")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [await run(args, m) for m in args.modes.split(",")]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.messages:,} messages of {args.size} B over {args.channels} channels owned by n0")
    print(f"{'mode':<20} {'msg/s':>9}   CPU µs per message: n0 (owner), n1, ...")
    for r in results:
        cpu = "  ".join(f"{x:6.2f}" for x in r["cpu_us_per_message"])
        print(f"{r['mode']:<20} {r['rate']:>9,}   {cpu}")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
