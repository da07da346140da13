# A channel message in every wire format its subscribers use, built in one pass.
#
# Each format's bytes object is allocated at its final size and written once: headers in
# place, the data copied straight in, the CRC32 computed once (a WebSocket binary frame
# is a header and the fastim frame, copied from it): one copy of the data per format. The
# Python path this replaced (pack_msg, encode_frame, ws_encode, a join: the reference in
# fastim/_pyref/encode.py) built intermediate bytes objects and copied the data five
# times for the three plain formats, in five Python calls and a dozen objects.
# permessage-deflate stays in Python (hub.Deflater: one zlib stream for the node,
# compressing each message once), called from here with the bytes to compress.
#
# The byte layouts (docs/protocol.md):
#   fastim MSG frame   u32 length, u8 type 0x23, u32 CRC32(payload);
#                      payload: u64 offset, u8 len(channel), channel, data
#   WebSocket binary   RFC 6455 header (FIN, opcode 2, unmasked), the fastim MSG frame
#   JSON               {"op":"msg","ch":<channel as JSON>,"off":<offset>,"data":<data>}
#                      (``json_head`` is everything up to the offset, per channel)
#   WebSocket text     RFC 6455 header (FIN, opcode 1, unmasked), the JSON
#   SSE                ``data: `` + the JSON + ``\n\n`` (one Server-Sent Event; the HTTP
#                      streaming fallback uses the same framing), the data's raw CR and LF
#                      bytes (JSON whitespace, never inside a string) turned into spaces:
#                      a line break would end the ``data:`` field

cdef enum:
    _FT_MSG = 0x23        # FrameType.MSG (fastim/protocol.py; tests/core/test_encode.py checks)
    _MSG_HEAD = 9         # the MSG payload's own header: u64 offset, u8 channel length
    _B0_BINARY = 0x82     # FIN | OP_BINARY
    _B0_TEXT = 0x81       # FIN | OP_TEXT

MSG_FRAME_TYPE = _FT_MSG

# between the offset and the data of a JSON message
cdef const char* _JSON_DATA = b',"data":'
cdef Py_ssize_t _JSON_DATA_LEN = 8


cdef inline int _dec_len(uint64_t v) noexcept nogil:
    """Decimal digits of ``v``."""
    cdef int n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline void _put_dec(uint8_t* o, uint64_t v, int n) noexcept nogil:
    """``v`` in decimal, ``n`` (= _dec_len(v)) digits at ``o``."""
    while n > 0:
        n -= 1
        o[n] = <uint8_t>(48 + v % 10)
        v //= 10


cdef inline void _put_msg_frame(uint8_t* o, uint64_t offset, const char* ch, Py_ssize_t chn,
                                const char* d, Py_ssize_t dn) noexcept nogil:
    """The fastim MSG frame, 9 + 9 + chn + dn bytes at ``o`` (chn <= 255)."""
    cdef uint8_t* p = o + 9
    cdef Py_ssize_t plen = _MSG_HEAD + chn + dn
    cdef int i
    _store32be(o, <uint32_t>plen)
    o[4] = _FT_MSG
    for i in range(8):
        p[i] = (offset >> (56 - 8 * i)) & 0xFF
    p[8] = <uint8_t>chn
    if chn:
        memcpy(p + _MSG_HEAD, ch, chn)
    if dn:
        memcpy(p + _MSG_HEAD + chn, d, dn)
    _store32be(o + 5, _crc32(0, p, plen))


cdef inline void _put_json(uint8_t* o, const char* head, Py_ssize_t headn, uint64_t offset,
                           int digits, const char* d, Py_ssize_t dn) noexcept nogil:
    """``head`` + offset + ``,"data":`` + data + ``}`` at ``o``."""
    memcpy(o, head, headn)
    o += headn
    _put_dec(o, offset, digits)
    o += digits
    memcpy(o, _JSON_DATA, _JSON_DATA_LEN)
    o += _JSON_DATA_LEN
    if dn:
        memcpy(o, d, dn)
    o[dn] = 0x7D  # }


cdef inline Py_ssize_t _msg_frame_len(Py_ssize_t chn, Py_ssize_t dn) except -1:
    if chn > 255:
        raise ValueError(f"channel name of {chn} bytes: at most 255 fit a MSG frame")
    if _MSG_HEAD + chn + dn > 0xFFFFFFFF:
        raise ValueError("payload longer than 2**32-1 bytes")
    return 9 + _MSG_HEAD + chn + dn


cdef bytes _msg_tcp(uint64_t offset, bytes channel, const char* d, Py_ssize_t dn):
    cdef Py_ssize_t chn = PyBytes_GET_SIZE(channel)
    cdef Py_ssize_t flen = _msg_frame_len(chn, dn)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, flen)
    _put_msg_frame(<uint8_t*>PyBytes_AS_STRING(out), offset, PyBytes_AS_STRING(channel), chn,
                   d, dn)
    return out


cdef bytes _msg_ws_binary(uint64_t offset, bytes channel, const char* d, Py_ssize_t dn,
                          bytes frame):
    """The MSG frame in a WebSocket binary frame: copied from ``frame`` if given."""
    cdef Py_ssize_t chn = PyBytes_GET_SIZE(channel)
    cdef Py_ssize_t flen = _msg_frame_len(chn, dn)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _ws_head_len(flen) + flen)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    o += _ws_put_head(o, _B0_BINARY, flen)
    if frame is not None:
        memcpy(o, PyBytes_AS_STRING(frame), flen)
    else:
        _put_msg_frame(o, offset, PyBytes_AS_STRING(channel), chn, d, dn)
    return out


