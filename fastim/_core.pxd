# Declarations of the compiled core's classes, so later Cython modules can cimport
# them and call their cdef methods without going through Python.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    # Wire formats of a subscriber's ring: which pre-encoded frame of a message it takes
    # (exported to Python as FMT_* and N_FORMATS, fastim/core/ring.pxi). N_FMT, their
    # number, is stated here only: it sizes every C array indexed by format.
    WF_TCP = 0                  # fastim frame
    WF_WS_BINARY = 1            # fastim frame inside a WebSocket binary frame
    WF_WS_JSON = 2              # JSON message inside a WebSocket text frame
    WF_WS_BINARY_DEFLATE = 3    # WF_WS_BINARY, compressed (permessage-deflate) when it pays
    WF_WS_JSON_DEFLATE = 4      # WF_WS_JSON, compressed when it pays
    WF_SSE = 5                  # JSON message as a Server-Sent Event (SSE, HTTP streaming)
    N_FMT = 6

    # Ring buffers are powers of two; the flusher pools emptied ones by size class
    POOL_MIN_SHIFT = 9          # 512 bytes
    POOL_CLASSES = 8            # .. 64 KiB; bigger buffers are malloc'd and freed

    # The flusher's arenas of broadcast frames (see Flusher._stash)
    ARENA_MIN = 64 * 1024       # first size of an arena
    ARENA_KEEP = 8 * 1024 * 1024  # an arena bigger than this is freed after its flush
    ARENA_MAX = 0x7FFFFFFF      # past this (a ring's int offsets), frames are copied


cdef class FrameDecoder:
    cdef readonly Py_ssize_t max_frame
    cdef bytes _table             # shared normalised type table (see _type_table)
    cdef const uint8_t* allowed   # points into _table
    cdef uint8_t hdr[9]
    cdef Py_ssize_t hdr_have
    cdef bytes cur            # payload being filled (we hold the only reference)
    cdef Py_ssize_t cur_len
    cdef Py_ssize_t cur_have
    cdef uint32_t cur_crc
    cdef uint32_t want_crc
    cdef int cur_type
    cdef object dead          # the exception that killed the decoder, or None

    cdef _die(self, exc)
    cdef int _run(self, const uint8_t* p, Py_ssize_t n, list out) except -1


cdef class WSParser:
    # Laid out for memory (one parser per WebSocket connection): no header or control
    # buffer (the header is decoded byte by byte into the fields below, a control
    # frame's payload goes into its own bytes object like an unfragmented message's),
    # flags and small state in single bytes. 96 bytes per parser, from 320.
    cdef readonly Py_ssize_t max_message
    # where the payload goes: a fresh bytes (control frame, unfragmented message) or msg
    cdef bytes single
    cdef char* msg
    cdef Py_ssize_t msg_len
    cdef Py_ssize_t msg_cap
    # while the header is read: the length being decoded; then payload bytes left
    cdef uint64_t f_left
    # UTF-8 validation state, carried across frames of a text message
    cdef int u_need
    cdef uint8_t u_lo
    cdef uint8_t u_hi
    cdef uint8_t mask[4]
    cdef uint8_t mask_pos      # 0..3
    cdef uint8_t hdr_have      # header bytes read of the current frame (0: between frames)
    cdef uint8_t hdr_need      # its header size, known from the second byte (2..14)
    cdef uint8_t f_b0          # the frame's first byte: FIN, RSV1-3, opcode
    cdef uint8_t f_masked
    cdef uint8_t target
    cdef uint8_t msg_opcode    # 0 when no message is in progress
    cdef uint8_t msg_deflate   # the message in progress is compressed (RSV1 on its first frame)
    cdef uint8_t client
    cdef uint8_t _deflate      # permessage-deflate negotiated: RSV1 allowed on data messages
    cdef uint8_t _closed
    cdef uint8_t in_frame

    cdef int _grow_msg(self, Py_ssize_t extra) except -1
    cdef int _consume_payload(self, const uint8_t* p, Py_ssize_t n) except -1
    cdef int _check_first_bytes(self, uint8_t b0, uint8_t b1) except -1
    cdef int _start_frame(self, list out) except -1
    cdef int _end_frame(self, list out) except -1


