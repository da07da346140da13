"""A link peer as a real process: ``python -m tests.cluster._linkpeer NODE CLUSTER PORT``.

Runs a LinkServer on 127.0.0.1:PORT and prints one line per event on stdout, flushed:
``ready PORT`` once listening, ``peer NODE up|down``, and ``deliver N LAST`` per DELIVER
frame (entries in it, the last offset). The tests read those lines, stop the process
(SIGSTOP) to make it look dead, kill it and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import sys

from fastim.cluster.frames import Deliver
from fastim.cluster.link import LinkHandler, LinkServer


class Printer(LinkHandler):
    def __init__(self) -> None:
        self.last = 0

    def on_deliver(self, peer: str, items: list[Deliver]) -> None:
        for d in items:
            if d.offset != self.last + 1:
                print(f"gap {self.last} {d.offset}", flush=True)
            self.last = d.offset
        print(f"deliver {len(items)} {self.last}", flush=True)

    def on_peer(self, peer: str, connected: bool) -> None:
        print(f"peer {peer} {'up' if connected else 'down'}", flush=True)


async def main(node: str, cluster: str, port: int) -> None:
    server = LinkServer(node, cluster, Printer(), port=port, timeout=2.0)
    await server.start()
    print(f"ready {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
