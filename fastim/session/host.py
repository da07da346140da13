"""What a session needs from the node it runs in: the :class:`Host` protocol.

The node (:class:`fastim.node.Node`) implements it; the session layer never imports the
node. The counters are plain attributes the session bumps (``/metrics`` reads them).
"""

from __future__ import annotations

from typing import Any, Protocol

from .. import _core
from ..auth import Auth
from ..backend.events import Events
from ..backend.proxy import Proxy
from ..config import Config
from ..delivery import Postman
from ..heartbeat import TimerWheel
from ..hub import Hub
from .sessions import SessionList


class Host(Protocol):
    """The node, as its sessions see it."""

    config: Config
    auth: Auth
    #: the proxy hooks (fastim/backend/proxy.py): falsy when none is configured
    proxy: Proxy
    hub: Hub
    #: max_connections_per_user over workers and nodes (fastim/session/userlimit.py)
    user_limit: Any
    postman: Postman | None
    #: event webhooks (docs/events.md); None when events_url is off
    events: Events | None
    sessions: SessionList[Any]
    wheel: TimerWheel
    flusher: _core.Flusher
    # counters
    protocol_errors: int
    rate_limited: int
    limit_refusals: int
    slow_disconnects: int
    heartbeat_timeouts: int

    def admit(self, session: Any) -> tuple[int, str, str] | None:
        """Per-address limits for a new connection: None, or (status, reason, address)."""

    def release(self, ip: str) -> None:
        """A connection counted against ``ip`` closed."""

    def on_session_closed(self) -> None:
        """A session is gone (the drain waits for the last one)."""
