# Fossil delta compression (the format of Fossil SCM's delta.c, documented at
# https://fossil-scm.org/home/doc/trunk/www/delta_format.wiki), as Centrifugo uses it,
# so existing decoders (fossil-delta on npm, the Go and C ports) read what we make.
#
#   delta   := <target length> "\n" command* <checksum> ";"
#   command := <n> "@" <offset> ","      copy n bytes of the source from offset
#            | <n> ":" <n bytes>         insert these bytes
#   integers: base 64, most significant digit first, digits
#             0-9 A-Z _ a-z ~ (in that order: values 0..63)
#   checksum: the 32-bit sum of the target read as big-endian words (a short tail
#             word padded with zero bytes at the low end)
#
# The encoder is Fossil's algorithm, written from its description: the source is cut into
# 16-byte blocks indexed by a rolling hash; a rolling hash slides over the target, and
# where it meets a block the match is extended both ways; a copy is emitted when it costs
# fewer bytes than inserting what it covers. With the same inputs it gives Fossil's bytes
# (tests/core/test_delta.py checks the vectors of `fossil test-delta-create`).
#
# One addition, ``text=True`` (what the hub uses): copies start and end on UTF-8
# character boundaries of the target, so every inserted run is whole characters and a
# delta of UTF-8 text is itself UTF-8 text. A JSON client can then carry the delta in a
# JSON string and get its bytes back with a plain UTF-8 encode (docs/delta.md). On ASCII
# targets it changes nothing.
#
# Bounded work: the search walks at most 250 blocks per hash bucket per target position
# (as Fossil), so a delta costs O(len(target) * 250) at worst; callers bound the sizes
# (the hub skips messages over DELTA_MAX_INPUT), and apply refuses a delta announcing a
# target over ``max_size`` before allocating it.

cdef enum:
    _NHASH = 16                # the hash window and the source block size
    _CHAIN_LIMIT = 250         # blocks tried per target position (Fossil's limit)

#: the hub does not make deltas of messages (or against messages) larger than this
DELTA_MAX_INPUT = 1 << 20
#: the fastim frame type of a delta message (FrameType.DELTA in fastim/protocol.py)
DELTA_FRAME_TYPE = 0x25

cdef const char* _HEX = b"0123456789abcdef"
cdef const char* _B64 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"


