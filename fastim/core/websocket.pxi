# WebSocket (RFC 6455) framing: a streaming parser and an encoder, with the framing half
# of permessage-deflate (RFC 7692): RSV1 marks a compressed message.
#
# The parser handles payload bytes as they arrive: it unmasks them straight into their
# destination (a fresh bytes object for a control frame or an unfragmented message, the
# message buffer for a fragmented one) and runs the UTF-8 validator over text as it
# goes, so a bad byte fails the connection at once (Autobahn 6.4.*). A compressed
# message is delivered still compressed, its opcode or-ed with OP_COMPRESSED: the caller
# inflates it (ws_inflate) and only then can its text be checked. The parser keeps no
# zlib state: the server requires no context takeover in both directions, so every
# message inflates on its own and an idle connection holds nothing for compression.

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
OP_COMPRESSED = 0x40   # or-ed into the opcode of a message whose first frame had RSV1

cdef enum:
    # the opcodes the hot path compares with, as C constants
    _OP_CONT = 0x0
    _OP_TEXT = 0x1
    _OP_CLOSE = 0x8
    _OP_COMPRESSED = 0x40
    _T_CTRL = 0
    _T_SINGLE = 1
    _T_MSG = 2
    _SINGLE_MAX = 65536   # larger unfragmented messages grow a buffer as bytes arrive
    _MSG_KEEP = 4096      # message buffer kept between messages up to this size

# appended to a compressed message before inflating it (RFC 7692 §7.2.2)
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


cdef inline void _unmask_copy(uint8_t* dst, const uint8_t* src, Py_ssize_t n,
                              const uint8_t* mask, Py_ssize_t phase) noexcept nogil:
    cdef uint8_t m8[8]
    cdef uint64_t m64, w
    cdef Py_ssize_t i
    for i in range(8):
        m8[i] = mask[(phase + i) & 3]
    memcpy(&m64, m8, 8)
    while n >= 8:
        memcpy(&w, src, 8)
        w ^= m64
        memcpy(dst, &w, 8)
        src += 8
        dst += 8
        n -= 8
    for i in range(n):
        dst[i] = src[i] ^ m8[i]


cdef inline bint _close_code_ok(int code) noexcept:
    # RFC 6455 §7.4 + the IANA registry: codes a peer may put in a close frame.
    if code < 1000 or code >= 5000:
        return False
    if code >= 3000:
        return True
    return (1000 <= code <= 1003) or (1007 <= code <= 1014)


def ws_parse_close(payload):
    cdef Py_buffer view
    cdef const uint8_t* p
    cdef int code, need = 0
    cdef uint8_t lo = 0x80, hi = 0xBF
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        if view.len == 0:
            return 1005, ""
        if view.len == 1:
            raise WebSocketError("close frame payload of 1 byte (RFC 6455 §5.5.1)", 1002)
        code = (p[0] << 8) | p[1]
        if not _close_code_ok(code):
            raise WebSocketError(f"invalid close code {code} (RFC 6455 §7.4)", 1002)
        if not _utf8_step(p + 2, view.len - 2, &need, &lo, &hi) or need != 0:
            raise WebSocketError("close reason is not valid UTF-8", 1007)
        return code, (<bytes>PyBytes_FromStringAndSize(<const char*>p + 2, view.len - 2)).decode("utf-8")
    finally:
        PyBuffer_Release(&view)


def ws_close_payload(int code, str reason=""):
    cdef bytes r = reason.encode("utf-8")
    cdef Py_ssize_t cut
    if len(r) > 123:
        cut = 123
        while cut > 0 and (r[cut] & 0xC0) == 0x80:
            cut -= 1
        r = r[:cut]
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + r


cdef inline Py_ssize_t _ws_head_len(Py_ssize_t n) noexcept nogil:
    """Bytes of an unmasked frame header for an ``n``-byte payload."""
    if n < 126:
        return 2
    if n < 65536:
        return 4
    return 10


