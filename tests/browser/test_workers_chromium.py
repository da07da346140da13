"""Issue P10 in headless Chromium: fastim.js on a node of ``fastim serve --workers 2``
when one worker is killed (kill -9).

Pages load ``/fastim.js`` from the node and subscribe to a channel and to their user's
direct messages; the kernel puts each page's WebSocket on one worker (the welcome names
it). The test publishes and sends through the node's HTTP API, kills the worker a page
is on, publishes and sends while it is down, waits for the supervisor's replacement, and
publishes again: the page on the killed worker reconnects and has every message once,
in order, with no gap; the page on the other worker did not reconnect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from .conftest import WAIT, Browser, api, free_port
from .test_demo_chromium import wait_js
from .test_restarts_chromium import PAGE, js, page_errors

KEY = "browser-workers-api-key-0123456789"
QUICK = {"base": 100, "factor": 2, "max": 400, "jitter": "full"}


class Node:
    """``fastim serve --workers 2`` with the HTTP API on, in the test's directory."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.ws_port = free_port()
        self.log_path = directory / "node.log"
        cmd = [sys.executable, "-m", "fastim", "serve", "--workers", "2", "--tcp-port", "0"]
        cmd += ["--ws-port", str(self.ws_port), "--api-key", KEY, "--node-id", "browser"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", "info", *args], cwd=directory, stdout=out, stderr=out
            )
        deadline = time.monotonic() + WAIT
        while "(2 workers)" not in self.log():  # the supervisor's line: every worker serves
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> dict[str, int]:
        """worker name -> pid (the supervisor's children, named by their role)."""
        pid = self.proc.pid
        out = {}
        for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"_FASTIM_WORKER="):
                    index = orjson.loads(item.split(b"=", 1)[1])["index"]
                    out[f"w{index}"] = int(k)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def dead(pid: int) -> bool:
    """Gone: reaped by the supervisor (a zombie's last threads may still hold its
    listening socket, and reset a new connection)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.stop()


@pytest.fixture
def memory_node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, "--store", "memory")
    yield n
    n.stop()


def publish(node: Node, i: int, ch: str = "s") -> int:
    body = {"channel": ch, "data": {"i": i}}
    return int(api(node.ws_port, KEY, "POST", "publish", body)["offset"])


def send(node: Node, n: int) -> int:
    body = {"to": "bob", "from": "sam", "data": {"n": n}}
    return int(api(node.ws_port, KEY, "POST", "send", body)["seq"])


def test_a_page_on_a_killed_worker_recovers_everything(
    browser: Callable[[], Browser], node: Node
) -> None:
    pages: dict[str, Browser] = {}
    for _ in range(12):  # until a page sits on each worker
        d = browser()
        d.get(f"http://127.0.0.1:{node.ws_port}/health")
        ready = d.execute_async_script(PAGE, "bob", "s", QUICK)
        assert isinstance(ready, dict), ready
        pages.setdefault(str(js(d, "client.welcome.node")).rsplit(".", 1)[-1], d)
        if len(pages) == 2:
            break
    assert sorted(pages) == ["w0", "w1"], "pages never reached both workers"
    offs = [publish(node, i) for i in range(10)]
    seqs = [send(node, n) for n in range(10)]
    for d in pages.values():
        wait_js(d, "chan.length === 10", "10 messages")
    before = node.workers()
    os.kill(before["w0"], signal.SIGKILL)  # the page on w0 loses its connection
    deadline = time.monotonic() + WAIT
    while not dead(before["w0"]):  # its sockets closed: the port is w1's alone now
        assert time.monotonic() < deadline
        time.sleep(0.01)
    offs += [publish(node, i) for i in range(10, 20)]  # answered by w1 meanwhile
    seqs += [send(node, n) for n in range(10, 20)]
    deadline = time.monotonic() + WAIT
    while node.workers().get("w0") in (None, before["w0"]):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.05)
    offs += [publish(node, i) for i in range(20, 30)]
    seqs += [send(node, n) for n in range(20, 30)]
    assert offs == list(range(1, 31)) and seqs == list(range(1, 31))
    for name, d in pages.items():
        wait_js(d, "chan.length === 30", f"the page on {name}: 30 messages")
        assert js(d, "chan") == [["msg", off, off - 1] for off in range(1, 31)], name
        # both pages are bob: together they have every direct message, each once, in
        # order (a page may skip one the other acknowledged first)
        direct = js(d, "direct")
        assert [x[0] for x in direct] == ["dm"] * len(direct), direct
        got = [x[1] for x in direct]
        assert got == sorted(set(got)), name
        assert page_errors(d) == [], name
    union = {x[1] for d in pages.values() for x in js(d, "direct")}
    assert union == set(range(1, 31))
    assert js(pages["w0"], "client.reconnects") >= 1
    assert js(pages["w1"], "client.reconnects") == 0, "the page on the other worker noticed"


def test_memory_store_a_page_is_told_what_a_dead_worker_took(
    browser: Callable[[], Browser], memory_node: Node
) -> None:
    """The memory store: the worker that numbered a channel dies; the page on the other
    worker meets onGap (reason epoch: what the dead worker published and had not sent
    on is lost), then the new epoch from its start; it did not reconnect."""
    from fastim.cluster.placement import owner

    node = memory_node
    ch = next(f"m{i}" for i in range(100) if owner(f"m{i}", ["w0", "w1"]) == "w0")
    d = None
    for _ in range(12):  # a page on w1, the survivor
        page = browser()
        page.get(f"http://127.0.0.1:{node.ws_port}/health")
        ready = page.execute_async_script(PAGE, "cleo", ch, QUICK)
        assert isinstance(ready, dict), ready
        if str(js(page, "client.welcome.node")).endswith(".w1"):
            d = page
            break
    assert d is not None, "no page reached w1"
    assert [publish(node, i, ch) for i in range(3)] == [1, 2, 3]
    wait_js(d, "chan.length === 3", "3 messages")
    e1 = js(d, "sub.epoch")
    pid = node.workers()["w0"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while not dead(pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    wait_js(d, "chan.length === 4", "the gap")
    e2 = js(d, "sub.epoch")
    assert e2 != e1
    assert [publish(node, i, ch) for i in range(3, 5)] == [1, 2]  # the new epoch
    wait_js(d, "chan.length === 6", "the new epoch's messages")
    assert js(d, "chan") == [
        ["msg", 1, 0],
        ["msg", 2, 1],
        ["msg", 3, 2],
        ["gap", "epoch", e1, 3, e2, 0],
        ["msg", 1, 3],
        ["msg", 2, 4],
    ]
    assert js(d, "client.reconnects") == 0
    assert page_errors(d) == []
