"""Issue P2 in one command: fastim and its peers side by side, same core, same generator.

For each repetition, each server in turn (fastim over WebSocket, then the peers in
benchmarks/peers/) is started pinned to ``--server-cpu`` (``taskset``), and the same
load generator (``fastim bench``, in this process, pinned to ``--client-cpu``; its
worker processes inherit the pin) drives it through the cases:

  idle  N idle WebSocket connections (fastim: subscribed): server RSS growth per connection
  sat   saturation: N subscribers, one publisher, at most W publishes in flight (not yet
        received by every subscriber; ``--window probe``: by the probe, the rule before P10)
  rate  fixed rate: N subscribers × R msg/s each, latency p50/p99

The peers: websockets, picows and socketify (uWebSockets), each a plain broadcast server in
benchmarks/peers/; the default ``--servers`` is fastim and the peers whose library is
installed (socketify is not among the test extras: ``pip install socketify``).

Idle runs first, on the freshly started server, so its RSS baseline is not mixed with
what the other cases left behind. Servers are interleaved within a repetition, so noise
from the rest of the machine falls on all of them alike. Each run is checked for loss,
reordering and duplicates; the report gives medians over repetitions and the ratios
fastim/peer, as JSON (``--out``) and as a markdown table for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/peers_e2e.py --reps 3 --out peers.json
    .venv/bin/python benchmarks/peers_e2e.py --quick --reps 1      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from fastim.bench.series import cell, median, run_argv, succeeded  # noqa: E402

PEERS = ROOT / "benchmarks" / "peers"
SERVERS = ("fastim", "websockets", "picows", "socketify")


def available_servers() -> tuple[str, ...]:
    """fastim and the peers whose library is installed here."""
    return tuple(s for s in SERVERS if s == "fastim" or importlib.util.find_spec(s) is not None)


CASES = ("idle", "sat", "rate")
CASE_TITLES = {
    "sat": "(a) saturation",
    "rate": "(b) fixed rate",
    "idle": "(c) idle connections",
}


@dataclass
class Settings:
    sat_n: int = 1000
    sat_duration: float = 5.0
    inflight: int = 64
    size: int = 64
    rate_n: int = 10_000
    rate_duration: float = 10.0
    rate: float = 2.0
    idle_n: int = 10_000
    settle: float = 10.0
    drain: float = 30.0
    window: str = "every"

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            sat_n=50,
            sat_duration=0.5,
            rate_n=50,
            rate_duration=1.0,
            rate=10.0,
            idle_n=50,
            settle=0.6,
            drain=5.0,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: str | None) -> list[str]:
    if cpu is None or cpu == "none" or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpu]


class Server:
    """One server process, pinned, with its log in a file (a pipe could fill and block it)."""

    def __init__(
        self,
        name: str,
        cpu: str | None,
        logdir: Path,
        fastim_store: str = "sqlite",
        pythonpath: str | None = None,
        flags: list[str] | None = None,
    ) -> None:
        """``pythonpath``: a directory holding another ``fastim`` package, imported
        before this checkout's (a before/after pair); ``flags``: more ``fastim serve``
        flags."""
        self.name = name
        self.port = _free_port()
        py = sys.executable
        if name == "fastim":
            cmd = [py, "-m", "fastim", "serve", "--tcp-port", "0", "--ws-port", str(self.port)]
            cmd += ["--log-level", "info", "--node-id", "peers-e2e"]
            cmd += ["--publish-rate", "0"]  # a guard for the internet; the peers have none
            cmd += ["--store", fastim_store]  # sqlite (the default, a file in workdir) or memory
            cmd += flags or []
            self.url_flag, self.url = "--url", f"ws://127.0.0.1:{self.port}/ws"
        else:
            script = PEERS / f"{name}_broadcast.py"
            cmd = [py, str(script), "--host", "127.0.0.1", "--port", str(self.port)]
            self.url_flag, self.url = "--peer", f"ws://127.0.0.1:{self.port}/"
        self.log_path = logdir / f"{name}-{self.port}.log"
        workdir = logdir / f"{name}-{self.port}"  # fastim's sqlite file: fresh per start
        workdir.mkdir(exist_ok=True)
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        path = [pythonpath] if pythonpath else []
        path += [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.proc = subprocess.Popen(
            _pin(cpu) + cmd, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.pid = self.proc.pid  # taskset execs the server: same pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "listening" in text:
                # a peer names its own pid; it must be the one whose RSS and CPU are read
                m = re.search(r"listening on \S+ pid=(\d+)", text)
                if m:
                    self.pid = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def bench_args(server: Server, case: str, s: Settings, client_cpu: str | None) -> list[str]:
    """The ``fastim bench`` command line of one case against one server."""
    a = [server.url_flag, server.url, "--server-pid", str(server.pid), "--json", "--quiet"]
    a += ["--channel", f"e2e-{case}", "--drain", str(s.drain), "--processes", "1"]
    if client_cpu not in (None, "none"):
        a += ["--client-cpu", str(client_cpu)]
    if case == "sat":
        a += ["-n", str(s.sat_n), "-d", str(s.sat_duration), "-w", str(s.inflight)]
        a += ["-s", str(s.size), "--window", s.window]
    elif case == "rate":
        a += ["-n", str(s.rate_n), "-d", str(s.rate_duration), "--rate", str(s.rate)]
        a += ["-s", str(s.size), "--window", s.window]
    else:
        a += ["-n", str(s.idle_n), "--idle", "--settle", str(s.settle)]
    return a


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (case, server) and the ratios fastim/peer."""
    out: dict[str, Any] = {}
    for case in CASES:
        per: dict[str, Any] = {}
        for srv in SERVERS:
            rs = [r["result"] for r in runs if r["case"] == case and r["server"] == srv]
            if not rs:
                continue
            good = [r for r in rs if not r.get("failed")]
            m: dict[str, Any] = {
                "runs": len(rs),
                "all_ok": all(succeeded(r) for r in rs),
                "lost": sum(r.get("lost", 0) or 0 for r in good),
                "reordered": sum(r.get("reordered", 0) or 0 for r in good),
                "duplicates": sum(r.get("duplicates", 0) or 0 for r in good),
            }
            if case == "idle":
                m["bytes_per_conn"] = median(
                    [r["server"]["rss_growth_bytes_per_conn"] for r in good]
                )
            else:
                m["deliveries_per_s"] = median([r["deliveries_per_s"] for r in good])
                m["p50_ms"] = median([r["latency_us"]["p50"] / 1000 for r in good])
                m["p99_ms"] = median([r["latency_us"]["p99"] / 1000 for r in good])
                m["server_cpu_pct"] = median([r["server"]["cpu_pct"] for r in good])
                m["generator_cpu_pct"] = median([r["generator"]["load_pct_of_cores"] for r in good])
                if case == "sat":
                    m["starved_runs"] = sum(1 for r in good if _starved(r))
            per[srv] = m
        if not per:
            continue
        f = per.get("fastim")
        ratios: dict[str, Any] = {}
        for peer in SERVERS[1:]:
            p = per.get(peer)
            if f is None or p is None:
                continue
            if case == "idle":
                ratios[peer] = {"bytes_per_conn": _ratio(f["bytes_per_conn"], p["bytes_per_conn"])}
            else:
                ratios[peer] = {
                    "deliveries_per_s": _ratio(f["deliveries_per_s"], p["deliveries_per_s"]),
                    "p99": _ratio(f["p99_ms"], p["p99_ms"]),
                }
        out[case] = {"servers": per, "ratio_fastim_over": ratios}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def targets(summary: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """Issue P2's targets against the medians: (target, met?, figure)."""
    out: list[tuple[str, bool | None, str]] = []
    sat = summary.get("sat", {}).get("ratio_fastim_over", {})
    for peer, need in (("picows", 5.0), ("websockets", 8.0)):
        r = sat.get(peer, {}).get("deliveries_per_s")
        if r is not None:
            out.append((f"saturation ≥ {need:g}× {peer}", r >= need, f"{r:.1f}×"))
    rate = summary.get("rate", {}).get("servers", {})
    if "fastim" in rate and "picows" in rate:
        f, p = rate["fastim"]["p99_ms"], rate["picows"]["p99_ms"]
        if f is not None and p is not None:
            out.append(("p99 at fixed rate ≤ picows", f <= p, f"{f:.1f} vs {p:.1f} ms"))
    idle = summary.get("idle", {}).get("servers", {}).get("fastim")
    if idle and idle["bytes_per_conn"] is not None:
        b = idle["bytes_per_conn"]
        out.append(("idle ≤ 2 KiB RSS per connection", b <= 2048, f"{b:,.0f} B"))
    all_ok = all(m["all_ok"] for c in summary.values() for m in c["servers"].values())
    out.append(("zero loss / reordering / errors, every run", all_ok, "yes" if all_ok else "NO"))
    return out


def markdown(report: dict[str, Any]) -> str:
    """The table for benchmarks/RESULTS.md."""
    s = report["summary"]
    st = report["settings"]
    servers = [x for x in SERVERS if any(x in c["servers"] for c in s.values())]
    peers = [x for x in servers if x != "fastim"]
    head = ["case", "metric", *servers] + [f"fastim/{p}" for p in peers]
    lines = [
        f"**fastim vs peers, side by side** ({report['date']}, {report['reps']} repetitions, "
        f"medians; server pinned to CPU {report['server_cpu']}, generator to CPU "
        f"{report['client_cpu']}; fastim over WebSocket, JSON subprotocol, "
        f"{report.get('fastim_store', 'sqlite')} store)",
        "",
        f"`{report['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def row(
        case: str, metric: str, get: Callable[[dict[str, Any]], str], ratio: str | None
    ) -> None:
        c = s.get(case)
        if c is None:
            return
        cells = [get(c["servers"][x]) if x in c["servers"] else "–" for x in servers]
        rs = []
        for p in peers:
            r = c["ratio_fastim_over"].get(p, {}).get(ratio) if ratio else None
            rs.append(f"{r:,.2f}×" if r is not None else "")
        lines.append("| " + " | ".join(["", metric, *cells, *rs]) + " |")

    def title(case: str, what: str) -> None:
        if case in s:
            lines.append(
                "| " + " | ".join([f"{CASE_TITLES[case]}: {what}"] + [""] * (len(head) - 1)) + " |"
            )

    sat = (
        f"{st['sat_n']:,} subscribers, {st['size']} B, W={st['inflight']} "
        f"({'every subscriber' if st.get('window', 'every') == 'every' else 'the probe'})"
    )
    rate = f"{st['rate_n']:,} subscribers × {st['rate']:g} msg/s"
    title("sat", sat)
    row("sat", "deliveries/s", lambda m: cell(m["deliveries_per_s"]), "deliveries_per_s")
    row(
        "sat",
        "p50 / p99 latency",
        lambda m: f"{cell(m['p50_ms'], ',.1f')} / {cell(m['p99_ms'], ',.1f')} ms",
        "p99",
    )
    row(
        "sat",
        "server / generator CPU",
        lambda m: f"{cell(m['server_cpu_pct'])}% / {cell(m['generator_cpu_pct'])}%",
        None,
    )
    title("rate", rate)
    row(
        "rate",
        "p50 / p99 latency",
        lambda m: f"{cell(m['p50_ms'], ',.1f')} / {cell(m['p99_ms'], ',.1f')} ms",
        "p99",
    )
    row(
        "rate",
        "server / generator CPU",
        lambda m: f"{cell(m['server_cpu_pct'])}% / {cell(m['generator_cpu_pct'])}%",
        None,
    )
    title("idle", f"{st['idle_n']:,} WebSocket connections (fastim: subscribed)")
    row(
        "idle",
        "server RSS per connection",
        lambda m: cell(m["bytes_per_conn"], ",.0f", " B"),
        "bytes_per_conn",
    )
    lines.append("")
    lines.append(
        "lost / reordered / duplicates over all runs: "
        + ", ".join(
            f"{srv} {sum(c['servers'][srv]['lost'] for c in s.values() if srv in c['servers'])}"
            f" / {sum(c['servers'][srv]['reordered'] for c in s.values() if srv in c['servers'])}"
            f" / {sum(c['servers'][srv]['duplicates'] for c in s.values() if srv in c['servers'])}"
            for srv in servers
        )
    )
    starved = {
        srv: m["starved_runs"]
        for srv, m in s.get("sat", {}).get("servers", {}).items()
        if m.get("starved_runs")
    }
    if starved:
        lines.append("")
        lines.append(
            f"Saturation runs where the server and the generator both used less than "
            f"{STARVED_PCT}% of their cores (so something else held them; rerun on a quiet "
            "machine): "
            + ", ".join(
                f"{srv} {n} of {s['sat']['servers'][srv]['runs']}" for srv, n in starved.items()
            )
            + "."
        )
    lines.append("")
    lines.append("| target | met | figure |")
    lines.append("|---|---|---|")
    for name, met, fig in targets(s):
        lines.append(f"| {name} | {'yes' if met else 'no' if met is not None else '–'} | {fig} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument(
        "--servers",
        default=",".join(available_servers()),
        help="comma list of " + ", ".join(SERVERS) + " (default: those installed here)",
    )
    p.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    p.add_argument("--quick", action="store_true", help="tiny sizes and durations: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--server-cpu", default="0", help="CPU for the servers ('none': no pinning)")
    p.add_argument("--client-cpu", default="1", help="CPU for the generator ('none': no pinning)")
    d = Settings()
    for name in ("sat_n", "sat_duration", "inflight", "size", "rate_n", "rate_duration", "rate"):
        typ = type(getattr(d, name))
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    p.add_argument("--idle-n", type=int, default=None)
    p.add_argument(
        "--window",
        choices=("every", "probe"),
        default="every",
        help="the bench's --window: W counted against every subscriber (default) or the probe",
    )
    p.add_argument(
        "--fastim-store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="fastim's store: sqlite (its default, durable) or memory (default sqlite)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)
    s = Settings.quick() if a.quick else Settings()
    for name in ("sat_n", "sat_duration", "inflight", "size", "rate_n", "rate_duration", "rate"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    if a.idle_n is not None:
        s.idle_n = a.idle_n
    s.window = a.window
    servers = [x.strip() for x in a.servers.split(",") if x.strip()]
    cases = [x.strip() for x in a.cases.split(",") if x.strip()]
    bad = [x for x in servers if x not in SERVERS] + [x for x in cases if x not in CASES]
    if bad:
        p.error(f"unknown server or case: {', '.join(bad)}")
    cases = [c for c in CASES if c in cases]  # idle first: see the module docstring
    ncpu = os.cpu_count() or 1
    server_cpu = a.server_cpu if a.server_cpu == "none" or int(a.server_cpu) < ncpu else "none"
    client_cpu = a.client_cpu if a.client_cpu == "none" or int(a.client_cpu) < ncpu else "none"

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastim-peers-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    load_start = os.getloadavg()  # the machine may be shared: say how busy it was
    for rep in range(1, a.reps + 1):
        for name in servers:
            srv = Server(name, server_cpu, logdir, a.fastim_store)
            try:
                srv.wait_ready()
                for case in cases:
                    argv_b = bench_args(srv, case, s, client_cpu)
                    t0 = time.monotonic()
                    r = run_argv(argv_b)
                    if srv.proc.poll() is not None:
                        r.setdefault("errors", []).append(f"server exited: {srv.tail(5)}")
                        r["failed"] = True
                    runs.append({"rep": rep, "server": name, "case": case, "result": r})
                    say(
                        f"[rep {rep}/{a.reps}] {name:10s} {case:4s} {_line(r)}"
                        f"  ({time.monotonic() - t0:.1f}s)"
                    )
                    time.sleep(0.2 if a.quick else 1.0)  # let the server finish its closes
            finally:
                srv.stop()
    summary = summarize(runs)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "benchmarks/peers_e2e.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": ncpu,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "reps": a.reps,
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "settings": s.__dict__,
        "fastim_store": a.fastim_store,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": summary,
        "targets": [{"target": t, "met": m, "figure": f} for t, m, f in targets(summary)],
        "runs": runs,
    }
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2))
        say(f"wrote {a.out}")
    print(markdown(report))
    shutil.rmtree(logdir, ignore_errors=True)
    ok = all(succeeded(r["result"]) for r in runs)
    return 0 if ok else 1


