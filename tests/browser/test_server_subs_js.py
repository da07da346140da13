"""fastim.js (under Node 20) with server-side subscriptions: a token's ``subs`` claim
makes the node subscribe the connection by itself; the client learns of it
(``onServerSubscribe``), gets its messages (``onMessage``), and when the node restarts
it reconnects with where it was in its URL, so the node recovers what it missed: no
gap, no duplicate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt

from fastim.transport.static import STATIC_DIR

from .conftest import WAIT, api, free_port
from .test_fastim_js_node import NodeScript

CLIENT = (STATIC_DIR / "fastim.js").as_uri()
SECRET = "a-test-secret-of-at-least-32-bytes!!"
KEY = "server-subs-test-api-key-0123456789"

SCRIPT = """
import { connect } from %(client)s;
const [url, token] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
const client = connect({
  url, token,
  backoff: {base: 1500, max: 1500, jitter: "none"},  // the test publishes meanwhile
  onServerSubscribe: (sub) => out({serverSub: sub.channel}),
  onMessage: (m) => out({msg: [m.channel, m.offset, m.data]}),
  onGap: (g) => out({gap: g.reason}),
  onState: (state) => out({state}),
});
"""


def start_node(tmp: Path, tcp: int, ws: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fastim", "serve", "--tcp-port", str(tcp)]
    cmd += ["--ws-port", str(ws), "--store-path", str(tmp / "fastim.db")]
    cmd += ["--jwt-secret", SECRET, "--api-key", KEY, "--node-id", "subs-node"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            api(ws, KEY, "GET", "presence?channel=x")
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("the node did not start")


def test_server_side_subscription_recovers_across_a_restart(tmp_path: Path) -> None:
    tcp, ws = free_port(), free_port()
    node = start_node(tmp_path, tcp, ws)
    script = tmp_path / "subs.mjs"
    script.write_text(SCRIPT % {"client": json.dumps(CLIENT)})
    t = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "subs": ["news"]}, SECRET)
    js = NodeScript(script, f"ws://127.0.0.1:{ws}/ws", t, flags=("--experimental-websocket",))
    try:
        js.until(lambda o: o == {"serverSub": "news"}, "the node's own subscription")
        for i in range(1, 4):
            api(ws, KEY, "POST", "publish", {"channel": "news", "data": {"i": i}})
        got = [js.until(lambda o: "msg" in o, f"message {i}")["msg"] for i in range(1, 4)]
        assert got == [["news", i, {"i": i}] for i in range(1, 4)]
        node.send_signal(signal.SIGTERM)  # close 1001: the client reconnects in 1.5 s
        node.wait(15)
        node = start_node(tmp_path, tcp, ws)  # the same sqlite file: the same epoch
        for i in range(4, 7):
            api(ws, KEY, "POST", "publish", {"channel": "news", "data": {"i": i}})
        got = [js.until(lambda o: "msg" in o, f"message {i}")["msg"] for i in range(4, 7)]
        assert got == [["news", i, {"i": i}] for i in range(4, 7)]
        api(ws, KEY, "POST", "publish", {"channel": "news", "data": {"i": 7}})
        assert js.until(lambda o: "msg" in o, "a live one")["msg"] == ["news", 7, {"i": 7}]
        assert not [o for o in js.seen if isinstance(o, dict) and "gap" in o], js.seen
        assert js.seen.count({"serverSub": "news"}) == 1  # the same Subscription, again
    finally:
        js.proc.kill()
        js.proc.wait()
        node.kill()
        node.wait()
