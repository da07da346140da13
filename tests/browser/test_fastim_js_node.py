"""fastim.js outside a browser: a real Node 20 process against a real node process.

Node 20 has a global ``WebSocket`` only with ``--experimental-websocket`` (undici's),
and that one reports a refused connect with an ``error`` event and never a ``close``:
the client must count the error as a failed attempt and go on to its backoff at once
(not wait out the handshake timeout). Without any ``WebSocket`` the client says so, and
an implementation can be passed as the ``WebSocket`` option.

No ``node`` (20.10 or later) is a failure, never a skip: ``./dev test`` and ``.ci/run``
install Debian's ``nodejs`` when there is none (older distributions have an older one:
then NodeSource's, or Debian 13).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastim.transport.static import STATIC_DIR

from .conftest import WAIT, free_port

CLIENT = (STATIC_DIR / "fastim.js").as_uri()

#: connects (retrying) to argv[2], then subscribes and publishes once connected; every
#: step is one JSON line on stdout. A WebSocket subclass is passed as the option when
#: argv[3] is "option", so the test sees the client use what it is given.
SCRIPT = """
import { connect } from %(client)s;
const [url, how] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
let made = 0;
const opts = {
  url, user: "nod", backoff: {base: 50, max: 200},
  requestTimeout: 60000,  // the handshake timeout must not be what moves it on
  onState: (state, info) => out({state, code: info.code ?? null, reason: info.reason ?? null}),
  onError: (e) => out({error: String(e)}),
};
if (how === "none" || how === "ws-only") delete globalThis.WebSocket;  // Node 22+ has one
if (how === "ws-only") opts.transports = ["websocket"];
opts.onTransport = (t) => out({transport: t});
if (how === "option") {
  opts.WebSocket = class extends globalThis.WebSocket {
    constructor(...args) { super(...args); made += 1; }
  };
}
let client;
try {
  client = connect(opts);
} catch (e) {
  out({thrown: e.name, message: e.message});
  process.exit(0);
}
try {
  await client.ready(60000);
  const got = [];
  const sub = client.subscribe("node-feed", {onMessage: (m) => got.push([m.offset, m.data])});
  await sub.ready;
  const off = await client.publish("node-feed", {from: "node"});
  while (!got.length) await new Promise((r) => setTimeout(r, 20));
  out({done: true, off, got, made, node: client.welcome.node, transport: client.transport});
} catch (e) {
  out({failed: String(e)});
}
client.close();
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (20.10+) is needed: apt-get install -y nodejs", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in version.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):  # the first with a WebSocket (--experimental-websocket)
        pytest.fail(f"node 20.10+ is needed, {node} is {version.strip()}", pytrace=False)
    return node


class NodeScript:
    """A running ``node`` process whose stdout lines are read as JSON, with timeouts."""

    def __init__(self, path: Path, *args: str, flags: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [_node(), *flags, str(path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[Any] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float = WAIT) -> Any:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing from node in {timeout}s; so far: {self.seen}") from None
        try:
            obj = json.loads(line)
        except ValueError:
            obj = line.rstrip("\n")
        self.seen.append(obj)
        return obj

    def until(self, pred: Any, what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited {timeout}s for {what}; node said: {self.seen}")
            obj = self.next(left)
            if pred(obj):
                return obj


@pytest.fixture
def node_script(tmp_path: Path) -> Iterator[Any]:
    path = tmp_path / "client.mjs"
    path.write_text(SCRIPT % {"client": json.dumps(CLIENT)})
    started: list[NodeScript] = []

    def start(*args: str, flags: tuple[str, ...] = ()) -> NodeScript:
        s = NodeScript(path, *args, flags=flags)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.wait()


@pytest.mark.parametrize("how", ["global", "option"])
def test_node_retries_a_closed_port_quickly_then_connects(
    node_script: Any, node_process: Any, how: str
) -> None:
    """Nothing listens on the port: every attempt fails at once (error, no close) and
    the next follows after the backoff (50-200 ms), not after the 60 s handshake
    timeout; once a node listens there the client connects and works."""
    port = free_port()
    s = node_script(f"ws://127.0.0.1:{port}/ws", how, flags=("--experimental-websocket",))
    failed: list[dict[str, Any]] = []
    while len(failed) < 3:  # three failed attempts, well within WAIT
        obj = s.until(lambda o: isinstance(o, dict) and "state" in o, "a failed attempt")
        assert obj["state"] == "reconnecting", s.seen
        failed.append(obj)
    assert all(o["code"] == 1006 for o in failed), failed

    node_process("--ws-port", str(port))
    done = s.until(lambda o: isinstance(o, dict) and ("done" in o or "failed" in o), "done")
    assert done.get("done"), s.seen
    assert done["off"] == 1 and done["got"] == [[1, {"from": "node"}]]
    assert done["node"] == "proc-node"
    if how == "option":
        assert done["made"] >= 4  # each attempt made with the class given
    assert {"state": "connected", "code": None, "reason": None} in s.seen
    assert not [o for o in s.seen if isinstance(o, dict) and "error" in o], s.seen
    assert s.proc.wait(timeout=WAIT) == 0


def test_node_without_websocket_streams_over_http(node_script: Any, node_process: Any) -> None:
    """Without a WebSocket the client connects with the next transport it has: HTTP
    streaming over fetch (Node has no EventSource), and says so (docs/transports.md)."""
    port = free_port()
    node_process("--ws-port", str(port))
    s = node_script(f"ws://127.0.0.1:{port}/ws", "none")
    done = s.until(lambda o: isinstance(o, dict) and ("done" in o or "failed" in o), "done")
    assert done.get("done"), s.seen
    assert done["transport"] == "http_stream" and done["got"] == [[1, {"from": "node"}]]
    assert {"transport": "http_stream"} in s.seen
    assert s.proc.wait(timeout=WAIT) == 0


def test_node_without_websocket_says_so(node_script: Any) -> None:
    """Node 20 without --experimental-websocket, told to use WebSocket only: connect()
    says what is missing and how to give one, not a 'bad url ...: ReferenceError'."""
    s = node_script(f"ws://127.0.0.1:{free_port()}/ws", "ws-only")
    obj = s.until(lambda o: isinstance(o, dict), "the failure")
    assert obj.get("thrown") == "TypeError", s.seen
    assert obj["message"].startswith("no WebSocket implementation: pass one"), obj
    assert "WebSocket" in obj["message"] and "bad url" not in obj["message"]
    assert s.proc.wait(timeout=WAIT) == 0
