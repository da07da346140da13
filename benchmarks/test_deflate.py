"""permessage-deflate kernels: what compressing once per message costs, by message size.

The node compresses each message once for all its deflate subscribers (hub.Deflater:
one shared compressobj, Z_FULL_FLUSH per message), so these costs are per *message*,
not per delivery: divide by the subscriber count for the share of one delivery. For
comparison: the plain frame (ws_encode), a fresh compressobj per message (what sharing
one avoids), and inflating on the receiving side (ws_inflate, fresh state per message).

    ./dev bench -k deflate
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from benchmarks.deflate_e2e import chat_message
from fastim import _core
from fastim.hub import Deflater

SIZES = [256, 1024, 4096, 16384, 65536]


def json_message(size: int) -> bytes:
    """A JSON text of about ``size`` bytes made of chat messages (as the node sends them)."""
    docs: list[Any] = []
    text = b""
    i = 0
    while len(text) < size:
        docs.append(chat_message(i))
        i += 1
        text = json.dumps({"op": "msg", "ch": "bench", "off": 1, "data": docs}).encode()
    return text[:size]


@pytest.mark.parametrize("size", SIZES)
def test_deflate_frame_once(benchmark: Any, size: int) -> None:
    """Compress one message and frame it (RSV1): the node's cost per message."""
    msg = json_message(size)
    d = Deflater(level=6, min_size=0)
    frame = benchmark(d.frame, _core.OP_TEXT, msg)
    assert frame[0] == 0xC1
    benchmark.extra_info["bytes_in"] = len(msg)
    benchmark.extra_info["bytes_out"] = len(frame)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_deflate_frame_1k_by_level(benchmark: Any, level: int) -> None:
    msg = json_message(1024)
    d = Deflater(level=level, min_size=0)
    frame = benchmark(d.frame, _core.OP_TEXT, msg)
    benchmark.extra_info["bytes_out"] = len(frame)


@pytest.mark.parametrize("size", [1024, 16384])
def test_plain_frame(benchmark: Any, size: int) -> None:
    """The uncompressed frame, built anyway for subscribers without compression."""
    msg = json_message(size)
    assert len(benchmark(_core.ws_encode, _core.OP_TEXT, msg)) > size


@pytest.mark.parametrize("size", [1024, 16384])
def test_fresh_compressor_per_message(benchmark: Any, size: int) -> None:
    """What a compressobj per message would cost (allocating and clearing ~260 KiB)."""
    msg = json_message(size)

    def run() -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)

    assert benchmark(run).endswith(b"\x00\x00\xff\xff")


@pytest.mark.parametrize("size", [1024, 16384])
def test_inflate(benchmark: Any, size: int) -> None:
    """The receiving side: a fresh decompressor per message, UTF-8 checked after."""
    msg = json_message(size)
    payload = bytes(Deflater(6, 0).compress(msg))
    assert benchmark(_core.ws_inflate, payload, 1 << 20, True) == msg
