"""The hub: channels, their subscribers, offsets and history; publish, recovery,
presence and the fan-out.

One layer of the node (docs/architecture.md): below the sessions, the cluster and the
HTTP API, above the store and the config. It reaches nothing above it: it delivers to
:class:`Subscriber` objects and completes publishes with :class:`Published`, and a
cluster plugs in as its :class:`Router` (:mod:`.interfaces`).

- :mod:`.hub`: the :class:`Hub` (publish, the durable-store pipeline, subscribe and
  recovery, presence);
- :mod:`.channel`: one channel and its messages encoded once per wire format;
- :mod:`.deflate`: the node's one permessage-deflate compressor;
- :mod:`.stats`: the publish latency histogram.
"""

from .channel import Channel, encode_event
from .deflate import Deflater
from .hub import MAX_PENDING, Hub
from .interfaces import (
    Done,
    HubError,
    PresenceGate,
    Published,
    Refusal,
    Replies,
    Router,
    Since,
    Subscriber,
)
from .stats import LatencyHistogram

__all__ = [
    "MAX_PENDING",
    "Channel",
    "Deflater",
    "Done",
    "Hub",
    "HubError",
    "LatencyHistogram",
    "PresenceGate",
    "Published",
    "Refusal",
    "Replies",
    "Router",
    "Since",
    "Subscriber",
    "encode_event",
]
