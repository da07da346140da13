"""A chat application's backend for fastim: cookie login, every message stored in SQLite
through the publish hook, history served from the database, users marked offline by the
node's disconnect events.

    python examples/chat_backend/app.py [--port 8080] [--db chat.db] [--node http://127.0.0.1:7071]

It is the other half of ``fastim serve --config examples/chat_backend/fastim.toml``:

- the page (``/``) signs a person in with a name and sets an HttpOnly session cookie;
  the page then imports fastim.js from the node and connects: the node asks
  ``/fastim/connect``, which reads that cookie (the browser sends it to the node too:
  cookies are per host, not per port) and answers the user;
- ``/fastim/subscribe`` lets signed-in users into ``room:*`` channels only;
- ``/fastim/publish`` stores each message (``room:*``) and answers the stored row, with
  its id, the author and the time, which is what every subscriber receives;
- ``/fastim/rpc`` answers ``history`` (the room's last messages, from the database);
- ``/fastim/events`` receives the node's event webhooks (at least once: deduplicated
  by event id) and keeps, per user, the connections that are open: a user with none is
  offline, whatever way the connection ended (the node sends the disconnects of a
  node that was killed too);
- ``/api/history`` and ``/api/users`` serve the page from the database.

The node and the backend share a secret: the node sends it with every hook request
(``X-Fastim-Secret``: ``proxy_static_headers``) and event batch (``Authorization:
Bearer``: ``events_secret``), and the backend compares it in constant time. Only the
standard library, aiohttp (which fastim installs) and fastim's own page script are used.
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp import web

HERE = Path(__file__).parent
#: the shared secret (fastim.toml sends the same one); override with FASTIM_CHAT_SECRET
SECRET = os.environ.get("FASTIM_CHAT_SECRET", "chat-example-secret-change-me")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
ROOM = re.compile(r"^room:[a-z0-9_-]{1,32}$")
MAX_TEXT = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (sid TEXT PRIMARY KEY, user TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, user TEXT NOT NULL,
    text TEXT NOT NULL, ts REAL NOT NULL, cid TEXT);
CREATE INDEX IF NOT EXISTS messages_channel ON messages (channel, id);
CREATE TABLE IF NOT EXISTS connections (client TEXT PRIMARY KEY, user TEXT NOT NULL, since REAL);
CREATE TABLE IF NOT EXISTS users (user TEXT PRIMARY KEY, last_seen REAL);
CREATE TABLE IF NOT EXISTS seen_events (id TEXT PRIMARY KEY, at REAL);
"""


