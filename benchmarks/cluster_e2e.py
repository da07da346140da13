"""A fastim cluster end to end on this machine: deliveries/s against a single node, and
the k-ary tree against flat fan-out from the owner.

One publisher, N subscribers, the load generator of ``fastim bench`` (its ``--sub-urls``
spreads the subscribers evenly over the nodes; the publisher and its probe subscriber
are on ``--url``). Cases:

* ``single``: one node, no etcd: the baseline;
* ``cluster3``: 3 nodes joined through a real etcd (``tree_k`` 8), subscribers spread
  evenly, the publisher on a node that does **not** own the channel: every publish is
  forwarded to the owner over a node link, numbered there, and delivered down the tree
  (here: the owner sends to both others);
* ``tree4`` / ``flat4``: 4 nodes, ``tree_k`` 2 against 8. With k = 2 the owner sends to
  two children and one of them relays to the fourth node (depth 2); with k = 8 ≥ n - 1
  the tree *is* flat fan-out from the owner (three DELIVERs per message, depth 1).
  (``tree_k`` must be ≥ 2: a "tree_k = 1" chain is not a setting.)

**On a 2-core machine the cluster cannot be faster than one node.** All node processes
are pinned to the same core (``--node-cpu``, 0), the generator and etcd (and redis with
``--store redis``) to the other (``--client-cpu``, 1): the server side has one core
whatever the number of nodes, so the ratio cluster/single is the cost of being a cluster
(forwarding, link frames, several event loops sharing a core), not a scale-out figure.
What must hold in every case: zero loss, reordering or duplicates (checked by the bench
on its sampled subscribers, and by counting every delivery).

Each case runs ``--reps`` (3) times against the same processes; the table gives the
median deliveries/s (and each rep's), and the **cost**: deliveries per second of node CPU
(all nodes' CPU summed while the bench publishes, ``fastim bench --server-pids``). When
the generator is the bottleneck (it shares its core with etcd, and redis), deliveries/s
hide the cluster's overhead; deliveries per node-CPU-second do not. The last CPU column
is each node's CPU over the whole bench run (connecting included): how the work spread.

    .venv/bin/python benchmarks/cluster_e2e.py                     # all cases, table
    .venv/bin/python benchmarks/cluster_e2e.py --cases single,cluster3 --reps 1 -d 2
    .venv/bin/python benchmarks/cluster_e2e.py --json > /tmp/cluster_e2e.json
    .venv/bin/python benchmarks/cluster_e2e.py --store redis     # durable, one redis

The store is each node's memory by default (as the single-node figures of RESULTS.md);
with ``--store redis`` every node uses one redis-server (durable channels: the owner
appends each tick's publishes, offsets come from Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim.client import connect  # noqa: E402
from fastim.cluster.placement import owner, tree  # noqa: E402

CASES = ("single", "cluster3", "tree4", "flat4")
CHANNEL = "bench"
_LINKS = re.compile(r"(\d+) nodes, (\d+)/(\d+) links up")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cmd: list[str], cpu: str | None) -> list[str]:
    if cpu is not None and shutil.which("taskset"):
        return ["taskset", "-c", cpu, *cmd]
    return cmd


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """A child process with its log in a file (a pipe nobody reads would block it)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn(name: str, cmd: list[str], workdir: Path, cpu: str | None) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as out:
        p = subprocess.Popen(
            _pinned(cmd, cpu), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    return Proc(name, p, log_path)


def start_etcd(workdir: Path, cpu: str | None) -> tuple[Proc, str]:
    """A single-member etcd on free loopback ports (the logic of tests/cluster/_etcd.py)."""
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("etcd not found: apt-get install etcd-server")
    client_port, peer_port = free_port(), free_port()
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    cmd = [
        binary,
        "--name", "bench",
        "--data-dir", str(workdir / "etcd-data"),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"bench={peer}",
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"fastim-bench-{client_port}",
    ]  # fmt: skip
    etcd = spawn("etcd", cmd, workdir, cpu)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if etcd.proc.poll() is not None:
            raise SystemExit(f"etcd exited:\n{etcd.log()}")
        status, body = http_get(client_port, "/health")
        if status == 200 and '"health":"true"' in body:
            return etcd, f"127.0.0.1:{client_port}"
        time.sleep(0.05)
    etcd.stop()
    raise SystemExit(f"etcd did not become healthy:\n{etcd.log()}")


def start_redis(workdir: Path, cpu: str | None) -> tuple[Proc, str]:
    """A redis-server on a free loopback port, no persistence (the logic of
    tests/store/_redis.py)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    port = free_port()
    cmd = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    redis = spawn("redis", cmd, workdir, cpu)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis.proc.poll() is not None:
            raise SystemExit(f"redis-server exited:\n{redis.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return redis, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        time.sleep(0.05)
    redis.stop()
    raise SystemExit(f"redis-server did not answer:\n{redis.log()}")


def http_get(port: int, path: str) -> tuple[int, str]:
    """A plain HTTP/1.0 GET on loopback: (status, body); (0, why) when it fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        return 0, str(e)
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, data[:200].decode(errors="replace")
    return status, body.decode(errors="replace")


@dataclass
class Node:
    node_id: str
    tcp: int
    ws: int
    link: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp}"


