"""The ``fastim`` command: ``serve`` a node, ``bench`` one, ``version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from datetime import datetime, timezone
from typing import Any

import orjson

from . import __version__
from .cluster import ClusterError
from .config import Config, ConfigError, load, redact
from .store import StoreError
from .workers.role import WorkerRole

log = logging.getLogger("fastim")


def _raise_fd_limit(max_connections: int) -> None:
    """Let the node hold as many connections as the hard limit allows; say if that is short.

    Only a process with CAP_SYS_RESOURCE may raise the hard limit itself: elsewhere the
    operator sets it (``ulimit -Hn``, systemd's ``LimitNOFILE=``; docs/performance.md).
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max_connections + 64  # listeners, logs, store files
        if soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            except (ValueError, OSError):
                pass
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            log.warning(
                "open-file limit %d (hard %d) caps this node at about %d connections, below "
                "max_connections=%d: raise the hard limit (ulimit -Hn, LimitNOFILE=)",
                soft,
                hard,
                max(0, soft - 64),
                max_connections,
            )
    except ImportError:  # pragma: no cover - not on POSIX
        pass


def _tune_malloc() -> None:
    """Keep freed memory in the process instead of handing it back to the kernel at once.

    Out-rings free their buffer when a flush empties them (idle connections cost no
    buffer), so under load glibc trims and regrows its heap every loop tick, and the
    page faults of regrowing were ~5% of a saturated node's CPU (perf, docs/
    performance.md). A 256 MiB trim threshold and a fixed 4 MiB mmap threshold keep those
    pages; RSS then shrinks only when more than 256 MiB are free at the heap's top.
    Environment settings (GLIBC_TUNABLES, MALLOC_*_) win if present.
    """
    import os

    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return
    if any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc (musl has no mallopt)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_mmap_threshold, 4 << 20)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Config field: --tcp-port, --ping-interval, ..."""
    for f in fields(Config):
        if f.metadata.get("file_only"):
            continue
        # "int | str" (workers: a count or 'auto') is read as a string; validate() types it
        typ: Any = {"int": int, "float": float, "str": str, "int | str": str}[str(f.type)]
        default = f.default if f.default is not MISSING else "(computed)"
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=typ,
            default=None,
            metavar=f.name.upper() if typ is str else typ.__name__.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )


#: attributes every LogRecord has; any other one came in ``extra=`` and is a JSON field
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, then each ``extra=`` field, and ``exc`` with a traceback.

    For log shippers (Loki, Elasticsearch, CloudWatch): no multi-line records to stitch
    back together, and fields to filter on without parsing free text.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class MaskingFormatter(logging.Formatter):
    """Another formatter's output with every secret replaced by ``***``.

    Masking the finished line catches a secret wherever it hides: the message, its
    arguments, an ``extra`` field, an exception's text (a driver error that quotes its
    URL). Each secret is also masked as JSON escapes it, so a key holding a quote or a
    backslash cannot slip through a JSON line.
    """

    def __init__(self, inner: logging.Formatter, secrets: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        forms = set()
        for s in secrets:
            forms.add(s)
            forms.add(orjson.dumps(s).decode()[1:-1])
        self.forms = sorted(forms, key=len, reverse=True)  # a longer form first

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        for secret in self.forms:
            if secret in line:
                line = line.replace(secret, "***")
        return line


def secrets_of(cfg: Config) -> list[str]:
    """The secret values of a configuration: what ``redact`` masks (passwords in URLs,
    ``api_key``, settings named secret/password/token). Values under 4 characters are
    left out: masking them would garble every log line."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, str) or not value or redact(f.name, value) == value:
            continue
        if "://" in value and "@" in value:
            creds = value.split("://", 1)[1].rsplit("@", 1)[0]
            value = creds.split(":", 1)[1] if ":" in creds else creds
        if len(value) >= 4:
            out.append(value)
    return out


def _setup_logging(cfg: Config) -> None:
    """Logs to stderr as text or JSON lines (``log_format``), secrets masked."""
    inner = (
        JsonFormatter()
        if cfg.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter(inner, secrets_of(cfg)))
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()), handlers=[handler])


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        f.name: getattr(args, f.name) for f in fields(Config) if not f.metadata.get("file_only")
    }
    # an unknown FASTIM_* variable is a warning here (wrappers and images set their own)
    # and an error in `fastim config check`, which is where a typo should be caught
    unknown_env: list[str] = []
    try:
        cfg = load(args.config, os.environ, overrides, unknown_env)
    except ConfigError as e:
        print(f"fastim: bad configuration: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg)
    for warning in unknown_env:
        log.warning("%s", warning)
    try:
        role = WorkerRole.from_env()
    except (ValueError, KeyError, TypeError) as e:
        print(f"fastim: bad worker role from the supervisor: {e}", file=sys.stderr)
        return 2
    if role is None and cfg.worker_count() > 1:
        # the parent of the node's workers; it imports neither the node nor uvloop
        from .workers.supervisor import Supervisor

        return Supervisor(cfg, args.argv).run()
    _raise_fd_limit(cfg.max_connections)
    _tune_malloc()

    # imported here, not at the top: a supervisor process stays small without it
    from .node import Node

    node = Node(cfg, role=role)
    if role is None:
        serving = node.serve_forever()
    else:
        # a worker of `fastim serve --workers N` (role set: it never supervises itself)
        from .workers.worker import run_worker

        serving = run_worker(node, role)

    try:
        _run(serving)
    except StoreError as e:
        log.error("fastim: cannot open the store: %s", e)
        return 1
    except ClusterError as e:
        log.error("fastim: cannot join the cluster: %s", e)
        return 1
    except OSError as e:
        log.error("fastim: cannot listen: %s", e.strerror or e)
        return 1
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file (with the FASTIM_* environment) and print what a node would use."""
    try:
        cfg = load(args.file, os.environ, {})
    except ConfigError as e:
        print(f"fastim: bad configuration: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        width = max(len(f.name) for f in fields(Config))
        for f in fields(Config):
            value = redact(f.name, getattr(cfg, f.name))
            print(f"{f.name:<{width}}  {value!r}")
    print(f"{args.file}: ok", file=sys.stderr)
    return 0


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastim",
        description="fastim: a real-time message server with a compiled fan-out core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node (embedded defaults: no Redis, no etcd)")
    serve.add_argument("--config", "-c", metavar="FILE", help="TOML file of settings")
    _add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="check a configuration file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate FILE (and FASTIM_* variables); print the effective settings"
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--quiet", "-q", action="store_true", help="only the verdict")
    check.set_defaults(func=cmd_config_check)

    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] != ["serve"]:
        # the load generator loads the SDK and the compiled core: not into `fastim serve`,
        # whose supervisor (--workers N) must stay small
        from .bench import add_bench_parser

        add_bench_parser(sub)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=lambda _a: print(f"fastim {__version__}") or 0)

    args = parser.parse_args(raw)
    # what followed "serve", as given: a supervisor starts its workers with the same flags
    args.argv = raw[raw.index("serve") + 1 :] if args.command == "serve" else []
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
