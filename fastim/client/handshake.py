"""The fastim handshake of the client SDK: open a transport, send HELLO, wait for
WELCOME, all within the connect timeout.

The frames that came in the same chunk as WELCOME are handed back with the connection:
they are the reader's to dispatch. An ERROR before the node closes the connection says
why it refused (a :class:`~fastim.errors.ProtocolError` with its code); a GOAWAY alone is
a :class:`~fastim.errors.ConnectionClosed` (a node at its connection limit says "going
away": try another).
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from .. import protocol
from .._core import encode_frame
from ..errors import ConnectionClosed, ProtocolError
from ..protocol import ErrorCode, FrameType
from .connection import Connection, deadline, open_connection

__all__ = ["CLIENT_NAME", "Frames", "handshake", "hello_frame", "parse_welcome"]

#: What the SDK calls itself in HELLO.
CLIENT_NAME = "fastim-py/0.1"

#: ``(type, payload)`` of frames received and not dispatched yet
Frames = list[tuple[int, bytes]]


def hello_frame(user: str | None) -> bytes:
    """The HELLO this client sends: the protocol versions it speaks, its name, its user."""
    options: dict[str, Any] = {"client": CLIENT_NAME}
    if user is not None:
        options["user"] = user
    return encode_frame(
        FrameType.HELLO,
        protocol.pack_hello(
            protocol.SUPPORTED_VERSIONS[0],
            protocol.SUPPORTED_VERSIONS[-1],
            orjson.dumps(options),
        ),
    )


def parse_welcome(payload: bytes) -> dict[str, Any]:
    """The JSON object of a WELCOME (node, ping_interval, max_frame, ...)."""
    if not payload or payload[0] not in protocol.SUPPORTED_VERSIONS:
        raise ProtocolError(
            f"server chose protocol version {payload[:1].hex() or 'none'}",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    try:
        info = orjson.loads(payload[1:]) if len(payload) > 1 else {}
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"WELCOME info is not JSON: {e}") from None
    if not isinstance(info, dict):
        raise ProtocolError("WELCOME info is not a JSON object")
    return info


async def handshake(
    url: str, hello: bytes, timeout: float
) -> tuple[Connection, dict[str, Any], Frames]:
    """Open a transport, HELLO, wait for WELCOME; all within ``timeout``.

    Returns the connection, the WELCOME's info and the frames that followed it.
    """
    conn: Connection | None = None

    async def run() -> tuple[Connection, dict[str, Any], Frames]:
        nonlocal conn
        conn = await open_connection(url)
        conn.write(hello)
        await conn.drain()
        error: tuple[int, str] | None = None
        while True:
            try:
                frames = await conn.read_frames()
            except ConnectionClosed:
                if error is not None:
                    raise ProtocolError(error[1], error[0]) from None
                raise
            for i, (ftype, payload) in enumerate(frames):
                if ftype == FrameType.WELCOME:
                    return conn, parse_welcome(payload), frames[i + 1 :]
                if ftype == FrameType.PING:
                    conn.write(encode_frame(FrameType.PONG, payload))
                elif ftype == FrameType.ERROR:
                    _, code, reason = protocol.unpack_error(payload)
                    error = (code, reason)
                elif ftype == FrameType.GOAWAY:
                    code, reason = protocol.unpack_goaway(payload)
                    if error is not None:
                        raise ProtocolError(error[1], error[0])
                    raise ConnectionClosed(code, reason)

    try:
        async with deadline(timeout):
            try:
                return await run()
            except struct.error as e:
                raise ProtocolError(f"malformed frame during the handshake: {e}") from None
    except BaseException:
        if conn is not None:
            conn.abort()
        raise
