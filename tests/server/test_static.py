"""The files the node serves on its WebSocket port: /fastim.js always, /demo/ unless off.

Real HTTP over a real socket: status, headers (type, caching, validators), bodies equal
to the package's files, 304 on revalidation, 404 for anything not in the table (paths
that try to climb out of it included) and for the demo when ``demo = 0``.
"""

from __future__ import annotations

from typing import Any

import pytest

from fastim.transport.static import STATIC_DIR

from ._support import http_exchange


def get(path: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_fastim_js_is_served_with_type_and_validators(node_factory: Any) -> None:
    node = await node_factory(demo=0)  # served whatever the demo setting
    status, headers, body = await http_exchange(node.ws_port, get("/fastim.js"))
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert body == (STATIC_DIR / "fastim.js").read_bytes()
    assert b"export function connect" in body
    etag = headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 34
    # revalidation: unchanged file, no body
    status, headers, body = await http_exchange(
        node.ws_port, get("/fastim.js", f'If-None-Match: W/{etag}, "other"\r\n')
    )
    assert status == 304 and body == b"" and headers["etag"] == etag
    assert "content-length" not in headers
    # a stale validator gets the file again
    status, _, body = await http_exchange(
        node.ws_port, get("/fastim.js", 'If-None-Match: "0123"\r\n')
    )
    assert status == 200 and body.startswith(b"//")


async def test_demo_pages(node_factory: Any) -> None:
    node = await node_factory()
    status, headers, body = await http_exchange(node.ws_port, get("/demo"))
    assert status == 301 and headers["location"] == "demo/" and body == b""
    status, headers, body = await http_exchange(node.ws_port, get("/demo/"))
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (STATIC_DIR / "demo" / "index.html").read_bytes()
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for name, ctype in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
        status, headers, body = await http_exchange(node.ws_port, get(f"/demo/{name}"))
        assert status == 200, name
        assert headers["content-type"] == f"{ctype}; charset=utf-8"
        assert body == (STATIC_DIR / "demo" / name).read_bytes()
    # the page imports the client relative to itself
    assert b'from "../fastim.js"' in (STATIC_DIR / "demo" / "demo.js").read_bytes()


@pytest.mark.parametrize(
    "path",
    ["/demo/../config.py", "/demo/%2e%2e/hub.py", "/demo/nope.js", "/static/fastim.js", "/demo//"],
)
async def test_only_listed_files(node_factory: Any, path: str) -> None:
    node = await node_factory()
    status, _, body = await http_exchange(node.ws_port, get(path))
    assert status == 404, (path, body)


async def test_demo_off_is_404(node_factory: Any) -> None:
    node = await node_factory(demo=0)
    for path in ("/demo", "/demo/", "/demo/demo.js", "/demo/index.html"):
        status, _, _ = await http_exchange(node.ws_port, get(path))
        assert status == 404, path


async def test_other_methods_are_refused(node_factory: Any) -> None:
    node = await node_factory()
    status, headers, _ = await http_exchange(
        node.ws_port, get("/fastim.js", "Content-Length: 0\r\n", method="POST")
    )
    assert status == 405 and headers["allow"] == "GET, OPTIONS"  # and a CORS preflight


async def test_root_points_to_the_demo_when_it_is_on(node_factory: Any) -> None:
    node = await node_factory()
    status, headers, body = await http_exchange(node.ws_port, get("/"))
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (STATIC_DIR / "index.html").read_bytes()
    assert b'href="demo/"' in body and b'href="fastim.js"' in body
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    off = await node_factory(demo=0)
    status, _, body = await http_exchange(off.ws_port, get("/"))
    assert status == 404, body
