"""The receiving side of channel broadcast trees: DELIVER frames from a parent node,
taken in offset order, duplicates dropped, gaps of durable channels filled from the
store (with what arrives meanwhile held), and the catch-up after a link came back.

A part of :class:`~.runtime.Cluster` (a mixin: it works on the runtime's own state),
kept apart because it is the one place where the order of routed messages is decided.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..hub import Channel, Hub, HubError, Since
from ..store import StoreError
from .frames import Deliver
from .placement import Placement

log = logging.getLogger("fastim.cluster")

#: DELIVERs kept per channel while its state loads (past it: a gap, filled from the store)
HOLD_MAX = 10_000


class TreeReceiver:
    """DELIVERs in, delivered here in order (and passed on down the tree)."""

    # the runtime's state these read and change
    hub: Hub
    placement: Placement
    me: str
    now: float
    _filling: dict[str, list[Deliver]]
    _unloaded: dict[str, list[Deliver]]
    _unloaded_at: dict[str, float]
    tree_in: int
    duplicates: int
    gaps: int
    resyncs: int
    # the runtime's methods these use
    _send_down: Callable[[list[str], str, str, int, bytes], None]
    _run: Callable[[Any], None]
    state: Callable[[str, Since | None], Awaitable[dict[str, Any]]]

    def on_deliver(self, peer: str, items: list[Deliver]) -> None:
        filling = self._filling
        for it in items:
            self.tree_in += 1
            held = filling.get(it.channel)
            if held is not None:
                held.append(it)
            else:
                self._take(it, True)

    def _take(self, it: Deliver, fill: bool) -> bool:
        """One DELIVER: deliver here (and down the tree) or drop; False if a fill began."""
        hub = self.hub
        name, epoch, off, data = it
        ch = hub.channels.get(name)
        if ch is None:
            # nobody here follows it: pass it on, keep nothing
            kids = self.placement.children(name, self.me)
            if kids:
                self._send_down(kids, name, epoch, off, data)
            return True
        if not ch.loaded:
            if ch.durable:
                # a subscribe is reading the channel's state from the store: pass it on,
                # and keep it until the state is known (loaded()), since the store's
                # answer may or may not include it
                kids = self.placement.children(name, self.me)
                if kids:
                    self._send_down(kids, name, epoch, off, data)
                held = self._unloaded.get(name)
                if held is None:
                    held = self._unloaded[name] = []
                    self._unloaded_at[name] = self.now
                if len(held) < HOLD_MAX:
                    held.append(it)  # past it: a gap, filled from the store later
                return True
            hub.adopt(ch, epoch, off - 1)  # a memory channel learns the owner's numbering
        elif epoch != ch.epoch:
            hub.adopt(ch, epoch, off - 1)  # history lost at the owner: resubscribe
        elif off <= ch.offset:
            self.duplicates += 1
            return True
        elif off > ch.offset + 1:
            self.gaps += 1
            if ch.durable and fill:
                self._filling[name] = [it]
                self._run(self._fill(ch, it))
                return False
            if fill:
                # a memory channel: what a link lost is in the owner's history ring
                self._filling[name] = [it]
                self._run(self._fill_from_owner(ch, it))
                return False
            log.debug("channel %r: offsets %d..%d missed here", name, ch.offset + 1, off - 1)
        hub.deliver_routed(ch, off, data)
        return True

    def loaded(self, ch: Channel) -> None:
        """A durable channel's state came from the store: take what was held meanwhile
        (at or below its offset: dropped; above: delivered here, not passed on again)."""
        held = self._unloaded.pop(ch.name, None)
        self._unloaded_at.pop(ch.name, None)
        if not held:
            return
        for i, it in enumerate(held):
            if it.epoch != ch.epoch or it.offset <= ch.offset:
                continue
            if it.offset > ch.offset + 1:
                # a gap below the held ones: the usual fill, then the rest in order
                self._filling[ch.name] = [it, *held[i + 1 :]]
                self._run(self._fill(ch, it))
                return
            # (passed on again: the children drop it as a duplicate; rare enough)
            self.hub.deliver_routed(ch, it.offset, it.data)

    def _release_held(self, name: str, first: Deliver | None = None) -> None:
        """After a gap of ``name`` was filled: the DELIVERs held meanwhile, in order.
        ``first``, the one that showed the gap, is taken even if the gap stays (a jump
        clients recover from); one that shows a new gap starts a new fill, and the rest
        wait for it."""
        held = self._filling.pop(name, [] if first is None else [first])
        for i, it in enumerate(held):
            if not self._take(it, first is None or i > 0):
                self._filling[name].extend(held[i + 1 :])
                break

    async def _fill(self, ch: Channel, first: Deliver) -> None:
        """Read a durable channel's gap from the store, then the DELIVERs held meanwhile."""
        try:
            await self.hub.fill(ch, first.offset - 1)
        finally:
            self._release_held(ch.name, first)

    async def _fill_from_owner(self, ch: Channel, first: Deliver) -> None:
        """A memory channel's gap below ``first``, asked of its owner (its history ring,
        within ``recovery_max``), then the DELIVERs held meanwhile. What the owner no
        longer has stays a jump in offsets."""
        try:
            reply = await self.state(ch.name, Since(ch.offset, ch.epoch, False))
            if reply.get("epoch") == ch.epoch:
                for o, d in reply.get("messages", ()):
                    off = int(o)
                    if off == ch.offset + 1 and off < first.offset:
                        self.hub.deliver_routed(ch, off, str(d).encode())
        except HubError as e:
            log.debug("channel %r: could not ask the owner for its gap: %s", ch.name, e)
        finally:
            self._release_held(ch.name, first)

    def resync(self, peer: str | None = None) -> None:
        """Catch up durable channels with subscribers here from the store, in the
        background: those fed by ``peer`` (its link into this node came back: what was
        queued when it broke is lost), or all (the trees changed with the membership).

        Without it a message lost on a link would reach subscribers only when the
        channel's next message shows the gap; a quiet channel could hold it back long.
        """
        names = []
        for name, ch in self.hub.channels.items():
            if not (ch.durable and ch.loaded and len(ch.subs)) or name in self._filling:
                continue
            if peer is None or self.placement.parent(name, self.me) == peer:
                names.append(name)
        if names:
            self._run(self._resync(names))

    async def _resync(self, names: list[str]) -> None:
        hub, store = self.hub, self.hub.store
        assert store is not None
        for name in names:
            ch = hub.channels.get(name)
            if ch is None or not ch.loaded or name in self._filling:
                continue
            try:
                epoch, top = await store.state(name, ch.ns.limits)
            except StoreError as e:
                log.warning("cluster: cannot check %r against the store: %s", name, e)
                return
            if epoch != ch.epoch or top <= ch.offset or name in self._filling:
                continue
            self.resyncs += 1
            self._filling[name] = []
            try:
                await hub.fill(ch, top)
            finally:
                self._release_held(name)
