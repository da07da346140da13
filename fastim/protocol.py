"""The fastim wire protocol: frame types, payload layouts, error and close codes.

``docs/protocol.md`` is the specification; this module is its executable form and
``tests/vectors/frames.json`` holds byte-exact vectors that both are checked against.

Framing (the 9-byte header, CRC32) lives in the compiled core (``fastim._core``);
this module packs and unpacks the *payloads*, which is control-plane work done once
per command, or once per published message (never per subscriber).
"""

from __future__ import annotations

import struct
import unicodedata
from enum import IntEnum
from typing import NamedTuple

from .codes import CloseCode as CloseCode  # re-exported: the wire's codes live here too
from .codes import ErrorCode as ErrorCode
from .errors import BadRequest, ProtocolError

#: Protocol versions this build speaks, oldest first.
SUPPORTED_VERSIONS = (1,)
PROTOCOL_VERSION = SUPPORTED_VERSIONS[-1]

HEADER_SIZE = 9

#: RFC 6455 §1.3: what the server appends to Sec-WebSocket-Key to prove it read it
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CHANNEL_BYTES = 255


class FrameType(IntEnum):
    """Frame types of protocol version 1 (the ``u8 type`` of the header)."""

    HELLO = 0x01  # c→s  u8 min_version, u8 max_version, JSON options
    WELCOME = 0x02  # s→c  u8 version, JSON info
    PING = 0x03  # both opaque payload (≤ 64 bytes), answered by PONG with the same bytes
    PONG = 0x04  # both
    SUB = 0x10  # c→s  u32 id, u8 len, channel
    UNSUB = 0x11  # c→s  u32 id, u8 len, channel
    PUB = 0x12  # c→s  u32 id, u8 len, channel, data (JSON)
    CMD = 0x13  # c→s  a JSON command (the WebSocket-text grammar: sub with since, send, ...)
    SUBSCRIBED = 0x20  # s→c  u32 id, u64 offset, u8 len, channel
    UNSUBSCRIBED = 0x21  # s→c  u32 id, u8 len, channel
    PUBACK = 0x22  # s→c  u32 id, u64 offset, u8 len, channel
    MSG = 0x23  # s→c  u64 offset, u8 len, channel, data (JSON)
    EVENT = 0x24  # s→c  a JSON reply or event (subscribed with epoch, dm, sent, presence...)
    DELTA = 0x25  # s→c  the MSG layout; data is a Fossil delta against the previous message
    #               (only to a subscriber that asked for deltas: docs/delta.md)
    ERROR = 0x2F  # s→c  u32 id, u16 code, reason (UTF-8)
    GOAWAY = 0x30  # s→c  u16 close code, reason (UTF-8); the server closes after it


#: Frame types a server accepts from a client; anything else is UNKNOWN_OP.
CLIENT_FRAME_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.PING,
        FrameType.PONG,
        FrameType.SUB,
        FrameType.UNSUB,
        FrameType.PUB,
        FrameType.CMD,
    }
)
#: Frame types a client accepts from a server.
SERVER_FRAME_TYPES = frozenset(
    {
        FrameType.WELCOME,
        FrameType.PING,
        FrameType.PONG,
        FrameType.SUBSCRIBED,
        FrameType.UNSUBSCRIBED,
        FrameType.PUBACK,
        FrameType.MSG,
        FrameType.EVENT,
        FrameType.DELTA,
        FrameType.ERROR,
        FrameType.GOAWAY,
    }
)


def type_mask(types: frozenset[FrameType]) -> bytes:
    """A 256-byte table, 1 where a frame type is allowed (what the decoder takes)."""
    table = bytearray(256)
    for t in types:
        table[t] = 1
    return bytes(table)


SHUTDOWN_REASON = "server shutting down, reconnect"


# --------------------------------------------------------------------------- payloads

_U32 = struct.Struct("!I")
_ID_CH = struct.Struct("!IB")
_ID_OFF_CH = struct.Struct("!IQB")
_OFF_CH = struct.Struct("!QB")
_ID_CODE = struct.Struct("!IH")
_CODE = struct.Struct("!H")


class Request(NamedTuple):
    """A decoded client command, whatever the wire format it came in."""

    op: str  # "sub" | "unsub" | "pub" | "ping"
    id: object  # echoed in the reply; None when absent (JSON) or 0 (binary)
    channel: str
    data: bytes  # the published JSON document, raw (pub only)


def _bad(msg: str) -> Exception:

    return BadRequest(msg)


