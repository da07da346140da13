"""The server HTTP API: what a backend does to a node without holding a connection.

Routes under ``/api/`` on the WebSocket/HTTP port (docs/api.md): publish, broadcast,
send to a user, presence, history, disconnect a user, and the OpenAPI document that
describes them (:data:`OPENAPI`, in ``openapi.json``). JSON in, JSON out; every error is
``{"error": "...", "field": "..."}`` (``field`` when one field is to blame, ``code``
when a fastim error code applies) with a 4xx/5xx status.

Why it is built this way:

* **The same paths as the clients.** A publish goes through :meth:`Hub.publish` and is
  answered when a client's would be acknowledged (after the store took it, for durable
  channels); a send goes through the store's ``inbox_append`` and
  :meth:`Postman.deliver`, so idempotency (``cid``), retries and replay are the same
  as for a ``send`` command. Nothing is reimplemented, nothing behaves differently.
* **An API key, compared in constant time** (:func:`hmac.compare_digest`). No key
  configured means no API at all: every ``/api/`` path is a 404, so an operator who
  never set one exposes nothing. Only ``/api/openapi.json`` is served without the key:
  it describes the API and holds no data.
* **One request per connection.** The transport answers and closes (as for every
  plain HTTP request on this port); a backend that calls often should keep its request
  rate in mind, or use a client connection and ``pub``/``send`` commands instead.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qs

import httptools
import orjson

from ..errors import ProtocolError
from ..hub import Hub, HubError, Published
from ..protocol import CloseCode, ErrorCode, validate_channel
from ..session.commands import CID_MAX
from ..store import InboxFull, InboxMessage, StoreError
from ..transport.ws import WsSession
from .host import ApiHost

log = logging.getLogger("fastim.api")

JSON = b"application/json"

#: channels one broadcast may name
MAX_BROADCAST = 1000
#: messages one history request may return
MAX_HISTORY = 1000
DEFAULT_HISTORY = 100
_REASON_MAX = 120  # a WebSocket close reason holds at most 123 bytes


class ApiError(Exception):
    """An error answer: HTTP status, message, and the field or fastim code it concerns."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        code: int | None = None,
        headers: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.code is not None:
            out["code"] = self.code
        return out


class Request:
    """One API request as the handlers see it: query parameters and the JSON body."""

    __slots__ = ("body", "query")

    def __init__(self, query: dict[str, str], body: dict[str, Any]) -> None:
        self.query = query
        self.body = body


Handler = Callable[["HttpApi", Request], Awaitable[dict[str, Any]]]

#: path → (method, handler, body fields allowed, query parameters allowed)
_ROUTES: dict[str, tuple[str, str, frozenset[str], frozenset[str]]] = {
    "/api/publish": (
        "POST",
        "publish",
        frozenset({"channel", "data", "idempotency_key"}),
        frozenset(),
    ),
    "/api/broadcast": ("POST", "broadcast", frozenset({"channels", "data"}), frozenset()),
    "/api/send": ("POST", "send", frozenset({"to", "data", "from", "cid"}), frozenset()),
    "/api/presence": ("GET", "presence", frozenset(), frozenset({"channel"})),
    "/api/history": ("GET", "history", frozenset(), frozenset({"channel", "since", "limit"})),
    "/api/disconnect": ("POST", "disconnect", frozenset({"user", "reason"}), frozenset()),
    "/api/openapi.json": ("GET", "openapi", frozenset(), frozenset()),
}

#: every route and its method, for the tests and the OpenAPI check
ROUTES: dict[str, str] = {path: r[0] for path, r in _ROUTES.items()}


def _status_of(code: int) -> int:
    """The HTTP status for a fastim error code a hub or store refusal carries."""
    if code == ErrorCode.STORE_UNAVAILABLE:
        return 503
    if code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.INBOX_FULL):
        return 429
    return 400


