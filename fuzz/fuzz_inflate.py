"""atheris target: ws_inflate (permessage-deflate messages), arbitrary and damaged DEFLATE data.

    .venv/bin/python fuzz/fuzz_inflate.py -max_total_time=120

Each input is either raw payload bytes or a message that is compressed here (level and
flush from the input) and then damaged (byte sets, truncation). Checks: the compiled
ws_inflate and the reference agree (bytes, or the close code); only WebSocketError with
1007 or 1009 is raised; the output never exceeds max_size; text comes out as UTF-8; an
undamaged message inflates back to itself when it fits, and is 1009 when it does not.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import _common

_common.start(instrument=["fastim._pyref"])

import atheris  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from fastim import _pyref  # noqa: E402
from fastim.errors import WebSocketError  # noqa: E402

core = _common.core()


def outcome(mod: Any, payload: bytes, max_size: int, text: bool) -> tuple[Any, ...]:
    try:
        out = mod.ws_inflate(payload, max_size, text)
    except WebSocketError as e:
        assert e.ws_close_code in (1007, 1009), e
        return ("error", e.ws_close_code)
    assert isinstance(out, bytes) and len(out) <= max_size
    if text:
        out.decode("utf-8")
    return ("ok", out)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeBool()
    max_size = fdp.PickValueInList([0, 1, 10, 100, 1000, 4096, 1 << 20])
    message = None
    if fdp.ConsumeBool():
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        level = fdp.ConsumeIntInRange(0, 9)
        damage = [(fdp.ConsumeIntInRange(0, 4096), fdp.ConsumeIntInRange(0, 255))
                  for _ in range(fdp.ConsumeIntInRange(0, 3))]  # fmt: skip
        truncate = fdp.ConsumeIntInRange(0, 8192) if fdp.ConsumeBool() else None
        message = fdp.ConsumeBytes(fdp.remaining_bytes())
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        raw = bytearray((c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4])
        for pos, value in damage:
            if raw:
                raw[pos % len(raw)] = value
        if truncate is not None:
            del raw[truncate:]
        if damage or truncate is not None:
            message = None
        payload = bytes(raw)
    got = outcome(core, payload, max_size, text)
    assert got == outcome(_pyref, payload, max_size, text), "compiled and reference differ"
    if message is not None:
        if len(message) > max_size:
            assert got == ("error", 1009), got
        elif not text or _pyref.utf8_valid(message):
            assert got == ("ok", message), got
        else:
            assert got == ("error", 1007), got


if __name__ == "__main__":
    _common.run(TestOneInput)
    sys.exit(0)
