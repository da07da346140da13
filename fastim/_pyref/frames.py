"""fastim framing, the readable way: a 9-byte header (u32 length, u8 type, u32 CRC32).

Reference twin of the framing part of ``fastim._core``.
"""

from __future__ import annotations

import struct
import zlib

from typing_extensions import Buffer

from ..errors import ChecksumMismatch, FrameTooLarge, ProtocolError, UnknownFrameType

HEADER_SIZE = 9
DEFAULT_MAX_FRAME = 1 << 20

_HEADER = struct.Struct("!IBI")  # length, type, CRC32 of the payload


def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 (IEEE 802.3, as zlib.crc32), continuing from ``value``."""
    return zlib.crc32(data, value)


def encode_frame(ftype: int, payload: Buffer) -> bytes:
    """Header + payload of one fastim frame. Raises ValueError if ftype is not 0..255."""
    if not 0 <= ftype <= 255:
        raise ValueError(f"frame type must be 0..255, got {ftype}")
    body = bytes(payload)
    if len(body) > 0xFFFFFFFF:
        raise ValueError("payload longer than 2**32 - 1 bytes")
    return _HEADER.pack(len(body), ftype, zlib.crc32(body)) + body


class FrameDecoder:
    """Streaming decoder: feed chunks of any size, get whole ``(type, payload)`` frames.

    Checks, as soon as the bytes that decide them arrive: length > ``max_frame``
    (FrameTooLarge), then type not allowed (UnknownFrameType), both on the header alone;
    then, once the payload is complete, its CRC32 (ChecksumMismatch). After an error,
    every later feed() raises an error of the same class.
    """

    def __init__(
        self, max_frame: int = DEFAULT_MAX_FRAME, allowed_types: bytes | None = None
    ) -> None:
        if max_frame < 0:
            raise ValueError("max_frame must be >= 0")
        if allowed_types is not None and len(allowed_types) != 256:
            raise ValueError("allowed_types must be a 256-byte table")
        self.max_frame = max_frame
        self._allowed = allowed_types
        self._buf = bytearray()  # header and payload bytes of the frame in progress
        self._header: tuple[int, int, int] | None = None  # (length, type, crc), once checked
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (its header included)."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        if self._error is not None:
            raise type(self._error)(self._error.reason)
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        try:
            while self._step(frames):
                pass
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            exc.frames = frames  # completed before the error: the caller handles them first
            raise
        return frames

    def _step(self, frames: list[tuple[int, bytes]]) -> bool:
        """Make progress on the buffered bytes; False when more input is needed."""
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return False
            length, ftype, crc = _HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise FrameTooLarge(f"frame of {length} bytes, limit {self.max_frame}")
            if self._allowed is not None and not self._allowed[ftype]:
                raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
            self._header = (length, ftype, crc)
        length, ftype, crc = self._header
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return False
        payload = bytes(self._buf[HEADER_SIZE:end])
        if zlib.crc32(payload) != crc:
            raise ChecksumMismatch(f"CRC32 mismatch in frame of type 0x{ftype:02x}")
        del self._buf[:end]
        self._header = None
        frames.append((ftype, payload))
        return True
