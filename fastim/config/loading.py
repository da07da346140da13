"""Loading the node's settings: a TOML file, ``FASTIM_*`` environment variables and
flags over the defaults of :class:`~fastim.config.settings.Config` (later wins), then
validated as a whole; and :func:`redact`, a setting's value fit for logs.

:func:`load` is what ``fastim serve`` and ``fastim config check`` call; :func:`build`
(defaults, a file, keyword overrides) is the short form for tests and embedding.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .settings import Config, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict of known settings, or raise ConfigError."""
    try:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known = {f.name for f in fields(Config)}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})"
            )
    return data


#: FASTIM_* variables that are not settings (build switches of setup.py)
_ENV_NOT_SETTINGS = frozenset({"FASTIM_DEBUG", "FASTIM_ANNOTATE"})


def env_name(setting: str) -> str:
    return "FASTIM_" + setting.upper()


def load_env(environ: Mapping[str, str], unknown: list[str] | None = None) -> dict[str, Any]:
    """Settings from ``FASTIM_<SETTING>`` variables, typed; raise ConfigError naming the
    variable for a bad value. An unknown ``FASTIM_*`` name is an error too (a typo must
    not pass ``fastim config check``), unless ``unknown`` is a list: then it is noted
    there and skipped (``fastim serve``: wrappers and images set variables of their own,
    ``FASTIM_BIN``, ``FASTIM_HOME``, which must not stop the node)."""
    by_env = {env_name(f.name): f for f in fields(Config) if not f.metadata.get("file_only")}
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("FASTIM_") or key in _ENV_NOT_SETTINGS:
            continue
        f = by_env.get(key)
        if f is None:
            close = difflib.get_close_matches(key, by_env, n=1)
            hint = f"did you mean {close[0]}?" if close else "settings are FASTIM_<NAME>"
            if unknown is None:
                raise ConfigError(f"{key}: no such setting ({hint})")
            unknown.append(f"{key}: no such setting, ignored ({hint})")
            continue
        typ = str(f.type)
        try:
            out[f.name] = int(raw) if typ == "int" else float(raw) if typ == "float" else raw
        except ValueError:
            raise ConfigError(f"{key}: expected {typ}, got {raw!r}") from None
    return out


def build(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the file at ``path``, then ``overrides`` (None values ignored)."""
    return load(path, None, overrides)


def load(
    path: str | Path | None,
    environ: Mapping[str, str] | None,
    overrides: Mapping[str, Any],
    unknown_env: list[str] | None = None,
) -> Config:
    """Defaults, then the file at ``path``, then ``FASTIM_*`` variables of ``environ``
    (when given), then ``overrides`` (None values ignored): later wins. Validated.
    ``unknown_env``: see :func:`load_env` (a list collects unknown variables instead of
    refusing them)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(load_file(path))
    if environ is not None:
        values.update(load_env(environ, unknown_env))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return cfg.validate()


def redact(name: str, value: Any) -> Any:
    """A setting's value fit for logs: passwords in URLs and secret settings masked."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0] if ":" in creds else ""
        return f"{scheme}://{user}:***@{host}"
    if any(word in name for word in ("secret", "password", "api_key", "token")) and value:
        return "***"
    if name in ("proxy_static_headers", "events_headers") and value:
        return "***"  # headers the backend checks: they carry its secrets
    return value