class Chat:
    """The application's state: one SQLite file (WAL), written by one event loop."""

    def __init__(self, path: str, node: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.node = node.rstrip("/")

    def user_of(self, cookie_header: str | None) -> str | None:
        """The signed-in user of a Cookie header (the page's or the node's request)."""
        for part in (cookie_header or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "sid" and value:
                row = self.db.execute("SELECT user FROM sessions WHERE sid = ?", (value,))
                found = row.fetchone()
                return str(found[0]) if found else None
        return None

    def online(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT u.user, u.last_seen, COUNT(c.client) FROM users u "
            "LEFT JOIN connections c ON c.user = u.user GROUP BY u.user ORDER BY u.user"
        ).fetchall()
        return [{"user": u, "last_seen": t, "online": n > 0, "connections": n} for u, t, n in rows]

    def history(self, channel: str, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, user, text, ts, cid FROM messages WHERE channel = ? "
            "ORDER BY id DESC LIMIT ?",
            (channel, limit),
        ).fetchall()
        return [_row(*r) for r in reversed(rows)]


def _row(mid: int, user: str, text: str, ts: float, cid: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": mid, "user": user, "text": text, "ts": ts}
    if cid:
        out["cid"] = cid
    return out


def _from_node(request: web.Request) -> bool:
    """The request carries the node's secret: ``X-Fastim-Secret`` on hook requests
    (``proxy_static_headers``), ``Authorization: Bearer`` on event batches
    (``events_secret``). Compared in constant time: no timing leak."""
    got = request.headers.get("X-Fastim-Secret", "")
    auth = request.headers.get("Authorization", "")
    if not got and auth.startswith("Bearer "):
        got = auth[len("Bearer ") :]
    return hmac.compare_digest(got.encode(), SECRET.encode())


def make_app(chat: Chat) -> web.Application:
    routes = web.RouteTableDef()

    # ------------------------------------------------------------ the page

    @routes.get("/")
    async def page(request: web.Request) -> web.Response:
        html = (HERE / "page.html").read_text().replace("{{NODE}}", chat.node)
        return web.Response(text=html, content_type="text/html")

    @routes.post("/login")
    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        name = str(form.get("name", "")).strip()
        if not NAME.match(name):
            raise web.HTTPBadRequest(text="a name is 1-32 letters, digits, '_', '.', '-'")
        sid = secrets.token_urlsafe(24)
        chat.db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (sid, name, time.time()))
        chat.db.execute("INSERT OR IGNORE INTO users VALUES (?, NULL)", (name,))
        resp = web.HTTPSeeOther("/")
        resp.set_cookie("sid", sid, httponly=True, samesite="Lax", path="/")
        raise resp

    @routes.post("/logout")
    async def logout(request: web.Request) -> web.Response:
        sid = request.cookies.get("sid", "")
        chat.db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
        resp = web.HTTPSeeOther("/")
        resp.del_cookie("sid", path="/")
        raise resp

    @routes.get("/api/me")
    async def me(request: web.Request) -> web.Response:
        # null when not signed in: a question with an answer, not an error
        return web.json_response({"user": chat.user_of(request.headers.get("Cookie"))})

    @routes.get("/api/history")
    async def history(request: web.Request) -> web.Response:
        if chat.user_of(request.headers.get("Cookie")) is None:
            raise web.HTTPUnauthorized(text="not signed in")
        channel = request.query.get("channel", "room:lobby")
        limit = min(200, max(1, int(request.query.get("limit", "50"))))
        return web.json_response(chat.history(channel, limit))

    @routes.get("/api/users")
    async def users(request: web.Request) -> web.Response:
        return web.json_response(chat.online())

    # ------------------------------------------------------------ the node's hooks

    @routes.post("/fastim/connect")
    async def connect(request: web.Request) -> web.Response:
        if not _from_node(request):
            raise web.HTTPForbidden()
        user = chat.user_of(request.headers.get("Cookie"))
        if user is None:
            return web.json_response({"disconnect": {"code": 4501, "reason": "not signed in"}})
        return web.json_response({"result": {"user": user, "data": {"name": user}}})

    @routes.post("/fastim/subscribe")
    async def subscribe(request: web.Request) -> web.Response:
        if not _from_node(request):
            raise web.HTTPForbidden()
        body = await request.json()
        if not body.get("user") or not ROOM.match(body.get("channel", "")):
            return web.json_response({"error": {"code": 403, "message": "rooms only"}})
        return web.json_response({"result": {}})

    @routes.post("/fastim/publish")
    async def publish(request: web.Request) -> web.Response:
        if not _from_node(request):
            raise web.HTTPForbidden()
        body = await request.json()
        user, channel, data = body.get("user"), body.get("channel", ""), body.get("data")
        if not user:
            return web.json_response({"error": {"code": 403, "message": "sign in to write"}})
        if not ROOM.match(channel):
            return web.json_response({"error": {"code": 403, "message": "rooms only"}})
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
            return web.json_response(
                {"error": {"code": 400, "message": f"text: 1 to {MAX_TEXT} characters"}}
            )
        cid = data.get("cid") if isinstance(data.get("cid"), str) else None
        ts = time.time() * 1000
        cur = chat.db.execute(
            "INSERT INTO messages (channel, user, text, ts, cid) VALUES (?, ?, ?, ?, ?)",
            (channel, user, text, ts, cid),
        )
        # the stored row is what every subscriber gets: its id, the real author, our time
        return web.json_response(
            {"result": {"data": _row(cur.lastrowid or 0, user, text, ts, cid)}}
        )

    @routes.post("/fastim/rpc")
    async def rpc(request: web.Request) -> web.Response:
        if not _from_node(request):
            raise web.HTTPForbidden()
        body = await request.json()
        if body.get("method") == "history":
            args = body.get("data") or {}
            channel = args.get("channel", "room:lobby")
            if not ROOM.match(channel):
                return web.json_response({"error": {"code": 400, "message": "rooms only"}})
            return web.json_response(
                {"result": {"data": chat.history(channel, int(args.get("limit", 50)))}}
            )
        return web.json_response({"error": {"code": 404, "message": "no such method"}})

    @routes.post("/fastim/events")
    async def events(request: web.Request) -> web.Response:
        if not _from_node(request):
            raise web.HTTPForbidden()
        body = await request.json()
        now = time.time()
        chat.db.execute("BEGIN")
        for ev in body.get("events", []):
            # at least once: an event seen before (a retried batch) is skipped by its id
            if (
                chat.db.execute(
                    "INSERT OR IGNORE INTO seen_events VALUES (?, ?)", (ev["id"], now)
                ).rowcount
                == 0
            ):
                continue
            user, client = ev.get("user"), ev.get("client")
            if not user or not client:
                continue
            if ev.get("type") == "connect":
                chat.db.execute(
                    "INSERT OR IGNORE INTO connections VALUES (?, ?, ?)", (client, user, now)
                )
                chat.db.execute(
                    "INSERT INTO users VALUES (?, ?) ON CONFLICT(user) DO UPDATE SET "
                    "last_seen = excluded.last_seen",
                    (user, now),
                )
            elif ev.get("type") == "disconnect":
                chat.db.execute("DELETE FROM connections WHERE client = ?", (client,))
                chat.db.execute("UPDATE users SET last_seen = ? WHERE user = ?", (now, user))
        chat.db.execute("COMMIT")
        return web.json_response({})  # a 2xx: the node removes the batch from its outbox

    app = web.Application()
    app.add_routes(routes)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="the chat example's backend")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--db", default="chat.db", help="the SQLite file (created)")
    ap.add_argument("--node", default="http://127.0.0.1:7071", help="the node's HTTP address")
    args = ap.parse_args()
    chat = Chat(args.db, args.node)
    print(f"chat backend on http://{args.host}:{args.port} (node {args.node})", flush=True)
    web.run_app(make_app(chat), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
