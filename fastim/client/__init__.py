"""The fastim Python client SDK (asyncio).

::

    import fastim.client

    async with await fastim.client.connect("tcp://127.0.0.1:7070") as client:
        sub = await client.subscribe("news")
        offset = await client.publish("news", {"title": "hello"})
        async for msg in sub:
            print(msg.channel, msg.offset, msg.data)

URLs: ``tcp://host:port`` (fastim frames over TCP) or ``ws://host:port/ws`` (the same
frames in binary WebSocket messages). The client reconnects after a connection loss
(exponential backoff with full jitter), subscribes again and drops duplicates.
"""

from .backoff import Backoff
from .client import Client, Message, Subscription, connect
from .connection import HandshakeError

__all__ = ["Backoff", "Client", "HandshakeError", "Message", "Subscription", "connect"]
