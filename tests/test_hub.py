"""The hub: offsets, history, encode-once per format, channel lifetime."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import orjson
import pytest

from fastim import _core
from fastim.config import Config
from fastim.hub import Hub, HubError
from fastim.protocol import FrameType, unpack_msg


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def ring(flusher: _core.Flusher, fmt: int) -> tuple[_core.OutRing, Sink]:
    s = Sink()
    return _core.OutRing(flusher, s, fmt, 1 << 20), s


def test_offsets_are_consecutive_and_history_keeps_the_last_n() -> None:
    hub = Hub(Config(history_size=3))
    offs = [hub.publish("a", b'{"n":%d}' % i) for i in range(5)]
    assert offs == [1, 2, 3, 4, 5]
    assert hub.publish("b", b"1") == 1  # per channel
    ch = hub.channels["a"]
    # history items are (data, publish time)
    kept = ch.history.since(2)
    assert kept is not None
    assert [(o, cast("tuple[bytes, float]", item)[0]) for o, item in kept] == [
        (3, b'{"n":2}'),
        (4, b'{"n":3}'),
        (5, b'{"n":4}'),
    ]
    assert ch.history.since(1) is None  # evicted


def test_each_format_gets_its_encoding_and_only_used_formats_are_built() -> None:
    hub = Hub(Config())
    fl = _core.Flusher(None)
    (rt, st), (rb, sb), (rj, sj) = (ring(fl, f) for f in range(3))
    ch = hub.join("news", rt)
    assert ch.encode(1, b"{}")[1:] == (None, None)  # nobody on WS yet: nothing built for it
    hub.join("news", rb)
    hub.join("news", rj)
    off = hub.publish("news", b'{"x":"\xc3\xa9"}')
    fl.flush()
    [(t, p)] = _core.FrameDecoder().feed(st.data)
    assert t == FrameType.MSG and unpack_msg(p) == (off, "news", b'{"x":"\xc3\xa9"}')
    parser = _core.WSParser(client=True)
    [(op, inner)] = parser.feed(sb.data)
    assert op == _core.OP_BINARY and inner == st.data
    [(op, text)] = _core.WSParser(client=True).feed(sj.data)
    assert op == _core.OP_TEXT
    assert orjson.loads(text) == {"op": "msg", "ch": "news", "off": off, "data": {"x": "é"}}
    assert hub.delivered == 3


def test_channels_without_subscribers_expire_after_ttl() -> None:
    hub = Hub(Config(history_ttl=10))
    fl = _core.Flusher(None)
    r, _ = ring(fl, 0)
    hub.now = 100.0
    hub.join("keep", r)
    hub.publish("gone", b"1")
    assert hub.sweep(105.0) == 0
    assert hub.sweep(111.0) == 1
    assert set(hub.channels) == {"keep"}
    hub.publish("keep", b"1")
    hub.now = 200.0
    hub.leave("keep", r)  # idle from now on
    assert hub.sweep(205.0) == 0
    hub.now = 0
    assert hub.sweep(1000.0) == 1
    assert hub.channels == {}


def test_no_history_means_no_idle_channels() -> None:
    hub = Hub(Config(history_size=0))
    hub.publish("x", b"1")
    assert hub.channels == {}


def test_channel_limit() -> None:
    hub = Hub(Config(max_channels=2))
    hub.publish("a", b"1")
    hub.publish("b", b"1")
    with pytest.raises(HubError) as e:
        hub.publish("c", b"1")
    assert "maximum of 2 channels" in e.value.reason


# ------------------------------------------------------------------ idempotency keys


def test_a_memory_channel_publishes_a_key_once_within_the_window() -> None:
    hub = Hub(Config(history_size=0, idempotency_window=10))
    fl = _core.Flusher(None)
    r, sink = ring(fl, 0)
    hub.join("m", r)
    assert hub.publish("m", b"1", None, "k1") == 1
    assert hub.publish("m", b"2") == 2
    assert hub.publish("m", b"1 again", None, "k1") == 1  # the first one's offset
    assert hub.publish("m", b"3", None, "k3") == 3
    assert hub.published == 3 and hub.duplicates == 1
    fl.flush()
    got = [p for _, p in _core.FrameDecoder().feed(sink.data)]
    assert [unpack_msg(p)[0] for p in got] == [1, 2, 3]  # delivered once
    # no history, no subscriber: still kept (idle) while it remembers a key
    hub.leave("m", r)
    assert "m" in hub.channels and hub.publish("m", b"x", None, "k1") == 1
    hub.now = 11.0  # the window ended
    assert hub.publish("m", b"1 later", None, "k1") == 4
    hub.now = 22.0
    hub.sweep(hub.now + 1000)
    assert "m" not in hub.channels


def test_window_zero_remembers_nothing() -> None:
    hub = Hub(Config(idempotency_window=0))
    assert hub.publish("z", b"1", None, "k") == 1
    assert hub.publish("z", b"1", None, "k") == 2


async def test_a_durable_channel_records_the_key_with_the_append(tmp_path: Path) -> None:
    """Keyed and plain publishes of one tick: one store call, the repeats answered with
    the first offset (``duplicate``) and not delivered; the sqlite store then still
    refuses the key after a restart (a node killed after the append, before its ack
    reached the publisher: the retry is answered, not stored)."""
    from fastim.hub import Published
    from fastim.store import SqliteStore

    store = await SqliteStore.open(tmp_path / "s.db")
    hub = Hub(Config(store="sqlite"), store)
    answers: list[Published] = []
    fl = _core.Flusher(None)
    r, sink = ring(fl, 0)
    hub.join("d", r)
    await asyncio.sleep(0)
    for data, key in [(b"1", "a"), (b"2", None), (b"1 twice", "a"), (b"3", "c")]:
        assert hub.publish("d", data, answers.append, key) is None
    for _ in range(200):
        if len(answers) == 4:
            break
        await asyncio.sleep(0.01)
    assert [(a.offset, a.duplicate) for a in answers] == [
        (1, False),
        (2, False),
        (1, True),
        (3, False),
    ]
    fl.flush()
    assert [unpack_msg(p)[0] for _, p in _core.FrameDecoder().feed(sink.data)] == [1, 2, 3]
    await hub.close()
    await store.close()
    # a new node on the same file: the key is still there
    store = await SqliteStore.open(tmp_path / "s.db")
    hub = Hub(Config(store="sqlite"), store)
    answers.clear()
    hub.publish("d", b"1 after restart", answers.append, "a")
    hub.publish("d", b"4", answers.append, "d")
    for _ in range(200):
        if len(answers) == 2:
            break
        await asyncio.sleep(0.01)
    assert [(a.offset, a.duplicate) for a in answers] == [(1, True), (4, False)]
    assert [d for _, d in (await store.read("d", 0)).messages] == [b"1", b"2", b"3", b"4"]
    await hub.close()
    await store.close()
