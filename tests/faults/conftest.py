"""Fixtures of the fault tests: node processes on free ports, a real redis-server."""

from ._fixtures import nodes, shared_redis, store_args  # noqa: F401 (fixtures)
