"""Hypothesis fuzzing of the command parser (Session.handle_json / handle_frame) over real sockets.

A real node runs in the test's event loop; every example opens one real connection (TCP
with CMD frames, WebSocket binary with CMD frames, or WebSocket text) and sends it a
short sequence of generated commands: valid ops with fields of random types and values
(``sub`` with ``since``, ``pub``, ``send``, ``ack``, ``hello``, ``presence``, ...), JSON
that is not an object, unknown ops, and on binary connections raw fastim frames with
random payloads. Each command is followed by a sentinel ping, so its replies can be
told apart from the next command's. For each command the node must answer:

- with the documented reply for its op (``subscribed``, ``puback``, ``sent``, ...), or
- with an error whose code is in the protocol's table (never 100 INTERNAL): a non-fatal
  one leaves the connection usable, a fatal one is followed by the close code the
  protocol maps it to (WebSocket close frame, or GOAWAY), and then the end of the
  connection;

and for commands drawn from the valid grammar, a small model of the session (declared
user, subscriptions) says exactly which of those it must be. No exception may reach the
event loop or the node's log. After each example a control pair does a pub/sub round
trip and the node is back to the control pair's two sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server._support import (  # type: ignore[import-not-found]
    Closed,
    Control,
    TcpClient,
    WsClient,
    wait_for_sessions,
)

from fastim import _core
from fastim.errors import ProtocolError
from fastim.node import Node
from fastim.protocol import (
    CLIENT_FRAME_TYPES,
    CloseCode,
    ErrorCode,
    FrameType,
    pack_hello,
    pack_sub,
    unpack_ack,
    unpack_error,
    unpack_goaway,
    unpack_unsubscribed,
)


def scaled(examples: int) -> int:
    """``examples`` times FASTIM_FUZZ_SCALE (default 1): ``FASTIM_FUZZ_SCALE=20`` hunts longer."""
    return max(1, int(examples * float(os.environ.get("FASTIM_FUZZ_SCALE", "1"))))


F = FrameType
SOCKETS = settings(
    max_examples=scaled(50),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
CONTROL_SESSIONS = 2
WAIT = 5.0  # a reply that takes longer than this counts as never coming
DOCUMENTED = {int(c) for c in ErrorCode} - {int(ErrorCode.INTERNAL)}
REPLY_OF = {
    "ping": "pong",
    "sub": "subscribed",
    "unsub": "unsubscribed",
    "pub": "puback",
    "hello": "welcome",
    "presence": "presence",
    "send": "sent",
    "ack": "acked",
    "inbox": "inbox",
}
#: server-initiated messages: not replies to a command
EVENTS = {"msg", "dm", "join", "leave", "resubscribe"}


# --------------------------------------------------------------------------- commands


@dataclass
class Cmd:
    """One thing sent: a JSON command (object or not) or, on binary connections, a frame."""

    kind: str  # "json" | "frame" | "raw"
    obj: Any = None  # json: the value sent (serialised with orjson), or raw JSON text bytes
    ftype: int = 0
    payload: bytes = b""
    valid: bool = False  # drawn from the valid grammar: the model predicts the outcome

    @property
    def op(self) -> Any:
        return self.obj.get("op") if isinstance(self.obj, dict) else None

    def describe(self) -> str:
        if self.kind == "json":
            return f"json {self.obj!r}"[:300]
        return f"{self.kind} 0x{self.ftype:02x} {self.payload[:80]!r}"


CHANNELS = ["fz", "fz:1", "room:ü", "x" * 255]
CURRENT = "<the channel's epoch>"
USERS = ["alice", "bob", "ü" * 3]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
any_text = st.text(max_size=300).filter(lambda s: s != "control")
channels = st.one_of(st.sampled_from(CHANNELS), any_text, json_values)
users = st.one_of(st.sampled_from(USERS), any_text, json_values)


@st.composite
def json_command(draw: st.DrawFn, next_id: Iterator[int]) -> Cmd:
    """A command of the JSON grammar: valid, or with fields of random types and values."""
    mode = draw(st.integers(0, 9))
    if mode == 0:  # not an object, or not JSON at all
        raw = draw(
            st.one_of(
                json_values.map(orjson.dumps),
                st.binary(max_size=40),
                st.sampled_from([b"{", b'{"op":"ping"', b"[]", b"NaN", b'{"op":"ping"} x']),
            )
        )
        return Cmd("json", raw)
    op = draw(st.sampled_from(sorted(REPLY_OF)))
    valid = mode >= 5
    obj: dict[str, Any] = {"op": op}
    if valid:
        if op in ("sub", "unsub", "pub", "presence"):
            obj["ch"] = draw(st.sampled_from(CHANNELS))
        if op == "pub" or op == "send":
            obj["data"] = draw(json_values)
        if op == "sub" and draw(st.booleans()):
            obj["since"] = {
                "off": draw(st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1))),
                # CURRENT: replaced by the channel's epoch when sent, so recovery happens
                "epoch": draw(st.one_of(st.just(CURRENT), st.text(max_size=64))),
            }
        if op == "hello":
            obj["user"] = draw(st.sampled_from(USERS))
        if op == "send":
            obj["to"] = draw(st.sampled_from(USERS))
            if draw(st.booleans()):
                obj["cid"] = draw(st.text(min_size=1, max_size=128))
        if op == "ack":
            obj["seq"] = draw(st.integers(0, 2**63 - 1))
    else:
        for name, values in (
            ("ch", channels),
            ("data", json_values),
            ("since", st.one_of(json_values, st.fixed_dictionaries({"off": json_values}))),
            ("user", users),
            ("to", users),
            ("cid", st.one_of(any_text, json_values)),
            ("seq", json_values),
        ):
            if draw(st.booleans()):
                obj[name] = draw(values)
        if draw(st.integers(0, 3)) == 0:
            obj["op"] = draw(st.one_of(any_text, json_values))
        if draw(st.integers(0, 3)) == 0:
            obj[draw(st.text(max_size=5))] = draw(json_values)
    ident = draw(st.integers(0, 9))
    if ident <= 5:
        obj["id"] = next(next_id)
    elif ident == 6:
        obj["id"] = f"i{next(next_id)}"
    elif ident == 7 and not valid:
        obj["id"] = draw(json_values)  # often not an integer or a string
    return Cmd("json", obj, valid=valid)


@st.composite
def frame_command(draw: st.DrawFn, next_id: Iterator[int]) -> Cmd:
    """A raw fastim frame: a client type with a structured or random payload, or another type."""
    ftype: int = draw(st.sampled_from([F.HELLO, F.PING, F.PONG, F.SUB, F.UNSUB, F.PUB, F.CMD]))
    if draw(st.integers(0, 9)) == 0:
        ftype = draw(st.integers(0, 255))
    mode = draw(st.integers(0, 3))
    payload: bytes
    if mode == 0:
        payload = draw(st.binary(max_size=80))
    elif ftype == F.HELLO:
        options = draw(
            st.one_of(
                st.just(b"{}"),
                st.just(b""),
                users.map(lambda u: orjson.dumps({"user": u})),
                json_values.map(orjson.dumps),
                st.binary(max_size=20),
            )
        )
        payload = pack_hello(draw(st.integers(0, 3)), draw(st.integers(0, 3)), options)
    elif ftype in (F.SUB, F.UNSUB, F.PUB):
        ch = draw(st.one_of(st.sampled_from(CHANNELS), any_text))
        data = draw(st.one_of(json_values.map(orjson.dumps), st.binary(max_size=20)))
        try:
            payload = pack_sub(ftype, next(next_id), ch, data if ftype == F.PUB else b"")
        except (ValueError, struct.error):
            payload = draw(st.binary(max_size=80))
    elif ftype == F.PING:
        payload = draw(st.binary(max_size=70))
    else:
        payload = draw(st.binary(max_size=40))
    return Cmd("frame", ftype=ftype, payload=payload)


# --------------------------------------------------------------------------- connections


@dataclass
class Item:
    """Something the node sent: a reply or event (as a dict), or the end of the connection."""

    obj: dict[str, Any] | None = None
    close: int | None = None  # close code (WebSocket close frame or GOAWAY)
    eof: bool = False


class Conn:
    """One fuzzed connection, whatever its transport; yields normalised Items."""

    def __init__(self, kind: str, client: Any) -> None:
        self.kind = kind  # "tcp" | "ws-binary" | "ws-json"
        self.c = client
        self.buf: list[Item] = []

    @property
    def binary(self) -> bool:
        return self.kind != "ws-json"

    def send(self, cmd: Cmd) -> None:
        if cmd.kind == "frame":
            data = _core.encode_frame(cmd.ftype, cmd.payload)
        else:
            body = cmd.obj if isinstance(cmd.obj, bytes) else orjson.dumps(cmd.obj)
            if not self.binary:
                self.c.send_text(body)
                return
            data = _core.encode_frame(F.CMD, body)
        if self.kind == "tcp":
            self.c.write(data)
        else:
            self.c.send_binary(data)

    def _frame(self, ftype: int, p: bytes) -> Item:
        if ftype == F.EVENT:
            return Item(orjson.loads(p))
        if ftype == F.ERROR:
            rid, code, reason = unpack_error(p)
            return Item({"op": "error", "code": code, "reason": reason, "id": rid or None})
        if ftype == F.GOAWAY:
            return Item(close=unpack_goaway(p)[0])
        if ftype in (F.SUBSCRIBED, F.PUBACK):
            op = "subscribed" if ftype == F.SUBSCRIBED else "puback"
            return Item({"op": op, "id": unpack_ack(p)[0]})
        if ftype == F.UNSUBSCRIBED:
            return Item({"op": "unsubscribed", "id": unpack_unsubscribed(p)[0]})
        if ftype == F.WELCOME:
            return Item({"op": "welcome", "frame": True})
        if ftype == F.PONG:
            return Item({"op": "pong", "frame": True})
        if ftype == F.MSG:
            return Item({"op": "msg"})
        if ftype == F.PING:
            return Item({"op": "ping-frame"})
        raise AssertionError(f"the node sent an unknown frame type 0x{ftype:02x}")

    async def _more(self, timeout: float) -> None:
        if self.kind == "tcp":
            try:
                t, p = await self.c.recv(timeout)
            except Closed:
                self.buf.append(Item(eof=True))
                return
            self.buf.append(self._frame(t, p))
            return
        try:
            op, payload = await self.c.recv_event(timeout)
        except Closed:
            self.buf.append(Item(eof=True))
            return
        if op == _core.OP_CLOSE:
            self.buf.append(Item(close=self.c.close_code))
        elif op == _core.OP_TEXT:
            assert not self.binary, "a text message on a binary connection"
            self.buf.append(Item(orjson.loads(payload)))
        elif op == _core.OP_BINARY:
            assert self.binary, "a binary message on a JSON connection"
            frames = self.c.decoder.feed(payload)
            assert self.c.decoder.buffered == 0, "a binary message with a partial frame"
            self.buf.extend(self._frame(t, p) for t, p in frames)
        else:
            raise AssertionError(f"unexpected WebSocket opcode {op}")

    async def next(self, timeout: float = WAIT) -> Item:
        while not self.buf:
            await self._more(timeout)
        return self.buf.pop(0)

    async def close(self) -> None:
        await self.c.close()


async def open_conn(node: Node, kind: str, protocol: bool, hello: bool) -> Conn:
    if kind == "tcp":
        return Conn(kind, await TcpClient.connect(node.tcp_port, hello=hello))
    if kind == "ws-binary":
        name = "fastim.binary" if protocol else None
    else:
        name = "fastim.json" if protocol else None
    return Conn(kind, await WsClient.connect(node.ws_port, protocols=name))


# --------------------------------------------------------------------------- the model


@dataclass
class Model:
    """What a session knows about itself, as far as the valid grammar can change it."""

    kind: str
    handshake: bool  # TCP: no HELLO yet
    user: str | None = None
    hello_seen: bool = False
    subs: set[str] = field(default_factory=set)

    def expect(self, cmd: Cmd) -> tuple[set[str], set[int]] | None:
        """(reply ops, error codes) a valid command may get; None when not predicted."""
        if cmd.kind == "frame" and cmd.ftype not in CLIENT_FRAME_TYPES:
            return set(), {ErrorCode.UNKNOWN_OP}  # the decoder refuses it from its header
        if self.handshake and not (cmd.kind == "frame" and cmd.ftype == F.HELLO):
            return set(), {ErrorCode.HANDSHAKE_REQUIRED}
        if not cmd.valid:
            return None
        op, obj = cmd.op, cmd.obj
        assert isinstance(obj, dict)
        if op in ("send", "ack", "inbox") and self.user is None:
            return set(), {ErrorCode.NO_USER}
        if op == "sub":
            if obj["ch"] in self.subs:
                return set(), {ErrorCode.ALREADY_SUBSCRIBED}
            return {"subscribed"}, set()
        if op == "unsub":
            if obj["ch"] not in self.subs:
                return set(), {ErrorCode.NOT_SUBSCRIBED}
            return {"unsubscribed"}, set()
        if op == "hello":
            return ({"welcome"}, set()) if self.user is None else (set(), {ErrorCode.BAD_REQUEST})
        if op == "ack":  # beyond the inbox's top it is a BAD_REQUEST
            return {"acked"}, {ErrorCode.BAD_REQUEST}
        if op == "send":
            return {"sent"}, {ErrorCode.INBOX_FULL}
        return {REPLY_OF[op]}, set()

    def apply(self, cmd: Cmd, reply: dict[str, Any] | None) -> None:
        """Update from what the node answered (only successes change the session)."""
        if cmd.kind == "frame" or self.binary_cmd():
            self.hello_seen = True
        if reply is None or reply.get("op") == "error":
            return
        op = reply.get("op")
        if cmd.kind == "frame":
            if cmd.ftype == F.HELLO:
                self.handshake = False
                opts = cmd.payload[2:]
                try:
                    user = orjson.loads(opts).get("user") if opts.strip() else None
                except (orjson.JSONDecodeError, AttributeError):
                    user = None
                if isinstance(user, str):
                    self.user = user
            elif op in ("subscribed", "unsubscribed"):
                ch = _frame_channel(cmd.payload)
                (self.subs.add if op == "subscribed" else self.subs.discard)(ch)
            return
        obj = cmd.obj
        if not isinstance(obj, dict):
            return
        if op == "welcome":
            self.user = obj.get("user")
        elif op == "subscribed":
            self.subs.add(obj["ch"])
        elif op == "unsubscribed":
            self.subs.discard(obj["ch"])

    def binary_cmd(self) -> bool:
        return self.kind != "ws-json"


def _frame_channel(payload: bytes) -> str:
    n = payload[4]
    return payload[5 : 5 + n].decode()


FRAME_REPLIES: dict[int, set[str]] = {
    F.HELLO: {"welcome"},
    F.PING: {"pong"},
    F.SUB: {"subscribed"},
    F.UNSUB: {"unsubscribed"},
    F.PUB: {"puback"},
}


def frame_replies(ftype: int) -> set[str]:
    return FRAME_REPLIES.get(ftype, set())


# --------------------------------------------------------------------------- fixtures


class Crashes(logging.Handler):
    """Collects what must never happen: loop exceptions and error logs of the node."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(f"{context.get('message')}: {context.get('exception')!r}")


