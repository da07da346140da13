"""Fossil delta: the compiled core against Fossil's own vectors, its reference, and an
independent decoder (the npm ``fossil-delta`` package, the one Centrifugo's JS uses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastim import _core
from fastim import _pyref as ref

VECTORS = Path(__file__).parent.parent / "vectors" / "fossil"
CASES = sorted(p.name for p in VECTORS.iterdir() if p.is_dir())
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)


def _case(name: str) -> tuple[bytes, bytes, bytes]:
    d = VECTORS / name
    return (d / "origin").read_bytes(), (d / "target").read_bytes(), (d / "delta").read_bytes()


def test_there_are_vectors() -> None:
    assert len(CASES) >= 6


@pytest.mark.parametrize("case", CASES)
def test_fossils_deltas_apply(impl: ModuleType, case: str) -> None:
    origin, target, delta = _case(case)
    assert impl.fossil_apply(origin, delta) == target


@pytest.mark.parametrize("case", CASES)
def test_encoder_makes_fossils_bytes(impl: ModuleType, case: str) -> None:
    """The same algorithm as delta.c: byte for byte what `fossil test-delta-create` made."""
    origin, target, delta = _case(case)
    assert impl.fossil_delta(origin, target) == delta
    made = impl.fossil_delta(origin, target, text=True)
    assert impl.fossil_apply(origin, made) == target


@pytest.mark.parametrize(
    "bad",
    [
        b"",  # nothing
        b"5",  # no newline
        b"5\n5:hello",  # no checksum
        b"5\n6:hello;",  # insert past the end of the delta
        b"3\n5@0,0;",  # copy over the announced size
        b"5\n5@99,0;",  # copy past the source
        b"5\n5:hello0;",  # wrong checksum
        b"6\n5:helloX;",  # shorter than announced
        b"5\n5!hello0;",  # unknown command
        b"zzzzzzz\n",  # a size over 32 bits
    ],
)
def test_apply_refuses_malformed(impl: ModuleType, bad: bytes) -> None:
    with pytest.raises(ValueError):
        impl.fossil_apply(b"0123456789abcdefghij", bad)


def test_apply_refuses_a_huge_target_before_allocating(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="over"):
        impl.fossil_apply(b"", b"~~~~\n0;", max_size=1000)


def test_truncated_vectors_never_apply(impl: ModuleType) -> None:
    origin, _target, delta = _case(CASES[0])
    for n in range(len(delta)):
        with pytest.raises(ValueError):
            impl.fossil_apply(origin, delta[:n])


def _edited(data: st.DrawFn) -> tuple[bytes, bytes]:
    src = data(st.binary(max_size=600))
    dst = bytearray(src)
    for _ in range(data(st.integers(0, 6))):
        at = data(st.integers(0, len(dst)))
        if data(st.booleans()) and at < len(dst):
            del dst[at : at + data(st.integers(1, 20))]
        else:
            dst[at:at] = data(st.binary(min_size=1, max_size=30))
    return src, bytes(dst)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    return _edited(draw)


@st.composite
def text_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    words = st.lists(st.text(max_size=12), max_size=60)
    src = draw(words)
    dst = list(src)
    for _ in range(draw(st.integers(0, 5))):
        dst.insert(draw(st.integers(0, len(dst))), draw(st.text(min_size=1, max_size=10)))
    return orjson.dumps(src), orjson.dumps(dst)


@SLOW
@given(pairs())
def test_compiled_and_reference_agree_and_round_trip(p: tuple[bytes, bytes]) -> None:
    src, dst = p
    for text in (False, True):
        d = _core.fossil_delta(src, dst, text)
        assert d == ref.fossil_delta(src, dst, text)
        assert _core.fossil_apply(src, d) == dst
        assert ref.fossil_apply(src, d) == dst


@SLOW
@given(text_pairs())
def test_text_deltas_of_utf8_are_utf8(p: tuple[bytes, bytes]) -> None:
    """text=True: whole characters in every insert, so the delta decodes as UTF-8 and
    survives a trip through a JSON string (what JSON clients get)."""
    src, dst = p
    d = _core.fossil_delta(src, dst, text=True)
    assert d == ref.fossil_delta(src, dst, text=True)
    s = d.decode("utf-8")
    assert orjson.loads(_core.json_string(d)) == s
    assert _core.fossil_apply(src, json.loads(_core.json_string(d)).encode()) == dst


@SLOW
@given(st.binary(max_size=300))
def test_json_string_agrees(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    out = _core.json_string(data)
    assert out == ref.json_string(data)
    assert orjson.loads(out) == text


def test_encode_delta_frames_agree() -> None:
    """The delta message in every format an alt member uses, compiled vs reference."""
    head = b'{"op":"msg","ch":"doc:1","off":'
    delta = _core.fossil_delta(b'{"a":"' + b"x" * 40 + b'"}', b'{"a":"' + b"x" * 40 + b'y"}', True)
    outs = []
    for mod in (_core, ref):
        subs = mod.SubscriberSet()
        rings = []
        for fmt in range(mod.N_FORMATS):
            ring = mod.OutRing(mod.Flusher(), None, fmt=fmt)
            subs.add(ring)
            subs.set_alt(ring)
            rings.append(ring)
        outs.append(mod.encode_delta(subs, 7, b"doc:1", head, delta))
    assert outs[0] == outs[1]
    tcp, wsb, js, wsbz, jsz = outs[0]
    assert tcp is not None and tcp[4] == _core.DELTA_FRAME_TYPE == 0x25
    assert wsb is not None and wsb.endswith(tcp) and wsbz == wsb and jsz == js
    assert js is not None
    body = orjson.loads(js[2:])
    assert body == {"op": "msg", "ch": "doc:1", "off": 7, "delta": True, "data": delta.decode()}


def test_fanout_gives_alt_members_the_alt_frames(impl: ModuleType) -> None:
    subs = impl.SubscriberSet()
    flusher = impl.Flusher()
    a, b, c = (impl.OutRing(flusher, None, fmt=impl.FMT_TCP) for _ in range(3))
    for r in (a, b, c):
        subs.add(r)
    assert subs.set_alt(b) and not subs.set_alt(impl.OutRing(flusher, None))
    assert subs.is_alt(b) and not subs.is_alt(a) and subs.alt_count() == 1
    assert subs.fanout((b"full",), (b"delta",)) == 3
    assert subs.fanout((b"F",), (None,)) == 3  # no alt frame for the format: the full one
    assert subs.fanout((b"X",)) == 3  # no alt tuple: everyone the full one
    assert [r.take() for r in (a, b, c)] == [b"fullFX", b"deltaFX", b"fullFX"]
    subs.remove(b)  # removal clears the mark (a later add starts full)
    assert subs.alt_count() == 0
    subs.add(b)
    assert not subs.is_alt(b)


def _node_ok() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    v = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    return node if int(v.lstrip("v").split(".")[0]) >= 20 else None


def test_an_independent_decoder_applies_our_deltas(tmp_path: Path) -> None:
    """npm fossil-delta (dchest's, as in Centrifugo's JS client) under Node 20 applies the
    deltas fastim makes, text mode included; we apply the ones it makes."""
    node = _node_ok()
    if node is None:
        pytest.fail("node (20+) is needed: apt-get install -y nodejs", pytrace=False)
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed: apt-get install -y npm (./dev test does it)", pytrace=False)
    r = subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "fossil-delta@2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )
    if r.returncode != 0:  # a failure, never a skip: this is the interoperability proof
        pytest.fail(
            "npm could not install fossil-delta from the npm registry (is it reachable?): "
            f"{r.stderr[-300:]}",
            pytrace=False,
        )
    pairs_: list[tuple[bytes, bytes]] = [_case(c)[:2] for c in CASES]
    doc = {"rows": [{"id": i, "name": f"row {i} é✓", "v": i * 3} for i in range(80)]}
    a = orjson.dumps(doc)
    doc["rows"][7]["name"] = "changed ∑"
    doc["rows"][40]["v"] = -1
    pairs_.append((a, orjson.dumps(doc)))
    cases: list[dict[str, Any]] = []
    for i, (src, dst) in enumerate(pairs_):
        for text in (False, True):
            d = _core.fossil_delta(src, dst, text)
            cases.append({"i": i, "src": src.hex(), "dst": dst.hex(), "delta": d.hex()})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = """
import fs from "fs";
import * as fd from "fossil-delta";
const cases = JSON.parse(fs.readFileSync("cases.json"));
const hex = (s) => Uint8Array.from(Buffer.from(s, "hex"));
const out = [];
for (const c of cases) {
  const got = Buffer.from(fd.applyDelta(hex(c.src), hex(c.delta))).toString("hex");
  const theirs = Buffer.from(fd.createDelta(hex(c.src), hex(c.dst))).toString("hex");
  out.push({ok: got === c.dst, theirs});
}
console.log(JSON.stringify(out));
"""
    (tmp_path / "check.mjs").write_text(script)
    r = subprocess.run(
        [node, "check.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert all(x["ok"] for x in results)
    for c, x in zip(cases, results, strict=True):
        src = bytes.fromhex(c["src"])
        assert _core.fossil_apply(src, bytes.fromhex(x["theirs"])) == bytes.fromhex(c["dst"])
