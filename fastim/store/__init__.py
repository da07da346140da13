"""Where channel history and user inboxes live: ``memory``, ``sqlite`` or ``redis``.

``await open_store(settings)`` returns the store a :class:`StoreSettings` names, with
its history and inbox limits as defaults (a node makes its settings with
:meth:`fastim.config.Config.store_settings`); everything else talks to the
:class:`Store` interface (``docs/stores.md``). The stores know nothing of the node's
configuration: they take their own settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import (
    AckOutOfRange,
    Appended,
    ChannelState,
    History,
    HistoryLimits,
    InboxAppended,
    InboxFull,
    InboxLimits,
    InboxMessage,
    InboxState,
    KeyedAppended,
    OutboxEntry,
    OutboxItem,
    OutboxStats,
    Store,
    StoreError,
    StoreUnavailable,
)
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "AckOutOfRange",
    "Appended",
    "ChannelState",
    "History",
    "HistoryLimits",
    "InboxAppended",
    "InboxFull",
    "InboxLimits",
    "InboxMessage",
    "InboxState",
    "KeyedAppended",
    "MemoryStore",
    "OutboxEntry",
    "OutboxItem",
    "OutboxStats",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "open_store",
]

STORES = ("memory", "sqlite", "redis")


@dataclass(frozen=True)
class StoreSettings:
    """What :func:`open_store` needs: which store, where, and its default limits.

    ``kind``: memory, sqlite or redis; ``path`` and ``synchronous`` for sqlite; ``url``,
    ``prefix`` and ``timeout`` (seconds) for redis. ``shared``: the sqlite file is shared
    by the workers of one node, whose supervisor holds its lock (docs/workers.md).
    """

    kind: str = "sqlite"
    path: str = "fastim.db"
    synchronous: str = "normal"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "fastim"
    timeout: float = 2.0
    limits: HistoryLimits = field(default_factory=HistoryLimits)
    inbox: InboxLimits = field(default_factory=InboxLimits)
    shared: bool = False


async def open_store(settings: StoreSettings) -> Store:
    """Open the store ``settings`` names; raise :class:`StoreUnavailable` if it cannot be
    opened (sqlite: the file cannot be created or is locked by another process; redis:
    no answer at its URL), so a node fails at start, not later."""
    limits, inbox = settings.limits, settings.inbox
    if settings.kind == "memory":
        return MemoryStore(limits, inbox)
    if settings.kind == "sqlite":
        return await SqliteStore.open(
            settings.path, limits, inbox, synchronous=settings.synchronous, shared=settings.shared
        )
    if settings.kind == "redis":
        # imported here: redis-py is the optional extra fastim[redis]
        from .redis import RedisStore

        return await RedisStore.open(
            settings.url, limits, inbox, prefix=settings.prefix, timeout=settings.timeout
        )
    raise ValueError(f"store: must be one of {', '.join(STORES)}, got {settings.kind!r}")
