"""Smoke runs of the load generator and of the peers runner, at tiny sizes.

Timings are not asserted (a shared 2-core machine says nothing about them); what is
checked is that every path still runs end to end and reports what it should: zero loss,
the generator's CPU, the server's RSS per connection, the markdown table and the JSON.
Each runs as a subprocess: the bench pins the process it runs in to CPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _bench(*argv: str) -> dict[str, Any]:
    p = _run("-m", "fastim", "bench", "--json", *argv)
    assert p.returncode == 0, p.stdout + p.stderr
    r: dict[str, Any] = json.loads(p.stdout)
    return r


def test_bench_spawns_a_tcp_node_and_counts_everything() -> None:
    r = _bench("-n", "30", "-d", "0.3", "--server-cpu", "0")
    assert r["target"] == "tcp" and r["mode"] == "saturation"
    assert r["published"] > 0 and r["acked"] == r["published"]
    assert r["deliveries"] == r["deliveries_expected"] == r["published"] * 30
    assert (r["lost"], r["reordered"], r["duplicates"], r["errors"]) == (0, 0, 0, [])
    assert r["latency_us"]["samples"] > 0 and "subscribers_lag_s" in r
    assert r["server"]["pid"] and r["server"]["cpu_pct"] is not None
    g = r["generator"]
    assert len(g["worker_cpu_pct"]) == g["processes"] >= 1 and g["publisher_cpu_pct"] >= 0


def test_bench_idle_over_websocket_reports_rss_per_connection() -> None:
    r = _bench("--transport", "ws", "--idle", "-n", "40", "--settle", "0.5")
    assert r["target"] == "ws" and r["mode"] == "idle" and r["subscribed"]
    assert r["connections"] == 40 and r["errors"] == []
    s = r["server"]
    assert s["rss_before_kib"] > 0 and s["rss_after_kib"] > 0
    assert s["rss_growth_bytes_per_conn"] is not None


@pytest.mark.slow
def test_peers_runner_smoke(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    p = _run(
        "benchmarks/peers_e2e.py",
        "--quick",
        "--reps",
        "1",
        "--sat-duration",
        "0.3",
        "--rate-duration",
        "0.5",
        "--quiet",
        "--out",
        str(out),
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    servers = {"fastim", "websockets", "picows"} | (
        {"socketify"} if importlib.util.find_spec("socketify") is not None else set()
    )
    assert {(r["server"], r["case"]) for r in report["runs"]} == {
        (s, c) for s in servers for c in ("idle", "sat", "rate")
    }
    for r in report["runs"]:
        res = r["result"]
        assert not res.get("failed") and res["errors"] == [], (r["server"], r["case"], res)
        if r["case"] != "idle":
            assert res["lost"] == res["reordered"] == res["duplicates"] == 0
            assert res["deliveries"] == res["published"] * res["subscribers"] > 0
    sat = report["summary"]["sat"]
    assert set(sat["ratio_fastim_over"]) == servers - {"fastim"}
    assert report["settings"]["window"] == "every"
    assert all(r["result"]["window"] == "every" for r in report["runs"] if r["case"] != "idle")
    assert sat["servers"]["fastim"]["deliveries_per_s"] > 0
    assert report["summary"]["idle"]["servers"]["picows"]["bytes_per_conn"] is not None
    # the markdown table for benchmarks/RESULTS.md
    assert "| case | metric | fastim | websockets | picows |" in p.stdout.replace(
        " socketify |", ""
    )
    assert "deliveries/s" in p.stdout and "server RSS per connection" in p.stdout
