"""What the transports need from the node: the session's :class:`~fastim.session.Host`,
plus the HTTP side of the WebSocket port (probes, ``/metrics``, the HTTP API, static
files, the Origin policy, the per-address limits of the request head).

The node implements it and hands the routes in: the transport reaches the HTTP API and
the metrics through :class:`ApiRoutes` and :class:`MetricsPage`, never by importing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..session import Host
from .origin import Origins


class ApiRoutes(Protocol):
    """The server HTTP API under ``/api/`` (:class:`fastim.api.HttpApi`)."""

    def gate(
        self, headers: dict[bytes, bytes], method: bytes, path: bytes
    ) -> tuple[int, str, bytes] | None:
        """Once the head is in: None to read the body and :meth:`handle`, or the answer."""

    def refuse(
        self, session: Any, path: bytes, status: int, message: str, headers: bytes = b""
    ) -> None:
        """Answer (and count) an ``/api/`` request the transport refused."""

    def handle(self, session: Any, method: bytes, path: bytes) -> None:
        """A complete ``/api/`` request."""


class MetricsPage(Protocol):
    """``GET /metrics`` (:class:`fastim.api.Metrics`)."""

    @property
    def content_type(self) -> str: ...

    def render(self) -> bytes: ...

    @property
    def whole_node(self) -> Callable[[], Awaitable[bytes]] | None:
        """On a node of several workers: renders every worker's metrics (asks them)."""


class TransportHost(Host, Protocol):
    """The node, as its listeners' sessions see it."""

    bytes_in: int
    http_rejects: int

    @property
    def origins(self) -> Origins: ...

    @property
    def api(self) -> ApiRoutes: ...

    @property
    def metrics(self) -> MetricsPage: ...

    def readiness(self) -> str | None:
        """None when the node should get traffic (``/ready`` 200); else why not."""

    def ready_text(self) -> str:
        """The body of a 200 ``/ready``."""

    def hold(self, ip: str) -> bool:
        """May one more connection over its limits from ``ip`` wait for its head?"""

    def unhold(self, ip: str) -> None:
        """A held connection from ``ip`` is decided."""

    def probe_allowed(self, ip: str) -> bool:
        """May ``ip``, over its limits, make one more probe now?"""

    def probe_admitted(self, session: Any) -> None:
        """A connection the limits admitted is a probe: it no longer counts."""
