"""The node's HTTP face beyond the client protocol: the server HTTP API under ``/api/``
(:mod:`.http`, its OpenAPI document as data in ``openapi.json``), ``/metrics`` and the
store probe behind ``/ready`` (:mod:`.metrics`), and what they need from the node
(:mod:`.host`).

Above the transports (the WebSocket port hands ``/api/`` and ``/metrics`` requests here
through the routes the node gives it) and the cluster (whose numbers it exports).
"""

from .http import OPENAPI, ROUTES, ApiError, HttpApi
from .metrics import LatencyHistogram, Metrics, StoreProbe

__all__ = ["OPENAPI", "ROUTES", "ApiError", "HttpApi", "LatencyHistogram", "Metrics", "StoreProbe"]
