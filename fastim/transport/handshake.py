"""The WebSocket opening handshake's pieces (RFC 6455 §4, RFC 7692): the accept key,
the ``Sec-WebSocket-Extensions`` parser and the permessage-deflate negotiation, and the
token of an upgrade URL. Pure functions of bytes, used by :mod:`.ws`."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qsl

import httptools

from ..protocol import WS_GUID


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


# ---------------------------------------------------------------------- extensions

#: one lexical item of a Sec-WebSocket-Extensions header (RFC 6455 §9.1, RFC 7230 §3.2.6):
#: a token, a quoted string, a separator, or anything else (which spoils the header)
_EXT_ITEM = re.compile(
    rb"""[ \t]*(?:(?P<tok>[!#$%&'*+\-.^_`|~0-9A-Za-z]+)"""
    rb"""|"(?P<qs>(?:[^"\\]|\\.)*)"|(?P<sep>[,;=])|(?P<bad>.))"""
)
_UNESCAPE = re.compile(rb"\\(.)")
_WINDOW_BITS = {b"%d" % n: n for n in range(8, 16)}  # "8".."15", no leading zeros (§7.1.2)

#: an offer as parsed: the extension name and its parameters in order (value None if absent)
ExtensionOffer = tuple[bytes, list[tuple[bytes, bytes | None]]]


def parse_extensions(header: bytes) -> list[ExtensionOffer | None]:
    """The offers in a Sec-WebSocket-Extensions value, in order (RFC 6455 §9.1).

    ``extension *( ";" param [ "=" (token | quoted-string) ] )``, comma-separated;
    several headers arrive joined with commas. Names are lowercased; a quoted value
    is unescaped (RFC 7692 §7.1: then read as if it had not been quoted). An offer
    that breaks the grammar is None (declined, the others still count); empty list
    elements are skipped. Lexically broken input (a stray byte or
    an unterminated quote) makes the whole header unusable: an empty list.
    """
    items: list[tuple[str, bytes]] = []
    for m in _EXT_ITEM.finditer(header.strip(b" \t")):
        if m.group("bad") is not None:
            return []
        for kind in ("tok", "qs", "sep"):
            v = m.group(kind)
            if v is not None:
                items.append((kind, v))
                break
    offers: list[ExtensionOffer | None] = []
    element: list[tuple[str, bytes]] = []
    for item in [*items, ("sep", b",")]:
        if item != ("sep", b","):
            element.append(item)
            continue
        if element:
            offers.append(_parse_offer(element))
        element = []
    return offers


def _parse_offer(items: list[tuple[str, bytes]]) -> ExtensionOffer | None:
    if items[0][0] != "tok":
        return None
    name = items[0][1].lower()
    params: list[tuple[bytes, bytes | None]] = []
    i = 1
    while i < len(items):
        if items[i] != ("sep", b";") or i + 1 >= len(items) or items[i + 1][0] != "tok":
            return None
        key = items[i + 1][1].lower()
        i += 2
        value: bytes | None = None
        if i < len(items) and items[i] == ("sep", b"="):
            if i + 1 >= len(items) or items[i + 1][0] == "sep":
                return None
            kind, value = items[i + 1]
            if kind == "qs":
                value = _UNESCAPE.sub(rb"\1", value)
            i += 2
        params.append((key, value))
    return name, params


class DeflateParams:
    """What was agreed for permessage-deflate on one connection."""

    __slots__ = ("response", "server_max_window_bits")

    def __init__(self, response: bytes, server_max_window_bits: int) -> None:
        #: the value of the response's Sec-WebSocket-Extensions header
        self.response = response
        #: the window the client allows our compressor; below 15 we send uncompressed
        self.server_max_window_bits = server_max_window_bits

    @property
    def compress_outbound(self) -> bool:
        """Whether messages to this client may be compressed by the node's compressor.

        The shared compressor uses a 32 KiB window (15 bits). A client that asked for
        a smaller one (``server_max_window_bits`` < 15) is accepted, but gets every
        message uncompressed: RSV1 is per message (RFC 7692 §6), so that is allowed,
        and it keeps one compressed frame for every other subscriber.
        """
        return self.server_max_window_bits == 15


def _deflate_offer(params: list[tuple[bytes, bytes | None]]) -> int | None:
    """The server_max_window_bits to answer for a valid permessage-deflate offer; else None.

    RFC 7692 §7.1: an unknown parameter, a repeated one, or an invalid value
    declines the offer (the server then looks at the next one).
    """
    seen: set[bytes] = set()
    window = 15
    for key, value in params:
        if key in seen:
            return None
        seen.add(key)
        if key in (b"server_no_context_takeover", b"client_no_context_takeover"):
            if value is not None:
                return None
        elif key == b"server_max_window_bits":
            if value not in _WINDOW_BITS:
                return None
            window = _WINDOW_BITS[value]
        elif key == b"client_max_window_bits":
            # we inflate with the largest window, so any window the client uses is fine
            if value is not None and value not in _WINDOW_BITS:
                return None
        else:
            return None
    return window


def negotiate_deflate(header: bytes) -> DeflateParams | None:
    """Accept the first valid permessage-deflate offer of a Sec-WebSocket-Extensions value.

    The response always holds ``server_no_context_takeover`` (§7.1.1.1: the server may
    add it when not offered) and ``client_no_context_takeover`` (§7.1.1.2: likewise),
    plus ``server_max_window_bits=N`` when the client sent it (§7.1.2.1: accepting
    it means echoing a value no larger). ``client_max_window_bits`` is left out: the
    client may then use any window, which inflating with 15 bits accepts.
    """
    for offer in parse_extensions(header):
        if offer is None or offer[0] != b"permessage-deflate":
            continue
        window = _deflate_offer(offer[1])
        if window is None:
            continue
        response = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        if any(key == b"server_max_window_bits" for key, _ in offer[1]):
            response += b"; server_max_window_bits=%d" % window
        return DeflateParams(response, window)
    return None


#: what a fastim client offers: no context takeover either way, so neither side keeps
#: compression state between messages (negotiate_deflate accepts it as it is)
CLIENT_DEFLATE_OFFER = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def deflate_response_ok(header: bytes) -> bool:
    """Client side: whether a server's Sec-WebSocket-Extensions value accepts permessage-deflate.

    It must name exactly one extension, permessage-deflate, with valid parameters
    (§7.1); a client that sent :data:`CLIENT_DEFLATE_OFFER` may then compress what it
    sends without context takeover, and passes ``deflate=True`` to its WSParser.
    """
    offers = parse_extensions(header)
    if len(offers) != 1 or offers[0] is None or offers[0][0] != b"permessage-deflate":
        return False
    return _deflate_offer(offers[0][1]) is not None


def upgrade_param(url: bytes, name: str) -> str | None:
    """A query parameter of a WebSocket upgrade's URL, or None."""
    try:
        query = httptools.parse_url(url).query
    except httptools.HttpParserInvalidURLError:
        return None
    if not query:
        return None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            return value
    return None


def upgrade_token(url: bytes) -> str | None:
    """The connect token of a WebSocket upgrade's ``?token=`` query parameter, or None.

    A query parameter because browsers cannot set headers on a WebSocket; the URL must
    therefore never be logged (nothing in the node logs it).
    """
    try:
        query = httptools.parse_url(url).query
    except httptools.HttpParserInvalidURLError:
        return None
    if not query:
        return None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "token":
            return value
    return None
