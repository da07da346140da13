"""Exceptions raised by fastim, in one tree.

::

    FastimError
    ├── ProtocolError(code, reason)        bad bytes or a bad command from a peer
    │   ├── FrameTooLarge                  fastim frame or WebSocket message over the limit
    │   ├── ChecksumMismatch               CRC32 of a fastim frame payload does not match
    │   ├── UnknownFrameType               fastim frame type this version does not define
    │   ├── WebSocketError(close_code)     RFC 6455 violation; carries the close code to send
    │   └── BadRequest                     well-framed, but the command is malformed
    ├── ConnectionClosed(code, reason)     the peer closed, or we were disconnected
    └── RequestError(code, reason)         the server answered a request with an error

They are plain Python classes (not Cython) so that they pickle, subclass and
print like any other exception; the compiled core imports and raises them.
"""

from __future__ import annotations

from .codes import CloseCode, ErrorCode


class FastimError(Exception):
    """Base class of every exception fastim raises on purpose."""


class ProtocolError(FastimError):
    """The peer broke the protocol. ``code`` is an :class:`ErrorCode`.

    Every protocol error is fatal to the connection: the server answers with an
    error frame naming the problem and closes.
    """

    code: int = ErrorCode.BAD_REQUEST

    def __init__(self, reason: str, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.reason = reason
        #: fastim frames a FrameDecoder completed in the same feed() before the error:
        #: they were valid and are handled before the connection is failed (as
        #: ``WebSocketError.events``), so a request sent just before garbage is answered
        self.frames: list[tuple[int, bytes]] = []
        super().__init__(reason)

    @property
    def close_code(self) -> int:
        """The WebSocket / GOAWAY close code that goes with this error."""
        return _CLOSE_FOR_ERROR.get(self.code, CloseCode.PROTOCOL_ERROR)


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class ChecksumMismatch(ProtocolError):
    code = ErrorCode.BAD_CHECKSUM


class UnknownFrameType(ProtocolError):
    code = ErrorCode.UNKNOWN_OP


class BadRequest(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class WebSocketError(ProtocolError):
    """An RFC 6455 violation. ``ws_close_code`` is the close code to send (1002, 1007, 1009)."""

    code = ErrorCode.BAD_FRAMING

    def __init__(self, reason: str, ws_close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        self.ws_close_code = ws_close_code
        #: events the parser completed in the same feed() before the violation; they were
        #: valid and are handled before the close (RFC 6455 §7.1.7)
        self.events: list[tuple[int, bytes]] = []
        code: int = ErrorCode.BAD_FRAMING
        if ws_close_code == CloseCode.INVALID_DATA:
            code = ErrorCode.INVALID_UTF8
        elif ws_close_code == CloseCode.MESSAGE_TOO_BIG:
            code = ErrorCode.FRAME_TOO_LARGE
        super().__init__(reason, code)

    @property
    def close_code(self) -> int:
        return self.ws_close_code


class ConnectionClosed(FastimError):
    """The connection is gone. ``temporary`` says whether reconnecting may help."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"connection closed: {code} {reason}".rstrip())

    @property
    def temporary(self) -> bool:
        return CloseCode.should_reconnect(self.code)


class RequestError(FastimError):
    """The server refused a request (subscribe, publish, ...) with an error reply."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


_CLOSE_FOR_ERROR: dict[int, int] = {
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
    ErrorCode.FRAME_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.INVALID_UTF8: CloseCode.INVALID_DATA,
    ErrorCode.UNSUPPORTED_VERSION: CloseCode.POLICY_VIOLATION,
    ErrorCode.HANDSHAKE_REQUIRED: CloseCode.POLICY_VIOLATION,
    ErrorCode.BAD_REQUEST: CloseCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_OP: CloseCode.BAD_REQUEST,
    ErrorCode.BAD_CHANNEL: CloseCode.BAD_REQUEST,
}