@dataclass
class Setup:
    """The processes of one case."""

    nodes: list[Node]
    etcd: Proc | None = None
    k: int = 0

    def pids(self) -> list[int]:
        return [n.proc.proc.pid for n in self.nodes if n.proc is not None]

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                n.proc.stop()
        if self.etcd is not None:
            self.etcd.stop()


def start_nodes(
    n: int, k: int, etcd: str | None, workdir: Path, args: argparse.Namespace, tag: str
) -> list[Node]:
    nodes = [Node(f"n{i + 1}", free_port(), free_port(), free_port()) for i in range(n)]
    for node in nodes:
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--node-id", node.node_id,
            "--tcp-port", str(node.tcp),
            "--ws-port", str(node.ws),
            "--log-level", "warning" if not args.verbose else "info",
            "--publish-rate", "0",  # one publisher saturating: no per-connection limit
        ]  # fmt: skip
        if args.redis_url:
            cmd += ["--store", "redis", "--redis-url", args.redis_url, "--redis-prefix", tag]
        if etcd is not None:
            cmd += [
                "--etcd-endpoints", etcd,
                "--cluster-name", f"bench-{tag}-{os.getpid()}",
                "--link-port", str(node.link),
                "--tree-k", str(k),
            ]  # fmt: skip
        node.proc = spawn(f"{tag}-{node.node_id}", cmd, workdir, args.node_cpu)
    deadline = time.monotonic() + 30
    for node in nodes:  # /ready answers 200 once the node listens (and has joined)
        assert node.proc is not None
        while True:
            if node.proc.proc.poll() is not None:
                raise SystemExit(f"node {node.node_id} exited:\n{node.proc.log()}")
            status, body = http_get(node.ws, "/ready")
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"node {node.node_id} not ready: {body}\n{node.proc.log()}")
            time.sleep(0.05)
    if etcd is not None:
        wait_links(nodes, deadline)
    return nodes


def wait_links(nodes: list[Node], deadline: float) -> None:
    """Every node sees every other and has its links up ("n nodes, n-1/n-1 links up")."""
    n = len(nodes)
    while True:
        bodies = [http_get(node.ws, "/ready")[1] for node in nodes]
        ok = 0
        for body in bodies:
            m = _LINKS.search(body)
            if m and int(m[1]) == n and int(m[2]) == int(m[3]) == n - 1:
                ok += 1
        if ok == n:
            return
        if time.monotonic() > deadline:
            raise SystemExit("the cluster did not form:\n" + "\n".join(bodies))
        time.sleep(0.1)


def run_bench(
    publisher: Node, subs_on: list[Node], pids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "fastim", "bench",
        "--url", publisher.url,
        "--subscribers", str(args.subscribers),
        "--duration", str(args.duration),
        "--size", str(args.size),
        "--inflight", str(args.inflight),
        "--window", getattr(args, "window", "every"),
        "--processes", "1",
        "--channel", CHANNEL,
        "--json", "--quiet",
        "--server-pids", ",".join(map(str, pids)),
    ]  # fmt: skip
    if len(subs_on) > 1 or subs_on[0] is not publisher:
        cmd += ["--sub-urls", ",".join(n.url for n in subs_on)]
    if args.client_cpu is not None:
        cmd += ["--client-cpu", args.client_cpu]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        result: dict[str, Any] = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"bench failed ({out.returncode}):\n{out.stdout}\n{out.stderr}") from None
    return result