cdef class Flusher:
    cdef list dirty
    cdef object schedule
    cdef object _flush_cb
    cdef bint scheduled
    cdef public Py_ssize_t writes
    cdef public Py_ssize_t bytes_written
    # buffers of emptied rings, by power-of-two size class (512 B .. 64 KiB), for reuse
    cdef char** pool[POOL_CLASSES]
    cdef Py_ssize_t pool_n[POOL_CLASSES]
    cdef Py_ssize_t pool_cap[POOL_CLASSES]
    cdef readonly Py_ssize_t pool_bytes
    cdef public Py_ssize_t pool_limit
    # this tick's broadcast frames, once each, per wire format: a subscriber's ring refers
    # to a run of them instead of copying them (OutRing._share); emptied by each flush
    cdef char* arena[N_FMT]
    cdef Py_ssize_t arena_len[N_FMT]
    cdef Py_ssize_t arena_cap[N_FMT]
    cdef bint flushing         # flush() is running: no new references (copies instead)
    cdef public Py_ssize_t shared  # deliveries that were not copied into a ring

    cdef inline void _mark(self, OutRing ring) noexcept
    cdef Py_ssize_t _stash(self, int f, const char* p, Py_ssize_t n) noexcept
    cdef void _arena_reset(self) noexcept
    cdef Py_ssize_t _flush(self, list batch) except -1
    cdef char* _get(self, Py_ssize_t cap) noexcept
    cdef void _put(self, char* buf, Py_ssize_t cap) noexcept


cdef class OutRing:
    cdef char* buf
    cdef Py_ssize_t bufcap
    cdef Py_ssize_t head
    cdef Py_ssize_t size
    cdef int _fmt
    cdef Py_ssize_t nsets      # SubscriberSets this ring is in: fmt is fixed while > 0
    cdef public Py_ssize_t cap
    cdef public object transport
    cdef public object on_overflow
    cdef public object on_flush  # None, or called before each write (SSE event ids)
    cdef Flusher flusher
    cdef int fd                # >= 0: flush writes to this socket itself (see set_fd)
    # pending bytes that are a run of the flusher's arena (format _fmt): [rstart,
    # rstart + rlen); while rlen > 0 the ring's own buffer is empty and size == rlen
    cdef int rstart
    cdef int rlen
    cdef uint8_t _dirty        # flags as bytes: the object stays the size it was
    cdef uint8_t _paused
    cdef uint8_t _closed
    cdef uint8_t _overflowed
    cdef uint8_t hint          # log2 of the buffer the last flush emptied (0: none): see _append

    cdef inline void _set_dirty(self) noexcept
    cdef Py_ssize_t _send_direct(self) noexcept
    cdef int _consume(self, Py_ssize_t n) except -1
    cdef inline void _remember(self) noexcept
    cdef void _release(self) noexcept
    cdef int _store(self, const char* p, Py_ssize_t n) except -1
    cdef int _append(self, const char* p, Py_ssize_t n) except -1
    cdef int _share(self, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int _materialize(self) except -1
    cdef bytes _take(self)


cdef class SubscriberSet:
    cdef void** arr
    cdef Py_ssize_t n
    cdef Py_ssize_t acap
    cdef dict index
    cdef Py_ssize_t counts[N_FMT]  # members per wire format
    cdef uint8_t* alt          # per slot of arr: 1 = takes the alternate frames (deltas)
    cdef Py_ssize_t alt_counts[N_FMT]  # members per wire format with alt set
    cdef int iterating         # > 0 while fanout() walks arr: add/remove refuse

    cdef inline int _check_mutable(self) except -1


cdef class HistoryRing:
    cdef void** items
    cdef readonly Py_ssize_t capacity
    cdef Py_ssize_t head       # index of the oldest kept item
    cdef Py_ssize_t count
    cdef uint64_t _last
    cdef bint _started