cdef inline Py_ssize_t _json_len(uint64_t offset, bytes json_head, Py_ssize_t dn) noexcept:
    return PyBytes_GET_SIZE(json_head) + _dec_len(offset) + _JSON_DATA_LEN + dn + 1


cdef bytes _msg_ws_json(uint64_t offset, bytes json_head, const char* d, Py_ssize_t dn):
    cdef int digits = _dec_len(offset)
    cdef Py_ssize_t headn = PyBytes_GET_SIZE(json_head)
    cdef Py_ssize_t tlen = _json_len(offset, json_head, dn)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _ws_head_len(tlen) + tlen)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    o += _ws_put_head(o, _B0_TEXT, tlen)
    _put_json(o, PyBytes_AS_STRING(json_head), headn, offset, digits, d, dn)
    return out


cdef const char* _SSE_HEAD = b"data: "
cdef Py_ssize_t _SSE_HEAD_LEN = 6


cdef bytes _msg_sse(uint64_t offset, bytes json_head, const char* d, Py_ssize_t dn):
    """The JSON message as one SSE event: ``data: <json>\\n\\n``."""
    cdef int digits = _dec_len(offset)
    cdef Py_ssize_t headn = PyBytes_GET_SIZE(json_head)
    cdef Py_ssize_t tlen = _json_len(offset, json_head, dn)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _SSE_HEAD_LEN + tlen + 2)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    cdef uint8_t* p
    cdef Py_ssize_t i
    memcpy(o, _SSE_HEAD, _SSE_HEAD_LEN)
    o += _SSE_HEAD_LEN
    _put_json(o, PyBytes_AS_STRING(json_head), headn, offset, digits, d, dn)
    p = o + headn + digits + _JSON_DATA_LEN
    for i in range(dn):
        if p[i] == 0x0A or p[i] == 0x0D:
            p[i] = 0x20
    o[tlen] = 0x0A
    o[tlen + 1] = 0x0A
    return out


def encode_msg(SubscriberSet subs not None, uint64_t offset, bytes channel not None,
               bytes json_head not None, data, deflater=None):
    cdef Py_buffer view
    cdef const char* d
    cdef Py_ssize_t dn
    cdef Py_ssize_t n_tcp = subs.counts[WF_TCP]
    cdef Py_ssize_t n_wsb = subs.counts[WF_WS_BINARY]
    cdef Py_ssize_t n_js = subs.counts[WF_WS_JSON]
    cdef Py_ssize_t n_wsbz = subs.counts[WF_WS_BINARY_DEFLATE]
    cdef Py_ssize_t n_jsz = subs.counts[WF_WS_JSON_DEFLATE]
    cdef Py_ssize_t n_sse = subs.counts[WF_SSE]
    cdef bint plain_z = deflater is None   # deflate formats take the plain frames
    cdef bytes frame = None
    cdef bytes wsb = None
    cdef bytes js = None
    cdef bytes sse = None
    wsbz = jsz = None
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        d = <const char*>view.buf
        dn = view.len
        if n_tcp or (n_wsbz and not plain_z):
            frame = _msg_tcp(offset, channel, d, dn)
        if n_wsb or (n_wsbz and plain_z):
            wsb = _msg_ws_binary(offset, channel, d, dn, frame)
        if n_js or n_jsz:
            js = _msg_ws_json(offset, json_head, d, dn)
        if n_sse:
            sse = _msg_sse(offset, json_head, d, dn)
    finally:
        PyBuffer_Release(&view)
    if not (n_wsbz or n_jsz or n_sse):
        return frame if n_tcp else None, wsb, js
    if n_wsbz:
        # the deflater compresses the fastim frame once for every such subscriber, or
        # answers with the plain frame (built here if there was one, else by it)
        wsbz = wsb if plain_z else deflater.frame(OP_BINARY, frame, wsb)
    if n_jsz:
        # the same for the JSON text: the payload of the plain frame, which is the answer
        # when compressing does not pay
        jsz = js if plain_z else deflater.frame(
            OP_TEXT, memoryview(js)[PyBytes_GET_SIZE(js) - _json_len(offset, json_head, dn):],
            js)
    if n_sse:
        return (frame if n_tcp else None, wsb if n_wsb else None, js if n_js else None, wsbz,
                jsz, sse)
    return frame if n_tcp else None, wsb if n_wsb else None, js if n_js else None, wsbz, jsz


def encode_msg_one(int fmt, uint64_t offset, bytes channel not None, bytes json_head not None,
                   data):
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if fmt == WF_TCP:
            return _msg_tcp(offset, channel, <const char*>view.buf, view.len)
        if fmt == WF_WS_BINARY or fmt == WF_WS_BINARY_DEFLATE:
            return _msg_ws_binary(offset, channel, <const char*>view.buf, view.len, None)
        if fmt == WF_SSE:
            return _msg_sse(offset, json_head, <const char*>view.buf, view.len)
        return _msg_ws_json(offset, json_head, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