def _channel(buf: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(buf):
        raise _bad("payload too short for channel length")
    n = buf[pos]
    end = pos + 1 + n
    if end > len(buf):
        raise _bad("channel length exceeds payload")
    try:
        ch = buf[pos + 1 : end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("channel is not valid UTF-8", ErrorCode.INVALID_UTF8) from None
    return ch, end


def _ch_bytes(channel: str) -> bytes:
    b = channel.encode("utf-8")
    if not 0 < len(b) <= MAX_CHANNEL_BYTES:
        raise ValueError(f"channel must be 1..{MAX_CHANNEL_BYTES} bytes of UTF-8")
    return b


def pack_sub(ftype: int, req_id: int, channel: str, data: bytes = b"") -> bytes:
    """Payload of SUB, UNSUB or PUB."""
    ch = _ch_bytes(channel)
    return _ID_CH.pack(req_id, len(ch)) + ch + data


def unpack_request(ftype: int, payload: bytes) -> Request:
    """Decode a SUB, UNSUB or PUB payload. Raises BadRequest naming what is wrong."""
    if len(payload) < 5:
        raise _bad(f"{FrameType(ftype).name} payload too short ({len(payload)} bytes)")
    (req_id,) = _U32.unpack_from(payload, 0)
    ch, end = _channel(payload, 4)
    if ftype == FrameType.PUB:
        return Request("pub", req_id, ch, payload[end:])
    if end != len(payload):
        raise _bad(f"{FrameType(ftype).name} payload has {len(payload) - end} trailing bytes")
    return Request("sub" if ftype == FrameType.SUB else "unsub", req_id, ch, b"")


def pack_puback(req_id: int, offset: int, channel: bytes) -> bytes:
    return _ID_OFF_CH.pack(req_id, offset, len(channel)) + channel


def pack_subscribed(
    req_id: int, offset: int, channel: bytes, epoch: str = "", recovered: bool = False
) -> bytes:
    """SUBSCRIBED: id, offset, channel, then ``u8 len, epoch, u8 flags`` (bit 0: recovered)."""
    e = epoch.encode("ascii")
    return (
        _ID_OFF_CH.pack(req_id, offset, len(channel))
        + channel
        + bytes((len(e),))
        + e
        + bytes((1 if recovered else 0,))
    )


def unpack_subscribed(payload: bytes) -> tuple[int, int, str, str, bool]:
    """SUBSCRIBED → (id, offset, channel, epoch, recovered); epoch "" from old servers."""
    req_id, off, _ = _ID_OFF_CH.unpack_from(payload, 0)
    ch, end = _channel(payload, 12)
    if end >= len(payload):
        return req_id, off, ch, "", False
    n = payload[end]
    epoch = payload[end + 1 : end + 1 + n].decode("ascii", "replace")
    flags = payload[end + 1 + n] if end + 1 + n < len(payload) else 0
    return req_id, off, ch, epoch, bool(flags & 1)


def pack_unsubscribed(req_id: int, channel: bytes) -> bytes:
    return _ID_CH.pack(req_id, len(channel)) + channel


def pack_msg(offset: int, channel: bytes, data: bytes) -> bytes:
    return _OFF_CH.pack(offset, len(channel)) + channel + data


def unpack_msg(payload: bytes) -> tuple[int, str, bytes]:
    off, _ = _OFF_CH.unpack_from(payload, 0)
    ch, end = _channel(payload, 8)
    return off, ch, payload[end:]


def unpack_ack(payload: bytes) -> tuple[int, int, str]:
    """SUBSCRIBED / PUBACK → (id, offset, channel)."""
    req_id, off, _ = _ID_OFF_CH.unpack_from(payload, 0)
    ch, _end = _channel(payload, 12)
    return req_id, off, ch


def unpack_unsubscribed(payload: bytes) -> tuple[int, str]:
    (req_id,) = _U32.unpack_from(payload, 0)
    ch, _end = _channel(payload, 4)
    return req_id, ch


def pack_error(req_id: int, code: int, reason: str) -> bytes:
    return _ID_CODE.pack(req_id, code) + reason.encode("utf-8")[:1024]


def unpack_error(payload: bytes) -> tuple[int, int, str]:
    req_id, code = _ID_CODE.unpack_from(payload, 0)
    return req_id, code, payload[6:].decode("utf-8", "replace")


def pack_goaway(code: int, reason: str) -> bytes:
    return _CODE.pack(code) + reason.encode("utf-8")[:123]


def unpack_goaway(payload: bytes) -> tuple[int, str]:
    (code,) = _CODE.unpack_from(payload, 0)
    return code, payload[2:].decode("utf-8", "replace")


def pack_hello(min_version: int, max_version: int, options: bytes = b"{}") -> bytes:
    return bytes((min_version, max_version)) + options


def negotiate(payload: bytes) -> tuple[int, bytes]:
    """HELLO payload → (chosen version, raw JSON options). Raises ProtocolError."""

    if len(payload) < 2:
        raise _bad("HELLO payload too short: need u8 min_version, u8 max_version")
    lo, hi = payload[0], payload[1]
    common = [v for v in SUPPORTED_VERSIONS if lo <= v <= hi]
    if not common:
        raise ProtocolError(
            f"no common protocol version: client offers {lo}..{hi}, server speaks "
            f"{SUPPORTED_VERSIONS[0]}..{SUPPORTED_VERSIONS[-1]}",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    return max(common), payload[2:] or b"{}"


def validate_channel(channel: object) -> str:
    """Return the channel if it is a valid name, else raise ProtocolError(BAD_CHANNEL).

    Valid: a string of 1..255 UTF-8 bytes with no control characters.
    """

    if not isinstance(channel, str):
        raise _bad(f'field "ch" must be a string, got {type(channel).__name__}')
    n = len(channel.encode("utf-8", "surrogatepass"))
    if n == 0 or n > MAX_CHANNEL_BYTES:
        raise ProtocolError(
            f'field "ch" must be 1..{MAX_CHANNEL_BYTES} bytes, got {n}', ErrorCode.BAD_CHANNEL
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in channel):
        raise ProtocolError('field "ch" contains control characters', ErrorCode.BAD_CHANNEL)
    return channel