@pytest.fixture
async def rig(node: Node) -> AsyncIterator[tuple[Node, Control, Crashes]]:
    crashes = Crashes()
    logging.getLogger("fastim").addHandler(crashes)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(crashes.loop_handler)
    control = await Control(node).start()
    try:
        yield node, control, crashes
    finally:
        loop.set_exception_handler(None)
        logging.getLogger("fastim").removeHandler(crashes)
        await control.close()


def _ids() -> Iterator[int]:
    n = 1000
    while True:
        n += 1
        yield n


IDS = _ids()


# --------------------------------------------------------------------------- the runner


async def run_example(
    rig: tuple[Node, Control, Crashes], kind: str, protocol: bool, hello: bool, cmds: list[Cmd]
) -> None:
    node, control, crashes = rig
    conn = await open_conn(node, kind, protocol, hello)
    model = Model(kind, handshake=kind == "tcp" and not hello, hello_seen=kind == "tcp" and hello)
    try:
        for k, cmd in enumerate(cmds):
            ended = await one_command(node, conn, model, cmd, k)
            if ended:
                break
    finally:
        await conn.close()
    assert not crashes.seen, crashes.seen
    await control.roundtrip()
    await wait_for_sessions(node, CONTROL_SESSIONS)


async def one_command(node: Node, conn: Conn, model: Model, cmd: Cmd, k: int) -> bool:
    """Send ``cmd`` and a sentinel; check what comes back. True when the connection ended."""
    sentinel = f"s{k}"
    since = cmd.obj.get("since") if cmd.kind == "json" and isinstance(cmd.obj, dict) else None
    if isinstance(since, dict) and since.get("epoch") == CURRENT:
        channel = node.hub.channels.get(cmd.obj["ch"])
        epoch = channel.epoch if channel is not None else ""
        cmd = Cmd("json", {**cmd.obj, "since": {**since, "epoch": epoch}}, valid=cmd.valid)
    conn.send(cmd)
    conn.send(Cmd("json", {"op": "ping", "id": sentinel}))
    cmd_id = cmd.obj.get("id") if cmd.kind == "json" and isinstance(cmd.obj, dict) else None
    replies: list[dict[str, Any]] = []
    got_sentinel = False
    rounds = 0
    where = f"after {cmd.describe()}"
    while True:
        item = await conn.next()
        if item.eof or item.close is not None:
            return await ended(conn, model, cmd, replies, item, where)
        obj = item.obj
        assert isinstance(obj, dict) and "op" in obj, (obj, where)
        if obj["op"] in EVENTS or obj["op"] == "ping-frame":
            continue
        if obj["op"] == "pong" and obj.get("id") == sentinel:
            got_sentinel = True
        else:
            replies.append(obj)
        if got_sentinel and (replies or not may_get_a_reply(cmd)):
            break
        if got_sentinel and not replies and may_stay_silent(cmd, cmd_id):
            # an ack without an id is answered only when it fails: one more round trip
            rounds += 1
            if rounds > 1:
                break
            sentinel = f"s{k}b"
            got_sentinel = False
            conn.send(Cmd("json", {"op": "ping", "id": sentinel}))
    assert len(replies) <= 1, f"{len(replies)} replies {where}: {replies}"
    reply = replies[0] if replies else None
    check_reply(model, cmd, cmd_id, reply, where)
    event(f"{conn.kind}: {outcome(reply)}")
    if reply is not None and reply.get("op") == "error" and _fatal(reply["code"]):
        # a fatal error: the close must follow (the sentinel was not answered... or was
        # answered before the error of an asynchronous command: both end here)
        item = await conn.next()
        while item.obj is not None and item.obj.get("op") in EVENTS | {"ping-frame"}:
            item = await conn.next()
        assert item.close is not None or item.eof, f"no close after a fatal error {where}"
        return await ended(conn, model, cmd, [reply], item, where)
    model.apply(cmd, reply)
    return False


