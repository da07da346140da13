"""Fossil delta compression, the readable way.

Reference twin of ``fastim/core/delta.pxi`` (``fossil_delta``, ``fossil_apply``,
``encode_delta``, ``json_string``), written from the format's description
(https://fossil-scm.org/home/doc/trunk/www/delta_format.wiki):

    delta   := <target length> "\\n" command* <checksum> ";"
    command := <n> "@" <offset> ","    copy n bytes of the source from offset
             | <n> ":" <n bytes>       insert these bytes

Integers are base 64 with the digits ``0-9 A-Z _ a-z ~``; the checksum is the 32-bit sum
of the target read as big-endian words. It is also the decoder the client SDK uses
(``fastim/client``), so the two sides of the wire share no compiled code path.
"""

from __future__ import annotations

import struct

import orjson
from typing_extensions import Buffer

from .encode import _msg_frame
from .fanout import (
    FMT_TCP,
    FMT_WS_BINARY,
    FMT_WS_BINARY_DEFLATE,
    FMT_WS_JSON,
    FMT_WS_JSON_DEFLATE,
    SubscriberSet,
)
from .websocket import OP_BINARY, OP_TEXT, ws_encode

#: the hub does not make deltas of messages (or against messages) larger than this
DELTA_MAX_INPUT = 1 << 20
#: the fastim frame type of a delta message (FrameType.DELTA in fastim/protocol.py)
DELTA_FRAME_TYPE = 0x25

_NHASH = 16
_CHAIN_LIMIT = 250
_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUE = {c: i for i, c in enumerate(_DIGITS)}


