"""fastim framing: crc32, encode_frame and the streaming FrameDecoder, on both impls."""

from __future__ import annotations

import itertools
import random
import struct
import zlib
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastim.errors import ChecksumMismatch, FrameTooLarge, ProtocolError, UnknownFrameType
from fastim.protocol import CLIENT_FRAME_TYPES, ErrorCode, FrameType, type_mask

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(ftype: int, payload: bytes, crc: int | None = None, length: int | None = None) -> bytes:
    """A fastim frame built by hand, optionally with a wrong CRC or length."""
    return (
        struct.pack(
            "!IBI",
            len(payload) if length is None else length,
            ftype,
            zlib.crc32(payload) if crc is None else crc,
        )
        + payload
    )


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------- constants, crc32


def test_constants(impl: ModuleType) -> None:
    assert impl.HEADER_SIZE == 9
    assert impl.DEFAULT_MAX_FRAME == 1 << 20
    assert impl.FrameDecoder().max_frame == 1 << 20


def test_crc32_check_value(impl: ModuleType) -> None:
    assert impl.crc32(b"123456789") == 0xCBF43926
    assert impl.crc32(b"") == 0
    assert impl.crc32(b"hello") == 0x3610A686


def test_crc32_continues_and_takes_buffers(impl: ModuleType) -> None:
    data = bytes(range(256)) * 7
    assert impl.crc32(data[500:], impl.crc32(data[:500])) == zlib.crc32(data)
    assert impl.crc32(bytearray(data)) == zlib.crc32(data)
    assert impl.crc32(memoryview(data)[3:900]) == zlib.crc32(data[3:900])


@given(st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF))
def test_crc32_matches_zlib(impl: ModuleType, data: bytes, start: int) -> None:
    assert impl.crc32(data, start) == zlib.crc32(data, start)


# ---------------------------------------------------------------- encode_frame


def test_encode_frame_vector(impl: ModuleType) -> None:
    expected = b"\x00\x00\x00\x05\x12\x36\x10\xa6\x86hello"
    assert impl.encode_frame(0x12, b"hello") == expected
    assert impl.encode_frame(FrameType.PUB, bytearray(b"hello")) == expected
    assert impl.encode_frame(0x12, memoryview(b"xhello")[1:]) == expected
    assert expected == frame(0x12, b"hello")


def test_encode_frame_empty_and_extreme_types(impl: ModuleType) -> None:
    assert impl.encode_frame(0, b"") == b"\x00" * 9
    assert impl.encode_frame(255, b"") == b"\x00\x00\x00\x00\xff\x00\x00\x00\x00"
    big = bytes(range(256)) * 300
    assert impl.encode_frame(7, big) == frame(7, big)


@pytest.mark.parametrize("ftype", [-1, 256, 1000])
def test_encode_frame_rejects_bad_type(impl: ModuleType, ftype: int) -> None:
    with pytest.raises((ValueError, OverflowError)):
        impl.encode_frame(ftype, b"x")


# ---------------------------------------------------------------- decoding


