"""Error and close codes: the numbers both ends agree on.

The lowest module of the package: :mod:`fastim.errors` (the exceptions carry a code) and
:mod:`fastim.protocol` (the wire formats) both build on it, so neither imports the
other's way round. :mod:`fastim.protocol` re-exports both enums.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes of ``{"op":"error"}`` replies and ERROR frames.

    ``fatal`` codes are protocol violations: the server closes the connection
    right after the error. The others answer one request and the connection stays.
    """

    INTERNAL = 100
    UNKNOWN_OP = 101  # unknown op, unknown frame type
    BAD_REQUEST = 102  # invalid JSON, missing or mistyped field (the reason names it)
    FRAME_TOO_LARGE = 103  # fastim frame or WebSocket message over the limit
    BAD_CHECKSUM = 104  # CRC32 mismatch
    BAD_FRAMING = 105  # garbage, or WebSocket framing that breaks RFC 6455
    INVALID_UTF8 = 106  # text that is not UTF-8
    UNSUPPORTED_VERSION = 107  # HELLO's version range does not meet ours
    HANDSHAKE_REQUIRED = 108  # TCP: first frame was not HELLO
    LIMIT_EXCEEDED = 109  # too many subscriptions / channels
    BAD_CHANNEL = 110  # empty, too long, or control characters
    NOT_SUBSCRIBED = 111
    ALREADY_SUBSCRIBED = 112
    INBOX_FULL = 113  # the recipient's inbox holds inbox_max unacknowledged messages
    STORE_UNAVAILABLE = 114  # the store failed: nothing was acknowledged, retry
    NO_USER = 115  # a user-only command on a connection without a user
    RATE_LIMITED = 116  # over publish_rate: this request was refused, slow down
    AUTH_FAILED = 117  # token missing, malformed, expired or not verified: close 4501
    PERMISSION_DENIED = 118  # the token or the namespace's rules refuse this request
    NOT_ROUTED = 119  # cluster: the channel's owner node did not take the publish, retry
    #: the application's backend (a proxy hook, docs/proxy.md) failed, timed out, or its
    #: circuit breaker is open: nothing was done, retry later
    BACKEND_UNAVAILABLE = 120
    #: the node does not offer this (an ``rpc`` where no rpc hook is configured)
    NOT_AVAILABLE = 121

    @property
    def fatal(self) -> bool:
        return self not in _NON_FATAL


_NON_FATAL = frozenset(
    {
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.NOT_SUBSCRIBED,
        ErrorCode.ALREADY_SUBSCRIBED,
        ErrorCode.INBOX_FULL,
        ErrorCode.STORE_UNAVAILABLE,
        ErrorCode.NO_USER,
        ErrorCode.RATE_LIMITED,
        ErrorCode.NOT_ROUTED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.NOT_AVAILABLE,
    }
)


class CloseCode(IntEnum):
    """Why a connection was closed: WebSocket close codes, and the GOAWAY code on TCP.

    1000–1015 are RFC 6455's. 4000–4499: the client should reconnect (with backoff);
    4500–4999: reconnecting with the same input will fail again.
    """

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    HEARTBEAT_TIMEOUT = 4000  # no pong in time: reconnect
    SLOW_CONSUMER = 4001  # outbound buffer over its cap: reconnect, recover from history
    RATE_LIMITED = 4002  # too many requests or connections: reconnect later, with backoff
    EXPIRED = 4003  # the connect hook's expire_at passed (no refresh): reconnect
    BACKEND_UNAVAILABLE = 4004  # the connect hook's backend did not answer: reconnect later
    BAD_REQUEST = 4500  # malformed command: do not retry as is
    AUTH_FAILED = 4501  # bad, expired or missing token: reconnect only with a new one
    DISCONNECTED = 4510  # closed by the server HTTP API (/api/disconnect): do not reconnect
    TOO_MANY_CONNECTIONS = 4511  # the user has max_connections_per_user: do not reconnect
    REPLACED = 4512  # closed for a newer connection of the user (max_connections_per_user)

    @staticmethod
    def should_reconnect(code: int) -> bool:
        return code in (1001, 1006, 1011, 1012, 1013) or 4000 <= code < 4500
