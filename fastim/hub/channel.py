"""One channel: its subscribers, offsets, recent history, and its messages encoded once
per wire format (a fastim MSG frame, that frame in a WebSocket binary frame, a JSON text
frame, and the deflate variants), which the compiled fan-out appends to every
subscriber's out-ring."""

from __future__ import annotations

import orjson

from .. import _core
from ..config.namespaces import Namespace
from ..protocol import FrameType, pack_msg
from ..store.base import new_epoch
from .deflate import Deflater
from .interfaces import Done

_EVENT = int(FrameType.EVENT)
_MSG = int(FrameType.MSG)
_OP_BINARY = _core.OP_BINARY
_OP_TEXT = _core.OP_TEXT
_FMT_TCP = _core.FMT_TCP
_FMT_WS_BINARY = _core.FMT_WS_BINARY
_FMT_WS_JSON = _core.FMT_WS_JSON
_FMT_WS_BINARY_DEFLATE = _core.FMT_WS_BINARY_DEFLATE
_FMT_WS_JSON_DEFLATE = _core.FMT_WS_JSON_DEFLATE


class Channel:
    """One channel: subscribers, the offset sequence, recent history, presence."""

    __slots__ = (
        "_json_prefix",
        "durable",
        "epoch",
        "history",
        "idle_since",
        "inflight",
        "loaded",
        "name",
        "name_b",
        "ns",
        "offset",
        "pending",
        "subs",
        "users",
    )

    def __init__(self, name: str, ns: Namespace, durable: bool = False) -> None:
        self.name = name
        self.name_b = name.encode("utf-8")
        self.ns = ns
        #: history lives in the store (publishes acked after it took them), the ring below
        #: is a cache of its newest messages; else the ring *is* the history
        self.durable = durable
        self.subs = _core.SubscriberSet()
        #: (offset, (data, time)) of the newest messages
        self.history = _core.HistoryRing(ns.history_size)
        #: the last offset delivered to subscribers
        self.offset = 0
        self.epoch = new_epoch()
        #: epoch and offset known (a durable channel learns them from the store first)
        self.loaded = not durable
        self.idle_since = 0.0
        #: publishes waiting for the store: (data, done callback, arrival time for the
        #: latency histogram); one append in flight
        self.pending: list[tuple[bytes, Done, float]] = []
        self.inflight = False
        #: user id → subscribed connections of that user (presence, join/leave)
        self.users: dict[str, int] = {}
        self._json_prefix = b'{"op":"msg","ch":' + orjson.dumps(name) + b',"off":'

    def encode(
        self, offset: int, data: bytes, deflater: Deflater | None = None
    ) -> tuple[bytes | None, ...]:
        """The message in each wire format some subscriber uses (None for the others).

        Indexed by ``FMT_*``; three entries when no subscriber uses a deflate format (the
        fan-out reads a short tuple as None for the rest). The deflate formats are
        compressed once here, whatever their number of subscribers; without a
        ``deflater`` they get the plain frames.
        """
        count = self.subs.count
        n_tcp = count(_FMT_TCP)
        n_wsb = count(_FMT_WS_BINARY)
        n_wsbz = count(_FMT_WS_BINARY_DEFLATE)
        n_js = count(_FMT_WS_JSON)
        n_jsz = count(_FMT_WS_JSON_DEFLATE)
        tcp = wsb = wsbz = js = jsz = None
        if n_tcp or n_wsb or n_wsbz:
            frame = _core.encode_frame(_MSG, pack_msg(offset, self.name_b, data))
            if n_tcp:
                tcp = frame
            if n_wsb or (n_wsbz and deflater is None):
                wsb = _core.ws_encode(_OP_BINARY, frame)
            if n_wsbz:
                wsbz = wsb if deflater is None else deflater.frame(_OP_BINARY, frame, wsb)
        if n_js or n_jsz:
            text = b"".join((self._json_prefix, str(offset).encode(), b',"data":', data, b"}"))
            if n_js or deflater is None:
                js = _core.ws_encode(_OP_TEXT, text)
            if n_jsz:
                jsz = js if deflater is None else deflater.frame(_OP_TEXT, text, js)
        if n_wsbz or n_jsz:
            return tcp, wsb if n_wsb else None, js if n_js else None, wsbz, jsz
        return tcp, wsb, js

    def encode_one(self, fmt: int, offset: int, data: bytes) -> bytes:
        """The message for one connection of wire format ``fmt`` (recovery; uncompressed)."""
        if fmt == _FMT_TCP:
            return _core.encode_frame(_MSG, pack_msg(offset, self.name_b, data))
        if fmt in (_FMT_WS_BINARY, _FMT_WS_BINARY_DEFLATE):
            return _core.ws_encode(
                _OP_BINARY, _core.encode_frame(_MSG, pack_msg(offset, self.name_b, data))
            )
        text = b"".join((self._json_prefix, str(offset).encode(), b',"data":', data, b"}"))
        return _core.ws_encode(_OP_TEXT, text)


def encode_event(body: bytes) -> tuple[bytes, ...]:
    """A JSON event (join, leave, resubscribe) in every wire format, indexed by ``FMT_*``."""
    frame = _core.encode_frame(_EVENT, body)
    wsb = _core.ws_encode(_OP_BINARY, frame)
    js = _core.ws_encode(_OP_TEXT, body)
    return frame, wsb, js, wsb, js
