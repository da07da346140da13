"""What a worker process is told by its supervisor, through one environment variable.

The supervisor (:mod:`fastim.workers.supervisor`) starts each worker as
``python -m fastim serve <the same settings>`` with ``_FASTIM_WORKER`` set to
:meth:`WorkerRole.to_env`. The leading underscore keeps it out of the ``FASTIM_*``
settings namespace (an unknown ``FASTIM_*`` variable is reported as a typo).

Why an environment variable and not flags: a worker must run exactly the settings the
operator gave (file, ``FASTIM_*`` variables, flags), loaded the same way; the role is
the only thing that differs between workers and it is not a setting anyone may set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

ENV = "_FASTIM_WORKER"


@dataclass(frozen=True)
class WorkerRole:
    """One worker of a node of ``count`` workers.

    - ``index``: 0 … count-1; the worker's name in the mesh is :func:`worker_name`.
    - ``directory``: private to the node (mode 0700), holds ``w<i>.sock``, the worker's
      link socket (:meth:`socket_path`).
    - ``ping_fd``: the write end of a pipe to the supervisor: the worker writes ``R``
      once it serves, then ``.`` from its event loop every :data:`PING_EVERY` seconds; a
      worker silent for the supervisor's hang timeout is killed and replaced.
    - ``store_locked``: the supervisor holds the sqlite store's file lock for the whole
      node (the workers share the file; see docs/workers.md).
    """

    index: int
    count: int
    directory: str
    ping_fd: int = -1
    store_locked: bool = False

    def to_env(self) -> str:
        return orjson.dumps(
            {
                "index": self.index,
                "count": self.count,
                "dir": self.directory,
                "ping_fd": self.ping_fd,
                "store_locked": self.store_locked,
            }
        ).decode()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerRole | None:
        """The role in ``environ`` (default: this process's), None when not a worker."""
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        d = orjson.loads(raw)
        role = cls(
            int(d["index"]),
            int(d["count"]),
            str(d["dir"]),
            int(d.get("ping_fd", -1)),
            bool(d.get("store_locked", False)),
        )
        if not 0 <= role.index < role.count:
            raise ValueError(f"{ENV}: index {role.index} not in 0..{role.count - 1}")
        return role

    @property
    def name(self) -> str:
        return worker_name(self.index)

    @property
    def names(self) -> list[str]:
        return [worker_name(i) for i in range(self.count)]

    def socket_path(self, index: int | None = None) -> str:
        return os.path.join(
            self.directory, f"{worker_name(self.index if index is None else index)}.sock"
        )


#: seconds between a worker's liveness pings
PING_EVERY = 0.5


def worker_name(index: int) -> str:
    return f"w{index}"


#: the supervisor's state file in the workers' directory (pids, restarts, hangs)
STATE_FILE = "supervisor.json"


def read_state(directory: str) -> dict[str, object]:
    """The supervisor's state (``{}`` when it has written none, or it is unreadable)."""
    try:
        with open(os.path.join(directory, STATE_FILE), "rb") as f:
            state = orjson.loads(f.read())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
