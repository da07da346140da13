"""fastim's compiled core: framing, WebSocket codec, ring buffers, batch fan-out.

Everything on the per-message and per-subscriber path lives here, in C (Cython).
Each piece has a pure-Python twin in ``fastim._pyref`` with the same API, used by the
tests to check the compiled code (property tests: both agree on every input).

Errors are raised as the classes of :mod:`fastim.errors`.
"""

from collections.abc import Callable
from typing import Any, Protocol

from typing_extensions import Buffer

HEADER_SIZE: int  # 9: u32 length, u8 type, u32 CRC32 (network byte order)
DEFAULT_MAX_FRAME: int  # 1 MiB

# Wire formats of a subscriber: which pre-encoded frame its ring takes.
FMT_TCP: int  # fastim frame
FMT_WS_BINARY: int  # fastim frame inside a WebSocket binary frame
FMT_WS_JSON: int  # JSON message inside a WebSocket text frame
FMT_WS_BINARY_DEFLATE: int  # FMT_WS_BINARY for a permessage-deflate connection (RSV1 frame)
FMT_WS_JSON_DEFLATE: int  # FMT_WS_JSON for a permessage-deflate connection (RSV1 frame)
FMT_SSE: int  # JSON message as one Server-Sent Event (SSE and HTTP streaming connections)
N_FORMATS: int  # 6

OP_CONT: int
OP_TEXT: int
OP_BINARY: int
OP_CLOSE: int
OP_PING: int
OP_PONG: int
#: Or-ed into the opcode of a WSParser event for a compressed data message (RSV1 on its
#: first frame, permessage-deflate): ``OP_TEXT | OP_COMPRESSED`` (0x41) or
#: ``OP_BINARY | OP_COMPRESSED`` (0x42). The payload is the compressed bytes, unchecked:
#: pass it to :func:`ws_inflate`.
OP_COMPRESSED: int

