"""A real ``etcd`` for the tests: a child process on free loopback ports in a temp dir.

Debian's ``etcd-server`` package (etcd 3.4) provides the binary; a missing binary FAILS
the test (it never skips: a cluster that was not tested is not a cluster that works).
Both the client and the peer URL are on free loopback ports, so several etcds can run
at once. ``stop``/``start`` keep the ports and the data directory (an etcd restart);
``wipe`` deletes the data (an etcd rebuilt from nothing); ``pause``/``resume`` freeze
it (SIGSTOP: up, but answering nothing). Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

MISSING = "etcd not found: apt-get install etcd-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    """The path of etcd; fails the test (never skips) when it is not installed."""
    path = shutil.which("etcd")
    if path is None:
        pytest.fail(MISSING, pytrace=False)
    return path


class EtcdServer:
    """One single-member etcd cluster."""

    def __init__(self, directory: str, name: str = "etcd-test") -> None:
        self.binary = etcd_binary()
        self.directory = directory
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: object = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "etcd.log")

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--name", self.name,
                    "--data-dir", self.data_dir,
                    "--listen-client-urls", client,
                    "--advertise-client-urls", client,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"{self.name}={peer}",
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"fastim-test-{self.client_port}",
                    # a test box: no fsync storms to wait for, small snapshots
                    "--snapshot-count", "10000",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"etcd exited with {code}:\n{self.log()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"etcd did not become healthy within {timeout}s:\n{self.log()}")

    def healthy(self) -> bool:
        """GET /health on the client URL answers {"health":"true"}."""
        try:
            with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5) as s:
                s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return b'"health":"true"' in data
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: etcd exits cleanly, its data stays for the next start."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"etcd ignored SIGTERM for {timeout}s") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def wipe(self) -> None:
        """Delete the data directory (etcd must be stopped): the next start is a new etcd."""
        assert self.proc is None or self.proc.poll() is not None, "stop it first"
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def pause(self) -> None:
        """SIGSTOP: the port accepts connections, nothing is answered (a hung etcd)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-3000:]
        except OSError:
            return "(no log)"
