"""``fastim serve --workers N`` as a real process tree, for the fault tests: the
supervisor, and its workers found as its children (each one's role read from its
environment), so a test can kill -9 or SIGSTOP one worker by index.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from fastim.workers.role import ENV

from ._workers import free_port


class Supervised:
    """A node of ``n`` workers on two free ports; its log in ``directory``."""

    def __init__(self, directory: Path, n: int, *args: str) -> None:
        self.directory = directory
        self.n = n
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def log_path(self) -> Path:
        return self.directory / "supervisor.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, timeout: float = 30.0) -> None:
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--workers", str(self.n),
            "--tcp-port", str(self.tcp_port),
            "--ws-port", str(self.ws_port),
            "--node-id", "faults",
            "--log-level", "info",
            "--connect-rate-per-ip", "0",
            *self.args,
        ]  # fmt: skip
        self.proc = self._spawn(cmd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while f"({self.n} workers)" not in self.log():  # the supervisor's: all serve
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if loop.time() > deadline:
                raise AssertionError(f"node did not start within {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_path, "wb") as out:
            return subprocess.Popen(
                cmd, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def workers(self) -> dict[int, int]:
        """index -> pid of the live workers (children of the supervisor)."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return {}
        out = {}
        for k in kids:
            try:
                env = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(ENV.encode() + b"="):
                    role = orjson.loads(item.split(b"=", 1)[1])
                    out[int(role["index"])] = int(k)
        return out

    async def wait_workers(
        self, timeout: float = 30.0, exclude: set[int] | None = None
    ) -> dict[int, int]:
        """The workers once all ``n`` are up (none of the pids in ``exclude``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            w = self.workers()
            if len(w) == self.n and not (set(w.values()) & (exclude or set())):
                return w
            if loop.time() > deadline:
                raise AssertionError(f"workers {w} after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def signal(self, index: int, sig: int) -> int:
        pid = self.workers()[index]
        os.kill(pid, sig)
        return pid

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
