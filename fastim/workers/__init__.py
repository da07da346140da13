"""One node, every core: ``fastim serve --workers N`` (docs/workers.md).

- :mod:`fastim.workers.role`: what a worker process is told by its supervisor (its index,
  the worker count, the directory of the workers' Unix sockets, its liveness pipe).
- :mod:`fastim.workers.mesh`: the workers of one node as one node to clients: the
  cluster's routing (owner per channel, forwarding, DELIVER) over Unix-socket links with
  membership fixed by the supervisor, delivering only to workers that follow a channel.
- :mod:`fastim.workers.supervisor`: the parent process: starts the workers on shared
  ports (``SO_REUSEPORT``), restarts one that dies or hangs, drains them all on SIGTERM.
"""
