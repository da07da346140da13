"""Graceful shutdown: SIGTERM/SIGINT on a real process, and Node.stop() in process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fastim import _core
from fastim.config import Config
from fastim.node import Node
from fastim.protocol import SHUTDOWN_REASON, CloseCode, FrameType, unpack_goaway, unpack_msg

from ._support import Closed, TcpClient, WsClient, deadline, free_port, open_tcp, wait_until

F = FrameType
EXIT_BOUND = 10.0


async def tcp_until_goaway(
    c: TcpClient, timeout: float = EXIT_BOUND
) -> tuple[list[tuple[int, bytes]], int, str]:
    frames = await c.recv_all_until_eof(timeout)
    assert frames and frames[-1][0] == F.GOAWAY, [t for t, _ in frames]
    code, reason = unpack_goaway(frames[-1][1])
    return frames[:-1], code, reason


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_clients_with_1001_and_exits_0(node_process: Any, sig: int) -> None:
    p = node_process()
    loop = asyncio.get_running_loop()
    async with deadline(30):
        tcp = await TcpClient.connect(p.tcp_port)
        assert await tcp.sub("news") == 0
        ws = await connect(f"ws://127.0.0.1:{p.ws_port}/ws")
        await ws.send(json.dumps({"op": "sub", "ch": "news", "id": 1}))
        assert json.loads(await ws.recv())["op"] == "subscribed"
        raw = await WsClient.connect(p.ws_port)
        assert await raw.sub("news") == 0

        async def ws_close() -> tuple[int, str]:
            with pytest.raises(ConnectionClosed) as exc:
                while True:
                    await ws.recv()
            assert exc.value.rcvd is not None
            return exc.value.rcvd.code, exc.value.rcvd.reason

        async def raw_close() -> tuple[int, str]:
            code, reason, before = await raw.recv_close(EXIT_BOUND)
            assert before == []
            raw.send_close(1000)
            await raw.wait_eof()
            return code, reason

        tcp_task = asyncio.ensure_future(tcp_until_goaway(tcp))
        ws_task = asyncio.ensure_future(ws_close())
        raw_task = asyncio.ensure_future(raw_close())
        t0 = loop.time()
        # terminate() blocks until the process exits: run it off the loop, so that our
        # clients can take part in the close handshakes meanwhile
        rc = await asyncio.to_thread(p.terminate, sig, EXIT_BOUND)
        elapsed = loop.time() - t0
        frames, code, reason = await tcp_task
        assert frames == []
        assert code == CloseCode.GOING_AWAY and "reconnect" in reason
        assert reason == SHUTDOWN_REASON
        assert await ws_task == (1001, SHUTDOWN_REASON)
        assert await raw_task == (1001, SHUTDOWN_REASON)
        assert ws.close_code == 1001
    log = "".join(p.log)
    assert rc == 0, log
    assert "Traceback" not in log, log
    assert "stopped" in log
    # every client answered its close: nobody had to wait for close_timeout (2 s)
    assert elapsed < 2.0, (elapsed, log)


def test_sigterm_right_after_listening_is_graceful(node_process: Any) -> None:
    """The "listening" line tells a supervisor the node is up (the fixture waits for it):
    from then on SIGTERM must mean a graceful stop and exit code 0, never death by signal.

    The window between that line and the installation of the signal handlers is short, so
    one try catches it only sometimes: several processes, each signalled at once.
    """
    rcs = []
    logs = []
    for _ in range(4):
        p = node_process()
        rcs.append(p.terminate(signal.SIGTERM, EXIT_BOUND))
        logs.append("".join(p.log))
    assert rcs == [0] * len(rcs), (
        f"exit codes {rcs} (-15: killed by SIGTERM before the handler was installed)\n" + logs[0]
    )
    assert all("stopped" in log for log in logs), logs


async def test_signal_handlers_are_installed_before_listening_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic form of the test above: when serve_forever() logs "listening" (the
    line supervisors and the node_process fixture wait for), SIGTERM must already be
    handled, else a SIGTERM in that window kills the process without a graceful stop."""
    monkeypatch.chdir(tmp_path)  # the default store's file goes to the working directory
    node = Node(Config(tcp_port=free_port(), ws_port=free_port(), node_id="sig-test"))
    at_listening: list[object] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "listening" in record.getMessage():
                at_listening.append(signal.getsignal(signal.SIGTERM))

    logger = logging.getLogger("fastim")
    spy, old_level = Spy(), logger.level
    logger.addHandler(spy)
    logger.setLevel(logging.INFO)
    before = signal.getsignal(signal.SIGTERM)
    task = asyncio.ensure_future(node.serve_forever())
    try:
        await wait_until(lambda: bool(at_listening), 10, "the listening line")
        await wait_until(lambda: signal.getsignal(signal.SIGTERM) != before, 5, "a handler")
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the node's loop: a graceful stop
        await asyncio.wait_for(task, 10)
    finally:
        logger.removeHandler(spy)
        logger.setLevel(old_level)
        if not task.done():
            task.cancel()
    assert not node.sessions
    assert signal.getsignal(signal.SIGTERM) == before  # and removed again
    assert at_listening[0] != before, "SIGTERM was not handled yet when 'listening' was logged"


