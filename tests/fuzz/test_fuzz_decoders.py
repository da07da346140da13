"""Hypothesis fuzzing of the compiled decoders: FrameDecoder, WSParser, ws_inflate.

tests/core checks that the compiled core and the pure-Python reference agree on the same
input cut the same way. These tests hold the compiled core (what the node runs) to its
documented contract on its own, for arbitrary bytes cut arbitrarily:

- it returns events or raises the documented exception types, nothing else;
- what it returns does not depend on how the stream was cut (chunking independence),
  checked against a small model of the format (frames) or against one whole-stream feed
  (WebSocket, whose fail-fast UTF-8 check makes the failing byte exact);
- every event is well formed (sizes, types, UTF-8, close payloads);
- after an error (or a close frame) the decoder stays dead, whatever comes next;
- ``buffered`` is exactly what was fed and not yet returned.

Inputs are any buffer (bytes, bytearray, memoryview): the node only passes bytes, but
the API takes buffers. Example counts: the ``decoders`` profile below (200 by default).
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastim import _core
from fastim.errors import (
    ChecksumMismatch,
    FrameTooLarge,
    ProtocolError,
    UnknownFrameType,
    WebSocketError,
)
from fastim.protocol import CLIENT_FRAME_TYPES, ErrorCode, type_mask


def scaled(examples: int) -> int:
    """``examples`` times FASTIM_FUZZ_SCALE (default 1): ``FASTIM_FUZZ_SCALE=20`` hunts longer."""
    return max(1, int(examples * float(os.environ.get("FASTIM_FUZZ_SCALE", "1"))))


DECODERS = settings(
    max_examples=scaled(200),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
Z = _core.OP_COMPRESSED


# --------------------------------------------------------------------------- helpers


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def as_buffer(chunk: bytes, kind: int) -> Any:
    """The same bytes as bytes, bytearray or a memoryview into a larger object."""
    if kind == 1:
        return bytearray(chunk)
    if kind == 2:
        return memoryview(b"<" + chunk + b">")[1:-1]
    return chunk


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[tuple[bytes, int]]:
    """``data`` cut at random points (sometimes byte by byte), each piece a random buffer type."""
    if data and draw(st.integers(0, 9)) == 0:
        pieces = [data[i : i + 1] for i in range(len(data))]
    else:
        pieces = cut(data, draw(st.lists(st.integers(0, len(data)), max_size=24)))
    if draw(st.booleans()):  # empty feeds anywhere are legal and change nothing
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    kinds = draw(st.lists(st.integers(0, 2), min_size=len(pieces), max_size=len(pieces)))
    return list(zip(pieces, kinds, strict=True))


def frame(ftype: int, payload: bytes, crc: int | None = None, length: int | None = None) -> bytes:
    crc = zlib.crc32(payload) if crc is None else crc
    n = len(payload) if length is None else length
    return struct.pack("!IBI", n, ftype, crc) + payload


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Raw bytes, or valid frames (mostly of client types) damaged here and there."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    types = st.one_of(st.sampled_from(sorted(CLIENT_FRAME_TYPES)), st.integers(0, 255))
    raw = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        ftype = draw(types)
        payload = draw(st.binary(max_size=60))
        kind = draw(st.integers(0, 9))
        if kind == 0:  # bad checksum
            raw += frame(ftype, payload, crc=zlib.crc32(payload) ^ draw(st.integers(1, 2**32 - 1)))
        elif kind == 1 and draw(st.booleans()):  # a header that lies about the length
            raw += frame(ftype, payload, length=draw(st.integers(0, 2**32 - 1)))
        else:
            raw += frame(ftype, payload)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["flip", "insert", "delete", "tail"]))
        pos = draw(st.integers(0, len(raw)))
        if how == "flip" and pos < len(raw):
            raw[pos] ^= draw(st.integers(1, 255))
        elif how == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif how == "delete":
            del raw[pos : pos + draw(st.integers(1, 5))]
        elif how == "tail":
            raw += draw(st.binary(max_size=20))
    return bytes(raw)


# --------------------------------------------------------------------------- FrameDecoder


@dataclass
class FrameModel:
    """What the fastim frame format says about a whole stream, byte position by position."""

    frames: list[tuple[int, bytes, int]] = field(default_factory=list)  # (type, payload, at)
    error: type[ProtocolError] | None = None
    error_at: int = -1  # index of the byte that decides the error
    complete_upto: int = 0  # bytes of the stream in complete frames


def model_frames(stream: bytes, max_frame: int, allowed: bytes) -> FrameModel:
    """Header checks at the 9th header byte, in the documented order, CRC at the last byte."""
    m = FrameModel()
    pos = 0
    while len(stream) - pos >= 9:
        length, ftype, crc = struct.unpack_from("!IBI", stream, pos)
        if length > max_frame:
            m.error, m.error_at = FrameTooLarge, pos + 8
            return m
        if not allowed[ftype]:
            m.error, m.error_at = UnknownFrameType, pos + 8
            return m
        end = pos + 9 + length
        if end > len(stream):
            return m
        payload = stream[pos + 9 : end]
        if zlib.crc32(payload) != crc:
            m.error, m.error_at = ChecksumMismatch, end - 1
            return m
        m.frames.append((ftype, payload, end - 1))
        pos = m.complete_upto = end
    return m


@DECODERS
@given(
    stream=frame_streams(),
    max_frame=st.one_of(st.just(1 << 20), st.just(1 << 20), st.integers(0, 80)),
    client_types=st.booleans(),
    data=st.data(),
)
def test_frame_decoder_any_bytes_any_chunking(
    stream: bytes, max_frame: int, client_types: bool, data: st.DataObject
) -> None:
    allowed = type_mask(CLIENT_FRAME_TYPES) if client_types else bytes([1]) * 256
    model = model_frames(stream, max_frame, allowed)
    dec = _core.FrameDecoder(max_frame, allowed if client_types else None)
    got: list[tuple[int, bytes]] = []
    fed = 0
    failed_at_chunk: tuple[int, int] | None = None
    error: ProtocolError | None = None
    for chunk, kind in data.draw(chunkings(stream)):
        start = fed
        fed += len(chunk)
        try:
            out = dec.feed(as_buffer(chunk, kind))
        except ProtocolError as e:
            # the documented classes only, raised by the chunk holding the deciding byte
            assert model.error is not None, f"unexpected {e!r}"
            assert type(e) is model.error, (e, model.error)
            assert start <= model.error_at < fed, (start, model.error_at, fed)
            assert e.code == model.error.code and e.reason
            failed_at_chunk, error = (start, fed), e
            got.extend(e.frames)  # completed in this chunk before the violation
            break
        assert all(type(t) is int and type(p) is bytes for t, p in out)
        got.extend(out)
        # buffered: exactly the bytes of the frame not yet complete
        consumed = sum(9 + len(p) for _t, p in got)
        assert dec.buffered == fed - consumed
        assert dec.buffered <= 9 + max_frame
    expected = [(t, p) for t, p, _at in model.frames]
    event(f"frames: {model.error.__name__ if model.error else 'no error'}, {len(got)} frames")
    if failed_at_chunk is None:
        assert model.error is None or model.error_at >= fed
        assert got == expected
        assert dec.buffered == len(stream) - model.complete_upto
        return
    # every frame completed before the violation was handed over, in order (those of
    # the failing chunk on the error's ``frames``), none invented
    assert got == expected
    # dead: every later feed, empty or valid, raises the same class
    assert error is not None
    for later in (b"", frame(0x01, b"\x01\x01{}"), b"\x00" * 9):
        try:
            dec.feed(later)
        except ProtocolError as e:
            assert type(e) is type(error)
        else:
            raise AssertionError("a dead decoder accepted more input")


@DECODERS
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), max_size=6))
def test_frame_decoder_whole_frames_in_one_feed_or_byte_by_byte(
    frames: list[tuple[int, bytes]],
) -> None:
    """Valid streams decode to their frames whether fed at once or one byte at a time."""
    stream = b"".join(_core.encode_frame(t, p) for t, p in frames)
    assert _core.FrameDecoder().feed(stream) == frames
    dec = _core.FrameDecoder()
    out = [f for i in range(len(stream)) for f in dec.feed(stream[i : i + 1])]
    assert out == frames and dec.buffered == 0


# --------------------------------------------------------------------------- WSParser


def ws_frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    mask: bytes | None = None,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@st.composite
def ws_streams(draw: st.DrawFn, client: bool, deflate: bool) -> bytes:
    """Mostly well-formed frames (plain and compressed, fragmented, controls between), damaged."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))

    def mask() -> bytes | None:
        if client:
            return None if draw(st.integers(0, 40)) else b"\x01\x02\x03\x04"  # rarely masked
        return draw(st.binary(min_size=4, max_size=4)) if draw(st.integers(0, 40)) else None

    raw = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if kind <= 2:  # a control frame, sometimes a bad one
            op = draw(st.sampled_from([PING, PONG, CLOSE]))
            if op == CLOSE:
                payload = draw(
                    st.one_of(
                        st.builds(
                            lambda c, r: struct.pack("!H", c) + r,
                            st.one_of(
                                st.sampled_from([1000, 1001, 3000, 4999]), st.integers(0, 65535)
                            ),
                            st.binary(max_size=10),
                        ),
                        st.binary(max_size=3),
                    )
                )
            else:
                payload = draw(st.binary(max_size=draw(st.sampled_from([20, 20, 20, 130]))))
            raw += ws_frame(op, payload, fin=draw(st.integers(0, 30)) > 0, mask=mask())
            continue
        op = draw(st.sampled_from([TEXT, BINARY]))
        if op == TEXT:
            message = draw(st.text(max_size=120)).encode()
            if draw(st.integers(0, 5)) == 0 and message:  # a bad byte in the text
                i = draw(st.integers(0, len(message) - 1))
                message = message[:i] + bytes([draw(st.integers(0x80, 0xFF))]) + message[i + 1 :]
        else:
            message = draw(st.binary(max_size=200))
        compressed = (deflate and draw(st.booleans())) or draw(st.integers(0, 15)) == 0
        if compressed:
            c = zlib.compressobj(draw(st.integers(0, 9)), zlib.DEFLATED, -15)
            message = (c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=3)))
        pieces = [message[a:b] for a, b in itertools.pairwise([0, *cuts, len(message)])]
        for i, piece in enumerate(pieces):
            bad_rsv = draw(st.sampled_from([1, 2, 4])) if draw(st.integers(0, 40)) == 0 else 0
            rsv = (4 if compressed and i == 0 else 0) | bad_rsv
            raw += ws_frame(
                op if i == 0 else CONT, piece, fin=i == len(pieces) - 1, mask=mask(), rsv=rsv
            )
    if draw(st.integers(0, 5)) == 0:  # a header that announces more than will come, or a lot
        raw += ws_frame(BINARY, b"", mask=mask(), length=draw(st.integers(0, 2**64 - 1)))
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, len(raw)))
        what = draw(st.integers(0, 2))
        if what == 0 and pos < len(raw):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif what == 1:
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        else:
            del raw[pos : pos + draw(st.integers(1, 4))]
    return bytes(raw)


