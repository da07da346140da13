"""Pure-Python twins of ``fastim._core``: same names, same behaviour, readable.

They are the specification the compiled core is tested against (``tests/core``), not
a fallback: ``import fastim._pyref as ref`` gives the same public names as
``fastim._core``.
"""

from .delta import (
    DELTA_FRAME_TYPE,
    DELTA_MAX_INPUT,
    encode_delta,
    fossil_apply,
    fossil_delta,
    json_string,
)
from .encode import MSG_FRAME_TYPE, encode_msg, encode_msg_one
from .fanout import (
    FMT_SSE,
    FMT_TCP,
    FMT_WS_BINARY,
    FMT_WS_BINARY_DEFLATE,
    FMT_WS_JSON,
    FMT_WS_JSON_DEFLATE,
    N_FORMATS,
    SubscriberSet,
)
from .frames import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, crc32, encode_frame
from .ring import DEFAULT_RING_CAP, Flusher, HistoryRing, OutRing
from .websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_COMPRESSED,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WSParser,
    utf8_valid,
    ws_close_payload,
    ws_encode,
    ws_inflate,
    ws_parse_close,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_RING_CAP",
    "DELTA_FRAME_TYPE",
    "DELTA_MAX_INPUT",
    "FMT_SSE",
    "FMT_TCP",
    "FMT_WS_BINARY",
    "FMT_WS_BINARY_DEFLATE",
    "FMT_WS_JSON",
    "FMT_WS_JSON_DEFLATE",
    "HEADER_SIZE",
    "MSG_FRAME_TYPE",
    "N_FORMATS",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_COMPRESSED",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Flusher",
    "FrameDecoder",
    "HistoryRing",
    "OutRing",
    "SubscriberSet",
    "WSParser",
    "crc32",
    "encode_delta",
    "encode_frame",
    "encode_msg",
    "encode_msg_one",
    "fossil_apply",
    "fossil_delta",
    "json_string",
    "utf8_valid",
    "ws_close_payload",
    "ws_encode",
    "ws_inflate",
    "ws_parse_close",
]