def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 (IEEE 802.3, as zlib.crc32), continuing from ``value``."""

def encode_frame(ftype: int, payload: Buffer) -> bytes:
    """Header + payload of one fastim frame. Raises ValueError if ftype is not 0..255."""

MSG_FRAME_TYPE: int  # 0x23: the fastim frame type of a channel message (FrameType.MSG)

class _Deflater(Protocol):
    def frame(
        self, opcode: int, payload: bytes | memoryview, plain: bytes | None = None
    ) -> bytes: ...

def encode_msg(
    subs: SubscriberSet,
    offset: int,
    channel: bytes,
    json_head: bytes,
    data: Buffer,
    deflater: _Deflater | None = None,
) -> tuple[bytes | None, ...]:
    """A channel message in each wire format some member of ``subs`` uses, for
    :meth:`SubscriberSet.fanout` (None for the formats nobody uses).

    Indexed by FMT_*: three entries when no member uses a deflate format or SSE, five
    with a deflate format and no SSE, else N_FORMATS. One pass in C: each frame is
    allocated at its size and written once, the data copied straight in, the CRC32
    computed once:

    - FMT_TCP: the fastim MSG frame (type MSG_FRAME_TYPE); its payload is u64
      ``offset``, u8 ``len(channel)``, ``channel`` (at most 255 bytes, else
      ValueError), ``data``;
    - FMT_WS_BINARY: that frame as the payload of a WebSocket binary frame;
    - FMT_WS_JSON: a WebSocket text frame of ``json_head`` + the offset in decimal +
      ``,"data":`` + ``data`` + ``}``; ``json_head`` is the channel's
      ``{"op":"msg","ch":<channel as JSON>,"off":``;
    - FMT_WS_BINARY_DEFLATE, FMT_WS_JSON_DEFLATE: ``deflater.frame(opcode, payload,
      plain)`` with the fastim frame or the JSON text as payload (compressed once for
      all such members), or the plain frames when ``deflater`` is None;
    - FMT_SSE: ``data: `` + that JSON + two LF (one Server-Sent Event), with the raw CR
      and LF bytes of ``data`` (JSON whitespace: never inside a string) as spaces.
    """

def encode_msg_one(fmt: int, offset: int, channel: bytes, json_head: bytes, data: Buffer) -> bytes:
    """The message of :func:`encode_msg` for one connection of format ``fmt``, uncompressed
    (a deflate format gets the plain frame; any other value the JSON text frame)."""

#: the hub makes no delta of (or against) a message larger than this (bytes)
DELTA_MAX_INPUT: int
#: the fastim frame type of a delta message (FrameType.DELTA)
DELTA_FRAME_TYPE: int

def fossil_delta(src: Buffer, dst: Buffer, text: bool = False) -> bytes:
    """A Fossil delta (fossil-scm.org delta_format) that turns ``src`` into ``dst``.

    Fossil's own algorithm: with ``text=False`` the bytes ``fossil test-delta-create``
    makes (tests/vectors/fossil). ``text=True``: every copy starts and ends on a UTF-8
    character boundary of ``dst``, so a delta of UTF-8 text is UTF-8 text (a JSON client
    carries it in a JSON string: docs/delta.md). Work is O(len(dst) * 250) at worst; the
    caller bounds the sizes (DELTA_MAX_INPUT). The GIL is released while it runs."""

def fossil_apply(src: Buffer, delta: Buffer, max_size: int = ...) -> bytes:
    """The target of ``delta`` applied to ``src``: ValueError if the delta is malformed,
    reads past the source, does not give the announced size or checksum, or announces
    a target over ``max_size`` bytes (checked before anything is allocated)."""

def encode_delta(
    subs: SubscriberSet, offset: int, channel: bytes, json_head: bytes, delta: Buffer
) -> tuple[bytes | None, ...]:
    """A delta message in each wire format an *alt* member of ``subs`` uses, indexed by
    FMT_*, for ``subs.fanout(full, alt=...)``: a DELTA frame (0x25, the MSG layout), it
    inside a WebSocket binary frame, and the JSON text
    ``{"op":"msg","ch":..,"off":N,"delta":true,"data":"<delta as a JSON string>"}``
    (None when the delta is not UTF-8: those members then get the full message). The
    deflate formats get the plain frames: a delta is small, compressing it rarely pays."""

def json_string(data: Buffer) -> bytes:
    """UTF-8 ``data`` as a JSON string literal (quotes, backslash, control bytes escaped)."""

class FrameDecoder:
    """Streaming fastim frame decoder: feed it chunks of any size, get whole frames.

    Checks, in this order, as soon as the bytes that decide them arrive:
    length > ``max_frame`` → FrameTooLarge; type not allowed → UnknownFrameType
    (both right after the 9-byte header, before any payload is buffered);
    CRC32 of the payload ≠ header checksum → ChecksumMismatch.
    After an error the decoder is dead: every later feed() raises the same error. The
    error's ``frames`` attribute holds the frames this feed() completed before it: the
    caller handles them first, then fails the connection.
    """

    max_frame: int
    def __init__(self, max_frame: int = ..., allowed_types: bytes | None = None) -> None:
        """``allowed_types``: a 256-byte table, non-zero where a type is allowed (None: all)."""
    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        """Consume ``data``; return the (type, payload) of every frame it completed."""
    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""

def utf8_valid(data: Buffer) -> bool:
    """Whether ``data`` is well-formed UTF-8 (RFC 3629: no surrogates, no overlongs)."""

def ws_encode(
    opcode: int,
    payload: Buffer,
    fin: bool = True,
    mask: bytes | None = None,
    rsv1: bool = False,
) -> bytes:
    """One WebSocket frame. Server frames are unmasked (mask=None); a client passes 4 mask bytes.

    ``rsv1=True`` sets RSV1: the payload is a permessage-deflate compressed message
    (RFC 7692 §6: compressed DEFLATE blocks without the trailing ``00 00 ff ff``).
    """

def ws_inflate(payload: Buffer, max_size: int, text: bool = False) -> bytes:
    """The message held by a permessage-deflate payload (RFC 7692 §7.2.2).

    Appends ``00 00 ff ff`` and inflates with a fresh raw-DEFLATE decompressor (any
    window up to 2^15: the peer's ``client_max_window_bits`` needs no handling; no
    context is carried between messages). Raises WebSocketError carrying the close
    code: 1009 when the message inflates past ``max_size`` (inflating stops one byte
    past it, so a zip bomb costs at most that much memory), 1007 for data that is not
    DEFLATE, and 1007 for text (``text=True``) that is not UTF-8.
    """

def ws_close_payload(code: int, reason: str = "") -> bytes:
    """Payload of a close frame: u16 code + UTF-8 reason, cut to fit 125 bytes."""

def ws_parse_close(payload: Buffer) -> tuple[int, str]:
    """(code, reason) of a received close payload; (1005, "") when empty.

    Raises WebSocketError(1002) for a 1-byte payload or a code a peer may not send,
    WebSocketError(1007) for a reason that is not UTF-8.
    """

class WSParser:
    """Streaming RFC 6455 frame parser (server side by default).

    feed() returns events ``(opcode, payload)``: OP_TEXT / OP_BINARY with a whole
    reassembled message (text already checked as UTF-8, across fragments, failing as
    soon as a bad byte arrives), and OP_PING / OP_PONG / OP_CLOSE control frames,
    which may arrive between the fragments of a message. A close payload is validated
    (see ws_parse_close). Violations raise WebSocketError carrying the close code:
    1002 protocol error (RSV bits, unknown opcode, unmasked client frame, bad
    fragmentation, control frame too long or fragmented), 1007 invalid UTF-8,
    1009 message larger than ``max_message``. The error's ``events`` attribute holds the
    events this feed() completed before the violation: the caller handles them first,
    then fails the connection (RFC 6455 §7.1.7). After a close frame or an error, the
    parser returns no more events.

    permessage-deflate (RFC 7692): with ``deflate`` set, RSV1 is allowed on the first
    frame of a data message, and marks the message compressed: its event is
    ``(OP_TEXT | OP_COMPRESSED, payload)`` or ``(OP_BINARY | OP_COMPRESSED, payload)``
    with the payload as received (UTF-8 is checked by ``ws_inflate(..., text=True)``
    after inflating). RSV1 on a control or continuation frame, RSV2/RSV3, or RSV1
    without ``deflate`` are protocol errors (1002). ``max_message`` limits the bytes
    received; the inflated size is ws_inflate's ``max_size``. The parser keeps no
    compression state, and 96 bytes of its own (no buffer between messages).
    """

    max_message: int
    def __init__(self, max_message: int = ..., client: bool = False, deflate: bool = False) -> None:
        """``client=True`` parses a server's stream: frames must be unmasked."""
    def feed(self, data: Buffer) -> list[tuple[int, bytes]]: ...
    @property
    def closed(self) -> bool:
        """A close frame was received (or an error raised)."""
    @property
    def deflate(self) -> bool:
        """permessage-deflate was negotiated: RSV1 may mark a message compressed."""
    @deflate.setter
    def deflate(self, value: bool) -> None: ...

class OutRing:
    """A connection's outbound bytes: a ring buffer with a byte cap, drained once per tick.

    Memory is allocated on the first append and released when a flush empties the
    ring, so an idle connection holds no buffer. The first append after that takes a
    buffer of the size the last flush emptied (from the flusher's pool: a subscriber
    that got 8 KiB in its last tick starts at 8 KiB, not at 512 bytes doubling with a
    copy each time). ``append`` past ``cap`` stores
    nothing, sets ``overflowed`` and returns False: the flusher then calls
    ``on_overflow`` (the session closes the slow consumer).

    A ring belongs to a :class:`Flusher`; any append marks it dirty and makes sure one
    flush is scheduled for the end of this loop tick. Flush writes all pending bytes
    with one ``transport.write`` unless ``paused`` (the transport's buffer is full:
    ``resume()`` re-arms it).
    """

    fmt: int
    cap: int
    transport: Any
    on_overflow: Callable[[], object] | None
    on_flush: Callable[[], object] | None
    """None (the default), or called by a flush just before it writes this ring, which
    is still dirty then: what it appends leaves in the same write (an SSE connection's
    event id after the messages it covers). Not called for a closed, overflowed or
    paused ring, nor an empty one."""
    def __init__(
        self,
        flusher: Flusher | None,
        transport: Any,
        fmt: int = ...,
        cap: int = ...,
        on_overflow: Callable[[], object] | None = None,
    ) -> None: ...
    def append(self, data: Buffer) -> bool: ...
    def take(self) -> bytes:
        """All pending bytes, in order; empties the ring and frees its memory."""
    def set_fd(self, fd: int) -> None:
        """Let flushes write to socket ``fd`` themselves (-1: always ``transport.write``).

        The flusher then calls ``sendmsg`` (one or two iovecs, MSG_DONTWAIT) on the
        ring's own buffer, with no bytes object, Python call or transport in between;
        what the kernel does not take is handed to ``transport.write``. This is only
        correct if the transport never holds bytes the ring does not know about when a
        flush runs: the owner sets the transport's high-water mark to 0, so the
        transport pauses the ring (``pause_writing``) whenever it holds anything, and
        never sets an fd for a transport that transforms bytes (TLS).

        The fd is the ring's only while its transport is not closing (then it may be
        closed and its number given to a new connection), and the flusher does not ask
        the transport: whoever closes it sets the fd to -1 first (the session does, on
        its closes and on the peer's EOF; ``close()`` does; so does a flush whose
        ``transport.write`` left the transport closing). A ring with fd -1 is flushed
        through ``transport.write``.
        """
    @property
    def direct_fd(self) -> int:
        """The socket flushes write to, or -1."""
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None:
        """Drop pending bytes; later appends are ignored (return False); fd -1."""
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Bytes allocated now (0 when idle)."""
    @property
    def dirty(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def overflowed(self) -> bool: ...

class Flusher:
    """Drains every dirty OutRing once per event-loop tick (one write per connection).

    ``schedule`` is called once when the first ring of a tick becomes dirty; the node
    passes ``loop.call_soon`` with ``flush`` bound, tests may pass None and call
    ``flush()`` themselves.
    """

    def __init__(
        self, schedule: Callable[[Callable[[], object]], object] | None = None
    ) -> None: ...
    def flush(self) -> int:
        """Write every dirty ring; return how many writes were made."""
    pool_limit: int
    """Bytes of emptied ring buffers kept for reuse at most (default 32 MiB)."""
    @property
    def pool_bytes(self) -> int:
        """Bytes of ring buffers waiting in the pool now.

        Ring buffers are powers of two; one that a flush empties goes to this pool
        (sizes 512 B to 64 KiB) rather than back to malloc, and the next ring that
        needs that size takes it: under load, no malloc or free per ring per tick.
        """
    def trim_pool(self) -> None:
        """Free every pooled buffer."""
    @property
    def pending(self) -> int:
        """Rings waiting for the next flush."""
    writes: int
    bytes_written: int
    shared: int
    """Deliveries a fan-out stored by reference, not copied (see ``arena_bytes``)."""
    @property
    def arena_bytes(self) -> int:
        """Bytes of broadcast frames held since the last flush.

        ``SubscriberSet.fanout`` copies a frame once into this flusher's arena of its
        wire format; a subscriber's ring that writes to its own socket (``set_fd``)
        and holds nothing else refers to the run of frames it was given there, and
        ``flush`` sends that run straight from the arena. A ring whose run breaks (a
        reply, a frame of another channel it does not follow) copies it first, as do
        paused rings and what the kernel does not take. A flush empties the arenas.
        """

class SubscriberSet:
    """The subscribers of one channel: OutRings in a C array (O(1) add and remove)."""

    def __init__(self) -> None: ...
    def add(self, ring: OutRing) -> bool:
        """False if already present."""
    def remove(self, ring: OutRing) -> bool:
        """False if absent."""
    def __len__(self) -> int: ...
    def __contains__(self, ring: object) -> bool: ...
    def count(self, fmt: int) -> int:
        """Members whose ring takes format ``fmt``."""
    def set_alt(self, ring: OutRing, on: bool = True) -> bool:
        """Mark a member as taking fanout's ``alt`` frames (a delta subscriber in sync
        with the channel); False if ``ring`` is not a member. Removal clears it."""
    def is_alt(self, ring: object) -> bool: ...
    def alt_count(self, fmt: int = -1) -> int:
        """Members marked alt, of format ``fmt`` (-1: of any)."""
    def fanout(
        self, frames: tuple[bytes | None, ...], alt: tuple[bytes | None, ...] | None = None
    ) -> int:
        """Append ``frames[ring.fmt]`` to every member's ring, in C; return deliveries.

        With ``alt``, members marked alt take ``alt[ring.fmt]`` (or ``frames[ring.fmt]``
        where that is None): one pass delivers deltas to some, full messages to others.

        Encode once: ``frames`` holds one pre-encoded frame per wire format (indexed by
        FMT_*, up to N_FORMATS; a shorter tuple means None for the rest), None where no
        member uses it. Rings over their cap are marked overflowed.
        """
    def rings(self) -> list[OutRing]: ...

class HistoryRing:
    """The last ``capacity`` messages of a channel, addressable by offset.

    Offsets are appended strictly increasing by one (the channel's sequence).
    """

    capacity: int
    def __init__(self, capacity: int) -> None: ...
    def append(self, offset: int, item: object) -> None:
        """Raises ValueError unless offset == last_offset + 1 (or the ring is empty)."""
    def get(self, offset: int) -> object | None: ...
    def since(self, offset: int) -> list[tuple[int, object]] | None:
        """Messages after ``offset``, oldest first; None if some were already evicted."""
    def __len__(self) -> int: ...
    @property
    def first_offset(self) -> int:
        """Offset of the oldest message kept (0 when empty)."""
    @property
    def last_offset(self) -> int:
        """Offset of the newest message appended (0 when nothing ever was)."""

class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved, full at start.

    ``take(now)`` spends one token (or ``n``) if there is one and says whether it did;
    ``now`` is any monotonic clock in seconds (the node passes its timer wheel's time,
    so no clock is read per call). A connection that publishes gets one lazily: idle
    connections carry none. ``refused`` counts the takes that failed.
    """

    rate: float
    burst: float
    refused: int
    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None: ...
    def take(self, now: float, n: float = 1.0) -> bool: ...
    @property
    def available(self) -> float: ...
