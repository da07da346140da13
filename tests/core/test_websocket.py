"""RFC 6455: ws_encode, close payloads, utf8_valid and the streaming WSParser, on both impls."""

from __future__ import annotations

import itertools
import random
import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastim.errors import ProtocolError, WebSocketError
from fastim.protocol import ErrorCode

# text that may hold lone surrogates, encoded anyway (surrogatepass): invalid UTF-8
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=100).map(
    lambda s: s.encode("utf-8", "surrogatepass")
)

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
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
    length: int | None = None,
    len_bytes: int | None = None,
) -> bytes:
    """A WebSocket frame built by hand (masked, as from a client, unless mask=None).

    ``length`` overrides the declared length; ``len_bytes`` (0, 2 or 8) forces the
    length encoding.
    """
    n = len(payload) if length is None else length
    if len_bytes is None:
        len_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mbit = 0x80 if mask is not None else 0
    if len_bytes == 0:
        head += bytes([mbit | n])
    elif len_bytes == 2:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + xor(payload, mask)


def feed_all(parser: Any, data: bytes, step: int = 0) -> list[tuple[int, bytes]]:
    if not step:
        return list(parser.feed(data))
    out: list[tuple[int, bytes]] = []
    for i in range(0, len(data), step):
        out += parser.feed(data[i : i + step])
    return out


def ws_error(impl: ModuleType, data: bytes, **kwargs: object) -> WebSocketError:
    parser = impl.WSParser(**kwargs)
    with pytest.raises(WebSocketError) as info:
        parser.feed(data)
    assert parser.closed
    assert parser.feed(wsframe(TEXT, b"ok")) == []
    return info.value


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------- constants, encoder


def test_opcodes(impl: ModuleType) -> None:
    assert (impl.OP_CONT, impl.OP_TEXT, impl.OP_BINARY) == (0, 1, 2)
    assert (impl.OP_CLOSE, impl.OP_PING, impl.OP_PONG) == (8, 9, 10)


def test_ws_encode_rfc_vectors(impl: ModuleType) -> None:
    # RFC 6455 §5.7
    assert impl.ws_encode(impl.OP_TEXT, b"Hello") == b"\x81\x05Hello"
    assert impl.ws_encode(impl.OP_TEXT, b"Hello", mask=MASK) == (
        b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    )
    assert impl.ws_encode(impl.OP_TEXT, b"Hel", fin=False) == b"\x01\x03Hel"
    assert impl.ws_encode(impl.OP_CONT, b"lo") == b"\x80\x02lo"
    assert impl.ws_encode(impl.OP_PING, b"Hello") == b"\x89\x05Hello"
    assert impl.ws_encode(impl.OP_PONG, b"Hello", mask=MASK) == (
        b"\x8a\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    )
    assert impl.ws_encode(impl.OP_BINARY, bytes(256)) == b"\x82\x7e\x01\x00" + bytes(256)
    assert impl.ws_encode(impl.OP_BINARY, bytes(65536)) == (
        b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + bytes(65536)
    )


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70001])
@pytest.mark.parametrize("mask", [None, MASK, b"\x00\x00\x00\x00", b"\xff\x01\x80\x7f"])
def test_ws_encode_lengths(impl: ModuleType, n: int, mask: bytes | None) -> None:
    payload = random.Random(n).randbytes(n)
    expected = wsframe(BINARY, payload, mask=mask)
    assert impl.ws_encode(impl.OP_BINARY, payload, mask=mask) == expected
    assert impl.ws_encode(impl.OP_BINARY, bytearray(payload), mask=mask) == expected


def test_ws_close_payload(impl: ModuleType) -> None:
    assert impl.ws_close_payload(1000) == b"\x03\xe8"
    assert impl.ws_close_payload(1001, "bye") == b"\x03\xe9bye"
    assert impl.ws_close_payload(4001, "x" * 500) == b"\x0f\xa1" + b"x" * 123


@pytest.mark.parametrize("reason", ["é" * 100, "a" + "é" * 100, "€" * 60, "😀" * 40, "ab😀" * 40])
def test_ws_close_payload_never_cuts_a_character(impl: ModuleType, reason: str) -> None:
    payload = impl.ws_close_payload(1000, reason)
    assert payload[:2] == b"\x03\xe8"
    assert 122 <= len(payload) <= 125
    cut = payload[2:].decode("utf-8")  # raises if a sequence was cut
    assert reason.startswith(cut)
    assert len(cut.encode()) > 123 - 4  # no more than one character dropped