def _b64(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append(_DIGITS[v & 63])
        v >>= 6
        if not v:
            return bytes(reversed(out))


def _digits(v: int) -> int:
    return len(_b64(v))


def checksum(data: bytes) -> int:
    """Fossil's checksum: the sum of big-endian 32-bit words, the tail zero-padded."""
    n = len(data) - len(data) % 4
    total = sum(struct.unpack(f">{n // 4}I", data[:n])) if n else 0
    tail = data[n:]
    if tail:
        total += int.from_bytes(tail + b"\0" * (4 - len(tail)), "big")
    return total & 0xFFFFFFFF


def _hash(window: bytes) -> tuple[int, int]:
    a = b = 0
    for i, c in enumerate(window):
        a = (a + c) & 0xFFFF
        b = (b + (_NHASH - i) * c) & 0xFFFF
    return a, b


def _cont(c: int) -> bool:
    return c & 0xC0 == 0x80


def fossil_delta(src: Buffer, dst: Buffer, text: bool = False) -> bytes:
    """A delta from ``src`` to ``dst``; ``text``: copies start and end on UTF-8
    character boundaries of ``dst`` (a delta of UTF-8 text is then UTF-8 text)."""
    s, d = bytes(src), bytes(dst)
    out = bytearray(_b64(len(d)) + b"\n")
    if len(s) <= _NHASH:
        out += _b64(len(d)) + b":" + d + _b64(checksum(d)) + b";"
        return bytes(out)
    n_hash = -(-len(s) // _NHASH)
    landmark = [-1] * n_hash
    collide = [-1] * n_hash
    for i in range(0, len(s) - _NHASH, _NHASH):
        a, b = _hash(s[i : i + _NHASH])
        hv = (a | b << 16) % n_hash
        collide[i // _NHASH] = landmark[hv]
        landmark[hv] = i // _NHASH
    base = 0
    while base + _NHASH < len(d):
        best = (0, 0, 0)  # count, source offset, literal bytes before
        a, b = _hash(d[base : base + _NHASH])
        i = 0
        while True:
            block = landmark[(a | b << 16) % n_hash]
            limit = _CHAIN_LIMIT
            while block >= 0 and limit > 0:
                limit -= 1
                at = block * _NHASH
                j = 0
                while at + j < len(s) and base + i + j < len(d) and s[at + j] == d[base + i + j]:
                    j += 1
                k = 1
                while k < at and k <= i and s[at - k] == d[base + i - k]:
                    k += 1
                k -= 1
                ofst, cnt, lit = at - k, j + k, i - k
                if text and cnt > 0:
                    while cnt > 0 and _cont(d[base + lit]):
                        ofst, lit, cnt = ofst + 1, lit + 1, cnt - 1
                    while cnt > 0 and base + lit + cnt < len(d) and _cont(d[base + lit + cnt]):
                        cnt -= 1
                cost = _digits(lit) + _digits(cnt) + _digits(ofst) + 3
                if cnt >= cost and cnt > best[0]:
                    best = (cnt, ofst, lit)
                block = collide[block]
            cnt, ofst, lit = best
            if cnt:
                if lit:
                    out += _b64(lit) + b":" + d[base : base + lit]
                    base += lit
                base += cnt
                out += _b64(cnt) + b"@" + _b64(ofst) + b","
                break
            if base + i + _NHASH >= len(d):
                out += _b64(len(d) - base) + b":" + d[base:]
                base = len(d)
                break
            old, new = d[base + i], d[base + i + _NHASH]
            a = (a - old + new) & 0xFFFF
            b = (b - _NHASH * old + a) & 0xFFFF
            i += 1
    if base < len(d):
        out += _b64(len(d) - base) + b":" + d[base:]
    out += _b64(checksum(d)) + b";"
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def number(self, what: str) -> int:
        start = self.pos
        v = 0
        while self.pos < len(self.data) and self.data[self.pos] in _VALUE:
            v = v << 6 | _VALUE[self.data[self.pos]]
            self.pos += 1
            if v > 0xFFFFFFFF:
                raise ValueError(f"delta: {what} over 32 bits")
        if self.pos == start:
            raise ValueError(f"delta: {what} expected")
        return v

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("delta: unterminated (no checksum)")
        self.pos += 1
        return self.data[self.pos - 1]


def fossil_apply(src: Buffer, delta: Buffer, max_size: int = DELTA_MAX_INPUT * 64) -> bytes:
    """The target ``delta`` makes from ``src``; ValueError if it is not a valid delta for
    it (bounds, size, checksum), or announces a target over ``max_size`` bytes."""
    s = bytes(src)
    r = _Reader(bytes(delta))
    size = r.number("the target size")
    if r.byte() != 0x0A:
        raise ValueError("delta: the target size is not terminated by a newline")
    if size > max_size:
        raise ValueError(f"delta: a target of {size} bytes is over {max_size}")
    out = bytearray()
    while r.pos < len(r.data):
        cnt = r.number("a count")
        op = r.byte()
        if op == 0x40:  # @
            ofst = r.number("an offset")
            if r.byte() != 0x2C:
                raise ValueError("delta: copy command not terminated by ','")
            if len(out) + cnt > size:
                raise ValueError("delta: copy exceeds the target size")
            if ofst + cnt > len(s):
                raise ValueError("delta: copy extends past the end of the source")
            out += s[ofst : ofst + cnt]
        elif op == 0x3A:  # :
            if len(out) + cnt > size:
                raise ValueError("delta: insert exceeds the target size")
            if cnt > len(r.data) - r.pos:
                raise ValueError("delta: insert extends past the end of the delta")
            out += r.data[r.pos : r.pos + cnt]
            r.pos += cnt
        elif op == 0x3B:  # ;
            if len(out) != size:
                raise ValueError("delta: the target is shorter than announced")
            if checksum(bytes(out)) != cnt:
                raise ValueError("delta: bad checksum")
            return bytes(out)
        else:
            raise ValueError(f"delta: unknown command {chr(op)!r}")
    raise ValueError("delta: unterminated (no checksum)")


def json_string(data: Buffer) -> bytes:
    """UTF-8 ``data`` as a JSON string (quotes, backslashes and control bytes escaped;
    everything else, non-ASCII too, as is)."""
    return orjson.dumps(bytes(data).decode("utf-8"))


def encode_delta(
    subs: SubscriberSet, offset: int, channel: bytes, json_head: bytes, delta: Buffer
) -> tuple[bytes | None, ...]:
    """The delta message in each wire format some *alt* member of ``subs`` uses, for
    ``subs.fanout(full, alt=...)``: a DELTA frame (the MSG layout, type 0x25), it inside
    a WebSocket binary frame, and ``{"op":"msg",...,"off":N,"delta":true,"data":"..."}``
    (only when the delta is UTF-8; else None: those members get the full message). The
    deflate formats get the plain frames (deltas are small)."""
    d = bytes(delta)
    tcp = subs.alt_count(FMT_TCP)
    wsb_n = subs.alt_count(FMT_WS_BINARY) + subs.alt_count(FMT_WS_BINARY_DEFLATE)
    js_n = subs.alt_count(FMT_WS_JSON) + subs.alt_count(FMT_WS_JSON_DEFLATE)
    frame = wsb = js = None
    if tcp or wsb_n:
        msg = _msg_frame(offset, channel, d)
        frame = msg[:4] + bytes((DELTA_FRAME_TYPE,)) + msg[5:]
        if wsb_n:
            wsb = ws_encode(OP_BINARY, frame)
    if js_n:
        try:
            text = json_string(d)
        except UnicodeDecodeError:
            text = None
        if text is not None:
            body = json_head + str(offset).encode() + b',"delta":true,"data":' + text + b"}"
            js = ws_encode(OP_TEXT, body)
    return (frame if tcp else None, wsb, js, wsb, js)
