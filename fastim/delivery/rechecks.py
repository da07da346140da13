"""The postman in a cluster: inbox re-checks against the shared store.

In a cluster the inbox is in the shared store and a user's connections may be on several
nodes. Acks are written to the store by whichever node received them, and a message may
reach no DM frame here (the sender's node did not know the route yet, a link was down),
so a node re-reads a user's inbox state from the store before a retry, on a gap in the
sequences, after the user's route was written and when a link comes back: the store is
the truth, no ack notice has to travel between nodes, and what no frame brought is read
from the inbox and delivered. One re-check per user at a time; the due ones are found
on the node's timer tick through a heap, without a scan.

Why a mixin (:class:`InboxRechecks`, a base of :class:`fastim.delivery.postman.Postman`)
and not an object the Postman owns: a re-check reads and changes the very per-user state
that delivery and retries keep (pending, acked, seen, epoch, the retry heap), and the
postman asks for re-checks from its own paths (a gap on delivery, a retry falling due,
a message of another epoch). As two halves of one object they share that state and
call each other directly; an owned object would reach into the postman's internals on
nearly every line, or need a callback for each. So the cluster-only code and its state
live here, and the node and the cluster still see one ``Postman`` (``routed``,
``recheck_all``, ``route_poll``, the ``rechecks`` and ``filled`` counters).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import Any

from ..store import InboxMessage, Store, StoreError
from .interfaces import READ_PAGE, Relay, UserState, dm_event

log = logging.getLogger("fastim")

#: cluster: after a user's route is written, inbox checks at route_poll and at this many
#: times route_poll (a sender's node whose watch lags stored without sending a frame)
SETTLE_CHECKS = 6


class InboxRechecks:
    """The cluster side of the :class:`~fastim.delivery.postman.Postman`: when to look at
    whose inbox in the store, and bringing the connections here in line with it."""

    # the Postman's, used here (declared for the type checker)
    store: Store
    relay: Relay | None
    store_errors: int
    _users: dict[str, UserState]
    _align: Callable[[str, UserState, str], None]
    _deliver: Callable[[str, UserState, int, bytes], None]
    _resend: Callable[[str, UserState, int], bool]
    _run: Callable[[Any], None]

    def __init__(self) -> None:
        #: cluster: seconds a suspected gap (a seq past the next one) is given to close
        #: by itself (DM frames from two nodes may cross) before the inbox is read
        self.gap_wait = 0.25
        #: cluster: seconds between inbox checks for users whose route is not in etcd
        #: yet (other nodes cannot send to them), and after it is, before the last one
        self.route_poll = 0.5
        # user -> when to re-check its inbox (the earliest asked), and a heap of
        # (when, user) to find the due ones without a scan (stale entries are skipped)
        self._checks: dict[str, float] = {}
        self._check_heap: list[tuple[float, str]] = []
        self._unrouted: set[str] = set()  # local users whose route is not written
        self._settling: list[tuple[float, str]] = []  # heap of late checks after routed
        self._next_poll = 0.0
        # counters (metrics)
        self.rechecks = 0  # store re-checks
        self.filled = 0  # messages found in the inbox by a re-check

    def _arrived(self, user: str) -> None:
        """``user``'s first connection here: its route is not written yet."""
        self._unrouted.add(user)

    def _left(self, user: str) -> None:
        """``user``'s last connection here closed: nothing more to check for it."""
        self._unrouted.discard(user)
        self._checks.pop(user, None)

    def routed(self, users: list[str]) -> None:
        """Cluster: these local users' routes are now in etcd. A message stored before
        the other nodes saw the route reached no connection here: inbox checks
        ``route_poll`` seconds later (time for their watches to catch up) and, for a
        watch that lags, ``SETTLE_CHECKS`` times that, find it."""
        later = asyncio.get_running_loop().time() + self.route_poll * SETTLE_CHECKS
        for user in users:
            if user in self._users:
                self._unrouted.discard(user)
                self._check(user, self.route_poll)
                heapq.heappush(self._settling, (later, user))

    def recheck_all(self, delay: float = 0.0) -> int:
        """Cluster: re-check the inbox of every user with connections here in ``delay``
        seconds (a link from another node came up: what it sent while it was down, or
        queued when it broke, is lost). Returns how many users."""
        for user in self._users:
            self._check(user, delay)
        return len(self._users)

    def _check(self, user: str, delay: float) -> None:
        """Re-check ``user``'s inbox in ``delay`` seconds (sooner if already asked)."""
        self._check_at(user, asyncio.get_running_loop().time() + delay)

    def _check_at(self, user: str, when: float) -> None:
        if when < self._checks.get(user, when + 1):
            self._checks[user] = when
            heapq.heappush(self._check_heap, (when, user))

    def _cluster_tick(self, now: float) -> None:
        if self._unrouted and now >= self._next_poll:
            # routes not written (etcd slow or away): other nodes cannot send here
            self._next_poll = now + self.route_poll
            relay = self.relay
            assert relay is not None
            for user in list(self._unrouted):
                if relay.registered(user):
                    self.routed([user])
                else:
                    self._check_at(user, now)
        settling = self._settling
        while settling and settling[0][0] <= now:
            user = heapq.heappop(settling)[1]
            if user in self._users:
                self._check_at(user, now)
        heap = self._check_heap
        while heap and heap[0][0] <= now:
            when, user = heapq.heappop(heap)
            if self._checks.get(user) != when:
                continue  # superseded by an earlier request, or done
            u = self._users.get(user)
            if u is None:
                del self._checks[user]
            elif u.checking:
                # one check per user at a time: this one follows the running one
                del self._checks[user]
                self._check_at(user, now + 0.05)
            else:
                del self._checks[user]
                u.checking = True
                self._run(self._recheck(user, u))

    async def _recheck(self, user: str, u: UserState) -> None:
        """Cluster: bring ``user``'s connections here in line with the inbox in the store.

        Takes the acked sequence (acks other nodes wrote), delivers what is stored and
        was never delivered here, and resends the messages whose retry is due and that
        are still unacknowledged. Without the store, the due ones are resent anyway (as
        on one node: a duplicate is better than a stall).
        """
        self.rechecks += 1
        due, u.due = u.due, set()  # seqs falling due meanwhile wait for the next check
        try:
            try:
                state = await self.store.inbox_state(user)
                missing: list[InboxMessage] = []
                if state.top - state.acked > sum(1 for q in u.pending if q > state.acked):
                    after = max(state.acked, u.acked)
                    while True:
                        page = await self.store.inbox_read(user, after, READ_PAGE)
                        missing.extend(m for m in page if m.seq not in u.pending)
                        if len(page) < READ_PAGE:
                            break
                        after = page[-1].seq
            except StoreError as e:
                self.store_errors += 1
                log.info("inbox of %r could not be re-checked: %s", user, e)
                state = None
                missing = []
            if self._users.get(user) is not u:
                return  # every connection left meanwhile
            if state is not None:
                self._align(user, u, state.epoch)
                missing = [m for m in missing if m.epoch == u.epoch]
                u.seen = max(u.seen, state.acked)
            if state is not None and state.acked > u.acked:
                u.acked = state.acked
                for seq in [seq for seq in u.pending if seq <= u.acked]:
                    del u.pending[seq]
            for msg in missing:
                if msg.seq > u.acked and msg.seq not in u.pending:
                    self.filled += 1
                    self._deliver(user, u, msg.seq, dm_event(msg))
            for seq in sorted(due):
                self._resend(user, u, seq)
        finally:
            u.checking = False
