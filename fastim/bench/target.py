"""What the bench talks to, and the WebSocket upgrade to it (the SDK's, fastim.client).

A target is a fastim node over TCP (``tcp://host:port``, fastim frames) or WebSocket
(``ws://host:port/ws``, JSON subprotocol ``fastim.json``), or a plain broadcast peer
(``ws://host:port/path``, raw text messages). URLs are parsed and upgrades are built and
checked by the client SDK's functions, so the bench and the SDK agree on both.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..client.connection import (
    Endpoint,
    check_ws_upgrade,
    parse_url,
    ws_response_head_end,
    ws_upgrade_request,
)

#: the WebSocket subprotocol of fastim's JSON messages
JSON_SUBPROTOCOL = "fastim.json"
#: the bench's User-Agent in its upgrade requests
USER_AGENT = "fastim-bench"


@dataclass(frozen=True)
class Target:
    """What the bench talks to: a fastim node over TCP or WebSocket, or a broadcast peer."""

    kind: str  # "tcp" (fastim frames), "ws" (fastim JSON over WebSocket), "peer"
    host: str
    port: int
    path: str = "/"

    @property
    def url(self) -> str:
        if self.kind == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"ws://{self.host}:{self.port}{self.path}"

    @property
    def fastim(self) -> bool:
        return self.kind != "peer"

    @property
    def subprotocol(self) -> str | None:
        """The WebSocket subprotocol to offer: fastim's JSON, none to a peer."""
        return JSON_SUBPROTOCOL if self.fastim else None

    @property
    def endpoint(self) -> Endpoint:
        """The target as the client SDK's Endpoint."""
        return Endpoint("tcp" if self.kind == "tcp" else "ws", self.host, self.port, self.path)


def parse_target(url: str, peer: bool = False) -> Target:
    """``tcp://h:p`` or ``ws://h:p/path`` → Target; raises SystemExit on anything else.

    Parsed by the client SDK's ``parse_url`` (a ws:// URL without a port is port 80; a
    fastim ws:// URL without a path is ``/ws``, a peer's ``/``); TLS is not benched.
    """
    try:
        ep = parse_url(url, default_path="/" if peer else "/ws")
    except ValueError as e:
        raise SystemExit(f"fastim bench: bad URL {url!r}: {e}") from None
    if peer:
        if ep.scheme != "ws":
            raise SystemExit(f"fastim bench: --peer must be ws://host:port/path, got {url!r}")
        return Target("peer", ep.host, ep.port, ep.path)
    if ep.scheme == "tcp":
        return Target("tcp", ep.host, ep.port)
    if ep.scheme == "ws":
        return Target("ws", ep.host, ep.port, ep.path)
    raise SystemExit(f"fastim bench: --url must be tcp://host:port or ws://host:port/ws: {url!r}")


def sub_targets(args: argparse.Namespace, target: Target) -> tuple[Target, ...]:
    """``--sub-urls``: the nodes of a cluster the subscribers are spread over (the
    publisher and the probe stay on ``--url``); empty: every subscriber on the target."""
    urls = [u.strip() for u in (getattr(args, "sub_urls", None) or "").split(",") if u.strip()]
    if not urls:
        return ()
    if not target.fastim:
        raise SystemExit("fastim bench: --sub-urls needs --url (fastim nodes), not --peer")
    targets = tuple(parse_target(u) for u in urls)
    if any(t.kind != target.kind for t in targets):
        raise SystemExit("fastim bench: --sub-urls must use the transport of --url")
    return targets


def upgrade_request(t: Target) -> tuple[bytes, str]:
    """The upgrade request to ``t`` (the SDK's, offering ``t.subprotocol``) and its key."""
    return ws_upgrade_request(t.endpoint, t.subprotocol, USER_AGENT)


def upgrade_response(t: Target, buf: bytes, key: str) -> int:
    """Where the server's data starts in ``buf``, after a 101 response checked as the SDK
    checks it (Sec-WebSocket-Accept of ``key`` included); -1 while the head is incomplete.

    Raises:
        fastim.client.HandshakeError: a refusal, a wrong accept key, an oversized head.
    """
    end = ws_response_head_end(buf)
    if end < 0:
        return -1
    check_ws_upgrade(buf[:end], key, t.subprotocol)
    return end + 4
