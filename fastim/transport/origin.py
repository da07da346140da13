"""The node's ``Origin`` checks of browser requests (see :mod:`fastim.config.origins`
for the attack, the default and the patterns): the two policies, the refusals counted
for ``/metrics``, and :func:`refuse_cross_origin`, the one check of every
browser-reachable stream."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ..config import Config
from ..config.origins import LOG_AT_MOST as LOG_AT_MOST
from ..config.origins import OriginPolicy as OriginPolicy
from ..config.origins import parse_pattern as parse_pattern
from ..config.origins import same_origin as same_origin

log = logging.getLogger("fastim")


class Origins:
    """A node's two policies, and the refusals counted for ``/metrics``."""

    def __init__(self, config: Config) -> None:
        self.websocket = OriginPolicy(config.allowed_origins)
        self.static = OriginPolicy(config.static_allowed_origins)
        #: upgrades refused for their Origin (fastim_origin_refused_total)
        self.refused = 0
        self._logged: set[str] = set()

    def warn_if_open(self) -> None:
        """At start: say so when every page on the web may connect."""
        if self.websocket.any:
            log.warning(
                "allowed_origins = '*': pages of any web site may open WebSockets to this "
                "node with their visitors' cookies (cross-site WebSocket hijacking); list "
                "your application's origins instead (docs/security.md)"
            )

    def refusal(self, origin: bytes | None, host: bytes | None) -> str | None:
        """Why a browser request with this ``Origin`` and ``Host`` is refused; None if not.

        No ``Origin``: not a browser page, not refused.
        """
        if origin is None:
            return None
        text = origin.decode("latin-1")
        host_text = host.decode("latin-1") if host is not None else None
        if same_origin(text, host_text) or self.websocket.allows(text):
            return None
        shown = repr(text[:200])
        if shown not in self._logged and len(self._logged) < LOG_AT_MOST:
            self._logged.add(shown)
            log.warning(
                "refused a WebSocket from a page of origin %s: not this node's origin nor "
                "in allowed_origins (add it there if it is your application's)",
                shown,
            )
        return (
            f"cross-origin request refused: Origin {shown} is not this node's origin "
            "and not in allowed_origins"
        )

    def static_headers(self, origin: bytes | None) -> bytes:
        """The CORS headers of a public static file (``/fastim.js``) for this request."""
        policy = self.static
        if policy.any:
            return b"Access-Control-Allow-Origin: *\r\n"
        if policy.empty:
            return b""
        if origin is not None and policy.allows(origin.decode("latin-1")):
            return b"Access-Control-Allow-Origin: " + origin.strip() + b"\r\nVary: Origin\r\n"
        return b"Vary: Origin\r\n"


def refuse_cross_origin(
    origins: Origins, headers: Mapping[bytes, bytes], reply: Callable[[int, str], object]
) -> bool:
    """The Origin check of every browser-reachable stream (WebSocket upgrade, and SSE or
    HTTP streaming when they come): True when it answered 403 (through ``reply``, the
    request's HTTP answer) and the request is over."""
    why = origins.refusal(headers.get(b"origin"), headers.get(b"host"))
    if why is None:
        return False
    origins.refused += 1
    reply(403, why)
    return True
