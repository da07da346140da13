"""Spawning the node under test: ``python -m fastim serve`` as a subprocess, pinned.

The bench imports nothing of the server: without ``--url`` or ``--peer`` it starts a
node of this machine as a separate process, on a free port, pinned to ``--server-cpu``.
With ``--server-workers N`` (N > 1) the node is ``fastim serve --workers N``: a
supervisor and N worker processes sharing the port (``SO_REUSEPORT``); once every worker
listens, worker i is pinned to the i-th CPU of the list (round robin).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from .serverstats import listening_inodes, listens, parse_cpus, workers_of
from .target import Target

#: seconds a spawned node has to listen (every worker of it, with --server-workers)
START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], what: str = "node", timeout: float = 20.0
) -> None:
    """Return once something accepts on 127.0.0.1:``port``; SystemExit naming ``what``
    when ``proc`` exits first or ``timeout`` passes (then ``proc`` is killed). The one
    wait of the bench and of the benchmarks/ scripts for a process they started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited with {proc.returncode}") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{what} did not start within {timeout:g}s")


def spawn_node(
    transport: str,
    core: str | None,
    store: str,
    directory: str,
    workers: int = 1,
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], Target]:
    """A node of this machine on a free port, its store (a sqlite file for the default)
    in ``directory``; ``workers`` > 1: ``--workers`` processes, each pinned to one CPU
    of ``core`` (a taskset list) in turn. ``extra``: more ``fastim serve`` flags."""
    port = _free_port()
    ports = ["--tcp-port", str(port), "--ws-port", "0"]
    if transport == "ws":
        ports = ["--tcp-port", "0", "--ws-port", str(port)]
    cmd = [
        sys.executable,
        "-m",
        "fastim",
        "serve",
        *ports,
        "--log-level",
        "warning",
        "--node-id",
        "bench-node",
        # the per-connection publish rate limit is a guard for the internet, not for a
        # load test's one publisher (the peer servers have none either)
        "--publish-rate",
        "0",
        "--store",
        store,
    ]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    cmd += list(extra)
    cpus = parse_cpus(core)
    if cpus and shutil.which("taskset"):
        # taskset execs the node: the pid stays the node's (the supervisor's); workers
        # inherit the whole list until they are pinned one by one below
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    proc = subprocess.Popen(cmd, cwd=directory)
    kind = "ws" if transport == "ws" else "tcp"
    target = Target(kind, "127.0.0.1", port, "/ws" if kind == "ws" else "/")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if workers > 1:
            up = node_workers(proc.pid, port)
            if len(up) == workers:
                if cpus and hasattr(os, "sched_setaffinity"):
                    pin_workers(up, cpus)
                return proc, target
            time.sleep(0.05)
            continue
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, target
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(
        "fastim bench: the spawned node did not start"
        + (f" (its {workers} workers did not all listen)" if workers > 1 else "")
    )


def node_workers(pid: int, port: int) -> list[int]:
    """The workers of supervisor ``pid`` that listen on ``port``, by worker index."""
    inodes = listening_inodes(port)
    if not inodes:
        return []
    return [w for w in workers_of(pid) if listens(w, inodes)]


def pin_workers(pids: list[int], cpus: list[int]) -> None:
    """Worker i (by index) on CPU ``cpus[i % len(cpus)]``."""
    for i, pid in enumerate(pids):
        try:
            os.sched_setaffinity(pid, {cpus[i % len(cpus)]})
        except OSError:  # a worker that died meanwhile: the supervisor replaces it
            pass
