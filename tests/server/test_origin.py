"""The Origin checks (fastim/transport/origin.py): cross-site WebSocket hijacking refused.

1. The pattern matcher and the same-origin rule, by table and by hypothesis.
2. The settings: TOML (string or array), FASTIM_ALLOWED_ORIGINS, the flag, and
   ``fastim config check`` naming a bad entry.
3. A real node: an upgrade with a spoofed ``Origin`` (raw socket, ``websockets`` with
   ``origin=``) gets 403 with its reason and is counted in /metrics; without ``Origin``
   (raw, ``websockets``, the SDK) and from the node's own origin it connects; a listed
   origin or pattern connects; ``*`` admits all with a warning; the HTTP API does not
   look at Origin; /fastim.js carries CORS headers as ``static_allowed_origins`` says.

The browser side (a real page of another origin) is tests/browser/test_origin_chromium.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastim.cli import _add_config_flags, main
from fastim.config import Config, ConfigError, build, load
from fastim.transport.origin import OriginPolicy, parse_pattern, same_origin

from ._support import http_exchange, open_tcp, read_http_response, upgrade_request

KEY = "origin-test-api-key-0123456789"
EVIL = "https://evil.example"

# ----------------------------------------------------------------------------- matcher


@pytest.mark.parametrize(
    ("pattern", "origin", "allowed"),
    [
        ("https://app.example.com", "https://app.example.com", True),
        ("https://app.example.com", "https://APP.Example.com", True),  # case
        ("https://app.example.com", "https://app.example.com:443", True),  # default port
        ("https://app.example.com/", "https://app.example.com", True),  # a trailing slash
        ("HTTPS://App.Example.COM", "https://app.example.com", True),
        ("https://app.example.com", "http://app.example.com", False),  # scheme
        ("https://app.example.com", "https://app.example.com:8443", False),  # port
        ("https://app.example.com:8443", "https://app.example.com:8443", True),
        ("https://app.example.com", "https://app.example.com.evil.net", False),
        ("https://app.example.com", "https://evilapp.example.com", False),
        ("https://app.example.com", "null", False),
        ("https://app.example.com", "https://app.example.com, https://evil.net", False),
        ("https://app.example.com", "https://app.example.com/path", False),
        ("https://*.example.com", "https://a.example.com", True),
        ("https://*.example.com", "https://a.b.example.com", True),  # any depth
        ("https://*.example.com", "https://example.com", False),  # not the apex
        ("https://*.example.com", "https://evilexample.com", False),
        ("https://*.example.com", "https://example.com.evil.net", False),
        ("https://*.example.com", "http://a.example.com", False),  # scheme
        ("https://*.example.com", "https://a.example.com:8443", False),  # port
        ("https://*.example.com:*", "https://a.example.com:8443", True),
        ("http://localhost:*", "http://localhost:5173", True),
        ("http://localhost:*", "http://localhost", True),
        ("http://localhost:*", "https://localhost:5173", False),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080", True),
        ("http://[::1]:8080", "http://[::1]:8080", True),
        ("https://bücher.example", "https://xn--bcher-kva.example", True),  # IDN: punycode
        ("*", "null", True),
        ("*", "anything at all", True),
    ],
)
def test_pattern_table(pattern: str, origin: str, allowed: bool) -> None:
    assert OriginPolicy(pattern).allows(origin) is allowed


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("app.example.com", "needs its scheme, e.g. 'https://app.example.com'"),
        ("*.example.com", "needs its scheme"),
        ("https://app.example.com/chat", "not an origin pattern"),
        ("https://app.*.com", "not an origin pattern"),
        ("https://*app.example.com", "not an origin pattern"),
        ("https://*", "not an origin pattern"),
        ("https://*.com", "at least two labels"),
        ("https://*.0.0.1", "at least two labels"),
        ("https://app.example.com:0", "port must be 1..65535"),
        ("https://app.example.com:99999", "port must be 1..65535"),
        ("https://user@app.example.com", "not an origin pattern"),
        ("null", "null origin"),
    ],
)
def test_bad_patterns_say_what_is_wrong(entry: str, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_pattern(entry)
    assert needle in str(e.value) and repr(entry) in str(e.value)


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:7071", "127.0.0.1:7071", True),
        ("http://127.0.0.1:7071", "127.0.0.1:7072", False),
        ("http://localhost:7071", "127.0.0.1:7071", False),  # another host name
        ("https://chat.example.com", "chat.example.com", True),  # both the default 443
        ("https://chat.example.com", "chat.example.com:443", True),
        ("https://chat.example.com", "Chat.Example.com", True),
        ("https://chat.example.com", "chat.example.com:80", False),
        ("http://chat.example.com", "chat.example.com", True),
        ("https://chat.example.com:8443", "chat.example.com:8443", True),
        ("http://[::1]:7071", "[::1]:7071", True),
        ("null", "127.0.0.1:7071", False),
        ("http://127.0.0.1:7071", None, False),
        ("http://127.0.0.1:7071", "", False),
        ("http://127.0.0.1:7071", "127.0.0.1:7071, evil", False),
    ],
)
def test_same_origin(origin: str, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same


LABEL = st.text("abcx-", min_size=1, max_size=4).filter(lambda s: s[0] != "-" and s[-1] != "-")
HOST = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
SCHEME = st.sampled_from(["http", "https"])
PORT = st.one_of(st.none(), st.sampled_from([80, 443, 8080, 8443]))


def _origin(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _effective(scheme: str, port: int | None) -> int:
    return port if port is not None else {"http": 80, "https": 443}[scheme]


@given(SCHEME, HOST, PORT, SCHEME, HOST, PORT)
def test_an_exact_pattern_admits_its_origin_and_nothing_else(
    ps: str, ph: str, pp: int | None, os_: str, oh: str, op: int | None
) -> None:
    policy = OriginPolicy(_origin(ps, ph, pp))
    assert policy.allows(_origin(ps, ph, pp))
    want = ps == os_ and ph == oh and _effective(ps, pp) == _effective(os_, op)
    assert policy.allows(_origin(os_, oh, op)) is want


@given(SCHEME, HOST, HOST, PORT, st.booleans())
def test_a_wildcard_admits_strict_subdomains_only(
    scheme: str, domain: str, host: str, port: int | None, any_port: bool
) -> None:
    domain = domain + ".example"  # two labels at least
    pattern = f"{scheme}://*.{domain}" + (":*" if any_port else "")
    allowed = OriginPolicy(pattern).allows(_origin(scheme, host, port))
    want = host.endswith("." + domain) and (
        any_port or _effective(scheme, port) == {"http": 80, "https": 443}[scheme]
    )
    assert allowed is want
    # a subdomain is admitted, the domain itself is not; a look-alike never
    assert OriginPolicy(pattern).allows(_origin(scheme, f"{host}.{domain}", None))
    assert not OriginPolicy(pattern).allows(_origin(scheme, domain, None))
    assert not OriginPolicy(pattern).allows(_origin(scheme, f"{host}{domain}", None))
    assert not OriginPolicy(pattern).allows(_origin(scheme, f"{domain}.{host}", None))


@given(SCHEME, HOST, PORT)
def test_same_origin_is_host_and_port(scheme: str, host: str, port: int | None) -> None:
    origin = _origin(scheme, host, port)
    eff = _effective(scheme, port)
    assert same_origin(origin, f"{host}:{eff}")
    # a Host without a port: the default port of the origin's scheme
    assert same_origin(origin, host) is (eff == _effective(scheme, None))
    assert not same_origin(origin, f"{host}:{eff + 1}")
    assert not same_origin(origin, f"x{host}:{eff}")


# ----------------------------------------------------------------------------- settings


def test_the_default_admits_no_other_origin() -> None:
    cfg = Config().validate()
    assert cfg.allowed_origins == "" and cfg.static_allowed_origins == "*"
    assert not OriginPolicy(cfg.allowed_origins).allows("http://127.0.0.1:8000")


def test_settings_from_toml_environment_and_flag(tmp_path: Path) -> None:
    as_array = tmp_path / "a.toml"
    as_array.write_text('allowed_origins = ["https://app.example.com", "https://*.example.org"]\n')
    assert build(as_array).allowed_origins == "https://app.example.com,https://*.example.org"
    as_string = tmp_path / "s.toml"
    as_string.write_text('allowed_origins = "https://app.example.com, http://localhost:*"\n')
    policy = OriginPolicy(build(as_string).allowed_origins)
    assert policy.allows("http://localhost:3000") and policy.allows("https://app.example.com")
    env = {"FASTIM_ALLOWED_ORIGINS": "https://a.example.com,https://b.example.com"}
    assert load(as_string, env, {}).allowed_origins == env["FASTIM_ALLOWED_ORIGINS"]
    parser = argparse.ArgumentParser()
    _add_config_flags(parser)
    args = parser.parse_args(["--allowed-origins", "https://c.example.com"])
    assert load(as_string, env, vars(args)).allowed_origins == "https://c.example.com"
    args = parser.parse_args(["--static-allowed-origins", ""])
    assert load(None, {}, vars(args)).static_allowed_origins == ""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            'allowed_origins = "https://ok.example.com, app.example.com"',
            "allowed_origins: 'app.example.com': an origin needs its scheme",
        ),
        ('allowed_origins = ["https://*.com"]', "allowed_origins: 'https://*.com': '*.' must"),
        ("allowed_origins = [1]", "allowed_origins: expected a list of strings"),
        (
            'static_allowed_origins = "https://x.example.com/js"',
            "static_allowed_origins: 'https://x.example.com/js': not an origin pattern",
        ),
    ],
)
def test_config_check_names_the_bad_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        build(p)
    assert needle in str(e.value)
    assert main(["config", "check", str(p)]) == 2
    assert needle in capsys.readouterr().err


def test_config_check_accepts_and_prints_the_patterns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "good.toml"
    p.write_text('allowed_origins = ["https://app.example.com", "https://*.example.com:*"]\n')
    assert main(["config", "check", str(p)]) == 0
    assert "'https://app.example.com,https://*.example.com:*'" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a node


async def upgrade(port: int, extra: bytes = b"", host: bytes | None = None) -> tuple[int, bytes]:
    """A raw upgrade to /ws: (status, the response's body when it is not 101)."""
    reader, writer = await open_tcp(port)
    try:
        req, _key = upgrade_request(port, extra=extra)
        if host is not None:
            req = req.replace(b"Host: 127.0.0.1:%d" % port, b"Host: " + host)
        writer.write(req)
        status, headers, _ = await read_http_response(reader)
        body = b""
        if status != 101:
            body = await asyncio.wait_for(reader.read(), 5)
            assert len(body) == int(headers["content-length"])
        return status, body
    finally:
        writer.close()


async def refused_count(port: int) -> float:
    _s, _h, body = await http_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    for line in body.decode().splitlines():
        if line.startswith("fastim_origin_refused_total "):
            return float(line.split()[1])
    raise AssertionError("fastim_origin_refused_total not in /metrics")


async def test_a_spoofed_origin_gets_403_with_its_reason_and_is_counted(
    node_factory: Any,
) -> None:
    node = await node_factory()
    assert await refused_count(node.ws_port) == 0
    status, body = await upgrade(node.ws_port, f"Origin: {EVIL}\r\n".encode())
    assert status == 403
    assert body.decode() == (
        f"cross-origin request refused: Origin '{EVIL}' is not this node's origin "
        "and not in allowed_origins\n"
    )
    # the null origin (a sandboxed frame) and a look-alike of the node's own
    for origin in (b"null", b"http://127.0.0.1:%d.evil.net" % node.ws_port):
        assert (await upgrade(node.ws_port, b"Origin: " + origin + b"\r\n"))[0] == 403
    assert await refused_count(node.ws_port) == 3


async def test_websockets_with_an_origin_is_refused_and_without_connects(
    node_factory: Any,
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    node = await node_factory()
    url = f"ws://127.0.0.1:{node.ws_port}/ws"
    with pytest.raises(InvalidStatus) as e:
        async with connect(url, origin=EVIL):  # type: ignore[arg-type]
            pass
    assert e.value.response.status_code == 403
    assert b"not in allowed_origins" in e.value.response.body
    async with connect(url) as ws:  # no Origin: not a browser
        await ws.send('{"op":"sub","ch":"news","id":1}')
        assert orjson.loads(await ws.recv())["op"] == "subscribed"


async def test_the_sdk_and_clients_without_origin_connect(node_factory: Any) -> None:
    from fastim.client import connect

    node = await node_factory()
    assert (await upgrade(node.ws_port))[0] == 101
    async with await connect(f"ws://127.0.0.1:{node.ws_port}/ws") as client:
        news = await client.subscribe("news")
        await client.publish("news", {"text": "hello"})
        msg = await asyncio.wait_for(news.get(), 5)
        assert msg.data == {"text": "hello"}
    assert node.origins.refused == 0


async def test_the_nodes_own_origin_connects(node_factory: Any) -> None:
    node = await node_factory()
    port = node.ws_port
    own = b"Origin: http://127.0.0.1:%d\r\n" % port
    assert (await upgrade(port, own))[0] == 101
    # the same node reached by another name: its Host says so
    assert (await upgrade(port, b"Origin: http://localhost:%d\r\n" % port, b"localhost:%d" % port))[
        0
    ] == 101
    # behind a TLS proxy on 443: Origin https://chat.example.com, Host without a port
    proxied = b"Origin: https://chat.example.com\r\n"
    assert (await upgrade(port, proxied, b"chat.example.com"))[0] == 101
    # a page on another port of the same host is another origin
    assert (await upgrade(port, b"Origin: http://127.0.0.1:%d\r\n" % (port + 1)))[0] == 403


async def test_listed_origins_and_patterns_connect(node_factory: Any) -> None:
    node = await node_factory(allowed_origins="https://app.example.com,https://*.example.org:*")
    port = node.ws_port
    for origin in ("https://app.example.com", "https://a.example.org:8443"):
        assert (await upgrade(port, f"Origin: {origin}\r\n".encode()))[0] == 101, origin
    for origin in ("https://example.org", "http://app.example.com", EVIL):
        assert (await upgrade(port, f"Origin: {origin}\r\n".encode()))[0] == 403, origin
    assert node.origins.refused == 3


async def test_a_star_admits_every_origin_with_a_warning(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fastim"):
        node = await node_factory(allowed_origins="*")
    assert any("allowed_origins = '*'" in r.getMessage() for r in caplog.records)
    for origin in (EVIL, "null"):
        assert (await upgrade(node.ws_port, f"Origin: {origin}\r\n".encode()))[0] == 101


async def test_refusals_are_logged_once_per_origin(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    node = await node_factory()
    with caplog.at_level(logging.WARNING, logger="fastim"):
        for _ in range(3):
            await upgrade(node.ws_port, f"Origin: {EVIL}\r\n".encode())
    logged = [r for r in caplog.records if "refused a WebSocket" in r.getMessage()]
    assert len(logged) == 1 and EVIL in logged[0].getMessage()


async def test_the_http_api_does_not_look_at_origin(node_factory: Any) -> None:
    node = await node_factory(api_key=KEY)
    body = orjson.dumps({"channel": "news", "data": 1})
    req = (
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: %s\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (EVIL.encode(), KEY.encode(), len(body), body)
    )
    status, _h, answer = await http_exchange(node.ws_port, req)
    assert status == 200, answer
    assert orjson.loads(answer)["offset"] == 1
    assert node.origins.refused == 0


# ----------------------------------------------------------------------------- /fastim.js CORS


def get(path: str, origin: str | None = None, method: str = "GET", extra: str = "") -> bytes:
    o = f"Origin: {origin}\r\n" if origin else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{o}{extra}\r\n".encode()


async def test_fastim_js_is_public_by_default(node_factory: Any) -> None:
    node = await node_factory()
    status, headers, _ = await http_exchange(node.ws_port, get("/fastim.js", EVIL))
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    etag = headers["etag"]
    status, headers, _ = await http_exchange(
        node.ws_port, get("/fastim.js", EVIL, extra=f"If-None-Match: {etag}\r\n")
    )
    assert status == 304 and headers["access-control-allow-origin"] == "*"
    # a preflight (fetch with headers of its own)
    status, headers, body = await http_exchange(
        node.ws_port,
        get(
            "/fastim.js",
            EVIL,
            "OPTIONS",
            "Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: x-trace\r\n",
        ),
    )
    assert status == 204 and body == b"" and "content-length" not in headers
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-allow-methods"] == "GET"
    assert headers["access-control-allow-headers"] == "*"
    # the demo is the node's own page: no CORS headers
    _s, headers, _ = await http_exchange(node.ws_port, get("/demo/demo.js", EVIL))
    assert "access-control-allow-origin" not in headers
    status, headers, _ = await http_exchange(node.ws_port, get("/demo/", EVIL, "OPTIONS"))
    assert status == 405


async def test_fastim_js_cors_follows_static_allowed_origins(node_factory: Any) -> None:
    node = await node_factory(static_allowed_origins="")
    _s, headers, _ = await http_exchange(node.ws_port, get("/fastim.js", EVIL))
    assert "access-control-allow-origin" not in headers and "vary" not in headers
    node = await node_factory(static_allowed_origins="https://*.example.com")
    app = "https://app.example.com"
    _s, headers, _ = await http_exchange(node.ws_port, get("/fastim.js", app))
    assert headers["access-control-allow-origin"] == app and headers["vary"] == "Origin"
    _s, headers, _ = await http_exchange(node.ws_port, get("/fastim.js", EVIL))
    assert "access-control-allow-origin" not in headers and headers["vary"] == "Origin"
