"""Fixtures of the core tests: every test runs against both implementations.

``impl`` is either the compiled core (``fastim._core``) or its pure-Python twin
(``fastim._pyref``); ``core`` and ``ref`` are the two modules, for the tests that
check that they agree on the same input.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

import fastim._pyref

BUILD_HINT = "build the extension: pip install -e . (or make test)"


def load_compiled() -> ModuleType:
    try:
        return importlib.import_module("fastim._core")
    except ImportError as exc:
        pytest.fail(f"fastim._core cannot be imported ({exc}): {BUILD_HINT}", pytrace=False)


@pytest.fixture(scope="session", params=["compiled", "pyref"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "compiled":
        return load_compiled()
    return fastim._pyref


@pytest.fixture(scope="session")
def core() -> ModuleType:
    return load_compiled()


@pytest.fixture(scope="session")
def ref() -> ModuleType:
    return fastim._pyref
