"""One connected client, whatever its transport: commands, subscriptions, heartbeat,
token expiry, close (:mod:`.session`); how it encodes replies per kind of connection
(:mod:`.replies`); the checked fields of JSON commands (:mod:`.commands`); the node's
list of live sessions (:mod:`.sessions`); what it needs from its node (:mod:`.host`).

Above the hub and the postman, below the transports, which subclass :class:`Session`.
"""

from .host import Host
from .replies import (
    CLIENT_TYPES_MASK,
    JSON_REPLIES,
    TCP_REPLIES,
    WS_BINARY_REPLIES,
    JsonReplies,
    Replies,
    WsBinaryReplies,
)
from .session import CLOSED, CLOSING, HANDSHAKE, OPEN, Session
from .sessions import SessionList

__all__ = [
    "CLIENT_TYPES_MASK",
    "CLOSED",
    "CLOSING",
    "HANDSHAKE",
    "JSON_REPLIES",
    "OPEN",
    "TCP_REPLIES",
    "WS_BINARY_REPLIES",
    "Host",
    "JsonReplies",
    "Replies",
    "Session",
    "SessionList",
    "WsBinaryReplies",
]
