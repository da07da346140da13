# Batch fan-out: the subscribers of a channel in a C array, one append per member in C.
# C arrays indexed by a ring's format are N_FMT long (_core.pxd).


cdef class SubscriberSet:
    """The OutRings subscribed to one channel (see _core.pyi)."""

    def __init__(self):
        self.index = {}

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.arr != NULL:
            for i in range(self.n):
                (<OutRing>self.arr[i]).nsets -= 1
                Py_DECREF(<object>self.arr[i])
            free(self.arr)
            self.arr = NULL
        free(self.alt)
        self.alt = NULL

    def __len__(self):
        return self.n

    def __contains__(self, ring):
        return ring in self.index

    def count(self, int fmt):
        if fmt < 0 or fmt >= N_FMT:
            return 0
        return self.counts[fmt]

    cdef inline int _check_mutable(self) except -1:
        if self.iterating:
            # fanout() walks the C array without references of its own
            raise RuntimeError("SubscriberSet changed during fanout")
        return 0

    def add(self, OutRing ring not None):
        cdef void** na
        cdef uint8_t* nalt
        cdef Py_ssize_t ncap
        self._check_mutable()
        if ring in self.index:
            return False
        if self.n == self.acap:
            ncap = self.acap * 2 if self.acap else 8
            na = <void**>realloc(self.arr, ncap * sizeof(void*))
            if na == NULL:
                raise MemoryError()
            self.arr = na
            nalt = <uint8_t*>realloc(self.alt, ncap)
            if nalt == NULL:
                raise MemoryError()
            self.alt = nalt
            self.acap = ncap
        Py_INCREF(ring)
        self.arr[self.n] = <void*>ring
        self.alt[self.n] = 0
        self.index[ring] = self.n
        self.n += 1
        self.counts[ring._fmt] += 1
        ring.nsets += 1
        return True

    def remove(self, OutRing ring not None):
        cdef Py_ssize_t i
        cdef object last
        self._check_mutable()
        pos = self.index.pop(ring, None)
        if pos is None:
            return False
        i = pos
        if self.alt[i]:
            self.alt_counts[ring._fmt] -= 1
        self.n -= 1
        if i != self.n:
            # swap the last member into the hole: O(1), order among subscribers is free
            last = <object>self.arr[self.n]
            self.arr[i] = self.arr[self.n]
            self.alt[i] = self.alt[self.n]
            self.index[last] = i
        self.counts[ring._fmt] -= 1
        ring.nsets -= 1
        Py_DECREF(ring)
        if self.acap > 64 and self.n < self.acap // 4:
            self.acap //= 2
            self.arr = <void**>realloc(self.arr, self.acap * sizeof(void*))
            self.alt = <uint8_t*>realloc(self.alt, self.acap)
        return True

    def set_alt(self, OutRing ring not None, bint on=True):
        cdef Py_ssize_t i
        pos = self.index.get(ring)
        if pos is None:
            return False
        i = pos
        if self.alt[i] != on:
            self.alt[i] = on
            self.alt_counts[ring._fmt] += 1 if on else -1
        return True

    def is_alt(self, ring):
        pos = self.index.get(ring)
        return pos is not None and self.alt[<Py_ssize_t>pos] != 0

    def alt_count(self, int fmt=-1):
        cdef Py_ssize_t total = 0
        cdef int f
        if fmt >= N_FMT:
            return 0
        if fmt >= 0:
            return self.alt_counts[fmt]
        for f in range(N_FMT):
            total += self.alt_counts[f]
        return total

    def rings(self):
        cdef Py_ssize_t i
        return [<object>self.arr[i] for i in range(self.n)]

    def fanout(self, tuple frames not None, tuple alt=None):
        cdef const char* ptr[N_FMT]
        cdef Py_ssize_t lens[N_FMT]
        cdef const char* aptr[N_FMT]
        cdef Py_ssize_t alens[N_FMT]
        cdef bint use_alt = alt is not None
        cdef Py_ssize_t i, delivered = 0
        cdef int f
        cdef object fr
        cdef OutRing ring
        cdef Flusher fl
        cdef void* fl_of[N_FMT]
        cdef Py_ssize_t off[N_FMT]
        for f in range(N_FMT):
            ptr[f] = NULL
            lens[f] = 0
            if f < len(frames):
                fr = frames[f]
                if fr is not None:
                    if type(fr) is not bytes:
                        raise TypeError("frames must be bytes or None")
                    ptr[f] = PyBytes_AS_STRING(fr)
                    lens[f] = PyBytes_GET_SIZE(fr)
            # a member marked alt takes alt[fmt]; where that is None, frames[fmt]
            aptr[f] = ptr[f]
            alens[f] = lens[f]
            if use_alt and f < len(alt):
                fr = alt[f]
                if fr is not None:
                    if type(fr) is not bytes:
                        raise TypeError("frames must be bytes or None")
                    aptr[f] = PyBytes_AS_STRING(fr)
                    alens[f] = PyBytes_GET_SIZE(fr)
        # frames stay alive (held by the tuple) for the whole loop; the array may not
        # change under it (a schedule callback could try): add/remove raise meanwhile
        self.iterating += 1
        try:
            if use_alt:
                for i in range(self.n):
                    ring = <OutRing>self.arr[i]
                    f = ring._fmt
                    if self.alt[i]:
                        if aptr[f] != NULL:
                            delivered += ring._append(aptr[f], alens[f])
                    elif ptr[f] != NULL:
                        delivered += ring._append(ptr[f], lens[f])
            else:
                # the frame goes once into the arena of each ring's flusher (one, in a
                # node), and a ring that writes to its socket itself refers to it there
                for f in range(N_FMT):
                    fl_of[f] = NULL
                    off[f] = -1
                for i in range(self.n):
                    ring = <OutRing>self.arr[i]
                    f = ring._fmt
                    if ptr[f] == NULL:
                        continue
                    fl = ring.flusher
                    if ring.fd >= 0 and fl is not None and not ring._paused:
                        if <void*>fl != fl_of[f]:
                            fl_of[f] = <void*>fl
                            off[f] = fl._stash(f, ptr[f], lens[f])
                        if off[f] >= 0:
                            delivered += ring._share(off[f], lens[f])
                            continue
                    delivered += ring._append(ptr[f], lens[f])
        finally:
            self.iterating -= 1
        return delivered
