"""The few files the node serves over plain HTTP: the browser client and the demo chat.

``GET /fastim.js`` is the browser client (an ES module, no dependencies): served by every
node so a page can ``import`` the client that matches the node's protocol, from the
origin its WebSocket is on. ``GET /demo/`` is a small chat built on it, served unless the
``demo`` setting is 0. Both come from ``fastim/static/`` (package data), are read once
and kept in memory (a few tens of KiB), and are answered with an ``ETag`` and
``Cache-Control: no-cache``: a browser revalidates each time and gets a body-less 304
while the file is unchanged, so a node upgrade is never hidden behind a stale cached
client.

``/fastim.js`` is public code that pages of other origins ``import`` (module scripts are
fetched with CORS): it carries ``Access-Control-Allow-Origin`` as the
``static_allowed_origins`` setting says (``*`` by default: no credentials go with it, and
a public file hidden from other origins protects nothing; whether a page may *connect*
is ``allowed_origins``, at the WebSocket: origin.py), and ``OPTIONS /fastim.js`` answers
a CORS preflight. The demo has no CORS headers: it is the node's own page.

Only files listed at load time are served: a request path is looked up in that table,
never joined to a filesystem path, so ``..`` and the like cannot reach anything else.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ..config import Config
from .origin import Origins


class HttpSession(Protocol):
    """The plain HTTP request being answered (a :class:`~fastim.transport.ws.WsSession`
    before any upgrade): its headers, the node's settings and origin policy, and the
    two ways to answer."""

    headers: dict[bytes, bytes]
    config: Config

    @property
    def node(self) -> Any: ...

    def http_reply(self, status: int, body: str, extra: bytes = b"") -> None: ...

    def http_send(
        self, status: int, body: bytes, content_type: bytes, extra: bytes = b""
    ) -> None: ...


def _origins(session: HttpSession) -> Origins:
    origins: Origins = session.node.origins
    return origins


STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".json": b"application/json",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

#: every answer: revalidate each time (cheap: 304), and no content sniffing
_COMMON = b"Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n"
#: the demo page only talks to its own node (connect-src: the WebSocket, same host)
_DEMO_CSP = (
    b"Content-Security-Policy: default-src 'self'; connect-src 'self' ws: wss:; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n"
)


class StaticFile(NamedTuple):
    body: bytes
    content_type: bytes
    #: a strong validator: the first 128 bits of the body's SHA-256, quoted
    etag: bytes
    #: headers besides Content-Type and Content-Length
    headers: bytes
    #: public code other origins may fetch: CORS headers (static_allowed_origins)
    cors: bool = False


def _load(path: Path, extra: bytes = b"", cors: bool = False) -> StaticFile:
    body = path.read_bytes()
    etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
    ctype = _TYPES.get(path.suffix, b"application/octet-stream")
    return StaticFile(body, ctype, etag, _COMMON + b"ETag: " + etag + b"\r\n" + extra, cors)


class StaticFiles:
    """URL path → file, built from ``fastim/static`` on first use (then kept)."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.root = root
        self._files: dict[bytes, StaticFile] | None = None
        self._demo: dict[bytes, StaticFile] = {}

    def _build(self) -> dict[bytes, StaticFile]:
        files: dict[bytes, StaticFile] = {}
        client = self.root / "fastim.js"
        if client.is_file():
            files[b"/fastim.js"] = _load(client, cors=True)
        demo = self.root / "demo"
        if demo.is_dir():
            for p in sorted(demo.iterdir()):
                if p.is_file() and _NAME.fullmatch(p.name) and p.suffix in _TYPES:
                    f = _load(p, _DEMO_CSP if p.suffix == ".html" else b"")
                    self._demo[b"/demo/" + p.name.encode()] = f
            index = self._demo.get(b"/demo/index.html")
            if index is not None:
                self._demo[b"/demo/"] = index
        root = self.root / "index.html"
        if root.is_file():  # `/`: a page pointing to the demo, served when the demo is
            self._demo[b"/"] = _load(root, _DEMO_CSP)
        self._files = files
        return files

    def find(self, path: bytes, demo: bool) -> StaticFile | None:
        files = self._files if self._files is not None else self._build()
        f = files.get(path)
        if f is None and demo:
            f = self._demo.get(path)
        return f


#: the node's files (one table per process: the files are the package's)
FILES = StaticFiles()


def serve(session: HttpSession, method: bytes, path: bytes) -> bool:
    """Answer a GET for one of the files; False when ``path`` is not one of them.

    ``/demo`` redirects to ``/demo/`` (a relative ``Location``) so the page's relative
    links (``demo.js``, ``../fastim.js``) resolve under any prefix a reverse proxy puts
    before them.
    """
    demo = bool(session.config.demo)
    if path == b"/demo" and demo:
        if method != b"GET":
            session.http_reply(405, "use GET", b"Allow: GET\r\n")
        else:
            session.http_send(301, b"", b"text/plain; charset=utf-8", b"Location: demo/\r\n")
        return True
    f = FILES.find(path, demo)
    if f is None:
        return False
    cors = _origins(session).static_headers(session.headers.get(b"origin")) if f.cors else b""
    if method == b"OPTIONS" and f.cors:
        # a CORS preflight (a fetch() with headers of its own; an import needs none)
        session.http_send(204, b"", f.content_type, cors + _PREFLIGHT)
        return True
    if method != b"GET":
        allow = b"Allow: GET, OPTIONS\r\n" if f.cors else b"Allow: GET\r\n"
        session.http_reply(405, f"{path.decode('latin-1')}: use GET", allow)
        return True
    inm = session.headers.get(b"if-none-match")
    if inm is not None and (inm.strip() == b"*" or f.etag in _etags(inm)):
        session.http_send(304, b"", f.content_type, f.headers + cors)
        return True
    session.http_send(200, f.body, f.content_type, f.headers + cors)
    return True


#: the answer to a preflight: GET, with any request headers, remembered for a day
_PREFLIGHT = (
    b"Allow: GET, OPTIONS\r\nAccess-Control-Allow-Methods: GET\r\n"
    b"Access-Control-Allow-Headers: *\r\nAccess-Control-Max-Age: 86400\r\n"
)


def _etags(header: bytes) -> list[bytes]:
    """The entity tags of an If-None-Match header (weak ones compared by their value)."""
    out = []
    for item in header.split(b","):
        item = item.strip()
        if item.startswith(b"W/"):
            item = item[2:]
        out.append(item)
    return out
