"""Channels, their subscribers, offsets and history; publish and fan-out.

A publish is encoded once per wire format that has subscribers (a fastim MSG frame, that
frame inside a WebSocket binary frame, a JSON text frame), and then
:meth:`SubscriberSet.fanout` appends the right one to every subscriber's out-ring in C.
Nothing here runs per subscriber in Python.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import orjson

from . import _core
from .protocol import FrameType, pack_msg

if TYPE_CHECKING:
    from .config import Config

_MSG = int(FrameType.MSG)


class HubError(Exception):
    """A hub refusal a client can act on (limit reached); carries an ErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def new_epoch() -> str:
    """A short random string that names one continuous history of a channel."""
    return os.urandom(6).hex()


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

    def encode(self, offset: int, data: bytes) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The message in each wire format some subscriber uses (None for the others)."""
        subs = self.subs
        tcp = wsb = js = None
        n_tcp = subs.count(_core.FMT_TCP)
        n_wsb = subs.count(_core.FMT_WS_BINARY)
        if n_tcp or n_wsb:
            frame = _core.encode_frame(_MSG, pack_msg(offset, self.name_b, data))
            if n_tcp:
                tcp = frame
            if n_wsb:
                wsb = _core.ws_encode(_core.OP_BINARY, frame)
        if subs.count(_core.FMT_WS_JSON):
            js = _core.ws_encode(
                _core.OP_TEXT,
                b"".join((self._json_prefix, str(offset).encode(), b',"data":', data, b"}")),
            )
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
            self.delivered += ch.subs.fanout(ch.encode(off, data))
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
