"""The hub's delta rule against a model, on random histories (hypothesis).

Subscribers (some asking for deltas, some not) subscribe with or without ``since``,
unsubscribe, and read their rings as a client would, while documents are published, the
offsets jump (a gap the node could not fill) and the epoch changes. The property: a
DELTA frame only ever reaches a subscriber whose last message is the delta's base (the
message at offset - 1 of this subscription), and every subscriber decodes exactly the
documents published at those offsets.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastim import _core
from fastim.config import Config
from fastim.hub import Hub, Since
from fastim.protocol import FrameType, unpack_msg, unpack_subscribed
from fastim.session.replies import TCP_REPLIES


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Client:
    """A subscriber as the hub sees it (interfaces.Subscriber), and its client side."""

    def __init__(self, flusher: _core.Flusher, delta: bool) -> None:
        self.sink = Sink()
        self.ring: _core.OutRing | None = _core.OutRing(
            flusher, self.sink, _core.FMT_TCP, 1 << 26, self
        )
        self.subs: list[str] | None = []
        self.user: str | None = None
        self.replies: Any = TCP_REPLIES
        self.wants = delta
        self.delta: list[str] | None = ["doc:m"] if delta else None
        self.decoder = _core.FrameDecoder(1 << 26)
        self.base: tuple[int, bytes] | None = None
        self.epoch = ""
        self.offset = 0
        self.got: list[tuple[str, int, bytes]] = []  # epoch, offset, data
        self.deltas = 0

    def __call__(self) -> None:  # the ring's overflow callback
        raise AssertionError("overflow")

    def is_open(self) -> bool:
        return True

    def send(self, data: bytes) -> None:
        assert self.ring is not None
        self.ring.append(data)

    def read(self) -> None:
        for ftype, payload in self.decoder.feed(self.sink.data):
            if ftype == FrameType.SUBSCRIBED:
                _id, _top, _ch, epoch, _rec = unpack_subscribed(payload)
                self.base = None  # a delta follows a full message of this subscription
                if epoch != self.epoch:
                    self.epoch, self.offset = epoch, 0
            elif ftype == FrameType.MSG:
                off, _ch, data = unpack_msg(payload)
                self.base = (off, data)
                self.got.append((self.epoch, off, data))
                self.offset = off
            elif ftype == FrameType.DELTA:
                off, _ch, delta = unpack_msg(payload)
                assert self.base is not None, "a delta without a base"
                assert self.base[0] == off - 1, f"a delta for {off} on the base of {self.base[0]}"
                data = _core.fossil_apply(self.base[1], delta)
                self.deltas += 1
                self.base = (off, data)
                self.got.append((self.epoch, off, data))
                self.offset = off
            elif ftype == FrameType.EVENT:
                pass  # resubscribe: the model subscribes again by itself
        self.sink.data = b""


def doc(rng: random.Random, rows: list[int]) -> bytes:
    rows[rng.randrange(len(rows))] = rng.randrange(10**6)
    return b'{"rows":[%s]}' % b",".join(b'{"v":%d,"pad":"%s"}' % (v, b"x" * 20) for v in rows)


ops = st.lists(
    st.tuples(
        st.sampled_from(["pub", "pub", "pub", "sub", "sub_since", "unsub", "jump", "epoch"]),
        st.integers(0, 5),
    ),
    min_size=1,
    max_size=60,
)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(0, 2**32))
def test_deltas_only_reach_subscribers_holding_their_base(
    script: list[tuple[str, int]], seed: int
) -> None:
    rng = random.Random(seed)
    hub = Hub(Config(namespaces={"doc": {"delta": "fossil", "history_size": 8}}))
    flusher = _core.Flusher(None)
    clients = [Client(flusher, delta=i % 3 != 2) for i in range(6)]
    published: dict[tuple[str, int], bytes] = {}
    rows = list(range(30))
    name = "doc:m"

    def subscribe(c: Client, since: Since | None) -> None:
        assert c.subs is not None
        c.subs.append(name)
        hub.subscribe(c, TCP_REPLIES, 1, name, since)

    for op, i in script:
        c = clients[i]
        assert c.subs is not None
        if op == "pub":
            data = doc(rng, rows)
            off = hub.publish(name, data)
            assert off is not None
            published[(hub.channels[name].epoch, off)] = data
        elif op in ("sub", "sub_since") and name not in c.subs:
            since = Since(c.offset, c.epoch) if op == "sub_since" and c.epoch else None
            subscribe(c, since)
        elif op == "unsub" and name in c.subs:
            c.subs.remove(name)
            hub.unsubscribe(name, c)
        elif op == "jump" and name in hub.channels:
            ch = hub.channels[name]
            data = doc(rng, rows)
            # offset + 1 never reached here (the ring holds consecutive offsets only:
            # a fresh one, as after a reload), dbase is kept: the jump check must act
            ch.history = _core.HistoryRing(ch.ns.history_size)
            hub.deliver_routed(ch, ch.offset + 2, data)
            published[(ch.epoch, ch.offset)] = data
        elif op == "epoch" and name in hub.channels:
            ch = hub.channels[name]
            hub._adopt(ch, f"e{rng.randrange(10**9):09d}", 0)  # history lost
            for other in clients:  # they were told to resubscribe; they do, from 0
                assert other.subs is not None
                if name not in other.subs and other.epoch and other.epoch != ch.epoch:
                    subscribe(other, Since(0, ch.epoch))
        flusher.flush()
        for cl in clients:
            cl.read()
    for cl in clients:
        for epoch, off, data in cl.got:
            assert published[(epoch, off)] == data, (epoch, off)
        if not cl.wants:
            assert cl.deltas == 0
