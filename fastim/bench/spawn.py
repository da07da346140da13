"""Spawning the node under test: ``python -m fastim serve`` as a subprocess, pinned.

The bench imports nothing of the server: without ``--url`` or ``--peer`` it starts a
node of this machine as a separate process, on a free port, pinned to ``--server-cpu``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

from .target import Target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_node(
    transport: str, core: str | None, store: str, directory: str
) -> tuple[subprocess.Popen[bytes], Target]:
    """A node of this machine on a free port, its store (a sqlite file for the default)
    in ``directory``."""
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
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", core, *cmd]
    proc = subprocess.Popen(cmd, cwd=directory)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            kind = "ws" if transport == "ws" else "tcp"
            return proc, Target(kind, "127.0.0.1", port, "/ws" if kind == "ws" else "/")
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("fastim bench: the spawned node did not start")
