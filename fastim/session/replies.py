"""How a session encodes what it sends, per kind of connection: fastim frames (TCP),
fastim frames in WebSocket binary messages, JSON text messages. One object per kind,
shared by every connection of that kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .. import _core
from ..protocol import (
    CLIENT_FRAME_TYPES,
    FrameType,
    pack_error,
    pack_puback,
    pack_subscribed,
    pack_unsubscribed,
    type_mask,
)

CLIENT_TYPES_MASK = type_mask(CLIENT_FRAME_TYPES)

_F = FrameType


def _bin_id(req_id: Any) -> int:
    return req_id if isinstance(req_id, int) else 0


class Replies:
    """How a session encodes what it sends: fastim frames (TCP)."""

    json = False
    #: the replies to JSON commands (CMD frames) on this kind of connection
    cmd: JsonReplies

    def frame(self, ftype: int, payload: bytes) -> bytes:
        return _core.encode_frame(ftype, payload)

    def event(self, body: bytes) -> bytes:
        """A JSON event or reply (dm, presence, join...): an EVENT frame here."""
        return self.frame(_F.EVENT, body)

    def subscribed(
        self, req_id: Any, ch: str, off: int, epoch: str = "", recovered: bool = False
    ) -> bytes:
        return self.frame(
            _F.SUBSCRIBED, pack_subscribed(_bin_id(req_id), off, ch.encode(), epoch, recovered)
        )

    def unsubscribed(self, req_id: Any, ch: str) -> bytes:
        return self.frame(_F.UNSUBSCRIBED, pack_unsubscribed(_bin_id(req_id), ch.encode()))

    def puback(self, req_id: Any, ch: str, off: int) -> bytes:
        return self.frame(_F.PUBACK, pack_puback(_bin_id(req_id), off, ch.encode()))

    def pong(self, req_id: Any, payload: bytes = b"") -> bytes:
        return self.frame(_F.PONG, payload)

    def ping(self) -> bytes:
        return self.frame(_F.PING, b"")

    def error(self, req_id: Any, code: int, reason: str) -> bytes:
        return self.frame(_F.ERROR, pack_error(_bin_id(req_id), code, reason))

    def obj(self, obj: dict[str, Any], req_id: Any) -> bytes:
        """A JSON reply object (with the request's id) as an event."""
        if req_id is not None:
            obj["id"] = req_id
        return self.event(orjson.dumps(obj))


class WsBinaryReplies(Replies):
    """fastim frames, each in a WebSocket binary message."""

    def frame(self, ftype: int, payload: bytes) -> bytes:
        return _core.ws_encode(_core.OP_BINARY, _core.encode_frame(ftype, payload))

    def ping(self) -> bytes:
        return _core.ws_encode(_core.OP_PING, b"")


class JsonReplies(Replies):
    """JSON objects: WebSocket text messages (browsers), or EVENT frames answering CMD."""

    json = True

    def __init__(self, wrap: Callable[[bytes], bytes], ping: bytes = b"") -> None:
        self._wrap = wrap
        self._ping = ping

    def event(self, body: bytes) -> bytes:
        return self._wrap(body)

    def _text(self, obj: dict[str, Any], req_id: Any) -> bytes:
        if req_id is not None:
            obj["id"] = req_id
        return self._wrap(orjson.dumps(obj))

    def subscribed(
        self, req_id: Any, ch: str, off: int, epoch: str = "", recovered: bool = False
    ) -> bytes:
        return self._text(
            {"op": "subscribed", "ch": ch, "off": off, "epoch": epoch, "recovered": recovered},
            req_id,
        )

    def unsubscribed(self, req_id: Any, ch: str) -> bytes:
        return self._text({"op": "unsubscribed", "ch": ch}, req_id)

    def puback(self, req_id: Any, ch: str, off: int) -> bytes:
        return self._text({"op": "puback", "ch": ch, "off": off}, req_id)

    def pong(self, req_id: Any, payload: bytes = b"") -> bytes:
        return self._text({"op": "pong"}, req_id)

    def ping(self) -> bytes:
        return self._ping

    def error(self, req_id: Any, code: int, reason: str) -> bytes:
        return self._text({"op": "error", "code": code, "reason": reason}, req_id)


TCP_REPLIES = Replies()
WS_BINARY_REPLIES = WsBinaryReplies()
JSON_REPLIES = JsonReplies(
    lambda body: _core.ws_encode(_core.OP_TEXT, body), _core.ws_encode(_core.OP_PING, b"")
)
TCP_REPLIES.cmd = JsonReplies(lambda body: _core.encode_frame(_F.EVENT, body))
WS_BINARY_REPLIES.cmd = JsonReplies(
    lambda body: _core.ws_encode(_core.OP_BINARY, _core.encode_frame(_F.EVENT, body))
)
JSON_REPLIES.cmd = JSON_REPLIES
