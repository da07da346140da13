"""Checking that nothing more arrives, without sleeping: a marker sent last.

A marker published on the channel after the stream gets an offset above every message
stored before it, and a subscriber delivers in offset order; a marker sent to the same
inbox gets the next sequence, and direct messages are delivered in sequence order. So
once the marker is in, anything extra (a duplicate, a late copy) that was on its way
is in too: the absence check that follows is sound, and as quick as one round trip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from fastim.client import Client, DirectMessage, Message


async def _until(what: Callable[[], str], cond: Callable[[], bool], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"the marker did not arrive last within {seconds}s: {what()}")
        await asyncio.sleep(0.01)


async def channel_marker(
    pub: Client, channel: str, *received: list[Message], seconds: float = 30.0
) -> Message:
    """Publish a marker on ``channel``, wait until it is the last of each ``received``
    (what a reader of a subscription collects), take it off again and return it."""
    data = {"marker": uuid.uuid4().hex}
    off = await asyncio.wait_for(pub.publish(channel, data), seconds)
    await _until(
        lambda: f"{channel} at offset {off}, last received {[r[-1:] for r in received]}",
        lambda: all(r and r[-1].data == data for r in received),
        seconds,
    )
    markers = [r.pop() for r in received]
    for r, m in zip(received, markers, strict=True):
        assert m.offset == off, (m, off)
        assert all(x.data != data for x in r), "the marker came twice"
    return markers[0]


async def dm_marker(
    sender: Client, to: str, *got: list[DirectMessage], seconds: float = 30.0
) -> DirectMessage:
    """Send a marker direct message to ``to``, wait until it is the last of each ``got``
    (what a reader of a connection's direct messages collects), take it off again and
    return it."""
    sent = await asyncio.wait_for(sender.send(to, {"marker": uuid.uuid4().hex}), seconds)
    await _until(
        lambda: f"to {to}, seq {sent.seq}, last got {[g[-1:] for g in got]}",
        lambda: all(g and g[-1].mid == sent.mid for g in got),
        seconds,
    )
    markers = [g.pop() for g in got]
    for g, m in zip(got, markers, strict=True):
        assert m.seq == sent.seq, (m, sent)
        assert all(d.mid != sent.mid for d in g), "the marker came twice"
    return markers[0]
