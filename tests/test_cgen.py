"""The independent C generator (benchmarks/cgen/wsgen.c) and its driver, cgen_e2e.py.

The generator is compiled with the system's C compiler (gcc is among what ./dev
installs) and run as a real process against a real node and a real peer server; a
broadcast server that skips messages shows that its checks can fail.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import NodeProcess
from tests.test_bench_peers import _start as start_peer

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "cgen" / "wsgen.c"


@pytest.fixture(scope="module")
def wsgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler: apt-get install gcc (./dev installs it)"
    exe = tmp_path_factory.mktemp("cgen") / "wsgen"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def _run(exe: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else {}), p.stderr


def test_wsgen_against_a_node(wsgen: Path, node_process: Callable[..., NodeProcess]) -> None:
    node = node_process("--store", "memory", "--publish-rate", "0")
    rc, r, err = _run(
        wsgen, "--port", str(node.ws_port), "--subs", "50", "--window", "16",
        "--duration", "1", "--warmup", "0.2", "--size", "100",
    )  # fmt: skip
    assert rc == 0, (r, err)
    assert r["errors"] == 0 and r["error"] == ""
    assert r["published"] > 100
    # the drain: every subscriber got every message, checked in order, once
    assert r["received_by_all"] == r["published"]
    assert r["acks"] == r["published"]  # a puback per publish
    assert r["deliveries"] > 0 and r["deliveries_per_s"] > 0
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert r["latency_ms"]["p50"] <= r["latency_all_ms"]["p50"]


def test_wsgen_against_a_peer(wsgen: Path) -> None:
    """The peers' raw protocol (the message itself, sender excluded), on socketify."""
    proc, url = start_peer("socketify")  # as test_bench_peers starts it
    try:
        port = url.split("//", 1)[1].split("/")[0].rsplit(":", 1)[1]
        rc, r, err = _run(
            wsgen, "--port", port, "--path", "/", "--mode", "raw", "--subs", "50",
            "--window", "16", "--duration", "1", "--warmup", "0.2",
        )  # fmt: skip
        assert rc == 0, (r, err)
        assert r["errors"] == 0
        assert r["received_by_all"] == r["published"] > 100
    finally:
        proc.kill()
        proc.wait()


class _LossyBroadcast:
    """A broadcast server (the peers' protocol) that skips one subscriber's 5th message."""

    def __init__(self) -> None:
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Future[None] | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))

    async def main(self) -> None:
        clients: list[ServerConnection] = []
        count = 0

        async def handler(ws: ServerConnection) -> None:
            nonlocal count
            clients.append(ws)
            try:
                async for msg in ws:
                    count += 1
                    for i, c in enumerate(clients):
                        if c is ws or (i == 0 and count == 5):
                            continue
                        await c.send(msg)
            finally:
                clients.remove(ws)

        self.stop = self.loop.create_future()
        async with serve(handler, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.ready.set()
            await self.stop

    def __enter__(self) -> _LossyBroadcast:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(10)


def test_wsgen_reports_a_lost_message(wsgen: Path) -> None:
    with _LossyBroadcast() as server:
        rc, r, _err = _run(
            wsgen, "--port", str(server.port), "--path", "/", "--mode", "raw",
            "--subs", "3", "--window", "4", "--duration", "1", "--warmup", "0.1",
        )  # fmt: skip
    assert rc == 1
    assert r["errors"] >= 1
    assert "message 6 after 4" in r["error"]


@pytest.fixture
def cgen_out(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "cgen.json"


def test_cgen_e2e_runs_fastim_and_a_peer(cgen_out: Path) -> None:
    """The driver: each server started pinned (here: not pinned), the server's CPU read
    from /proc over the generator's measured window, a summary per server."""
    p = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "cgen_e2e.py"),
            "--servers", "fastim,socketify", "--reps", "1", "--subs", "40",
            "--duration", "1", "--warmup", "0.2", "--server-cpu", "none",
            "--client-cpu", "", "--out", str(cgen_out),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(cgen_out.read_text())
    for name in ("fastim", "socketify"):
        s = report["summary"][name]
        assert s["runs"] == 1 and s["failed"] == 0
        assert s["deliveries_per_s"] > 0
        assert 0 < s["server_cpu"] <= 1.5
    assert "| fastim |" in p.stdout and "| socketify |" in p.stdout
