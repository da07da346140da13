"""The bench's targets: URLs parsed by the client SDK, and a bench that imports no server.

The load generator shares the SDK's URL parsing and WebSocket upgrade
(fastim.client.connection); what it adds is its own defaults (a fastim ws:// URL without
a path is /ws) and its refusals (no TLS), reported as a command-line error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fastim.bench import Target, parse_target
from fastim.bench.target import sub_targets, upgrade_request


def test_urls_parse_as_the_client_parses_them() -> None:
    assert parse_target("tcp://127.0.0.1:7070") == Target("tcp", "127.0.0.1", 7070, "/")
    assert parse_target("ws://127.0.0.1:7071/ws") == Target("ws", "127.0.0.1", 7071, "/ws")
    assert parse_target("ws://127.0.0.1:7071") == Target("ws", "127.0.0.1", 7071, "/ws")
    assert parse_target("WS://h:1/x?token=t").path == "/x?token=t"  # the query goes along
    assert parse_target("ws://h:8765", peer=True) == Target("peer", "h", 8765, "/")
    assert parse_target("ws://h:8765/b", peer=True).path == "/b"
    assert parse_target("ws://h/ws").port == 80  # the client's default port


@pytest.mark.parametrize(
    ("url", "peer", "says"),
    [
        ("tcp://127.0.0.1", False, "bad URL"),  # no port
        ("http://127.0.0.1:1/", False, "bad URL"),
        ("ws://:1/ws", False, "bad URL"),  # no host
        ("tcp://h:99999", False, "bad URL"),
        ("wss://h:1/ws", False, "--url must be"),  # TLS: not benched
        ("tls://h:1", False, "--url must be"),
        ("tcp://h:1", True, "--peer must be"),
    ],
)
def test_bad_urls_are_command_line_errors(url: str, peer: bool, says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        parse_target(url, peer=peer)


def test_sub_urls_must_be_nodes_of_the_same_transport() -> None:
    ws = parse_target("ws://h:1/ws")
    args = argparse.Namespace(sub_urls="ws://a:2/ws, ws://b:3")
    assert [t.url for t in sub_targets(args, ws)] == ["ws://a:2/ws", "ws://b:3/ws"]
    assert sub_targets(argparse.Namespace(sub_urls=None), ws) == ()
    with pytest.raises(SystemExit, match="transport"):
        sub_targets(argparse.Namespace(sub_urls="tcp://a:2"), ws)
    with pytest.raises(SystemExit, match="--peer"):
        sub_targets(args, parse_target("ws://h:1", peer=True))


def test_upgrade_request_is_the_clients_with_the_benchs_subprotocol() -> None:
    request, key = upgrade_request(Target("ws", "127.0.0.1", 7071, "/ws"))
    assert request.startswith(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:7071\r\n")
    assert b"Sec-WebSocket-Key: %s\r\n" % key.encode() in request
    assert b"Sec-WebSocket-Protocol: fastim.json\r\n" in request
    assert request.endswith(b"\r\n\r\n")


def test_the_bench_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, fastim.bench\n"
        "server = ('fastim.node', 'fastim.hub', 'fastim.session', 'fastim.transport',"
        " 'fastim.store', 'fastim.postman', 'fastim.cluster', 'fastim.http_api')\n"
        "print(sorted(m for m in sys.modules if m.startswith(server)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
