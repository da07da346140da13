"""Real headless Chromium (Debian's ``chromium`` through its ``chromedriver``) for the
browser tests, and a helper for the node's HTTP API.

No browser is a failure, never a skip: these tests are the only proof that fastim.js and
the demo work where they are meant to run. ``./dev test`` and ``.ci/run`` install both
packages when missing.
"""

from __future__ import annotations

import shutil
import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

INSTALL = "apt-get install -y chromium chromium-driver"
#: bound of every wait on a page (seconds): generous, these are never speed assertions
WAIT = 20.0

Browser = Any  # selenium.webdriver.Chrome (selenium has no stubs for mypy to use)


def _chrome_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            f"headless Chromium is needed: chromium={chromium} chromedriver={driver}; "
            f"install them with: {INSTALL}  (./dev test does it)",
            pytrace=False,
        )
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Callable[[], Browser]]:
    """A factory of headless Chromium windows (separate profiles: separate storage)."""
    chromium, driver = _chrome_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is needed: pip install -e '.[test]'", pytrace=False)
    opened: list[Any] = []

    def open_one() -> Browser:
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in (
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1000,800",
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--no-first-run",
        ):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        d = webdriver.Chrome(service=Service(driver), options=opts)
        d.set_page_load_timeout(WAIT)
        d.set_script_timeout(WAIT)
        opened.append(d)
        return d

    yield open_one
    for d in opened:
        d.quit()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_errors(driver: Browser) -> list[str]:
    """SEVERE entries of the page's console since the last call (but the favicon that
    Chromium asks for on the node's plain-text pages, which have none)."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "/favicon.ico" not in e["message"]
    ]


def api(port: int, key: str, method: str, path: str, body: Any = None) -> Any:
    """One call to the node's HTTP API (publish, send...), JSON in and out."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return orjson.loads(r.read())