class HttpApi:
    """The ``/api/`` routes of one node."""

    def __init__(self, node: ApiHost) -> None:
        self.node = node
        key = node.config.api_key
        self._key = key.encode() if key else b""
        #: (route, status) → answers given (exported as fastim_api_requests_total)
        self.requests: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._openapi = orjson.dumps(OPENAPI)

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    # ------------------------------------------------------------------ entry

    def handle(self, session: WsSession, method: bytes, path: bytes) -> None:
        """Answer one complete request to an ``/api/`` path (now, or when its work is done)."""
        route = path.decode("latin-1")
        label = self._label(route)
        refusal = self._gate(session.headers, method, route)
        if refusal is not None:
            self._reply(session, label, refusal)
            return
        spec = _ROUTES.get(route)
        if spec is not None and spec[1] == "openapi" and method == b"GET":
            self._count(label, 200)
            session.http_send(200, self._openapi, JSON)
            return
        try:
            if spec is None:
                raise ApiError(404, f"no such API route: {route}")
            want, name, fields, params = spec
            if method.decode("latin-1") != want:
                raise ApiError(
                    405,
                    f"{route} takes {want}",
                    headers=b"Allow: %s\r\n" % want.encode(),
                )
            query = _query(session.url, params)
            body = _json_body(session, fields) if want == "POST" else {}
            handler = _HANDLERS[name]
        except ApiError as e:
            self._reply(session, label, e)
            return
        task = asyncio.ensure_future(self._run(session, label, handler, Request(query, body)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _label(self, route: str) -> str:
        """The ``route`` label of fastim_api_requests_total: a known route, or "other"."""
        return route if self.enabled and route in _ROUTES else "other"

    def _gate(self, headers: dict[bytes, bytes], method: bytes, route: str) -> ApiError | None:
        """What the head alone decides, before any body: 404 with the API off, 401
        without the right key (every path but the OpenAPI document's)."""
        if not self.enabled:
            return ApiError(404, "the HTTP API is off (no api_key)")
        if route == "/api/openapi.json" and method == b"GET":
            return None
        if not self._authorized(headers):
            return ApiError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                headers=b'WWW-Authenticate: Bearer realm="fastim"\r\n',
            )
        return None

    def gate(
        self, headers: dict[bytes, bytes], method: bytes, path: bytes
    ) -> tuple[int, str, bytes] | None:
        """For the transport, once a request's head is complete: None to go on (read the
        body, then :meth:`handle`), or the answer to give at once (:meth:`refuse`)."""
        e = self._gate(headers, method, path.decode("latin-1"))
        return None if e is None else (e.status, e.message, e.headers)

    def refuse(
        self, session: WsSession, path: bytes, status: int, message: str, headers: bytes = b""
    ) -> None:
        """Answer an ``/api/`` request the transport refused (401 or 404 from
        :meth:`gate`, 413 for a body over max_message, 431): JSON, and counted."""
        label = self._label(path.decode("latin-1"))
        self._reply(session, label, ApiError(status, message, headers=headers))

    async def _run(self, session: WsSession, label: str, handler: Handler, req: Request) -> None:
        try:
            result = await handler(self, req)
        except ApiError as e:
            self._reply(session, label, e)
            return
        except Exception:
            log.exception("API %s failed", label)
            self._reply(session, label, ApiError(500, "internal error (logged by the node)"))
            return
        self._count(label, 200)
        session.http_send(200, orjson.dumps(result), JSON)

    def _reply(self, session: WsSession, label: str, err: ApiError) -> None:
        self._count(label, err.status)
        log.debug("API %s: %d %s", label, err.status, err.message)
        session.http_send(err.status, orjson.dumps(err.body()), JSON, err.headers)

    def _count(self, label: str, status: int) -> None:
        k = (label, status)
        self.requests[k] = self.requests.get(k, 0) + 1

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        got: bytes | None = None
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, cred = auth.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                got = cred.strip()
        if got is None:
            got = headers.get(b"x-api-key")
        # compare_digest: the time taken does not tell how much of the key was right
        return got is not None and hmac.compare_digest(got.strip(), self._key)

    async def close(self) -> None:
        """Cancel requests still working (the node is stopping; their clients got 503)."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ routes

    async def _publish(self, req: Request) -> dict[str, Any]:
        name = _channel(req.body.get("channel"), "channel")
        data = self._data(req.body)
        key = req.body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= CID_MAX):
            raise ApiError(
                400,
                f'field "idempotency_key" must be a string of 1..{CID_MAX} characters',
                "idempotency_key",
            )
        return await self._publish_one(name, data, key)

    async def _publish_one(self, name: str, data: bytes, key: str | None = None) -> dict[str, Any]:
        """``key``: the publish's idempotency key (a backend retrying after a timeout or
        a 503 is answered with the first offset, ``duplicate: true``, not stored twice)."""
        hub = self.node.hub
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[Published] = loop.create_future()

        def done(result: Published) -> None:
            if not settled.done():
                settled.set_result(result)

        try:
            router = hub.router
            # the channel object: its epoch, even if dropped after (not on a node that
            # forwards the publish: the owner's epoch comes with the ack)
            ch = hub.channel(name) if router is None or router.owns(name) else None
            before = ch.offset if ch is not None else 0
            off = hub.publish(name, data, done, key)
        except HubError as e:
            raise ApiError(_status_of(e.code), e.reason, code=e.code) from None
        if off is None:  # durable or forwarded: answered once the store or owner took it
            result = await settled
            if result.refusal is not None:
                raise ApiError(503, result.refusal.reason, code=result.refusal.code)
            answer: dict[str, Any] = {"offset": result.offset, "epoch": result.epoch}
            if result.duplicate:
                answer["duplicate"] = True
            return answer
        assert ch is not None
        if key is not None and off <= before:  # a memory channel's repeat: an old offset
            return {"offset": off, "epoch": ch.epoch, "duplicate": True}
        return {"offset": off, "epoch": ch.epoch}

    async def _broadcast(self, req: Request) -> dict[str, Any]:
        names = req.body.get("channels")
        if not isinstance(names, list) or not names:
            raise ApiError(
                400, 'field "channels" must be a non-empty array of channels', "channels"
            )
        if len(names) > MAX_BROADCAST:
            raise ApiError(
                400,
                f'field "channels" holds {len(names)} channels, at most {MAX_BROADCAST}',
                "channels",
            )
        checked = [_channel(n, f"channels[{i}]") for i, n in enumerate(names)]
        data = self._data(req.body)

        async def one(name: str) -> dict[str, Any]:
            try:
                res = await self._publish_one(name, data)
            except ApiError as e:
                return {"channel": name, **e.body()}
            return {"channel": name, **res}

        results = await asyncio.gather(*(one(n) for n in checked))
        return {"results": list(results)}

    async def _send(self, req: Request) -> dict[str, Any]:
        body = req.body
        to = _user(body.get("to"), "to")
        sender = _user(body["from"], "from") if body.get("from") is not None else None
        cid = body.get("cid")
        if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= CID_MAX):
            raise ApiError(400, f'field "cid" must be a string of 1..{CID_MAX} characters', "cid")
        data = self._data(body)
        node = self.node
        store, postman = node.store, node.postman
        assert store is not None and postman is not None
        try:
            res = await postman.stored(to, await store.inbox_append(to, data, cid, sender))
        except InboxFull as e:
            raise ApiError(429, str(e), code=ErrorCode.INBOX_FULL) from None
        except StoreError as e:
            postman.store_errors += 1
            raise ApiError(
                503, f"not sent, retry with the same cid: {e}", code=ErrorCode.STORE_UNAVAILABLE
            ) from None
        postman.sent += 1
        if not res.duplicate:
            postman.deliver(to, InboxMessage(res.seq, res.msg_id, sender, data, res.epoch))
        return {"mid": res.msg_id, "seq": res.seq, "epoch": res.epoch, "dup": res.duplicate}

    async def _presence(self, req: Request) -> dict[str, Any]:
        name = _channel(req.query.get("channel"), "channel")
        p = await self.node.hub.presence_all(name)
        out: dict[str, Any] = {"channel": name, "count": p["count"]}
        if "users" in p:
            out["users"] = p["users"]
        return out

    async def _history(self, req: Request) -> dict[str, Any]:
        q = req.query
        name = _channel(q.get("channel"), "channel")
        since = _int_param(q, "since", 0, 0, None)
        limit = _int_param(q, "limit", DEFAULT_HISTORY, 1, MAX_HISTORY)
        hub = self.node.hub
        ns = hub.namespaces.of(name)
        if hub.durable_store and ns.durable:
            store = self.node.store
            assert store is not None
            try:
                # peek, not read: a read must not give a channel that never existed an
                # epoch (nor keep it in the store)
                hist = await store.peek(name, since, limit, ns.limits)
            except StoreError as e:
                hub.store_errors += 1
                raise ApiError(503, str(e), code=ErrorCode.STORE_UNAVAILABLE) from None
            if hist is None:
                return _no_history(name)
            epoch, top, msgs = hist.epoch, hist.top, hist.messages
        else:
            router = hub.router
            ask_owner = getattr(router, "ask_owner", None)
            if ask_owner is not None and router is not None and not router.owns(name):
                # a node of several workers: a memory channel's history is its owner's
                args = {"ch": name, "since": since, "limit": limit}
                answer = await ask_owner(name, "history", args)
                if not isinstance(answer, dict):
                    raise ApiError(
                        503,
                        f"the worker that owns {name!r} did not answer, retry",
                        code=ErrorCode.NOT_ROUTED,
                    )
                return answer
            return memory_history(hub, name, since, limit)
        return {
            "channel": name,
            "epoch": epoch,
            "top": top,
            # data is stored as JSON text: spliced in as it is, not parsed again
            "messages": [{"offset": o, "data": orjson.Fragment(d)} for o, d in msgs[:limit]],
        }

    async def _disconnect(self, req: Request) -> dict[str, Any]:
        user = _user(req.body.get("user"), "user")
        reason = req.body.get("reason", "disconnected by the server")
        if not isinstance(reason, str) or len(reason.encode()) > _REASON_MAX:
            raise ApiError(
                400, f'field "reason" must be a string of at most {_REASON_MAX} bytes', "reason"
            )
        n = 0
        # one pass over the node's connections: an admin action, not a hot path
        for s in self.node.sessions:
            if s.user == user and s.is_open():
                s.close(CloseCode.DISCONNECTED, reason)
                n += 1
        log.info("API: disconnected %d connections of user %r", n, user)
        return {"disconnected": n}

    # ------------------------------------------------------------------ helpers

    def _data(self, body: dict[str, Any]) -> bytes:
        if "data" not in body:
            raise ApiError(400, 'missing field "data"', "data")
        data = orjson.dumps(body["data"])
        limit = self.node.config.max_message
        if len(data) > limit:
            raise ApiError(413, f'field "data" is {len(data)} bytes, over max_message', "data")
        return data


#: route name (``_ROUTES``) → its handler
_HANDLERS: dict[str, Handler] = {
    "publish": HttpApi._publish,
    "broadcast": HttpApi._broadcast,
    "send": HttpApi._send,
    "presence": HttpApi._presence,
    "history": HttpApi._history,
    "disconnect": HttpApi._disconnect,
}


def memory_history(hub: Hub, name: str, since: int, limit: int) -> dict[str, Any]:
    """``/api/history`` of a memory channel, from this process's history ring (on a node
    of several workers, the owner worker's: the others ask it)."""
    ch = hub.channel(name, create=False)  # a read creates no channel
    if ch is None:
        return _no_history(name)
    epoch, top = ch.epoch, ch.offset
    msgs = []
    h = ch.history
    ttl = ch.ns.history_ttl
    oldest = hub.now - ttl if ttl else None
    if len(h):
        for off in range(max(since + 1, h.first_offset), top + 1):
            item = h.get(off)
            if item is None:
                continue
            data, at = cast("tuple[bytes, float]", item)
            if oldest is not None and at < oldest:
                continue
            msgs.append((off, data))
            if len(msgs) >= limit:
                break
    return {
        "channel": name,
        "epoch": epoch,
        "top": top,
        # data is stored as JSON text: spliced in as it is, not parsed again
        "messages": [{"offset": o, "data": orjson.Fragment(d)} for o, d in msgs[:limit]],
    }


