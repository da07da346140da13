"""fastim.js applies deltas (a real Node 20 process against a real node process), and
a node started with ``--workers 2`` computes them on every worker consistently."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from fastim.client import connect
from fastim.transport.static import STATIC_DIR

CLIENT = (STATIC_DIR / "fastim.js").as_uri()
CONFIG = '[namespaces.doc]\ndelta = "fossil"\nhistory_size = 100\n'

#: two clients on one channel, one asking for deltas; 10 documents, then the delta
#: subscription's base is spoilt (the next delta must fail and resubscribe), 10 more
SCRIPT = """
import { connect } from %(client)s;
const url = process.argv[2];
const doc = {rows: Array.from({length: 200}, (_, i) => ({id: i, name: `row ${i} ✓`, value: i}))};
const a = connect({url}), b = connect({url});
await a.ready(20000); await b.ready(20000);
const got = {a: [], b: []};
const sa = a.subscribe("doc:js", {
  delta: "fossil", onMessage: (m) => got.a.push([m.offset, m.data]),
});
const sb = b.subscribe("doc:js", {onMessage: (m) => got.b.push([m.offset, m.data])});
await sa.ready; await sb.ready;
const sent = [];
const wait = async (n) => {
  while (got.a.length < n || got.b.length < n) await new Promise((r) => setTimeout(r, 10));
};
for (let k = 0; k < 20; k++) {
  if (k === 10) { await wait(10); sa._base = new TextEncoder().encode("{}"); }
  doc.rows[(k * 37) %% 200].value = -k;
  sent.push(JSON.parse(JSON.stringify(doc)));
  await b.publish("doc:js", doc);
}
await wait(20);
const res = {sent, got, deltas: sa.deltas, failures: sa.deltaFailures, gaps: sa.gaps};
console.log(JSON.stringify(res));
a.close(); b.close();
"""


def _node() -> str:
    node = shutil.which("node")
    assert node is not None, "node (20.10+) is needed: apt-get install -y nodejs"
    return node


def test_fastim_js_applies_deltas(tmp_path: Path, node_process: Any) -> None:
    (tmp_path / "fastim.toml").write_text(CONFIG)
    server = node_process("--config", str(tmp_path / "fastim.toml"))
    script = tmp_path / "delta.mjs"
    script.write_text(SCRIPT % {"client": json.dumps(CLIENT)})
    r = subprocess.run(
        [_node(), "--experimental-websocket", str(script), f"ws://127.0.0.1:{server.ws_port}/ws"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1])
    sent = out["sent"]
    assert [d for _o, d in out["got"]["b"]] == sent
    assert [d for _o, d in out["got"]["a"]] == sent  # the same documents, with deltas
    assert [o for o, _d in out["got"]["a"]] == list(range(1, 21))
    assert out["failures"] == 1 and out["gaps"] == 0  # the spoilt base: resubscribed
    assert out["deltas"] >= 16  # 2..10, then after the full one that followed the resync


def test_workers_compute_deltas_each_from_the_same_sequence(
    tmp_path: Path, node_process: Any
) -> None:
    """Under --workers 2, clients land on both workers; each worker's hub makes its
    deltas from the messages it delivered (the owner's numbering), so every subscriber,
    wherever it is, decodes the same documents."""
    (tmp_path / "fastim.toml").write_text(CONFIG)
    server = node_process(
        "--config", str(tmp_path / "fastim.toml"), "--workers", "2", "--store", "memory"
    )

    async def run() -> None:
        url = f"tcp://127.0.0.1:{server.tcp_port}"
        clients = [await connect(url) for _ in range(8)]
        while len({c.server_info.get("node") for c in clients[:-2]}) < 2 and len(clients) < 40:
            clients.insert(0, await connect(url))  # until both workers have clients
        try:
            assert len({c.server_info.get("node") for c in clients[:-2]}) == 2
            subs = [await c.subscribe("doc:w", delta="fossil") for c in clients[:-2]]
            plain = await clients[-2].subscribe("doc:w")
            docs = []
            doc = {"rows": [{"id": i, "v": "x" * 40} for i in range(200)]}
            for k in range(15):
                doc["rows"][(k * 13) % 200]["v"] = f"v{k}"
                docs.append(json.loads(json.dumps(doc)))
                await clients[-1].publish("doc:w", doc)
            for s in [*subs, plain]:
                got = [await asyncio.wait_for(s.get(), 10) for _ in docs]
                assert [m.data for m in got] == docs
            assert all(s.delta_failures == 0 for s in subs)
            assert all(s.deltas == 14 for s in subs)
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(run())
