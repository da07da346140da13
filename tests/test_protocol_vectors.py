"""The byte-exact vectors of docs/protocol.md, checked against the code."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

import fastim._core as compiled
import fastim._pyref as pyref
from fastim import protocol as P

DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "protocol.md")
ROW = re.compile(r"^\| ([a-z0-9-]+) \| 0x([0-9a-f]{2}) \| `(.*)` \| `([0-9a-f]+)` \|$")


def load_vectors() -> list[tuple[str, int, dict[str, Any], bytes]]:
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("## Test vectors", 1)[1]
    rows = []
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            rows.append((m[1], int(m[2], 16), json.loads(m[3]), bytes.fromhex(m[4])))
    return rows


VECTORS = load_vectors()
F = P.FrameType


def pack(ftype: int, f: dict[str, Any]) -> bytes:
    """Build a payload from the vector's fields with fastim.protocol."""
    if ftype == F.HELLO:
        return P.pack_hello(f["min_version"], f["max_version"], str(f["options"]).encode())
    if ftype == F.WELCOME:
        return bytes((f["version"],)) + f["info"].encode()
    if ftype in (F.PING, F.PONG):
        return str(f["payload"]).encode()
    if ftype in (F.SUB, F.UNSUB, F.PUB):
        return P.pack_sub(ftype, f["id"], f["ch"], f.get("data", "").encode())
    if ftype == F.SUBSCRIBED:
        payload = P.pack_subscribed(f["id"], f["off"], f["ch"].encode(), f["epoch"], f["recovered"])
        assert P.unpack_subscribed(payload) == (
            f["id"],
            f["off"],
            f["ch"],
            f["epoch"],
            f["recovered"],
        )
        assert P.unpack_ack(payload) == (f["id"], f["off"], f["ch"])  # old decoders
        return payload
    if ftype == F.PUBACK:
        return P.pack_puback(f["id"], f["off"], f["ch"].encode())
    if ftype in (F.CMD, F.EVENT):
        return str(f["json"]).encode()
    if ftype == F.UNSUBSCRIBED:
        return P.pack_unsubscribed(f["id"], f["ch"].encode())
    if ftype in (F.MSG, F.DELTA):
        return P.pack_msg(f["off"], f["ch"].encode(), f["data"].encode())
    if ftype == F.ERROR:
        return P.pack_error(f["id"], f["code"], f["reason"])
    if ftype == F.GOAWAY:
        return P.pack_goaway(f["code"], f["reason"])
    raise AssertionError(f"no packer for 0x{ftype:02x}")


def test_every_frame_type_has_a_vector() -> None:
    assert {t for _n, t, _f, _b in VECTORS} == {int(t) for t in F}
    assert len(VECTORS) >= len(F)


