"""What the bench sends and expects on the wire: its message, the frames it accepts.

The publisher's message is a JSON object of a given size, ``{"t":<CLOCK_MONOTONIC ns>,
"s":<seq>,"p":"xx…"}``; every process on the machine shares that clock, so a subscriber
in another process computes the delivery latency from ``t``.
"""

from __future__ import annotations

import os
import time

from .. import _core
from ..protocol import FrameType, type_mask

#: largest frame or WebSocket message a bench connection accepts
MAX_MESSAGE = 64 << 20
#: the frame types a fastim server may send the bench (anything else breaks the stream)
SERVER_TYPES = type_mask(
    frozenset(
        {
            FrameType.WELCOME,
            FrameType.PING,
            FrameType.PONG,
            FrameType.SUBSCRIBED,
            FrameType.PUBACK,
            FrameType.MSG,
            FrameType.ERROR,
            FrameType.GOAWAY,
        }
    )
)


def make_payload(seq: int, size: int, t_ns: int | None = None) -> bytes:
    """The publisher's message: a JSON object of ``size`` bytes with seq ``s`` and stamp ``t``.

    ``t`` is CLOCK_MONOTONIC in ns (``time.monotonic_ns``, now unless ``t_ns`` says),
    which every process on the machine shares, so a subscriber in another process
    computes the delivery latency.
    """
    t = time.monotonic_ns() if t_ns is None else t_ns
    head = b'{"t":%d,"s":%d,"p":"' % (t, seq)
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def mask() -> bytes:
    """A fresh masking key for a client's WebSocket frame."""
    return os.urandom(4)


def ws_text(payload: bytes) -> bytes:
    """A masked WebSocket text message."""
    return _core.ws_encode(_core.OP_TEXT, payload, mask=mask())
