"""Shared fixtures: a real fastim node on loopback, on free ports.

``node`` runs in the test's own event loop (fast, and the test can look inside it);
``node_process`` runs ``python -m fastim serve`` as a real child process, for what
only a process can show (signals, exit codes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastim.config import Config
from fastim.node import Node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop and on the stock asyncio loop."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def node_factory(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start nodes with settings of the test's choosing; all are stopped at the end.

    With the product's defaults, so the store is sqlite unless the test says otherwise:
    each node gets a database file of its own in the test's directory."""
    nodes: list[Node] = []

    async def start(**settings: Any) -> Node:
        settings.setdefault("node_id", "test-node")
        settings.setdefault("store_path", str(tmp_path / f"node-{len(nodes)}-{free_port()}.db"))
        for attempt in range(5):
            cfg = dict(settings)
            cfg.setdefault("tcp_port", free_port())
            cfg.setdefault("ws_port", free_port())
            n = Node(Config(**cfg))
            try:
                await n.start()
            except OSError:
                # another process took the free port between free_port() and bind()
                if attempt == 4 or ("tcp_port" in settings and "ws_port" in settings):
                    raise
                continue
            nodes.append(n)
            return n
        raise AssertionError("unreachable")

    yield start
    for n in nodes:
        await n.stop()


@pytest.fixture
async def node(node_factory: NodeFactory) -> Node:
    return await node_factory()


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    tcp_port: int
    ws_port: int
    log: list[str]

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            self.log.append(out)
            msg = f"node did not exit within {timeout}s after signal {sig}"
            raise AssertionError(msg) from None
        self.log.append(out)
        return self.proc.returncode


def start_node_process(*args: str, timeout: float = 20.0) -> NodeProcess:
    tcp, ws = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "fastim",
        "serve",
        "--tcp-port",
        str(tcp),
        "--ws-port",
        str(ws),
        "--node-id",
        "proc-node",
        *args,
    ]
    # a directory of its own: the default store is a sqlite file in the working directory
    cwd = tempfile.mkdtemp(prefix="fastim-node-")
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening" in line:
            return NodeProcess(proc, tcp, ws, lines)
    proc.kill()
    raise AssertionError("node process did not start:\n" + "".join(lines))


@pytest.fixture
def node_process() -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def start(*args: str) -> NodeProcess:
        p = start_node_process(*args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()