def run_ws(
    chunks: list[tuple[bytes, int]], **kwargs: Any
) -> tuple[list[tuple[int, bytes]], WebSocketError | None, _core.WSParser]:
    """All events of a stream fed in ``chunks`` and the error, if any; checks the feed API."""
    parser = _core.WSParser(**kwargs)
    events: list[tuple[int, bytes]] = []
    error: WebSocketError | None = None
    for chunk, kind in chunks:
        was_closed = parser.closed
        try:
            out = parser.feed(as_buffer(chunk, kind))
        except WebSocketError as e:
            assert error is None, "a second error from a dead parser"
            assert not was_closed, "an error after the parser was closed"
            assert type(e) is WebSocketError
            assert isinstance(e.events, list)
            events.extend(e.events)
            error = e
            assert parser.closed
            continue
        if was_closed:
            assert out == [], "events from a closed parser"
        events.extend(out)
    return events, error, parser


def check_events(
    events: list[tuple[int, bytes]], max_message: int, client: bool, deflate: bool
) -> None:
    """Each event as documented; nothing after a close frame."""
    for i, (op, payload) in enumerate(events):
        assert type(op) is int and type(payload) is bytes
        if op in (TEXT, BINARY, TEXT | Z, BINARY | Z):
            assert len(payload) <= max_message
            if op & Z:
                assert deflate, "a compressed message without permessage-deflate"
            elif op == TEXT:
                payload.decode("utf-8")  # checked as it arrived
        elif op in (PING, PONG):
            assert len(payload) <= 125
        elif op == CLOSE:
            assert len(payload) <= 125
            code, _reason = _core.ws_parse_close(payload)  # validated by the parser
            assert code == 1005 or 1000 <= code < 5000
            assert i == len(events) - 1, "events after a close frame"
        else:
            raise AssertionError(f"undocumented opcode {op:#x}")


