"""Which web pages may talk to the node from a browser: the ``Origin`` patterns.

Parsed here, below the config, so that ``fastim config check`` refuses a bad pattern
and the node (:mod:`fastim.transport.origin`) matches with the same code.

**WebSocket (``allowed_origins``).** A browser attaches a site's cookies (and HTTP
authentication) to a WebSocket upgrade whatever page opened it, and unlike ``fetch`` a
WebSocket is not bound by CORS: any page the user visits could open one to the node and
act as the user (cross-site WebSocket hijacking). The only thing that tells the node
which page it is, is the ``Origin`` header the browser sets (a page cannot). So an upgrade
whose ``Origin`` is present and is neither the node's own origin (the host and port of
the request's ``Host``) nor allowed by ``allowed_origins`` is refused with HTTP 403.
A request without ``Origin`` (the Python SDK, ``websockets``, curl, fastim.js under
Node) is not from a browser page and is not concerned. :func:`refuse_cross_origin` is
the one check; any later browser-reachable stream (SSE, HTTP streaming) calls it too.

**Static files (``static_allowed_origins``).** ``/fastim.js`` is public code: by default
it is served with ``Access-Control-Allow-Origin: *`` so that a page of another origin may
``import`` it (module scripts are fetched with CORS). ``*`` admits no credentials, and
hiding a public file protects nothing; who may *connect* is decided at the WebSocket.

Patterns (both settings, comma-separated or a TOML array)::

    *                          every origin (logged as a warning at start)
    https://app.example.com    exactly this origin: scheme, host, and the port (here the
                               scheme's default, 443)
    https://*.example.com      any subdomain of example.com, at any depth, not
                               example.com itself; still scheme https and port 443
    http://localhost:*         any port
    https://*.example.com:8443

Scheme and host compare case-insensitively (browsers send them in lower case). A
pattern without a port means the scheme's default port (80 for http, 443 for https):
``https://app.example.com`` does not admit ``https://app.example.com:8443``. The
wildcard is only a whole leftmost label (``*.``), before a domain of at least two
labels whose last is not a number (no ``*.com``, no ``*.0.0.1``). The ``null`` origin
(sandboxed frames, ``file:`` pages: anyone can make one) matches no pattern but ``*``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import NamedTuple

log = logging.getLogger("fastim")

#: the scheme's port when an origin names none (RFC 6454 §4: the default port)
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
#: a pattern's port ``*``
ANY_PORT = -1

_SCHEME = r"[a-z][a-z0-9+.-]*"
_REG_NAME = r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*"
_IPV6 = r"\[[0-9a-f:.]+\]"
#: a serialized origin (RFC 6454 §6.2): scheme "://" host [ ":" port ], lower-cased first
_ORIGIN = re.compile(rf"({_SCHEME})://({_REG_NAME}|{_IPV6})(?::([0-9]{{1,5}}))?")
_PATTERN = re.compile(rf"({_SCHEME})://(\*\.)?({_REG_NAME}|{_IPV6})(?::([0-9]{{1,5}}|\*))?")
#: a Host header: host [ ":" port ]
_HOST = re.compile(rf"({_REG_NAME}|{_IPV6})(?::([0-9]{{1,5}}))?")

#: distinct refused origins logged (then no more: a flood must not flood the log)
LOG_AT_MOST = 64


class Origin(NamedTuple):
    scheme: str
    host: str
    #: the explicit port, or the scheme's default; None when the scheme has neither
    port: int | None


def parse_origin(value: str) -> Origin | None:
    """An ``Origin`` header's scheme, host and port; None for ``null`` or anything that
    is not one serialized origin (two headers joined by a comma, a path, garbage)."""
    m = _ORIGIN.fullmatch(value.strip().lower())
    if m is None:
        return None
    scheme, host, port = m.groups()
    if port is None:
        return Origin(scheme, host, DEFAULT_PORTS.get(scheme))
    if int(port) > 65535:
        return None
    return Origin(scheme, host, int(port))


class Pattern(NamedTuple):
    scheme: str
    #: the host, or with ``wildcard`` the domain whose subdomains match
    host: str
    wildcard: bool
    #: a port, :data:`ANY_PORT`, or None (a scheme without default port, none given)
    port: int | None

    def matches(self, origin: Origin) -> bool:
        if origin.scheme != self.scheme:
            return False
        if self.port != ANY_PORT and origin.port != self.port:
            return False
        if self.wildcard:
            return origin.host.endswith("." + self.host)
        return origin.host == self.host


def parse_pattern(entry: str) -> Pattern:
    """One entry of ``allowed_origins`` (not ``*``); ValueError saying what is wrong."""
    text = entry.strip()
    if text.endswith("/") and text.count("/") == 3:
        text = text[:-1]  # "https://app.example.com/": a slash no Origin carries
    try:
        text = _to_ascii(text)
    except UnicodeError:
        raise ValueError(f"{entry!r}: not a valid host name") from None
    if text == "null":
        raise ValueError(
            f"{entry!r}: the null origin is what any sandboxed frame or file: page sends; "
            "it cannot be allowed by name (only '*' admits it)"
        )
    if "://" not in text:
        raise ValueError(
            f"{entry!r}: an origin needs its scheme, e.g. 'https://{text}' "
            "(scheme://host[:port], the host may start with '*.')"
        )
    m = _PATTERN.fullmatch(text.lower())
    if m is None:
        raise ValueError(
            f"{entry!r}: not an origin pattern: scheme://host[:port] with no path, the "
            "host may start with '*.' (any subdomain), the port may be '*'"
        )
    scheme, star, host, port = m.groups()
    wildcard = star is not None
    if wildcard:
        labels = host.split(".")
        if host.startswith("[") or len(labels) < 2 or labels[-1].isdigit():
            raise ValueError(
                f"{entry!r}: '*.' must stand before a domain of at least two labels "
                "(e.g. https://*.example.com), not a top-level domain or an address"
            )
    if port is None:
        return Pattern(scheme, host, wildcard, DEFAULT_PORTS.get(scheme))
    if port == "*":
        return Pattern(scheme, host, wildcard, ANY_PORT)
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{entry!r}: port must be 1..65535 or '*'")
    return Pattern(scheme, host, wildcard, int(port))


def _to_ascii(text: str) -> str:
    """An internationalized host name in its ASCII (punycode) form, which browsers send."""
    if text.isascii():
        return text
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.partition(":")
    labels = [
        label.encode("idna").decode("ascii") if label != "*" else label for label in host.split(".")
    ]
    return scheme + sep + ".".join(labels) + colon + port


def split_setting(value: str | Iterable[str]) -> list[str]:
    """The entries of a setting: a comma-separated string or a list (a TOML array)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


