"""atheris target: the fastim frame decoder (FrameDecoder), any bytes, any chunking.

    .venv/bin/python fuzz/fuzz_frames.py -max_total_time=120

Checks, for each input: the compiled decoder and the pure-Python reference agree on
every feed (frames, or the exception class); only FrameTooLarge, UnknownFrameType and
ChecksumMismatch are raised; the frames of any chunking are a prefix of those fed byte
by byte, with the same verdict; buffered counts exactly the bytes not yet returned;
after an error the decoder stays dead.
"""

from __future__ import annotations

import sys
from typing import Any

import _common

_common.start(instrument=["fastim._pyref"])

import atheris  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from fastim import _pyref  # noqa: E402
from fastim.errors import ChecksumMismatch, FrameTooLarge, ProtocolError, UnknownFrameType  # noqa: E402
from fastim.protocol import CLIENT_FRAME_TYPES, type_mask  # noqa: E402

core = _common.core()
DOCUMENTED = (FrameTooLarge, UnknownFrameType, ChecksumMismatch)
CLIENT_MASK = type_mask(CLIENT_FRAME_TYPES)


def feed_all(mod: Any, chunks: list[bytes], max_frame: int, allowed: bytes | None) -> list[Any]:
    dec = mod.FrameDecoder(max_frame, allowed)
    out: list[Any] = []
    fed = taken = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            frames = dec.feed(chunk)
        except ProtocolError as e:
            if type(e) not in DOCUMENTED:
                raise AssertionError(f"undocumented exception {e!r}") from e
            out.append(("error", type(e)))
            continue
        for t, p in frames:
            assert isinstance(t, int) and isinstance(p, bytes)
            assert 0 <= t <= 255 and len(p) <= max_frame
            assert allowed is None or allowed[t]
            taken += 9 + len(p)
        assert dec.buffered == fed - taken, (dec.buffered, fed, taken)
        out.append(("ok", frames))
    return out


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_frame = fdp.PickValueInList([1 << 20, 0, 9, 64, 300, 4096])
    allowed = CLIENT_MASK if fdp.ConsumeBool() else None
    cuts = [fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    chunks = [*_common.cut(stream, cuts), b"", core.encode_frame(1, b"\x01\x01{}")]
    got = feed_all(core, chunks, max_frame, allowed)
    assert got == feed_all(_pyref, chunks, max_frame, allowed), "compiled and reference differ"
    errors = [r for r in got if r[0] == "error"]
    if errors:  # dead after the first error: every later feed raises the same class
        first = next(i for i, r in enumerate(got) if r[0] == "error")
        assert all(r == got[first] for r in got[first:]), got[first:]
    # chunking independence: byte by byte delivers the most; any cut delivers a prefix
    bytewise = feed_all(core, [stream[i : i + 1] for i in range(len(stream))], max_frame, allowed)
    all_frames = [f for r in bytewise if r[0] == "ok" for f in r[1]]
    frames = [f for r in got[:-2] if r[0] == "ok" for f in r[1]]
    assert frames == all_frames[: len(frames)]
    verdict = [r[1] for r in bytewise if r[0] == "error"][:1]
    assert [r[1] for r in got[:-2] if r[0] == "error"][:1] == verdict
    if not verdict:
        assert frames == all_frames


if __name__ == "__main__":
    _common.run(TestOneInput, "frames.dict")
    sys.exit(0)
