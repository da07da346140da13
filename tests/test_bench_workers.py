"""The bench against a node of several workers (issue P10), and its broadcast mode.

``--server-workers N`` spawns ``fastim serve --workers N``: the server's CPU and RSS are
summed over the supervisor and its workers. ``--broadcast K`` publishes K messages one
at a time and tracks every connection: each must get each message exactly once, and
the time from publish to the last delivery is reported per message. The subscriber
side is checked on its own (real subscriber protocols fed a server's bytes), then whole
runs against real nodes through the command line. Timings are never asserted, only
their order (the last delivery of a message is not before any sampled one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest

from fastim import _core
from fastim.bench import Target, WorkerResult, make_payload
from fastim.bench.broadcast import Reach, time_to_last_ms, track
from fastim.bench.counting import _TcpSub
from fastim.bench.serverstats import node_pids, parse_cpus
from fastim.protocol import FrameType, pack_msg

ROOT = Path(__file__).resolve().parent.parent


class _Sink:
    """Stands in for a transport: collects what the subscriber writes (pongs)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _tcp_sub(out: WorkerResult) -> _TcpSub:
    sub = _TcpSub(Target("tcp", "127.0.0.1", 1), "bench", False, True, out)
    sub.transport = _Sink()  # type: ignore[assignment]
    sub.ready.set_result(None)
    return sub


def _msg(seq: int) -> bytes:
    return _core.encode_frame(FrameType.MSG, pack_msg(seq, b"bench", make_payload(seq, 64)))


