"""Benchmarks of the compiled kernels against their pure-Python references.

Run: ``./dev bench`` (``pytest benchmarks/ --benchmark-only``). Compare commits:
``./dev bench --benchmark-save=before`` on one commit, then ``./dev bench
--benchmark-compare=0001 --benchmark-compare-fail=median:20%`` on the next (the saved runs
live in ``.benchmarks/``). They are not part of ``./dev test``: timings on a shared 2-core
machine say nothing about correctness.
"""

from __future__ import annotations

import types

import pytest

import fastim._core as compiled
import fastim._pyref as pyref


@pytest.fixture(params=["compiled", "pyref"])
def impl(request: pytest.FixtureRequest) -> types.ModuleType:
    return compiled if request.param == "compiled" else pyref
