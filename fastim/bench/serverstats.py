"""The server's side of a run, read from /proc: its resident memory and CPU time.

Known when the bench spawned the node or was given ``--server-pid`` (``--server-pids``
for the nodes of a cluster, whose CPU is summed).
"""

from __future__ import annotations

import argparse
import os


def _read_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def server_rss_kib(pid: int | None) -> int | None:
    """The process's resident set (VmRSS), KiB; None if unknown."""
    return None if pid is None else _read_status_kib(pid, "VmRSS")


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds the process has used; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pids(args: argparse.Namespace, server_pid: int | None) -> list[int]:
    """The processes whose CPU is the server's: ``--server-pids`` (the nodes of a
    cluster), else the one server pid (if known)."""
    pids = [int(x) for x in (getattr(args, "server_pids", None) or "").split(",") if x.strip()]
    return pids or ([server_pid] if server_pid is not None else [])


def cpu_sum(pids: list[int]) -> float | None:
    """CPU seconds used by all of ``pids`` so far; None if any is unknown (or none given)."""
    total = 0.0
    for pid in pids:
        cpu = server_cpu_s(pid)
        if cpu is None:
            return None
        total += cpu
    return total if pids else None
