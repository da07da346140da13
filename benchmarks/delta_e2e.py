"""Delta compression end to end: wire bytes and deliveries/s, with and without deltas.

A ~10 KB JSON document (a table of 100 rows) changes ~1% per message (one row's fields).
A node is spawned pinned to one CPU (``taskset -c 0``) with the namespace ``doc`` set to
``delta = "fossil"``; this process, pinned to another (CPU 1), holds N WebSocket JSON
subscribers of ``doc:bench`` that all ask for deltas or none of them, and one publisher
that keeps at most ``--window`` publishes ahead of the last subscriber. Each mode is a
fresh node in the same invocation: plain, delta, and both again with permessage-deflate
offered. Subscribers count messages and the bytes the node sent them (WebSocket frames,
headers included); sampled subscribers apply every delta (``_core.fossil_apply``) and
check the document they get against the one published at that offset, byte for byte.

    .venv/bin/python benchmarks/delta_e2e.py                   # 1,000 subscribers
    .venv/bin/python benchmarks/delta_e2e.py -n 200 -d 3 --json

Reuses the WebSocket client of benchmarks/deflate_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.deflate_e2e import Subscriber as BaseSubscriber  # noqa: E402
from benchmarks.deflate_e2e import (  # noqa: E402
    Totals,
    free_port,
    measure,
)
from fastim import _core  # noqa: E402
from fastim.bench.spawn import wait_listening  # noqa: E402

CHANNEL = b"doc:bench"
CONFIG = '[namespaces.doc]\ndelta = "fossil"\nhistory_size = 16\n'


def versions(count: int, rows: int = 100, seed: int = 7) -> list[bytes]:
    """``count`` versions of a ~10 KB JSON document, each changing one row in ``rows``
    (~1% of it) from the one before: a dashboard's state, a leaderboard, an order book."""
    r = random.Random(seed)
    doc: dict[str, Any] = {
        "type": "dashboard.state",
        "rows": [
            {
                "id": f"svc-{i:03d}",
                "name": f"service {i} (eu-west-{i % 3 + 1})",
                "status": "ok",
                "latency_ms": round(r.uniform(1, 80), 2),
                "rps": r.randrange(10, 5000),
                "errors": 0,
            }
            for i in range(rows)
        ],
    }
    out = []
    for k in range(count):
        row = doc["rows"][r.randrange(rows)]
        row["latency_ms"] = round(r.uniform(1, 80), 2)
        row["rps"] = r.randrange(10, 5000)
        row["errors"] = r.randrange(0, 3)
        row["status"] = "ok" if row["errors"] == 0 else "degraded"
        doc["seq"] = k
        out.append(json.dumps(doc, separators=(",", ":")).encode())
    return out


class Subscriber(BaseSubscriber):
    """Asks for deltas (or not); a sampled one applies them and checks every document."""

    channel = CHANNEL

    def __init__(
        self,
        port: int,
        deflate: bool,
        delta: bool,
        totals: Totals,
        sample: bool,
        bodies: list[bytes],
    ) -> None:
        super().__init__(port, deflate, totals, sample)
        self.delta = delta
        self.bodies = bodies
        self.deltas = 0
        self.base: bytes | None = None

    def sub_command(self) -> bytes:
        d = b',"delta":"fossil"' if self.delta else b""
        return b'{"op":"sub","ch":"%s","id":1%s}' % (self.channel, d)

    def check(self, off: int, msg: dict[str, Any], payload: bytes) -> None:
        t = self.totals
        if msg.get("delta") is True:
            if self.base is None:
                t.errors.append(f"a delta at {off} without a base")
                return
            data = _core.fossil_apply(self.base, msg["data"].encode())
            self.deltas += 1
        else:
            key = b'"off":%d,"data":' % off
            data = payload[payload.index(key) + len(key) : -1]
        if data != self.bodies[(off - 1) % len(self.bodies)]:
            t.errors.append(f"offset {off}: not the published document")
        self.base = data
        t.checked += 1