@given(st.text(max_size=200), st.sampled_from([1000, 1001, 1011, 3000, 4999]))
def test_ws_close_payload_roundtrip(impl: ModuleType, reason: str, code: int) -> None:
    payload = impl.ws_close_payload(code, reason)
    assert len(payload) <= 125
    got_code, got_reason = impl.ws_parse_close(payload)
    assert got_code == code
    assert reason.startswith(got_reason)
    if len(reason.encode()) <= 123:
        assert got_reason == reason


# ---------------------------------------------------------------- ws_parse_close


def test_ws_parse_close(impl: ModuleType) -> None:
    assert impl.ws_parse_close(b"") == (1005, "")
    assert impl.ws_parse_close(b"\x03\xe8") == (1000, "")
    assert impl.ws_parse_close(b"\x03\xe8bye") == (1000, "bye")
    assert impl.ws_parse_close(bytearray(b"\x0f\xa0" + "κόσμε".encode())) == (4000, "κόσμε")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                  1014, 3000, 3999, 4000, 4999])  # fmt: skip
def test_ws_parse_close_allowed_codes(impl: ModuleType, code: int) -> None:
    assert impl.ws_parse_close(struct.pack("!H", code) + b"r") == (code, "r")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
                                  65535])  # fmt: skip
def test_ws_parse_close_forbidden_codes(impl: ModuleType, code: int) -> None:
    with pytest.raises(WebSocketError) as info:
        impl.ws_parse_close(struct.pack("!H", code))
    assert info.value.ws_close_code == 1002


def test_ws_parse_close_one_byte(impl: ModuleType) -> None:
    with pytest.raises(WebSocketError) as info:
        impl.ws_parse_close(b"\x03")
    assert info.value.ws_close_code == 1002
    assert info.value.code == ErrorCode.BAD_FRAMING


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_ws_parse_close_bad_reason(impl: ModuleType, reason: bytes) -> None:
    with pytest.raises(WebSocketError) as info:
        impl.ws_parse_close(b"\x03\xe8" + reason)
    assert info.value.ws_close_code == 1007
    assert info.value.close_code == 1007
    assert info.value.code == ErrorCode.INVALID_UTF8


# ---------------------------------------------------------------- utf8_valid

