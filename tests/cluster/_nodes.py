"""A cluster of real ``python -m fastim serve`` processes for the tests.

N node processes on free loopback ports join one etcd (``tests/cluster/_etcd.py``) and
share one ``redis-server`` (``tests/store/_redis.py``). :meth:`Nodes.start` waits until
every node's ``/ready`` says it sees all N nodes with every link up; :meth:`Nodes.close`
stops them (SIGTERM, then SIGKILL), then redis and etcd. Every wait is bounded, and a
timeout names the node and shows its log.

Nodes log to files (a pipe nobody reads would fill up and block the node).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from store._redis import RedisServer  # type: ignore[import-not-found]

from ._etcd import EtcdServer, free_port

ROOT = Path(__file__).resolve().parents[2]


class ClusterNode:
    """One node process; :meth:`spawn` (re)starts it on the same ports and id."""

    def __init__(self, directory: Path, node_id: str, args: list[str]) -> None:
        self.directory = directory
        self.node_id = node_id
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ws_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.node_id}-{self.starts}.log"

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--tcp-port", str(self.tcp_port),
            "--ws-port", str(self.ws_port),
            "--node-id", self.node_id,
            "--log-level", "info",
            *self.args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.directory, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def ready(self) -> tuple[int, str]:
        """``GET /ready``: (status, body); (0, why) when it does not answer."""
        try:
            with urllib.request.urlopen(self.http + "/ready", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    async def aready(self) -> tuple[int, str]:
        return await asyncio.to_thread(self.ready)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http + "/metrics", timeout=2) as r:
            return str(r.read().decode())

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"node {self.node_id} exited with {code}:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: deregister, drain, close links), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"node {self.node_id} ignored SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return "(no log)"


class Nodes:
    """etcd + redis + ``n`` nodes of one cluster (``nodes[i]``: ids n0, n1, ...)."""

    def __init__(self, directory: Path, n: int = 3, *extra: str, store: str = "redis") -> None:
        self.directory = directory
        (directory / "etcd").mkdir(exist_ok=True)
        (directory / "redis").mkdir(exist_ok=True)
        self.etcd = EtcdServer(str(directory / "etcd"))
        self.redis = RedisServer(str(directory / "redis")) if store == "redis" else None
        self.extra = list(extra)
        self.nodes = [ClusterNode(directory, f"n{i}", []) for i in range(n)]

    def args(self) -> list[str]:
        """The nodes' command line (after etcd and redis have their ports)."""
        store_args = (
            ["--store", "redis", "--redis-url", self.redis.url]
            if self.redis
            else ["--store", "memory"]
        )
        return [
            "--etcd-endpoints", self.etcd.endpoint,
            "--cluster-name", f"c{os.getpid()}",
            "--node-lease-ttl", "2",
            "--publish-rate", "0",
            *store_args,
            *self.extra,
        ]  # fmt: skip

    def __getitem__(self, i: int) -> ClusterNode:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """etcd, redis, the nodes; each again on other ports if its free port was taken
        between choosing and binding it (other tests' connections use ephemeral ports)."""
        for attempt in range(3):
            try:
                self.etcd.start()
                break
            except AssertionError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                d = self.directory / f"etcd-{attempt + 1}"
                d.mkdir()
                self.etcd = EtcdServer(str(d))
        if self.redis is not None:
            for attempt in range(3):
                try:
                    self.redis.start()
                    break
                except AssertionError:
                    if attempt == 2:
                        raise
                    self.redis = RedisServer(self.redis.directory)
        for node in self.nodes:
            node.args = self.args()
            node.spawn()
        for node in self.nodes:
            self._until_listening(node)
        self.wait_joined(self.nodes, timeout)

    @staticmethod
    def _until_listening(node: ClusterNode, timeout: float = 20.0) -> None:
        """Wait for the node's "listening" line; respawn on new ports if one was taken."""
        deadline = time.monotonic() + timeout
        respawns = 0
        while "listening" not in node.log():
            assert node.proc is not None
            if node.proc.poll() is not None:
                if "cannot listen" in node.log() and respawns < 3:
                    respawns += 1
                    node.tcp_port, node.ws_port = free_port(), free_port()
                    node.spawn()
                    continue
                node.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"node {node.node_id} did not listen:\n{node.log()}")
            time.sleep(0.05)

    def wait_joined(self, nodes: list[ClusterNode], timeout: float = 30.0) -> None:
        """Until each of ``nodes`` sees exactly them, every link up, membership healthy."""
        want = f"{len(nodes)} nodes, {len(nodes) - 1}/{len(nodes) - 1} links up, healthy"
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        last = ""
        while pending:
            node = pending[0]
            node.check_alive()
            status, body = node.ready()
            if status == 200 and want in body:
                pending.pop(0)
                continue
            last = f"{status} {body.strip()}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {node.node_id} did not see the cluster ({want}) in {timeout}s: "
                    f"/ready {last}\n{node.log()}"
                )
            time.sleep(0.05)

    async def await_joined(self, nodes: list[ClusterNode], timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.wait_joined, nodes, timeout)

    def close(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except AssertionError as e:
                errors.append(str(e))
        for node in self.nodes:
            node.kill()
        if self.redis is not None:
            self.redis.kill()
        self.etcd.kill()
        if errors:
            raise AssertionError("\n".join(errors))
