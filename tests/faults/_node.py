"""A fastim node as a real child process that the fault tests can kill -9 and start
again on the same ports (and the same store), so the SDK's clients reconnect to it.

``python -m fastim serve`` writes its log to a file (a pipe nobody reads would fill up
and block the node); :meth:`NodeProc.start` waits for the "listening" line. Every wait
is bounded.

The coroutines :meth:`NodeProc.astart` and :meth:`NodeProc.akill` wait with
``asyncio.sleep`` instead of blocking the loop, and use no thread: in two of some forty
runs, an ``asyncio.to_thread(node.kill)`` (then ``to_thread(node.start)``) under uvloop
never came back although the thread's work was done (the node was dead, the next start
never began), and the test timed out for that reason alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class NodeProc:
    """One node's command line; :meth:`start` runs it (again), :meth:`kill` SIGKILLs it."""

    def __init__(self, directory: Path, tcp_port: int, ws_port: int, *args: str) -> None:
        self.directory = directory
        self.tcp_port = tcp_port
        self.ws_port = ws_port
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def log_path(self) -> Path:
        return self.directory / f"node-{self.starts}.log"

    def start(self, timeout: float = 20.0) -> None:
        """Start the node and wait (blocking) until it listens."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() > deadline:
                self._give_up(timeout)
            time.sleep(0.02)

    async def astart(self, timeout: float = 20.0) -> None:
        """:meth:`start` without blocking the event loop."""
        self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._listening():
            if loop.time() > deadline:
                self._give_up(timeout)
            await asyncio.sleep(0.02)

    def _spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--tcp-port", str(self.tcp_port),
            "--ws-port", str(self.ws_port),
            "--node-id", "fault-node",
            "--log-level", "info",
            *self.args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as out:
            # in the test's directory: the default store is a file in the working directory
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        return "listening" in self.log()

    def _give_up(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        raise AssertionError(f"node did not start within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, no goodbye to the clients."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node survived SIGKILL for 10s: {self.state()}") from None

    async def akill(self) -> None:
        """:meth:`kill` without blocking the event loop."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"node survived SIGKILL for 10s: {self.state()}")
            await asyncio.sleep(0.005)

    def state(self) -> str:
        """The process's state line and kernel wait channel (why it is stuck)."""
        if self.proc is None:
            return "not started"
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            wchan = Path(f"/proc/{self.proc.pid}/wchan").read_text()
        except OSError as e:
            return f"exited ({e})"
        line = next((x for x in status.splitlines() if x.startswith("State:")), "?")
        return f"{line.strip()}, wchan {wchan or '?'}{self._py_stack()}"

    def _py_stack(self) -> str:
        """The node's Python stacks (py-spy, when installed): where a stuck node is."""
        spy = Path(sys.executable).with_name("py-spy")
        if self.proc is None or not spy.exists():
            return ""
        try:
            out = subprocess.run(
                [str(spy), "dump", "--pid", str(self.proc.pid)],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"\n(py-spy: {e})"
        return "\n" + (out.stdout or out.stderr)[-3000:]

    def stop(self) -> None:
        """SIGTERM (graceful), or SIGKILL if that takes over 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    async def astop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a graceful drain) and wait for the exit without blocking the loop
        (the clients of the test, in the same loop, take part in the drain)."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(f"node did not stop within {timeout}s: {self.state()}")
            await asyncio.sleep(0.01)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
