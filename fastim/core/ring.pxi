# The outbound ring of a connection and the flusher that drains dirty rings once per tick.

# The wire formats, for Python: the C constants (and their number) are in _core.pxd
FMT_TCP = WF_TCP
FMT_WS_BINARY = WF_WS_BINARY
FMT_WS_JSON = WF_WS_JSON
FMT_WS_BINARY_DEFLATE = WF_WS_BINARY_DEFLATE
FMT_WS_JSON_DEFLATE = WF_WS_JSON_DEFLATE
FMT_SSE = WF_SSE
N_FORMATS = N_FMT

DEFAULT_RING_CAP = 4 * 1024 * 1024

# Ring buffers are powers of two; emptied ones wait in the flusher's pool for the next
# tick instead of going back to malloc (free + malloc of every ring's buffer every tick
# were ~10% of a saturated node's CPU: docs/performance.md). The size classes,
# POOL_MIN_SHIFT and POOL_CLASSES, are C constants in _core.pxd.
DEFAULT_POOL_LIMIT = 32 * 1024 * 1024

# A broadcast frame is copied once per tick into the flusher's arena of its format, and
# the subscribers' rings refer to it (OutRing._share) instead of each copying it: the
# copies were a quarter of a saturated node's CPU (1,000 subscribers, 64 publishes per
# tick: 64,000 memcpy into 1,000 buffers that do not fit the cache). Offsets are C ints;
# the sizes, ARENA_MIN, ARENA_KEEP and ARENA_MAX, are C constants in _core.pxd.


cdef inline int _pool_class(Py_ssize_t cap) noexcept:
    """The size class of a power-of-two capacity, or -1 if the pool does not keep it."""
    cdef int c = 0
    cdef Py_ssize_t size = 1 << POOL_MIN_SHIFT
    while c < POOL_CLASSES:
        if size == cap:
            return c
        size <<= 1
        c += 1
    return -1


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR


