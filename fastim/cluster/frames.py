"""The node-link protocol: frame types and the payloads of batched frames.

Links use the client protocol's framing (``fastim._core.encode_frame`` / ``FrameDecoder``:
a 9-byte header with length, type and CRC-32) so the same compiled decoder checks sizes
and checksums; only the frame types differ. They live in 0x40-0x4F, a range the client
protocol does not use, so a client that dials the link port by mistake (or a link that
dials a client port) is refused at the first frame as UNKNOWN_OP instead of being
misread.

Data frames are **batches**: ``u32 count`` followed by ``count`` entries, so a link makes
one frame (and one write) per loop tick however many messages it carries. All integers
are big-endian; a channel or epoch is ``u8 len`` + UTF-8; ``data`` is ``u32 len`` + the
JSON document as published.

=========== ====== ===================================================================
type        value  payload
=========== ====== ===================================================================
HELLO       0x40   JSON ``{"node", "cluster", "version", "expect"}`` (dialer → acceptor)
WELCOME     0x41   JSON ``{"node", "cluster", "version"}`` (acceptor → dialer)
PING        0x42   opaque, ≤ 64 bytes (dialer → acceptor)
PONG        0x43   the PING's payload (acceptor → dialer)
FORWARD     0x44   batch of ``u64 ref, ch, data``: publishes sent to the channel's owner
FORWARD_ACK 0x45   batch of ``u64 ref, u64 offset, epoch, u16 code, u16 len, reason``
                   (code 0 with reason ``duplicate``: a keyed publish taken before)
DELIVER     0x46   batch of ``ch, epoch, u64 offset, data``: messages down the tree
CONTROL     0x47   one JSON object (extension point: interest, user routes, ...)
DM          0x48   batch of ``user, u64 seq, event``: stored direct messages for a user's
                   connections on the receiving node (``event``: ``u32 len`` + the ``dm``
                   event's JSON, as the clients get it)
FORWARD_KEY 0x49   batch of ``u64 ref, ch, key, data``: FORWARD with an idempotency key
                   (``u16 len`` + UTF-8); answered by FORWARD_ACK like FORWARD
GOAWAY      0x4F   ``u16 code, reason``: refused, or shutting down; then the sender closes
=========== ====== ===================================================================

FORWARD_KEY was added after FORWARD without a version change: a FORWARD is byte for byte
what it was (publishes without a key, the common case, cost nothing more), and a node
sends FORWARD_KEY only for a publish that has a key. A node of an earlier version closes
a link on which one arrives (PROTOCOL): upgrade every node before publishing with keys.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

#: link protocol version, in HELLO and WELCOME
LINK_VERSION = 1
#: largest link frame accepted: a batch of messages each up to the client max_frame
LINK_MAX_FRAME = 64 << 20
#: a batch is sealed into a frame once it holds this many bytes (more go in the next one)
BATCH_BYTES = 256 << 10


class LinkFrame(IntEnum):
    HELLO = 0x40
    WELCOME = 0x41
    PING = 0x42
    PONG = 0x43
    FORWARD = 0x44
    FORWARD_ACK = 0x45
    DELIVER = 0x46
    CONTROL = 0x47
    DM = 0x48
    FORWARD_KEY = 0x49
    GOAWAY = 0x4F


class GoawayCode(IntEnum):
    """Why a link end closes (the ``u16 code`` of GOAWAY)."""

    SHUTDOWN = 1  # the node is stopping: reconnect later (to whoever owns its work)
    WRONG_CLUSTER = 2  # HELLO named another cluster
    WRONG_NODE = 3  # the dialer expected another node id at this address
    BAD_HANDSHAKE = 4  # no or malformed HELLO, unsupported version
    REPLACED = 5  # a newer link from the same node replaced this one
    PROTOCOL = 6  # a malformed frame


def type_table(*types: LinkFrame) -> bytes:
    """The 256-byte table of frame types a decoder accepts."""
    t = bytearray(256)
    for x in types:
        t[x] = 1
    return bytes(t)


#: what the dialing end accepts, and what the accepting end accepts
DIALER_ACCEPTS = type_table(LinkFrame.WELCOME, LinkFrame.PONG, LinkFrame.GOAWAY)
ACCEPTOR_ACCEPTS = type_table(
    LinkFrame.HELLO,
    LinkFrame.PING,
    LinkFrame.FORWARD,
    LinkFrame.FORWARD_ACK,
    LinkFrame.DELIVER,
    LinkFrame.CONTROL,
    LinkFrame.DM,
    LinkFrame.FORWARD_KEY,
    LinkFrame.GOAWAY,
)


class Forward(NamedTuple):
    """A publish made on one node, sent to the channel's owner to be numbered.

    ``ref`` is the sender's own correlation id: the owner echoes it in the FORWARD_ACK.
    ``key``: the publish's idempotency key (a FORWARD_KEY entry), None in a FORWARD.
    """

    ref: int
    channel: str
    data: bytes
    key: str | None = None


class ForwardAck(NamedTuple):
    """The owner's answer to a Forward: ``code`` 0 with the offset and epoch the message
    got, or an error code (fastim.protocol.ErrorCode) with a reason and offset 0."""

    ref: int
    offset: int
    epoch: str
    code: int
    reason: str


class Deliver(NamedTuple):
    """A numbered channel message travelling down the broadcast tree."""

    channel: str
    epoch: str
    offset: int
    data: bytes


class DmEntry(NamedTuple):
    """A direct message stored for ``user`` (sequence ``seq``), sent to a node that holds
    connections of that user. ``event`` is the ``dm`` event's JSON, rendered once by the
    node that stored it and passed to clients as is."""

    user: str
    seq: int
    event: bytes


class LinkDecodeError(ValueError):
    """A batch payload that does not parse (a bug or corruption: the link is closed)."""


_U32 = struct.Struct(">I")
_Q = struct.Struct(">Q")
_QI = struct.Struct(">QI")
_QQ = struct.Struct(">QQ")
_HH = struct.Struct(">HH")
_H = struct.Struct(">H")


def _short(s: str, what: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError(f"{what} over 255 bytes: {s[:40]!r}...")
    return bytes((len(b),)) + b


def pack_forward(ref: int, channel: str, data: bytes) -> bytes:
    """One FORWARD entry."""
    return b"".join((_Q.pack(ref), _short(channel, "channel"), _U32.pack(len(data)), data))


def pack_forward_key(ref: int, channel: str, data: bytes, key: str) -> bytes:
    """One FORWARD_KEY entry."""
    k = key.encode()
    if len(k) > 65535:
        raise ValueError(f"idempotency key over 65535 bytes: {key[:40]!r}...")
    return b"".join(
        (
            _Q.pack(ref),
            _short(channel, "channel"),
            _H.pack(len(k)),
            k,
            _U32.pack(len(data)),
            data,
        )
    )


def pack_forward_ack(ref: int, offset: int, epoch: str, code: int, reason: str) -> bytes:
    """One FORWARD_ACK entry."""
    r = reason.encode()[:65535]
    return b"".join((_QQ.pack(ref, offset), _short(epoch, "epoch"), _HH.pack(code, len(r)), r))


def pack_deliver(channel: str, epoch: str, offset: int, data: bytes) -> bytes:
    """One DELIVER entry."""
    return b"".join(
        (_short(channel, "channel"), _short(epoch, "epoch"), _QI.pack(offset, len(data)), data)
    )


def pack_dm(user: str, seq: int, event: bytes) -> bytes:
    """One DM entry."""
    return b"".join((_short(user, "user"), _QI.pack(seq, len(event)), event))


def pack_batch(count: int, entries: bytes) -> bytes:
    """A batch payload: the count, then the entries already packed back to back."""
    return _U32.pack(count) + entries


def pack_goaway(code: int, reason: str) -> bytes:
    return _H.pack(code) + reason.encode()[:1024]


def unpack_goaway(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        raise LinkDecodeError("GOAWAY shorter than 2 bytes")
    return _H.unpack_from(payload)[0], payload[2:].decode("utf-8", "replace")


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def need(self, n: int) -> int:
        p = self.pos
        if p + n > len(self.buf):
            raise LinkDecodeError(f"batch truncated at byte {p} (wanted {n} more)")
        self.pos = p + n
        return p

    def short(self) -> str:
        n = self.buf[self.need(1)]
        p = self.need(n)
        return self.buf[p : p + n].decode()

    def data(self, n: int) -> bytes:
        p = self.need(n)
        return self.buf[p : p + n]

    def count(self) -> int:
        n: int = _U32.unpack_from(self.buf, self.need(4))[0]
        return n

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise LinkDecodeError(f"{len(self.buf) - self.pos} bytes after the last entry")


def unpack_forward(payload: bytes) -> list[Forward]:
    r = _Reader(payload)
    out = []
    try:
        for _ in range(r.count()):
            ref = _Q.unpack_from(payload, r.need(8))[0]
            ch = r.short()
            n = _U32.unpack_from(payload, r.need(4))[0]
            out.append(Forward(ref, ch, r.data(n)))
    except UnicodeDecodeError as e:
        raise LinkDecodeError(f"FORWARD: {e}") from None
    r.end()
    return out


def unpack_forward_key(payload: bytes) -> list[Forward]:
    r = _Reader(payload)
    out = []
    try:
        for _ in range(r.count()):
            ref = _Q.unpack_from(payload, r.need(8))[0]
            ch = r.short()
            k = _H.unpack_from(payload, r.need(2))[0]
            key = r.data(k).decode()
            n = _U32.unpack_from(payload, r.need(4))[0]
            out.append(Forward(ref, ch, r.data(n), key))
    except UnicodeDecodeError as e:
        raise LinkDecodeError(f"FORWARD_KEY: {e}") from None
    r.end()
    return out


def unpack_forward_ack(payload: bytes) -> list[ForwardAck]:
    r = _Reader(payload)
    out = []
    try:
        for _ in range(r.count()):
            ref, off = _QQ.unpack_from(payload, r.need(16))
            epoch = r.short()
            code, n = _HH.unpack_from(payload, r.need(4))
            out.append(ForwardAck(ref, off, epoch, code, r.data(n).decode("utf-8", "replace")))
    except UnicodeDecodeError as e:
        raise LinkDecodeError(f"FORWARD_ACK: {e}") from None
    r.end()
    return out


def unpack_deliver(payload: bytes) -> list[Deliver]:
    r = _Reader(payload)
    out = []
    try:
        for _ in range(r.count()):
            ch = r.short()
            epoch = r.short()
            off, n = _QI.unpack_from(payload, r.need(12))
            out.append(Deliver(ch, epoch, off, r.data(n)))
    except UnicodeDecodeError as e:
        raise LinkDecodeError(f"DELIVER: {e}") from None
    r.end()
    return out


def unpack_dm(payload: bytes) -> list[DmEntry]:
    r = _Reader(payload)
    out = []
    try:
        for _ in range(r.count()):
            user = r.short()
            seq, n = _QI.unpack_from(payload, r.need(12))
            out.append(DmEntry(user, seq, r.data(n)))
    except UnicodeDecodeError as e:
        raise LinkDecodeError(f"DM: {e}") from None
    r.end()
    return out
