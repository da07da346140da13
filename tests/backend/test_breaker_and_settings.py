"""The circuit breaker's states on a clock of the test's own, and the proxy settings'
validation (each bad value named, a secret never echoed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastim.backend.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from fastim.config import Config, ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_failures_in_a_row_only() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 5.0, clock)
    b.failure()
    b.failure()
    b.success()  # the streak is broken: two more failures do not open it
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow() and b.opened == 1
    assert b.retry_after() == pytest.approx(5.0)


def test_half_open_lets_one_probe_and_decides_on_it() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock)
    b.failure()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.state == HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.failure()  # the probe failed: open again for a whole cooldown
    assert b.state == OPEN and b.opened == 2 and b.retry_after() == pytest.approx(5.0)
    clock.t += 5.0
    assert b.allow()
    b.success()  # the probe answered: closed, everything goes
    assert b.state == CLOSED and b.allow() and b.allow() and b.streak == 0


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"proxy_connect_url": "ftp://x/connect"}, "proxy_connect_url: must be an http://"),
        ({"proxy_rpc_url": "localhost:8080/rpc"}, "proxy_rpc_url: must be an http://"),
        ({"proxy_timeout": 0}, "proxy_timeout: must be > 0"),
        ({"proxy_max_inflight": 0}, "proxy_max_inflight: must be >= 1"),
        ({"proxy_breaker_failures": 0}, "proxy_breaker_failures: must be >= 1"),
        ({"proxy_breaker_cooldown": -1.0}, "proxy_breaker_cooldown: must be > 0"),
        ({"proxy_http_headers": "Cookie,Bad Header"}, "'Bad Header' is not a header name"),
    ],
)
def test_bad_proxy_settings_are_named(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(**settings).validate()  # type: ignore[arg-type]
    assert needle in str(e.value)


def test_a_bad_static_header_is_named_without_its_secret() -> None:
    with pytest.raises(ConfigError) as e:
        Config(proxy_static_headers="X-Ok: 1; no-colon-s3cr3t").validate()
    assert "proxy_static_headers: entry 2" in str(e.value)
    assert "s3cr3t" not in str(e.value)


def test_proxy_headers_parsed() -> None:
    cfg = Config(
        proxy_http_headers="Cookie, X-Request-Id",
        proxy_static_headers="X-Secret: a:b; X-Two: 2",
        proxy_publish_url="https://backend.example/publish",
    ).validate()
    assert cfg.proxy_headers() == (["cookie", "x-request-id"], {"X-Secret": "a:b", "X-Two": "2"})
    assert cfg.proxy_urls() == {"publish": "https://backend.example/publish"}


def test_header_settings_never_reach_the_logs() -> None:
    from fastim.config import redact

    assert redact("proxy_static_headers", "X-Fastim-Secret: hunter2") == "***"
    assert redact("events_headers", {"X-Key": "hunter2"}) == "***"
    assert redact("events_secret", "hunter2") == "***"
    assert redact("proxy_http_headers", "Cookie") == "Cookie"  # names only: shown


def test_the_config_example_of_docs_proxy_md_is_valid(tmp_path: Path) -> None:
    """docs/proxy.md's TOML, copied as a reader would, is a configuration the node takes."""
    import re

    from fastim.config.loading import build

    doc = Path(__file__).resolve().parents[2] / "docs" / "proxy.md"
    [toml] = re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S)
    path = tmp_path / "fastim.toml"
    path.write_text(toml)
    cfg = build(path)
    assert set(cfg.proxy_urls()) == {"connect", "subscribe", "publish", "rpc"}
    ticker = cfg.namespace_table().of("ticker:x")
    assert ticker.proxy_publish is False and ticker.proxy_subscribe is False


def test_a_node_without_hooks_or_events_does_not_load_aiohttp() -> None:
    """aiohttp is ~23 MB of resident memory per process: a node of 8 workers without
    proxy hooks or events would carry ~190 MB for nothing (seen in the 100k run)."""
    code = (
        "import sys, fastim.cli, fastim.node, fastim.backend.proxy, fastim.backend.outbox\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
