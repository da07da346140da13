"""Peer for issue P10: a minimal broadcast server on ``socketify`` (uWebSockets, via cffi).

Every client is subscribed to one pub/sub topic when it connects; every text or binary
message a client sends is published to that topic by the sending connection
(``uws_ws_publish_with_options``, uWebSockets' ``WebSocket::publish``), which reaches
every subscriber *except the sender* — the other peers' rule. (socketify's Python
``WebSocket.publish`` calls the app-wide publish instead, which includes the sender, so
the native call is used; it is the one uWebSockets documents for chat-style fan-out.)
The fan-out, the per-connection buffering and the writes are uWebSockets' own, in C++;
Python runs once per *published* message, never per delivery. uWebSockets reassembles
fragmented messages and answers pings itself. socketify runs its own libuv loop.

    python benchmarks/peers/socketify_broadcast.py --host 127.0.0.1 --port 8767

prints one ``listening`` line on stdout when it accepts connections. Library defaults
are kept except the per-connection backpressure limit, raised from socketify's 64 KiB
to 16 MiB (what uWebSockets' own pub/sub examples use): a saturation run queues more
than 64 KiB for a subscriber read late, and uWebSockets then drops that connection's
pub/sub messages, which the bench would count as lost.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from typing import Any

from socketify import App, AppListenOptions, OpCode
from socketify.native import lib

TOPIC = b"broadcast"


def _raise_fd_limit() -> None:
    """Hold as many connections as the hard limit allows (fastim's node does the same)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(host: str, port: int, backpressure: int) -> None:
    app = App()
    ssl = app.SSL

    def on_open(ws: Any) -> None:
        ws.subscribe(TOPIC)

    def on_message(ws: Any, message: str | bytes, opcode: OpCode) -> None:
        data = message.encode() if isinstance(message, str) else message  # text arrives decoded
        lib.uws_ws_publish_with_options(
            ssl, ws.ws, TOPIC, len(TOPIC), data, len(data), int(opcode), False
        )

    app.ws(
        "/*",
        {
            "open": on_open,
            "message": on_message,
            "max_payload_length": 16 * 1024,
            "max_backpressure": backpressure,
        },
    )

    def listening(config: AppListenOptions) -> None:
        print(
            f"socketify broadcast listening on ws://{host}:{config.port}/ pid={os.getpid()}",
            flush=True,
        )

    def stop(_sig: int, _frame: Any) -> None:
        app.close()

    app.listen(AppListenOptions(port=port, host=host), listening)
    signal.signal(signal.SIGTERM, stop)
    app.run()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8767, help="0 = any free port")
    p.add_argument(
        "--max-backpressure",
        type=int,
        default=16 * 1024 * 1024,
        help="bytes queued per connection before uWebSockets drops its messages",
    )
    a = p.parse_args()
    _raise_fd_limit()
    main(a.host, a.port, a.max_backpressure)
    sys.exit(0)
