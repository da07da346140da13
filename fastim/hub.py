"""Channels, their subscribers, offsets and history; publish and fan-out.

A publish is encoded once per wire format that has subscribers (a fastim MSG frame, that
frame inside a WebSocket binary frame, a JSON text frame, and each WebSocket frame
compressed with permessage-deflate), and then :meth:`SubscriberSet.fanout` appends the
right one to every subscriber's out-ring in C. Nothing here runs per subscriber in Python:
a message is compressed once, however many subscribers negotiated compression.
"""

from __future__ import annotations

import os
import zlib
from typing import TYPE_CHECKING

import orjson

from . import _core
from .protocol import FrameType, pack_msg

if TYPE_CHECKING:
    from .config import Config

_MSG = int(FrameType.MSG)
_OP_BINARY = _core.OP_BINARY
_OP_TEXT = _core.OP_TEXT
_FMT_TCP = _core.FMT_TCP
_FMT_WS_BINARY = _core.FMT_WS_BINARY
_FMT_WS_JSON = _core.FMT_WS_JSON
_FMT_WS_BINARY_DEFLATE = _core.FMT_WS_BINARY_DEFLATE
_FMT_WS_JSON_DEFLATE = _core.FMT_WS_JSON_DEFLATE


class HubError(Exception):
    """A hub refusal a client can act on (limit reached); carries an ErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def new_epoch() -> str:
    """A short random string that names one continuous history of a channel."""
    return os.urandom(6).hex()


class Deflater:
    """The node's one permessage-deflate compressor (RFC 7692), shared by every channel.

    The WebSocket transport accepts compression only with ``server_no_context_takeover``:
    each message is compressed as if it were the first, so the compressed frame does not
    depend on what a connection received before, and one frame serves every subscriber
    of a message. ``flush(Z_FULL_FLUSH)`` ends a message *and* resets the compressor's
    history, so one reused compressobj gives that independence without the cost of a
    fresh one per message (a deflate state is ~260 KiB to allocate and clear), and no
    connection holds compression state of its own. Created on first use.
    """

    __slots__ = ("_z", "bytes_in", "bytes_out", "level", "messages", "min_size")

    def __init__(self, level: int = 6, min_size: int = 256) -> None:
        self.level = level
        #: messages shorter than this go uncompressed (RSV1 is per message, RFC 7692 §6)
        self.min_size = min_size
        self._z: zlib._Compress | None = None
        #: messages compressed, and their bytes before and after (the 4-byte tail dropped)
        self.messages = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, payload: bytes) -> memoryview:
        """``payload`` compressed on its own, without the trailing ``00 00 ff ff`` (§7.2.1)."""
        z = self._z
        if z is None:
            z = self._z = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        out = z.compress(payload) + z.flush(zlib.Z_FULL_FLUSH)
        self.messages += 1
        self.bytes_in += len(payload)
        self.bytes_out += len(out) - 4
        return memoryview(out)[:-4]

    def frame(self, opcode: int, payload: bytes, plain: bytes | None = None) -> bytes:
        """The message as one frame for a deflate connection.

        Compressed with RSV1 set if it is at least ``min_size`` bytes and compressing
        makes it smaller; otherwise the plain frame (``plain`` if already built).
        """
        if len(payload) >= self.min_size:
            body = self.compress(payload)
            if len(body) < len(payload):
                return _core.ws_encode(opcode, body, rsv1=True)
        return plain if plain is not None else _core.ws_encode(opcode, payload)


class Channel:
    """One channel: subscribers, the offset sequence, and recent history."""

    __slots__ = (
        "_json_prefix",
        "epoch",
        "history",
        "idle_since",
        "name",
        "name_b",
        "offset",
        "subs",
    )

    def __init__(self, name: str, history_size: int) -> None:
        self.name = name
        self.name_b = name.encode("utf-8")
        self.subs = _core.SubscriberSet()
        self.history = _core.HistoryRing(history_size)
        self.offset = 0
        self.epoch = new_epoch()
        self.idle_since = 0.0
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


class Hub:
    """All channels of this node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.channels: dict[str, Channel] = {}
        #: channels with no subscribers, kept for their history until ``history_ttl``
        self.idle: dict[str, Channel] = {}
        #: loop time, refreshed by the node's timer tick
        self.now = 0.0
        self.published = 0
        self.delivered = 0
        #: compresses each message once for every permessage-deflate subscriber
        self.deflater = Deflater(config.ws_compression or 6, config.ws_compression_min_size)

    def channel(self, name: str, create: bool = True) -> Channel | None:
        ch = self.channels.get(name)
        if ch is None and create:
            if len(self.channels) >= self.config.max_channels:
                from .protocol import ErrorCode

                raise HubError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"node holds the maximum of {self.config.max_channels} channels",
                )
            ch = Channel(name, self.config.history_size)
            ch.idle_since = self.now
            self.channels[name] = ch
            self.idle[name] = ch
        return ch

    def _drop(self, name: str) -> None:
        self.channels.pop(name, None)
        self.idle.pop(name, None)

    def subscribe(self, name: str, ring: _core.OutRing) -> Channel:
        ch = self.channel(name)
        assert ch is not None
        ch.subs.add(ring)
        self.idle.pop(name, None)
        return ch

    def unsubscribe(self, name: str, ring: _core.OutRing) -> bool:
        ch = self.channels.get(name)
        if ch is None or not ch.subs.remove(ring):
            return False
        if len(ch.subs) == 0:
            if self.config.history_size == 0 or ch.offset == 0:
                self._drop(name)
            else:
                ch.idle_since = self.now
                self.idle[name] = ch
        return True

    def publish(self, name: str, data: bytes) -> int:
        """Assign the next offset, keep it in history, deliver to every subscriber.

        ``data`` is a JSON document (bytes), already validated by the caller.
        Returns the message's offset.
        """
        ch = self.channel(name)
        assert ch is not None
        off = ch.offset + 1
        ch.offset = off
        ch.history.append(off, data)
        self.published += 1
        if len(ch.subs):
            self.delivered += ch.subs.fanout(ch.encode(off, data, self.deflater))
        elif self.config.history_size == 0:
            self._drop(name)
        else:
            ch.idle_since = self.now
        return off

    def sweep(self, now: float) -> int:
        """Forget channels that have had no subscribers for ``history_ttl``; return how many."""
        ttl = self.config.history_ttl
        dead = [name for name, ch in self.idle.items() if now - ch.idle_since >= ttl]
        for name in dead:
            self._drop(name)
        return len(dead)