def warm_up(pub: Node) -> None:
    """One acked publish through the publisher's node before the reps: the channel
    exists at its owner (with its epoch) before any subscriber asks for it."""

    async def go() -> None:
        client = await connect(pub.url, reconnect=False, request_timeout=10.0)
        try:
            await client.publish(CHANNEL, {"warm": True})
        finally:
            await client.aclose()

    asyncio.run(go())


def one_case(name: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the case's processes, run the bench ``--reps`` times, stop them."""
    if name == "single":
        n, k, etcd_needed = 1, 8, False
    elif name == "cluster3":
        n, k, etcd_needed = 3, 8, True
    elif name == "tree4":
        n, k, etcd_needed = 4, 2, True
    elif name == "flat4":
        n, k, etcd_needed = 4, 8, True
    else:
        raise SystemExit(f"unknown case {name!r} (one of {', '.join(CASES)})")
    setup = Setup([], k=k)
    try:
        endpoint = None
        if etcd_needed:
            setup.etcd, endpoint = start_etcd(workdir / name, args.client_cpu)
        setup.nodes = start_nodes(n, k, endpoint, workdir, args, name)
        ids = [x.node_id for x in setup.nodes]
        own = owner(CHANNEL, ids)
        # the publisher on a node that does not own the channel (its publishes are
        # forwarded): the last non-owner in the ranking, a leaf of the tree
        shape = tree(CHANNEL, ids, max(2, k))
        non_owners = [x for x in setup.nodes if x.node_id != own]
        pub = non_owners[-1] if non_owners else setup.nodes[0]
        warm_up(pub)
        reps = []
        for _ in range(args.reps):
            cpu0 = [cpu_seconds(p) for p in setup.pids()]
            t0 = time.monotonic()
            r = run_bench(pub, setup.nodes, setup.pids(), args)
            wall = time.monotonic() - t0
            cpu1 = [cpu_seconds(p) for p in setup.pids()]
            # per node, over the whole bench run (connecting included): how the work spread
            r["node_cpu_pct"] = [
                round(100 * (b - a) / wall, 1) for a, b in zip(cpu0, cpu1, strict=True)
            ]
            r["wall_s"] = round(wall, 2)
            # all nodes together while publishing (the bench's own window): the cost
            cpu = r["server"]["cpu_pct"]
            r["per_node_cpu_s"] = round(100 * r["deliveries_per_s"] / cpu) if cpu else None
            reps.append(r)
        dps = [r["deliveries_per_s"] for r in reps]
        per_cpu = [r["per_node_cpu_s"] for r in reps if r["per_node_cpu_s"]]
        return {
            "case": name,
            "nodes": n,
            "tree_k": k if etcd_needed else None,
            "owner": own if etcd_needed else None,
            "publisher_on": pub.node_id,
            "tree": shape if etcd_needed else None,
            "subscribers": args.subscribers,
            "deliveries_per_s_median": statistics.median(dps),
            "deliveries_per_s": dps,
            # deliveries per second of node CPU (all nodes summed): the cost, whatever the
            # bottleneck (the generator shares its core with etcd and redis)
            "deliveries_per_cpu_s_median": statistics.median(per_cpu) if per_cpu else None,
            "server_cpu_pct": [r["server"]["cpu_pct"] for r in reps],
            "lost": sum(r["lost"] for r in reps),
            "reordered": sum(r["reordered"] for r in reps),
            "duplicates": sum(r["duplicates"] for r in reps),
            "errors": [e for r in reps for e in r["errors"]][:10],
            "latency_p50_ms": statistics.median(r["latency_us"]["p50"] for r in reps) / 1000,
            "latency_p99_ms": statistics.median(r["latency_us"]["p99"] for r in reps) / 1000,
            "node_cpu_pct": [
                statistics.median(r["node_cpu_pct"][i] for r in reps) for i in range(n)
            ],
            "reps": reps,
        }
    finally:
        setup.stop()


def render(out: dict[str, Any]) -> str:
    a = out["args"]
    lines = [
        f"{a['subscribers']:,} subscribers, {a['size']}-byte messages, {a['duration']:g} s × "
        f"{a['reps']} reps, W={a['inflight']} ({a.get('window', 'probe')}), {a['store']} store; "
        "nodes on CPU "
        f"{a['node_cpu']}, generator, etcd{' and redis' if a['store'] == 'redis' else ''} "
        f"on CPU {a['client_cpu']}; load average before: {out.get('load_before', '?')}",
        "",
        "| case | nodes | tree_k | publisher → owner | deliveries/s (median) | of single "
        "| reps | nodes' CPU % while publishing | deliveries per node-CPU-second | of single "
        "| p50 / p99 ms | CPU % per node (whole run) | lost / reordered / dup |",
        "|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|---|---:|",
    ]
    base = next((c for c in out["cases"] if c["case"] == "single"), None)
    for c in out["cases"]:
        ratio = (
            f"{c['deliveries_per_s_median'] / base['deliveries_per_s_median']:.2f}"
            if base and base["deliveries_per_s_median"]
            else "—"
        )
        route = f"{c['publisher_on']} → {c['owner']}" if c["owner"] else "—"
        per_cpu = c["deliveries_per_cpu_s_median"]
        cost = (
            f"{per_cpu / base['deliveries_per_cpu_s_median']:.2f}"
            if base and base["deliveries_per_cpu_s_median"] and per_cpu
            else "—"
        )
        lines.append(
            f"| {c['case']} | {c['nodes']} | {c['tree_k'] or '—'} | {route} "
            f"| {c['deliveries_per_s_median']:,.0f} | {ratio} "
            f"| {', '.join(f'{x / 1e6:.2f}M' for x in c['deliveries_per_s'])} "
            f"| {', '.join(f'{x:g}' for x in c['server_cpu_pct'])} "
            f"| {f'{per_cpu:,.0f}' if per_cpu else '—'} | {cost} "
            f"| {c['latency_p50_ms']:.2f} / {c['latency_p99_ms']:.2f} "
            f"| {' + '.join(f'{x:g}' for x in c['node_cpu_pct'])} "
            f"| {c['lost']} / {c['reordered']} / {c['duplicates']} |"
        )
    for c in out["cases"]:
        if c["tree"]:
            edges = "; ".join(f"{p} → {', '.join(ch)}" for p, ch in c["tree"].items() if ch)
            lines.append(f"\n{c['case']}: tree of {CHANNEL!r}: {edges}")
        if c["errors"]:
            lines.append(f"\n{c['case']}: errors: {'; '.join(c['errors'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {CASES}")
    p.add_argument("--subscribers", "-n", type=int, default=2000)
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds per rep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="message bytes")
    p.add_argument("--inflight", "-w", type=int, default=64, help="the bench's W")
    p.add_argument(
        "--window",
        choices=("every", "probe"),
        default="every",
        help="the bench's --window: W against every subscriber (default since P10) or the "
        "probe (the rule of the figures in docs/cluster.md before P10)",
    )
    p.add_argument(
        "--store",
        choices=("memory", "redis"),
        default="memory",
        help="the nodes' store: each its memory (as the single-node figures of RESULTS.md), "
        "or one redis-server for all (on --client-cpu)",
    )
    p.add_argument("--node-cpu", default="0", help="CPU(s) for every node (taskset)")
    p.add_argument("--client-cpu", default="1", help="CPU(s) for the generator and etcd")
    p.add_argument("--verbose", action="store_true", help="nodes log at info level")
    p.add_argument("--keep", action="store_true", help="keep the logs' directory")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="fastim-cluster-e2e-"))
    for c in cases:
        (workdir / c).mkdir(exist_ok=True)
    args.redis_url = None
    redis: Proc | None = None
    out: dict[str, Any] = {
        "args": vars(args),
        "cases": [],
        "workdir": str(workdir),
        # other work on this machine skews everything: say how busy it was
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        if args.store == "redis":
            redis, args.redis_url = start_redis(workdir, args.client_cpu)
        for c in cases:
            if not args.json:
                print(f"case {c} ...", file=sys.stderr, flush=True)
            out["cases"].append(one_case(c, workdir, args))
    finally:
        if redis is not None:
            redis.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(json.dumps(out, indent=2) if args.json else render(out))
    bad = any(c["lost"] or c["reordered"] or c["duplicates"] or c["errors"] for c in out["cases"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
