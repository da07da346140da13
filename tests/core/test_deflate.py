"""permessage-deflate (RFC 7692) in the core: RSV1 in WSParser, ws_encode(rsv1=), ws_inflate.

Every test runs on the compiled core and on the pure-Python reference; the property tests
check that the two agree, byte by byte, on streams with compressed messages and on
damaged ones.
"""

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

from fastim.errors import WebSocketError

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
Z = 0x40  # OP_COMPRESSED
MASK = b"\x37\xfa\x21\x3d"


def xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def wsframe(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
) -> bytes:
    """A frame built by hand; ``rsv`` is the 3-bit RSV field (4 = RSV1)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    return head + payload if mask is None else head + mask + xor(payload, mask)


def deflate(data: bytes, level: int = 6) -> bytes:
    """A message compressed as a sender without context takeover does it (§7.2.1)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def ws_error(impl: ModuleType, data: bytes, **kwargs: Any) -> WebSocketError:
    parser = impl.WSParser(**kwargs)
    with pytest.raises(WebSocketError) as info:
        parser.feed(data)
    assert parser.closed
    return info.value


# ---------------------------------------------------------------- RFC 7692 §7.2.3 vectors

HELLO_Z = bytes.fromhex("f248cdc9c90700")


def test_op_compressed_flag(impl: ModuleType) -> None:
    assert impl.OP_COMPRESSED == Z
    assert Z & 0x0F == 0  # never collides with an opcode


def test_rfc7692_single_compressed_frame(impl: ModuleType) -> None:
    frame = bytes.fromhex("c107") + HELLO_Z  # §7.2.3.1, server to client
    assert impl.ws_encode(impl.OP_TEXT, HELLO_Z, rsv1=True) == frame
    parser = impl.WSParser(client=True, deflate=True)
    assert parser.feed(frame) == [(TEXT | Z, HELLO_Z)]
    assert impl.ws_inflate(HELLO_Z, 100, text=True) == b"Hello"


def test_rfc7692_fragmented_compressed_message(impl: ModuleType) -> None:
    data = bytes.fromhex("4103f248cd8004c9c90700")  # §7.2.3.1: RSV1 on the first frame only
    parser = impl.WSParser(client=True, deflate=True)
    assert parser.feed(data) == [(TEXT | Z, HELLO_Z)]
    byte_by_byte = impl.WSParser(client=True, deflate=True)
    events = [e for i in range(len(data)) for e in byte_by_byte.feed(data[i : i + 1])]
    assert events == [(TEXT | Z, HELLO_Z)]


@pytest.mark.parametrize(
    "payload",
    [
        "000500faff48656c6c6f00",  # §7.2.3.3: a stored (uncompressed) block
        "f348cdc9c9070000",  # §7.2.3.4: a block with BFINAL set, then 0x00
        "f24805000000ffffcac9c90700",  # §7.2.3.5: two DEFLATE blocks in one message
    ],
)
def test_rfc7692_other_payloads_inflate_to_hello(impl: ModuleType, payload: str) -> None:
    assert impl.ws_inflate(bytes.fromhex(payload), 5, text=True) == b"Hello"


def test_ws_encode_rsv1_sets_only_that_bit(impl: ModuleType) -> None:
    for n in (0, 5, 200, 70_000):
        plain = impl.ws_encode(impl.OP_BINARY, bytes(n))
        flagged = impl.ws_encode(impl.OP_BINARY, bytes(n), rsv1=True)
        assert flagged == bytes([plain[0] | 0x40]) + plain[1:]
    masked = impl.ws_encode(impl.OP_TEXT, b"abc", mask=MASK, rsv1=True, fin=False)
    assert masked == wsframe(TEXT, b"abc", fin=False, rsv=4)


# ---------------------------------------------------------------- the parser and RSV bits


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_rsv1_needs_negotiation(impl: ModuleType, opcode: int) -> None:
    assert ws_error(impl, wsframe(opcode, HELLO_Z, rsv=4)).ws_close_code == 1002
    parser = impl.WSParser()
    assert not parser.deflate
    parser.deflate = True  # set after the upgrade, as the server does
    assert parser.deflate
    assert parser.feed(wsframe(opcode, HELLO_Z, rsv=4)) == [(opcode | Z, HELLO_Z)]
    assert impl.WSParser(deflate=True).deflate


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_rsv1_on_a_control_frame_is_a_protocol_error(impl: ModuleType, opcode: int) -> None:
    assert ws_error(impl, wsframe(opcode, b"\x03\xe8", rsv=4), deflate=True).ws_close_code == 1002


