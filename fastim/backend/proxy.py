"""Proxy hooks: the node asks the application's backend over HTTP (docs/proxy.md).

Five optional hooks, each a URL: ``connect`` (who is this connection: an alternative to
JWT, decided from the upgrade's cookies and headers), ``refresh`` (before a connect
hook's ``expire_at``), ``subscribe`` (allow or deny a channel), ``publish`` (allow,
deny, or replace the data: where the backend persists a chat message) and ``rpc`` (a
client calls a backend method through its connection).

The request and reply bodies are Centrifugo's HTTP proxy shapes wherever they fit
(``{"result": ...}``, ``{"error": {"code", "message"}}``, ``{"disconnect": {"code",
"reason"}}``), so a backend written for Centrifugo's proxy works unchanged.

Why aiohttp: its client pools keep-alive connections per host and bounds them
(``proxy_max_inflight``), with one total timeout per request that covers the wait for a
pooled connection too; writing that by hand would be writing an HTTP client. Each hook
has its own circuit breaker (:mod:`.breaker`) and its own counters and latency histogram
(read by ``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Config
from ..stats import LatencyHistogram
from ..tasks import Background
from .breaker import CircuitBreaker

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("fastim")

#: hooks in the order of the docs
HOOKS = ("connect", "refresh", "subscribe", "publish", "rpc")
#: outcomes counted per hook (``fastim_proxy_requests{hook, outcome}``)
OUTCOMES = (
    "ok",  # a result
    "refused",  # the backend's own error (codes 400-1999)
    "disconnect",  # the backend asked to close the connection (codes 4000-4999)
    "timeout",  # no answer within proxy_timeout
    "http_error",  # a status other than 2xx
    "connection_error",  # could not connect, or the connection broke
    "invalid",  # an answer that is not the hook's reply shape
    "breaker_open",  # not sent: the hook's circuit breaker is open
)
#: headers of the client's upgrade never copied to a hook: they describe the client's
#: own request, and copying them would corrupt the one to the backend
_NOT_COPIED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "connection",
        "transfer-encoding",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
    }
)
#: the largest reply body read from a hook (a reply holds a result, not a payload store)
MAX_REPLY = 4 << 20


class BackendUnavailable(Exception):
    """The backend did not give a usable answer: BACKEND_UNAVAILABLE (120) to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HookRefused(Exception):
    """The backend answered ``{"error": {"code", "message"}}``: the code goes to the
    client as is (400-1999, the backend's own numbering)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HookDisconnect(Exception):
    """The backend answered ``{"disconnect": {"code", "reason"}}``: close the connection
    with that code (4000-4499: the client reconnects; 4500-4999: it does not)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class ConnectResult:
    """What the connect hook says of a connection (Centrifugo's ``ConnectResult``)."""

    #: the user; "" for an anonymous connection the backend accepts
    user: str
    #: Unix time the connection expires (refresh hook, or closed); 0: never
    expire_at: float = 0.0
    #: public information about the connection (kept; sent to the refresh hook)
    info: Any = None
    #: given to the client in its welcome (``data``)
    data: Any = None
    #: channels the node subscribes the connection to, server-side
    channels: list[str] = field(default_factory=list)
    #: private information about the connection, sent back in every later hook request
    meta: Any = None


class Hook:
    """One hook's URL, breaker and counters."""

    __slots__ = ("breaker", "counts", "inflight", "latency", "name", "url")

    def __init__(self, name: str, url: str, failures: int, cooldown: float) -> None:
        self.name = name
        self.url = url
        self.breaker = CircuitBreaker(failures, cooldown)
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.latency = LatencyHistogram()
        self.inflight = 0


