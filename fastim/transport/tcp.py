"""The fastim TCP transport: a stream of fastim frames, HELLO first."""

from __future__ import annotations

from .. import _core
from ..errors import ProtocolError
from ..session import CLIENT_TYPES_MASK, CLOSING, Session
from .host import TransportHost


class TcpSession(Session):
    """One TCP client: bytes → FrameDecoder → Session.handle_frame."""

    __slots__ = ()

    node: TransportHost  # narrower than Session's Host: the HTTP side too

    def __init__(self, node: TransportHost) -> None:
        super().__init__(node)
        self.node = node
        self.decoder = _core.FrameDecoder(node.config.max_frame, CLIENT_TYPES_MASK)

    def data_received(self, data: bytes) -> None:
        if self.state >= CLOSING:
            return
        self.last_rx = self.node.wheel.now
        self.node.bytes_in += len(data)
        assert self.decoder is not None
        error: ProtocolError | None = None
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            # the frames completed before the bad bytes were valid: answer them first
            frames, error = e.frames, e
        try:
            for ftype, payload in frames:
                self.handle_frame(ftype, payload)
                if self.state >= CLOSING or self.closing_after is not None:
                    return
        except ProtocolError as e:
            error = e
        if error is not None:
            self.fail(error)
