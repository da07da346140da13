"""Peer for issue P2: a minimal broadcast server on the ``websockets`` library (asyncio API).

Every text or binary message a client sends goes to every *other* connected client.
It is written the way the library's documentation recommends for fan-out:
``websockets.asyncio.server.broadcast``, which pushes one frame per connection
synchronously (no task per recipient, no backpressure). Runs on uvloop, like fastim.

    python benchmarks/peers/websockets_broadcast.py --host 127.0.0.1 --port 8765

prints one ``listening`` line on stdout when it accepts connections. Library defaults are
kept (keepalive pings every 20 s, permessage-deflate only if the client offers it), so
the comparison is with websockets as people run it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    """Hold one client; relay each of its messages to all the others."""
    CLIENTS.add(ws)
    try:
        async for message in ws:
            # the sender is taken out for the call and put back: O(1), and broadcast()
            # then walks a plain set in C instead of a generator in Python
            CLIENTS.discard(ws)
            try:
                broadcast(CLIENTS, message)
            finally:
                CLIENTS.add(ws)
    finally:
        CLIENTS.discard(ws)


def _raise_fd_limit() -> None:
    """Hold as many connections as the hard limit allows (fastim's node does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(host: str, port: int, backlog: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, host, port, backlog=backlog) as server:
        bound = next(iter(server.sockets)).getsockname()
        print(
            f"websockets broadcast listening on ws://{bound[0]}:{bound[1]}/ pid={os.getpid()}",
            flush=True,
        )
        await stop


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 = any free port")
    p.add_argument("--backlog", type=int, default=4096)
    a = p.parse_args()
    _raise_fd_limit()
    uvloop.run(main(a.host, a.port, a.backlog))
    sys.exit(0)
