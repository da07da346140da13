"""Channel namespaces: per-prefix history, durability, presence and access settings.

The part of a channel name before its first ``:`` is its namespace (``room:1`` →
``room``); a name without ``:``, or with a prefix the config does not list, belongs to
the default namespace, whose settings are the top-level ones (``history_size``,
``history_ttl``...). A config file sets the others in ``[namespaces.NAME]`` tables::

    [namespaces.room]
    history_size = 500
    join_leave = true

    [namespaces.ticker]
    durable = false      # history in node memory only: acked without the store
    allow_publish = "none"   # only the server HTTP API publishes here

Why per namespace: a chat room wants long, durable history and presence; a price ticker
wants neither and every microsecond. One node serves both.

The ``allow_*`` rules say who may subscribe, publish, recover history (subscribe with
``since``) and ask for presence: ``any``, ``user`` (a verified token), ``token`` (only
channels the token's ``channels`` claim lists) or ``none``; fastim.auth applies them.
Like the history settings, a namespace that does not set one inherits the top-level
setting of the same name (default ``any``: what a node without auth always did).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..store import HistoryLimits

#: settings a ``[namespaces.NAME]`` table may hold, and their types
NAMESPACE_KEYS: dict[str, type] = {
    "history_size": int,
    "history_ttl": float,
    "durable": bool,
    "presence": bool,
    "join_leave": bool,
    "allow_subscribe": str,
    "allow_publish": str,
    "allow_history": str,
    "allow_presence": str,
    "proxy_subscribe": bool,
    "proxy_publish": bool,
    "events_publish": bool,
    "recovery": str,
    "delta": str,
}

#: the values of the allow_* rules: everyone (anonymous too), a verified token, only
#: channels the token's channels claim lists, nobody (fastim.auth applies them)
RULE_VALUES = ("any", "user", "token", "none")
#: the keys of NAMESPACE_KEYS that are access rules, in the order of the docs
RULE_KEYS = ("allow_subscribe", "allow_publish", "allow_history", "allow_presence")
#: the other string settings of a namespace and the values each may take
CHOICES: dict[str, tuple[str, ...]] = {
    # stream: a (re)subscriber gets every message it missed; cache: only the latest
    # (channels that carry a state, not events)
    "recovery": ("stream", "cache"),
    # fossil: subscribers that ask get Fossil deltas (docs/delta.md); "": off
    "delta": ("fossil", ""),
}


@dataclass(frozen=True, slots=True)
class Namespace:
    """What a channel of this namespace keeps and announces."""

    name: str
    #: messages kept for recovery (0: none; offsets are still assigned)
    history_size: int = 128
    #: seconds a message stays recoverable (0: no age limit)
    history_ttl: float = 300.0
    #: history in the configured store, publishes acked after it accepted them; false:
    #: node memory only, acked at once, lost (new epoch) when the node restarts
    durable: bool = True
    #: answer presence requests with the list of users (the count is always given)
    presence: bool = True
    #: announce a user's first subscription and last unsubscription to subscribers
    join_leave: bool = False
    #: seconds the store keeps a channel's epoch after its last publish (0: for ever)
    meta_ttl: float = 86400.0
    #: who may subscribe, publish, subscribe with since, ask for presence (RULE_VALUES)
    allow_subscribe: str = "any"
    allow_publish: str = "any"
    allow_history: str = "any"
    allow_presence: str = "any"
    #: subscribes and client publishes go through the proxy hooks (proxy_subscribe_url,
    #: proxy_publish_url) when those are set; false: this namespace skips them
    proxy_subscribe: bool = True
    proxy_publish: bool = True
    #: every publish to a channel of this namespace is an event for events_url
    events_publish: bool = False
    #: what a (re)subscriber with since or history gets: "stream", every message it
    #: missed (within history); "cache", only the channel's latest message
    recovery: str = "stream"
    #: "fossil": subscribers that ask for it get each message as a Fossil delta against
    #: the previous one, after a full one (docs/delta.md); "": off
    delta: str = ""

    @property
    def limits(self) -> HistoryLimits:
        return HistoryLimits(self.history_size, self.history_ttl or None, self.meta_ttl or None)


def check_namespaces(raw: object) -> dict[str, dict[str, Any]]:
    """Validate a ``namespaces`` table; raise ValueError naming ``namespaces.NAME.key``."""
    if not isinstance(raw, dict):
        raise ValueError(f"namespaces: must be a table of tables, got {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"namespaces.{name}: a namespace name is non-empty, without ':'")
        if not isinstance(table, dict):
            raise ValueError(f"namespaces.{name}: must be a table, got {type(table).__name__}")
        clean: dict[str, Any] = {}
        for key, value in table.items():
            want = NAMESPACE_KEYS.get(key)
            where = f"namespaces.{name}.{key}"
            if want is None:
                raise ValueError(
                    f"{where}: unknown setting (known: {', '.join(sorted(NAMESPACE_KEYS))})"
                )
            if want is str:
                allowed = CHOICES.get(key, RULE_VALUES)
                if value not in allowed:
                    shown = ", ".join(v or '""' for v in allowed)
                    raise ValueError(f"{where}: must be one of {shown}, got {value!r}")
                ok = True
            elif want is bool:
                ok = isinstance(value, bool)
            elif want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"{where}: expected {want.__name__}, got {value!r}")
            if key in ("history_size", "history_ttl") and value < 0:
                raise ValueError(f"{where}: must be >= 0, got {value}")
            clean[key] = float(value) if want is float else value
        if clean.get("recovery") == "cache" and clean.get("history_size", 1) < 1:
            raise ValueError(
                f'namespaces.{name}.recovery: "cache" keeps the latest message in the '
                "history: history_size must be >= 1"
            )
        out[name] = clean
    return out


class Namespaces:
    """Resolves a channel name to its :class:`Namespace` (a dict lookup per call)."""

    __slots__ = ("_by_name", "default")

    def __init__(self, default: Namespace, tables: dict[str, dict[str, Any]]) -> None:
        """``default``: the top-level settings; ``tables``: the ``[namespaces.NAME]``
        tables (checked here), each completed from ``default``. A node gets its own from
        :meth:`fastim.config.Config.namespace_table`."""
        self.default = default
        self._by_name: dict[str, Namespace] = {}
        for name, table in check_namespaces(tables).items():
            settings: dict[str, Any] = {
                "history_size": self.default.history_size,
                "history_ttl": self.default.history_ttl,
                "meta_ttl": self.default.meta_ttl,
                **{key: getattr(self.default, key) for key in RULE_KEYS},
            }
            settings.update(table)
            self._by_name[name] = Namespace(name, **settings)

    def of(self, channel: str) -> Namespace:
        i = channel.find(":")
        if i <= 0:
            return self.default
        return self._by_name.get(channel[:i], self.default)

    def __iter__(self) -> Any:
        yield self.default
        yield from self._by_name.values()
