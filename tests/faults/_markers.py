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


async def _until_last(what: str, last: Callable[[], bool], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        if last():
            return
        if loop.time() > end:
            raise AssertionError(f"the marker did not arrive last within {seconds}s: {what}")
        await asyncio.sleep(0.01)


async def channel_marker(
    pub: Client, channel: str, received: list[Message], seconds: float = 30.0
) -> Message:
    """Publish a marker on ``channel``, wait until it is the last of ``received`` (what a
    reader of the subscription collects), take it off again and return it."""
    data = {"marker": uuid.uuid4().hex}
    off = await asyncio.wait_for(pub.publish(channel, data), seconds)
    await _until_last(
        f"{channel} at offset {off}, last received {received[-1:]}",
        lambda: bool(received) and received[-1].data == data,
        seconds,
    )
    marker = received.pop()
    assert marker.offset == off, (marker, off)
    assert all(m.data != data for m in received), "the marker came twice"
    return marker


async def dm_marker(
    sender: Client, to: str, got: list[DirectMessage], seconds: float = 30.0
) -> DirectMessage:
    """Send a marker direct message to ``to``, wait until it is the last of ``got`` (what
    a reader of the recipient's direct messages collects), take it off again and return
    it."""
    sent = await asyncio.wait_for(sender.send(to, {"marker": uuid.uuid4().hex}), seconds)
    await _until_last(
        f"to {to}, seq {sent.seq}, last got {got[-1:]}",
        lambda: bool(got) and got[-1].mid == sent.mid,
        seconds,
    )
    marker = got.pop()
    assert marker.seq == sent.seq, (marker, sent)
    assert all(d.mid != sent.mid for d in got), "the marker came twice"
    return marker
