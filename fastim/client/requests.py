"""Pending requests of the client SDK: request ids, the table of requests waiting for a
reply, the frames that carry them (checked against the node's ``max_frame``), and the
wait for a reply within a timeout.

A request is sent with an id (1..2**32-1; 0 means "no request"); the reader resolves
the :class:`Pending` with the same id when the reply arrives (or fails it with the error
the node sent). When a connection is lost every pending request fails with
:class:`~fastim.errors.ConnectionClosed` (:meth:`PendingRequests.fail_all`): nothing
here is resent; what a caller retries, and how, is the caller's choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .. import protocol
from .._core import DEFAULT_MAX_FRAME, encode_frame
from ..errors import ConnectionClosed, RequestError
from ..protocol import ErrorCode, FrameType
from .connection import Connection, deadline
from .subscription import Since, Subscription

__all__ = [
    "TRANSIENT",
    "Pending",
    "PendingRequests",
    "RateLimited",
    "future",
    "request_error",
    "resolve",
]

_MAX_ID = 0xFFFFFFFF
#: refusals that say "not now" rather than "no": the store could not be read or written
#: (114), or, in a cluster, the channel's owner node could not be reached (119: it died
#: and the others have not rerouted yet), or the application's backend behind a proxy
#: hook did not answer (120). A resubscribe is retried on the connection, a send with its
#: cid; a publish is not (it may or may not have been stored).
TRANSIENT = frozenset(
    {ErrorCode.STORE_UNAVAILABLE, ErrorCode.NOT_ROUTED, ErrorCode.BACKEND_UNAVAILABLE}
)


class RateLimited(RequestError):
    """The node refused a publish or send with RATE_LIMITED (116): this connection is
    over the node's ``publish_rate``. Nothing was stored; slow down and try again.

    A :class:`~fastim.errors.RequestError` (``code`` 116), so code that catches those
    keeps working; a node closes a connection that keeps going over (close 4002,
    after which the client reconnects with backoff).
    """


def request_error(code: int, reason: str) -> RequestError:
    """The exception of an error reply: :class:`RateLimited` for 116."""
    if code == ErrorCode.RATE_LIMITED:
        return RateLimited(code, reason)
    return RequestError(code, reason)


def future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def resolve(p: Pending, result: Any) -> None:
    if not p.future.done():
        p.future.set_result(result)


class Pending:
    """A request waiting for its reply."""

    __slots__ = ("future", "resubscribe", "since", "sub")

    def __init__(
        self,
        future: asyncio.Future[Any],
        sub: Subscription | None = None,
        resubscribe: bool = False,
        since: Since | None = None,
    ) -> None:
        self.future = future
        self.sub = sub  # a subscribe: registered by the reader the moment its reply arrives
        self.resubscribe = resubscribe
        self.since = since  # a subscribe with since: where recovery was asked from


class PendingRequests:
    """The requests of one client waiting for replies, by id (across its connections)."""

    def __init__(self) -> None:
        self._pending: dict[int, Pending] = {}
        self._next_id = 0
        #: the largest frame payload the node takes (its ``max_frame``, from WELCOME)
        self.max_frame = DEFAULT_MAX_FRAME

    def new_id(self) -> int:
        self._next_id = self._next_id % _MAX_ID + 1  # 1..2**32-1; 0 means "no request"
        return self._next_id

    def add(self, req_id: int, pending: Pending) -> None:
        """Wait for the reply to the request ``req_id`` (already sent, or about to be)."""
        self._pending[req_id] = pending

    def pop(self, req_id: int) -> Pending | None:
        """The request ``req_id`` if it still waits, no longer waiting."""
        return self._pending.pop(req_id, None)

    def reply(self, req_id: int, result: Any) -> None:
        p = self._pending.pop(req_id, None)
        if p is not None:
            resolve(p, result)

    def fail_all(self, exc: ConnectionClosed) -> None:
        """The connection is gone: every waiting request fails with ``exc``'s code."""
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionClosed(exc.code, exc.reason))

    async def call(
        self,
        ready: Callable[[], Awaitable[Connection]],
        frame: Callable[[int], bytes],
        pending: Pending,
        timeout: float,
    ) -> Any:
        """Send the frame ``frame(request id)`` on the connection ``ready()`` gives and
        wait for its reply; all (the wait for the connection included) within
        ``timeout`` seconds."""

        async def run() -> Any:
            conn = await ready()
            req_id = self.new_id()
            data = frame(req_id)
            self._pending[req_id] = pending
            try:
                conn.write(data)
                await conn.drain()
                return await pending.future
            finally:
                self._pending.pop(req_id, None)

        async with deadline(timeout):
            return await run()

    def frame(self, ftype: int, channel: str, data: bytes = b"") -> Callable[[int], bytes]:
        """A binary request (SUB, UNSUB, PUB) on ``channel``, made once its id is known."""

        def make(req_id: int) -> bytes:
            payload = protocol.pack_sub(ftype, req_id, channel, data)
            self.check_size(FrameType(ftype).name, len(payload))
            return encode_frame(ftype, payload)

        return make

    def cmd_frame(self, cmd: dict[str, Any]) -> Callable[[int], bytes]:
        """A JSON command (CMD frame), made once its id is known."""

        def make(req_id: int) -> bytes:
            body = orjson.dumps({**cmd, "id": req_id})
            self.check_size(f"{cmd.get('op')!r} command", len(body))
            return encode_frame(FrameType.CMD, body)

        return make

    def check_size(self, what: str, size: int) -> None:
        if size > self.max_frame:
            raise ValueError(
                f"{what} of {size} bytes exceeds the server's max_frame of {self.max_frame}"
            )
