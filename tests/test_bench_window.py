"""The bench's window (issue P10): W publishes not yet received by every subscriber.

``--window every`` (the default) holds the publisher back until the slowest subscriber
has caught up; each worker process reports the fewest messages any of its subscribers
has (workers.MinReporter), the publisher reads the reports (publisher._Floor).
``--window probe`` is the old rule, the probe subscriber alone. Checked: the reporter in
isolation, the rule itself (a worker whose subscribers never receive lets exactly W
publishes out under ``every`` and many more under ``probe``), against a real node and
against a peer, and whole runs through the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest

from fastim.bench import Target, parse_target, publisher
from fastim.bench.spawn import spawn_node
from fastim.bench.workers import MinReporter, tracked

ROOT = Path(__file__).resolve().parent.parent


class _FakeSub:
    def __init__(self, count: int) -> None:
        self.count = count
        self.closed = False
        self.wake: Any = None


async def test_reporter_sends_the_slowest_live_subscriber_when_it_moves() -> None:
    a, b = Pipe()
    subs = [_FakeSub(5), _FakeSub(3), _FakeSub(7)]
    rep = MinReporter(subs, b)  # type: ignore[arg-type]
    assert all(s.wake is rep for s in subs)  # data_received calls wake.set()
    rep.set()
    rep.set()  # one report per tick however many reads
    await asyncio.sleep(0.05)
    assert a.recv() == ("min", 3) and not a.poll()
    subs[0].count = 6
    rep.set()
    await asyncio.sleep(0.05)
    assert not a.poll()  # the minimum did not move: nothing sent
    subs[1].closed = True  # a closed connection holds no one back (it is an error anyway)
    rep.set()
    await asyncio.sleep(0.05)
    assert a.recv() == ("min", 6)
    rep.stop()
    assert all(s.wake is None for s in subs)
    subs[0].count = 100
    rep.set()
    await asyncio.sleep(0.05)
    assert not a.poll()


def test_tracked_is_everyone_up_to_the_limit_then_a_spread_sample() -> None:
    subs: list[Any] = list(range(5000))
    assert tracked(subs[:1500], 2000) == subs[:1500]
    t: list[Any] = tracked(subs, 2000)
    assert len(t) == 2000 and t[0] == 0 and t[-1] > 4990 and t == sorted(t)


def _args(window: str, inflight: int) -> argparse.Namespace:
    return argparse.Namespace(
        channel="win",
        inflight=inflight,
        size=64,
        duration=0.4,
        rate=0.0,
        drain=0.3,
        window=window,
        server_pids=None,
    )


async def _drive_with_a_deaf_worker(target: Target, window: str, w: int) -> publisher.PubResult:
    """drive() with one fake worker whose subscriber never receives anything."""
    ours, theirs = Pipe()
    theirs.send(("min", 0))  # its first report; no later one
    try:
        return await publisher.drive(target, _args(window, w), [ours], None, False, [1])
    finally:
        assert theirs.recv() == ("go",)
        ours.close()
        theirs.close()


@pytest.fixture
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher, "STALL_S", 0.5)


@pytest.fixture(scope="module")
def node() -> Iterator[Target]:
    with tempfile.TemporaryDirectory() as d:
        proc, target = spawn_node("tcp", None, "memory", d)
        yield target
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def peer() -> Iterator[tuple[str, int]]:
    script = ROOT / "benchmarks" / "peers" / "picows_broadcast.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on ws://" in line, line
    yield line.split("listening on ", 1)[1].split()[0], proc.pid
    proc.terminate()
    proc.wait(10)


@pytest.mark.usefixtures("short_stall")
async def test_a_lagging_subscriber_holds_the_publisher_at_w_node(node: Target) -> None:
    r = await _drive_with_a_deaf_worker(node, "every", 8)
    assert r.published == 8  # the probe had them all; the deaf one none
    assert r.probe_received == 8 and r.min_reports == 1
    assert any("slowest subscriber received nothing" in e for e in r.errors), r.errors
    # the old rule does not see it
    r = await _drive_with_a_deaf_worker(node, "probe", 8)
    assert r.published > 8 * 10 and r.probe_received == r.published and not r.errors


@pytest.mark.usefixtures("short_stall")
async def test_a_lagging_subscriber_holds_the_publisher_at_w_peer(peer: tuple[str, int]) -> None:
    target = parse_target(peer[0], peer=True)
    r = await _drive_with_a_deaf_worker(target, "every", 8)
    assert r.published == 8 and r.probe_received == 8
    assert any("slowest subscriber received nothing" in e for e in r.errors), r.errors
    r = await _drive_with_a_deaf_worker(target, "probe", 8)
    assert r.published > 8 * 10 and not r.errors


def _bench(*argv: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "fastim", "bench", "--json", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    r: dict[str, Any] = json.loads(p.stdout)
    return r


def _clean(r: dict[str, Any], n: int) -> None:
    assert r["deliveries"] == r["deliveries_expected"] == r["published"] * n > 0
    assert (r["lost"], r["reordered"], r["duplicates"], r["errors"]) == (0, 0, 0, [])


@pytest.mark.parametrize("window", ["every", "probe"])
def test_bench_window_against_a_node(window: str) -> None:
    r = _bench("-n", "30", "-d", "0.3", "-w", "8", "--processes", "2", "--window", window)
    _clean(r, 30)
    assert r["window"] == window and r["inflight"] == 8
    if window == "every":
        assert r["min_reports"] > 0  # both workers reported while the publisher ran
    else:
        assert r["min_reports"] is None


def test_bench_window_every_is_the_default_against_a_peer(peer: tuple[str, int]) -> None:
    url, pid = peer
    r = _bench("--peer", url, "--server-pid", str(pid), "-n", "20", "-d", "0.3", "-w", "8")
    _clean(r, 20)
    assert r["target"] == "peer" and r["window"] == "every" and r["min_reports"] > 0