cdef inline int _b64_value(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 90:
        return c - 55
    if c == 95:
        return 36
    if 97 <= c <= 122:
        return c - 60
    if c == 126:
        return 63
    return -1


cdef inline int _b64_digits(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 64:
        v >>= 6
        n += 1
    return n


cdef inline Py_ssize_t _put_b64(uint8_t* o, uint64_t v) noexcept nogil:
    cdef int n = _b64_digits(v)
    cdef int i = n
    while i > 0:
        i -= 1
        o[i] = <uint8_t>_B64[v & 63]
        v >>= 6
    return n


cdef uint32_t _fossil_checksum(const uint8_t* z, Py_ssize_t n) noexcept nogil:
    cdef uint32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0
    while n >= 4:
        s0 += z[0]
        s1 += z[1]
        s2 += z[2]
        s3 += z[3]
        z += 4
        n -= 4
    s3 += (s2 << 8) + (s1 << 16) + (s0 << 24)
    if n == 3:
        s3 += (<uint32_t>z[2]) << 8
    if n >= 2:
        s3 += (<uint32_t>z[1]) << 16
    if n >= 1:
        s3 += (<uint32_t>z[0]) << 24
    return s3


cdef struct _RHash:
    uint16_t a
    uint16_t b
    uint16_t i
    uint8_t z[_NHASH]


cdef inline void _rh_init(_RHash* h, const uint8_t* z) noexcept nogil:
    cdef uint16_t a = 0, b = 0
    cdef int i
    for i in range(_NHASH):
        a = <uint16_t>(a + z[i])
        b = <uint16_t>(b + (_NHASH - i) * z[i])
        h.z[i] = z[i]
    h.a = a
    h.b = b
    h.i = 0


cdef inline void _rh_next(_RHash* h, uint8_t c) noexcept nogil:
    cdef uint16_t old = h.z[h.i]
    h.z[h.i] = c
    h.i = (h.i + 1) & (_NHASH - 1)
    h.a = <uint16_t>(h.a - old + c)
    h.b = <uint16_t>(h.b - _NHASH * old + h.a)


cdef inline uint32_t _rh_value(_RHash* h) noexcept nogil:
    return (<uint32_t>h.a) | ((<uint32_t>h.b) << 16)


cdef inline Py_ssize_t _put_insert(uint8_t* o, const uint8_t* d, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k = _put_b64(o, <uint64_t>n)
    o[k] = 58  # ':'
    k += 1
    memcpy(o + k, d, n)
    return k + n


cdef inline bint _cont(uint8_t c) noexcept nogil:
    """A UTF-8 continuation byte (not the start of a character)."""
    return (c & 0xC0) == 0x80


cdef Py_ssize_t _fossil_create(const uint8_t* src, Py_ssize_t lenSrc,
                               const uint8_t* dst, Py_ssize_t lenOut,
                               uint8_t* o, bint text, int* landmark, int* collide) noexcept nogil:
    """Write the delta at ``o`` (room for lenOut + 64 bytes); return its length.

    ``landmark``/``collide``: scratch of ceil(lenSrc / 16) ints each (lenSrc > 16)."""
    cdef Py_ssize_t p = 0, base = 0, i, j, k, x, y
    cdef Py_ssize_t nHash, iSrc, cnt, ofst, litsz, sz, start, end
    cdef Py_ssize_t bestCnt, bestOfst, bestLitsz
    cdef int iBlock, limit
    cdef uint32_t hv
    cdef _RHash h
    p += _put_b64(o + p, <uint64_t>lenOut)
    o[p] = 10  # '\n'
    p += 1
    if lenSrc <= _NHASH:
        # too short to hold a block: the whole target as one insert
        p += _put_insert(o + p, dst, lenOut)
        p += _put_b64(o + p, _fossil_checksum(dst, lenOut))
        o[p] = 59  # ';'
        return p + 1
    nHash = lenSrc // _NHASH
    if lenSrc % _NHASH:
        nHash += 1
    for i in range(nHash):
        landmark[i] = -1
        collide[i] = -1
    i = 0
    while i < lenSrc - _NHASH:
        _rh_init(&h, src + i)
        hv = _rh_value(&h) % <uint32_t>nHash
        collide[i // _NHASH] = landmark[hv]
        landmark[hv] = <int>(i // _NHASH)
        i += _NHASH
    while base + _NHASH < lenOut:
        bestOfst = 0
        bestLitsz = 0
        bestCnt = 0
        _rh_init(&h, dst + base)
        i = 0  # the window starts at dst[base + i]
        while True:
            limit = _CHAIN_LIMIT
            hv = _rh_value(&h) % <uint32_t>nHash
            iBlock = landmark[hv]
            while iBlock >= 0 and limit > 0:
                limit -= 1
                iSrc = <Py_ssize_t>iBlock * _NHASH
                # forwards from src[iSrc] / dst[base + i]
                j = 0
                x = iSrc
                y = base + i
                while x < lenSrc and y < lenOut and src[x] == dst[y]:
                    j += 1
                    x += 1
                    y += 1
                j -= 1
                # backwards from the byte before (Fossil stops one short of src[0])
                k = 1
                while k < iSrc and k <= i and src[iSrc - k] == dst[base + i - k]:
                    k += 1
                k -= 1
                ofst = iSrc - k
                cnt = j + k + 1
                litsz = i - k
                if text and cnt > 0:
                    # whole characters only: start and end on boundaries of dst
                    start = base + litsz
                    while cnt > 0 and _cont(dst[start]):
                        start += 1
                        ofst += 1
                        litsz += 1
                        cnt -= 1
                    end = start + cnt
                    while cnt > 0 and end < lenOut and _cont(dst[end]):
                        end -= 1
                        cnt -= 1
                # bytes the insert header and the copy command cost, without the text
                sz = (_b64_digits(<uint64_t>litsz) + _b64_digits(<uint64_t>cnt)
                      + _b64_digits(<uint64_t>ofst) + 3)
                if cnt >= sz and cnt > bestCnt:
                    bestCnt = cnt
                    bestOfst = ofst
                    bestLitsz = litsz
                iBlock = collide[iBlock]
            if bestCnt > 0:
                if bestLitsz > 0:
                    p += _put_insert(o + p, dst + base, bestLitsz)
                    base += bestLitsz
                base += bestCnt
                p += _put_b64(o + p, <uint64_t>bestCnt)
                o[p] = 64  # '@'
                p += 1
                p += _put_b64(o + p, <uint64_t>bestOfst)
                o[p] = 44  # ','
                p += 1
                break
            if base + i + _NHASH >= lenOut:
                # no match to the end: insert the rest
                p += _put_insert(o + p, dst + base, lenOut - base)
                base = lenOut
                break
            _rh_next(&h, dst[base + i + _NHASH])
            i += 1
    if base < lenOut:
        p += _put_insert(o + p, dst + base, lenOut - base)
    p += _put_b64(o + p, _fossil_checksum(dst, lenOut))
    o[p] = 59  # ';'
    return p + 1


def fossil_delta(src, dst, bint text=False):
    cdef Py_buffer vs, vd
    cdef Py_ssize_t n, nHash
    cdef uint8_t* o = NULL
    cdef int* tables = NULL
    PyObject_GetBuffer(src, &vs, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(dst, &vd, PyBUF_SIMPLE)
        try:
            if vd.len > 0xFFFFFFFF or vs.len > 0x7FFFFFFF:
                raise ValueError("fossil_delta: input over the format's limits")
            nHash = vs.len // _NHASH + 1
            o = <uint8_t*>malloc(vd.len + 64)
            tables = <int*>malloc(2 * nHash * sizeof(int))
            if o == NULL or tables == NULL:
                raise MemoryError()
            with nogil:
                n = _fossil_create(<const uint8_t*>vs.buf, vs.len, <const uint8_t*>vd.buf,
                                   vd.len, o, text, tables, tables + nHash)
            return PyBytes_FromStringAndSize(<char*>o, n)
        finally:
            PyBuffer_Release(&vd)
    finally:
        PyBuffer_Release(&vs)
        free(o)
        free(tables)


cdef inline int _get_int(const uint8_t* d, Py_ssize_t n, Py_ssize_t* pos, uint64_t* out) noexcept nogil:
    """A base-64 integer at d[pos]; 0 if there is no digit or it overflows 32 bits."""
    cdef uint64_t v = 0
    cdef int c, digits = 0
    while pos[0] < n:
        c = _b64_value(d[pos[0]])
        if c < 0:
            break
        v = (v << 6) | <uint64_t>c
        if v > <uint64_t>0xFFFFFFFFU:
            return 0
        pos[0] += 1
        digits += 1
    out[0] = v
    return digits > 0


def fossil_apply(src, delta, Py_ssize_t max_size=DELTA_MAX_INPUT * 64):
    cdef Py_buffer vs, vd
    cdef const uint8_t* s
    cdef const uint8_t* d
    cdef Py_ssize_t ns, nd, pos = 0, total = 0
    cdef uint64_t limit, cnt, ofst
    cdef uint8_t op
    cdef bytes out = None
    cdef uint8_t* o
    PyObject_GetBuffer(src, &vs, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(delta, &vd, PyBUF_SIMPLE)
        try:
            s = <const uint8_t*>vs.buf
            ns = vs.len
            d = <const uint8_t*>vd.buf
            nd = vd.len
            if not _get_int(d, nd, &pos, &limit) or pos >= nd or d[pos] != 10:
                raise ValueError("delta: the target size is not terminated by a newline")
            pos += 1
            if limit > <uint64_t>max_size:
                raise ValueError(f"delta: a target of {limit} bytes is over {max_size}")
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>limit)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            while pos < nd:
                if not _get_int(d, nd, &pos, &cnt) or pos >= nd:
                    raise ValueError("delta: a command without a count")
                op = d[pos]
                pos += 1
                if op == 64:  # '@'
                    if not _get_int(d, nd, &pos, &ofst) or pos >= nd or d[pos] != 44:
                        raise ValueError("delta: copy command not terminated by ','")
                    pos += 1
                    if total + <Py_ssize_t>cnt > <Py_ssize_t>limit:
                        raise ValueError("delta: copy exceeds the target size")
                    if ofst + cnt > <uint64_t>ns:
                        raise ValueError("delta: copy extends past the end of the source")
                    memcpy(o + total, s + ofst, cnt)
                    total += cnt
                elif op == 58:  # ':'
                    if total + <Py_ssize_t>cnt > <Py_ssize_t>limit:
                        raise ValueError("delta: insert exceeds the target size")
                    if cnt > <uint64_t>(nd - pos):
                        raise ValueError("delta: insert extends past the end of the delta")
                    memcpy(o + total, d + pos, cnt)
                    total += cnt
                    pos += cnt
                elif op == 59:  # ';'
                    if total != <Py_ssize_t>limit:
                        raise ValueError("delta: the target is shorter than announced")
                    if <uint64_t>_fossil_checksum(o, total) != cnt:
                        raise ValueError("delta: bad checksum")
                    return out
                else:
                    raise ValueError(f"delta: unknown command {chr(op)!r}")
            raise ValueError("delta: unterminated (no checksum)")
        finally:
            PyBuffer_Release(&vd)
    finally:
        PyBuffer_Release(&vs)


cdef Py_ssize_t _json_str_len(const uint8_t* d, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, out = 2
    cdef uint8_t c
    for i in range(n):
        c = d[i]
        if c == 34 or c == 92 or c == 8 or c == 9 or c == 10 or c == 12 or c == 13:
            out += 2
        elif c < 0x20:
            out += 6
        else:
            out += 1
    return out


cdef Py_ssize_t _put_json_str(uint8_t* o, const uint8_t* d, Py_ssize_t n) noexcept nogil:
    """``d`` (UTF-8) as a JSON string: quotes, backslashes and controls escaped."""
    cdef Py_ssize_t i, p = 1
    cdef uint8_t c
    o[0] = 34
    for i in range(n):
        c = d[i]
        if c >= 0x20 and c != 34 and c != 92:
            o[p] = c
            p += 1
            continue
        o[p] = 92
        if c == 34 or c == 92:
            o[p + 1] = c
        elif c == 10:
            o[p + 1] = 110  # n
        elif c == 13:
            o[p + 1] = 114  # r
        elif c == 9:
            o[p + 1] = 116  # t
        elif c == 8:
            o[p + 1] = 98   # b
        elif c == 12:
            o[p + 1] = 102  # f
        else:
            o[p + 1] = 117  # u00XX
            o[p + 2] = 48
            o[p + 3] = 48
            o[p + 4] = <uint8_t>_HEX[c >> 4]
            o[p + 5] = <uint8_t>_HEX[c & 15]
            p += 6
            continue
        p += 2
    o[p] = 34
    return p + 1


# between the offset and the delta of a JSON delta message
cdef const char* _JSON_DELTA = b',"delta":true,"data":'
cdef Py_ssize_t _JSON_DELTA_LEN = 21


def encode_delta(SubscriberSet subs not None, uint64_t offset, bytes channel not None,
                 bytes json_head not None, delta):
    cdef Py_buffer view
    cdef const uint8_t* d
    cdef Py_ssize_t dn, chn, flen, tlen, sn, headn
    cdef int digits, need = 0
    cdef uint8_t lo = 0x80, hi = 0xBF
    cdef Py_ssize_t n_bin = (subs.alt_counts[WF_TCP] + subs.alt_counts[WF_WS_BINARY]
                             + subs.alt_counts[WF_WS_BINARY_DEFLATE])
    cdef Py_ssize_t n_js = subs.alt_counts[WF_WS_JSON] + subs.alt_counts[WF_WS_JSON_DEFLATE]
    cdef bytes frame = None
    cdef bytes wsb = None
    cdef bytes js = None
    cdef uint8_t* o
    PyObject_GetBuffer(delta, &view, PyBUF_SIMPLE)
    try:
        d = <const uint8_t*>view.buf
        dn = view.len
        if n_bin:
            chn = PyBytes_GET_SIZE(channel)
            flen = _msg_frame_len(chn, dn)
            frame = PyBytes_FromStringAndSize(NULL, flen)
            o = <uint8_t*>PyBytes_AS_STRING(frame)
            _put_msg_frame(o, offset, PyBytes_AS_STRING(channel), chn, <const char*>d, dn)
            o[4] = DELTA_FRAME_TYPE  # the CRC covers the payload only
            if subs.alt_counts[WF_WS_BINARY] or subs.alt_counts[WF_WS_BINARY_DEFLATE]:
                wsb = PyBytes_FromStringAndSize(NULL, _ws_head_len(flen) + flen)
                o = <uint8_t*>PyBytes_AS_STRING(wsb)
                o += _ws_put_head(o, _B0_BINARY, flen)
                memcpy(o, PyBytes_AS_STRING(frame), flen)
        # JSON: only a delta that is UTF-8 (text=True deltas of UTF-8 data always are);
        # otherwise those subscribers get the full message (fanout falls back to it)
        if n_js and _utf8_step(d, dn, &need, &lo, &hi) and need == 0:
            digits = _dec_len(offset)
            headn = PyBytes_GET_SIZE(json_head)
            sn = _json_str_len(d, dn)
            tlen = headn + digits + _JSON_DELTA_LEN + sn + 1
            js = PyBytes_FromStringAndSize(NULL, _ws_head_len(tlen) + tlen)
            o = <uint8_t*>PyBytes_AS_STRING(js)
            o += _ws_put_head(o, _B0_TEXT, tlen)
            memcpy(o, PyBytes_AS_STRING(json_head), headn)
            o += headn
            _put_dec(o, offset, digits)
            o += digits
            memcpy(o, _JSON_DELTA, _JSON_DELTA_LEN)
            o += _JSON_DELTA_LEN
            o += _put_json_str(o, d, dn)
            o[0] = 0x7D  # }
    finally:
        PyBuffer_Release(&view)
    return (frame if subs.alt_counts[WF_TCP] else None, wsb, js, wsb, js)


def json_string(data):
    cdef Py_buffer view
    cdef bytes out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, _json_str_len(<const uint8_t*>view.buf, view.len))
        _put_json_str(<uint8_t*>PyBytes_AS_STRING(out), <const uint8_t*>view.buf, view.len)
        return out
    finally:
        PyBuffer_Release(&view)
