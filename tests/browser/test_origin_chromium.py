"""Pages of another origin in headless Chromium: the Origin check and /fastim.js with CORS.

The page is served by a small HTTP server of the test (http.server in a thread, on
another port of 127.0.0.1: another origin than the node's), against a real node process.

1. A page of another origin that opens a WebSocket to the node is refused (HTTP 403,
   counted) by default, and connects once its origin is in ``allowed_origins``.
2. The node's own demo page connects with the default settings (same origin).
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from .conftest import Browser, console_errors
from .test_demo_chromium import login, wait_js

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
