"""Chat without WebSocket, in headless Chromium, through Debian's nginx (docs/transports.md).

The fixture starts a real ``nginx`` on a free loopback port with a generated config: it
serves the test's page and proxies everything else to a real node process, the way a
site puts a node behind its web server, but *without* passing ``Upgrade``, so no
WebSocket can go through (nginx forwards a plain GET, the node answers 426). Twice:
with ``proxy_buffering off`` and with nginx's default ``proxy_buffering on``, where
the streams still flow because the node's responses say ``X-Accel-Buffering: no``.

In each, two windows chat through fastim.js:

- one whose page has WebSocket (it fails through this proxy) and lets fastim.js choose:
  it falls back to HTTP streaming by itself and says so (``onTransport``);
- one whose page deletes ``window.WebSocket`` before importing fastim.js and asks for
  Server-Sent Events (EventSource, commands by POST).

Then nginx is stopped (both streams drop), a message is published straight to the node
while they are away, nginx starts again: both reconnect on their transport and recover
the missed message through the channel history, each message once.

No nginx is a failure with the command that installs it, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import WAIT, Browser, console_errors, free_port
from .test_demo_chromium import wait_js

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<script>
window.errors = [];
addEventListener("error", (e) => errors.push(String(e.message || e)));
addEventListener("unhandledrejection", (e) => errors.push(String(e.reason)));
const q = new URLSearchParams(location.search);
if (q.has("nows")) delete window.WebSocket;  // as in a browser or network without it
</script>
<script type="module">
const q = new URLSearchParams(location.search);
const { connect } = await import("/fastim.js");
window.got = [];
window.transports = [];
const opts = { backoff: { base: 100, max: 500 }, onTransport: (t) => transports.push(t) };
if (q.get("transports")) opts.transports = q.get("transports").split(",");
const client = connect(opts);  // the node at /ws of this origin: through nginx
window.client = client;
const sub = client.subscribe("room", { onMessage: (m) => got.push([m.offset, m.data.text]) });
await sub.ready;
window.say = (text) => client.publish("room", { text }).then((off) => (window.sent = off));
window.ready = true;
</script></head><body>chat</body></html>"""


#: a page with nothing but the browser's EventSource: its own reconnect, with the
#: Last-Event-ID of the last id-only event, must recover every channel
RAW_PAGE = """<!doctype html><html><head><meta charset="utf-8"><script>
window.got = []; window.opens = 0;
const es = new EventSource("/sse?ch=room&ch=other");
es.onopen = () => { opens += 1; };
es.onmessage = (e) => {
  const o = JSON.parse(e.data);
  if (o.op === "msg") got.push([o.ch, o.off, o.data.text]);
};
</script></head><body>raw</body></html>"""


def _nginx() -> str:
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if path is None:
        pytest.fail("nginx is needed: apt-get install -y nginx", pytrace=False)
    return path


CONF = """
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  types {{ text/html html; }}
  default_type text/html;
  server {{
    listen 127.0.0.1:{port};
    location = /chat.html {{ root {dir}; }}
    location = /raw.html {{ root {dir}; }}
    location / {{
      proxy_pass http://127.0.0.1:{node};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_read_timeout 1h;
      proxy_buffering {buffering};
      # no "proxy_set_header Upgrade/Connection": WebSocket upgrades do not go through
    }}
  }}
}}
"""