@DECODERS
@given(
    client=st.booleans(),
    deflate=st.booleans(),
    max_message=st.one_of(st.just(1 << 20), st.integers(0, 300)),
    data=st.data(),
)
def test_ws_parser_any_bytes_any_chunking(
    client: bool, deflate: bool, max_message: int, data: st.DataObject
) -> None:
    stream = data.draw(ws_streams(client, deflate))
    kwargs = {"max_message": max_message, "client": client, "deflate": deflate}
    # the whole stream at once: the reference outcome
    whole, whole_error, _ = run_ws([(stream, 0)], **kwargs)
    chunks = data.draw(chunkings(stream))
    chunks.append((ws_frame(TEXT, b"later", mask=None if client else b"abcd"), 0))
    events, error, parser = run_ws(chunks, **kwargs)
    check_events(events, max_message, client, deflate)
    event(f"ws: {error.ws_close_code if error else 'ok'}, {min(len(events), 3)}+ events")
    # chunking independence: the same events and the same verdict, however it was cut
    assert events[: len(whole)] == whole
    if whole_error is not None or (whole and whole[-1][0] == CLOSE):
        assert events == whole  # dead or closed: "later" must not come out
        assert (error is None) == (whole_error is None)
        if error is not None and whole_error is not None:
            assert error.ws_close_code == whole_error.ws_close_code
    else:
        assert len(events) <= len(whole) + 1  # "later", if the stream ended cleanly
    if error is not None:
        assert error.ws_close_code in (1002, 1007, 1009)
        expect = {1002: ErrorCode.BAD_FRAMING, 1007: ErrorCode.INVALID_UTF8}
        assert error.code == expect.get(error.ws_close_code, ErrorCode.FRAME_TOO_LARGE)
        assert error.close_code == error.ws_close_code and error.reason
    if error is not None or (events and events[-1][0] == CLOSE):
        assert parser.closed
        assert parser.feed(ws_frame(PING, b"x", mask=None if client else b"abcd")) == []
    # compressed messages inflate within bounds, or fail with a documented code
    for op, payload in events:
        if op & Z:
            try:
                out = _core.ws_inflate(payload, max_message, text=op == TEXT | Z)
            except WebSocketError as e:
                assert e.ws_close_code in (1007, 1009)
            else:
                assert len(out) <= max_message