UTF8_CASES = [
    (b"", True),
    (b"hello", True),
    ("κόσμε".encode(), True),
    (b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80", False),  # > U+10FFFF
    (b"\xf4\x8f\xbf\xbf", True),  # U+10FFFF
    (b"\xed\x9f\xbf", True),  # U+D7FF
    (b"\xed\xa0\x80", False),  # surrogate U+D800
    (b"\xed\xbf\xbf", False),  # surrogate U+DFFF
    (b"\xee\x80\x80", True),  # U+E000
    (b"\xc0\x80", False),  # overlong NUL
    (b"\xc1\xbf", False),  # overlong
    (b"\xc2\x80", True),
    (b"\xe0\x9f\xbf", False),  # overlong
    (b"\xe0\xa0\x80", True),
    (b"\xf0\x8f\xbf\xbf", False),  # overlong
    (b"\xf0\x90\x80\x80", True),
    (b"\xf5\x80\x80\x80", False),
    (b"\xff", False),
    (b"\x80", False),  # lone continuation
    (b"a\xc3", False),  # truncated
    (b"\xe2\x82", False),
    (b"\x00\x7f", True),
    ("€𝄞".encode() * 50, True),
]


@pytest.mark.parametrize(("data", "valid"), UTF8_CASES)
def test_utf8_valid_cases(impl: ModuleType, data: bytes, valid: bool) -> None:
    assert impl.utf8_valid(data) is valid
    assert impl.utf8_valid(bytearray(data)) is valid
    # in the middle of a long ASCII run too (vectorised fast paths)
    assert impl.utf8_valid(b"x" * 37 + data + b"y" * 70) is valid


def python_says(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(st.binary(max_size=300))
def test_utf8_valid_random_bytes(impl: ModuleType, data: bytes) -> None:
    assert impl.utf8_valid(data) is python_says(data)


@given(
    ANY_TEXT,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
)
def test_utf8_valid_text_with_flips(
    impl: ModuleType, data: bytes, flips: list[tuple[int, int]]
) -> None:
    raw = bytearray(data)
    for pos, value in flips:
        if raw:
            raw[pos % len(raw)] = value
    assert impl.utf8_valid(bytes(raw)) is python_says(bytes(raw))


# ---------------------------------------------------------------- parser: good input


@pytest.mark.parametrize("n", [0, 5, 125, 126, 1000, 65535, 65536, 100_000])
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_parse_masked_lengths(impl: ModuleType, n: int, opcode: int) -> None:
    payload = b"a" * n if opcode == TEXT else random.Random(n).randbytes(n)
    data = wsframe(opcode, payload)
    parser = impl.WSParser()
    assert parser.feed(data) == [(opcode, payload)]
    assert not parser.closed
    parser = impl.WSParser()
    assert feed_all(parser, data, 997) == [(opcode, payload)]


def test_parse_forced_long_length_encodings(impl: ModuleType) -> None:
    # a short payload in a 16- or 64-bit length field is accepted
    parser = impl.WSParser()
    data = wsframe(BINARY, b"abc", len_bytes=2) + wsframe(BINARY, b"defg", len_bytes=8)
    assert parser.feed(data) == [(BINARY, b"abc"), (BINARY, b"defg")]


def test_parse_rfc_vectors_client_mode(impl: ModuleType) -> None:
    parser = impl.WSParser(client=True)
    assert parser.feed(b"\x81\x05Hello") == [(TEXT, b"Hello")]
    assert parser.feed(b"\x01\x03Hel") == []
    assert parser.feed(b"\x80\x02lo") == [(TEXT, b"Hello")]
    assert parser.feed(b"\x89\x05Hello") == [(PING, b"Hello")]
    assert parser.feed(b"\x82\x7e\x01\x00" + bytes(256)) == [(BINARY, bytes(256))]


def test_parse_rfc_vector_masked(impl: ModuleType) -> None:
    parser = impl.WSParser()
    assert parser.feed(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58") == [(TEXT, b"Hello")]
    assert parser.feed(b"\x8a\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58") == [(PONG, b"Hello")]


def test_parse_byte_at_a_time(impl: ModuleType) -> None:
    data = (
        wsframe(TEXT, "héllo wörld".encode())
        + wsframe(BINARY, bytes(range(200)), mask=b"\x01\x02\x03\x04")
        + wsframe(PING, b"p")
    )
    parser = impl.WSParser()
    assert feed_all(parser, data, 1) == [
        (TEXT, "héllo wörld".encode()),
        (BINARY, bytes(range(200))),
        (PING, b"p"),
    ]


def test_parse_returns_bytes(impl: ModuleType) -> None:
    [(op, payload)] = impl.WSParser().feed(bytearray(wsframe(TEXT, b"abc")))
    assert type(op) is int
    assert type(payload) is bytes


def test_fragmentation_with_interleaved_control_frames(impl: ModuleType) -> None:
    data = (
        wsframe(TEXT, b"Hel", fin=False)
        + wsframe(PING, b"ping-1")
        + wsframe(CONT, b"lo, ", fin=False, mask=b"\x00\x00\x00\x00")
        + wsframe(PONG, b"")
        + wsframe(CONT, b"", fin=False)
        + wsframe(PING, b"ping-2", mask=b"\xaa\xbb\xcc\xdd")
        + wsframe(CONT, b"world")
        + wsframe(BINARY, b"\x00", fin=False)
        + wsframe(CONT, b"\x01")
    )
    expected = [
        (PING, b"ping-1"),
        (PONG, b""),
        (PING, b"ping-2"),
        (TEXT, b"Hello, world"),
        (BINARY, b"\x00\x01"),
    ]
    assert impl.WSParser().feed(data) == expected
    assert feed_all(impl.WSParser(), data, 1) == expected
    assert feed_all(impl.WSParser(), data, 5) == expected


def test_control_frame_of_125_bytes(impl: ModuleType) -> None:
    assert impl.WSParser().feed(wsframe(PING, b"p" * 125)) == [(PING, b"p" * 125)]


def test_empty_messages(impl: ModuleType) -> None:
    data = wsframe(TEXT, b"") + wsframe(BINARY, b"") + wsframe(TEXT, b"", fin=False)
    data += wsframe(CONT, b"")
    assert impl.WSParser().feed(data) == [(TEXT, b""), (BINARY, b""), (TEXT, b"")]


def test_utf8_code_point_split_across_fragments(impl: ModuleType) -> None:
    text = "a€b😀c".encode()  # € = e2 82 ac, 😀 = f0 9f 98 80
    data = (
        wsframe(TEXT, text[:2], fin=False)  # a e2
        + wsframe(CONT, text[2:3], fin=False)  # 82
        + wsframe(PING, b"x")
        + wsframe(CONT, text[3:6], fin=False)  # ac b f0
        + wsframe(CONT, text[6:8], fin=False)  # 9f 98
        + wsframe(CONT, text[8:])  # 80 c
    )
    assert impl.WSParser().feed(data) == [(PING, b"x"), (TEXT, text)]
    assert feed_all(impl.WSParser(), data, 1) == [(PING, b"x"), (TEXT, text)]


def test_binary_messages_are_not_utf8_checked(impl: ModuleType) -> None:
    data = wsframe(BINARY, b"\xff\xfe\xed\xa0\x80", fin=False) + wsframe(CONT, b"\xc0")
    assert impl.WSParser().feed(data) == [(BINARY, b"\xff\xfe\xed\xa0\x80\xc0")]


def test_max_message_boundary(impl: ModuleType) -> None:
    parser = impl.WSParser(max_message=10)
    assert parser.max_message == 10
    data = wsframe(TEXT, b"12345", fin=False) + wsframe(CONT, b"67890")
    assert parser.feed(data) == [(TEXT, b"1234567890")]
    assert parser.feed(wsframe(BINARY, b"x" * 10)) == [(BINARY, b"x" * 10)]
    # control frames do not count towards the message size
    data = wsframe(TEXT, b"1234567890", fin=False) + wsframe(PING, b"p" * 100)
    assert parser.feed(data + wsframe(CONT, b"")) == [(PING, b"p" * 100), (TEXT, b"1234567890")]


def test_negative_max_message_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.WSParser(max_message=-1)


def test_max_message_zero_allows_only_empty_messages(impl: ModuleType) -> None:
    parser = impl.WSParser(max_message=0)
    assert parser.feed(wsframe(TEXT, b"") + wsframe(PING, b"ping")) == [
        (TEXT, b""),
        (PING, b"ping"),
    ]
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(BINARY, b"x"))
    assert info.value.ws_close_code == 1009


def test_default_max_message(impl: ModuleType) -> None:
    assert impl.WSParser().max_message == 1 << 20
    assert impl.WSParser().feed(wsframe(BINARY, bytes(1 << 20))) == [(BINARY, bytes(1 << 20))]
    err = ws_error(impl, wsframe(BINARY, b"", length=(1 << 20) + 1)[:14])
    assert err.ws_close_code == 1009


# ---------------------------------------------------------------- close frames


def test_close_frame_ends_the_stream(impl: ModuleType) -> None:
    parser = impl.WSParser()
    close = wsframe(CLOSE, b"\x03\xe8bye")
    events = parser.feed(wsframe(TEXT, b"last") + close + wsframe(TEXT, b"ignored"))
    assert events == [(TEXT, b"last"), (CLOSE, b"\x03\xe8bye")]
    assert parser.closed
    assert parser.feed(wsframe(TEXT, b"more")) == []
    assert parser.feed(b"\xff\xff garbage") == []


def test_empty_close_frame(impl: ModuleType) -> None:
    parser = impl.WSParser()
    assert parser.feed(wsframe(CLOSE)) == [(CLOSE, b"")]
    assert parser.closed


def test_close_in_the_middle_of_a_fragmented_message(impl: ModuleType) -> None:
    parser = impl.WSParser()
    data = wsframe(TEXT, b"part", fin=False) + wsframe(CLOSE, b"\x03\xe9")
    assert parser.feed(data) == [(CLOSE, b"\x03\xe9")]
    assert parser.closed


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),
        (b"\x03\xe7", 1002),  # 999
        (b"\x03\xec", 1002),  # 1004
        (b"\x03\xed", 1002),  # 1005
        (b"\x03\xee", 1002),  # 1006
        (b"\x03\xf7", 1002),  # 1015
        (b"\x0b\xb7", 1002),  # 2999
        (b"\x13\x88", 1002),  # 5000
        (b"\x03\xe8\xff", 1007),
        (b"\x03\xe8ok\xe2\x82", 1007),
    ],
)
def test_bad_close_frames(impl: ModuleType, payload: bytes, code: int) -> None:
    assert ws_error(impl, wsframe(CLOSE, payload)).ws_close_code == code


