"""Issue P10 in one command: one node of 1..N workers against the same load generator.

For each repetition, each worker count in turn (alternating, so noise from the rest of
the machine falls on every count alike), ``fastim bench`` (in this process; its
subscriber workers are child processes) spawns ``fastim serve --workers W`` with its
workers pinned to the first W CPUs of ``--server-cpus`` (worker i on the i-th, round
robin when W is larger than the list: ``--server-cpus 0-7`` gives 1 worker CPU 0, 4
workers CPUs 0-3) and the generator pinned to ``--client-cpus``, and runs the cases:

  sat    saturation: N subscribers, one publisher, at most W publishes not yet received
         by every subscriber; deliveries/s, latency p50/p99, the server's CPU-seconds
         (supervisor and workers summed) and deliveries per server CPU-second
  bcast  broadcast: N subscribers over WebSocket, K messages one at a time; publish →
         the last of ALL subscribers, p50/p99 over the K messages; the node's RSS per
         connection and its CPU while idle

``--one-core`` is the cost of being several workers: ``--workers 1`` against
``--workers 2``, both pinned to the same single CPU (``--server-cpus 0``), so the second
worker adds no core, only the forwarding of publishes to the channel's owner worker and
its DELIVER to the other worker. The figure is the ratio of deliveries per server
CPU-second (2 workers / 1 worker, per repetition, then the median); issue P10 asks that
2 workers on one core cost no more than ~10% of one. Which worker the publisher lands on
is the kernel's choice (``SO_REUSEPORT``): on the channel's owner its publishes are
numbered there and only DELIVERed to the other worker, elsewhere each is forwarded to
the owner first. The bench reports the publisher's worker (its welcome's node id), this
script the owner (the mesh's rendezvous hash), and the ratio is also given per case.

    .venv/bin/python benchmarks/workers_scaling.py --workers 1,2 --server-cpus 0-1 --reps 3
    .venv/bin/python benchmarks/workers_scaling.py --one-core --server-cpus 0 --client-cpus 1 \\
        --stores memory,sqlite --reps 3
    # a 16-core host: workers on 0-7, the generator on 8-15
    .venv/bin/python benchmarks/workers_scaling.py --workers 1,2,4,8 --server-cpus 0-7 \\
        --client-cpus 8-15 --processes 8 --sat-n 8000 --bcast-n 100000 --reps 3

The output: one progress line per run on stderr, a markdown table per store on stdout,
the JSON report with every run with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim import bench  # noqa: E402
from fastim.bench.series import cell, median, run_argv, succeeded  # noqa: E402
from fastim.bench.serverstats import parse_cpus  # noqa: E402
from fastim.cluster.placement import owner  # noqa: E402

CHANNEL = "bench"  # the bench's default channel

CASES = ("sat", "bcast")


@dataclass
class Settings:
    sat_n: int = 1000
    sat_duration: float = 5.0
    inflight: int = 64
    window: str = "every"
    size: int = 64
    transport: str = "tcp"
    bcast_n: int = 10_000
    bcast_k: int = 10
    bcast_gap: float = 0.5
    idle_window: float = 3.0
    settle: float = 10.0
    drain: float = 30.0
    processes: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            sat_n=50,
            sat_duration=0.5,
            bcast_n=100,
            bcast_k=3,
            bcast_gap=0.1,
            idle_window=0.5,
            settle=0.5,
            drain=5.0,
        )


def worker_cpus(server_cpus: str, workers: int) -> str:
    """The CPUs of a node of ``workers`` workers: the first ``workers`` of the list (one
    each; round robin over the whole list when there are more workers than CPUs)."""
    cpus = parse_cpus(server_cpus)
    if not cpus:
        return "none"
    return ",".join(map(str, cpus[: max(1, workers)]))


def bench_args(
    case: str, workers: int, store: str, s: Settings, server_cpus: str, client_cpus: str | None
) -> list[str]:
    """The ``fastim bench`` command line of one run."""
    a = ["--server-workers", str(workers), "--server-cpu", worker_cpus(server_cpus, workers)]
    a += ["--store", store]
    a += ["--json", "--quiet", "--drain", str(s.drain), "--processes", str(s.processes)]
    a += ["-s", str(s.size)]
    if client_cpus not in (None, "none"):
        a += ["--client-cpu", str(client_cpus)]
    if case == "sat":
        a += ["--transport", s.transport, "-n", str(s.sat_n), "-d", str(s.sat_duration)]
        a += ["-w", str(s.inflight), "--window", s.window]
    else:
        a += ["--transport", "ws", "-n", str(s.bcast_n), "--broadcast", str(s.bcast_k)]
        a += ["--broadcast-gap", str(s.bcast_gap), "--idle-window", str(s.idle_window)]
        a += ["--settle", str(s.settle)]
        if s.bcast_n > bench.CONNS_PER_IP:
            a += ["--spread-ips"]
    return a


def on_owner(r: dict[str, Any], workers: int) -> bool | None:
    """Whether the publisher landed on the worker that owns the channel (its publishes
    are not forwarded over a link), None with one worker. The workers are ``w0`` ...
    and the owner is the rendezvous hash of the channel over them (the mesh's rule);
    the publisher's worker is the suffix of the node id its welcome gave."""
    node = r.get("publisher_node")
    if workers < 2 or not node or "." not in node:
        return None
    return node.rsplit(".", 1)[1] == owner(CHANNEL, [f"w{i}" for i in range(workers)])


def summarize(runs: list[dict[str, Any]], stores: list[str], workers: list[int]) -> dict[str, Any]:
    """Medians per (store, workers, case); with two worker counts, the ratios per rep."""
    out: dict[str, Any] = {}
    for store in stores:
        per: dict[str, Any] = {}
        for w in workers:
            m: dict[str, Any] = {}
            sat = [
                r["result"]
                for r in runs
                if (r["store"], r["workers"], r["case"]) == (store, w, "sat")
                and not r["result"].get("failed")
            ]
            if sat:
                m["sat"] = {
                    "runs": len(sat),
                    "all_ok": all(succeeded(r) for r in sat),
                    "deliveries_per_s": median([r["deliveries_per_s"] for r in sat]),
                    "p50_ms": median([r["latency_us"]["p50"] / 1000 for r in sat]),
                    "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in sat]),
                    "server_cpu_s": median([r["server"]["cpu_s"] for r in sat]),
                    "server_cpu_pct": median([r["server"]["cpu_pct"] for r in sat]),
                    "deliveries_per_cpu_s": median([r["deliveries_per_server_cpu_s"] for r in sat]),
                    "generator_cpu_pct": median([r["generator"]["load_pct_of_cores"] for r in sat]),
                    "each": [r["deliveries_per_s"] for r in sat],
                    "each_per_cpu_s": [r["deliveries_per_server_cpu_s"] for r in sat],
                }
            bc = [
                r["result"]
                for r in runs
                if (r["store"], r["workers"], r["case"]) == (store, w, "bcast")
                and not r["result"].get("failed")
            ]
            if bc:
                m["bcast"] = {
                    "runs": len(bc),
                    "all_ok": all(succeeded(r) for r in bc),
                    "exactly_once": all(r["exactly_once"] for r in bc),
                    "p50_ms": median([r["broadcast"]["p50_ms"] for r in bc]),
                    "p99_ms": median([r["broadcast"]["p99_ms"] for r in bc]),
                    "sampled_p99_ms": median([r["latency_us"]["p99"] / 1000 for r in bc]),
                    "rss_bytes_per_conn": median([r["server"]["rss_bytes_per_conn"] for r in bc]),
                    "rss_growth_bytes_per_conn": median(
                        [r["server"]["rss_growth_bytes_per_conn"] for r in bc]
                    ),
                    "idle_cpu_pct": median([r["server"]["idle_cpu_pct"] for r in bc]),
                }
            per[str(w)] = m
        ratios: dict[str, Any] = {}
        if len(workers) >= 2:
            base, other = workers[0], workers[1]
            pairs = []
            for rep in sorted({r["rep"] for r in runs}):

                def one(w: int, rep: int = rep, store: str = store) -> dict[str, Any] | None:
                    for r in runs:
                        if (r["store"], r["workers"], r["case"], r["rep"]) == (
                            store,
                            w,
                            "sat",
                            rep,
                        ):
                            res: dict[str, Any] = r["result"]
                            return None if res.get("failed") else res
                    return None

                a, b = one(base), one(other)
                if a and b and a.get("deliveries_per_server_cpu_s"):
                    pairs.append(
                        (
                            b["deliveries_per_server_cpu_s"] / a["deliveries_per_server_cpu_s"],
                            b["deliveries_per_s"] / a["deliveries_per_s"],
                            on_owner(b, other),
                        )
                    )
            if pairs:
                ratios = {
                    "of": f"{other} workers / {base}",
                    "per_cpu_s_each": [round(x, 3) for x, _, _ in pairs],
                    "per_cpu_s": round(statistics.median(x for x, _, _ in pairs), 3),
                    "deliveries_per_s_each": [round(y, 3) for _, y, _ in pairs],
                    "deliveries_per_s": round(statistics.median(y for _, y, _ in pairs), 3),
                    # the runs of the second count whose publisher was on the channel's
                    # owner worker (nothing forwarded) and those forwarded to the owner
                    "publisher_on_owner_each": [o for _, _, o in pairs],
                }
                for key, want in (("on_owner", True), ("forwarded", False)):
                    xs = [x for x, _, o in pairs if o is want]
                    ratios[f"per_cpu_s_{key}"] = round(statistics.median(xs), 3) if xs else None
                    ratios[f"runs_{key}"] = len(xs)
        out[store] = {"workers": per, "ratio": ratios}
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    st = report["settings"]
    cases = report.get("cases", CASES)
    what = [f"server workers on CPUs {report['server_cpus']}"]
    what.append(f"generator on {report['client_cpus']}")
    if "sat" in cases:
        what.append(
            f"saturation: {st['sat_n']:,} subscribers over {st['transport']}, {st['size']} B, "
            f"W={st['inflight']} ({st.get('window', 'every')}), {st['sat_duration']:g}s"
        )
    if "bcast" in cases:
        what.append(
            f"broadcast: {st['bcast_n']:,} WebSocket subscribers, {st['bcast_k']} messages "
            f"{st['bcast_gap']:g}s apart"
        )
    load = report["machine"]
    what.append(
        f"load average {load['loadavg_start'][0]} at the start, {load['loadavg_end'][0]} at the end"
    )
    lines = [
        f"`{report['command']}`",
        "",
        f"({report['date']}, {report['reps']} repetitions, medians; " + "; ".join(what) + ")",
        "",
    ]
    for store, per in s.items():
        lines += [
            f"**{store} store**",
            "",
            "| workers | deliveries/s | p50 / p99 latency | server CPU-s | server CPU "
            "| deliveries per server CPU-s | broadcast time to last p50 / p99 "
            "| node RSS per conn (growth) | node CPU idle |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for w, m in per["workers"].items():
            sat = m.get("sat", {})
            bc = m.get("bcast", {})
            lines.append(
                "| "
                + " | ".join(
                    [
                        w,
                        cell(sat.get("deliveries_per_s")),
                        f"{cell(sat.get('p50_ms'), ',.1f')} / {cell(sat.get('p99_ms'), ',.1f')} ms"
                        if sat
                        else "–",
                        cell(sat.get("server_cpu_s"), ",.2f"),
                        cell(sat.get("server_cpu_pct"), ",.0f", "%"),
                        cell(sat.get("deliveries_per_cpu_s")),
                        f"{cell(bc.get('p50_ms'), ',.1f')} / {cell(bc.get('p99_ms'), ',.1f')} ms"
                        if bc
                        else "–",
                        f"{cell(bc.get('rss_bytes_per_conn'), ',.0f', ' B')} "
                        f"({cell(bc.get('rss_growth_bytes_per_conn'), ',.0f', ' B')})"
                        if bc
                        else "–",
                        cell(bc.get("idle_cpu_pct"), ",.2f", "%") if bc else "–",
                    ]
                )
                + " |"
            )
        each = "; ".join(
            f"{w} workers: " + " / ".join(cell(x) for x in m["sat"]["each"])
            for w, m in per["workers"].items()
            if "sat" in m
        )
        if each:
            lines += ["", f"Per repetition, deliveries/s: {each}."]
        r = per.get("ratio")
        if r:
            lines += [
                "",
                f"Ratio {r['of']}, same repetition: deliveries per server CPU-second "
                f"**{r['per_cpu_s']:.3f}** (each: "
                + ", ".join(f"{x:.3f}" for x in r["per_cpu_s_each"])
                + f"), deliveries/s {r['deliveries_per_s']:.3f} (each: "
                + ", ".join(f"{x:.3f}" for x in r["deliveries_per_s_each"])
                + ").",
            ]
            split = [
                f"{what} {r[f'per_cpu_s_{key}']:.3f} ({r[f'runs_{key}']} runs)"
                for key, what in (
                    ("on_owner", "publisher on the channel's owner worker"),
                    ("forwarded", "publisher on another worker (publishes forwarded)"),
                )
                if r.get(f"per_cpu_s_{key}") is not None
            ]
            if split:
                lines += ["", "Deliveries per server CPU-second, by run: " + "; ".join(split) + "."]
        lines.append("")
    bad = [r for r in report["runs"] if not succeeded(r["result"])]
    lines.append(
        "Every run: zero loss, reordering, duplicates and errors; every broadcast exactly once."
        if not bad
        else f"**{len(bad)} run(s) failed**: "
        + "; ".join(
            f"{r['store']} {r['workers']}w {r['case']} rep {r['rep']}: "
            + "; ".join(r["result"].get("errors", []))[:200]
            for r in bad
        )
    )
    return "\n".join(lines)


def _line(r: dict[str, Any]) -> str:
    if r.get("failed"):
        return "FAILED: " + "; ".join(r.get("errors", []))[:300]
    flag = "" if succeeded(r) else "  !! " + "; ".join(r.get("errors", []))[:200]
    if r.get("mode") == "broadcast":
        b = r["broadcast"]
        s = r["server"]
        return (
            f"broadcast to last p50 {cell(b['p50_ms'], ',.1f')} ms p99 "
            f"{cell(b['p99_ms'], ',.1f')} ms  once {r['exactly_once']}  RSS "
            f"{cell(s['rss_bytes_per_conn'])} B/conn  idle CPU {s['idle_cpu_pct']}%{flag}"
        )
    lat = r["latency_us"]
    return (
        f"{r['deliveries_per_s']:>12,.0f} deliveries/s  p50 {lat['p50'] / 1000:6.1f} ms"
        f"  p99 {lat['p99'] / 1000:6.1f} ms  server {r['server']['cpu_pct']}%"
        f" {cell(r['deliveries_per_server_cpu_s'])}/CPU-s"
        f"  gen {r['generator']['load_pct_of_cores']}%{flag}"
    )


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", default=None, help="worker counts, e.g. 1,2,4 (default 1,2)")
    p.add_argument(
        "--one-core",
        action="store_true",
        help="1 vs 2 workers on the same single CPU (--server-cpus must be one CPU)",
    )
    p.add_argument("--server-cpus", default="0", help="CPUs of the node's workers (taskset list)")
    p.add_argument("--client-cpus", default="1", help="CPUs of the generator ('none': not pinned)")
    p.add_argument("--stores", default="memory", help="comma list of memory, sqlite")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and durations: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    d = Settings()
    for name, value in asdict(d).items():
        if name == "transport":
            p.add_argument("--transport", choices=("tcp", "ws"), default=None)
            continue
        if name == "window":
            p.add_argument("--window", choices=("every", "probe"), default=None)
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    a = p.parse_args(argv)
    s = Settings.quick() if a.quick else Settings()
    for name in asdict(d):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    workers = [int(x) for x in (a.workers or "1,2").split(",") if x.strip()]
    server_cpus = parse_cpus(a.server_cpus)
    if a.one_core:
        workers = [1, 2]
        if len(server_cpus) != 1:
            p.error("--one-core: --server-cpus must be one CPU")
    stores = [x.strip() for x in a.stores.split(",") if x.strip()]
    cases = [c for c in CASES if c in a.cases.split(",")]
    if any(x not in ("memory", "sqlite") for x in stores) or not cases or not workers:
        p.error("bad --stores, --cases or --workers")

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    load_start = os.getloadavg()
    for rep in range(1, a.reps + 1):
        for store in stores:
            for case in cases:
                for w in workers:
                    argv_b = bench_args(case, w, store, s, a.server_cpus, a.client_cpus)
                    t0 = time.monotonic()
                    r = run_argv(argv_b)
                    where = on_owner(r, w)
                    runs.append(
                        {
                            "rep": rep,
                            "store": store,
                            "case": case,
                            "workers": w,
                            "publisher_on_owner": where,
                            "result": r,
                        }
                    )
                    say(
                        f"[rep {rep}/{a.reps}] {store:6s} {case:5s} {w} worker(s)  {_line(r)}"
                        + ("" if where is None else "  [publisher on the owner]" if where else "")
                        + f"  ({time.monotonic() - t0:.1f}s)"
                    )
                    time.sleep(0.5)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "benchmarks/workers_scaling.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "reps": a.reps,
        "server_cpus": a.server_cpus,
        "client_cpus": a.client_cpus,
        "one_core": a.one_core,
        "cases": cases,
        "settings": asdict(s),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summarize(runs, stores, workers),
        "runs": runs,
    }
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2))
        say(f"wrote {a.out}")
    print(markdown(report))
    return 0 if all(succeeded(r["result"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
