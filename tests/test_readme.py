"""The README's 30-second tour, run as a reader would: its Python blocks copied from the
README itself, against a node started with the defaults (`fastim serve`, no flags: the
sqlite store in a directory of its own), and what they print compared with what the
README says they print. Only the ports are changed (the README's 7070/7071 may be busy).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _expected(block: str) -> list[str]:
    """What the block says it prints: the comment after each print()."""
    return [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.*)$", block, re.M)]


def _run(code: str, tcp: int, ws: int, tmp_path: Path) -> list[str]:
    code = code.replace("127.0.0.1:7070", f"127.0.0.1:{tcp}").replace(
        "127.0.0.1:7071", f"127.0.0.1:{ws}"
    )
    script = tmp_path / "tour.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines()]


def test_the_tour_prints_what_the_readme_says(node_process: Any, tmp_path: Path) -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 2, "the README's tour has a publish block and a direct-message block"
    tour, dm = blocks[0], blocks[1]
    node = node_process()  # the defaults: sqlite, in a directory of its own
    assert _run(tour, node.tcp_port, node.ws_port, tmp_path) == _expected(tour)
    # the direct-message block defines dm(); a reader runs it after the tour's imports
    head = tour.split("async def main", 1)[0]
    printed = _run(head + dm + "\nasyncio.run(dm())\n", node.tcp_port, node.ws_port, tmp_path)
    assert printed == _expected(dm)
