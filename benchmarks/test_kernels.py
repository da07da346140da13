"""Kernel benchmarks: names state the scale. Compiled vs reference in one table."""

from __future__ import annotations

import os
import types
from typing import Any

import pytest

from fastim import _core
from fastim.config import Config
from fastim.hub import Hub


class Sink:
    """Stands in for a transport: counts the bytes written to it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)


def _frames(impl: types.ModuleType, count: int, size: int) -> bytes:
    payload = os.urandom(size)
    return b"".join(impl.encode_frame(0x23, payload) for _ in range(count))


@pytest.mark.parametrize("size", [64, 4096])
def test_encode_frame_1(benchmark: Any, impl: types.ModuleType, size: int) -> None:
    payload = os.urandom(size)
    out = benchmark(impl.encode_frame, 0x23, payload)
    assert len(out) == 9 + size


def test_decode_1k_frames_64b_in_one_chunk(benchmark: Any, impl: types.ModuleType) -> None:
    data = _frames(impl, 1000, 64)

    def run() -> int:
        return len(impl.FrameDecoder().feed(data))

    assert benchmark(run) == 1000


def test_decode_1_frame_1mib_in_4k_chunks(benchmark: Any, impl: types.ModuleType) -> None:
    data = _frames(impl, 1, 1 << 20)
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]

    def run() -> int:
        d = impl.FrameDecoder(2 << 20)
        n = 0
        for c in chunks:
            n += len(d.feed(c))
        return n

    assert benchmark(run) == 1


def test_ws_parse_1k_masked_text_128b(benchmark: Any, impl: types.ModuleType) -> None:
    msg = b'{"op":"pub","ch":"news","data":' + b'"' + b"x" * 92 + b'"}'
    data = b"".join(impl.ws_encode(impl.OP_TEXT, msg, mask=os.urandom(4)) for _ in range(1000))

    def run() -> int:
        return len(impl.WSParser().feed(data))

    assert benchmark(run) == 1000


def test_ws_parse_1mib_masked_binary(benchmark: Any, impl: types.ModuleType) -> None:
    data = impl.ws_encode(impl.OP_BINARY, os.urandom(1 << 20), mask=os.urandom(4))

    def run() -> int:
        return len(impl.WSParser(2 << 20).feed(data))

    assert benchmark(run) == 1


@pytest.mark.parametrize("subscribers", [1, 1000, 10_000])
def test_fanout_64b_to_subscribers_and_flush(
    benchmark: Any, impl: types.ModuleType, subscribers: int
) -> None:
    """One 64-byte message to N in-process sinks, then one flush (one write per sink)."""
    flusher = impl.Flusher(None)
    sinks = [Sink() for _ in range(subscribers)]
    subs = impl.SubscriberSet()
    for s in sinks:
        subs.add(impl.OutRing(flusher, s, impl.FMT_TCP, 1 << 20))
    frame = impl.encode_frame(0x23, os.urandom(55))
    frames = (frame, None, None)

    def run() -> int:
        n = subs.fanout(frames)
        flusher.flush()
        return int(n)

    assert benchmark(run) == subscribers
    assert all(s.n > 0 for s in sinks)


def test_fanout_10_msgs_coalesced_to_10k_subscribers(
    benchmark: Any, impl: types.ModuleType
) -> None:
    """Ten messages in one tick to 10k sinks: 100k appends, 10k writes."""
    flusher = impl.Flusher(None)
    sinks = [Sink() for _ in range(10_000)]
    subs = impl.SubscriberSet()
    for s in sinks:
        subs.add(impl.OutRing(flusher, s, impl.FMT_TCP, 1 << 20))
    frames = (impl.encode_frame(0x23, os.urandom(55)), None, None)

    def run() -> int:
        for _ in range(10):
            subs.fanout(frames)
        return int(flusher.flush())

    assert benchmark(run) == 10_000


def test_utf8_validate_64kib(benchmark: Any, impl: types.ModuleType) -> None:
    text = ("héllo wörld ✓ " * 5000).encode()[: 1 << 16]
    text = text[: len(text.decode("utf-8", "ignore").encode())]
    assert benchmark(impl.utf8_valid, text) is True


@pytest.mark.parametrize("pool", ["pooled", "malloc"])
def test_fanout_10_msgs_to_10k_buffer_pool(benchmark: Any, pool: str) -> None:
    """As above, compiled only: ring buffers from the flusher's pool vs malloc/free each tick."""
    import fastim._core as core

    flusher = core.Flusher(None)
    flusher.pool_limit = 32 << 20 if pool == "pooled" else 0
    sinks = [Sink() for _ in range(10_000)]
    subs = core.SubscriberSet()
    for s in sinks:
        subs.add(core.OutRing(flusher, s, core.FMT_TCP, 1 << 20))
    frames = (core.encode_frame(0x23, os.urandom(55)),) + (None,) * (core.N_FORMATS - 1)

    def run() -> int:
        for _ in range(10):
            subs.fanout(frames)
        return int(flusher.flush())

    assert benchmark(run) == 10_000


