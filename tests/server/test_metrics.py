"""Observability over real sockets: /metrics after traffic, /ready, JSON logs, no secret in logs.

``/metrics`` is scraped like Prometheus would (plain HTTP on the WebSocket port) and parsed
with prometheus-client's own parser, so the exposition is checked as well as the values.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastim import cli
from fastim.api.metrics import LatencyHistogram
from fastim.config import Config, ConfigError
from fastim.node import Node
from fastim.protocol import CloseCode, ErrorCode, FrameType, unpack_error
from fastim.store import StoreUnavailable

from ._support import TcpClient, WsClient, deadline, http_exchange, wait_until

F = FrameType
KEY = "metrics-test-key-0123456789"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(node: Node) -> Samples:
    """Every sample of GET /metrics: (name, sorted labels) → value."""
    status, headers, body = await http_exchange(
        node.ws_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return v(after, name, **labels) - v(before, name, **labels)


# --------------------------------------------------------------------------- /metrics


async def test_metrics_follow_traffic(node: Node) -> None:
    before = await scrape(node)
    wss = [await WsClient.connect(node.ws_port) for _ in range(3)]
    tcp = await TcpClient.connect(node.tcp_port)
    async with deadline(10):
        for ws in wss:
            await ws.sub("m")
        await tcp.sub("m")
        for i in range(5):
            await tcp.pub("m", b'{"i":%d}' % i)
        for ws in wss:
            for _ in range(5):
                await ws.msg()
        for _ in range(5):
            await tcp.msg()
    after = await scrape(node)

    assert v(after, "fastim_connections", transport="websocket") == 3
    assert v(after, "fastim_connections", transport="tcp") == 1
    assert v(after, "fastim_connections", transport="http") == 1  # this scrape
    assert v(after, "fastim_subscriptions") == 4
    assert v(after, "fastim_channels") == 1
    assert delta(after, before, "fastim_messages_published_total") == 5
    assert delta(after, before, "fastim_deliveries_total") == 20
    assert delta(after, before, "fastim_bytes_received_total") > 5 * len(b'{"i":0}')
    assert delta(after, before, "fastim_bytes_sent_total") > 20 * len(b'{"i":0}')
    assert delta(after, before, "fastim_writes_total") > 0
    assert v(after, "fastim_ready") == 1
    assert v(after, "fastim_node_info", node="test-node", store="sqlite", version="0.1.0") == 1

    # the latency histogram counts messages, not deliveries: 5 publishes, 4 subscribers
    count = v(after, "fastim_publish_latency_seconds_count")
    assert count - v(before, "fastim_publish_latency_seconds_count") == 5
    assert v(after, "fastim_publish_latency_seconds_bucket", le="+Inf") == count
    assert 0 < v(after, "fastim_publish_latency_seconds_sum") < 5.0
    les = sorted(
        (float(dict(labels)["le"]), val)
        for (name, labels), val in after.items()
        if name == "fastim_publish_latency_seconds_bucket"
    )
    assert [c for _le, c in les] == sorted(c for _le, c in les), "buckets are cumulative"
    # process metrics come along (RSS, CPU, open fds)
    assert v(after, "process_resident_memory_bytes") > 0

    for ws in wss:
        await ws.close()
    await tcp.close()
    await wait_until(lambda: len(node.sessions) == 0)
    gone = await scrape(node)
    assert v(gone, "fastim_connections", transport="websocket") == 0
    assert v(gone, "fastim_subscriptions") == 0


async def test_durable_publish_latency_includes_the_store(
    node_factory: Any, tmp_path: Path
) -> None:
    node = await node_factory(store="sqlite", store_path=str(tmp_path / "m.db"))
    tcp = await TcpClient.connect(node.tcp_port)
    for i in range(3):
        await tcp.pub("d", b"%d" % i)
    after = await scrape(node)
    assert v(after, "fastim_publish_latency_seconds_count") == 3
    # a store round trip (a thread hop at least) takes longer than the 50 us bucket
    assert v(after, "fastim_publish_latency_seconds_bucket", le="5e-05") < 3
    await tcp.close()


#: metric → the node attribute it reads
EXPORTED = {
    "fastim_slow_consumer_disconnects_total": ("node", "slow_disconnects"),
    "fastim_heartbeat_timeouts_total": ("node", "heartbeat_timeouts"),
    "fastim_rate_limited_total": ("node", "rate_limited"),
    "fastim_connection_limit_refusals_total": ("node", "limit_refusals"),
    "fastim_protocol_errors_total": ("node", "protocol_errors"),
    "fastim_bytes_received_total": ("node", "bytes_in"),
    "fastim_messages_published_total": ("hub", "published"),
    "fastim_deliveries_total": ("hub", "delivered"),
    "fastim_messages_recovered_total": ("hub", "recovered"),
    "fastim_direct_messages_sent_total": ("postman", "sent"),
    "fastim_direct_messages_delivered_total": ("postman", "delivered"),
    "fastim_direct_messages_retried_total": ("postman", "retried"),
    "fastim_auth_denied_total": ("auth", "denied"),
    "fastim_auth_expired_total": ("auth", "expired"),
}


async def test_every_counter_reads_its_attribute_at_scrape_time(node: Node) -> None:
    for i, (_metric, (owner, attr)) in enumerate(EXPORTED.items()):
        setattr(getattr(node, owner) if owner != "node" else node, attr, 1000 + i)
    node.hub.store_errors = 7
    assert node.postman is not None
    node.postman.store_errors = 9
    got = await scrape(node)
    for i, metric in enumerate(EXPORTED):
        want = 1000 + i
        if metric == "fastim_bytes_received_total":
            want += 0  # the scrape's own request bytes arrive before the collector runs
            assert got[(metric, ())] >= want
        else:
            assert got[(metric, ())] == want, metric
    assert v(got, "fastim_store_errors_total", part="hub") == 7
    assert v(got, "fastim_store_errors_total", part="postman") == 9
    node.auth.verified, node.auth.failed = 11, 12
    got = await scrape(node)
    assert v(got, "fastim_auth_tokens_total", result="verified") == 11
    assert v(got, "fastim_auth_tokens_total", result="refused") == 12


async def test_protocol_errors_and_rate_limits_are_counted(node_factory: Any) -> None:
    node = await node_factory(publish_rate=1.0)
    before = await scrape(node)
    bad = await TcpClient.connect(node.tcp_port, hello=False)
    bad.write(b"\x00\x00\x00\x01\x99garbage!")
    await bad.recv_all_until_eof()
    tcp = await TcpClient.connect(node.tcp_port)
    refused = 0
    for _ in range(4):  # burst 2, then refused
        tcp.send_pub("r", b"1")
    async with deadline(5):
        seen = 0
        while seen < 4:
            t, p = await tcp.recv()
            if t == F.ERROR:
                assert unpack_error(p)[1] == ErrorCode.RATE_LIMITED
                refused += 1
            if t in (F.ERROR, F.PUBACK):
                seen += 1
    after = await scrape(node)
    assert delta(after, before, "fastim_protocol_errors_total") == 1
    assert delta(after, before, "fastim_rate_limited_total") == refused >= 1
    await tcp.close()


async def test_heartbeat_timeouts_are_counted(node_factory: Any) -> None:
    node = await node_factory(ping_interval=0.2, pong_timeout=0.2)
    ws = await WsClient.connect(node.ws_port)
    ws.auto_pong = False
    code, _reason, _ = await ws.recv_close(timeout=5)
    assert code == CloseCode.HEARTBEAT_TIMEOUT
    got = await scrape(node)
    assert v(got, "fastim_heartbeat_timeouts_total") == 1


async def test_direct_messages_and_api_requests_are_counted(node_factory: Any) -> None:
    node = await node_factory(api_key=KEY, dm_retry=0.1)
    bob = await WsClient.connect(node.ws_port)
    await bob.request({"op": "hello", "user": "bob"}, "welcome")
    body = orjson.dumps({"to": "bob", "data": 1})
    status, _h, _b = await http_exchange(
        node.ws_port,
        b"POST /api/send HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body),
    )
    assert status == 200
    first = await bob.recv_json()
    again = await bob.recv_json(timeout=5)  # not acked: sent again after dm_retry
    assert first["seq"] == again["seq"] == 1
    await http_exchange(node.ws_port, b"GET /api/presence HTTP/1.1\r\n\r\n")  # no key: 401
    got = await scrape(node)
    assert v(got, "fastim_direct_messages_sent_total") == 1
    assert v(got, "fastim_direct_messages_delivered_total") >= 1
    assert v(got, "fastim_direct_messages_retried_total") >= 1
    assert v(got, "fastim_api_requests_total", route="/api/send", status="200") == 1
    assert v(got, "fastim_api_requests_total", route="/api/presence", status="401") == 1
    await bob.close()


def test_latency_histogram_buckets() -> None:
    h = LatencyHistogram((0.001, 0.01))
    for x in (0.0005, 0.001, 0.002, 0.5):
        h.observe(x)
    assert h.buckets() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]  # le: "<="
    assert h.count == 4 and h.sum == pytest.approx(0.5035)


# --------------------------------------------------------------------------- /ready


async def get_ready(node: Node) -> tuple[int, bytes]:
    status, _h, body = await http_exchange(node.ws_port, b"GET /ready HTTP/1.1\r\n\r\n")
    return status, body


async def test_ready_follows_the_store(node_factory: Any, tmp_path: Path) -> None:
    node = await node_factory(store="sqlite", store_path=str(tmp_path / "r.db"))
    assert await get_ready(node) == (200, b"ready\n")
    probe = node.store_probe
    assert probe is not None and node.store is not None
    probe.every = 0.05
    real = node.store.inbox_state

    async def broken(user: str) -> Any:
        raise StoreUnavailable("sqlite store: disk I/O error")

    node.store.inbox_state = broken
    await wait_until(lambda: node.readiness() is not None, what="the probe to fail")
    status, body = await get_ready(node)
    assert status == 503 and b"disk I/O error" in body
    assert v(await scrape(node), "fastim_ready") == 0
    # /health says the process is alive: it does not depend on the store
    status, _h, _b = await http_exchange(node.ws_port, b"GET /health HTTP/1.1\r\n\r\n")
    assert status == 200

    node.store.inbox_state = real
    await wait_until(lambda: node.readiness() is None, what="the probe to pass")
    assert await get_ready(node) == (200, b"ready\n")


async def test_a_hung_store_is_not_ready(node: Node) -> None:
    probe = node.store_probe
    assert probe is not None and node.store is not None
    probe.every, probe.timeout = 0.05, 0.1

    async def hung(user: str) -> Any:
        await asyncio.sleep(3600)

    node.store.inbox_state = hung  # type: ignore[method-assign]
    await wait_until(lambda: node.readiness() is not None, what="the probe to time out")
    status, body = await get_ready(node)
    assert status == 503 and b"no reply in 0.1s" in body


async def test_not_ready_while_stopping(node: Node) -> None:
    assert node.readiness() is None
    stopping = asyncio.ensure_future(node.stop())
    await asyncio.sleep(0)
    assert node.readiness() == "shutting down"
    await stopping


# --------------------------------------------------------------------------- logs


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.getLogger("fastim").makeRecord(
        "fastim", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )
    return rec


def test_json_formatter_writes_one_object_per_line() -> None:
    fmt = cli.JsonFormatter()
    line = fmt.format(_record("publish to %r failed", "news", channel="news", n=3))
    assert "\n" not in line
    obj = orjson.loads(line)
    assert obj["level"] == "warning" and obj["logger"] == "fastim"
    assert obj["message"] == "publish to 'news' failed"
    assert obj["channel"] == "news" and obj["n"] == 3
    assert obj["time"].endswith("Z") and "T" in obj["time"]
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = _record("oops")
        rec.exc_info = sys.exc_info()
    obj = orjson.loads(fmt.format(rec))
    assert "ValueError: boom" in obj["exc"]


def test_secrets_are_masked_wherever_they_appear() -> None:
    cfg = Config(api_key=KEY, redis_url='redis://app:p"ss\\word@redis:6379/0')
    secrets = cli.secrets_of(cfg)
    assert KEY in secrets and 'p"ss\\word' in secrets
    for inner in (cli.JsonFormatter(), logging.Formatter("%(message)s")):
        fmt = cli.MaskingFormatter(inner, secrets)
        rec = _record("key %s url %s", KEY, cfg.redis_url, where=f"header Bearer {KEY}")
        try:
            raise RuntimeError(f"cannot connect to {cfg.redis_url}")
        except RuntimeError:
            rec.exc_info = sys.exc_info()
        line = fmt.format(rec)
        assert KEY not in line and 'p"ss' not in line and 'p\\"ss' not in line, line
        assert "***" in line
        if isinstance(inner, cli.JsonFormatter):
            orjson.loads(line)  # still valid JSON


def test_log_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="log_format"):
        Config(log_format="xml").validate()
    with pytest.raises(ConfigError, match="api_key") as e:
        Config(api_key="short-secret").validate()
    assert "short-secret" not in str(e.value)  # the key itself is never echoed
    with pytest.raises(ConfigError, match="api_key"):
        Config(api_key="has a space in it 0123456789").validate()


def test_config_check_masks_the_api_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.toml"
    path.write_text(f'api_key = "{KEY}"\nlog_format = "json"\n')
    assert cli.main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert KEY not in out and "api_key" in out and "'***'" in out


def test_json_logs_of_a_node_process_parse_and_hold_no_secret(node_process: Any) -> None:
    secret_pw = "hunter2-redis-password"
    proc = node_process(
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--api-key",
        KEY,
        "--redis-url",
        f"redis://app:{secret_pw}@127.0.0.1:1/0",
    )

    async def traffic() -> None:
        body = b'{"channel":"a","data":1}'
        for key in (KEY, "wrong-key-0123456789abc"):
            await http_exchange(
                proc.ws_port,
                b"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (key.encode(), len(body), body),
            )
        await http_exchange(proc.ws_port, b"GET /api/nope HTTP/1.1\r\n\r\n")

    asyncio.run(traffic())
    assert proc.terminate() == 0
    lines = [ln for ln in "".join(proc.log).splitlines() if ln.strip()]
    objs = [orjson.loads(ln) for ln in lines]  # every line is one JSON object
    assert any("listening" in o["message"] for o in objs)
    assert any("stopped" in o["message"] for o in objs)
    assert all({"time", "level", "logger", "message"} <= set(o) for o in objs)
    text = "\n".join(lines)
    assert KEY not in text and secret_pw not in text


def test_text_logs_stay_text(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        cli.MaskingFormatter(logging.Formatter("%(levelname)s %(message)s"), [KEY])
    )
    log = logging.getLogger("fastim.test-text")
    log.addHandler(handler)
    try:
        log.warning("api key is %s", KEY)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "WARNING api key is ***\n"
