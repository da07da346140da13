"""The workers of one node as real processes, started directly (without the supervisor:
the routing between workers is tested on its own, and a worker can be killed and started
again by the test at will). Each is a ``Node`` with a :class:`WorkerRole`, on the same
two ports (``SO_REUSEPORT``) and the same store, its log in the test's directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from fastim.workers.role import ENV, WorkerRole

BOOT = """
import logging, sys, orjson, uvloop
from fastim.config import Config
from fastim.node import Node
from fastim.workers.role import WorkerRole
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
node = Node(Config(**orjson.loads(sys.argv[1])), WorkerRole.from_env())
uvloop.run(node.serve_forever())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    """``n`` workers of one node; ``settings`` are Config fields (ports are added)."""

    def __init__(self, directory: Path, n: int, **settings: Any) -> None:
        self.directory = directory
        self.n = n
        self.tcp_port = free_port()
        self.ws_port = free_port()
        # a short private path: Unix socket paths are limited to 107 bytes
        self.sockets = tempfile.mkdtemp(prefix="fw")
        self.settings = {
            "tcp_port": self.tcp_port,
            "ws_port": self.ws_port,
            "node_id": "wtest",
            "store_path": str(directory / "fastim.db"),
            "connect_rate_per_ip": 0,
            **settings,
        }
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.starts = [0] * n

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ws_port}"

    def log_path(self, i: int) -> Path:
        return self.directory / f"w{i}-{self.starts[i]}.log"

    def log(self, i: int) -> str:
        try:
            return self.log_path(i).read_text(errors="replace")
        except OSError:
            return ""

    def spawn(self, i: int) -> None:
        self.starts[i] += 1
        role = WorkerRole(i, self.n, self.sockets, -1, True)
        env = {**os.environ, ENV: role.to_env()}
        with open(self.log_path(i), "wb") as out:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-c", BOOT, orjson.dumps(self.settings).decode()],
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_listening(self, i: int, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while "listening" not in self.log(i):
            p = self.procs[i]
            assert p is not None
            if p.poll() is not None:
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{self.log(i)}")
            if loop.time() > deadline:
                raise AssertionError(f"worker {i} did not start in {timeout}s:\n{self.log(i)}")
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        for i in range(self.n):
            self.spawn(i)
        for i in range(self.n):
            await self.wait_listening(i)

    async def restart(self, i: int) -> None:
        self.spawn(i)
        await self.wait_listening(i)

    async def kill(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None and p.poll() is None
        os.kill(p.pid, signal.SIGKILL)
        for _ in range(2000):
            if p.poll() is not None:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"worker {i} survived SIGKILL for 10 s")

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
