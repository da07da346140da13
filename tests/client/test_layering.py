"""The client SDK's modules import one way and nothing of the server.

``fastim.client`` is shipped to applications: it may use the wire format
(``fastim.protocol``, ``fastim.errors``, ``fastim.codes``, ``fastim._core``) and nothing
else of fastim.
Inside it, every import is at the top of a module and points down: no cycle, none
hidden under ``if TYPE_CHECKING:`` or inside a function (Subscription and DirectInbox
reach the client through protocols of their own modules).
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import fastim.client

PKG = Path(fastim.client.__file__).parent
#: what of fastim the client may import, besides its own modules
ALLOWED = {"fastim", "fastim._core", "fastim.codes", "fastim.errors", "fastim.protocol"}


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    code = (
        "import sys, fastim.client\n"
        "print('\\n'.join(m for m in sys.modules if m == 'fastim' or m.startswith('fastim.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    loaded = {m for m in out if not m.startswith("fastim.client")}
    assert loaded <= ALLOWED, sorted(loaded - ALLOWED)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The client modules ``path`` imports, and what is wrong with its imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    deps: set[str] = set()
    wrong: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            wrong.append(f"{where}: a block under TYPE_CHECKING")
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("fastim")]
            wrong += [f"{where}: imports {n}" for n in names if n not in ALLOWED]
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and not module.startswith("fastim"):
            continue  # the standard library, orjson
        if id(node) not in top:
            wrong.append(f"{where}: an import of fastim inside a block")
        if node.level == 1:  # from .x import y / from . import x
            deps.update([module.split(".")[0]] if module else [a.name for a in node.names])
            continue
        if node.level == 2:  # from ..x import y / from .. import x
            names = [f"fastim.{module}"] if module else [f"fastim.{a.name}" for a in node.names]
        elif node.level == 0:
            names = [module]
        else:
            names = ["(outside fastim)"]
        wrong += [f"{where}: imports {n}" for n in names if n not in ALLOWED]
    return deps, wrong


def test_client_modules_import_one_way() -> None:
    graph: dict[str, set[str]] = {}
    wrong: list[str] = []
    for path in sorted(PKG.glob("*.py")):
        deps, bad = _imports(path)
        graph[path.stem] = deps
        wrong += bad
    assert not wrong, wrong
    assert set().union(*graph.values()) <= set(graph), "an import of a module not in the package"
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle
    # the public types are defined below the client and re-exported by it
    assert graph["subscription"] == set() and graph["direct"] == set()
    assert "client" not in set().union(*(d for m, d in graph.items() if m != "__init__"))