async def test_listeners_closed_after_signal(node_process: Any) -> None:
    p = node_process()
    tcp = await TcpClient.connect(p.tcp_port)
    rc = await asyncio.to_thread(p.terminate, signal.SIGTERM, EXIT_BOUND)
    assert rc == 0
    _frames, code, _ = await tcp_until_goaway(tcp)
    assert code == CloseCode.GOING_AWAY
    for port in (p.tcp_port, p.ws_port):
        with pytest.raises(OSError):
            await open_tcp(port)


# --------------------------------------------------------------------------- in process


async def test_stop_with_200_clients(node_factory: Any) -> None:
    node: Node = await node_factory(close_timeout=3.0, shutdown_timeout=5.0)
    loop = asyncio.get_running_loop()
    tcps = [await TcpClient.connect(node.tcp_port) for _ in range(100)]
    wss = [await WsClient.connect(node.ws_port) for _ in range(95)]
    for i, c in enumerate(tcps):
        await c.sub(f"ch{i % 7}")
    for i, w in enumerate(wss):
        await w.sub(f"ch{i % 7}")
    libs = [await connect(f"ws://127.0.0.1:{node.ws_port}/ws") for _ in range(5)]
    assert len(node.sessions) == 200

    async def tcp_done(c: TcpClient) -> int:
        _frames, code, _ = await tcp_until_goaway(c)
        return code

    async def ws_done(w: WsClient) -> int:
        code, _, _ = await w.recv_close(EXIT_BOUND)
        w.send_close(1000)
        await w.wait_eof()
        return code

    async def lib_done(ws: Any) -> int:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), EXIT_BOUND)
        await asyncio.wait_for(ws.wait_closed(), EXIT_BOUND)
        return int(ws.close_code)

    waiting = asyncio.gather(
        *(tcp_done(c) for c in tcps), *(ws_done(w) for w in wss), *(lib_done(x) for x in libs)
    )
    t0 = loop.time()
    await asyncio.wait_for(node.stop(), node.config.shutdown_timeout + 2)
    elapsed = loop.time() - t0
    codes = await asyncio.wait_for(waiting, EXIT_BOUND)
    assert codes == [1001] * 200
    assert not node.sessions
    assert elapsed < node.config.shutdown_timeout
    # all clients cooperated: no one was left to the close timeout
    assert elapsed < node.config.close_timeout, elapsed
    with pytest.raises(OSError):
        await open_tcp(node.tcp_port)


