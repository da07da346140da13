"""permessage-deflate (RFC 7692) for the fan-out: one compressor for the node."""

from __future__ import annotations

import zlib

from .. import _core


class Deflater:
    """The node's one permessage-deflate compressor (RFC 7692), shared by every channel.

    The WebSocket transport accepts compression only with ``server_no_context_takeover``:
    each message is compressed as if it were the first, so the compressed frame does not
    depend on what a connection received before, and one frame serves every subscriber
    of a message. ``flush(Z_FULL_FLUSH)`` ends a message *and* resets the compressor's
    history, so one reused compressobj gives that independence: the node holds one
    deflate state (~260 KiB) for its life, no connection holds any, and nothing is
    allocated per message (the reset clears the hash table, as a fresh compressobj
    would: about the same CPU, benchmarks/test_deflate.py). Created on first use.
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

    def compress(self, payload: bytes | memoryview) -> memoryview:
        """``payload`` compressed on its own, without the trailing ``00 00 ff ff`` (§7.2.1)."""
        z = self._z
        if z is None:
            z = self._z = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        out = z.compress(payload) + z.flush(zlib.Z_FULL_FLUSH)
        self.messages += 1
        self.bytes_in += len(payload)
        self.bytes_out += len(out) - 4
        return memoryview(out)[:-4]

    def frame(self, opcode: int, payload: bytes | memoryview, plain: bytes | None = None) -> bytes:
        """The message as one frame for a deflate connection.

        Compressed with RSV1 set if it is at least ``min_size`` bytes and compressing
        makes it smaller; otherwise the plain frame (``plain`` if already built).
        Called by :func:`fastim._core.encode_msg` (``payload`` may be a view into
        ``plain``).
        """
        if len(payload) >= self.min_size:
            body = self.compress(payload)
            if len(body) < len(payload):
                return _core.ws_encode(opcode, body, rsv1=True)
        return plain if plain is not None else _core.ws_encode(opcode, payload)