def test_cpu_lists_read_as_taskset_reads_them() -> None:
    assert parse_cpus("0") == [0]
    assert parse_cpus("0,1") == [0, 1]
    assert parse_cpus("0-1") == [0, 1]
    assert parse_cpus("2-4,0,3") == [2, 3, 4, 0]
    assert parse_cpus(None) == parse_cpus("none") == []
    for bad in ("a", "1-0", "-1", "0-"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_node_pids_are_a_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert node_pids(os.getpid())[0] == os.getpid()
        assert child.pid in node_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


async def test_tracker_times_each_message_to_its_last_connection() -> None:
    a, b = Pipe()
    outs = [WorkerResult() for _ in range(3)]
    subs = [_tcp_sub(o) for o in outs]
    tracker = track(list(subs), 2, b)
    assert all(isinstance(s.wake, Reach) for s in subs)
    subs[0].data_received(_msg(1))
    subs[1].data_received(_msg(1) + _msg(2))  # two in one read: both at that time
    assert not a.poll()  # message 1 is not everywhere yet
    subs[2].data_received(_msg(1))
    m = a.recv()
    assert m[0] == "reached" and m[1] == 1 and m[2] == tracker.last_ns[1]
    assert tracker.first_ns[1] <= tracker.last_ns[1]
    subs[0].data_received(_msg(2))
    subs[2].data_received(_msg(2)[:3])  # a cut header: not counted yet
    assert not a.poll()
    subs[2].data_received(_msg(2)[3:] + _msg(2))  # ... and a duplicate
    assert a.recv()[:2] == ("reached", 2)
    assert tracker.reached == [0, 3, 3] and tracker.extra == 1
    res = WorkerResult()
    tracker.into(res)
    assert res.bcast_reached == [3, 3] and len(res.bcast_last_ns) == 2
    ttl, reached = time_to_last_ms(2, [tracker.first_ns[1], tracker.first_ns[2]], [res])
    assert reached == [3, 3] and all(x is not None and x >= 0 for x in ttl)


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _bench(*argv: str) -> dict[str, Any]:
    p = _run("-m", "fastim", "bench", "--json", *argv)
    assert p.returncode == 0, p.stdout + p.stderr
    r: dict[str, Any] = json.loads(p.stdout)
    return r


def test_bench_against_two_workers_counts_everything_and_sums_their_cpu() -> None:
    r = _bench(
        "-n", "60", "-d", "0.5", "--server-workers", "2", "--server-cpu", "0-1", "--store",
        "memory",
    )  # fmt: skip
    assert r["server_workers"] == 2 and r["mode"] == "saturation"
    assert r["published"] > 0 and r["acked"] == r["published"]
    assert r["deliveries"] == r["deliveries_expected"] == r["published"] * 60
    assert (r["lost"], r["reordered"], r["duplicates"], r["errors"]) == (0, 0, 0, [])
    s = r["server"]
    assert len(s["cpu_pids"]) == 3 and s["cpu_pids"][0] == s["pid"]  # supervisor + 2
    assert s["cpu_s"] is not None and s["cpu_s"] > 0 and r["deliveries_per_server_cpu_s"] > 0
    assert s["rss_kib"] > 0


def test_broadcast_reaches_every_subscriber_once_over_two_workers() -> None:
    # heartbeats every second, one second to answer: the idle window sees pings, and a
    # subscriber that did not answer would be closed (an error of the run)
    r = _bench(
        "-n", "300", "--transport", "ws", "--server-workers", "2", "--server-cpu", "0-1",
        "--broadcast", "3", "--broadcast-gap", "0.2", "--idle-window", "2.5", "--settle",
        "1", "--server-flags=--ping-interval 1 --pong-timeout 1",
    )  # fmt: skip
    _check_broadcast(r, 300, 3)
    assert r["server_workers"] == 2 and r["server"]["processes"] == 3


def test_broadcast_over_tcp_one_process() -> None:
    r = _bench(
        "-n", "200", "--broadcast", "3", "--broadcast-gap", "0.2", "--idle-window", "2.5",
        "--settle", "1", "--server-flags=--ping-interval 1 --pong-timeout 1",
    )  # fmt: skip
    _check_broadcast(r, 200, 3)
    assert r["server_workers"] == 1 and r["server"]["processes"] == 1


def _check_broadcast(r: dict[str, Any], n: int, k: int) -> None:
    assert r["mode"] == "broadcast" and r["errors"] == [], r["errors"]
    assert r["exactly_once"] and r["connections_exact"] == n and r["connections_over"] == 0
    assert r["per_conn_min"] == r["per_conn_max"] == k
    assert r["published"] == r["acked"] == k
    assert r["deliveries"] == r["deliveries_expected"] == n * k
    assert (r["lost"], r["reordered"], r["duplicates"]) == (0, 0, 0)
    b = r["broadcast"]
    assert b["reached"] == [n] * k and len(b["time_to_last_ms"]) == k
    lat = r["latency_us"]
    assert lat["samples"] == lat["sampled_subscribers"] * k > 0
    # the last delivery of a message is at or after every sampled delivery of it
    assert b["max_ms"] * 1000 >= lat["max"]
    assert all(f <= t for f, t in zip(b["time_to_first_ms"], b["time_to_last_ms"], strict=True))
    s = r["server"]
    assert s["rss_bytes_per_conn"] > 0 and s["rss_growth_bytes_per_conn"] is not None
    assert s["idle_cpu_pct"] is not None
    hb = r["heartbeats"]
    assert hb["pings_idle_window"] > 0 and hb["closed_by_server_idle"] == 0


@pytest.mark.slow
def test_workers_scaling_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    p = _run(
        "benchmarks/workers_scaling.py", "--quick", "--reps", "1", "--one-core",
        "--server-cpus", "0", "--client-cpus", "1", "--stores", "memory", "--quiet",
        "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert {(r["workers"], r["case"]) for r in report["runs"]} == {
        (w, c) for w in (1, 2) for c in ("sat", "bcast")
    }
    for r in report["runs"]:
        assert r["result"]["server_workers"] == r["workers"] and r["result"]["errors"] == []
    mem = report["summary"]["memory"]
    assert mem["ratio"]["of"] == "2 workers / 1" and mem["ratio"]["per_cpu_s"] > 0
    assert mem["workers"]["2"]["bcast"]["exactly_once"]
    assert "| workers | deliveries/s |" in p.stdout and "Ratio 2 workers / 1" in p.stdout
