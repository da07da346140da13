"""The WebSocket parser target, for both sides (fuzz_ws_server.py, fuzz_ws_client.py).

Each input is either raw bytes or, half of the time, frames built from it (opcode, FIN,
RSV bits, mask, payload: consistent headers reach deeper). Then, for the compiled parser
and the pure-Python reference, fed in the input's chunking: both agree on every feed
(events, error close code, closed flag, events carried by the error); only
WebSocketError (1002/1007/1009) is raised; the events do not depend on the chunking
(whole-stream feed as reference); every event is well formed (UTF-8 text, sizes,
valid close payloads, compressed only with permessage-deflate, nothing after a close);
after a close or an error the parser returns nothing more. Compressed messages are then
inflated by both ws_inflate implementations: same result, bounded by max_message.
"""

from __future__ import annotations

import struct
from typing import Any

import _common
import atheris  # type: ignore[import-untyped,unused-ignore]

from fastim import _pyref
from fastim.errors import WebSocketError

core = _common.core()
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
Z = core.OP_COMPRESSED


def build_frames(fdp: Any, client: bool) -> bytes:
    out = bytearray()
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        b0 = fdp.ConsumeIntInRange(0, 255)
        if fdp.ConsumeIntInRange(0, 3):  # mostly FIN, no RSV2/3, a known opcode
            b0 = (b0 & 0xC0) | 0x80 | fdp.PickValueInList([0, 1, 2, 8, 9, 10, 0, 1])
            if fdp.ConsumeBool():
                b0 &= 0x7F
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        if b0 & 0x0F == 8 and fdp.ConsumeBool():
            code = fdp.PickValueInList([1000, 1001, 1002, 3000, 4999, 1005, 999])
            payload = struct.pack("!H", code) + payload[:20]
        masked = (not client) if fdp.ConsumeIntInRange(0, 15) else client
        mask = fdp.ConsumeBytes(4).ljust(4, b"\0") if masked else None
        n = len(payload)
        if n < 126:
            out += bytes((b0, (0x80 if mask else 0) | n))
        elif n < 65536:
            out += bytes((b0, (0x80 if mask else 0) | 126)) + struct.pack("!H", n)
        else:
            out += bytes((b0, (0x80 if mask else 0) | 127)) + struct.pack("!Q", n)
        if mask:
            out += mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        else:
            out += payload
    return bytes(out)


def feed_all(mod: Any, chunks: list[bytes], **kwargs: Any) -> list[tuple[Any, ...]]:
    parser = mod.WSParser(**kwargs)
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        was_closed = parser.closed
        try:
            events = parser.feed(chunk)
        except WebSocketError as e:
            assert type(e) is WebSocketError and e.ws_close_code in (1002, 1007, 1009), e
            assert not was_closed and parser.closed
            out.append(("error", e.ws_close_code, list(e.events)))
            continue
        if was_closed:
            assert events == [], "events from a closed parser"
        out.append(("ok", events, parser.closed))
    return out


def events_of(result: list[tuple[Any, ...]]) -> list[tuple[int, bytes]]:
    return [e for r in result for e in (r[2] if r[0] == "error" else r[1])]


def check_events(events: list[tuple[int, bytes]], max_message: int, deflate: bool) -> None:
    for i, (op, payload) in enumerate(events):
        if op in (TEXT, BINARY, TEXT | Z, BINARY | Z):
            assert len(payload) <= max_message
            assert deflate or not op & Z
            if op == TEXT:
                payload.decode("utf-8")
        elif op in (PING, PONG):
            assert len(payload) <= 125
        elif op == CLOSE:
            assert len(payload) <= 125 and i == len(events) - 1
            core.ws_parse_close(payload)
        else:
            raise AssertionError(f"undocumented opcode {op:#x}")


def inflate(mod: Any, payload: bytes, max_size: int, text: bool) -> tuple[Any, ...]:
    try:
        out = mod.ws_inflate(payload, max_size, text)
    except WebSocketError as e:
        assert e.ws_close_code in (1007, 1009)
        return ("error", e.ws_close_code)
    assert len(out) <= max_size
    return ("ok", out)


def test_one_input(data: bytes, client: bool) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    deflate = fdp.ConsumeBool()
    max_message = fdp.PickValueInList([1 << 20, 0, 1, 125, 126, 300, 65536])
    cuts = [fdp.ConsumeIntInRange(0, 2048) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    stream = build_frames(fdp, client) if fdp.ConsumeBool() else fdp.ConsumeBytes(4096)
    kwargs = {"max_message": max_message, "client": client, "deflate": deflate}
    chunks = _common.cut(stream, cuts)
    got = feed_all(core, chunks, **kwargs)
    assert got == feed_all(_pyref, chunks, **kwargs), "compiled and reference differ"
    events = events_of(got)
    check_events(events, max_message, deflate)
    whole = feed_all(core, [stream], **kwargs)
    assert events == events_of(whole), "the events depend on the chunking"
    assert [r[1] for r in got if r[0] == "error"] == [r[1] for r in whole if r[0] == "error"]
    for op, payload in events:
        if op & Z:
            text = op == TEXT | Z
            a = inflate(core, payload, max_message, text)
            assert a == inflate(_pyref, payload, max_message, text), "ws_inflate differs"
