"""The fastim Python client SDK (asyncio).

::

    import fastim.client

    async with await fastim.client.connect("tcp://127.0.0.1:7070", user="alice") as client:
        sub = await client.subscribe("news")
        offset = await client.publish("news", {"title": "hello"})
        async for msg in sub:
            print(msg.channel, msg.offset, msg.data)

        await client.send("bob", {"text": "hi"})          # retried until stored, once
        async for dm in client.direct_messages():          # each seq once, in order
            print(dm.sender, dm.seq, dm.data)

URLs: ``tcp://host:port`` (fastim frames over TCP) or ``ws://host:port/ws`` (the same
frames in binary WebSocket messages); a list of them (the nodes of a cluster) makes the
client move to the next node when one fails. The client reconnects after a connection
loss (exponential backoff with full jitter), subscribes again from where each subscription
was (the node sends what was missed) and drops duplicates: the application sees each
message once, in order, and is told (:class:`Gap`) when history it missed is gone.
See docs/client.md.
"""

from .backoff import Backoff
from .client import Client, RateLimited, connect
from .connection import HandshakeError
from .direct import DirectGap, DirectMessage, DirectMessages, InboxState, Sent
from .subscription import Gap, Message, Since, Subscription

__all__ = [
    "Backoff",
    "Client",
    "DirectGap",
    "DirectMessage",
    "DirectMessages",
    "Gap",
    "HandshakeError",
    "InboxState",
    "Message",
    "RateLimited",
    "Sent",
    "Since",
    "Subscription",
    "connect",
]
