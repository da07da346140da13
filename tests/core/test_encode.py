"""encode_msg / encode_msg_one: a channel message in every wire format, on both impls.

The property tests compare with the Python path the hub used before the compiled one
(kept here verbatim, on the compiled frame and WebSocket encoders): same bytes, in the
same tuple shape, for any subscriber mix, channel, offset, data and deflate setting.
"""

from __future__ import annotations

import struct
import zlib
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastim import _core
from fastim.hub import Deflater
from fastim.protocol import FrameType, unpack_msg

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)

_OFF_CH = struct.Struct("!QB")


def json_head(name: str) -> bytes:
    return b'{"op":"msg","ch":' + orjson.dumps(name) + b',"off":'


def old_encode(
    counts: list[int], name: str, offset: int, data: bytes, deflater: Any
) -> tuple[bytes | None, ...]:
    """Channel.encode before P9 (fastim/hub.py), on the compiled primitives."""
    name_b = name.encode()
    n_tcp, n_wsb, n_js, n_wsbz, n_jsz, n_sse = counts
    tcp = wsb = wsbz = js = jsz = None
    if n_tcp or n_wsb or n_wsbz:
        frame = _core.encode_frame(0x23, _OFF_CH.pack(offset, len(name_b)) + name_b + data)
        if n_tcp:
            tcp = frame
        if n_wsb or (n_wsbz and deflater is None):
            wsb = _core.ws_encode(_core.OP_BINARY, frame)
        if n_wsbz:
            wsbz = wsb if deflater is None else deflater.frame(_core.OP_BINARY, frame, wsb)
    if n_js or n_jsz:
        text = b"".join((json_head(name), str(offset).encode(), b',"data":', data, b"}"))
        if n_js or deflater is None:
            js = _core.ws_encode(_core.OP_TEXT, text)
        if n_jsz:
            jsz = js if deflater is None else deflater.frame(_core.OP_TEXT, text, js)
    if n_sse:  # P12: SSE connections (the JSON as one event, built the old way)
        sse = old_encode_one(_core.FMT_SSE, name, offset, data)
        return tcp, wsb if n_wsb else None, js if n_js else None, wsbz, jsz, sse
    if n_wsbz or n_jsz:
        return tcp, wsb if n_wsb else None, js if n_js else None, wsbz, jsz
    return tcp, wsb, js


def old_encode_one(fmt: int, name: str, offset: int, data: bytes) -> bytes:
    name_b = name.encode()
    frame = _core.encode_frame(0x23, _OFF_CH.pack(offset, len(name_b)) + name_b + data)
    if fmt == _core.FMT_TCP:
        return frame
    if fmt in (_core.FMT_WS_BINARY, _core.FMT_WS_BINARY_DEFLATE):
        return _core.ws_encode(_core.OP_BINARY, frame)
    text = b"".join((json_head(name), str(offset).encode(), b',"data":', data, b"}"))
    if fmt == _core.FMT_SSE:  # one Server-Sent Event; raw line breaks as spaces
        return b"data: " + text.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n\n"
    return _core.ws_encode(_core.OP_TEXT, text)


def subscribers(impl: ModuleType, counts: list[int]) -> Any:
    subs = impl.SubscriberSet()
    for fmt, n in enumerate(counts):
        for _ in range(n):
            subs.add(impl.OutRing(None, None, fmt=fmt))
    return subs


channels = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=80).filter(
    lambda s: len(s.encode()) <= 255
)
offsets = st.one_of(
    st.integers(0, 20), st.integers(0, 2**64 - 1), st.sampled_from([9, 10, 99, 100, 2**64 - 1])
)
# lengths around the WebSocket header's 7-bit / 16-bit / 64-bit length forms
datas = st.one_of(
    st.binary(max_size=300),
    st.integers(60, 140).map(lambda n: b"x" * n),
    st.integers(65400, 65600).map(lambda n: b'"' + b"y" * n + b'"'),
)
mixes = st.lists(st.integers(0, 2), min_size=6, max_size=6)


def test_msg_frame_type_is_the_protocols(impl: ModuleType) -> None:
    assert impl.MSG_FRAME_TYPE == FrameType.MSG


@SLOW
@given(mix=mixes, name=channels, offset=offsets, data=datas, deflate=st.sampled_from([0, 1, 2]))
def test_compiled_encode_msg_equals_the_old_python_path(
    mix: list[int], name: str, offset: int, data: bytes, deflate: int
) -> None:
    # deflate: 0 none, 1 compress when it pays, 2 min_size above any message (plain frames)
    def deflater() -> Deflater | None:
        return None if deflate == 0 else Deflater(6, 64 if deflate == 1 else 1 << 20)

    got = _core.encode_msg(
        subscribers(_core, mix), offset, name.encode(), json_head(name), data, deflater()
    )
    want = old_encode(mix, name, offset, data, deflater())
    assert got == want
    assert all(f is None or type(f) is bytes for f in got)


@SLOW
@given(mix=mixes, name=channels, offset=offsets, data=datas, deflate=st.booleans())
def test_compiled_and_reference_agree(
    mix: list[int], name: str, offset: int, data: bytes, deflate: bool
) -> None:
    import fastim._pyref as ref

    args = (offset, name.encode(), json_head(name), data)
    got = _core.encode_msg(subscribers(_core, mix), *args, Deflater() if deflate else None)
    want = ref.encode_msg(subscribers(ref, mix), *args, Deflater() if deflate else None)
    assert got == want
    for fmt in range(_core.N_FORMATS + 1):
        assert _core.encode_msg_one(fmt, *args) == ref.encode_msg_one(fmt, *args)