class OriginPolicy:
    """A parsed list of origin patterns (one setting)."""

    __slots__ = ("any", "patterns")

    def __init__(self, value: str | Iterable[str] = "") -> None:
        """Raise ValueError naming the first bad entry."""
        self.any = False
        self.patterns: list[Pattern] = []
        for entry in split_setting(value):
            if entry == "*":
                self.any = True
            else:
                self.patterns.append(parse_pattern(entry))

    @property
    def empty(self) -> bool:
        return not self.any and not self.patterns

    def allows(self, origin: str) -> bool:
        """Whether an ``Origin`` value is allowed by the patterns (not the same-origin rule)."""
        if self.any:
            return True
        parsed = parse_origin(origin)
        return parsed is not None and any(p.matches(parsed) for p in self.patterns)


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` names the host and port the request was sent to (its ``Host``).

    The scheme is not compared: behind a proxy that terminates TLS the node sees plain
    HTTP while its pages are https. A ``Host`` without a port means the default port of
    the origin's scheme (what the browser used for both).
    """
    o = parse_origin(origin)
    if o is None or not host:
        return False
    m = _HOST.fullmatch(host.strip().lower())
    if m is None:
        return False
    name, port = m.groups()
    return (
        name == o.host
        and (int(port) if port is not None else DEFAULT_PORTS.get(o.scheme)) == o.port
    )
