"""One channel: its subscribers, offsets, recent history, and its messages encoded once
per wire format (a fastim MSG frame, that frame in a WebSocket binary frame, a JSON text
frame, and the deflate variants) in one compiled pass (:func:`_core.encode_msg`), which
the compiled fan-out appends to every subscriber's out-ring."""

from __future__ import annotations

import orjson

from .. import _core
from ..config.namespaces import Namespace
from ..protocol import FrameType
from ..store.base import KeyWindow, new_epoch
from .deflate import Deflater
from .interfaces import Done

_EVENT = int(FrameType.EVENT)
_OP_BINARY = _core.OP_BINARY
_OP_TEXT = _core.OP_TEXT
_encode_msg = _core.encode_msg
_encode_msg_one = _core.encode_msg_one


class Channel:
    """One channel: subscribers, the offset sequence, recent history, presence."""

    __slots__ = (
        "_json_prefix",
        "dbase",
        "durable",
        "dwait",
        "epoch",
        "history",
        "idle_since",
        "inflight",
        "keyed",
        "loaded",
        "name",
        "name_b",
        "ns",
        "offset",
        "pending",
        "seen",
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
        #: idempotency keys of ``pending``, by position; None while no publish has one
        #: (the keyless publish stays as it was)
        self.keyed: dict[int, str] | None = None
        #: a memory channel's idempotency keys (its owner numbers it here), first use
        self.seen: KeyWindow | None = None
        self.inflight = False
        #: user id → subscribed connections of that user (presence, join/leave)
        self.users: dict[str, int] = {}
        self._json_prefix = b'{"op":"msg","ch":' + orjson.dumps(name) + b',"off":'
        #: delta namespaces (docs/delta.md): the data of the message at ``offset`` as
        #: this node delivered it, the base of the next delta; None: unknown (the next
        #: message goes out full to everyone)
        self.dbase: bytes | None = None
        #: delta subscribers that have not yet had the message at ``offset`` (they just
        #: subscribed): they take the next message full, then deltas (marked alt in
        #: ``subs``); None while there are none
        self.dwait: list[_core.OutRing] | None = None

    def encode(
        self, offset: int, data: bytes, deflater: Deflater | None = None
    ) -> tuple[bytes | None, ...]:
        """The message in each wire format some subscriber uses (None for the others).

        Indexed by ``FMT_*``; three entries when no subscriber uses a deflate format (the
        fan-out reads a short tuple as None for the rest). Built in one compiled pass
        (:func:`fastim._core.encode_msg`); the deflate formats are compressed once, by
        ``deflater``, whatever their number of subscribers; without a ``deflater`` they
        get the plain frames.
        """
        return _encode_msg(self.subs, offset, self.name_b, self._json_prefix, data, deflater)

    def encode_delta(self, offset: int, delta: bytes) -> tuple[bytes | None, ...]:
        """The delta message for the subscribers marked alt, per wire format
        (:func:`fastim._core.encode_delta`), for ``subs.fanout(full, alt)``."""
        return _core.encode_delta(self.subs, offset, self.name_b, self._json_prefix, delta)

    def encode_one(self, fmt: int, offset: int, data: bytes) -> bytes:
        """The message for one connection of wire format ``fmt`` (recovery; uncompressed)."""
        return _encode_msg_one(fmt, offset, self.name_b, self._json_prefix, data)


def encode_event(body: bytes) -> tuple[bytes, ...]:
    """A JSON event (join, leave, resubscribe) in every wire format, indexed by ``FMT_*``."""
    frame = _core.encode_frame(_EVENT, body)
    wsb = _core.ws_encode(_OP_BINARY, frame)
    js = _core.ws_encode(_OP_TEXT, body)
    return frame, wsb, js, wsb, js, b"data: " + body + b"\n\n"  # body: orjson, one line