cdef class Flusher:
    """Drains dirty OutRings once per loop tick (see _core.pyi)."""

    def __init__(self, schedule=None):
        self.dirty = []
        self.schedule = schedule
        self._flush_cb = self.flush
        self.scheduled = False
        self.writes = 0
        self.bytes_written = 0
        self.pool_limit = DEFAULT_POOL_LIMIT

    def __dealloc__(self):
        cdef int c
        cdef Py_ssize_t i
        for c in range(N_FMT):
            free(self.arena[c])
            self.arena[c] = NULL
        for c in range(POOL_CLASSES):
            if self.pool[c] != NULL:
                for i in range(self.pool_n[c]):
                    free(self.pool[c][i])
                free(self.pool[c])
                self.pool[c] = NULL
            self.pool_n[c] = 0
        self.pool_bytes = 0

    cdef char* _get(self, Py_ssize_t cap) noexcept:
        """A pooled buffer of exactly ``cap`` bytes, else a new one (NULL: out of memory)."""
        cdef int c = _pool_class(cap)
        if c >= 0 and self.pool_n[c] > 0:
            self.pool_n[c] -= 1
            self.pool_bytes -= cap
            return self.pool[c][self.pool_n[c]]
        return <char*>malloc(cap)

    cdef void _put(self, char* buf, Py_ssize_t cap) noexcept:
        """Keep ``buf`` for reuse if the pool has room, else free it."""
        cdef int c = _pool_class(cap)
        cdef Py_ssize_t newcap
        cdef char** items
        if c < 0 or self.pool_bytes + cap > self.pool_limit:
            free(buf)
            return
        if self.pool_n[c] == self.pool_cap[c]:
            newcap = self.pool_cap[c] * 2 if self.pool_cap[c] else 64
            items = <char**>realloc(self.pool[c], newcap * sizeof(char*))
            if items == NULL:
                free(buf)
                return
            self.pool[c] = items
            self.pool_cap[c] = newcap
        self.pool[c][self.pool_n[c]] = buf
        self.pool_n[c] += 1
        self.pool_bytes += cap

    cdef Py_ssize_t _stash(self, int f, const char* p, Py_ssize_t n) noexcept:
        """Copy a broadcast frame of format ``f`` into this tick's arena: its offset
        there, or -1 (no memory, or past what a ring's int offsets address: the caller
        copies into each ring as before)."""
        cdef Py_ssize_t need = self.arena_len[f] + n
        cdef Py_ssize_t cap
        cdef char* nb
        cdef Py_ssize_t off
        if self.flushing or need > ARENA_MAX:
            return -1
        if need > self.arena_cap[f]:
            cap = self.arena_cap[f] * 2 if self.arena_cap[f] else ARENA_MIN
            while cap < need:
                cap *= 2
            nb = <char*>realloc(self.arena[f], cap)
            if nb == NULL:
                return -1
            self.arena[f] = nb
            self.arena_cap[f] = cap
        off = self.arena_len[f]
        memcpy(self.arena[f] + off, p, n)
        self.arena_len[f] = need
        return off

    cdef void _arena_reset(self) noexcept:
        """After a flush: no ring refers to the arenas any more (each either sent its
        run or copied what is left into its own buffer), so they start over; one that
        grew past ARENA_KEEP (a burst) is freed rather than kept."""
        cdef int f
        for f in range(N_FMT):
            self.arena_len[f] = 0
            if self.arena_cap[f] > ARENA_KEEP:
                free(self.arena[f])
                self.arena[f] = NULL
                self.arena_cap[f] = 0

    @property
    def arena_bytes(self):
        """Bytes of broadcast frames held for rings since the last flush."""
        cdef int f
        cdef Py_ssize_t total = 0
        for f in range(N_FMT):
            total += self.arena_len[f]
        return total

    def trim_pool(self):
        """Free every pooled buffer (the pool refills under load)."""
        cdef int c
        cdef Py_ssize_t i
        for c in range(POOL_CLASSES):
            for i in range(self.pool_n[c]):
                free(self.pool[c][i])
            self.pool_n[c] = 0
        self.pool_bytes = 0

    @property
    def pending(self):
        return len(self.dirty)

    cdef inline void _mark(self, OutRing ring) noexcept:
        self.dirty.append(ring)
        if not self.scheduled and self.schedule is not None:
            self.scheduled = True
            try:
                self.schedule(self._flush_cb)
            except BaseException:
                self.scheduled = False
                _log.exception("fastim: could not schedule a flush")

    def flush(self):
        cdef list batch = self.dirty
        self.dirty = []
        self.scheduled = False
        if self.flushing:
            # called from a callback of a flush: its rings were dirtied meanwhile, when
            # no reference is taken (copies); the outer flush empties the arenas
            return self._flush(batch)
        self.flushing = True
        try:
            return self._flush(batch)
        finally:
            # what a ring did not send (paused, or a callback's doing) it copies now:
            # then nothing refers to the arenas, and they start over
            for ring in batch:
                if (<OutRing>ring).rlen:
                    (<OutRing>ring)._materialize()
            self.flushing = False
            self._arena_reset()

    cdef Py_ssize_t _flush(self, list batch) except -1:
        cdef OutRing ring
        cdef bytes data
        cdef Py_ssize_t writes = 0
        cdef Py_ssize_t sent
        cdef bint direct
        for ring in batch:
            if ring.on_flush is not None and ring.size and not (
                    ring._closed or ring._overflowed or ring._paused):
                # still dirty: what the callback appends (an SSE connection's event id,
                # which must follow the messages it covers) leaves in this same write
                try:
                    ring.on_flush()
                except BaseException:
                    _log.exception("fastim: on_flush callback failed")
            ring._dirty = False
            if ring._closed:
                continue
            if ring._overflowed:
                if ring.on_overflow is not None:
                    try:
                        ring.on_overflow()
                    except BaseException:
                        _log.exception("fastim: on_overflow callback failed")
                continue
            if ring._paused or ring.size == 0:
                continue
            direct = ring.fd >= 0
            if direct:
                # straight to the socket: no bytes object, no transport bookkeeping, no
                # Python call; whatever the kernel does not take goes to the transport,
                # which then pauses the ring until its buffer is empty (set_fd). The fd
                # is ours only while the transport is not closing: whoever closes it
                # sets the fd to -1 first (the session, close() here, the check below),
                # since once closed its number may belong to a new connection.
                sent = ring._send_direct()
                writes += 1
                if sent > 0:
                    self.bytes_written += sent
                ring._consume(sent)  # (0 too: a run of the arena left unsent is copied)
                if ring.size == 0:
                    continue
            data = ring._take()
            try:
                ring.transport.write(data)
            except BaseException:
                _log.exception("fastim: transport.write failed")
                if direct and ring.transport.is_closing():
                    ring.fd = -1
                continue
            if not direct:
                writes += 1
            elif ring.transport.is_closing():
                # the write failed and the transport closes itself: no more direct writes
                # (a Python call only here, where transport.write was one already)
                ring.fd = -1
            self.bytes_written += len(data)
        self.writes += writes
        return writes