# ---------------------------------------------------------------- violations (1002)


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
@pytest.mark.parametrize("opcode", [TEXT, PING])
def test_rsv_bits(impl: ModuleType, rsv: int, opcode: int) -> None:
    err = ws_error(impl, wsframe(opcode, b"x", rsv=rsv))
    assert err.ws_close_code == 1002
    assert err.close_code == 1002
    assert err.code == ErrorCode.BAD_FRAMING
    assert isinstance(err, ProtocolError)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes(impl: ModuleType, opcode: int) -> None:
    assert ws_error(impl, wsframe(opcode, b"x")).ws_close_code == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, PONG, CLOSE])
def test_server_rejects_unmasked_frames(impl: ModuleType, opcode: int) -> None:
    assert ws_error(impl, wsframe(opcode, b"\x03\xe8", mask=None)).ws_close_code == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, PONG, CLOSE])
def test_client_rejects_masked_frames(impl: ModuleType, opcode: int) -> None:
    err = ws_error(impl, wsframe(opcode, b"\x03\xe8"), client=True)
    assert err.ws_close_code == 1002


@pytest.mark.parametrize("opcode", [CLOSE, PING, PONG])
def test_fragmented_control_frame(impl: ModuleType, opcode: int) -> None:
    assert ws_error(impl, wsframe(opcode, b"\x03\xe8", fin=False)).ws_close_code == 1002


