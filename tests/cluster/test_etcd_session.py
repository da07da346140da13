"""The etcd session runner on its own (membership and user routes test it through their
use of it): hooks in order, revision kept, a failed ``prepare`` retried with backoff,
no etcd at all; and the server's reconnect backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from fastim.cluster import ClusterError
from fastim.cluster.etcd import (
    DEGRADED,
    HEALTHY,
    STARTING,
    STOPPED,
    EtcdSession,
    describe,
)
from fastim.config.endpoints import parse_endpoints
from fastim.tasks import backoff_delay

from ._etcd import EtcdServer, free_port


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def test_backoff_delay_doubles_up_to_the_cap_with_jitter() -> None:
    for attempt in range(40):
        ceiling = min(2.0, 0.1 * 2**attempt)
        for _ in range(20):
            d = backoff_delay(attempt, 0.1, 2.0)
            assert ceiling * 0.5 <= d <= ceiling
    assert len({backoff_delay(3, 0.1, 2.0) for _ in range(20)}) > 1  # jittered


def test_describe() -> None:
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(TimeoutError()) == "TimeoutError"


class Recorder:
    """Hooks that record what the session does; ``prepare`` fails ``fail`` times."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.keys: list[bytes] = []
        self.session: EtcdSession | None = None

    async def prepare(self, client: Any) -> None:
        self.calls.append("prepare")
        if self.fail:
            self.fail -= 1
            raise RuntimeError("not yet")

    def listed(self, r: Any) -> None:
        self.calls.append("listed")
        self.keys.extend(bytes(kv.key) for kv in r)

    def changed(self, ev: Any) -> None:
        assert self.session is not None
        # the session moved its revision before the hook sees the event
        assert self.session.revision == int(ev.kv.mod_revision)
        self.calls.append(f"{ev.kind}")
        self.keys.append(bytes(ev.kv.key))

    async def alongside(self, client: Any) -> None:
        self.calls.append("alongside")
        await asyncio.Event().wait()

    def session_for(self, endpoint: str, prefix: bytes, **kw: Any) -> EtcdSession:
        self.session = EtcdSession(
            "test",
            parse_endpoints(endpoint),
            prefix,
            prepare=self.prepare,
            listed=self.listed,
            changed=self.changed,
            alongside=self.alongside,
            request_timeout=2.0,
            backoff=(0.05, 0.2),
            **kw,
        )
        return self.session


def test_no_endpoint_is_refused() -> None:
    rec = Recorder()
    with pytest.raises(ClusterError, match="no etcd endpoint"):
        EtcdSession(
            "t",
            [],
            b"/x/",
            prepare=rec.prepare,
            listed=rec.listed,
            changed=rec.changed,
            alongside=rec.alongside,
            request_timeout=1.0,
            backoff=(0.05, 0.2),
        )


async def test_hooks_run_in_order_and_the_revision_follows(
    etcd: EtcdServer, cluster_name: str
) -> None:
    import aetcd  # type: ignore[import-untyped]

    prefix = f"/fastim-test/{cluster_name}/things/".encode()
    host, port = parse_endpoints(etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        await c.put(prefix + b"before", b"1")
        rec = Recorder(fail=2)
        s = rec.session_for(etcd.endpoint, prefix)
        states: list[str] = []
        s.on_state(states.append)
        s.start()
        assert await s.started(5.0)
        assert s.state == HEALTHY and s.up and s.last_error == ""
        # two failed prepares (each a session of its own), then one that got through
        assert s.sessions == 3 and s.relists == 1
        assert rec.calls[:4] == ["prepare", "prepare", "prepare", "listed"]
        assert rec.keys == [prefix + b"before"]
        r = await c.put(prefix + b"after", b"2")
        await until(lambda: prefix + b"after" in rec.keys, 5, "the watch saw the put")
        assert s.revision == int(r.header.revision)
        assert "alongside" in rec.calls and "PUT" in rec.calls
        await s.stop()
    assert s.state == STOPPED and not s.up and s.client is None
    assert states == [HEALTHY, STOPPED]


async def test_without_etcd_it_stays_starting_and_says_why() -> None:
    rec = Recorder()
    s = rec.session_for(f"127.0.0.1:{free_port()}", b"/x/")
    s.start()
    assert not await s.started(0.5)
    assert s.state == STARTING and not s.up
    assert s.last_error and s.sessions >= 1
    assert "listed" not in rec.calls and "alongside" not in rec.calls  # never got through
    with pytest.raises(RuntimeError):
        s.start()
    await s.stop()
    assert s.state == STOPPED


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_lost_session_degrades_and_resumes(own_etcd: EtcdServer) -> None:
    import aetcd

    rec = Recorder()
    s = rec.session_for(own_etcd.endpoint, b"/things/", keys_only=True)
    s.start()
    assert await s.started(5.0)
    own_etcd.stop()
    await until(lambda: s.state == DEGRADED, 10, "degraded")
    assert s.last_error
    own_etcd.start()
    await until(lambda: s.state == HEALTHY, 15, "healthy again")
    host, port = parse_endpoints(own_etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=2) as c:
        await c.put(b"/things/x", b"")
    await until(lambda: b"/things/x" in rec.keys, 5, "the watch works again")
    assert s.relists == 1 and s.resumes == 1  # resumed, not listed again
    await s.stop()