async def test_stop_drops_clients_that_never_finish_the_close(node_factory: Any) -> None:
    node: Node = await node_factory(close_timeout=5.0, shutdown_timeout=0.5)
    loop = asyncio.get_running_loop()
    mute = [await WsClient.connect(node.ws_port) for _ in range(10)]  # never answer the close
    good = await TcpClient.connect(node.tcp_port)
    t0 = loop.time()
    await asyncio.wait_for(node.stop(), 3.0)
    elapsed = loop.time() - t0
    assert 0.4 <= elapsed < 2.0, elapsed
    assert not node.sessions
    _f, code, _ = await tcp_until_goaway(good)
    assert code == 1001
    for m in mute:
        code, _reason, _ = await m.recv_close()
        assert code == 1001
        await m.wait_eof()


async def test_stop_twice_is_harmless(node: Node) -> None:
    c = await TcpClient.connect(node.tcp_port)
    await asyncio.wait_for(asyncio.gather(node.stop(), node.stop()), 5)
    await asyncio.wait_for(node.stop(), 5)
    _f, code, _ = await tcp_until_goaway(c)
    assert code == 1001 and not node.sessions


async def test_messages_published_right_before_stop_are_delivered_first(node_factory: Any) -> None:
    node: Node = await node_factory()
    ch = "last.words"
    tcp = await TcpClient.connect(node.tcp_port)
    wsj = await WsClient.connect(node.ws_port)
    wsb = await WsClient.connect(node.ws_port, protocols="fastim.binary")
    await tcp.sub(ch)
    await wsj.sub(ch)
    from fastim.protocol import pack_sub

    wsb.send_binary(_core.encode_frame(F.SUB, pack_sub(F.SUB, 1, ch)))
    assert (await wsb.recv_frame())[0] == F.SUBSCRIBED
    # 200 messages of ~10 KB (2 MB: more than a socket takes at once), published and
    # then stop() in the same tick: nothing has been flushed when the close begins
    datas = [orjson.dumps({"i": i, "pad": "z" * 10_000}) for i in range(200)]
    for d in datas:
        node.hub.publish(ch, d)
    stopping = asyncio.ensure_future(node.stop())

    async def tcp_side() -> None:
        frames, code, reason = await tcp_until_goaway(tcp)
        assert [unpack_msg(p) for _t, p in frames] == [(i + 1, ch, d) for i, d in enumerate(datas)]
        assert (code, reason) == (1001, SHUTDOWN_REASON)

    async def json_side() -> None:
        code, reason, before = await wsj.recv_close(EXIT_BOUND)
        msgs = [orjson.loads(p) for _op, p in before]
        assert [(m["off"], m["data"]["i"]) for m in msgs] == [(i + 1, i) for i in range(200)]
        assert (code, reason) == (1001, SHUTDOWN_REASON)
        wsj.send_close(1000)
        await wsj.wait_eof()

    async def binary_side() -> None:
        code, _reason, before = await wsb.recv_close(EXIT_BOUND)
        offs = []
        for _op, p in before:
            for _t, fp in _core.FrameDecoder().feed(p):
                offs.append(unpack_msg(fp)[0])
        assert offs == list(range(1, 201))
        assert code == 1001
        wsb.send_close(1000)
        await wsb.wait_eof()

    await asyncio.wait_for(asyncio.gather(tcp_side(), json_side(), binary_side()), EXIT_BOUND)
    await asyncio.wait_for(stopping, EXIT_BOUND)
    assert not node.sessions


async def test_publish_acked_before_sigterm_reaches_subscriber(node_process: Any) -> None:
    p = node_process()
    async with deadline(30):
        sub = await TcpClient.connect(p.tcp_port)
        await sub.sub("acked")
        pub = await TcpClient.connect(p.tcp_port)
        for i in range(50):
            pub.send_pub("acked", b"%d" % i)
        for _ in range(50):
            await pub.expect(F.PUBACK)
        rc = await asyncio.to_thread(p.terminate, signal.SIGTERM, EXIT_BOUND)
        assert rc == 0
        frames, code, _ = await tcp_until_goaway(sub)
        assert [unpack_msg(f)[0] for _t, f in frames] == list(range(1, 51))
        assert code == 1001
        with pytest.raises(Closed):
            await sub.recv(1)
