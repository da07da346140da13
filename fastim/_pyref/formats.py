"""Wire formats of a subscriber: which pre-encoded frame its ring takes (the compiled
core states them once, in ``_core.pxd``; this is the references' copy, checked equal by
the tests)."""

FMT_TCP = 0  # fastim frame
FMT_WS_BINARY = 1  # fastim frame inside a WebSocket binary frame
FMT_WS_JSON = 2  # JSON message inside a WebSocket text frame
FMT_WS_BINARY_DEFLATE = 3  # FMT_WS_BINARY, compressed (permessage-deflate) when it pays
FMT_WS_JSON_DEFLATE = 4  # FMT_WS_JSON, compressed when it pays
FMT_SSE = 5  # JSON message as a Server-Sent Event (SSE and HTTP streaming)
N_FORMATS = 6
