"""``max_connections_per_user``: one limit over every worker and node of a deployment.

Centrifugo's limit is per node: a user with ten tabs spread over five nodes holds ten
connections under a limit of two. Here, when a connection gets its user, the node counts
that user's connections on itself and asks the others that have the user — the other
workers of the node (``--workers N``), and in a cluster the nodes the user routes name
(fastim/cluster/users.py) — over the links' ``ask`` (fastim/cluster/runtime.py). Over
the limit, by ``user_limit_policy``: ``refuse_new`` closes the new connection (4511),
``close_oldest`` closes the oldest ones wherever they are (4512) and keeps the new one.

Connections opened at the same moment on two nodes may each count the other before it
is registered: the limit holds within one link round trip, not to the microsecond; with
``close_oldest`` the next connection of the user settles it. While the others are
asked, the new connection's commands wait (as behind a proxy hook).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..protocol import CloseCode

log = logging.getLogger("fastim")


class UserLimit:
    """The node's side of ``max_connections_per_user``."""

    def __init__(self, node: Any) -> None:
        cfg = node.config
        self.node = node
        self.max: int = cfg.max_connections_per_user
        self.policy: str = cfg.user_limit_policy
        #: this node's connections that have a user, and when they got it (wall clock:
        #: the oldest is decided across machines)
        self.opened: dict[Any, float] = {}
        # counters (metrics)
        self.refused = 0
        self.replaced = 0

    # ------------------------------------------------------------------ this node

    def local(self, user: str) -> list[tuple[float, int]]:
        """(since, ref) of ``user``'s connections here, ref their id on this node."""
        return [(t, id(s)) for s, t in self.opened.items() if s.user == user and s.is_open()]

    def answer_conns(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"conns": self.local(str(msg.get("user")))}

    def answer_close(self, msg: dict[str, Any]) -> dict[str, Any]:
        refs = set(msg.get("refs") or ())
        user = str(msg.get("user"))
        n = 0
        for s in list(self.opened):
            if id(s) in refs and s.user == user:
                self._replace(s)
                n += 1
        return {"closed": n}

    def forget(self, session: Any) -> None:
        self.opened.pop(session, None)

    # ------------------------------------------------------------------ a new one

    def arrived(self, session: Any, user: str) -> None:
        """``session`` now speaks for ``user`` (after the postman attached it)."""
        self.opened[session] = time.time()
        router = getattr(self.node, "cluster", None)
        if router is None or getattr(router, "links", None) is None:
            self._decide(session, user, [(t, "", ref) for t, ref in self.local(user)])
            return
        # the others are asked; the connection's commands wait for the answer
        session._ask(self._ask_others(router, session, user))

    async def _ask_others(self, router: Any, session: Any, user: str) -> None:
        peers = None
        routes = getattr(getattr(router, "dm", None), "routes", None)
        if routes is not None and not hasattr(router, "role"):
            # a cluster: only the nodes the user routes name (a worker mesh asks all)
            peers = set(routes.nodes_of(user)) - {router.me}
        entries = [(t, "", ref) for t, ref in self.local(user)]
        if peers is None or peers:
            answers = await router.ask_all("user_conns", {"user": user}, peers)
            for peer, answer in answers.items():
                for t, ref in (answer.get("value") or {}).get("conns", ()):
                    entries.append((float(t), peer, int(ref)))
        if session.is_open():
            self._decide(session, user, entries)

    def _decide(self, session: Any, user: str, entries: list[tuple[float, str, int]]) -> None:
        """Over the limit: the newest (``refuse_new``) or the oldest (``close_oldest``)
        of ``entries`` go. Every node that checks sees the same order (by the time each
        connection got its user), so two connections checked at once agree on which
        goes instead of each closing itself or the other."""
        over = len(entries) - self.max
        if over <= 0:
            return
        mine = ("", id(session))
        ordered = sorted(entries)
        if self.policy == "refuse_new":
            # only this one is closed here: a newer one elsewhere is closed by its own check
            if any((peer, ref) == mine for _t, peer, ref in ordered[-over:]):
                self.refused += 1
                session.close(
                    CloseCode.TOO_MANY_CONNECTIONS,
                    f"user has {self.max} connections (max_connections_per_user)",
                )
            return
        by_peer: dict[str, list[int]] = {}
        for _t, peer, ref in ordered[:over]:
            by_peer.setdefault(peer, []).append(ref)
        local = set(by_peer.pop("", ()))
        for s in list(self.opened):
            if id(s) in local:
                self._replace(s)
        router: Any = getattr(self.node, "cluster", None)
        for peer, refs in by_peer.items():
            ask = router.ask(peer, "user_close", {"user": user, "refs": refs})
            self.node.proxy.tasks.run(ask)  # (the node's tasks that may ask others)

    def _replace(self, s: Any) -> None:
        self.replaced += 1
        s.close(
            CloseCode.REPLACED,
            "closed for a newer connection of this user (max_connections_per_user)",
        )
