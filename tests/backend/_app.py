"""A real application backend for the proxy-hook tests: an aiohttp server on loopback.

It implements every hook the way a chat application would, in Centrifugo's HTTP proxy
shapes (docs/proxy.md):

- ``/connect``: the user from a session cookie (``sid``; over TCP the HELLO's
  ``data.sid``), looked up in its sessions;
  no cookie: ``disconnect`` 4501; a banned session: ``error`` 403. Every user gets the
  server-side channel ``news`` and its personal ``inbox:<user>``.
- ``/refresh``: extends a session, or says it expired (``expired_users``).
- ``/subscribe``: ``secret:*`` refused (403); ``private:<user>`` only for that user.
- ``/publish``: text with "spam" refused (code 1000); ``chat:*`` messages are stored
  in its "database" (a list) with an id and the author, and the stored row replaces
  the data (what the subscribers get).
- ``/rpc``: ``sum`` adds numbers, ``whoami`` answers the user, others 404.

``mode`` switches every hook to failing: "down" (HTTP 500), "slow" (answers after
``slow_for`` seconds), "garbage" (not JSON), "badcode" (an error code out of range).
Every request is recorded with its headers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Backend:
    """The application's state the tests read and steer."""

    port: int = 0
    sessions: dict[str, str] = field(default_factory=lambda: {"s-alice": "alice", "s-bob": "bob"})
    banned: set[str] = field(default_factory=lambda: {"s-mallory"})
    #: connect answers' expire_at (Unix seconds; 0: none)
    expire_at: float = 0.0
    #: refresh answers: expired for these users, else expire_at = refresh_to
    expired_users: set[str] = field(default_factory=set)
    refresh_to: float = 0.0
    mode: str = "ok"
    slow_for: float = 3.0
    #: (hook, body, headers) of every request received
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    #: the chat messages stored by the publish hook
    stored: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hook_urls(self, *hooks: str) -> dict[str, str]:
        """Node settings pointing the given hooks at this backend."""
        return {f"proxy_{h}_url": f"{self.url}/{h}" for h in hooks}

    def bodies(self, hook: str) -> list[dict[str, Any]]:
        return [b for h, b, _ in self.requests if h == hook]


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def make_app(state: Backend) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        hook = request.match_info["hook"]
        body = orjson.loads(await request.read())
        headers = {k.lower(): v for k, v in request.headers.items()}
        state.requests.append((hook, body, headers))
        if state.mode == "down":
            return web.Response(status=500, text="backend down")
        if state.mode == "slow":
            await asyncio.sleep(state.slow_for)
        if state.mode == "garbage":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if state.mode == "badcode":  # an error code outside Centrifugo's 400..1999
            return _json({"error": {"code": 5000, "message": "out of range"}})
        user = body.get("user", "")
        if hook == "connect":
            data = body.get("data")
            # browsers bring the cookie; a TCP client its HELLO's data
            sid = _cookie(headers, "sid") or (data.get("sid") if isinstance(data, dict) else None)
            if sid is None:
                return _json({"disconnect": {"code": 4501, "reason": "unauthorized"}})
            if sid in state.banned:
                return _json({"error": {"code": 403, "message": "banned"}})
            who = state.sessions.get(sid)
            if who is None:
                return _json({"disconnect": {"code": 4501, "reason": "unknown session"}})
            result: dict[str, Any] = {
                "user": who,
                "channels": ["news", f"inbox:{who}"],
                "data": {"greeting": f"hello {who}"},
                "meta": {"sid": sid},
            }
            if state.expire_at:
                result["expire_at"] = int(state.expire_at)
            resp = _json({"result": result})
            # a backend framework that sets a cookie on every answer: the node must not
            # keep it for the next request (another connection's)
            resp.set_cookie("backend_seen", who)
            return resp
        if hook == "refresh":
            if user in state.expired_users:
                return _json({"result": {"expired": True}})
            return _json({"result": {"expire_at": int(state.refresh_to)}})
        if hook == "subscribe":
            ch = body["channel"]
            if ch.startswith("secret:"):
                return _json({"error": {"code": 403, "message": "permission denied"}})
            if ch.startswith("private:") and ch != f"private:{user}":
                return _json({"error": {"code": 403, "message": "not your channel"}})
            return _json({"result": {}})
        if hook == "publish":
            data = body.get("data")
            text = data.get("text", "") if isinstance(data, dict) else ""
            if "spam" in text:
                return _json({"error": {"code": 1000, "message": "no spam here"}})
            if body["channel"].startswith("chat:"):
                row = {"id": len(state.stored) + 1, "by": user, "text": text}
                state.stored.append({**row, "channel": body["channel"]})
                return _json({"result": {"data": row}})
            return _json({"result": {}})
        if hook == "rpc":
            method = body.get("method")
            data = body.get("data") or {}
            if method == "sum":
                return _json({"result": {"data": {"sum": sum(data.get("numbers", []))}}})
            if method == "whoami":
                return _json({"result": {"data": {"user": user, "meta": body.get("meta")}}})
            return _json({"error": {"code": 404, "message": f"no method {method!r}"}})
        return web.Response(status=404)

    app = web.Application()
    app.router.add_post("/{hook}", handle)
    return app


async def serve(state: Backend) -> AsyncIterator[Backend]:
    """Run the backend on a free loopback port until the caller is done."""
    runner = web.AppRunner(make_app(state), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", state.port))
    state.port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield state
    finally:
        await runner.cleanup()
