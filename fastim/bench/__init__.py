"""``fastim bench``: end-to-end fan-out load against a node, or against a peer server.

Targets: a fastim node over TCP (``--url tcp://host:port``) or WebSocket (``--url
ws://host:port/ws``, JSON subprotocol ``fastim.json``), or a plain broadcast peer
(``--peer ws://host:port/``: every message a client sends goes to every other client,
no acks; see benchmarks/peers/). Without a URL the bench spawns a node itself
(``--transport``, default tcp) pinned to ``--server-cpu``; ``--server-workers N`` makes
it ``fastim serve --workers N``, worker i pinned to the i-th CPU of ``--server-cpu``, its
CPU and RSS summed over the supervisor and the workers.

N subscribers spread over several worker processes (each under the 20,000-fd limit;
each reports the CPU time it used, so the generator can be shown not to be the
bottleneck). Subscribers read the server's coalesced writes and count messages with
the compiled parsers (FrameDecoder, WSParser); an evenly spread sample of them decodes
every message to check its sequence number (loss, reordering, duplicates) and measure
publish-to-delivery latency (the publisher stamps CLOCK_MONOTONIC, shared by every
process on the machine).

One publisher connection sends; the publisher's process also holds one of the N
subscribers, the *probe*, connected last. Saturation keeps at most ``--inflight`` (W)
publishes not yet received by every subscriber (``--window every``, the default: each
worker process reports the fewest messages any of its subscribers has) or by the probe
alone (``--window probe``, the rule until P10): the same rule for fastim and for peers,
which have no acks. ``--rate`` publishes at a fixed rate instead. ``--idle`` opens N
connections, waits for the server's memory to settle and reports its RSS growth per
connection. ``--broadcast K`` lets the node settle, watches it idle for
``--idle-window`` seconds (heartbeats answered), then publishes K messages one at a
time and reports, per message, the time from its publish to its delivery to the last
of ALL subscribers (every connection tracked), and whether each got each exactly once.

At the end: deliveries/s, latency percentiles, loss and reordering, the server's CPU
(when its pid is known) and the generator's, as a table or ``--json``.
"""

# The package, one job per module (the docstring above is ``fastim bench --help``):
#   cli.py          the flags and the command
#   runner.py       one run: spawn or parse the target, start the workers, collect, measure
#   target.py       what the bench talks to: URLs and WebSocket upgrades (the SDK's own)
#   wire.py         the publisher's message, the frames the bench accepts
#   counting.py     the subscriber connections: counting deliveries, checking a sample
#   workers.py      the subscriber worker processes
#   publisher.py    the publisher connection and the probe that paces it; the broadcast's
#   broadcast.py    --broadcast: every connection's tally of the K messages
#   serverstats.py  the server's processes, CPU and RSS, from /proc
#   spawn.py        starting a node as a subprocess (the bench imports nothing of the server)
#   report.py       percentiles, failure, the printed table
# It imports fastim.client, fastim.protocol and fastim._core, never the server's modules.

from __future__ import annotations

from .cli import add_bench_arguments, add_bench_parser
from .counting import WorkerResult
from .publisher import PubResult
from .report import failed, render
from .runner import run
from .serverstats import server_cpu_s, server_rss_kib
from .target import Target, parse_target, upgrade_request
from .wire import MAX_MESSAGE, make_payload
from .workers import (
    CONNECT_CONCURRENCY,
    CONNS_PER_IP,
    CONNS_PER_PROCESS,
    WorkerSpec,
    open_subs,
    spread_sample,
)

__all__ = [
    "CONNECT_CONCURRENCY",
    "CONNS_PER_IP",
    "CONNS_PER_PROCESS",
    "MAX_MESSAGE",
    "PubResult",
    "Target",
    "WorkerResult",
    "WorkerSpec",
    "add_bench_arguments",
    "add_bench_parser",
    "failed",
    "make_payload",
    "open_subs",
    "parse_target",
    "render",
    "run",
    "server_cpu_s",
    "server_rss_kib",
    "spread_sample",
    "upgrade_request",
]
