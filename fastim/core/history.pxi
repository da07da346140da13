# A channel's recent messages in a ring of object pointers, addressable by offset.


cdef class HistoryRing:
    """The last ``capacity`` messages of a channel (see _core.pyi)."""

    def __init__(self, Py_ssize_t capacity):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        if capacity:
            self.items = <void**>malloc(capacity * sizeof(void*))
            if self.items == NULL:
                raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.items != NULL:
            for i in range(self.count):
                Py_DECREF(<object>self.items[(self.head + i) % self.capacity])
            free(self.items)
            self.items = NULL

    def __len__(self):
        return self.count

    @property
    def last_offset(self):
        return self._last

    @property
    def first_offset(self):
        if self.count == 0:
            return 0
        return self._last - <uint64_t>self.count + 1

    def append(self, offset, item):
        cdef uint64_t off = offset
        cdef Py_ssize_t slot
        if self._started:
            if off != self._last + 1:
                raise ValueError(f"offset {off} does not follow {self._last}")
        elif off < 1:
            raise ValueError("offsets start at 1")
        self._started = True
        self._last = off
        if self.capacity == 0:
            return
        Py_INCREF(item)
        if self.count == self.capacity:
            Py_DECREF(<object>self.items[self.head])
            self.items[self.head] = <void*>item
            self.head = (self.head + 1) % self.capacity
        else:
            slot = (self.head + self.count) % self.capacity
            self.items[slot] = <void*>item
            self.count += 1

    def get(self, offset):
        cdef uint64_t first
        if offset < 1 or self.count == 0:
            return None
        first = self._last - <uint64_t>self.count + 1
        if offset < first or offset > self._last:
            return None
        return <object>self.items[(self.head + <Py_ssize_t>(offset - first)) % self.capacity]

    def since(self, offset):
        cdef uint64_t first, off
        cdef Py_ssize_t i, start
        if offset < 0 or offset > self._last:
            return None
        off = offset
        if off == self._last:
            return []
        first = self._last - <uint64_t>self.count + 1
        if off + 1 < first:
            return None
        start = <Py_ssize_t>(off + 1 - first)
        return [(<object>first + i, <object>self.items[(self.head + i) % self.capacity])
                for i in range(start, self.count)]
