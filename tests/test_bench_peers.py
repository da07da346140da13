"""The peer servers of issue P2 (benchmarks/peers/) really broadcast, sender excluded.

Each peer runs as a real subprocess, as benchmarks/peers_e2e.py runs it; a third-party
client (the ``websockets`` library) checks that a text and a binary message from one
client reach every other client once, and never come back to the sender.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
# socketify (P10): a source package on PyPI carrying its prebuilt libraries, among the
# test extras, so its peer is checked like the others (a missing one fails, loudly)
PEERS = ("websockets", "picows", "socketify")


def _start(name: str) -> tuple[subprocess.Popen[str], str]:
    script = ROOT / "benchmarks" / "peers" / f"{name}_broadcast.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the ready line: "... listening on ws://host:port/ pid=N"
    if "listening on ws://" not in line:
        proc.kill()
        raise AssertionError(f"{name} peer did not start: {line}{proc.stdout.read()}")
    url = line.split("listening on ", 1)[1].split()[0]
    return proc, url


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, str]]:
    """The peers, started once for the module (side by side: startup costs overlap)."""
    started = {name: _start(name) for name in PEERS}
    yield {name: url for name, (_p, url) in started.items()}
    for proc, _url in started.values():
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", PEERS)
async def test_peer_broadcasts_to_others_not_to_the_sender(
    peers: dict[str, str], name: str
) -> None:
    url = peers[name]
    conns = [await connect(url, open_timeout=3) for _ in range(3)]
    a, b, c = conns
    await asyncio.sleep(0.05)  # the server has registered all three
    await a.send('{"hello":"text"}')
    await a.send(b"\x00\x01binary")
    for other in (b, c):
        assert await asyncio.wait_for(other.recv(), 2) == '{"hello":"text"}'
        assert await asyncio.wait_for(other.recv(), 2) == b"\x00\x01binary"
    # and a message from b reaches a and c, not b
    await b.send("from b")
    assert await asyncio.wait_for(a.recv(), 2) == "from b"  # a never got its own two
    assert await asyncio.wait_for(c.recv(), 2) == "from b"
    # a fragmented message is relayed whole
    await c.send(["frag", "men", "ted"])
    assert await asyncio.wait_for(a.recv(), 2) == "fragmented"
    assert await asyncio.wait_for(b.recv(), 2) == "fragmented"
    # nothing else (c's own message back, a copy): a marker sent last comes next
    await a.send("marker")
    for other in (b, c):
        assert await asyncio.wait_for(other.recv(), 2) == "marker"
    for ws in conns:
        await ws.close()
    assert all(ws.close_code == 1000 for ws in conns)