cdef inline Py_ssize_t _ws_put_head(uint8_t* o, uint8_t b0, Py_ssize_t n) noexcept nogil:
    """An unmasked frame header (first byte ``b0``) at ``o``; returns its length."""
    cdef int i
    o[0] = b0
    if n < 126:
        o[1] = <uint8_t>n
        return 2
    if n < 65536:
        o[1] = 126
        o[2] = (n >> 8) & 0xFF
        o[3] = n & 0xFF
        return 4
    o[1] = 127
    for i in range(8):
        o[2 + i] = (<uint64_t>n >> (56 - 8 * i)) & 0xFF
    return 10


def ws_encode(int opcode, payload, bint fin=True, mask=None, bint rsv1=False):
    cdef Py_buffer view
    cdef bytes out
    cdef uint8_t* o
    cdef Py_ssize_t n, hl, i
    cdef const uint8_t* m = NULL
    cdef bytes mb
    if opcode < 0 or opcode > 15:
        raise ValueError(f"opcode must be 0..15, got {opcode}")
    if mask is not None:
        mb = bytes(mask)
        if len(mb) != 4:
            raise ValueError("mask must be 4 bytes")
        m = <const uint8_t*>PyBytes_AS_STRING(mb)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        hl = _ws_head_len(n)
        if m != NULL:
            hl += 4
        out = PyBytes_FromStringAndSize(NULL, hl + n)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        i = _ws_put_head(o, (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode, n)
        if m != NULL:
            o[1] |= 0x80
            memcpy(o + i, m, 4)
            _unmask_copy(o + i + 4, <const uint8_t*>view.buf, n, m, 0)
        elif n:
            memcpy(o + i, view.buf, n)
        return out
    finally:
        PyBuffer_Release(&view)


def ws_inflate(payload, Py_ssize_t max_size, bint text=False):
    # A fresh raw-deflate decompressor per message: the peer was required not to take
    # its context over (client_no_context_takeover), so no state outlives a message.
    # Output stops one byte past max_size, which bounds the memory a zip bomb can take.
    cdef bytes out, more
    if max_size < 0:
        raise ValueError("max_size must be >= 0")
    d = _zlib.decompressobj(-15)
    try:
        out = d.decompress(payload, max_size + 1)
        if PyBytes_GET_SIZE(out) <= max_size:
            more = d.decompress(_DEFLATE_TAIL, max_size + 1 - PyBytes_GET_SIZE(out))
            if PyBytes_GET_SIZE(more):
                out += more
    except _zlib.error as e:
        raise WebSocketError(f"invalid permessage-deflate data ({e})", 1007) from None
    if PyBytes_GET_SIZE(out) > max_size:
        raise WebSocketError(f"message inflates to more than the maximum of {max_size} bytes",
                             1009)
    # Bytes after a final (BFINAL=1) block are ignored, as an inflater stops there: RFC
    # 7692 §7.2.3.4 itself ends such a message with a 0x00 that only the tail completes.
    if text:
        if not utf8_valid(out):
            raise WebSocketError("invalid UTF-8 in text message", 1007)
    return out


cdef class WSParser:
    """Streaming RFC 6455 parser (see _core.pyi)."""

    def __init__(self, Py_ssize_t max_message=DEFAULT_MAX_FRAME, bint client=False,
                 bint deflate=False):
        if max_message < 0:
            raise ValueError("max_message must be >= 0")
        self.max_message = max_message
        self.client = client
        self._deflate = deflate
        self._closed = False
        self.hdr_have = 0
        self.in_frame = False
        self.msg_opcode = 0
        self.single = None

    def __dealloc__(self):
        if self.msg != NULL:
            free(self.msg)
            self.msg = NULL

    @property
    def closed(self):
        return self._closed != 0

    @property
    def deflate(self):
        return self._deflate != 0

    @deflate.setter
    def deflate(self, bint value):
        self._deflate = value

    cdef int _grow_msg(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self.msg_len + extra
        cdef Py_ssize_t newcap
        cdef char* nb
        if want <= self.msg_cap:
            return 0
        newcap = self.msg_cap * 2
        if newcap < want:
            newcap = want
        if newcap < 256:
            newcap = 256
        if newcap > self.max_message and want <= self.max_message:
            newcap = self.max_message
        nb = <char*>realloc(self.msg, newcap)
        if nb == NULL:
            raise MemoryError()
        self.msg = nb
        self.msg_cap = newcap
        return 0

    cdef int _consume_payload(self, const uint8_t* p, Py_ssize_t n) except -1:
        # n <= f_left: the bytes of this frame still to come, counted before these
        cdef uint8_t* dst
        if self.target == _T_MSG:
            self._grow_msg(n)
            dst = <uint8_t*>self.msg + self.msg_len
            self.msg_len += n
        else:
            # a control frame or an unfragmented message: its own bytes object
            dst = (<uint8_t*>PyBytes_AS_STRING(self.single)
                   + PyBytes_GET_SIZE(self.single) - <Py_ssize_t>self.f_left)
        if self.f_masked:
            _unmask_copy(dst, p, n, self.mask, self.mask_pos)
            self.mask_pos = (self.mask_pos + n) & 3
        else:
            memcpy(dst, p, n)
        if self.target != _T_CTRL and self.msg_opcode == _OP_TEXT and not self.msg_deflate:
            if not _utf8_step(dst, n, &self.u_need, &self.u_lo, &self.u_hi):
                raise WebSocketError("invalid UTF-8 in text message", 1007)
        return 0

    cdef int _check_first_bytes(self, uint8_t b0, uint8_t b1) except -1:
        # the first two bytes decide most violations: fail before reading more
        cdef int op = b0 & 0x0F
        cdef uint8_t rsv = b0 & 0x70
        if rsv and (rsv != 0x40 or not self._deflate):
            raise WebSocketError("reserved bits set with no extension negotiated "
                                 "(RFC 6455 §5.2)", 1002)
        if not (op <= 2 or 8 <= op <= 10):
            raise WebSocketError(f"unknown opcode 0x{op:x} (RFC 6455 §5.2)", 1002)
        if rsv:
            if op >= 8:
                raise WebSocketError("RSV1 set on a control frame (RFC 7692 §6.1)", 1002)
            if op == _OP_CONT:
                raise WebSocketError("RSV1 set on a continuation frame (RFC 7692 §6.1)", 1002)
        if op >= 8 and not (b0 & 0x80):
            raise WebSocketError("fragmented control frame (RFC 6455 §5.5)", 1002)
        if op >= 8 and (b1 & 0x7F) > 125:
            raise WebSocketError("control frame payload over 125 bytes "
                                 "(RFC 6455 §5.5)", 1002)
        if self.client and (b1 & 0x80):
            raise WebSocketError("masked frame from server (RFC 6455 §5.1)", 1002)
        if not self.client and not (b1 & 0x80):
            raise WebSocketError("unmasked frame from client (RFC 6455 §5.1)", 1002)
        return 0

    cdef int _start_frame(self, list out) except -1:
        cdef uint64_t length = self.f_left
        cdef int op = self.f_b0 & 0x0F
        if length >> 63:
            raise WebSocketError("64-bit payload length has its most significant bit set "
                                 "(RFC 6455 §5.2)", 1002)
        self.mask_pos = 0
        if op >= 8:
            self.target = _T_CTRL
            self.single = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
        else:
            if op == _OP_CONT:
                if self.msg_opcode == 0:
                    raise WebSocketError("continuation frame with no message to continue "
                                         "(RFC 6455 §5.4)", 1002)
                if length > <uint64_t>(self.max_message - self.msg_len):
                    raise WebSocketError(f"message exceeds the maximum of {self.max_message} bytes", 1009)
                self.target = _T_MSG
            else:
                if self.msg_opcode != 0:
                    raise WebSocketError("new data frame inside an unfinished fragmented message "
                                         "(RFC 6455 §5.4)", 1002)
                if length > <uint64_t>self.max_message:
                    raise WebSocketError(f"message exceeds the maximum of {self.max_message} bytes", 1009)
                self.msg_opcode = op
                self.msg_deflate = (self.f_b0 & 0x40) != 0
                self.u_need = 0
                self.u_lo = 0x80
                self.u_hi = 0xBF
                if (self.f_b0 & 0x80) and length <= _SINGLE_MAX:
                    self.target = _T_SINGLE
                    self.single = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
                else:
                    self.target = _T_MSG
                    self.msg_len = 0
        self.in_frame = True
        if length == 0:
            self._end_frame(out)
        return 0

    cdef int _end_frame(self, list out) except -1:
        cdef bytes payload
        cdef int op = self.f_b0 & 0x0F
        self.in_frame = False
        self.hdr_have = 0
        if self.target == _T_CTRL:
            payload = self.single
            self.single = None
            if op == _OP_CLOSE:
                ws_parse_close(payload)
                self._closed = True
            out.append((op, payload))
            return 0
        if not (self.f_b0 & 0x80):
            return 0
        if self.msg_opcode == _OP_TEXT and not self.msg_deflate and self.u_need != 0:
            raise WebSocketError("text message ends inside a UTF-8 sequence", 1007)
        if self.target == _T_SINGLE:
            payload = self.single
            self.single = None
        else:
            payload = PyBytes_FromStringAndSize(self.msg, self.msg_len)
            self.msg_len = 0
            if self.msg_cap > _MSG_KEEP:
                free(self.msg)
                self.msg = NULL
                self.msg_cap = 0
        out.append(((self.msg_opcode | _OP_COMPRESSED) if self.msg_deflate else self.msg_opcode,
                    payload))
        self.msg_opcode = 0
        self.msg_deflate = False
        return 0

    def feed(self, data):
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t n, take
        cdef uint8_t b, len7
        cdef list out = []
        if self._closed:
            return out
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>view.buf
            n = view.len
            while n > 0 and not self._closed:
                if self.in_frame:
                    take = n
                    if <uint64_t>take > self.f_left:
                        take = <Py_ssize_t>self.f_left
                    self._consume_payload(p, take)
                    p += take
                    n -= take
                    self.f_left -= <uint64_t>take
                    if self.f_left == 0:
                        self._end_frame(out)
                    continue
                # the header, byte by byte (2 to 14 bytes): no buffer is kept for it
                b = p[0]
                p += 1
                n -= 1
                if self.hdr_have == 0:
                    self.f_b0 = b
                    self.hdr_have = 1
                    continue
                if self.hdr_have == 1:
                    self._check_first_bytes(self.f_b0, b)
                    self.f_masked = (b & 0x80) != 0
                    len7 = b & 0x7F
                    self.hdr_need = 2
                    if len7 == 126:
                        self.hdr_need += 2
                        self.f_left = 0
                    elif len7 == 127:
                        self.hdr_need += 8
                        self.f_left = 0
                    else:
                        self.f_left = len7
                    if self.f_masked:
                        self.hdr_need += 4
                    self.hdr_have = 2
                elif self.hdr_have < self.hdr_need - (4 if self.f_masked else 0):
                    self.f_left = (self.f_left << 8) | b   # extended length, big-endian
                    self.hdr_have += 1
                else:
                    self.mask[self.hdr_have - (self.hdr_need - 4)] = b
                    self.hdr_have += 1
                if self.hdr_have == self.hdr_need:
                    self._start_frame(out)
        except WebSocketError as e:
            # RFC 6455 §5.1 / §7.1.7: the messages and control frames completed before the
            # violation were valid and must still be handled (echoed) before the close that
            # fails the connection (Autobahn 3.2, 4.1.3, 5.15: "echo for first message is
            # received, then the connection is failed"). They ride on the error.
            self._closed = True
            self.single = None
            e.events = out
            raise
        except BaseException:
            self._closed = True
            self.single = None
            raise
        finally:
            PyBuffer_Release(&view)
        return out