cdef class OutRing:
    """A connection's outbound byte ring with a cap (see _core.pyi)."""

    def __init__(self, Flusher flusher, transport, int fmt=FMT_TCP,
                 Py_ssize_t cap=DEFAULT_RING_CAP, on_overflow=None):
        if fmt < 0 or fmt >= N_FMT:
            raise ValueError(f"fmt must be 0..{N_FMT - 1}")
        if cap < 0:
            raise ValueError("cap must be >= 0")
        self.flusher = flusher
        self.transport = transport
        self._fmt = fmt
        self.cap = cap
        self.on_overflow = on_overflow
        self.on_flush = None
        self.fd = -1

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        """Give the buffer back (to the flusher's pool, or to malloc); keep head/size."""
        if self.buf != NULL:
            if self.flusher is not None:
                self.flusher._put(self.buf, self.bufcap)
            else:
                free(self.buf)
            self.buf = NULL
        self.bufcap = 0

    def __len__(self):
        return self.size

    @property
    def fmt(self):
        return self._fmt

    @fmt.setter
    def fmt(self, int fmt):
        if fmt < 0 or fmt >= N_FMT:
            raise ValueError(f"fmt must be 0..{N_FMT - 1}, got {fmt}")
        if fmt != self._fmt and self.nsets:
            # a SubscriberSet counts its members per format: they would go stale
            raise ValueError("cannot change fmt while the ring is in a SubscriberSet")
        if self.rlen:
            self._materialize()  # its run is in the arena of the old format
        self._fmt = fmt

    @property
    def capacity(self):
        return self.bufcap

    @property
    def dirty(self):
        return self._dirty != 0

    @property
    def paused(self):
        return self._paused != 0

    @property
    def closed(self):
        return self._closed != 0

    @property
    def overflowed(self):
        return self._overflowed != 0

    cdef inline void _set_dirty(self) noexcept:
        if not self._dirty:
            self._dirty = True
            if self.flusher is not None:
                self.flusher._mark(self)

    cdef int _append(self, const char* p, Py_ssize_t n) except -1:
        """1 if stored, 0 if refused (closed, or over the cap: then overflowed)."""
        if self._closed:
            return 0
        if n == 0:
            return 1
        if self.size + n > self.cap:
            if not self._overflowed:
                self._overflowed = True
                self._set_dirty()
            return 0
        if self.rlen:
            self._materialize()
        self._store(p, n)
        self._set_dirty()
        return 1

    cdef int _share(self, Py_ssize_t off, Py_ssize_t n) except -1:
        """Append the ``n`` bytes at ``off`` in the flusher's arena of this ring's format
        (a broadcast frame, see Flusher._stash): by reference when the ring is empty or
        its pending bytes are the run just before them, else copied. As _append: 1 if
        stored, 0 if refused."""
        if self._closed:
            return 0
        if n == 0:
            return 1
        if self.size + n > self.cap:
            if not self._overflowed:
                self._overflowed = True
                self._set_dirty()
            return 0
        if self.rlen:
            if self.rstart + self.rlen == off:
                self.rlen += <int>n
                self.size += n
                self.flusher.shared += 1
                return 1
            self._materialize()
        elif self.size == 0:
            self.rstart = <int>off
            self.rlen = <int>n
            self.size = n
            self.flusher.shared += 1
            self._set_dirty()
            return 1
        self._store(self.flusher.arena[self._fmt] + off, n)
        self._set_dirty()
        return 1

    cdef int _materialize(self) except -1:
        """Copy the ring's run of the arena into its own buffer (the arena is emptied
        by the next flush; a ring that must keep its bytes longer keeps a copy)."""
        cdef Py_ssize_t start = self.rstart
        cdef Py_ssize_t n = self.rlen
        if n == 0:
            return 0
        self.rlen = 0
        self.rstart = 0
        self.size -= n
        return self._store(self.flusher.arena[self._fmt] + start, n)

    cdef int _store(self, const char* p, Py_ssize_t n) except -1:
        """Copy ``n`` bytes after the pending ones (growing the buffer): no checks."""
        cdef Py_ssize_t newcap, tail, first, pow2
        cdef char* nb
        if self.size + n > self.bufcap:
            # grow, and lay the pending bytes out from the start of the new buffer
            newcap = self.bufcap * 2
            if newcap < self.size + n:
                newcap = self.size + n
            if newcap < (1 << POOL_MIN_SHIFT):
                newcap = 1 << POOL_MIN_SHIFT
            if self.bufcap == 0 and self.hint and newcap < (<Py_ssize_t>1 << self.hint):
                # a ring that filled a 16 KiB buffer in the last tick will likely fill
                # it again: start there instead of at 512 bytes and doubling (each
                # doubling copies what is pending: half the memcpy of a saturated node)
                newcap = <Py_ssize_t>1 << self.hint
            pow2 = 1 << POOL_MIN_SHIFT
            while pow2 < newcap:
                pow2 <<= 1
            newcap = pow2
            if self.flusher is not None:
                nb = self.flusher._get(newcap)
            else:
                nb = <char*>malloc(newcap)
            if nb == NULL:
                raise MemoryError()
            if self.size:
                first = self.bufcap - self.head
                if first >= self.size:
                    memcpy(nb, self.buf + self.head, self.size)
                else:
                    memcpy(nb, self.buf + self.head, first)
                    memcpy(nb + first, self.buf, self.size - first)
            self._release()
            self.buf = nb
            self.bufcap = newcap
            self.head = 0
        tail = self.head + self.size
        if tail >= self.bufcap:
            tail -= self.bufcap
        first = self.bufcap - tail
        if first >= n:
            memcpy(self.buf + tail, p, n)
        else:
            memcpy(self.buf + tail, p, first)
            memcpy(self.buf, p + first, n - first)
        self.size += n
        return 1

    cdef bytes _take(self):
        cdef bytes out
        cdef char* o
        cdef Py_ssize_t first
        if self.size == 0:
            return b""
        if self.rlen:
            self._materialize()
        out = PyBytes_FromStringAndSize(NULL, self.size)
        o = PyBytes_AS_STRING(out)
        first = self.bufcap - self.head
        if first >= self.size:
            memcpy(o, self.buf + self.head, self.size)
        else:
            memcpy(o, self.buf + self.head, first)
            memcpy(o + first, self.buf, self.size - first)
        self._remember()
        self._release()  # an idle connection holds no buffer
        self.head = 0
        self.size = 0
        return out

    cdef Py_ssize_t _send_direct(self) noexcept:
        """Write pending bytes to ``fd`` with one sendmsg (two iovecs if wrapped).

        Returns the bytes the kernel took: 0 if it took none (EAGAIN, or an error
        that the transport will meet and report when it gets the bytes).
        """
        cdef iovec iov[2]
        cdef msghdr msg
        cdef Py_ssize_t first = self.bufcap - self.head
        cdef ssize_t n
        memset(&msg, 0, sizeof(msg))
        iov[0].iov_base = self.buf + self.head
        if self.rlen:
            iov[0].iov_base = self.flusher.arena[self._fmt] + self.rstart
            iov[0].iov_len = <size_t>self.rlen
            msg.msg_iovlen = 1
        elif first >= self.size:
            iov[0].iov_len = <size_t>self.size
            msg.msg_iovlen = 1
        else:
            iov[0].iov_len = <size_t>first
            iov[1].iov_base = self.buf
            iov[1].iov_len = <size_t>(self.size - first)
            msg.msg_iovlen = 2
        msg.msg_iov = iov
        while True:
            n = sendmsg(self.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n >= 0:
                return n
            if errno != EINTR:
                return 0

    cdef inline void _remember(self) noexcept:
        """Before an emptied buffer goes back: note its size class for the next tick
        (the buffer the pending bytes needed, up to the pool's largest class)."""
        cdef unsigned char shift = POOL_MIN_SHIFT
        while shift < POOL_MIN_SHIFT + POOL_CLASSES - 1 and (<Py_ssize_t>1 << shift) < self.size:
            shift += 1
        self.hint = shift

    cdef int _consume(self, Py_ssize_t n) except -1:
        """Drop the first ``n`` pending bytes (written); free the buffer when empty. A
        run of the arena not all written keeps what is left as a copy."""
        if self.rlen:
            if n >= self.size:
                self._remember()
                self.rlen = 0
                self.rstart = 0
                self.size = 0
                return 0
            self.rstart += <int>n
            self.rlen -= <int>n
            self.size -= n
            self._materialize()
            return 0
        if n <= 0:
            return 0
        if n >= self.size:
            self._remember()
            self._release()  # an idle connection holds no buffer
            self.head = 0
            self.size = 0
            return 0
        self.head += n
        if self.head >= self.bufcap:
            self.head -= self.bufcap
        self.size -= n
        return 0

    def set_fd(self, int fd):
        if fd < -1:
            raise ValueError("fd must be a file descriptor or -1")
        self.fd = fd

    @property
    def direct_fd(self):
        return self.fd

    def append(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._append(<const char*>view.buf, view.len) == 1
        finally:
            PyBuffer_Release(&view)

    def take(self):
        return self._take()

    def pause(self):
        self._paused = True

    def resume(self):
        self._paused = False
        if self.size and not self._closed:
            self._set_dirty()

    def close(self):
        self._closed = True
        self.fd = -1   # the connection's socket is no longer ours to write to
        self.rlen = 0
        self.rstart = 0
        self._release()
        self.head = 0
        self.size = 0