@pytest.mark.parametrize("opcode", [CLOSE, PING, PONG])
@pytest.mark.parametrize("n", [126, 200])
def test_control_frame_too_long(impl: ModuleType, opcode: int, n: int) -> None:
    assert ws_error(impl, wsframe(opcode, b"\x03\xe8" + b"r" * (n - 2))).ws_close_code == 1002


def test_control_frame_with_long_length_encoding_of_a_short_payload(impl: ModuleType) -> None:
    # the 7-bit length must be <= 125: 126/127 are protocol errors even for tiny payloads
    assert ws_error(impl, wsframe(PING, b"abc", len_bytes=2)).ws_close_code == 1002


def test_64_bit_length_with_top_bit(impl: ModuleType) -> None:
    head = b"\x82\xff" + struct.pack("!Q", 1 << 63) + MASK
    assert ws_error(impl, head, max_message=1 << 62).ws_close_code == 1002
    assert ws_error(impl, head).ws_close_code == 1002


def test_continuation_without_message(impl: ModuleType) -> None:
    assert ws_error(impl, wsframe(CONT, b"x")).ws_close_code == 1002
    data = wsframe(TEXT, b"done") + wsframe(CONT, b"x")
    parser = impl.WSParser()
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(TEXT, b"done"))
        parser.feed(wsframe(CONT, b"x"))
    assert info.value.ws_close_code == 1002
    assert ws_error(impl, data).ws_close_code == 1002


@pytest.mark.parametrize("first", [TEXT, BINARY])
@pytest.mark.parametrize("second", [TEXT, BINARY])
def test_new_message_during_fragmented_one(impl: ModuleType, first: int, second: int) -> None:
    data = wsframe(first, b"a", fin=False) + wsframe(second, b"b")
    assert ws_error(impl, data).ws_close_code == 1002


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (wsframe(TEXT, b"x", rsv=4), 1002),
        (wsframe(TEXT, b"ok\xff"), 1007),
        (wsframe(CLOSE, b"\x03\xed"), 1002),
        (wsframe(BINARY, b"", length=1 << 30), 1009),
    ],
)
def test_events_before_a_violation_ride_on_the_error(
    impl: ModuleType, bad: bytes, code: int
) -> None:
    parser = impl.WSParser()
    assert parser.feed(wsframe(TEXT, b"earlier feed")) == [(TEXT, b"earlier feed")]
    data = (
        wsframe(TEXT, b"one")
        + wsframe(BINARY, b"tw", fin=False)
        + wsframe(PING, b"p")
        + wsframe(CONT, b"o")
        + bad
        + wsframe(TEXT, b"never")
    )
    with pytest.raises(WebSocketError) as info:
        parser.feed(data)
    assert info.value.ws_close_code == code
    assert info.value.events == [(TEXT, b"one"), (PING, b"p"), (BINARY, b"two")]
    assert parser.closed