@DECODERS
@given(
    message=st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(str.encode)),
    level=st.integers(0, 9),
    max_size=st.one_of(st.integers(0, 2100), st.just(1 << 20)),
    damage=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
    truncate=st.one_of(st.none(), st.integers(0, 4000)),
    text=st.booleans(),
)
def test_ws_inflate_bounded_and_documented(
    message: bytes,
    level: int,
    max_size: int,
    damage: list[tuple[int, int]],
    truncate: int | None,
    text: bool,
) -> None:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    payload = bytearray((c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4])
    for pos, value in damage:
        if payload:
            payload[pos % len(payload)] = value
    if truncate is not None:
        del payload[truncate:]
    pristine = not damage and truncate is None
    try:
        out = _core.ws_inflate(bytes(payload), max_size, text)
    except WebSocketError as e:
        assert e.ws_close_code in (1007, 1009), e
        if pristine:
            if e.ws_close_code == 1009:
                assert len(message) > max_size
            else:
                assert text and len(message) <= max_size
                try:
                    message.decode()
                except UnicodeDecodeError:
                    pass
                else:
                    raise AssertionError("valid text refused") from e
        return
    assert type(out) is bytes and len(out) <= max_size
    if text:
        out.decode("utf-8")
    if pristine:
        assert out == message


@DECODERS
@given(payload=st.binary(max_size=500), max_size=st.integers(0, 600), text=st.booleans())
def test_ws_inflate_arbitrary_bytes(payload: bytes, max_size: int, text: bool) -> None:
    try:
        out = _core.ws_inflate(payload, max_size, text)
    except WebSocketError as e:
        assert e.ws_close_code in (1007, 1009)
        assert e.code == (ErrorCode.INVALID_UTF8 if e.ws_close_code == 1007 else 103)
    else:
        assert len(out) <= max_size
        if text:
            out.decode("utf-8")


@DECODERS
@given(payload=st.binary(max_size=130))
def test_ws_parse_close_any_payload(payload: bytes) -> None:
    try:
        code, reason = _core.ws_parse_close(payload)
    except WebSocketError as e:
        assert e.ws_close_code in (1002, 1007)
    else:
        assert isinstance(reason, str)
        assert code == 1005 if not payload else code == struct.unpack("!H", payload[:2])[0]
