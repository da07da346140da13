"""Saturation under the strict window, measured by an independent C generator.

``benchmarks/cgen/wsgen.c`` (compiled here with the system's C compiler, cached in
``benchmarks/cgen/build/``) holds N WebSocket subscribers and one publisher that keeps at
most W messages not yet received by *every* subscriber, and checks that each subscriber
gets every message once, in order. It is C with one epoll loop, so the server is the
slower side (issue P10, item 0: "one core that never waits"). This script starts each
server pinned to ``--server-cpu``, runs the generator pinned to ``--client-cpu``, and
reads the server's CPU time from ``/proc`` over exactly the generator's measured window:
the **server's core busy** figure tells a saturated server from one that waits.

    .venv/bin/python benchmarks/cgen_e2e.py --servers fastim,socketify --reps 3

Servers: ``fastim`` (``fastim serve``, WebSocket JSON; ``--store``), and the peers of
``benchmarks/peers/`` (their broadcast protocol). ``--build LABEL=DIR`` runs fastim from
another checkout's package directory too (a before/after pair of the compiled core:
each DIR holds a ``fastim`` package), alternating with the others in every repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.peers_e2e import Server, available_servers  # noqa: E402

SOURCE = HERE / "cgen" / "wsgen.c"
BUILD = HERE / "cgen" / "build"


def compile_generator() -> Path:
    """The generator's binary, compiled when missing or older than its source."""
    exe = BUILD / "wsgen"
    if exe.exists() and exe.stat().st_mtime >= SOURCE.stat().st_mtime:
        return exe
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("cgen_e2e: no C compiler (apt-get install gcc)")
    BUILD.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times(cpu: int) -> list[int]:
    """One CPU's line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            return [int(x) for x in line.split()[1:9]]
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def core_shares(a: list[int], b: list[int]) -> dict[str, float]:
    """Busy and softirq shares of one CPU between two samples. The kernel charges the
    loopback's receive path (softirq, run on the sending core) to no process, so a
    server's own CPU time under-reports how busy its core is: here, 10-12%."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    total = sum(d) or 1
    return {"core_busy": 1 - (d[3] + d[4]) / total, "core_softirq": d[6] / total}


