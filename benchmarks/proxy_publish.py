"""Publishes per second through the publish hook, against the same node without it.

One run starts, in separate processes: a minimal backend (aiohttp, answering every
publish hook with ``{"result": {}}`` — the cost measured is the node's side of the hook,
not a backend's business logic), and for each round one ``fastim serve`` (the default
sqlite store) either with ``--proxy-publish-url`` pointing at the backend or without it.
The load is ``-c`` SDK clients over TCP, each keeping ``--window`` publishes in flight
until ``-n`` are acknowledged in all. Rounds alternate (hook, plain, hook, plain...) so
the machine's drift hits both; the medians and their ratio are printed:

    .venv/bin/python benchmarks/proxy_publish.py -n 20000 -c 50 --window 16 --rounds 3

With the hook a connection's publishes wait for the backend one after the other (their
order is kept: docs/proxy.md "Order and concurrency"), so the node's rate with the hook
comes from many connections asking at once, up to ``proxy_max_inflight``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from fastim.bench.spawn import wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_backend(port: int) -> None:
    """The minimal backend: allow every publish (a process of its own)."""
    from aiohttp import web

    async def allow(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"result":{}}', content_type="application/json")

    import uvloop

    app = web.Application()
    app.router.add_post("/publish", allow)
    # on uvloop, as a Python backend that cares about its speed would run
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


async def load(tcp_port: int, n: int, conns: int, window: int) -> float:
    """Publishes acknowledged per second by ``conns`` clients, ``window`` in flight each."""
    from fastim.client import connect

    clients = [await connect(f"tcp://127.0.0.1:{tcp_port}") for _ in range(conns)]
    per = n // conns
    data = {"text": "a chat message of about sixty bytes, as chats have"}

    async def one(i: int) -> None:
        c = clients[i]
        left = per
        ch = f"room:{i % 10}"

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await c.publish(ch, data)

        await asyncio.gather(*(worker() for _ in range(window)))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    dt = time.perf_counter() - t0
    for c in clients:
        await c.aclose()
    return per * conns / dt


def one_round(hook: bool, backend_port: int, args: argparse.Namespace) -> float:
    tcp, ws = _port(), _port()
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable, "-m", "fastim", "serve",
            "--tcp-port", str(tcp), "--ws-port", str(ws),
            "--store-path", os.path.join(d, "fastim.db"), "--log-level", "warning",
            "--publish-rate", "0",
        ]  # fmt: skip
        if hook:
            cmd += ["--proxy-publish-url", f"http://127.0.0.1:{backend_port}/publish"]
        node = subprocess.Popen(cmd, cwd=ROOT)
        try:
            wait_listening(tcp, node, "the node")
            return asyncio.run(load(tcp, args.n, args.c, args.window))
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="publishes per round")
    ap.add_argument("-c", type=int, default=50, help="client connections")
    ap.add_argument("--window", type=int, default=16, help="publishes in flight per client")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    args = ap.parse_args()
    backend_port = _port()
    backend = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--backend", str(backend_port)]
    )
    try:
        wait_listening(backend_port, backend, "the backend")
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for hook in (True, False):
                r = one_round(hook, backend_port, args)
                rates[hook].append(r)
                print(f"{'publish hook' if hook else 'no hook     '}: {r:,.0f} publishes/s")
    finally:
        backend.terminate()
        backend.wait(10)
    with_hook = statistics.median(rates[True])
    without = statistics.median(rates[False])
    print(
        f"median of {args.rounds}: through the publish hook {with_hook:,.0f}/s, "
        f"without {without:,.0f}/s: {with_hook / without:.2f}x "
        f"({args.n} publishes, {args.c} connections, {args.window} in flight each)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--backend":
        run_backend(int(sys.argv[2]))
    else:
        main()
