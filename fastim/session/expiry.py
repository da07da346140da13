"""Ends a connection when its token expires (unless a refresh replaced the token)."""

from __future__ import annotations

import time
from typing import Protocol

from ..auth import AuthFailed, Identity
from ..errors import ProtocolError
from .host import Host


class Expiring(Protocol):
    """The session as its token's timer sees it."""

    identity: Identity | None
    state: int
    node: Host

    def fail(self, err: ProtocolError, req_id: object = None) -> None: ...


#: a session's state from which a token's expiry no longer matters (see session.CLOSING)
CLOSING = 2


class TokenExpiry:
    """Ends a connection when its token expires, unless a refresh replaced the token.

    A timer of its own on the node's wheel: the session's one deadline belongs to the
    heartbeat, which a token's ``exp`` must not disturb. Created only for connections
    that presented a token; one per token: a refresh starts a new one and the old one
    finds itself superseded when it fires.
    """

    __slots__ = ("identity", "session", "wheel_tick")

    def __init__(self, session: Expiring, identity: Identity) -> None:
        self.session = session
        self.identity = identity
        self.wheel_tick = -1
        wheel = session.node.wheel
        wheel.schedule(self, wheel.now + max(0.0, identity.expires - time.time()))

    def on_deadline(self, now: float) -> float | None:
        s = self.session
        if s.identity is not self.identity or s.state >= CLOSING:
            return None  # refreshed (a newer timer watches), or the connection is gone
        left = self.identity.expires - time.time()
        if left > 0:
            return now + left  # the wheel fired early (its resolution)
        s.node.auth.expired += 1
        s.fail(
            AuthFailed(
                'token expired: refresh it before "exp" ({"op":"refresh","token":...}) '
                "or reconnect with a new one"
            )
        )
        return None