def _no_history(name: str) -> dict[str, Any]:
    """The history of a channel that does not exist (never published to, or forgotten):
    empty, and no epoch, since none was made; its first publish will make one."""
    return {"channel": name, "epoch": "", "top": 0, "messages": []}


def _channel(value: object, field: str) -> str:
    if value is None:
        raise ApiError(400, f'missing field "{field}"', field)
    try:
        return validate_channel(value)
    except ProtocolError as e:
        raise ApiError(400, e.reason.replace('field "ch"', f'field "{field}"'), field) from None


def _user(value: object, field: str) -> str:
    """A user id: like a channel name, 1..255 bytes of UTF-8 without control characters."""
    return _channel(value, field)


def _int_param(q: dict[str, str], name: str, default: int, low: int, high: int | None) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f'parameter "{name}" must be an integer, got {raw!r}', name) from None
    if v < low or (high is not None and v > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ApiError(400, f'parameter "{name}" must be {span}, got {v}', name)
    return v


def _query(url: bytes, allowed: frozenset[str]) -> dict[str, str]:
    try:
        raw = httptools.parse_url(url).query or b""
        text = raw.decode("utf-8")
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        raise ApiError(400, "the query string is not valid (UTF-8, URL-encoded)") from None
    out: dict[str, str] = {}
    for name, values in parse_qs(text, keep_blank_values=True).items():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, f'unknown parameter "{name}" (known: {known})', name)
        if len(values) != 1:
            raise ApiError(400, f'parameter "{name}" given {len(values)} times', name)
        out[name] = values[0]
    return out


def _json_body(session: WsSession, allowed: frozenset[str]) -> dict[str, Any]:
    ctype = session.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if ctype != JSON:
        raise ApiError(415, "the body must be JSON: send Content-Type: application/json")
    raw = bytes(session.body or b"")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ApiError(400, f'unknown field "{key}" (known: {known})', key)
    return obj


#: the OpenAPI 3.1 document served at ``/api/openapi.json`` (tests check it covers ROUTES):
#: data, in ``openapi.json`` beside this module
OPENAPI: dict[str, Any] = json.loads(
    resources.files(__package__).joinpath("openapi.json").read_text("utf-8")
)