class Proxy:
    """The node's proxy hooks and the pooled HTTP client they share."""

    def __init__(self, cfg: Config) -> None:
        self.timeout = cfg.proxy_timeout
        self.max_inflight = cfg.proxy_max_inflight
        self.copied, self.static = cfg.proxy_headers()
        self.copied = [h for h in self.copied if h not in _NOT_COPIED]
        self.hooks: dict[str, Hook] = {
            name: Hook(name, url, cfg.proxy_breaker_failures, cfg.proxy_breaker_cooldown)
            for name, url in cfg.proxy_urls().items()
        }
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: the hook calls running for the node's connections (cancelled at close)
        self.tasks = Background("proxy hook")

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def has(self, name: str) -> bool:
        return name in self.hooks

    def copy_headers(self, headers: dict[bytes, bytes]) -> dict[str, str]:
        """The client's upgrade headers the connect hook gets (``proxy_http_headers``)."""
        out: dict[str, str] = {}
        for name in self.copied:
            value = headers.get(name.encode("latin-1"))
            if value is not None:
                out[name] = value.decode("latin-1")
        return out

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp  # here, not at import: ~23 MB per process, for nodes with hooks only

        session = self._session
        if session is None:
            if self._closed:
                raise BackendUnavailable("the node is shutting down")
            connector = aiohttp.TCPConnector(
                limit=self.max_inflight, limit_per_host=0, keepalive_timeout=30.0
            )
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Content-Type": "application/json", **self.static},
                json_serialize=lambda o: orjson.dumps(o).decode(),
                skip_auto_headers=("User-Agent",),
                raise_for_status=False,
                # never keep a cookie a hook's reply sets: it would go out with the
                # next request, which speaks for another connection (another user)
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return session

    async def call(
        self, name: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """POST ``body`` to hook ``name``; return its ``result`` object.

        Raises HookRefused or HookDisconnect (the backend's answer), or
        BackendUnavailable (no usable answer: timeout, status, connection, invalid
        reply, or the breaker is open).
        """
        hook = self.hooks[name]
        breaker = hook.breaker
        if not breaker.allow():
            hook.counts["breaker_open"] += 1
            raise BackendUnavailable(
                f"the {name} hook's backend is failing (circuit breaker open, "
                f"next try in {breaker.retry_after():.1f}s)"
            )
        t0 = time.monotonic()
        hook.inflight += 1
        try:
            result = self._result(hook, await self._post(hook, body, headers))
        except BackendUnavailable as e:
            self._failed(hook, e.reason)
            raise
        except (HookRefused, HookDisconnect):
            self._answered(hook)  # the backend's own answer: it is up
            raise
        finally:
            hook.inflight -= 1
            hook.latency.observe(time.monotonic() - t0)
        self._answered(hook)
        return result

    def _answered(self, hook: Hook) -> None:
        breaker = hook.breaker
        if breaker.opened_at is not None:
            log.warning("proxy %s hook: the backend answers again (breaker closed)", hook.name)
        breaker.success()

    async def _post(
        self, hook: Hook, body: dict[str, Any], headers: dict[str, str] | None
    ) -> dict[str, Any]:
        import aiohttp  # (imported by _client the first time: a dict lookup here)

        try:
            session = self._client()
            async with session.post(hook.url, data=orjson.dumps(body), headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    hook.counts["http_error"] += 1
                    raise BackendUnavailable(f"the {hook.name} hook answered HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_REPLY:
                    hook.counts["invalid"] += 1
                    raise BackendUnavailable(f"the {hook.name} hook's reply is over {MAX_REPLY}")
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    buf += chunk
                    if len(buf) > MAX_REPLY:
                        hook.counts["invalid"] += 1
                        raise BackendUnavailable(
                            f"the {hook.name} hook's reply is over {MAX_REPLY} bytes"
                        )
        except asyncio.TimeoutError:
            hook.counts["timeout"] += 1
            raise BackendUnavailable(
                f"the {hook.name} hook did not answer within {self.timeout:g}s"
            ) from None
        except aiohttp.ClientError as e:
            hook.counts["connection_error"] += 1
            raise BackendUnavailable(
                f"the {hook.name} hook could not be reached: {type(e).__name__}"
            ) from None
        try:
            reply = orjson.loads(buf)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            hook.counts["invalid"] += 1
            raise BackendUnavailable(f"the {hook.name} hook's reply is not a JSON object")
        return reply

    def _result(self, hook: Hook, reply: dict[str, Any]) -> dict[str, Any]:
        name = hook.name
        disconnect = _coded(hook, reply, "disconnect", "reason", 4000, 4999, 120)
        if disconnect is not None:
            code, reason = disconnect
            raise HookDisconnect(code, reason or f"disconnected by the {name} hook")
        error = _coded(hook, reply, "error", "message", 400, 1999, 1000)
        if error is not None:
            code, message = error
            raise HookRefused(code, message or f"refused by the {name} hook")
        result = reply.get("result", {})
        if not isinstance(result, dict):
            hook.counts["invalid"] += 1
            raise BackendUnavailable(f"the {name} hook's result must be a JSON object")
        hook.counts["ok"] += 1
        return result

    def _failed(self, hook: Hook, reason: str) -> None:
        breaker = hook.breaker
        was_open = breaker.opened_at is not None
        breaker.failure()
        if breaker.opened_at is not None and not was_open:
            log.warning(
                "proxy %s hook: circuit breaker open after %d failures in a row (last: %s); "
                "requests fail fast for %gs, then one probe",
                hook.name,
                breaker.streak,
                reason,
                breaker.cooldown,
            )
        elif not was_open:
            log.info("proxy %s hook failed: %s", hook.name, reason)

    async def close(self) -> None:
        self._closed = True
        await self.tasks.cancel()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _coded(
    hook: Hook, reply: dict[str, Any], key: str, text: str, low: int, high: int, cut: int
) -> tuple[int, str] | None:
    """A reply's ``disconnect`` or ``error`` object as (code, text), None when absent;
    a code outside ``low..high`` makes the reply invalid (BackendUnavailable)."""
    obj = reply.get(key)
    if obj is None:
        return None
    code = obj.get("code") if isinstance(obj, dict) else None
    if not isinstance(code, int) or isinstance(code, bool) or not low <= code <= high:
        hook.counts["invalid"] += 1
        raise BackendUnavailable(
            f"the {hook.name} hook's {key}.code must be an integer {low}..{high}"
        )
    hook.counts["disconnect" if key == "disconnect" else "refused"] += 1
    value = obj.get(text)
    return code, _cut(value, cut) if isinstance(value, str) else ""


def parse_connect(result: dict[str, Any]) -> ConnectResult:
    """The connect hook's ``result``; BackendUnavailable names a malformed field."""
    user = result.get("user", "")
    if not isinstance(user, str) or len(user) > 255:
        raise BackendUnavailable('the connect hook\'s result.user must be a string ("": anonymous)')
    expire_at = _expire_at(result, "connect")
    channels = result.get("channels") or []
    subs = result.get("subs")  # Centrifugo's map of channel → options: the names count
    if isinstance(subs, dict):
        channels = [*channels, *subs] if isinstance(channels, list) else channels
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BackendUnavailable("the connect hook's result.channels must be a list of strings")
    return ConnectResult(
        user=user,
        expire_at=expire_at,
        info=result.get("info"),
        data=result.get("data"),
        channels=list(dict.fromkeys(channels)),
        meta=result.get("meta"),
    )


def _expire_at(result: dict[str, Any], name: str) -> float:
    value = result.get("expire_at", 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BackendUnavailable(f"the {name} hook's result.expire_at must be Unix seconds >= 0")
    return float(value)


def parse_refresh(result: dict[str, Any]) -> tuple[bool, float, Any]:
    """The refresh hook's ``result`` → (expired, expire_at, info)."""
    expired = result.get("expired", False)
    if not isinstance(expired, bool):
        raise BackendUnavailable("the refresh hook's result.expired must be true or false")
    return expired, _expire_at(result, "refresh"), result.get("info")


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (a close reason has 123)."""
    b = text.encode("utf-8")
    return text if len(b) <= limit else b[:limit].decode("utf-8", "ignore")