@pytest.mark.parametrize("impl", [compiled, pyref], ids=["compiled", "pyref"])
@pytest.mark.parametrize("vector", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector(vector: tuple[str, int, dict[str, Any], bytes], impl: Any) -> None:
    _name, ftype, fields, frame = vector
    payload = pack(ftype, fields)
    assert impl.encode_frame(ftype, payload) == frame
    assert impl.FrameDecoder().feed(frame) == [(ftype, payload)]
    # and byte by byte
    dec = impl.FrameDecoder()
    got = []
    for i in range(len(frame)):
        got += dec.feed(frame[i : i + 1])
    assert got == [(ftype, payload)]


MSG_VECTORS = [v for v in VECTORS if v[1] == F.MSG]


@pytest.mark.parametrize("impl", [compiled, pyref], ids=["compiled", "pyref"])
@pytest.mark.parametrize("vector", MSG_VECTORS, ids=[v[0] for v in MSG_VECTORS])
def test_msg_vector_from_the_channel_encoder(
    vector: tuple[str, int, dict[str, Any], bytes], impl: Any
) -> None:
    """The hub's encoder (encode_msg) builds the same MSG frame, and wraps it unchanged."""
    _name, _ftype, f, frame = vector
    ch, off, data = f["ch"].encode(), f["off"], f["data"].encode()
    head = b'{"op":"msg","ch":' + json.dumps(f["ch"], ensure_ascii=False).encode() + b',"off":'
    subs = impl.SubscriberSet()
    for fmt in (impl.FMT_TCP, impl.FMT_WS_BINARY, impl.FMT_WS_JSON):
        subs.add(impl.OutRing(None, None, fmt=fmt))
    tcp, wsb, js = impl.encode_msg(subs, off, ch, head, data)
    assert tcp == frame == impl.encode_msg_one(impl.FMT_TCP, off, ch, head, data)
    assert wsb == bytes((0x82, len(frame))) + frame
    text = head + b"%d" % off + b',"data":' + data + b"}"
    assert js == bytes((0x81, len(text))) + text
    assert json.loads(text) == {"op": "msg", "ch": f["ch"], "off": off, "data": json.loads(data)}


DELTA_VECTORS = [v for v in VECTORS if v[1] == F.DELTA]


@pytest.mark.parametrize("impl", [compiled, pyref], ids=["compiled", "pyref"])
@pytest.mark.parametrize("vector", DELTA_VECTORS, ids=[v[0] for v in DELTA_VECTORS])
def test_delta_vector_from_the_channel_encoder(
    vector: tuple[str, int, dict[str, Any], bytes], impl: Any
) -> None:
    """The hub's delta encoder (encode_delta) builds the DELTA frame of the vector, and the
    JSON message with "delta":true; the delta turns base into target."""
    _name, _ftype, f, frame = vector
    ch, off, delta = f["ch"].encode(), f["off"], f["data"].encode()
    base, target = f["base"].encode(), f["target"].encode()
    assert impl.fossil_delta(base, target, True) == delta
    assert impl.fossil_apply(base, delta) == target
    head = b'{"op":"msg","ch":' + json.dumps(f["ch"], ensure_ascii=False).encode() + b',"off":'
    subs = impl.SubscriberSet()
    for fmt in (impl.FMT_TCP, impl.FMT_WS_BINARY, impl.FMT_WS_JSON):
        ring = impl.OutRing(None, None, fmt=fmt)
        subs.add(ring)
        subs.set_alt(ring)
    tcp, wsb, js, _wsbz, _jsz = impl.encode_delta(subs, off, ch, head, delta)
    assert tcp == frame
    assert wsb == bytes((0x82, len(frame))) + frame
    assert js is not None
    obj = json.loads(js[2:])
    assert obj == {"op": "msg", "ch": f["ch"], "off": off, "delta": True, "data": f["data"]}


@pytest.mark.parametrize("vector", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector_unpacks_to_its_fields(vector: tuple[str, int, dict[str, Any], bytes]) -> None:
    _name, ftype, f, frame = vector
    payload = frame[9:]
    if ftype in (F.SUB, F.UNSUB, F.PUB):
        req = P.unpack_request(ftype, payload)
        assert (req.id, req.channel, req.data) == (f["id"], f["ch"], f.get("data", "").encode())
    elif ftype in (F.SUBSCRIBED, F.PUBACK):
        assert P.unpack_ack(payload) == (f["id"], f["off"], f["ch"])
    elif ftype == F.UNSUBSCRIBED:
        assert P.unpack_unsubscribed(payload) == (f["id"], f["ch"])
    elif ftype in (F.MSG, F.DELTA):
        assert P.unpack_msg(payload) == (f["off"], f["ch"], f["data"].encode())
    elif ftype == F.ERROR:
        assert P.unpack_error(payload) == (f["id"], f["code"], f["reason"])
    elif ftype == F.GOAWAY:
        assert P.unpack_goaway(payload) == (f["code"], f["reason"])
    elif ftype == F.HELLO:
        assert P.negotiate(payload) == (1, f["options"].encode())


def test_negotiation_refuses_disjoint_ranges() -> None:
    from fastim.errors import ProtocolError

    with pytest.raises(ProtocolError) as e:
        P.negotiate(P.pack_hello(2, 9))
    assert e.value.code == P.ErrorCode.UNSUPPORTED_VERSION
    assert "1..1" in e.value.reason
