"""What a setting needs of the machine it runs on, looked up rather than parsed: a host
this machine can listen on (an IP address, or a name it resolves), an optional package
(an extra of the fastim package) that is installed.

Each check raises ``ValueError`` with a message naming the setting;
:meth:`fastim.config.Config.validate` turns it into a ``ConfigError``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import socket


def check_host(host: str) -> None:
    """``host`` must be an IP address, '' (every address), or a name this machine resolves:
    else ValueError naming it (``fastim config check`` must catch what bind would refuse)."""
    if host == "":
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:
        # 999.1.1.1, 10.0.0 (which getaddrinfo would read as 10.0.0.0), a bad IPv6 address
        raise ValueError(f"host: {host!r} is not a valid IP address")
    if len(host) > 253 or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"host: {host!r} is neither an IP address nor a host name")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ValueError(
            f"host: {host!r} is neither an IP address nor a name this machine resolves ({e})"
        ) from None


def need_extra(module: str, setting: str, what: str, extra: str) -> None:
    """ValueError naming ``setting`` and the pip command when an optional dependency
    (an extra of the fastim package) is not installed: found by name, not imported, so
    ``fastim config check`` catches it as fast as a start does."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(
            f"{setting}: {what} needs the {module} package, which is not installed: "
            f"pip install 'fastim[{extra}]'"
        )
