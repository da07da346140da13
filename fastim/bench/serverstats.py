"""The server's side of a run, read from /proc: its processes, resident memory and CPU time.

Known when the bench spawned the node or was given ``--server-pid`` (``--server-pids``
for the nodes of a cluster, whose CPU is summed). A node of several workers (``fastim
serve --workers N``) is its supervisor and the supervisor's children: its CPU time and
RSS are summed over all of them (:func:`node_pids`).
"""

from __future__ import annotations

import argparse
import os

import orjson

#: the environment variable a supervisor gives each worker (fastim.workers.role.ENV: the
#: bench imports nothing of the server, so it is spelled out here)
WORKER_ENV = b"_FASTIM_WORKER"


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


def rss_sum_kib(pids: list[int]) -> int | None:
    """VmRSS of all of ``pids`` together, KiB; None if any is unknown (or none given)."""
    total = 0
    for pid in pids:
        rss = server_rss_kib(pid)
        if rss is None:
            return None
        total += rss
    return total if pids else None


def children(pid: int) -> list[int]:
    """The process's children (``/proc/<pid>/task/*/children``), in the kernel's order."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def node_pids(pid: int | None) -> list[int]:
    """The processes of the node whose main process is ``pid``: itself and its
    descendants (a supervisor and its workers; a single node has none)."""
    if pid is None:
        return []
    out = [pid]
    i = 0
    while i < len(out):
        out += [c for c in children(out[i]) if c not in out]
        i += 1
    return out


def worker_index(pid: int) -> int | None:
    """The worker index its supervisor gave process ``pid`` (``_FASTIM_WORKER`` in its
    environment), None when it is not a worker (or its environment is not readable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        key, _, value = kv.partition(b"=")
        if key == WORKER_ENV:
            try:
                return int(orjson.loads(value)["index"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def workers_of(pid: int) -> list[int]:
    """The worker processes of a supervisor ``pid``, ordered by worker index (those
    without a readable index last, in the kernel's order)."""
    kids = [(worker_index(c), c) for c in children(pid)]
    known = sorted((i, c) for i, c in kids if i is not None)
    return [c for _i, c in known] + [c for i, c in kids if i is None]


def listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net/tcp{,6}."""
    out: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    # sl local_address rem_address st ... inode (the 10th field)
                    if len(parts) > 9 and parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                        out.add(int(parts[9]))
        except OSError:
            continue
    return out


def listens(pid: int, inodes: set[int]) -> bool:
    """Whether process ``pid`` holds one of the sockets ``inodes``."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            return True
    return False


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
    cluster), else the server's process and its descendants (a supervisor's workers)."""
    pids = [int(x) for x in (getattr(args, "server_pids", None) or "").split(",") if x.strip()]
    return pids or node_pids(server_pid)


def cpu_sum(pids: list[int]) -> float | None:
    """CPU seconds used by all of ``pids`` so far; None if any is unknown (or none given)."""
    total = 0.0
    for pid in pids:
        cpu = server_cpu_s(pid)
        if cpu is None:
            return None
        total += cpu
    return total if pids else None


def parse_cpus(spec: str | None) -> list[int]:
    """A CPU list as taskset takes it (``0``, ``0,1``, ``0-3``, ``0-1,6``) → [0, 1, ...],
    in the order given, without repeats; [] for None, '' or 'none'."""
    if spec is None or spec.strip() in ("", "none"):
        return []
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU list {spec!r}")
        out += [c for c in range(first, last + 1) if c not in out]
    return out