def test_error_events_are_empty_when_nothing_completed(impl: ModuleType) -> None:
    parser = impl.WSParser()
    assert parser.feed(wsframe(TEXT, b"abc", fin=False)) == []
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(CONT, b"d", rsv=1))
    assert info.value.events == []


def test_error_without_events_before_it_in_later_feeds(impl: ModuleType) -> None:
    parser = impl.WSParser()
    assert parser.feed(wsframe(TEXT, b"ok")) == [(TEXT, b"ok")]
    with pytest.raises(WebSocketError):
        parser.feed(wsframe(TEXT, b"x", rsv=4))
    assert parser.closed
    assert parser.feed(wsframe(TEXT, b"ok")) == []


# ---------------------------------------------------------------- size (1009)


def test_too_big_single_frame_fails_on_its_header(impl: ModuleType) -> None:
    parser = impl.WSParser(max_message=10)
    header = wsframe(BINARY, b"x" * 11)[:6]  # 2 bytes + mask: no payload yet
    with pytest.raises(WebSocketError) as info:
        parser.feed(header)
    assert info.value.ws_close_code == 1009
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert parser.closed


@pytest.mark.parametrize("n", [70_000, 1 << 40])
def test_too_big_extended_length_fails_on_its_header(impl: ModuleType, n: int) -> None:
    header = wsframe(BINARY, b"", length=n)  # header only: payload never sent
    assert ws_error(impl, header, max_message=65_536).ws_close_code == 1009


def test_too_big_across_fragments(impl: ModuleType) -> None:
    parser = impl.WSParser(max_message=10)
    assert parser.feed(wsframe(TEXT, b"123456", fin=False)) == []
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(CONT, b"78901")[:6])
    assert info.value.ws_close_code == 1009


# ---------------------------------------------------------------- UTF-8 (1007)

BAD_TEXT = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80"  # κόσμε + U+110000


def test_utf8_fails_fast_in_an_unfinished_frame(impl: ModuleType) -> None:
    data = wsframe(TEXT, BAD_TEXT + b"more to come")
    parser = impl.WSParser()
    start = 6 + BAD_TEXT.index(b"\xf4\x90")
    assert parser.feed(data[: start + 1]) == []  # ... \xf4 may still become valid
    with pytest.raises(WebSocketError) as info:
        parser.feed(data[start + 1 : start + 2])  # \x90 cannot follow \xf4
    assert info.value.ws_close_code == 1007
    assert info.value.code == ErrorCode.INVALID_UTF8
    assert parser.closed


@pytest.mark.parametrize(
    ("text", "bad_at"),
    [
        (BAD_TEXT, 12),
        (b"ok\xed\xa0\x80", 3),  # surrogate: \xa0 cannot follow \xed
        (b"ok\xc0\x80", 2),
        (b"ok\xe0\x80\x80", 3),
        (b"ok\xf0\x80\x80\x80", 3),
        (b"ok\xf5", 2),
        (b"ok\xff", 2),
        (b"ok\x80", 2),
        (b"\xc3(", 1),
    ],
)
def test_utf8_fails_at_the_first_impossible_byte(
    impl: ModuleType, text: bytes, bad_at: int
) -> None:
    data = wsframe(TEXT, text + b"\x00" * 20, fin=False)
    parser = impl.WSParser()
    for i in range(6 + bad_at):
        assert parser.feed(data[i : i + 1]) == []
    with pytest.raises(WebSocketError) as info:
        parser.feed(data[6 + bad_at : 7 + bad_at])
    assert info.value.ws_close_code == 1007


def test_utf8_fail_fast_in_a_continuation_frame(impl: ModuleType) -> None:
    parser = impl.WSParser()
    assert parser.feed(wsframe(TEXT, b"abc\xe2", fin=False)) == []
    assert parser.feed(wsframe(PING, b"")) == [(PING, b"")]
    cont = wsframe(CONT, b"\x82(" + b"x" * 50)
    assert parser.feed(cont[:7]) == []  # \x82 continues € correctly
    with pytest.raises(WebSocketError) as info:
        parser.feed(cont[7:8])  # "(" where \xac was needed
    assert info.value.ws_close_code == 1007


