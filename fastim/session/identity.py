"""Who a connection is: the user it declares or its token names, token refresh, and
the channel rules that follow from its identity. A part of :class:`~.session.Session`
(a mixin: these commands read and set the session's own fields), kept apart because it
is the one place where a connection's identity changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..auth import AuthFailed, Identity
from ..config import Config
from ..errors import BadRequest, ProtocolError
from ..protocol import ErrorCode
from .commands import user_id
from .expiry import TokenExpiry
from .host import Host
from .replies import Replies


class Identified:
    """The identity commands of a session (``hello``'s user and token, ``refresh``,
    a token at the WebSocket upgrade) and its channel-rule check."""

    # the identity's own fields (the session sets them up in its __init__)
    __slots__ = ("auth_wait", "identity", "user")
    user: str | None
    identity: Identity | None
    auth_wait: bool
    eid: str  # the connection id of its webhook events (fastim/backend/events.py)

    # the session's fields and methods these use (Session defines them)
    config: Config
    node: Host
    subs: list[str] | None
    state: int
    send: Callable[[bytes], None]
    send_event: Callable[[bytes], None]
    is_open: Callable[[], bool]
    fail: Callable[..., None]
    server_channels: Callable[[], list[str]]  # fastim/session/hooks.py
    subscribe_server_side: Callable[[list[str]], None]

    def _welcome(self, user: str | None) -> bytes:
        cfg = self.config
        info: dict[str, Any] = {
            "node": cfg.node_id,
            "ping_interval": cfg.ping_interval,
            "pong_timeout": cfg.pong_timeout,
            "max_frame": cfg.max_frame,
            "max_message": cfg.max_message,
        }
        if user is not None:
            info["user"] = user
        backend = getattr(self, "backend", None)  # Hooked's, built on this class
        if backend is not None and backend.data is not None:
            info["data"] = backend.data  # the connect hook's data for the client
        return orjson.dumps(info)

    def _declare(self, user: str) -> None:
        """This connection speaks for ``user`` from now on: DMs, presence."""
        if self.user is not None:
            raise BadRequest(f"this connection already declared user {self.user!r}")
        self.user = user
        hub = self.node.hub
        events = self.node.events
        if events is not None:
            events.connected(self)
        for ch in self.subs or ():
            channel = hub.channels.get(ch)
            if events is not None:
                events.subscribed(self, ch)  # made before the user was known
            if channel is not None:
                n = channel.users.get(user, 0)
                channel.users[user] = n + 1
                if n == 0 and channel.ns.join_leave:
                    hub.announce(channel, "join", user)
        postman = self.node.postman
        assert postman is not None
        postman.attach(self, user)
        limit = self.node.user_limit
        if limit is not None:  # max_connections_per_user, over every worker and node
            limit.arrived(self, user)
        # the channels the node subscribes it to (its token's subs, the connect hook's
        # channels, its personal channel): fastim/session/hooks.py
        channels = self.server_channels()
        if channels:
            self.subscribe_server_side(channels)

    # ------------------------------------------------------------------ auth

    def _identify(self, declared: object, token: object) -> str | None:
        """Who this connection is, from a hello's ``user`` and ``token`` fields.

        Returns the user to declare now (None: no user, or already declared). With a
        token the user is the token's ``sub``, and a declared user must be the same;
        without one, declaring a user is refused wherever tokens can be verified (a
        name anyone can type must not open someone's inbox). Raises AuthFailed (fatal,
        close 4501) or BadRequest.
        """
        user = None if declared is None else user_id(declared, "user")
        if token is not None:
            if self.identity is not None:
                raise BadRequest("this connection is already authenticated")
            identity = self.node.auth.verify(token)
            if user is not None and user != identity.user:
                raise AuthFailed('field "user" is not the token\'s "sub": leave "user" out')
            self.identity = identity
            TokenExpiry(self, identity)
            self.auth_wait = False
            return identity.user if self.user is None else None
        if self.auth_wait:
            raise AuthFailed('this node needs a token: hello with "token"')
        if user is None:
            return None
        if self.identity is not None:  # authenticated at the WebSocket upgrade
            if user != self.identity.user:
                raise AuthFailed('field "user" is not the token\'s "sub": leave "user" out')
            return None
        if self.node.auth.enabled:
            raise AuthFailed('users come from tokens on this node: send "token", not "user"')
        if self.user is not None:
            raise BadRequest(f"this connection already declared user {self.user!r}")
        return user

    def _refresh(self, token: object, req_id: Any, replies: Replies) -> None:
        """Replace the connection's token with a newer one for the same user, before
        the old one expires (which would close the connection, 117 / 4501).

        The new token's claims apply from now on (a ``channels`` claim limits later
        requests; subscriptions already made stay). A token that does not verify, or
        names another user, is fatal like a bad token at connect.
        """
        if self.identity is None:
            raise BadRequest("refresh: this connection did not authenticate with a token")
        if token is None:
            raise BadRequest("missing field \"token\" in 'refresh'")
        identity = self.node.auth.verify(token)
        if identity.user != self.identity.user:
            raise AuthFailed(
                f"refresh: the token's \"sub\" is not this connection's user {self.identity.user!r}"
            )
        self.identity = identity
        TokenExpiry(self, identity)
        self.send(replies.obj({"op": "refreshed", "exp": int(identity.expires)}, req_id))

    def login(self, token: str) -> bool:
        """Authenticate with a token given at the WebSocket upgrade (``?token=``).

        Returns False when the token was refused: the error went out and the
        connection is closing.
        """
        try:
            user = self._identify(None, token)
        except ProtocolError as e:
            self.fail(e)
            return False
        if user is not None:
            self._declare(user)
        return True

    def _denied(self, action: str, ch: str, req_id: Any, replies: Replies) -> bool:
        """Whether the rules refuse ``action`` on ``ch``; if so PERMISSION_DENIED went out.

        Free when nothing can refuse: no namespace restricts anything and the
        connection's token (if any) carries no channels claim.
        """
        auth = self.node.auth
        identity = self.identity
        if not auth.rules and (identity is None or (identity.sub is None and identity.pub is None)):
            return False
        reason = auth.refusal(self.node.hub.namespaces.of(ch), action, ch, identity)
        if reason is None:
            return False
        auth.denied += 1
        self.send(replies.error(req_id, ErrorCode.PERMISSION_DENIED, reason))
        return True
