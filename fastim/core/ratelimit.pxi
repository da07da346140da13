# Token buckets: per-connection publish/send rates and per-address connection rates.


cdef class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved (see _core.pyi)."""

    cdef readonly double rate
    cdef readonly double burst
    cdef double tokens
    cdef double stamp
    cdef public Py_ssize_t refused

    def __init__(self, double rate, double burst, double now=0.0):
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.refused = 0

    cpdef bint take(self, double now, double n=1.0):
        cdef double t = self.tokens
        if now > self.stamp:
            t += (now - self.stamp) * self.rate
            if t > self.burst:
                t = self.burst
            self.stamp = now
        if t >= n:
            self.tokens = t - n
            return True
        self.tokens = t
        self.refused += 1
        return False

    @property
    def available(self):
        return self.tokens
