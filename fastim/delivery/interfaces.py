"""What the postman talks to, what it sends, and what it keeps per user: the vocabulary
shared by :mod:`.postman` (delivery, commands, retries) and :mod:`.rechecks` (the cluster's
inbox re-checks), which both import it and nothing of each other in that direction.

A connection of a user is a :class:`Session` to the postman, the cluster side is a
:class:`Relay`; the ``dm`` event is made once per message by :func:`dm_event`; a user
with connections here has one :class:`UserState`.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from ..errors import ProtocolError
from ..store import InboxMessage

#: inbox reads go by pages of this many messages
READ_PAGE = 1000


class Session(Protocol):
    """A connection of a user, as the postman sees it (a :class:`fastim.session.Session`
    to the node): it is sent events, and failed when its command is bad."""

    user: str | None

    def is_open(self) -> bool: ...

    def send_event(self, body: bytes) -> None: ...

    def fail(self, err: ProtocolError, req_id: Any = None) -> None: ...


class Relay(Protocol):
    """The cluster side of direct messages (:class:`fastim.cluster.dm.DmRouter`)."""

    def present(self, user: str) -> None:
        """``user``'s first connection here: publish the route user → this node."""

    def absent(self, user: str) -> None:
        """``user``'s last connection here closed: withdraw the route."""

    def registered(self, user: str) -> bool:
        """Whether the other nodes can find ``user`` here (its route is in etcd)."""

    def relay(self, user: str, seq: int, event: bytes) -> None:
        """A message stored here for ``user``: send it to the other nodes holding it."""


_DM_EPOCH = b'{"op":"dm","epoch":"'


def dm_event(msg: InboxMessage) -> bytes:
    """The ``dm`` event's JSON text; ``data`` is spliced in as stored (already JSON).

    The epoch comes first, so :func:`event_epoch` finds it without parsing."""
    return b"".join(
        (
            _DM_EPOCH,
            msg.epoch.encode(),
            b'","from":',
            orjson.dumps(msg.sender),
            b',"mid":"',
            msg.msg_id.encode(),
            b'","seq":',
            str(msg.seq).encode(),
            b',"data":',
            msg.data,
            b"}",
        )
    )


def event_epoch(ev: bytes) -> str:
    """The inbox epoch of a ``dm`` event made by :func:`dm_event` ("" if none)."""
    if not ev.startswith(_DM_EPOCH):
        return ""
    n = len(_DM_EPOCH)
    return ev[n : ev.find(b'"', n)].decode()


def event_mid(ev: bytes) -> str:
    """The message id of a ``dm`` event made by :func:`dm_event`."""
    i = ev.find(b'"mid":"')
    if i < 0:
        return ""
    i += 7
    return ev[i : ev.find(b'"', i)].decode()


class UserState:
    """What the node knows of one user with connections here."""

    __slots__ = ("acked", "checking", "due", "epoch", "pending", "seen", "sessions", "syncing")

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        #: the inbox's epoch as last seen in the store ("" until known): ``acked``,
        #: ``pending`` and ``seen`` count sequences of this epoch
        self.epoch = ""
        #: connections still reading their backlog → live events queued for them
        self.syncing: dict[Session, list[tuple[int, bytes]]] = {}
        self.acked = 0
        #: seq → (event bytes, current retry interval), delivered and not yet acked
        self.pending: dict[int, tuple[bytes, float]] = {}
        #: the highest seq delivered here or acknowledged (a higher one arriving first
        #: means a gap); -1 until the first delivery or the backlog read tells
        self.seen = -1
        #: cluster: seqs whose retry is due, resent after a look at the store's ack
        self.due: set[int] = set()
        #: cluster: a store re-check is in flight
        self.checking = False
