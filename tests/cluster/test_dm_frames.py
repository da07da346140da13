"""The DM link frame (0x48): codec round trip, and batches over a real link in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastim.cluster import frames as F
from fastim.cluster.frames import DmEntry, LinkFrame
from fastim.cluster.link import LinkHandler, Links, LinkServer

users = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)


@given(st.lists(st.tuples(users, st.integers(0, 2**64 - 1), st.binary(max_size=300)), max_size=20))
def test_dm_batches_round_trip(items: list[tuple[str, int, bytes]]) -> None:
    payload = F.pack_batch(len(items), b"".join(F.pack_dm(*i) for i in items))
    assert F.unpack_dm(payload) == [DmEntry(*i) for i in items]
    if items:
        with pytest.raises(F.LinkDecodeError):
            F.unpack_dm(payload[:-1])
    with pytest.raises(F.LinkDecodeError):
        F.unpack_dm(payload + b"x")


def test_dm_codec_edges() -> None:
    assert int(LinkFrame.DM) == 0x48
    assert F.ACCEPTOR_ACCEPTS[LinkFrame.DM] == 1 and F.DIALER_ACCEPTS[LinkFrame.DM] == 0
    with pytest.raises(ValueError):
        F.pack_dm("x" * 256, 1, b"{}")  # user ids are at most 255 bytes
    entry = F.pack_dm("é/ü", 2**64 - 1, b'{"op":"dm"}')
    assert F.unpack_dm(F.pack_batch(1, entry)) == [DmEntry("é/ü", 2**64 - 1, b'{"op":"dm"}')]
    with pytest.raises(F.LinkDecodeError):
        F.unpack_dm(F.pack_batch(1, b"\x02\xff\xfe" + entry[3:]))  # not UTF-8


class DmRecorder(LinkHandler):
    def __init__(self) -> None:
        self.batches: list[list[DmEntry]] = []

    def on_dm(self, peer: str, items: list[DmEntry]) -> None:
        self.batches.append(items)


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


async def test_dms_in_one_tick_are_one_frame_in_order() -> None:
    rec = DmRecorder()
    server = LinkServer("b", "c", rec, timeout=2.0)
    await server.start()
    links = Links("a", "c", heartbeat=0.2, timeout=1.0, backoff=(0.02, 0.2))
    try:
        links.sync({"b": server.address})
        link = links.get("b")
        assert link is not None and await link.wait_up(5)
        for i in range(1, 501):
            assert links.dm("b", f"u{i % 7}", i, b'{"op":"dm","seq":%d}' % i)
        await until(lambda: sum(map(len, rec.batches)) == 500, 5, "500 DMs arrive")
        assert len(rec.batches) == 1  # one tick: one frame
        got = [e for b in rec.batches for e in b]
        assert [e.seq for e in got] == list(range(1, 501))
        assert got[6] == DmEntry("u0", 7, b'{"op":"dm","seq":7}')
        assert server.frames_in[LinkFrame.DM] == 1
        assert not links.dm("nobody", "u", 1, b"{}")  # no link to that node
    finally:
        await links.close()
        await server.close()
