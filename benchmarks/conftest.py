"""Benchmarks of the compiled kernels against their pure-Python references.

Run: ``make bench`` (or ``pytest benchmarks/ --benchmark-only``). Compare commits with
``--benchmark-save=NAME`` and ``--benchmark-compare``. They are not part of ``make test``:
timings on a shared 2-core machine say nothing about correctness.
"""

from __future__ import annotations

import types

import pytest

import fastim._core as compiled
import fastim._pyref as pyref


@pytest.fixture(params=["compiled", "pyref"])
def impl(request: pytest.FixtureRequest) -> types.ModuleType:
    return compiled if request.param == "compiled" else pyref
