"""A stream on a node of two workers (``fastim serve --workers 2``): the workers share
the port, so a command POST lands on either; the one without the stream forwards it
over the workers' links to the stream's worker, named by the sid (docs/transports.md)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.workers._node import Supervised

from ._http import request, whole


@pytest.mark.parametrize("kind", ["/stream", "/sse"])
async def test_posts_reach_the_streams_worker(tmp_path: Path, kind: str) -> None:
    node = Supervised(tmp_path, 2, "--store", "memory")
    await node.start()
    try:
        port = node.ws_port
        s = await request(port, "GET", kind)
        first = await s.data()
        worker, _, _ = first["sid"].partition(".")
        assert worker.startswith("w"), first  # the sid names the stream's worker
        n = 30
        for i in range(n):  # each on a connection of its own: either worker takes it
            status, _, _ = await whole(
                port, "POST", f"{kind}/{first['sid']}", body=orjson.dumps({"op": "ping", "id": i})
            )
            assert status == 204
        ids = [(await s.until("pong"))["id"] for _ in range(n)]
        assert ids == list(range(n))  # every one, in the order they were sent
        status, _, text = await whole(port, "POST", f"{kind}/w9.nosuch", body=b"{}")
        assert status in (404, 503) and b"open a new stream" in text
        await s.close()
    finally:
        node.stop()
