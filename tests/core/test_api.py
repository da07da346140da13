"""The compiled core and its pure-Python twin expose the same API."""

from __future__ import annotations

from types import ModuleType

import fastim._pyref


def test_same_public_names(core: ModuleType, ref: ModuleType) -> None:
    missing = [name for name in ref.__all__ if not hasattr(core, name)]
    assert missing == []


def test_same_constants(core: ModuleType, ref: ModuleType) -> None:
    for name in ref.__all__:
        value = getattr(ref, name)
        if isinstance(value, int):
            assert getattr(core, name) == value, name


def test_pyref_exports_what_the_stub_declares() -> None:
    declared = {
        "HEADER_SIZE", "DEFAULT_MAX_FRAME", "FMT_TCP", "FMT_WS_BINARY", "FMT_WS_JSON",
        "FMT_WS_BINARY_DEFLATE", "FMT_WS_JSON_DEFLATE", "FMT_SSE", "N_FORMATS", "OP_CONT",
        "OP_TEXT",
        "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG", "OP_COMPRESSED", "crc32",
        "encode_frame", "FrameDecoder", "utf8_valid", "ws_encode", "ws_inflate",
        "ws_close_payload", "ws_parse_close", "WSParser", "OutRing", "Flusher",
        "SubscriberSet", "HistoryRing", "MSG_FRAME_TYPE", "encode_msg", "encode_msg_one",
    }  # fmt: skip
    assert declared <= set(fastim._pyref.__all__)
    assert all(hasattr(fastim._pyref, name) for name in fastim._pyref.__all__)