def test_rsv1_on_a_continuation_frame_is_a_protocol_error(impl: ModuleType) -> None:
    data = wsframe(TEXT, b"ab", fin=False, rsv=4) + wsframe(CONT, b"c", rsv=4)
    assert ws_error(impl, data, deflate=True).ws_close_code == 1002
    data = wsframe(TEXT, b"ab", fin=False) + wsframe(CONT, b"c", rsv=4)
    assert ws_error(impl, data, deflate=True).ws_close_code == 1002


@pytest.mark.parametrize("rsv", [1, 2, 3, 5, 6, 7])
def test_rsv2_and_rsv3_stay_protocol_errors(impl: ModuleType, rsv: int) -> None:
    assert ws_error(impl, wsframe(TEXT, b"x", rsv=rsv), deflate=True).ws_close_code == 1002


def test_compressed_text_is_not_utf8_checked_by_the_parser(impl: ModuleType) -> None:
    junk = b"\xff\xfe\xed\xa0\x80\xc3"  # compressed bytes need not be UTF-8
    parser = impl.WSParser(deflate=True)
    data = wsframe(TEXT, junk[:3], fin=False, rsv=4) + wsframe(PING, b"p") + wsframe(CONT, junk[3:])
    assert parser.feed(data) == [(PING, b"p"), (TEXT | Z, junk)]
    # an uncompressed text message on the same connection is checked as before
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(TEXT, b"ok\xff"))
    assert info.value.ws_close_code == 1007


def test_compressed_and_plain_messages_interleave(impl: ModuleType) -> None:
    a, b = deflate(b"first " * 20), deflate(b"\x00\x01" * 50)
    data = (
        wsframe(TEXT, a, rsv=4)
        + wsframe(TEXT, b"plain")
        + wsframe(BINARY, b[:7], fin=False, rsv=4)
        + wsframe(PONG, b"")
        + wsframe(CONT, b[7:])
        + wsframe(BINARY, b"\x00")
    )
    events = impl.WSParser(deflate=True).feed(data)
    assert events == [
        (TEXT | Z, a),
        (TEXT, b"plain"),
        (PONG, b""),
        (BINARY | Z, b),
        (BINARY, b"\x00"),
    ]
    assert impl.ws_inflate(events[0][1], 1000, text=True) == b"first " * 20
    assert impl.ws_inflate(events[3][1], 1000) == b"\x00\x01" * 50


def test_max_message_counts_the_compressed_bytes(impl: ModuleType) -> None:
    big = deflate(bytes(100_000))  # ~100 bytes on the wire
    parser = impl.WSParser(max_message=200, deflate=True)
    assert parser.feed(wsframe(BINARY, big, rsv=4)) == [(BINARY | Z, big)]
    assert ws_error(impl, wsframe(BINARY, bytes(201), rsv=4), max_message=200, deflate=True)


def test_control_frames_and_messages_get_their_own_bytes(impl: ModuleType) -> None:
    """Control payloads no longer live in a parser buffer: each event owns its bytes."""
    parser = impl.WSParser()
    first = parser.feed(wsframe(PING, b"one") + wsframe(TEXT, b"ab", fin=False))
    second = parser.feed(wsframe(PING, b"two") + wsframe(CONT, b"c"))
    assert first == [(PING, b"one")]
    assert second == [(PING, b"two"), (TEXT, b"abc")]
    assert [type(p) for _, p in first + second] == [bytes, bytes, bytes]


# ---------------------------------------------------------------- ws_inflate


