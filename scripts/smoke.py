"""Smoke test of an installed fastim (run from outside the source tree).

Starts ``fastim serve`` as a process, subscribes and publishes through the SDK over TCP
and over WebSocket, checks the message arrived, and stops the node with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def roundtrip(url: str) -> None:
    from fastim.client import connect

    async with await connect(url, reconnect=False) as c:
        sub = await c.subscribe("smoke")
        off = await c.publish("smoke", {"hello": "world"})
        msg = await asyncio.wait_for(sub.get(), 5)
        assert msg.data == {"hello": "world"} and msg.offset == off, msg


def main() -> None:
    import fastim
    import fastim._core

    assert not fastim.__file__.startswith(os.getcwd() + "/fastim"), "testing the source tree"
    exe = shutil.which("fastim") or os.path.join(os.path.dirname(sys.executable), "fastim")
    tcp, ws = free_port(), free_port()
    proc = subprocess.Popen([exe, "serve", "--tcp-port", str(tcp), "--ws-port", str(ws)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", ws), 0.2).close()
                socket.create_connection(("127.0.0.1", tcp), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("node did not start") from None
                time.sleep(0.05)
        asyncio.run(roundtrip(f"tcp://127.0.0.1:{tcp}"))
        asyncio.run(roundtrip(f"ws://127.0.0.1:{ws}/ws"))
        # the browser client and the demo are package data: in the wheel, served
        for path, needle in (
            ("/fastim.js", b"export function connect"),
            ("/demo/", b"<html"),
            ("/", b'href="demo/"'),
        ):
            with urllib.request.urlopen(f"http://127.0.0.1:{ws}{path}", timeout=5) as r:
                assert r.status == 200 and needle in r.read(), path
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, f"fastim serve exited with {rc}"
    print(
        f"smoke ok: fastim {fastim.__version__} on Python {sys.version.split()[0]} "
        f"({fastim._core.__file__})"
    )


if __name__ == "__main__":
    main()
