"""``fastim bench`` on the command line: its flags, and the command itself.

``add_bench_arguments`` is also used by benchmarks/peers_e2e.py, which runs the bench in
its own process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from .report import failed, render
from .runner import run
from .serverstats import parse_cpus
from .workers import CONNS_PER_IP, CONNS_PER_PROCESS, TRACK_PER_PROCESS


def _description() -> str | None:
    """The package's docstring: what ``fastim bench --help`` says first."""
    return importlib.import_module(__package__ or "fastim.bench").__doc__


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure fan-out: N subscribers, one publisher, deliveries/s and latency",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_arguments(p)
    p.set_defaults(func=_cmd)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags (also used by benchmarks/peers_e2e.py)."""
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument(
        "--url", help="fastim node: tcp://host:port or ws://host:port/ws; default: spawn one"
    )
    tgt.add_argument("--peer", help="plain broadcast peer: ws://host:port/path (no acks)")
    p.add_argument(
        "--sub-urls",
        default=None,
        metavar="URL,URL,...",
        help="with --url: spread the subscribers evenly over these nodes (a cluster); the "
        "publisher and the probe subscriber stay on --url",
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ws"),
        default="tcp",
        help="of the node the bench spawns when no URL is given (default tcp)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="of the node the bench spawns: sqlite (the node's default, durable: every "
        "publish is in the file before it is acknowledged) or memory (default sqlite)",
    )
    p.add_argument("--subscribers", "-n", type=int, default=1000)
    p.add_argument("--duration", "-d", type=float, default=5.0, help="seconds of publishing")
    p.add_argument("--rate", "-r", type=float, default=0.0, help="msg/s; 0 = saturation")
    p.add_argument(
        "--inflight",
        "-w",
        type=int,
        default=64,
        help="publishes not yet received, at most (W; by whom: --window)",
    )
    p.add_argument(
        "--window",
        choices=("every", "probe"),
        default="every",
        help="W counts publishes not yet received by every subscriber (every: the worker "
        f"processes report their slowest, up to {TRACK_PER_PROCESS:,} subscribers each, "
        "spread; the default) or by the probe alone (probe: the rule until P10)",
    )
    p.add_argument("--size", "-s", type=int, default=64, help="message size, bytes (≥ 40)")
    p.add_argument(
        "--processes",
        "-p",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help=f"subscriber worker processes (at least one per {CONNS_PER_PROCESS:,} connections)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="subscribers that check every message (default 1%% up to 10; 1,000 with --rate)",
    )
    p.add_argument("--channel", default="bench")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers")
    p.add_argument(
        "--server-cpu",
        default="0",
        help="CPUs of a spawned node (a taskset list: 0, 0,1, 0-3); with --server-workers, "
        "worker i is pinned to the i-th of them, round robin (default 0)",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="a spawned node runs `fastim serve --workers N`: a supervisor and N worker "
        "processes; the server's CPU and RSS are theirs together (default 1: one process)",
    )
    p.add_argument(
        "--server-flags",
        default="",
        metavar="FLAGS",
        help="more `fastim serve` flags for a spawned node, one string "
        '(e.g. --server-flags="--ping-interval 5")',
    )
    p.add_argument("--server-pid", type=int, default=None, help="server to read RSS/CPU of")
    p.add_argument(
        "--server-pids",
        default=None,
        metavar="PID,PID,...",
        help="the server's CPU is these processes' together (the nodes of a cluster)",
    )
    p.add_argument("--client-cpu", default=None, help="CPUs for the generator, e.g. 1")
    p.add_argument(
        "--spread-ips",
        action="store_true",
        help=f"bind subscribers to 127.0.0.x source addresses (automatic above {CONNS_PER_IP:,})",
    )
    p.add_argument(
        "--idle", action="store_true", help="open N connections and report server RSS per conn"
    )
    p.add_argument(
        "--no-subscribe",
        action="store_true",
        help="with --idle: fastim connections stay unsubscribed",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="with --idle or --broadcast: seconds at most for the server's RSS to settle",
    )
    p.add_argument(
        "--broadcast",
        type=int,
        default=0,
        metavar="K",
        help="once every subscriber is connected (and the server's RSS settled, and the "
        "node watched idle for --idle-window), publish K messages one at a time and time "
        "each from its publish to its delivery to the last of ALL subscribers; checks "
        "that every subscriber got each exactly once",
    )
    p.add_argument(
        "--broadcast-gap",
        type=float,
        default=1.0,
        metavar="S",
        help="with --broadcast: seconds from one publish to the next, at least (default 1)",
    )
    p.add_argument(
        "--idle-window",
        type=float,
        default=10.0,
        metavar="S",
        help="with --broadcast: seconds the node is watched idle, every connection open "
        "and heartbeats flowing, before the broadcast: its CPU %% (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _cmd(args: argparse.Namespace) -> int:
    if args.subscribers < 1 or args.duration <= 0 or args.inflight < 1:
        print(
            "fastim bench: --subscribers, --duration and --inflight must be positive",
            file=sys.stderr,
        )
        return 2
    if not args.idle and args.subscribers < 2:
        print("fastim bench: need 2 subscribers at least (one is the probe)", file=sys.stderr)
        return 2
    if args.server_workers < 1 or args.broadcast < 0 or args.broadcast_gap < 0:
        print(
            "fastim bench: --server-workers must be positive, --broadcast and "
            "--broadcast-gap not negative",
            file=sys.stderr,
        )
        return 2
    if args.broadcast and (args.idle or args.rate):
        print(
            "fastim bench: --broadcast is a mode of its own (not with --idle or --rate)",
            file=sys.stderr,
        )
        return 2
    if args.server_workers > 1 and (args.url or args.peer):
        print(
            "fastim bench: --server-workers is for the node the bench spawns (no --url, --peer)",
            file=sys.stderr,
        )
        return 2
    try:
        parse_cpus(args.server_cpu)
        parse_cpus(args.client_cpu)
    except ValueError as e:
        print(f"fastim bench: {e}", file=sys.stderr)
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 1 if failed(result) else 0
