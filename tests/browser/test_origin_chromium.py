"""Pages of another origin in headless Chromium: the Origin check and /fastim.js with CORS.

The page is served by a small HTTP server of the test (http.server in a thread, on
another port of 127.0.0.1: another origin than the node's), against a real node process.

1. A page of another origin that opens a WebSocket to the node is refused (HTTP 403,
   counted) by default, and connects once its origin is in ``allowed_origins``.
2. The node's own demo page connects with the default settings (same origin).
3. The cross-origin example of docs/client.md (read from the doc itself, so the doc and
   the test cannot drift: only the node's port and the page's origin are substituted)
   runs as written, with the node started by the doc's own command: it imports
   /fastim.js from the node (CORS), subscribes, publishes, receives its message, sends
   a direct message and reads presence. With ``static_allowed_origins = ""`` Chromium
   blocks that import.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import WAIT, Browser, console_errors
from .test_demo_chromium import login, wait_js

CLIENT_MD = Path(__file__).resolve().parents[2] / "docs" / "client.md"

#: before the page's own scripts: what it logs and what goes wrong, kept for the test
INSTRUMENT = """<script>
window.__log = []; window.__errors = [];
for (const level of ["log", "warn"]) {
  const orig = console[level].bind(console);
  console[level] = (...args) => { window.__log.push([level, ...args]); orig(...args); };
}
addEventListener("error", (e) => window.__errors.push(String(e.message || e)));
addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));
</script>"""


def page(body: str) -> str:
    head = f'<meta charset="utf-8">{INSTRUMENT}'
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"


class Site:
    """A page the test's HTTP server answers at ``/`` (settable once the node is up)."""

    def __init__(self) -> None:
        self.html = ""
        self.origin = ""


