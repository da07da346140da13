# Incremental UTF-8 validation (RFC 3629 Table 3-7): per byte, either ASCII, or a lead
# byte that sets how many continuation bytes follow and the range the first of them
# must fall in (this excludes overlongs, surrogates and code points above U+10FFFF).
# The state (need, lo, hi) is kept between calls, so a text message is checked as its
# bytes arrive, across fragments and chunk boundaries, failing at the first bad byte.

cdef inline bint _utf8_step(const uint8_t* p, Py_ssize_t n,
                            int* need, uint8_t* lo, uint8_t* hi) noexcept nogil:
    """Advance the validator over n bytes; return False at the first invalid byte."""
    cdef Py_ssize_t i = 0
    cdef uint8_t b
    cdef uint64_t w
    while i < n:
        if need[0] == 0:
            # fast path: 8 ASCII bytes at a time
            while i + 8 <= n:
                memcpy(&w, p + i, 8)
                if w & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
            b = p[i]
            i += 1
            if b < 0x80:
                continue
            elif 0xC2 <= b <= 0xDF:
                need[0] = 1; lo[0] = 0x80; hi[0] = 0xBF
            elif b == 0xE0:
                need[0] = 2; lo[0] = 0xA0; hi[0] = 0xBF
            elif b == 0xED:
                need[0] = 2; lo[0] = 0x80; hi[0] = 0x9F
            elif 0xE1 <= b <= 0xEF:
                need[0] = 2; lo[0] = 0x80; hi[0] = 0xBF
            elif b == 0xF0:
                need[0] = 3; lo[0] = 0x90; hi[0] = 0xBF
            elif 0xF1 <= b <= 0xF3:
                need[0] = 3; lo[0] = 0x80; hi[0] = 0xBF
            elif b == 0xF4:
                need[0] = 3; lo[0] = 0x80; hi[0] = 0x8F
            else:
                return False
        else:
            b = p[i]
            i += 1
            if b < lo[0] or b > hi[0]:
                return False
            need[0] -= 1
            lo[0] = 0x80
            hi[0] = 0xBF
    return True


def utf8_valid(data):
    cdef Py_buffer view
    cdef int need = 0
    cdef uint8_t lo = 0x80, hi = 0xBF
    cdef bint ok
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        ok = _utf8_step(<const uint8_t*>view.buf, view.len, &need, &lo, &hi)
        return ok and need == 0
    finally:
        PyBuffer_Release(&view)