STARVED_PCT = 85


def _starved(r: dict[str, Any]) -> bool:
    """A saturation run whose server and generator both used less than their core: the
    machine held them (another process), so the figure is suspect. A server below its
    core next to a busy generator is not flagged: with the window counted against every
    subscriber (P10) the server waits for the generator to read, which is what is
    measured."""
    cpu = r.get("server", {}).get("cpu_pct")
    gen = r.get("generator", {}).get("load_pct_of_cores")
    return (
        r.get("mode") == "saturation"
        and cpu is not None
        and cpu < STARVED_PCT
        and (gen is None or gen < STARVED_PCT)
    )


def _line(r: dict[str, Any]) -> str:
    """One progress line per run."""
    if r.get("failed"):
        return "FAILED: " + "; ".join(r.get("errors", []))[:300]
    flag = "" if succeeded(r) else "  !! " + "; ".join(r.get("errors", []))[:200]
    if r.get("mode") == "idle":
        b = r["server"]["rss_growth_bytes_per_conn"]
        return f"{r['connections']:,} idle: {cell(b, ',.0f')} B/conn{flag}"
    lat = r["latency_us"]
    return (
        f"{r['deliveries_per_s']:>12,.0f} deliveries/s  p50 {lat['p50'] / 1000:8.1f} ms"
        f"  p99 {lat['p99'] / 1000:8.1f} ms  lost {r['lost']}  server {r['server']['cpu_pct']}%"
        f"  gen {r['generator']['load_pct_of_cores']}%{flag}"
        + ("  [server and generator below their cores: starved?]" if _starved(r) else "")
    )


if __name__ == "__main__":
    sys.exit(main())
