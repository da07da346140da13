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
            self.acap = ncap
        Py_INCREF(ring)
        self.arr[self.n] = <void*>ring
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
        self.n -= 1
        if i != self.n:
            # swap the last member into the hole: O(1), order among subscribers is free
            last = <object>self.arr[self.n]
            self.arr[i] = self.arr[self.n]
            self.index[last] = i
        self.counts[ring._fmt] -= 1
        ring.nsets -= 1
        Py_DECREF(ring)
        if self.acap > 64 and self.n < self.acap // 4:
            self.acap //= 2
            self.arr = <void**>realloc(self.arr, self.acap * sizeof(void*))
        return True

    def rings(self):
        cdef Py_ssize_t i
        return [<object>self.arr[i] for i in range(self.n)]

    def fanout(self, tuple frames not None):
        cdef const char* ptr[N_FMT]
        cdef Py_ssize_t lens[N_FMT]
        cdef Py_ssize_t i, delivered = 0
        cdef int f
        cdef object fr
        cdef OutRing ring
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
        # frames stay alive (held by the tuple) for the whole loop; the array may not
        # change under it (a schedule callback could try): add/remove raise meanwhile
        self.iterating += 1
        try:
            for i in range(self.n):
                ring = <OutRing>self.arr[i]
                f = ring._fmt
                if ptr[f] != NULL:
                    delivered += ring._append(ptr[f], lens[f])
        finally:
            self.iterating -= 1
        return delivered
