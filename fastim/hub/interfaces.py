"""What the hub needs from the parts around it, and what it hands back: the small
interfaces that keep every arrow pointing down.

The hub delivers to :class:`Subscriber` objects (a session, to the node) and answers
them through their :class:`Replies`; it completes a publish with a :class:`Published`;
a cluster plugs in as its :class:`Router`. The node wires the real parts in; nothing
here, and nothing in the hub, imports the session, the cluster or the node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .. import _core
from ..codes import ErrorCode


class HubError(Exception):
    """A hub refusal a client can act on (limit reached); carries an ErrorCode."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class Since(NamedTuple):
    """Where a subscriber's history ends: its last offset, in an epoch.

    With ``last`` it is instead a new subscriber's request for the channel's newest
    ``off`` messages in whatever epoch is current (``{"op":"sub","history":N}``): such a
    client knows no epoch yet. :meth:`Hub._resolve` turns it into a plain Since once the
    channel's epoch and offset are known, so the rest of recovery is the same code.
    """

    off: int
    epoch: str
    last: bool = False


class Refusal(NamedTuple):
    """Why a publish was not taken, with the code a client is answered with (the store
    failed: STORE_UNAVAILABLE; in a cluster the owner could not be reached: NOT_ROUTED)."""

    code: int
    reason: str

    def __str__(self) -> str:
        return self.reason


class Published(NamedTuple):
    """How a publish ended: its ``offset`` in the channel's ``epoch``, or a ``refusal``
    (then ``offset`` is 0: it was neither stored nor delivered). In a cluster the epoch
    is the owner's. ``duplicate``: its idempotency key was taken before, so it was not
    stored again and ``offset`` is the first one's (a forward's FORWARD_ACK carries it)."""

    offset: int
    epoch: str
    refusal: Refusal | None = None
    duplicate: bool = False

    @staticmethod
    def refused(code: int, reason: str) -> Published:
        return Published(0, "", Refusal(code, reason))


#: completes a publish that could not be settled at once (durable store, cluster forward)
Done = Callable[[Published], None]


def store_refusal(reason: str) -> Published:
    """A publish the store did not take."""
    return Published.refused(ErrorCode.STORE_UNAVAILABLE, reason)


class Replies(Protocol):
    """How a subscriber's connection encodes what the hub answers it."""

    def subscribed(
        self, req_id: Any, ch: str, off: int, epoch: str = "", recovered: bool = False
    ) -> bytes: ...

    def error(self, req_id: Any, code: int, reason: str) -> bytes: ...

    def event(self, body: bytes) -> bytes: ...

    def obj(self, obj: dict[str, Any], req_id: Any) -> bytes: ...


@runtime_checkable
class Subscriber(Protocol):
    """A connection the hub delivers to: its out-ring, its subscriptions (names, kept by
    the connection), its user for presence, and a way to send it one reply.

    A connection's out-ring calls back the connection when it overflows; the hub finds
    a ring's subscriber there (``ring.on_overflow``), for the rare per-subscriber paths
    (presence under rules).
    """

    ring: _core.OutRing | None
    subs: list[str] | None
    user: str | None
    replies: Any

    def is_open(self) -> bool: ...

    def send(self, data: bytes) -> None: ...


#: may this subscriber see the channel's presence (join/leave)? (namespace, channel)
PresenceGate = Callable[[Subscriber, Any, str], bool]


class Router(Protocol):
    """The cluster, as the hub sees it (:class:`fastim.cluster.runtime.Cluster`).

    The hub asks it who numbers a channel and hands it publishes for channels another
    node owns and every message delivered here (to pass down the broadcast tree). The
    router calls back into the hub through its public methods for routed channels:
    :meth:`~fastim.hub.Hub.adopt`, :meth:`~fastim.hub.Hub.fill`,
    :meth:`~fastim.hub.Hub.renumber`, :meth:`~fastim.hub.Hub.deliver_routed`,
    :meth:`~fastim.hub.Hub.recover`.
    """

    def owns(self, channel: str) -> bool: ...

    def forward(self, channel: str, data: bytes, done: Done, key: str | None = None) -> None:
        """Send a publish (with its idempotency key, if any) to the channel's owner."""

    def down(self, ch: Any, off: int, data: bytes) -> None: ...

    def state(self, channel: str, since: Since | None) -> Awaitable[dict[str, Any]]: ...

    def loaded(self, ch: Any) -> None: ...

    def follow(self, channel: str) -> Awaitable[None]:
        """Before a subscribe here reads the state of a durable channel owned elsewhere."""

    def dropped(self, channel: str) -> None:
        """The hub forgot ``channel`` (nothing here follows it any more)."""
