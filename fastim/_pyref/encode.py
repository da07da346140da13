"""A channel message in every wire format, the readable way.

Reference twin of the encoding part of ``fastim._core`` (``encode_msg``,
``encode_msg_one``): the Python path the hub used before the compiled one, a few copies
of the data per format (struct pack, frame, WebSocket frame, join).
"""

from __future__ import annotations

import struct
from typing import Any

from typing_extensions import Buffer

from .fanout import (
    FMT_SSE,
    FMT_TCP,
    FMT_WS_BINARY,
    FMT_WS_BINARY_DEFLATE,
    FMT_WS_JSON,
    FMT_WS_JSON_DEFLATE,
    SubscriberSet,
)
from .frames import encode_frame
from .websocket import OP_BINARY, OP_TEXT, ws_encode

#: the fastim frame type of a channel message (FrameType.MSG in fastim.protocol)
MSG_FRAME_TYPE = 0x23

_OFF_CH = struct.Struct("!QB")  # MSG payload: u64 offset, u8 channel length; channel, data


def _msg_frame(offset: int, channel: bytes, data: Buffer) -> bytes:
    return encode_frame(MSG_FRAME_TYPE, _OFF_CH.pack(offset, len(channel)) + channel + data)


def _json(offset: int, json_head: bytes, data: Buffer) -> bytes:
    return b"".join((json_head, str(offset).encode(), b',"data":', data, b"}"))


def _sse(offset: int, json_head: bytes, data: Buffer) -> bytes:
    # raw CR/LF in JSON are whitespace between tokens (never in a string): spaces keep
    # the value and keep the event on one ``data:`` line
    clean = bytes(data).replace(b"\r", b" ").replace(b"\n", b" ")
    return b"data: " + _json(offset, json_head, clean) + b"\n\n"


def encode_msg(
    subs: SubscriberSet,
    offset: int,
    channel: bytes,
    json_head: bytes,
    data: Buffer,
    deflater: Any = None,
) -> tuple[bytes | None, ...]:
    """The message in each wire format some member of ``subs`` uses (None for the others).

    Indexed by ``FMT_*``: three entries when no member uses a deflate format or SSE, five
    with a deflate format and no SSE, else six (FMT_SSE last).
    ``json_head`` is the JSON message up to its offset, ``{"op":"msg","ch":<channel>,"off":``.
    A deflate format gets ``deflater.frame(opcode, payload, plain)`` (compressed once for
    all its members), or the plain frame when ``deflater`` is None.
    """
    n_tcp = subs.count(FMT_TCP)
    n_wsb = subs.count(FMT_WS_BINARY)
    n_wsbz = subs.count(FMT_WS_BINARY_DEFLATE)
    n_js = subs.count(FMT_WS_JSON)
    n_jsz = subs.count(FMT_WS_JSON_DEFLATE)
    n_sse = subs.count(FMT_SSE)
    tcp = wsb = wsbz = js = jsz = None
    if n_tcp or n_wsb or n_wsbz:
        frame = _msg_frame(offset, channel, data)
        if n_tcp:
            tcp = frame
        if n_wsb or (n_wsbz and deflater is None):
            wsb = ws_encode(OP_BINARY, frame)
        if n_wsbz:
            wsbz = wsb if deflater is None else deflater.frame(OP_BINARY, frame, wsb)
    if n_js or n_jsz:
        text = _json(offset, json_head, data)
        if n_js or deflater is None:
            js = ws_encode(OP_TEXT, text)
        if n_jsz:
            jsz = js if deflater is None else deflater.frame(OP_TEXT, text, js)
    if n_sse:
        sse = _sse(offset, json_head, data)
        return tcp, wsb if n_wsb else None, js if n_js else None, wsbz, jsz, sse
    if n_wsbz or n_jsz:
        return tcp, wsb if n_wsb else None, js if n_js else None, wsbz, jsz
    return tcp, wsb, js


def encode_msg_one(fmt: int, offset: int, channel: bytes, json_head: bytes, data: Buffer) -> bytes:
    """The message for one connection of wire format ``fmt``, uncompressed."""
    if fmt == FMT_TCP:
        return _msg_frame(offset, channel, data)
    if fmt in (FMT_WS_BINARY, FMT_WS_BINARY_DEFLATE):
        return ws_encode(OP_BINARY, _msg_frame(offset, channel, data))
    if fmt == FMT_SSE:
        return _sse(offset, json_head, data)
    return ws_encode(OP_TEXT, _json(offset, json_head, data))