# Formats in use by a channel's subscribers (counts per FMT_*): TCP only; the three
# plain formats; all five (the deflate ones get the plain frames: no deflater, so the
# figure is the encoding's, not zlib's)
MIXES = {"tcp": [1, 0, 0, 0, 0], "3-formats": [1, 1, 1, 0, 0], "5-formats": [1, 1, 1, 1, 1]}
ENCODE_DATA = {64: b'{"text":"' + b"x" * 53 + b'"}', 1024: b'{"text":"' + b"y" * 1013 + b'"}'}


@pytest.mark.parametrize("size", [64, 1024])
@pytest.mark.parametrize("mix", list(MIXES))
def test_channel_encode(benchmark: Any, mix: str, size: int) -> None:
    """Channel.encode of one message, as the hub calls it per publish (P9: a compiled
    pass instead of pack_msg + encode_frame + ws_encode + join in Python). Runs on any
    commit: before P9 it measures the Python path."""
    ch = Hub(Config()).channel("room:lobby")
    assert ch is not None
    for fmt, n in enumerate(MIXES[mix]):
        for _ in range(n):
            ch.subs.add(_core.OutRing(None, Sink(), fmt))
    data = ENCODE_DATA[size]
    frames = benchmark(ch.encode, 12345, data, None)
    assert frames[0] is not None and len(frames[0]) == 9 + 9 + 10 + size


@pytest.mark.parametrize("mix", list(MIXES))
def test_encode_msg_64b(benchmark: Any, impl: types.ModuleType, mix: str) -> None:
    """encode_msg, compiled vs the reference (pure Python, zlib.crc32 and struct)."""
    subs = impl.SubscriberSet()
    for fmt, n in enumerate(MIXES[mix]):
        for _ in range(n):
            subs.add(impl.OutRing(None, Sink(), fmt))
    head = b'{"op":"msg","ch":"room:lobby","off":'
    frames = benchmark(impl.encode_msg, subs, 12345, b"room:lobby", head, ENCODE_DATA[64])
    assert frames[0] is not None


def _doc_versions() -> tuple[bytes, bytes]:
    """Two versions of a ~10 KB JSON document, one row of 100 changed (~1%)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.delta_e2e import versions

    a, b = versions(2)
    return a, b


def test_fossil_delta_10kb_json_1pct(benchmark: Any, impl: types.ModuleType) -> None:
    """One delta per message of a delta namespace (docs/delta.md): what the hub pays."""
    a, b = _doc_versions()
    out = benchmark(impl.fossil_delta, a, b, True)
    assert len(out) < len(b) // 20


def test_fossil_apply_10kb_json_1pct(benchmark: Any, impl: types.ModuleType) -> None:
    """What a client pays per delta message."""
    a, b = _doc_versions()
    d = _core.fossil_delta(a, b, True)
    assert benchmark(impl.fossil_apply, a, d) == b


def test_fanout_delta_to_1k_subscribers(benchmark: Any, impl: types.ModuleType) -> None:
    """The fan-out with alt members (half take the delta frames, half the full ones)."""
    subs = impl.SubscriberSet()
    rings = [impl.OutRing(impl.Flusher(), Sink(), fmt=impl.FMT_TCP) for _ in range(1000)]
    for i, r in enumerate(rings):
        subs.add(r)
        if i % 2:
            subs.set_alt(r)
    full, delta = (b"x" * 10_000,), (b"d" * 100,)

    def run() -> int:
        n = subs.fanout(full, delta)
        for r in rings:
            r.take()
        return int(n)

    assert benchmark(run) == 1000
