# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True, freethreading_compatible=False
"""fastim's compiled core. See _core.pyi for the documented API, docs/architecture.md for why.

One extension module built from several include files, one per part (as uvloop does):
framing and CRC32, the WebSocket codec, the outbound ring and its flusher, the
subscriber set that fans out, a channel message's encoding in every wire format, and
the per-channel history ring.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset

import logging
import zlib as _zlib  # ws_inflate: permessage-deflate, once per compressed message

from fastim.errors import (
    ChecksumMismatch,
    FrameTooLarge,
    ProtocolError,
    UnknownFrameType,
    WebSocketError,
)

_log = logging.getLogger("fastim")

include "core/crc32.pxi"
include "core/frames.pxi"
include "core/utf8.pxi"
include "core/websocket.pxi"
include "core/ring.pxi"
include "core/fanout.pxi"
include "core/encode.pxi"
include "core/delta.pxi"
include "core/history.pxi"
include "core/ratelimit.pxi"
