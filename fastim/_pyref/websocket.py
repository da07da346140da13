"""RFC 6455 framing, the readable way: encoder, close payloads and a streaming parser.

Reference twin of the WebSocket part of ``fastim._core``. The parser works byte-range by
byte-range as data arrives (unmasking with a running mask phase), so that invalid UTF-8
fails as soon as the offending byte is received, even in the middle of a frame.

permessage-deflate (RFC 7692), framing half: with ``deflate`` set, RSV1 on the first
frame of a data message marks it compressed; the parser delivers it still compressed
with its opcode or-ed with :data:`OP_COMPRESSED`, and :func:`ws_inflate` turns it back
into the message (checking text only then).
"""

from __future__ import annotations

import codecs
import struct
import zlib

from typing_extensions import Buffer

from ..errors import WebSocketError

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
#: or-ed into the opcode of a data message whose first frame had RSV1 (compressed)
OP_COMPRESSED = 0x40

_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
_MAX_CONTROL = 125

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009

#: appended to a compressed message before inflating it (RFC 7692 §7.2.2)
_DEFLATE_TAIL = b"\x00\x00\xff\xff"

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def utf8_valid(data: Buffer) -> bool:
    """Whether ``data`` is well-formed UTF-8 (RFC 3629: no surrogates, no overlongs)."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _apply_mask(data: Buffer, key: bytes, phase: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``key``, starting at key byte ``phase``."""
    raw = bytes(data)
    if not raw:
        return b""
    rotated = key[phase:] + key[:phase]
    stream = (rotated * (len(raw) // 4 + 1))[: len(raw)]
    mixed = int.from_bytes(raw, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(raw), "big")


def ws_encode(
    opcode: int,
    payload: Buffer,
    fin: bool = True,
    mask: bytes | None = None,
    rsv1: bool = False,
) -> bytes:
    """One WebSocket frame. Server frames are unmasked (mask=None); a client passes 4 mask bytes.

    ``rsv1`` marks the first frame of a compressed message (permessage-deflate).
    """
    if not 0 <= opcode <= 0xF:
        raise ValueError(f"opcode must be 0..15, got {opcode}")
    if mask is not None and len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    body = bytes(payload)
    n = len(body)
    byte0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((byte0, mask_bit | n))
    elif n < 1 << 16:
        head = bytes((byte0, mask_bit | 126)) + _U16.pack(n)
    else:
        head = bytes((byte0, mask_bit | 127)) + _U64.pack(n)
    if mask is None:
        return head + body
    return head + bytes(mask) + _apply_mask(body, bytes(mask))


def ws_close_payload(code: int, reason: str = "") -> bytes:
    """Payload of a close frame: u16 code + UTF-8 reason, cut to fit 125 bytes.

    The cut never splits a UTF-8 sequence: a partial trailing character is dropped.
    """
    cut = reason.encode("utf-8")[: _MAX_CONTROL - 2]
    cut = cut.decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(code) + cut


def _close_code_allowed(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def ws_parse_close(payload: Buffer) -> tuple[int, str]:
    """(code, reason) of a received close payload; (1005, "") when empty."""
    raw = bytes(payload)
    if not raw:
        return 1005, ""
    if len(raw) == 1:
        raise WebSocketError("close payload of 1 byte", PROTOCOL_ERROR)
    (code,) = _U16.unpack_from(raw)
    if not _close_code_allowed(code):
        raise WebSocketError(f"invalid close code {code}", PROTOCOL_ERROR)
    try:
        reason = raw[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8", INVALID_DATA) from None
    return code, reason


def ws_inflate(payload: Buffer, max_size: int, text: bool = False) -> bytes:
    """The message a permessage-deflate payload holds (RFC 7692 §7.2.2).

    A fresh decompressor per message (the peer takes no context over). Raises
    WebSocketError 1009 if it inflates past ``max_size`` (output stops one byte past
    it, so a zip bomb costs no more memory than that), 1007 for data that is not
    DEFLATE, and 1007 for text that is not UTF-8.
    """
    if max_size < 0:
        raise ValueError("max_size must be >= 0")
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(bytes(payload), max_size + 1)
        if len(out) <= max_size:
            out += d.decompress(_DEFLATE_TAIL, max_size + 1 - len(out))
    except zlib.error as e:
        raise WebSocketError(f"invalid permessage-deflate data ({e})", INVALID_DATA) from None
    if len(out) > max_size:
        raise WebSocketError(
            f"message inflates to more than the maximum of {max_size} bytes", MESSAGE_TOO_BIG
        )
    # Bytes after a final (BFINAL=1) block are ignored, as an inflater stops there: RFC
    # 7692 §7.2.3.4 itself ends such a message with a 0x00 that only the tail completes.
    if text and not utf8_valid(out):
        raise WebSocketError("invalid UTF-8 in text message", INVALID_DATA)
    return out


class _Utf8Checker:
    """Incremental UTF-8 validation that fails on the first byte that makes it impossible.

    CPython's incremental decoder already rejects every bad prefix as soon as it is seen,
    except one: ED A0..BF (the start of an encoded surrogate) is only rejected once the
    third byte arrives. We check that case ourselves on the decoder's pending bytes.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes, final: bool = False) -> bool:
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError:
            return False
        pending, _ = self._decoder.getstate()
        return not (len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0)


class WSParser:
    """Streaming RFC 6455 frame parser (server side by default; see ``fastim._core``)."""

    def __init__(
        self, max_message: int = 1 << 20, client: bool = False, deflate: bool = False
    ) -> None:
        if max_message < 0:
            raise ValueError("max_message must be >= 0")
        self.max_message = max_message
        self._client = client
        #: permessage-deflate was negotiated: RSV1 may mark a data message compressed
        self.deflate = deflate
        self._closed = False
        self._buf = bytearray()  # received bytes not yet consumed
        # The frame being received, once its first two header bytes are checked.
        self._fin = False
        self._rsv1 = False
        self._opcode = -1  # -1: waiting for a frame header
        self._masked = False
        self._len7 = 0  # the 7-bit length field: 126 / 127 say a longer one follows
        self._length = 0
        self._key: bytes | None = None  # masking key, once the header is read (b"": unmasked)
        self._received = 0  # payload bytes of this frame consumed so far
        self._control = bytearray()  # payload of a control frame
        # The data message being reassembled (possibly across fragments).
        self._msg_opcode = 0  # OP_TEXT / OP_BINARY while a message is in progress
        self._msg_compressed = False  # RSV1 was set on its first frame
        self._msg = bytearray()
        self._utf8 = _Utf8Checker()

    @property
    def closed(self) -> bool:
        """A close frame was received (or an error raised)."""
        return self._closed

    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        if self._closed:
            return []
        self._buf += data
        events: list[tuple[int, bytes]] = []
        try:
            while not self._closed and self._step(events):
                pass
        except WebSocketError as e:
            self._closed = True
            e.events = events  # what completed before the violation is still handled
            raise
        if self._closed:
            self._buf = bytearray()
        return events

    # ------------------------------------------------------------------ steps

    def _step(self, events: list[tuple[int, bytes]]) -> bool:
        """Consume what the buffer allows of the current frame; False when input is needed."""
        if self._opcode < 0:
            return self._read_first_two_bytes()
        if self._key is None:
            return self._read_rest_of_header(events)
        return self._read_payload(events)

    def _read_first_two_bytes(self) -> bool:
        """Byte 0 and 1 alone decide most violations: fail before reading more."""
        if len(self._buf) < 2:
            return False
        b0, b1 = self._buf[0], self._buf[1]
        del self._buf[:2]
        fin, opcode, masked, len7 = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        rsv = b0 & 0x70
        if rsv and (rsv != 0x40 or not self.deflate):
            raise WebSocketError("reserved bits set", PROTOCOL_ERROR)
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise WebSocketError(f"unknown opcode {opcode:#x}", PROTOCOL_ERROR)
        # RFC 7692 §6.1: RSV1 belongs to the first frame of a data message only
        if rsv and opcode in _CONTROL_OPS:
            raise WebSocketError("RSV1 on a control frame", PROTOCOL_ERROR)
        if rsv and opcode == OP_CONT:
            raise WebSocketError("RSV1 on a continuation frame", PROTOCOL_ERROR)
        if opcode in _CONTROL_OPS:
            if not fin:
                raise WebSocketError("fragmented control frame", PROTOCOL_ERROR)
            if len7 > _MAX_CONTROL:
                raise WebSocketError("control frame payload over 125 bytes", PROTOCOL_ERROR)
        if masked == self._client:
            side = "server" if self._client else "client"
            raise WebSocketError(f"{side} frame {'' if masked else 'not '}masked", PROTOCOL_ERROR)
        self._fin, self._opcode, self._masked, self._len7 = fin, opcode, masked, len7
        self._rsv1 = bool(rsv)
        return True

    def _read_rest_of_header(self, events: list[tuple[int, bytes]]) -> bool:
        """Extended length and masking key; then the checks that need the whole header."""
        len_size = {126: 2, 127: 8}.get(self._len7, 0)
        key_size = 4 if self._masked else 0
        if len(self._buf) < len_size + key_size:
            return False
        length = int.from_bytes(self._buf[:len_size], "big") if len_size else self._len7
        self._key = bytes(self._buf[len_size : len_size + key_size])
        del self._buf[: len_size + key_size]
        self._length = length
        if length >> 63:
            raise WebSocketError("64-bit payload length with the top bit set", PROTOCOL_ERROR)
        if self._opcode == OP_CONT and not self._msg_opcode:
            raise WebSocketError("continuation frame with no message started", PROTOCOL_ERROR)
        if self._opcode in (OP_TEXT, OP_BINARY):
            if self._msg_opcode:
                raise WebSocketError("new message while a fragmented one is open", PROTOCOL_ERROR)
            self._msg_opcode = self._opcode
            self._msg_compressed = self._rsv1
            self._utf8 = _Utf8Checker()
        if self._opcode in _DATA_OPS and len(self._msg) + length > self.max_message:
            raise WebSocketError(
                f"message over the limit of {self.max_message} bytes", MESSAGE_TOO_BIG
            )
        if length == 0:
            self._end_frame(events)
        return True

    def _read_payload(self, events: list[tuple[int, bytes]]) -> bool:
        take = min(self._length - self._received, len(self._buf))
        if take == 0:
            return False
        chunk = bytes(self._buf[:take])
        del self._buf[:take]
        if self._key:
            chunk = _apply_mask(chunk, self._key, self._received % 4)
        self._received += take
        if self._opcode in _CONTROL_OPS:
            self._control += chunk
        else:
            if self._checks_utf8() and not self._utf8.feed(chunk):
                raise WebSocketError("text message is not valid UTF-8", INVALID_DATA)
            self._msg += chunk
        if self._received == self._length:
            self._end_frame(events)
        return True

    def _end_frame(self, events: list[tuple[int, bytes]]) -> None:
        """The whole payload of the current frame has arrived."""
        opcode, fin = self._opcode, self._fin
        self._opcode, self._key, self._received = -1, None, 0
        if opcode in _CONTROL_OPS:
            payload = bytes(self._control)
            self._control = bytearray()
            if opcode == OP_CLOSE:
                ws_parse_close(payload)
                self._closed = True
            events.append((opcode, payload))
            return
        if not fin:
            return
        if self._checks_utf8() and not self._utf8.feed(b"", final=True):
            raise WebSocketError("text message ends inside a UTF-8 sequence", INVALID_DATA)
        opcode = self._msg_opcode | (OP_COMPRESSED if self._msg_compressed else 0)
        events.append((opcode, bytes(self._msg)))
        self._msg_opcode, self._msg, self._msg_compressed = 0, bytearray(), False

    def _checks_utf8(self) -> bool:
        """Text is checked as it arrives, unless compressed: then only after inflating."""
        return self._msg_opcode == OP_TEXT and not self._msg_compressed