@pytest.mark.parametrize("n", [0, 1, 255, 256, 5000, 70_000])
def test_inflate_roundtrip_and_exact_limit(impl: ModuleType, n: int) -> None:
    data = random.Random(n).choice([b"ab", b"xyz!"]) * (n // 2) + b"z" * (n % 2)
    payload = deflate(data)
    assert impl.ws_inflate(payload, len(data)) == data
    assert impl.ws_inflate(bytearray(payload), len(data) + 10) == data
    if data:
        with pytest.raises(WebSocketError) as info:
            impl.ws_inflate(payload, len(data) - 1)
        assert info.value.ws_close_code == 1009


def test_inflate_empty_message(impl: ModuleType) -> None:
    assert deflate(b"") == b"\x00"  # zlib's empty message; §7.2.3.6 gives 0x02 0x00 too
    assert impl.ws_inflate(b"\x02\x00", 0) == b""
    assert impl.ws_inflate(b"\x00", 0) == b""
    assert impl.ws_inflate(b"", 0) == b""


def test_inflate_zip_bomb_stops_at_the_limit(impl: ModuleType) -> None:
    bomb = deflate(bytes(50 << 20), level=9)  # 50 MiB of zeros in ~50 KiB
    assert len(bomb) < 60_000
    with pytest.raises(WebSocketError) as info:
        impl.ws_inflate(bomb, 1 << 20)
    assert info.value.ws_close_code == 1009


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff", b"\x07" + bytes(10), bytes.fromhex("f248cdc9c907") + b"\xff" * 8],
)
def test_inflate_invalid_data_is_1007(impl: ModuleType, payload: bytes) -> None:
    with pytest.raises(WebSocketError) as info:
        impl.ws_inflate(payload, 1000)
    assert info.value.ws_close_code == 1007


@pytest.mark.parametrize("text", [b"ok\xff", b"\xed\xa0\x80", b"abc\xe2\x82", b"\xc0\xaf"])
def test_inflate_checks_text_after_inflating(impl: ModuleType, text: bytes) -> None:
    payload = deflate(text)
    assert impl.ws_inflate(payload, 100) == text  # binary: anything goes
    with pytest.raises(WebSocketError) as info:
        impl.ws_inflate(payload, 100, text=True)
    assert info.value.ws_close_code == 1007


