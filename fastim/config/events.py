"""The event-webhook settings (``events_*``, docs/events.md) and their check.

Kept out of :mod:`.settings` so the settings file only gains its fields and one call;
the webhook itself is :mod:`fastim.backend.events` / :mod:`fastim.backend.outbox`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

#: every kind of event, in the order of docs/events.md
EVENT_KINDS = (
    "connect",
    "disconnect",
    "subscribe",
    "unsubscribe",
    "join",
    "leave",
    "dm",
    "publish",
)


def event_kinds(value: str) -> frozenset[str]:
    """The kinds an ``events`` setting turns on; ValueError naming an unknown one."""
    kinds = {k.strip() for k in value.split(",") if k.strip()}
    bad = sorted(kinds - set(EVENT_KINDS))
    if bad:
        raise ValueError(f"events: unknown kind {bad[0]!r} (known: {', '.join(EVENT_KINDS)})")
    return frozenset(kinds)


def check_events(cfg: Any) -> None:
    """Raise ValueError naming the first bad ``events_*`` setting (values of secrets and
    headers are never repeated: they may be credentials)."""
    url = cfg.events_url
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("events_url: must be an http:// or https:// URL ('' = off)")
    event_kinds(cfg.events)
    if not 0 < cfg.events_timeout <= 300:
        raise ValueError(f"events_timeout: must be in (0, 300] seconds, got {cfg.events_timeout}")
    if not 1 <= cfg.events_batch <= 10_000:
        raise ValueError(f"events_batch: must be 1..10000, got {cfg.events_batch}")
    if not cfg.events_retry_max >= 0.1:
        raise ValueError(f"events_retry_max: must be >= 0.1 seconds, got {cfg.events_retry_max}")
    if not cfg.events_lease >= 0.5:
        raise ValueError(f"events_lease: must be >= 0.5 seconds, got {cfg.events_lease}")
    if url and cfg.events_timeout >= cfg.events_lease * 3:
        raise ValueError(
            "events_timeout: must be below 3 x events_lease (the sender renews its lease "
            "between requests)"
        )
    headers = cfg.events_headers
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "\n" not in k + v
        for k, v in headers.items()
    ):
        raise ValueError("events_headers: must be a table of header name = string value")
    if cfg.events_secret and not cfg.events_secret.isprintable():
        raise ValueError("events_secret: must be printable characters")