def test_bad_constructor_arguments(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.FrameDecoder(max_frame=-1)
    for table in (b"", bytes(255), bytes(257)):
        with pytest.raises(ValueError):
            impl.FrameDecoder(allowed_types=table)


def test_decode_one_and_many(impl: ModuleType) -> None:
    dec = impl.FrameDecoder()
    assert dec.feed(frame(0x12, b"hello")) == [(0x12, b"hello")]
    assert dec.buffered == 0
    stream = frame(1, b"a") + frame(2, b"") + frame(3, b"ccc")
    assert dec.feed(stream) == [(1, b"a"), (2, b""), (3, b"ccc")]
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_decode_returns_bytes(impl: ModuleType) -> None:
    dec = impl.FrameDecoder()
    [(ftype, payload)] = dec.feed(bytearray(frame(9, b"xyz")))
    assert type(ftype) is int
    assert type(payload) is bytes


def test_decode_byte_at_a_time(impl: ModuleType) -> None:
    frames = [(t, bytes([t]) * t) for t in range(0, 40, 3)]
    stream = b"".join(frame(t, p) for t, p in frames)
    ends: list[int] = []
    for _t, p in frames:
        ends.append((ends[-1] if ends else 0) + 9 + len(p))
    dec = impl.FrameDecoder()
    seen: list[tuple[int, bytes]] = []
    for i in range(len(stream)):
        seen += dec.feed(stream[i : i + 1])
        # each frame comes out exactly when its last byte arrives
        assert len(seen) == sum(1 for end in ends if end <= i + 1)
        assert dec.buffered == i + 1 - max([0, *[e for e in ends if e <= i + 1]])
    assert seen == frames
    assert dec.buffered == 0


def test_buffered_counts_the_incomplete_frame(impl: ModuleType) -> None:
    dec = impl.FrameDecoder()
    data = frame(1, b"abcdef")
    assert dec.feed(data[:4]) == []
    assert dec.buffered == 4
    assert dec.feed(data[4:12]) == []
    assert dec.buffered == 12
    assert dec.feed(data[12:] + data[:2]) == [(1, b"abcdef")]
    assert dec.buffered == 2


def test_zero_length_payload(impl: ModuleType) -> None:
    data = frame(0x03, b"")
    assert data == b"\x00\x00\x00\x00\x03\x00\x00\x00\x00"
    dec = impl.FrameDecoder()
    assert dec.feed(data[:8]) == []
    assert dec.feed(data[8:]) == [(3, b"")]
    assert impl.FrameDecoder(max_frame=0).feed(data * 3) == [(3, b"")] * 3


def test_max_frame_boundary(impl: ModuleType) -> None:
    dec = impl.FrameDecoder(max_frame=100)
    assert dec.max_frame == 100
    assert dec.feed(frame(1, b"x" * 100)) == [(1, b"x" * 100)]
    with pytest.raises(FrameTooLarge):
        dec.feed(frame(1, b"x" * 101))


def test_too_large_is_raised_on_the_header_alone(impl: ModuleType) -> None:
    dec = impl.FrameDecoder(max_frame=1000)
    header = struct.pack("!IBI", 1001, 1, 0)
    assert dec.feed(header[:8]) == []
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(header[8:])
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert isinstance(info.value, ProtocolError)
    assert info.value.reason


def test_huge_declared_length_fails_at_default_limit(impl: ModuleType) -> None:
    dec = impl.FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack("!IBI", 0xFFFFFFFF, 1, 0))
    with pytest.raises(FrameTooLarge):
        impl.FrameDecoder().feed(struct.pack("!IBI", (1 << 20) + 1, 1, 0))


def test_unknown_type_is_raised_on_the_header_alone(impl: ModuleType) -> None:
    dec = impl.FrameDecoder(allowed_types=type_mask(CLIENT_FRAME_TYPES))
    assert dec.feed(frame(FrameType.SUB, b"\x00\x00\x00\x01\x01a")) == [
        (FrameType.SUB, b"\x00\x00\x00\x01\x01a")
    ]
    header = frame(FrameType.MSG, b"payload")[:9]  # a server-only type, from a client
    with pytest.raises(UnknownFrameType) as info:
        dec.feed(header)
    assert info.value.code == ErrorCode.UNKNOWN_OP


def test_allowed_types_none_allows_all(impl: ModuleType) -> None:
    stream = b"".join(frame(t, b"") for t in range(256))
    assert impl.FrameDecoder(allowed_types=None).feed(stream) == [(t, b"") for t in range(256)]


def test_allowed_types_nonzero_means_allowed(impl: ModuleType) -> None:
    table = bytearray(256)
    table[5] = 0xFF
    table[6] = 2
    dec = impl.FrameDecoder(allowed_types=bytes(table))
    assert dec.feed(frame(5, b"a") + frame(6, b"b")) == [(5, b"a"), (6, b"b")]
    with pytest.raises(UnknownFrameType):
        dec.feed(frame(7, b"c"))


def test_too_large_is_checked_before_type(impl: ModuleType) -> None:
    dec = impl.FrameDecoder(max_frame=10, allowed_types=bytes(256))
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack("!IBI", 11, 0x99, 0))
    dec = impl.FrameDecoder(max_frame=10, allowed_types=bytes(256))
    with pytest.raises(UnknownFrameType):
        dec.feed(struct.pack("!IBI", 10, 0x99, 0))


def test_checksum_checked_once_the_payload_is_complete(impl: ModuleType) -> None:
    good = frame(1, b"payload!")
    bad = frame(1, b"payload!", crc=zlib.crc32(b"payload!") ^ 1)
    dec = impl.FrameDecoder()
    assert dec.feed(good + bad[:-1]) == [(1, b"payload!")]
    with pytest.raises(ChecksumMismatch) as info:
        dec.feed(bad[-1:])
    assert info.value.code == ErrorCode.BAD_CHECKSUM


def test_checksum_of_empty_payload_must_be_zero(impl: ModuleType) -> None:
    with pytest.raises(ChecksumMismatch):
        impl.FrameDecoder().feed(frame(1, b"", crc=1))


@pytest.mark.parametrize(
    ("kwargs", "bad", "exc"),
    [
        ({"max_frame": 4}, frame(1, b"12345"), FrameTooLarge),
        ({"allowed_types": bytes(256)}, frame(1, b"x"), UnknownFrameType),
        ({}, frame(1, b"x", crc=0), ChecksumMismatch),
    ],
)
def test_errors_are_sticky(
    impl: ModuleType, kwargs: dict[str, object], bad: bytes, exc: type[Exception]
) -> None:
    dec = impl.FrameDecoder(**kwargs)
    with pytest.raises(exc):
        dec.feed(bad)
    for later in (b"", frame(1, b""), b"garbage"):
        with pytest.raises(exc):
            dec.feed(later)