class Nginx:
    """A running nginx in front of a node (``start``/``stop`` keep its port)."""

    def __init__(self, directory: Path, node_port: int, buffering: str) -> None:
        self.dir = directory
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""  # workers must read the page
        (directory / "chat.html").write_text(PAGE)
        (directory / "raw.html").write_text(RAW_PAGE)
        (directory / "nginx.conf").write_text(
            CONF.format(
                user=user, dir=directory, port=self.port, node=node_port, buffering=buffering
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                _nginx(),
                "-c",
                str(self.dir / "nginx.conf"),
                "-p",
                str(self.dir),
                "-e",
                str(self.dir / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        log = (self.dir / "error.log").read_text() if (self.dir / "error.log").exists() else ""
        raise AssertionError(f"nginx did not start:\n{log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown, connections dropped
            self.proc.wait(timeout=WAIT)
        self.proc = None


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int, str], Nginx]]:
    started: list[Nginx] = []

    def start(node_port: int, buffering: str) -> Nginx:
        d = tmp_path / f"nginx-{len(started)}"
        d.mkdir()
        n = Nginx(d, node_port, buffering)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def publish_direct(port: int, text: str) -> None:
    """Publish straight to the node (not through nginx), from the SDK."""
    import asyncio

    from fastim.client import connect

    async def go() -> None:
        async with await connect(f"ws://127.0.0.1:{port}/ws") as c:
            await c.publish("room", {"text": text})

    asyncio.run(go())


@pytest.mark.parametrize("buffering", ["off", "on"])
def test_chat_without_websocket_through_nginx(
    browser: Callable[[], Browser], node_process: Any, nginx: Any, buffering: str
) -> None:
    node = node_process()
    proxy = nginx(node.ws_port, buffering)
    base = f"http://127.0.0.1:{proxy.port}/chat.html"
    # the proxy answers a WebSocket upgrade with the node's 426: no WebSocket here
    req = urllib.request.Request(
        f"http://127.0.0.1:{proxy.port}/ws",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 426

    a, b, c = browser(), browser(), browser()
    a.get(base)  # WebSocket exists but cannot pass the proxy: fastim.js falls back
    b.get(base + "?nows&transports=sse")  # no WebSocket at all; Server-Sent Events
    c.get(base + "?nows")  # no WebSocket, fastim.js chooses: HTTP streaming
    for d in (a, b, c):
        wait_js(d, "window.ready", "subscribed")
    assert c.execute_script("return window.transports") == ["http_stream"]
    c.close()
    assert a.execute_script("return window.transports") == ["http_stream"]
    assert a.execute_script("return client.transport") == "http_stream"
    assert b.execute_script("return window.transports") == ["sse"]

    a.execute_script("say('hello from a')")
    b.execute_script("say('hello from b')")
    for d in (a, b):
        got = wait_js(d, "window.got.length >= 2 && window.got", "both messages")
        assert sorted(got) == [[1, "hello from a"], [2, "hello from b"]]

    # the proxy goes away: both streams drop; a message is published meanwhile
    proxy.stop()
    time.sleep(0.5)
    publish_direct(node.ws_port, "while away")
    proxy.start()
    a.execute_script("say('back')")  # queued until reconnected, then sent
    for d in (a, b):
        got = wait_js(d, "window.got.length >= 4 && window.got", "recovered and new")
        assert got[:3] == [[1, "hello from a"], [2, "hello from b"], [3, "while away"]], got
        assert got[3] == [4, "back"] and len(got) == 4  # each once, in order
        assert d.execute_script("return client.reconnects") >= 1
        assert d.execute_script("return window.errors") == []
    assert a.execute_script("return client.transport") == "http_stream"
    assert b.execute_script("return client.transport") == "sse"
    # the failed upgrades are in the console; nothing else went wrong
    for d in (a, b):
        errors = [e for e in console_errors(d) if "WebSocket" not in e and "ERR_" not in e]
        assert errors == [], errors


def test_eventsource_reconnect_recovers_every_channel(
    browser: Callable[[], Browser], node_process: Any, nginx: Any
) -> None:
    """The browser's own EventSource reconnect (no fastim.js) sends the Last-Event-ID of
    the id-only event after the messages: both channels recover what they missed."""
    import asyncio

    from fastim.client import connect

    node = node_process()
    proxy = nginx(node.ws_port, "on")

    async def pub(*items: tuple[str, str]) -> None:
        async with await connect(f"ws://127.0.0.1:{node.ws_port}/ws") as cl:
            for ch, text in items:
                await cl.publish(ch, {"text": text})

    d = browser()
    d.get(f"http://127.0.0.1:{proxy.port}/raw.html")
    wait_js(d, "window.opens === 1", "the EventSource open")
    time.sleep(0.3)  # subscribed (the replies precede any message)
    asyncio.run(pub(("room", "r1"), ("other", "o1")))
    wait_js(d, "window.got.length >= 2", "the live messages")
    proxy.stop()
    asyncio.run(pub(("room", "r2"), ("other", "o2"), ("room", "r3")))
    proxy.start()
    got = wait_js(d, "window.got.length >= 5 && window.got", "the missed messages")
    assert d.execute_script("return window.opens") >= 2  # the browser reconnected
    assert sorted(got) == [
        ["other", 1, "o1"], ["other", 2, "o2"], ["room", 1, "r1"], ["room", 2, "r2"],
        ["room", 3, "r3"],
    ]  # fmt: skip
    time.sleep(0.5)
    assert len(d.execute_script("return window.got")) == 5  # none twice