PageServer = Callable[[str], Site]


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    """``serve(html)`` → a new HTTP server on a free port of 127.0.0.1 answering ``/``."""
    servers: list[ThreadingHTTPServer] = []

    def serve(html: str) -> Site:
        site = Site()
        site.html = html

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/":
                    self.send_error(404)
                    return
                body = site.html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        site.origin = f"http://127.0.0.1:{srv.server_address[1]}"
        return site

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def origin_refused(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fastim_origin_refused_total "):
                return float(line.split()[1])
    raise AssertionError("fastim_origin_refused_total not in /metrics")


# a page that opens a plain WebSocket to the node and subscribes
RAW_SOCKET = """<script>
window.events = [];
const ws = new WebSocket(new URLSearchParams(location.search).get("ws"));
ws.onopen = () => { events.push("open"); ws.send('{"op":"sub","ch":"news","id":1}'); };
ws.onmessage = (e) => events.push(JSON.parse(e.data).op);
ws.onclose = (e) => events.push("close " + e.code);
</script>"""


def test_a_page_of_another_origin_is_refused_unless_listed(
    browser: Callable[[], Browser], node_process: Any, page_server: PageServer
) -> None:
    origin = page_server(page(RAW_SOCKET)).origin
    default = node_process()
    listed = node_process("--allowed-origins", f"https://app.example.com,{origin}")
    d = browser()

    d.get(f"{origin}/?ws=ws://127.0.0.1:{default.ws_port}/ws")
    events = wait_js(d, "window.events.length && window.events", "the socket's fate")
    assert events == ["close 1006"]  # the page learns nothing more: a failed handshake
    errors = console_errors(d)
    assert any("403" in e for e in errors), errors
    assert origin_refused(default.ws_port) == 1

    d.get(f"{origin}/?ws=ws://127.0.0.1:{listed.ws_port}/ws")
    events = wait_js(d, "window.events.length >= 2 && window.events", "subscribed")
    assert events == ["open", "subscribed"]
    assert console_errors(d) == []
    assert origin_refused(listed.ws_port) == 0


def test_the_nodes_own_demo_page_connects_by_default(
    browser: Callable[[], Browser], node_process: Any
) -> None:
    node = node_process()  # allowed_origins = "": only its own pages
    d = browser()
    login(d, f"http://127.0.0.1:{node.ws_port}", "dora")
    assert origin_refused(node.ws_port) == 0
    assert console_errors(d) == []


# ----------------------------------------------------------------------------- the doc


def doc_example() -> tuple[list[str], str]:
    """From docs/client.md's Browser section: the node's flags of its ``fastim serve``
    command and the page's ``<script type="module">`` block, as written."""
    text = CLIENT_MD.read_text()
    section = text[text.index("\n## Browser\n") :]
    sh = re.search(r"```sh\n(.*?)```", section, re.S)
    html = re.search(r"```html\n(.*?)```", section, re.S)
    assert sh is not None and html is not None, "docs/client.md: the Browser example moved"
    assert sh.start() < html.start()
    command = shlex.split(sh.group(1), comments=True)
    assert command[:2] == ["fastim", "serve"] and "--allowed-origins" in command, command
    return command[2:], html.group(1)


DOC_NODE = "127.0.0.1:7071"
DOC_PAGE = "http://127.0.0.1:8000"


def start_doc_page(node_process: Any, page_server: PageServer, *more: str) -> tuple[Any, Site]:
    """The doc's node (its flags, the page's origin substituted) and the doc's page."""
    flags, script = doc_example()
    assert f'"http://{DOC_NODE}/fastim.js"' in script and DOC_PAGE in flags
    site = page_server("")
    node = node_process(*[site.origin if f == DOC_PAGE else f for f in flags], *more)
    site.html = page(script.replace(DOC_NODE, f"127.0.0.1:{node.ws_port}"))
    return node, site


def test_the_docs_cross_origin_example_runs_as_written(
    browser: Callable[[], Browser], node_process: Any, page_server: PageServer
) -> None:
    node, site = start_doc_page(node_process, page_server)
    d = browser()
    d.get(f"{site.origin}/")
    # the example's last line logs the room's presence: everything before it worked
    presence = wait_js(
        d, "window.__log.find(([, x]) => x && x.ch === 'room:lobby' && 'count' in x)", "presence"
    )
    shown = {
        k: presence[1].get(k) for k in ("ch", "count", "users")
    }  # the doc's {ch, count, users}
    assert shown == {"ch": "room:lobby", "count": 1, "users": ["alice"]}, presence
    log = d.execute_script("return window.__log")
    assert ["log", 1, {"text": "hi"}] in log  # onMessage: its own publish came back
    assert not [e for e in log if e[0] == "warn"]  # no gap
    assert d.execute_script("return window.__errors") == []
    assert console_errors(d) == []
    assert origin_refused(node.ws_port) == 0
    # the direct message to bob was stored: bob's client gets it
    got = d.execute_async_script(
        f"""
        const done = arguments[0];
        import("http://127.0.0.1:{node.ws_port}/fastim.js").then((f) => {{
          f.connect({{user: "bob", onDirect: (dm) => done([dm.seq, dm.from, dm.data])}});
        }}, (e) => done("error: " + e));
        """
    )
    assert got == [1, "alice", {"text": "psst"}]


def test_without_cors_a_page_of_another_origin_cannot_import_the_client(
    browser: Callable[[], Browser], node_process: Any, page_server: PageServer
) -> None:
    """What the example met before /fastim.js had CORS headers."""
    node, site = start_doc_page(node_process, page_server, "--static-allowed-origins", "")
    d = browser()
    d.get(f"{site.origin}/")
    errors: list[str] = []
    for _ in range(int(WAIT / 0.1)):
        errors = console_errors(d)
        if errors:
            break
        time.sleep(0.1)
    assert any("CORS" in e and "/fastim.js" in e for e in errors), errors
    assert d.execute_script("return window.__log") == []
    assert origin_refused(node.ws_port) == 0
