"""What every atheris target shares: which compiled core it fuzzes, and how it starts.

Two modes (docs/fuzzing.md):

- **instrumented** (when ``fuzz/build_instrumented.sh`` has built ``build/fuzz``): the
  target re-executes itself with ``build/fuzz/asan_with_fuzzer.so`` preloaded and loads
  ``build/fuzz/core/_core*.so`` as ``fastim._core``: the C code is guided by its own
  coverage (edges and compared values) and runs under AddressSanitizer, with every
  Python allocation going through malloc (``PYTHONMALLOC=malloc``) so that ASan sees
  bytes objects too.
- **plain** (no instrumented build, or ``FASTIM_FUZZ_PLAIN=1``): the normal build; the
  fuzzer is guided by the coverage of the Python code it instruments (the pure-Python
  reference the core is compared with, the session and protocol code).

Either way a finding is an uncaught exception or a failed assertion in the target (or a
sanitizer report, or a crash): libFuzzer writes the input to ``crash-<sha1>``.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "fuzz")
RUNTIME = os.path.join(BUILD, "asan_with_fuzzer.so")
_CHILD = "_FASTIM_FUZZ_INSTRUMENTED"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _instrumented_core() -> str | None:
    found = sorted(glob.glob(os.path.join(BUILD, "core", "_core*.so")))
    return found[0] if found and os.path.exists(RUNTIME) else None


def instrumented() -> bool:
    return os.environ.get(_CHILD) == "1"


def start(instrument: list[str]) -> None:
    """Pick the core, then import the ``instrument`` modules under atheris' instrumentation.

    Must run before the target imports anything of fastim: ``fastim._core`` has to come
    from the instrumented build (the sanitizer runtime can only be preloaded when the
    process starts: this re-executes), and Python code is instrumented as it is imported.
    """
    if instrumented():
        path = _instrumented_core()
        assert path is not None
        spec = importlib.util.spec_from_file_location("fastim._core", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastim._core"] = module
        spec.loader.exec_module(module)
    elif os.environ.get("FASTIM_FUZZ_PLAIN") != "1" and _instrumented_core() is not None:
        _reexec()
    import atheris  # type: ignore[import-untyped,unused-ignore]

    with atheris.instrument_imports(include=instrument):
        for name in instrument:
            __import__(name)


def _reexec() -> None:
    """Start again with the sanitizer runtime preloaded (ASan must be there first)."""
    env = dict(os.environ)
    env[_CHILD] = "1"
    env["LD_PRELOAD"] = RUNTIME
    env["PYTHONMALLOC"] = "malloc"
    # Python itself keeps memory for good: leak reports would be noise
    env.setdefault(
        "ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=64"
    )
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def mode() -> str:
    if instrumented():
        return "instrumented core (ASan + libFuzzer coverage of the C code)"
    return "plain build (Python coverage only: run fuzz/build_instrumented.sh for C coverage)"


def run(test_one_input: Callable[[bytes], None], dictionary: str = "") -> None:
    """Fuzz ``test_one_input``; ``dictionary``: a libFuzzer dictionary under fuzz/ (unless
    -dict is given). One input running 10 s is a finding (a hang) unless -timeout is given."""
    import atheris  # type: ignore[import-untyped,unused-ignore]

    argv = list(sys.argv)
    if dictionary and not any(a.startswith("-dict=") for a in argv):
        argv.append("-dict=" + os.path.join(ROOT, "fuzz", dictionary))
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=10")  # an input of a few KiB never takes seconds: a hang
    print(f"fastim fuzz target {os.path.basename(argv[0])}: {mode()}", file=sys.stderr)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def core() -> ModuleType:
    """The compiled core in use (the instrumented one once start() loaded it)."""
    from fastim import _core

    return _core


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (positions out of range are ignored)."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]
