"""What the HTTP API and the metrics need from the node: :class:`ApiHost`.

The node implements it; nothing in :mod:`fastim.api` imports the node.
"""

from __future__ import annotations

from typing import Protocol

from ..cluster.runtime import Cluster
from ..store import Store
from ..transport.host import TransportHost


class ApiHost(TransportHost, Protocol):
    """The node, as its HTTP API and its ``/metrics`` see it."""

    @property
    def store(self) -> Store | None: ...

    @property
    def cluster(self) -> Cluster | None: ...