def may_get_a_reply(cmd: Cmd) -> bool:
    return not (cmd.kind == "frame" and cmd.ftype == F.PONG)


def may_stay_silent(cmd: Cmd, cmd_id: Any) -> bool:
    if cmd.kind == "frame":
        return cmd.ftype == F.PONG
    return cmd.op == "ack" and cmd_id is None


def outcome(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "no reply"
    if reply.get("op") == "error":
        return f"error {reply.get('code')}"
    return str(reply.get("op"))


def _fatal(code: int) -> bool:
    return ErrorCode(code).fatal


def check_reply(
    model: Model, cmd: Cmd, cmd_id: Any, reply: dict[str, Any] | None, where: str
) -> None:
    expected = model.expect(cmd)
    if reply is None:
        silent_ok = expected is not None and not expected[0] and not expected[1]
        assert may_stay_silent(cmd, cmd_id) or silent_ok, f"no reply {where}"
        return
    op = reply.get("op")
    if op == "error":
        code = reply.get("code")
        assert code in DOCUMENTED, f"error code {code} {where}: {reply}"
        assert isinstance(reply.get("reason"), str) and reply["reason"], (reply, where)
        if expected is not None:
            assert code in expected[1], f"expected {expected}, got {reply} {where}"
    else:
        if cmd.kind == "json":
            allowed = {REPLY_OF[cmd.op]} if cmd.op in REPLY_OF else set()
        else:
            allowed = set(REPLY_OF.values()) if cmd.ftype == F.CMD else frame_replies(cmd.ftype)
        assert op in allowed, f"reply {reply} {where}"
        if expected is not None:
            assert op in expected[0], f"expected {expected}, got {reply} {where}"
    # the request id comes back as it was sent (JSON); a fatal error may lose it
    fatal = op == "error" and _fatal(reply["code"])
    if cmd.kind == "json" and cmd_id is not None and not fatal:
        assert reply.get("id") == cmd_id, f"id {cmd_id!r} not echoed {where}: {reply}"


async def ended(
    conn: Conn,
    model: Model,
    cmd: Cmd,
    replies: list[dict[str, Any]],
    item: Item,
    where: str,
) -> bool:
    """The connection is closing: that needs a fatal error just before, and its close code."""
    if not conn.binary and isinstance(cmd.obj, bytes) and not _core.utf8_valid(cmd.obj):
        # WebSocket text that is not UTF-8: the framing fails it, the close code says it all
        assert not replies and item.close == CloseCode.INVALID_DATA, (replies, item, where)
        event(f"{conn.kind}: close 1007")
        conn.c.send_close(item.close)
        await conn.c.wait_eof()
        return True
    errors = [r for r in replies if r.get("op") == "error"]
    assert errors, f"closed without an error {where}: {replies} then {item}"
    err = errors[-1]
    code = err["code"]
    assert code in DOCUMENTED and _fatal(code), f"closed after {err} {where}"
    check_reply(model, cmd, None, err, where)
    event(f"{conn.kind}: fatal {code}")
    if item.close is not None:
        want = ProtocolError("", code).close_code
        assert item.close == want, f"close {item.close} after {err} {where}"
        if conn.kind != "tcp":
            conn.c.send_close(item.close)
    # then the end: nothing else, EOF
    while True:
        rest = await conn.next()
        if rest.eof:
            return True
        assert rest.obj is not None and rest.obj.get("op") in EVENTS | {"ping-frame"}, (
            f"{rest} after the close {where}"
        )


# --------------------------------------------------------------------------- the tests


@st.composite
def sessions(draw: st.DrawFn, frames: bool) -> tuple[str, bool, bool, list[Cmd]]:
    kind = draw(
        st.sampled_from(["tcp", "ws-binary", "ws-json"] if not frames else ["tcp", "ws-binary"])
    )
    protocol = draw(st.booleans())
    hello = draw(st.integers(0, 5)) > 0
    one = json_command(IDS)
    if frames:
        one = st.one_of(frame_command(IDS), json_command(IDS))
    cmds = draw(st.lists(one, min_size=1, max_size=8))
    if draw(st.booleans()):  # declare a user first: send, ack and inbox get past NO_USER
        user = draw(st.sampled_from(USERS))
        cmds.insert(0, Cmd("json", {"op": "hello", "user": user, "id": next(IDS)}, valid=True))
    return kind, protocol, hello, cmds


@SOCKETS
@given(example=sessions(frames=False))
async def test_json_commands_over_real_sockets(
    rig: tuple[Node, Control, Crashes], example: tuple[str, bool, bool, list[Cmd]]
) -> None:
    await run_example(rig, *example)


@SOCKETS
@given(example=sessions(frames=True))
async def test_raw_frames_and_commands_over_real_sockets(
    rig: tuple[Node, Control, Crashes], example: tuple[str, bool, bool, list[Cmd]]
) -> None:
    await run_example(rig, *example)
