# WebSocket (RFC 6455) framing: a streaming parser and an encoder.
#
# The parser handles payload bytes as they arrive: it unmasks them straight into their
# destination (a small control buffer, a fresh bytes object for an unfragmented
# message, or the message buffer for a fragmented one) and runs the UTF-8 validator
# over text as it goes, so a bad byte fails the connection at once (Autobahn 6.4.*).

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

cdef enum:
    _T_CTRL = 0
    _T_SINGLE = 1
    _T_MSG = 2
    _SINGLE_MAX = 65536   # larger unfragmented messages grow a buffer as bytes arrive
    _MSG_KEEP = 4096      # message buffer kept between messages up to this size


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


def ws_encode(int opcode, payload, bint fin=True, mask=None):
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
        hl = 2 if n < 126 else (4 if n < 65536 else 10)
        if m != NULL:
            hl += 4
        out = PyBytes_FromStringAndSize(NULL, hl + n)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[0] = (0x80 if fin else 0) | opcode
        if n < 126:
            o[1] = <uint8_t>n
            i = 2
        elif n < 65536:
            o[1] = 126
            o[2] = (n >> 8) & 0xFF
            o[3] = n & 0xFF
            i = 4
        else:
            o[1] = 127
            for i in range(8):
                o[2 + i] = (<uint64_t>n >> (56 - 8 * i)) & 0xFF
            i = 10
        if m != NULL:
            o[1] |= 0x80
            memcpy(o + i, m, 4)
            _unmask_copy(o + i + 4, <const uint8_t*>view.buf, n, m, 0)
        elif n:
            memcpy(o + i, view.buf, n)
        return out
    finally:
        PyBuffer_Release(&view)


cdef class WSParser:
    """Streaming RFC 6455 parser (see _core.pyi)."""

    def __init__(self, Py_ssize_t max_message=DEFAULT_MAX_FRAME, bint client=False):
        if max_message < 0:
            raise ValueError("max_message must be >= 0")
        self.max_message = max_message
        self.client = client
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
        return self._closed

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
        cdef uint8_t* dst
        if self.target == _T_CTRL:
            dst = self.ctrl + self.ctrl_len
            self.ctrl_len += n
        elif self.target == _T_SINGLE:
            dst = <uint8_t*>PyBytes_AS_STRING(self.single) + self.single_len
            self.single_len += n
        else:
            self._grow_msg(n)
            dst = <uint8_t*>self.msg + self.msg_len
            self.msg_len += n
        if self.f_masked:
            _unmask_copy(dst, p, n, self.mask, self.mask_pos)
            self.mask_pos = (self.mask_pos + n) & 3
        else:
            memcpy(dst, p, n)
        if self.target != _T_CTRL and self.msg_opcode == OP_TEXT:
            if not _utf8_step(dst, n, &self.u_need, &self.u_lo, &self.u_hi):
                raise WebSocketError("invalid UTF-8 in text message", 1007)
        return 0

    cdef int _start_frame(self, list out) except -1:
        cdef Py_ssize_t i, pos = 2
        cdef uint64_t length = self.hdr[1] & 0x7F
        if length == 126:
            length = (<uint64_t>self.hdr[2] << 8) | self.hdr[3]
            pos = 4
        elif length == 127:
            length = 0
            for i in range(8):
                length = (length << 8) | self.hdr[2 + i]
            if length >> 63:
                raise WebSocketError("64-bit payload length has its most significant bit set "
                                     "(RFC 6455 §5.2)", 1002)
            pos = 10
        if self.f_masked:
            memcpy(self.mask, self.hdr + pos, 4)
        self.mask_pos = 0
        self.f_remaining = <Py_ssize_t>length if length < <uint64_t>0x7FFFFFFFFFFFFFFF else 0x7FFFFFFFFFFFFFFF
        self.f_len = self.f_remaining
        if self.f_opcode >= 8:
            self.target = _T_CTRL
            self.ctrl_len = 0
        else:
            if self.f_opcode == OP_CONT:
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
                self.msg_opcode = self.f_opcode
                self.u_need = 0
                self.u_lo = 0x80
                self.u_hi = 0xBF
                if self.f_fin and length <= _SINGLE_MAX:
                    self.target = _T_SINGLE
                    self.single = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
                    self.single_len = 0
                else:
                    self.target = _T_MSG
                    self.msg_len = 0
        self.in_frame = True
        if length == 0:
            self._end_frame(out)
        return 0

    cdef int _end_frame(self, list out) except -1:
        cdef bytes payload
        self.in_frame = False
        self.hdr_have = 0
        if self.target == _T_CTRL:
            payload = PyBytes_FromStringAndSize(<const char*>self.ctrl, self.ctrl_len)
            if self.f_opcode == OP_CLOSE:
                ws_parse_close(payload)
                self._closed = True
            out.append((self.f_opcode, payload))
            return 0
        if not self.f_fin:
            return 0
        if self.msg_opcode == OP_TEXT and self.u_need != 0:
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
        out.append((self.msg_opcode, payload))
        self.msg_opcode = 0
        return 0

    def feed(self, data):
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t n, take
        cdef uint8_t b0, b1
        cdef int op
        cdef list out = []
        if self._closed:
            return out
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>view.buf
            n = view.len
            while n > 0 and not self._closed:
                if self.in_frame:
                    take = self.f_remaining
                    if take > n:
                        take = n
                    self._consume_payload(p, take)
                    p += take
                    n -= take
                    self.f_remaining -= take
                    if self.f_remaining == 0:
                        self._end_frame(out)
                    continue
                if self.hdr_have < 2:
                    take = 2 - self.hdr_have
                    if take > n:
                        take = n
                    memcpy(self.hdr + self.hdr_have, p, take)
                    self.hdr_have += take
                    p += take
                    n -= take
                    if self.hdr_have < 2:
                        break
                    # the first two bytes decide most violations: fail before reading more
                    b0 = self.hdr[0]
                    b1 = self.hdr[1]
                    op = b0 & 0x0F
                    self.f_fin = (b0 & 0x80) != 0
                    self.f_opcode = op
                    self.f_masked = (b1 & 0x80) != 0
                    if b0 & 0x70:
                        raise WebSocketError("reserved bits set with no extension negotiated "
                                             "(RFC 6455 §5.2)", 1002)
                    if not (op <= 2 or 8 <= op <= 10):
                        raise WebSocketError(f"unknown opcode 0x{op:x} (RFC 6455 §5.2)", 1002)
                    if op >= 8 and not self.f_fin:
                        raise WebSocketError("fragmented control frame (RFC 6455 §5.5)", 1002)
                    if op >= 8 and (b1 & 0x7F) > 125:
                        raise WebSocketError("control frame payload over 125 bytes "
                                             "(RFC 6455 §5.5)", 1002)
                    if self.client and self.f_masked:
                        raise WebSocketError("masked frame from server (RFC 6455 §5.1)", 1002)
                    if not self.client and not self.f_masked:
                        raise WebSocketError("unmasked frame from client (RFC 6455 §5.1)", 1002)
                    self.hdr_need = 2
                    if (b1 & 0x7F) == 126:
                        self.hdr_need += 2
                    elif (b1 & 0x7F) == 127:
                        self.hdr_need += 8
                    if self.f_masked:
                        self.hdr_need += 4
                if self.hdr_have < self.hdr_need:
                    take = self.hdr_need - self.hdr_have
                    if take > n:
                        take = n
                    memcpy(self.hdr + self.hdr_have, p, take)
                    self.hdr_have += take
                    p += take
                    n -= take
                    if self.hdr_have < self.hdr_need:
                        break
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