def start_node(args: argparse.Namespace, port: int, config: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "fastim", "serve", "--tcp-port", "0", "--ws-port", str(port),
        "--log-level", "warning", "--ping-interval", "3600", "--store", "memory",
        "--config", str(config), "--max-message", str(1 << 20),
    ]  # fmt: skip
    if args.server_cpu >= 0:
        cmd = ["taskset", "-c", str(args.server_cpu), *cmd]
    env = {**os.environ, "PYTHONPATH": str(args.root)}
    proc = subprocess.Popen(cmd, env=env, cwd=config.parent)
    wait_listening(port, proc, "node", timeout=15)
    return proc


async def run_once(
    args: argparse.Namespace, delta: bool, deflate: bool, bodies: list[bytes], config: Path
) -> dict[str, Any]:
    port = free_port()

    def deltas(_totals: Totals, subs: list[BaseSubscriber]) -> int:
        return sum(s.deltas for s in subs if isinstance(s, Subscriber) and s.sample)

    _subs, r = await measure(
        args,
        start_node(args, port, config),
        port,
        lambda totals, sample: Subscriber(port, deflate, delta, totals, sample, bodies),
        bodies,
        CHANNEL,
        deltas,
    )
    r["delta_share"] = r.pop("share")  # of the messages checked
    return {
        "mode": ("delta" if delta else "plain") + ("+deflate" if deflate else ""),
        "document_bytes": round(statistics.mean(len(b) for b in bodies)),
        **r,
    }


def kernel_figures(bodies: list[bytes]) -> dict[str, Any]:
    """What one delta costs and saves, outside the node (compiled core)."""
    n = min(200, len(bodies) - 1)
    sizes = [len(_core.fossil_delta(bodies[i], bodies[i + 1], True)) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
        _core.fossil_delta(bodies[i], bodies[i + 1], True)
    make = (time.perf_counter() - t0) / n
    deltas = [_core.fossil_delta(bodies[i], bodies[i + 1], True) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
        _core.fossil_apply(bodies[i], deltas[i])
    apply = (time.perf_counter() - t0) / n
    return {
        "document_bytes": round(statistics.mean(len(b) for b in bodies[:n])),
        "delta_bytes": round(statistics.mean(sizes), 1),
        "fossil_delta_us": round(make * 1e6, 1),
        "fossil_apply_us": round(apply * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--subscribers", type=int, default=1000)
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--runs", type=int, default=1, help="runs per mode; medians reported")
    p.add_argument("--sample", type=int, default=10, help="subscribers that check every message")
    p.add_argument("--no-deflate", action="store_true", help="skip the permessage-deflate modes")
    p.add_argument("--server-cpu", type=int, default=0, help="taskset CPU of the node (-1: none)")
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of this process (-1: none)")
    p.add_argument("--root", type=Path, default=ROOT, help="source tree the node runs from")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    bodies = versions(1000)
    result: dict[str, Any] = {"kernels": kernel_figures(bodies), "runs": []}
    modes = [(False, False), (True, False)]
    if not args.no_deflate:
        modes += [(False, True), (True, True)]
    with tempfile.TemporaryDirectory(prefix="fastim-delta-bench-") as tmp:
        config = Path(tmp) / "fastim.toml"
        config.write_text(CONFIG)
        for delta, deflate in modes:
            for _ in range(args.runs):
                r = runner(run_once(args, delta, deflate, bodies, config))
                result["runs"].append(r)
                if not args.json:
                    print(json.dumps(r), file=sys.stderr)
    keys = (
        "deliveries_per_s",
        "wire_bytes_per_delivery",
        "node_us_per_delivery",
        "node_cpu",
        "client_cpu",
        "delta_share",
    )
    summary = []
    for mode in dict.fromkeys(r["mode"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["mode"] == mode]
        summary.append(
            {
                "mode": mode,
                **{k: statistics.median(r[k] for r in runs) for k in keys},
                "gaps": sum(r["gaps"] for r in runs),
            }
        )
    plain = next(s for s in summary if s["mode"] == "plain")
    for s in summary:
        s["wire_factor_vs_plain"] = round(
            plain["wire_bytes_per_delivery"] / max(1e-9, s["wire_bytes_per_delivery"]), 1
        )
    result["summary"] = summary
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(result["kernels"]))
        for row in summary:
            print(json.dumps(row))
    bad = any(r["gaps"] or r["errors"] for r in result["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
