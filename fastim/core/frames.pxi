# fastim frames: u32 length, u8 type, u32 CRC32(payload), network byte order; then payload.

HEADER_SIZE = 9
DEFAULT_MAX_FRAME = 1 << 20


cdef inline uint32_t _load32be(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | (<uint32_t>p[3])


cdef inline void _store32be(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


def encode_frame(int ftype, payload):
    cdef Py_buffer view
    cdef bytes out
    cdef uint8_t* o
    if ftype < 0 or ftype > 255:
        raise ValueError(f"frame type must be 0..255, got {ftype}")
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if view.len > 0xFFFFFFFF:
            raise ValueError("payload longer than 2**32-1 bytes")
        out = PyBytes_FromStringAndSize(NULL, 9 + view.len)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        _store32be(o, <uint32_t>view.len)
        o[4] = <uint8_t>ftype
        _store32be(o + 5, _crc32(0, <const uint8_t*>view.buf, view.len))
        if view.len:
            memcpy(o + 9, view.buf, view.len)
        return out
    finally:
        PyBuffer_Release(&view)


# Normalised type tables, shared: every TCP connection has a decoder, and a 256-byte
# table per decoder was an eighth of an idle connection's memory.
cdef dict _type_tables = {}


cdef bytes _type_table(allowed_types):
    cdef bytes key
    cdef bytearray norm
    cdef Py_ssize_t i
    cdef const uint8_t[:] table
    if allowed_types is None:
        key = b""
    else:
        if len(allowed_types) != 256:
            raise ValueError("allowed_types must be a 256-byte table")
        key = bytes(allowed_types)
    found = _type_tables.get(key)
    if found is not None:
        return <bytes>found
    norm = bytearray(256)
    if allowed_types is None:
        for i in range(256):
            norm[i] = 1
    else:
        table = allowed_types
        for i in range(256):
            norm[i] = 1 if table[i] else 0
    if len(_type_tables) >= 64:  # callers use a handful of tables; bound it anyway
        _type_tables.clear()
    _type_tables[key] = bytes(norm)
    return <bytes>_type_tables[key]


cdef class FrameDecoder:
    """Streaming fastim frame decoder (see _core.pyi)."""

    def __init__(self, Py_ssize_t max_frame=DEFAULT_MAX_FRAME, allowed_types=None):
        if max_frame < 0:
            raise ValueError("max_frame must be >= 0")
        self.max_frame = max_frame
        self._table = _type_table(allowed_types)
        self.allowed = <const uint8_t*>PyBytes_AS_STRING(self._table)
        self.hdr_have = 0
        self.cur = None
        self.dead = None

    @property
    def buffered(self):
        if self.cur is not None:
            return 9 + self.cur_have
        return self.hdr_have

    cdef _die(self, exc):
        self.dead = exc
        self.cur = None
        raise exc

    def feed(self, data):
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t n
        cdef list out = []
        if self.allowed == NULL:
            raise RuntimeError("FrameDecoder.__init__ was not called")
        if self.dead is not None:
            raise type(self.dead)(*self.dead.args)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>view.buf
            n = view.len
            self._run(p, n, out)
        except ProtocolError as e:
            e.frames = out  # completed before the error: the caller handles them first
            raise
        finally:
            PyBuffer_Release(&view)
        return out

    cdef int _run(self, const uint8_t* p, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t take, length
        cdef uint32_t got
        cdef int ftype
        cdef bytes payload
        while n > 0:
            if self.cur is None:
                # --- header
                if self.hdr_have == 0 and n >= 9:
                    memcpy(self.hdr, p, 9)
                    p += 9
                    n -= 9
                else:
                    take = 9 - self.hdr_have
                    if take > n:
                        take = n
                    memcpy(self.hdr + self.hdr_have, p, take)
                    self.hdr_have += take
                    p += take
                    n -= take
                    if self.hdr_have < 9:
                        break
                self.hdr_have = 0
                length = _load32be(self.hdr)
                ftype = self.hdr[4]
                self.want_crc = _load32be(self.hdr + 5)
                if length > self.max_frame:
                    self._die(FrameTooLarge(
                        f"frame of {length} bytes exceeds the maximum of {self.max_frame}"))
                if not self.allowed[ftype]:
                    self._die(UnknownFrameType(f"unknown frame type 0x{ftype:02x}"))
                if length <= n:
                    # whole payload is here: one copy, straight into the result
                    got = _crc32(0, p, length)
                    if got != self.want_crc:
                        self._die(ChecksumMismatch(
                            f"checksum mismatch in frame type 0x{ftype:02x}: header says "
                            f"0x{self.want_crc:08x}, payload has 0x{got:08x}"))
                    out.append((ftype, PyBytes_FromStringAndSize(<const char*>p, length)))
                    p += length
                    n -= length
                    continue
                self.cur = PyBytes_FromStringAndSize(NULL, length)
                self.cur_len = length
                self.cur_have = 0
                self.cur_type = ftype
                self.cur_crc = 0
            # --- payload continues across chunks: CRC computed as bytes arrive
            take = self.cur_len - self.cur_have
            if take > n:
                take = n
            memcpy(PyBytes_AS_STRING(self.cur) + self.cur_have, p, take)
            self.cur_crc = _crc32(self.cur_crc, p, take)
            self.cur_have += take
            p += take
            n -= take
            if self.cur_have == self.cur_len:
                if self.cur_crc != self.want_crc:
                    self._die(ChecksumMismatch(
                        f"checksum mismatch in frame type 0x{self.cur_type:02x}: header says "
                        f"0x{self.want_crc:08x}, payload has 0x{self.cur_crc:08x}"))
                payload = self.cur
                self.cur = None
                out.append((self.cur_type, payload))
        return 0