@pytest.mark.parametrize(
    ("kwargs", "bad", "exc"),
    [
        ({"max_frame": 4}, frame(1, b"12345"), FrameTooLarge),
        ({"allowed_types": bytes([0, 1] + [0] * 254)}, frame(2, b"x"), UnknownFrameType),
        ({}, frame(1, b"x", crc=0), ChecksumMismatch),
    ],
)
def test_frames_completed_before_an_error_ride_on_it(
    impl: ModuleType, kwargs: dict[str, object], bad: bytes, exc: type[ProtocolError]
) -> None:
    """Valid frames ahead of the bad bytes in the same chunk are not lost: the caller
    answers them before failing the connection (as WebSocketError.events)."""
    dec = impl.FrameDecoder(**kwargs)
    assert dec.feed(frame(1, b"a")[:5]) == []
    with pytest.raises(exc) as info:
        dec.feed(frame(1, b"a")[5:] + frame(1, b"b") + bad)
    assert info.value.frames == [(1, b"a"), (1, b"b")]
    with pytest.raises(exc) as later:
        dec.feed(frame(1, b"c"))
    assert later.value.frames == []


def test_multi_mib_frame_in_random_chunks(impl: ModuleType) -> None:
    rng = random.Random(1234)
    payload = rng.randbytes(3 * 1024 * 1024 + 17)
    stream = frame(0x23, payload) + frame(0x04, b"tail")
    dec = impl.FrameDecoder(max_frame=4 * 1024 * 1024)
    got: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        n = rng.choice((1, 7, 4096, 65536, 300_000))
        got += dec.feed(stream[pos : pos + n])
        pos += n
        if not got:
            assert dec.buffered == pos
    assert got == [(0x23, payload), (0x04, b"tail")]
    assert dec.buffered == 0


# ---------------------------------------------------------------- property tests

frames_st = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20)


@SLOW
@given(frames=frames_st, data=st.data())
def test_roundtrip_any_chunking(
    impl: ModuleType, frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(impl.encode_frame(t, p) for t, p in frames)
    assert stream == b"".join(frame(t, p) for t, p in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    dec = impl.FrameDecoder()
    got: list[tuple[int, bytes]] = []
    for chunk in chunked(stream, cuts):
        got += dec.feed(chunk)
    assert got == frames
    assert dec.buffered == 0


def run_decoder(mod: ModuleType, chunks: list[bytes], **kwargs: object) -> list[tuple[Any, ...]]:
    """Per-feed outcome: ("ok", frames, buffered) or ("error", exception class)."""
    dec = mod.FrameDecoder(**kwargs)
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            out.append(("ok", dec.feed(chunk), dec.buffered))
        except ProtocolError as exc:
            out.append(("error", type(exc)))
    return out


@SLOW
@given(frames=frames_st, data=st.data())
def test_agree_on_valid_streams(
    core: ModuleType, ref: ModuleType, frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frame(t, p) for t, p in frames)
    chunks = chunked(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    expected = run_decoder(ref, chunks)
    assert run_decoder(core, chunks) == expected
    assert [f for r in expected for f in r[1]] == frames


@st.composite
def damaged_streams(draw: st.DrawFn) -> bytes:
    """Valid frames, then byte flips, cuts, insertions and random tails."""
    frames = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=8))
    raw = bytearray(b"".join(frame(t, p) for t, p in frames))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "tail"]))
        pos = draw(st.integers(0, len(raw)))
        if kind == "flip" and pos < len(raw):
            raw[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del raw[pos : pos + draw(st.integers(1, 5))]
        else:
            raw += draw(st.binary(max_size=30))
    return bytes(raw)


@SLOW
@given(
    stream=st.one_of(damaged_streams(), st.binary(max_size=200)),
    max_frame=st.one_of(st.just(1 << 20), st.integers(0, 64)),
    allowed=st.one_of(st.none(), st.binary(min_size=256, max_size=256)),
    data=st.data(),
)
def test_agree_on_garbage(
    core: ModuleType,
    ref: ModuleType,
    stream: bytes,
    max_frame: int,
    allowed: bytes | None,
    data: st.DataObject,
) -> None:
    chunks = chunked(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks += [b"", frame(1, b"more")]  # after an error, both must raise again
    kwargs = {"max_frame": max_frame, "allowed_types": allowed}
    assert run_decoder(core, chunks, **kwargs) == run_decoder(ref, chunks, **kwargs)
