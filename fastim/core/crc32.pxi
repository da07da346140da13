# CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), slice-by-8.
# Written here rather than linked from zlib so the wheel builds without zlib headers;
# tests check it against zlib.crc32.

cdef uint32_t _crc_table[8][256]


cdef void _crc_init() noexcept:
    cdef uint32_t c, i, k
    for i in range(256):
        c = i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ 0xEDB88320u
            else:
                c = c >> 1
        _crc_table[0][i] = c
    for i in range(256):
        for k in range(1, 8):
            _crc_table[k][i] = (_crc_table[k - 1][i] >> 8) ^ _crc_table[0][_crc_table[k - 1][i] & 0xFF]


_crc_init()


cdef inline uint32_t _load32le(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef uint32_t _crc32(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef uint32_t one, two
    crc = ~crc
    while n >= 8:
        one = _load32le(p) ^ crc
        two = _load32le(p + 4)
        crc = (_crc_table[7][one & 0xFF] ^ _crc_table[6][(one >> 8) & 0xFF]
               ^ _crc_table[5][(one >> 16) & 0xFF] ^ _crc_table[4][one >> 24]
               ^ _crc_table[3][two & 0xFF] ^ _crc_table[2][(two >> 8) & 0xFF]
               ^ _crc_table[1][(two >> 16) & 0xFF] ^ _crc_table[0][two >> 24])
        p += 8
        n -= 8
    while n > 0:
        crc = _crc_table[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return ~crc


def crc32(data, value=0):
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _crc32(<uint32_t>(value & 0xFFFFFFFF), <const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