@pytest.mark.parametrize("tail", [b"\xe2", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3"])
def test_text_ending_inside_a_code_point(impl: ModuleType, tail: bytes) -> None:
    err = ws_error(impl, wsframe(TEXT, b"abc" + tail))
    assert err.ws_close_code == 1007
    data = wsframe(TEXT, b"abc" + tail, fin=False) + wsframe(CONT, b"")
    assert ws_error(impl, data).ws_close_code == 1007
    # a non-final fragment may end inside a code point
    parser = impl.WSParser()
    assert parser.feed(wsframe(TEXT, b"abc" + tail, fin=False)) == []
    assert not parser.closed


def test_client_mode_validates_too(impl: ModuleType) -> None:
    parser = impl.WSParser(client=True)
    assert parser.feed(wsframe(TEXT, "ünï".encode(), mask=None)) == [(TEXT, "ünï".encode())]
    with pytest.raises(WebSocketError) as info:
        parser.feed(wsframe(TEXT, b"\xff", mask=None))
    assert info.value.ws_close_code == 1007


# ---------------------------------------------------------------- property tests


@st.composite
def ws_streams(draw: st.DrawFn, client: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Random messages, randomly fragmented, with control frames between fragments.

    Returns the wire bytes and the events a parser must produce.
    """
    wire = bytearray()
    events: list[tuple[int, bytes]] = []

    def mask() -> bytes | None:
        return None if client else draw(st.binary(min_size=4, max_size=4))

    def controls() -> None:
        for op, payload in draw(
            st.lists(st.tuples(st.sampled_from([PING, PONG]), st.binary(max_size=125)), max_size=2)
        ):
            wire.extend(wsframe(op, payload, mask=mask()))
            events.append((op, payload))

    for _ in range(draw(st.integers(0, 5))):
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        if opcode == TEXT:
            payload = draw(st.text(max_size=200)).encode("utf-8")
        elif draw(st.integers(0, 9)) == 0:
            size = draw(st.sampled_from([126, 65535, 65536, 70_000]))
            payload = random.Random(size).randbytes(size)
        else:
            payload = draw(st.binary(max_size=300))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        pieces = [payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(payload)])]
        for i, piece in enumerate(pieces):
            controls()
            op = opcode if i == 0 else CONT
            wire.extend(wsframe(op, piece, fin=i == len(pieces) - 1, mask=mask()))
        events.append((opcode, payload))
    controls()
    if draw(st.booleans()):
        close = struct.pack("!H", draw(st.sampled_from([1000, 1001, 4000]))) + b"bye"
        wire.extend(wsframe(CLOSE, close, mask=mask()))
        events.append((CLOSE, close))
        wire.extend(wsframe(TEXT, b"after close", mask=mask()))
    return bytes(wire), events


def run_parser(mod: ModuleType, chunks: list[bytes], **kwargs: object) -> list[tuple[Any, ...]]:
    """Per-feed outcome: ("ok", events, closed) or ("error", class, ws_close_code, closed,
    the events completed in that feed before the violation)."""
    parser = mod.WSParser(**kwargs)
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            out.append(("ok", parser.feed(chunk), parser.closed))
        except WebSocketError as exc:
            out.append(("error", type(exc), exc.ws_close_code, parser.closed, exc.events))
    return out


@SLOW
@given(client=st.booleans(), data=st.data())
def test_random_streams_parse_to_their_messages(
    impl: ModuleType, client: bool, data: st.DataObject
) -> None:
    wire, expected = data.draw(ws_streams(client))
    chunks = chunked(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=40)))
    outcome = run_parser(impl, chunks, client=client)
    assert all(r[0] == "ok" for r in outcome)
    assert [e for r in outcome for e in r[1]] == expected


@SLOW
@given(client=st.booleans(), data=st.data())
def test_agree_on_valid_streams(
    core: ModuleType, ref: ModuleType, client: bool, data: st.DataObject
) -> None:
    wire, expected = data.draw(ws_streams(client))
    chunks = chunked(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=40)))
    result = run_parser(core, chunks, client=client)
    assert result == run_parser(ref, chunks, client=client)
    assert [e for r in result for e in r[1]] == expected


@st.composite
def damaged_ws_streams(draw: st.DrawFn) -> tuple[bytes, bool]:
    client = draw(st.booleans())
    wire, _ = draw(ws_streams(client))
    raw = bytearray(wire[:3000])
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "tail"]))
        pos = draw(st.integers(0, len(raw)))
        if kind == "flip" and pos < len(raw):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del raw[pos : pos + draw(st.integers(1, 5))]
        else:
            raw += draw(st.binary(max_size=30))
    return bytes(raw), client


@settings(SLOW, max_examples=300)
@given(
    stream=st.one_of(
        damaged_ws_streams(),
        st.tuples(st.binary(max_size=200), st.booleans()),
    ),
    max_message=st.one_of(st.just(1 << 20), st.integers(0, 300)),
    data=st.data(),
)
def test_agree_on_garbage(
    core: ModuleType,
    ref: ModuleType,
    stream: tuple[bytes, bool],
    max_message: int,
    data: st.DataObject,
) -> None:
    wire, client = stream
    chunks = chunked(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    chunks.append(wsframe(TEXT, b"later", mask=None if client else MASK))
    kwargs = {"max_message": max_message, "client": client}
    assert run_parser(core, chunks, **kwargs) == run_parser(ref, chunks, **kwargs)


@SLOW
@given(
    text=ANY_TEXT,
    flips=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=3),
    data=st.data(),
)
def test_agree_on_text_with_bad_bytes(
    core: ModuleType,
    ref: ModuleType,
    text: bytes,
    flips: list[tuple[int, int]],
    data: st.DataObject,
) -> None:
    raw = bytearray(text)
    for pos, value in flips:
        if raw:
            raw[pos % len(raw)] = value
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=3)))
    pieces = [bytes(raw[a:b]) for a, b in itertools.pairwise([0, *cuts, len(raw)])]
    wire = b"".join(
        wsframe(TEXT if i == 0 else CONT, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)
    )
    chunks = [wire[i : i + 1] for i in range(len(wire))]  # byte by byte: fail-fast timing
    result = run_parser(core, chunks)
    assert result == run_parser(ref, chunks)
    events = [e for r in result if r[0] == "ok" for e in r[1]]
    if python_says(bytes(raw)):
        assert events == [(TEXT, bytes(raw))]
    else:
        assert events == []
        assert ("error", WebSocketError, 1007, True, []) in result


VIOLATIONS = {
    "rsv": wsframe(TEXT, b"abc", rsv=4),
    "opcode": wsframe(0xB, b"abc"),
    "unmasked": wsframe(BINARY, b"abc", mask=None),
    "control-fin": wsframe(PING, b"abc", fin=False),
    "control-long": wsframe(PONG, b"x" * 126),
    "top-bit": b"\x82\xff" + struct.pack("!Q", 1 << 63) + MASK,
    "cont-first": wsframe(CONT, b"abc"),
    "text-in-fragmented": wsframe(BINARY, b"a", fin=False) + wsframe(TEXT, b"abc"),
    "too-big": wsframe(BINARY, b"x" * 400),
    "too-big-16": wsframe(BINARY, b"", length=70_000),
    "too-big-fragments": wsframe(TEXT, b"x" * 200, fin=False) + wsframe(CONT, b"y" * 200),
    "bad-utf8": wsframe(TEXT, b"abc\xf4\x90xyz"),
    "short-utf8": wsframe(TEXT, b"abc\xe2\x82"),
    "bad-close-code": wsframe(CLOSE, b"\x03\xed"),
    "bad-close-reason": wsframe(CLOSE, b"\x03\xe8\xff"),
    "close-1-byte": wsframe(CLOSE, b"\x03"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_agree_on_when_violations_fail(core: ModuleType, ref: ModuleType, name: str) -> None:
    """Fed one byte at a time, both fail on the same byte with the same close code."""
    wire = VIOLATIONS[name]
    chunks = [wire[i : i + 1] for i in range(len(wire))] + [wsframe(TEXT, b"next")]
    result = run_parser(core, chunks, max_message=300)
    assert result == run_parser(ref, chunks, max_message=300)
    assert [r[0] for r in result].count("error") == 1
    assert result[-1] == ("ok", [], True)  # dead after the error
