"""Listeners and per-connection protocols: fastim TCP frames, and WebSocket over HTTP/1.1."""

from .tcp import TcpSession
from .ws import WsSession

__all__ = ["TcpSession", "WsSession"]
