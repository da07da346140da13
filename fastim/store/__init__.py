"""Where channel history and user inboxes live: ``memory``, ``sqlite`` or ``redis``.

``await open_store(config)`` returns the store the ``store`` setting names, with the
history and inbox limits of the config as defaults; everything else talks to the
:class:`Store` interface (``docs/stores.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    Store,
    StoreError,
    StoreUnavailable,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from ..config import Config

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
    "MemoryStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
]

STORES = ("memory", "sqlite", "redis")


async def open_store(config: Config) -> Store:
    """Open the store named by ``config.store``; raise :class:`StoreUnavailable` if it
    cannot be opened (sqlite: the file cannot be created or is locked by another
    process; redis: no answer at ``redis_url``), so a node fails at start, not later."""
    limits = HistoryLimits.from_config(config)
    inbox = InboxLimits(config.inbox_max, config.inbox_dedup_window)
    if config.store == "memory":
        return MemoryStore(limits, inbox)
    if config.store == "sqlite":
        from .sqlite import SqliteStore

        return await SqliteStore.open(
            config.store_path, limits, inbox, synchronous=config.sqlite_synchronous
        )
    if config.store == "redis":
        from .redis import RedisStore

        return await RedisStore.open(
            config.redis_url,
            limits,
            inbox,
            prefix=config.redis_prefix,
            timeout=config.redis_timeout,
        )
    raise ValueError(f"store: must be one of {', '.join(STORES)}, got {config.store!r}")
