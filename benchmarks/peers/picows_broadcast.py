"""Peer for issue P2: a minimal broadcast server on ``picows`` (Cython WebSocket library).

Every text or binary message a client sends goes to every *other* connected client, with
one ``WSTransport.send`` per recipient, synchronously inside the frame callback (so the
payload memoryview is still valid and no copy is made before the send). This is the
library's idiomatic shape: one listener object per connection, frames delivered by
callback, no asyncio Task per client. Runs on uvloop, like fastim.

    python benchmarks/peers/picows_broadcast.py --host 127.0.0.1 --port 8766

prints one ``listening`` line on stdout when it accepts connections. picows's defaults are
kept (it uses its own ``aiofastnet`` transports when that package is installed, as pip
installs it with picows); ``--no-aiofastnet`` falls back to the loop's own transports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

CLIENTS: dict[WSTransport, None] = {}  # insertion-ordered set


class Relay(WSListener):
    """One client: relay each whole message it sends to every other client."""

    def __init__(self) -> None:
        self.parts: list[bytes] | None = None  # a fragmented message being reassembled
        self.kind = WSMsgType.TEXT

    def on_ws_connected(self, transport: WSTransport) -> None:
        CLIENTS[transport] = None

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.pop(transport, None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.TEXT or t is WSMsgType.BINARY:
            if frame.fin:
                _relay(transport, t, frame.get_payload_as_memoryview())
            else:
                self.kind = t
                self.parts = [frame.get_payload_as_bytes()]
        elif t is WSMsgType.CONTINUATION:
            if self.parts is None:
                transport.send_close()
                transport.disconnect()
                return
            self.parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                data = b"".join(self.parts)
                self.parts = None
                _relay(transport, self.kind, data)
        elif t is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        # PING is answered by picows itself (enable_auto_pong); PONG needs nothing


def _relay(sender: WSTransport, kind: WSMsgType, payload: memoryview | bytes) -> None:
    for t in CLIENTS:
        if t is not sender:
            t.send(kind, payload)


def _raise_fd_limit() -> None:
    """Hold as many connections as the hard limit allows (fastim's node does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(host: str, port: int, backlog: int, aiofastnet: bool | None) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)

    def factory(_request: WSUpgradeRequest) -> Relay:
        return Relay()

    extra: dict[str, Any] = {} if aiofastnet is None else {"use_aiofastnet": aiofastnet}
    server = await ws_create_server(factory, host, port, backlog=backlog, **extra)
    bound = server.sockets[0].getsockname()
    print(
        f"picows broadcast listening on ws://{bound[0]}:{bound[1]}/ pid={os.getpid()}",
        flush=True,
    )
    try:
        await stop
    finally:
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8766, help="0 = any free port")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument(
        "--aiofastnet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="picows's own transports (default: picows's choice, on when installed)",
    )
    a = p.parse_args()
    _raise_fd_limit()
    uvloop.run(main(a.host, a.port, a.backlog, a.aiofastnet))
    sys.exit(0)
