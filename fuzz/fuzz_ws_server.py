"""atheris target: the WebSocket parser, server side (client=False), any bytes, any chunking.

    .venv/bin/python fuzz/fuzz_ws_server.py -max_total_time=120

What is checked: fuzz/_ws.py.
"""

from __future__ import annotations

import sys

import _common

_common.start(instrument=["fastim._pyref"])

import _ws  # noqa: E402


def TestOneInput(data: bytes) -> None:
    _ws.test_one_input(data, client=False)


if __name__ == "__main__":
    _common.run(TestOneInput, "websocket.dict")
    sys.exit(0)