@SLOW
@given(name=channels, offset=offsets, data=datas, fmt=st.integers(0, 6))
def test_encode_msg_one_equals_the_old_python_path(
    name: str, offset: int, data: bytes, fmt: int
) -> None:
    got = _core.encode_msg_one(fmt, offset, name.encode(), json_head(name), data)
    assert got == old_encode_one(fmt, name, offset, data)


def test_the_formats_decode_to_the_message(impl: ModuleType) -> None:
    data = b'{"text":"hi"}'
    frames = impl.encode_msg(
        subscribers(impl, [1, 1, 1, 0, 0]), 17, "café".encode(), json_head("café"), data
    )
    tcp, wsb, js = frames
    assert impl.FrameDecoder().feed(tcp) == [(0x23, tcp[9:])]
    assert unpack_msg(tcp[9:]) == (17, "café", data)
    assert zlib.crc32(tcp[9:]) == struct.unpack("!I", tcp[5:9])[0]
    assert impl.WSParser(client=True).feed(wsb) == [(impl.OP_BINARY, tcp)]
    [(op, text)] = impl.WSParser(client=True).feed(js)
    assert op == impl.OP_TEXT
    assert orjson.loads(text) == {"op": "msg", "ch": "café", "off": 17, "data": {"text": "hi"}}


def test_only_the_formats_in_use_are_built(impl: ModuleType) -> None:
    args = (5, b"ch", json_head("ch"), b"1")
    assert impl.encode_msg(impl.SubscriberSet(), *args) == (None, None, None)
    tcp, wsb, js = impl.encode_msg(subscribers(impl, [0, 0, 3, 0, 0]), *args)
    assert tcp is None and wsb is None and js is not None
    out = impl.encode_msg(subscribers(impl, [0, 0, 0, 1, 0]), *args)
    assert len(out) == 5 and out[:3] == (None, None, None) and out[4] is None
    assert out[3] == impl.encode_msg_one(impl.FMT_WS_BINARY, *args)  # no deflater: plain


def test_deflate_formats_are_compressed_once_for_all(impl: ModuleType) -> None:
    data = orjson.dumps({"text": "hello " * 100})
    deflater = Deflater(6, 64)
    out = impl.encode_msg(
        subscribers(impl, [0, 1, 1, 2, 2]), 3, b"room", json_head("room"), data, deflater
    )
    assert deflater.messages == 2  # once per deflate format, not per subscriber
    for plain, packed in ((out[1], out[3]), (out[2], out[4])):
        assert packed[0] & 0x40 and not plain[0] & 0x40  # RSV1: compressed
        [(op, body)] = impl.WSParser(client=True, deflate=True).feed(packed)
        assert op & impl.OP_COMPRESSED
        assert impl.ws_inflate(body, 1 << 20) == impl.WSParser(client=True).feed(plain)[0][1]


def test_data_may_be_any_buffer(impl: ModuleType) -> None:
    args = (1, b"c", json_head("c"))
    want = impl.encode_msg(subscribers(impl, [1, 1, 1, 1, 1]), *args, b"[1,2]")
    for data in (bytearray(b"[1,2]"), memoryview(b"x[1,2]x")[1:-1]):
        assert impl.encode_msg(subscribers(impl, [1, 1, 1, 1, 1]), *args, data) == want


def test_a_channel_name_longer_than_a_msg_frame_holds_is_refused() -> None:
    name = b"n" * 256
    with pytest.raises(ValueError):
        _core.encode_msg(subscribers(_core, [1, 0, 0, 0, 0]), 1, name, json_head("n" * 256), b"1")
    # a JSON-only channel never builds the MSG frame (as before)
    (_t, _b, js) = _core.encode_msg(
        subscribers(_core, [0, 0, 1, 0, 0]), 1, name, json_head("n" * 256), b"1"
    )
    assert js is not None


def test_sse_event_vector(impl: ModuleType) -> None:
    """FMT_SSE: ``data: <the WebSocket JSON>`` and a blank line; raw line breaks of the
    data (JSON whitespace) become spaces, so the event stays one ``data:`` line."""
    subs = subscribers(impl, [0, 0, 1, 0, 0, 1])
    frames = impl.encode_msg(subs, 7, b"room", json_head("room"), b'{"a":\r\n 1}')
    assert len(frames) == 6
    assert frames[impl.FMT_SSE] == b'data: {"op":"msg","ch":"room","off":7,"data":{"a":   1}}\n\n'
    assert frames[impl.FMT_WS_JSON].endswith(b'"data":{"a":\r\n 1}}')  # untouched there
    one = impl.encode_msg_one(impl.FMT_SSE, 7, b"room", json_head("room"), b"[1]")
    assert one == b'data: {"op":"msg","ch":"room","off":7,"data":[1]}\n\n'
    assert impl.encode_msg(subscribers(impl, [1, 0, 1, 0, 0, 0]), 1, b"r", json_head("r"), b"1")[
        impl.FMT_TCP
    ]  # no SSE subscriber: the three-entry tuple as before