def test_inflate_refuses_a_negative_limit(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.ws_inflate(HELLO_Z, -1)


def test_one_shared_compressor_with_full_flush_equals_fresh_ones(impl: ModuleType) -> None:
    """What the hub does: one compressor, Z_FULL_FLUSH per message; each inflates alone."""
    shared = zlib.compressobj(6, zlib.DEFLATED, -15)
    rng = random.Random(7)
    for i in range(50):
        msg = b'{"op":"msg","ch":"t","off":%d,"data":{"p":%d,"q":"%s"}}' % (
            i,
            rng.randrange(10**6),
            b"ab" * rng.randrange(200),
        )
        out = shared.compress(msg) + shared.flush(zlib.Z_FULL_FLUSH)
        assert out.endswith(b"\x00\x00\xff\xff")
        assert impl.ws_inflate(out[:-4], len(msg), text=True) == msg


# ---------------------------------------------------------------- property tests


@st.composite
def deflate_streams(draw: st.DrawFn, client: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Random plain and compressed messages, fragmented, with control frames in between."""
    wire = bytearray()
    events: list[tuple[int, bytes]] = []

    def mask() -> bytes | None:
        return None if client else draw(st.binary(min_size=4, max_size=4))

    for _ in range(draw(st.integers(0, 5))):
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        if opcode == TEXT:
            message = draw(st.text(max_size=300)).encode()
        else:
            message = draw(st.binary(max_size=300))
        compressed = draw(st.booleans())
        payload = deflate(message, draw(st.integers(0, 9))) if compressed else message
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(payload)])]
        for i, piece in enumerate(pieces):
            if draw(st.integers(0, 3)) == 0:
                ping = draw(st.binary(max_size=20))
                wire.extend(wsframe(PING, ping, mask=mask()))
                events.append((PING, ping))
            rsv = 4 if compressed and i == 0 else 0
            op = opcode if i == 0 else CONT
            wire.extend(wsframe(op, piece, fin=i == len(pieces) - 1, mask=mask(), rsv=rsv))
        events.append((opcode | (Z if compressed else 0), payload))
    return bytes(wire), events


def run_parser(mod: ModuleType, chunks: list[bytes], **kwargs: Any) -> list[tuple[Any, ...]]:
    parser = mod.WSParser(**kwargs)
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            out.append(("ok", parser.feed(chunk), parser.closed))
        except WebSocketError as exc:
            out.append(("error", type(exc), exc.ws_close_code, parser.closed, exc.events))
    return out


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@SLOW
@given(client=st.booleans(), data=st.data())
def test_agree_on_compressed_streams(
    core: ModuleType, ref: ModuleType, client: bool, data: st.DataObject
) -> None:
    wire, expected = data.draw(deflate_streams(client))
    chunks = chunked(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=30)))
    result = run_parser(core, chunks, client=client, deflate=True)
    assert result == run_parser(ref, chunks, client=client, deflate=True)
    events = [e for r in result for e in r[1]]
    assert events == expected
    for op, payload in events:
        if op & Z:
            text = op == TEXT | Z
            assert core.ws_inflate(payload, 1000, text) == ref.ws_inflate(payload, 1000, text)
    # without the negotiation, the first RSV1 fails both at the same byte
    if any(op & Z for op, _ in expected):
        plain = run_parser(core, chunks, client=client)
        assert plain == run_parser(ref, chunks, client=client)
        assert any(r[0] == "error" and r[2] == 1002 for r in plain)


@settings(SLOW, max_examples=300)
@given(client=st.booleans(), deflate_on=st.booleans(), data=st.data())
def test_agree_on_damaged_compressed_streams(
    core: ModuleType, ref: ModuleType, client: bool, deflate_on: bool, data: st.DataObject
) -> None:
    wire, _ = data.draw(deflate_streams(client))
    raw = bytearray(wire[:2000])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        kind = data.draw(st.sampled_from(["rsv", "flip", "insert", "delete"]))
        if not raw:
            raw += data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "rsv":
            raw[pos] ^= data.draw(st.sampled_from([0x40, 0x20, 0x10]))
        elif kind == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 4))]
    chunks = chunked(bytes(raw), data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    chunks.append(wsframe(TEXT, b"later", mask=None if client else MASK))
    kwargs = {"client": client, "deflate": deflate_on, "max_message": 400}
    assert run_parser(core, chunks, **kwargs) == run_parser(ref, chunks, **kwargs)


@SLOW
@given(payload=st.binary(max_size=200), max_size=st.integers(0, 400), text=st.booleans())
def test_agree_on_inflating_garbage(
    core: ModuleType, ref: ModuleType, payload: bytes, max_size: int, text: bool
) -> None:
    def outcome(mod: ModuleType) -> tuple[Any, ...]:
        try:
            return ("ok", mod.ws_inflate(payload, max_size, text))
        except WebSocketError as e:
            return ("error", e.ws_close_code)

    assert outcome(core) == outcome(ref)


VIOLATIONS = {
    "rsv1-ping": wsframe(PING, b"abc", rsv=4),
    "rsv1-close": wsframe(CLOSE, b"\x03\xe8", rsv=4),
    "rsv1-cont": wsframe(TEXT, b"a", fin=False, rsv=4) + wsframe(CONT, b"b", rsv=4),
    "rsv2": wsframe(BINARY, b"abc", rsv=2),
    "rsv3": wsframe(BINARY, b"abc", rsv=1),
    "rsv1-new-in-fragmented": wsframe(TEXT, b"a", fin=False) + wsframe(TEXT, b"b", rsv=4),
    "rsv1-too-big": wsframe(BINARY, b"x" * 301, rsv=4),
    "plain-bad-utf8": wsframe(TEXT, b"x", rsv=4) + wsframe(TEXT, b"ok\xff"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_agree_on_when_deflate_violations_fail(
    core: ModuleType, ref: ModuleType, name: str
) -> None:
    wire = VIOLATIONS[name]
    chunks = [wire[i : i + 1] for i in range(len(wire))] + [wsframe(TEXT, b"next")]
    kwargs = {"max_message": 300, "deflate": True}
    result = run_parser(core, chunks, **kwargs)
    assert result == run_parser(ref, chunks, **kwargs)
    assert [r[0] for r in result].count("error") == 1
    assert result[-1] == ("ok", [], True)