def run_generator(exe: Path, server: Server, mode: str, a: argparse.Namespace) -> dict[str, Any]:
    """One generator run against a started server: its JSON report, plus the server's
    CPU share over the measured window (``server_cpu``: 1.0 is a whole core)."""
    port = server.port
    path = "/ws" if mode == "fastim" else "/"
    cmd = [exe, "--port", str(port), "--path", path, "--mode", mode, "--marks"]
    cmd += ["--subs", str(a.subs), "--window", str(a.window), "--size", str(a.size)]
    cmd += ["--duration", str(a.duration), "--warmup", str(a.warmup)]
    if a.client_cpu:
        cmd = ["taskset", "-c", a.client_cpu, *cmd]
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    c0 = c1 = t0 = t1 = None
    core = int(a.server_cpu) if a.server_cpu.isdigit() else None
    k0: list[int] = []
    k1: list[int] = []
    report: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith("mark start"):
            c0, t0 = cpu_seconds(server.pid), time.monotonic()
            k0 = cpu_times(core) if core is not None else []
        elif line.startswith("mark end"):
            c1, t1 = cpu_seconds(server.pid), time.monotonic()
            k1 = cpu_times(core) if core is not None else []
        elif line.startswith("{"):
            report = json.loads(line)
    err = proc.stderr.read() if proc.stderr else ""
    rc = proc.wait()
    if rc != 0 or not report:
        report.setdefault("errors", 1)
        report["error"] = (report.get("error") or err.strip() or f"exit status {rc}")[:300]
    if None not in (c0, c1, t0, t1):
        assert c0 is not None and c1 is not None and t0 is not None and t1 is not None
        report["server_cpu"] = (c1 - c0) / (t1 - t0)
        rate = report.get("deliveries_per_s") or 0
        if report["server_cpu"] > 0:
            report["deliveries_per_server_cpu_s"] = rate / report["server_cpu"]
    if k0 and k1:
        report.update(core_shares(k0, k1))
    return report


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="fastim", help="comma-separated (fastim and peers)")
    p.add_argument(
        "--build",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run fastim from DIR (holding a fastim package), named LABEL",
    )
    p.add_argument("--store", default="memory", help="fastim's store (memory, sqlite)")
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--flags", default="", help="extra fastim serve flags (one string)")
    p.add_argument("--out", help="write every run and the summary as JSON here")
    a = p.parse_args(argv)

    exe = compile_generator()
    names = [s for s in a.servers.split(",") if s]
    unknown = [s for s in names if s not in available_servers()]
    if unknown:
        raise SystemExit(f"cgen_e2e: not available here: {', '.join(unknown)}")
    cases: list[tuple[str, str, str | None]] = [(n, n, None) for n in names]
    for spec in a.build:
        label, _, d = spec.partition("=")
        if not d or not (Path(d) / "fastim").is_dir():
            raise SystemExit(f"cgen_e2e: --build {spec}: want LABEL=DIR with DIR/fastim")
        cases.append((label, "fastim", str(Path(d).resolve())))

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cgen-e2e-") as tmp:
        logdir = Path(tmp)
        for rep in range(a.reps):
            for label, kind, pythonpath in cases:
                server = Server(
                    kind, a.server_cpu, logdir, a.store, pythonpath, a.flags.split() or None
                )
                try:
                    server.wait_ready()
                    r = run_generator(exe, server, "fastim" if kind == "fastim" else "raw", a)
                finally:
                    server.stop()
                r.update(case=label, rep=rep)
                runs.append(r)
                print(
                    f"{label:>12} rep {rep}: {r.get('deliveries_per_s', 0):>12,.0f} deliveries/s"
                    f"  server process {100 * r.get('server_cpu', 0):5.1f}%"
                    f"  its core busy {100 * r.get('core_busy', 0):5.1f}%"
                    f" (softirq {100 * r.get('core_softirq', 0):4.1f}%)"
                    f"  p50/p99 {r.get('latency_ms', {}).get('p50')}/"
                    f"{r.get('latency_ms', {}).get('p99')} ms"
                    f"  every-subscriber p50 {r.get('latency_all_ms', {}).get('p50')} ms"
                    f"  generator {100 * r.get('generator_cpu', 0):4.0f}%"
                    + (f"  ERROR {r['error']}" if r.get("errors") else ""),
                    flush=True,
                )

    summary: dict[str, Any] = {}
    for label, _kind, _pp in cases:
        rs = [r for r in runs if r["case"] == label and not r.get("errors")]
        summary[label] = {
            "runs": len(rs),
            "failed": sum(1 for r in runs if r["case"] == label and r.get("errors")),
            "deliveries_per_s": med([r["deliveries_per_s"] for r in rs]),
            "server_cpu": med([r.get("server_cpu") for r in rs]),
            "core_busy": med([r.get("core_busy") for r in rs]),
            "core_softirq": med([r.get("core_softirq") for r in rs]),
            "deliveries_per_server_cpu_s": med([r.get("deliveries_per_server_cpu_s") for r in rs]),
            "p50_ms": med([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": med([r["latency_ms"]["p99"] for r in rs]),
            "every_p50_ms": med([r["latency_all_ms"]["p50"] for r in rs]),
            "generator_cpu": med([r["generator_cpu"] for r in rs]),
        }
    print()
    print(
        "| server | deliveries/s | server process CPU | its core busy (softirq) "
        "| deliveries per server CPU-s "
        "| p50 / p99 per delivery | every subscriber p50 | generator core |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        if not s["runs"]:
            print(f"| {label} | failed | | | | | | |")
            continue
        print(
            f"| {label} | {s['deliveries_per_s']:,.0f} | {100 * (s['server_cpu'] or 0):.0f}% "
            f"| {100 * (s['core_busy'] or 0):.0f}% ({100 * (s['core_softirq'] or 0):.0f}%) "
            f"| {s['deliveries_per_server_cpu_s'] or 0:,.0f} | {s['p50_ms']:.1f} / "
            f"{s['p99_ms']:.1f} ms | {s['every_p50_ms']:.1f} ms "
            f"| {100 * s['generator_cpu']:.0f}% |"
        )
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary}))
    return 1 if any(s["failed"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
