"""``open_store(config.store_settings())``: the setting picks the store, the config gives
its limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastim.config import Config, ConfigError, build
from fastim.store import HistoryLimits, MemoryStore, open_store
from fastim.store.redis import RedisStore
from fastim.store.sqlite import SqliteStore

from ._redis import RedisServer


async def test_open_each_store(tmp_path: Path, redis_server: RedisServer) -> None:
    base: dict[str, Any] = {"history_size": 7, "history_ttl": 0.0, "inbox_max": 3}
    assert Config().store == "sqlite"  # the default keeps what it acknowledged (issue P7)
    m = await open_store(Config(**base, store="memory").validate().store_settings())
    assert isinstance(m, MemoryStore)
    assert m.limits == HistoryLimits(7, None, 86400.0)
    assert m.inbox_limits.max_unacked == 3
    await m.close()

    path = tmp_path / "x.db"
    sq = await open_store(
        Config(
            **base, store="sqlite", store_path=str(path), sqlite_synchronous="full"
        ).store_settings()
    )
    assert isinstance(sq, SqliteStore) and sq.synchronous == "FULL"
    assert (await sq.append("c", b"1")).offset == 1
    await sq.close()
    assert path.exists()

    cfg = Config(**base, store="redis", redis_url=redis_server.url, redis_prefix="openx")
    r = await open_store(cfg.store_settings())
    assert isinstance(r, RedisStore) and r.prefix == "openx"
    assert r.limits.size == 7
    await r.close()


def test_limits_from_config() -> None:
    assert Config().history_limits() == HistoryLimits(128, 300.0, 86400.0)
    cfg = Config(history_ttl=0.0, history_meta_ttl=0.0)
    assert cfg.history_limits() == HistoryLimits(128, None, None)
    # a meta_ttl shorter than the ttl would forget channels that still have messages
    assert HistoryLimits(1, 100.0, 10.0).meta_ttl == 100.0
    with pytest.raises(ValueError):
        HistoryLimits(-1)
    with pytest.raises(ValueError):
        HistoryLimits(1, 0.0)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"store": "postgres"}, "store: must be memory, sqlite or redis"),
        ({"store_path": ""}, "store_path: must not be empty"),
        ({"sqlite_synchronous": "off"}, "sqlite_synchronous: must be normal or full"),
        ({"redis_url": "http://x"}, "redis_url: must start with redis://"),
        ({"redis_prefix": "a{b"}, "redis_prefix: must be non-empty, without braces"),
        ({"redis_timeout": 0.0}, "redis_timeout: must be > 0"),
        ({"inbox_max": 0}, "inbox_max: must be >= 1"),
        ({"inbox_dedup_window": -1.0}, "inbox_dedup_window: must be >= 0"),
        ({"history_meta_ttl": -1.0}, "history_meta_ttl: must be >= 0"),
    ],
)
def test_bad_store_settings_name_the_key(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build(None, **settings)
