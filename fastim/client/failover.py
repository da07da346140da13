"""Failover over the node list: the order a client tries its nodes in, its first
connect, and the rounds of reconnect attempts after a loss.

* **Order**: the addresses as given, or (``shuffle``) a random permutation drawn once
  per client, kept for its life: a crowd of clients with the same list spreads over
  the nodes.
* **First connect**: each address once, in order, until one answers the handshake;
  if none does, the last error is raised (the backoff is for *re*-connects).
* **After a loss**: the addresses that *follow* the lost one, then the lost one last,
  round after round, each attempt after a backoff delay. A node leaving ("going away",
  1001 / 1012) makes the next attempt go at once; a node that turns a new connection
  away with "going away" (at its connection limit) is skipped without sleeping, at most
  once per address per round. When every address refused for good (a close code that
  says "fix the client"), the client gives up.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Protocol

from ..errors import ConnectionClosed, FastimError, ProtocolError
from ..protocol import CloseCode
from .backoff import Backoff
from .connection import Connection, HandshakeError
from .handshake import Frames

__all__ = ["MOVE_ON_AT_ONCE", "Dialer", "first_connect", "next_urls", "node_order", "reconnect"]

log = logging.getLogger("fastim.client")

#: close codes of a node that is leaving (shutdown, restart): try the next node at once
MOVE_ON_AT_ONCE = frozenset({CloseCode.GOING_AWAY, 1012})


class Dialer(Protocol):
    """What failover needs of a client: its order, its backoff, a handshake with one
    address, and a way to give up."""

    order: list[str]
    backoff: Backoff
    _closing: bool

    async def _handshake(self, url: str) -> tuple[Connection, Frames]: ...

    def _give_up(self, why: ConnectionClosed) -> None: ...


def node_order(urls: Sequence[str], shuffle: bool) -> list[str]:
    """The order a client tries ``urls`` in: as given, or a random one of its own."""
    order = list(urls)
    if shuffle:
        random.shuffle(order)
    return order


def next_urls(order: list[str], lost: str) -> list[str]:
    """The order of one round of reconnect attempts after losing ``lost``: the
    addresses after it in ``order``, then it (a node that just failed is the least
    likely to answer; it is tried again at the end of every round)."""
    try:
        i = order.index(lost)
    except ValueError:
        return list(order)
    return order[i + 1 :] + order[: i + 1]


async def first_connect(dialer: Dialer) -> tuple[Connection, Frames]:
    """Each address once, in ``dialer.order``; raise the last error if all fail."""
    last: BaseException | None = None
    for url in dialer.order:
        try:
            return await dialer._handshake(url)
        except (OSError, asyncio.TimeoutError, FastimError) as e:
            log.debug("fastim client: %s: %r", url, e)
            last = e
            continue
    assert last is not None
    raise last


async def reconnect(
    dialer: Dialer, lost: str, at_once: bool = False
) -> tuple[Connection, Frames] | None:
    """Sleep, try the next URL, repeat; None if the client closed or gave up.

    ``lost``: the URL of the connection that ended (tried last in each round).
    ``at_once``: it ended with "going away" (the node is shutting down): the first
    attempt, at the next node, is made without the backoff sleep. A node that
    refuses the handshake with "going away" (at its connection limit) is also
    skipped at once, at most once per address per round, so a cluster where every
    node refuses still goes through the backoff.
    """
    permanent: dict[str, BaseException] = {}
    attempt = 0
    urls = next_urls(dialer.order, lost)
    skips = 0  # sleeps skipped since the last sleep
    while not dialer._closing:
        if at_once and skips < len(urls):
            skips += 1
        else:
            skips = 0
            delay = dialer.backoff.next()
            await asyncio.sleep(delay)
            if dialer._closing:
                return None
        at_once = False
        url = urls[attempt % len(urls)]
        attempt += 1
        try:
            conn, rest = await dialer._handshake(url)
        except (OSError, asyncio.TimeoutError, HandshakeError) as e:
            log.info("fastim client: reconnect to %s failed: %r", url, e)
            permanent.pop(url, None)
            continue
        except (ConnectionClosed, ProtocolError) as e:
            if isinstance(e, ConnectionClosed) and e.temporary:
                log.info("fastim client: %s turned us away: %s", url, e)
                permanent.pop(url, None)
                at_once = e.code in MOVE_ON_AT_ONCE
                continue
            log.warning("fastim client: %s refused us: %r", url, e)
            permanent[url] = e
            if len(permanent) == len(set(urls)):
                dialer._give_up(
                    e
                    if isinstance(e, ConnectionClosed)
                    else ConnectionClosed(CloseCode.POLICY_VIOLATION, str(e))
                )
                return None
            continue
        log.info("fastim client: reconnected to %s (lost %s)", url, lost)
        return conn, rest
    return None
