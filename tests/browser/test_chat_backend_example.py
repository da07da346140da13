"""examples/chat_backend, run from its README as a reader would, and used in Chromium.

The README's two commands are taken from the README itself and run with only the ports
changed (its 7070/7071/8080 may be busy here) and the paths made absolute (the test
runs them in a directory of its own, where the databases land). Then two people sign
in on the backend's page in two browsers: their messages go through the publish hook
into the backend's SQLite, history comes back from it, each sees the other online
through the event webhooks and offline once the other's page is gone; the node's demo
starts as the signed-in user; a WebSocket without the cookie is refused.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import WAIT, Browser, console_errors, free_port
from .test_demo_chromium import click, wait_js

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "chat_backend"
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (EXAMPLE / "README.md").read_text(), re.S)
    assert blocks, "examples/chat_backend/README.md has its commands in a ```sh block"
    lines = [ln.strip() for ln in blocks[0].splitlines() if ln.strip()]
    assert len(lines) == 2, f"the README's block is two commands, got {lines}"
    return lines


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not answer {url} within {WAIT}s")


@pytest.fixture
def example(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The node and the backend started with the README's commands."""
    node_cmd, app_cmd = readme_commands()
    tcp, ws, web = free_port(), free_port(), free_port()
    config = (EXAMPLE / "fastim.toml").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{web}")
    (tmp_path / "fastim.toml").write_text(config)

    def local(cmd: str) -> list[str]:
        cmd = cmd.replace(".venv/bin/", f"{BIN}/")
        cmd = cmd.replace("examples/chat_backend/fastim.toml", str(tmp_path / "fastim.toml"))
        cmd = cmd.replace("examples/", f"{ROOT}/examples/")
        return cmd.split()

    node = subprocess.Popen(
        [*local(node_cmd), "--tcp-port", str(tcp), "--ws-port", str(ws)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    app = subprocess.Popen(
        [*local(app_cmd), "--port", str(web), "--node", f"http://127.0.0.1:{ws}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{ws}/ready", node, "fastim serve")
        _wait_http(f"http://127.0.0.1:{web}/api/users", app, "the backend")
        yield {"ws": ws, "web": web, "db": tmp_path / "chat.db"}
    finally:
        for p in (app, node):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def sign_in(driver: Browser, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/")
    wait_js(driver, "!document.querySelector('#login').hidden", "the sign-in form")
    driver.find_element(By.ID, "name").send_keys(name)
    click(driver, By.CSS_SELECTOR, "#login button")
    wait_js(
        driver,
        f"document.querySelector('#status').textContent === 'connected as {name}'",
        f"{name} connected through the connect hook",
    )


def say(driver: Browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "text").send_keys(text)
    click(driver, By.CSS_SELECTOR, "#send button")


LINES = (
    "Array.from(document.querySelectorAll('#messages li:not(.pending)')).map(li => li.textContent)"
)


def users(web: int) -> dict[str, bool]:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/users", timeout=5) as r:
        return {u["user"]: u["online"] for u in orjson.loads(r.read())}


def wait_users(web: int, want: dict[str, bool], what: str) -> None:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if all(users(web).get(u) == v for u, v in want.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: /api/users is {users(web)}, wanted {want}")


def test_chat_backend_example_in_chromium(
    example: dict[str, Any], browser: Callable[[], Browser]
) -> None:
    web, ws = example["web"], example["ws"]
    base = f"http://127.0.0.1:{web}"
    alice = browser()
    sign_in(alice, base, "alice")
    say(alice, "hello from alice")
    wait_js(alice, f"{LINES}.includes('alicehello from alice')", "alice's message, stored")
    # stored by the publish hook, in the backend's database
    db = sqlite3.connect(example["db"])
    assert db.execute("SELECT user, text, channel FROM messages").fetchall() == [
        ("alice", "hello from alice", "room:lobby")
    ]
    bob = browser()
    sign_in(bob, base, "bob")
    # bob's history comes from the database (the rpc hook), then live messages
    wait_js(bob, f"{LINES}.includes('alicehello from alice')", "history for bob")
    say(bob, "hi alice")
    wait_js(alice, f"{LINES}.includes('bobhi alice')", "bob's message at alice")
    assert [r[0] for r in db.execute("SELECT user FROM messages ORDER BY id")] == ["alice", "bob"]
    # online through the connect events, offline through the disconnect event
    wait_users(web, {"alice": True, "bob": True}, "both online")
    wait_js(alice, "document.querySelector('#people li.online') !== null", "people list")
    bob.quit()
    wait_users(web, {"alice": True, "bob": False}, "bob offline once his page is gone")
    # the node's demo, with alice's cookie: it starts as alice without asking a name
    alice.get(f"http://127.0.0.1:{ws}/demo/")
    wait_js(alice, "document.querySelector('#me').textContent === 'alice'", "the demo as alice")
    wait_js(
        alice, "document.querySelector('#status').dataset.state === 'connected'", "demo connected"
    )
    assert console_errors(alice) == []

    # a WebSocket without the session cookie: the backend says who it is not
    async def no_cookie() -> tuple[int, str]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        async with connect(f"ws://127.0.0.1:{ws}/ws") as c:
            await c.send('{"op":"hello","id":1}')
            try:
                while True:
                    await asyncio.wait_for(c.recv(), WAIT)
            except ConnectionClosed:
                pass
            assert c.close_code is not None
            return c.close_code, c.close_reason or ""

    assert asyncio.run(no_cookie()) == (4501, "not signed in")


def test_chat_backend_example_at_phone_size(
    example: dict[str, Any], browser: Callable[[], Browser]
) -> None:
    """The example's page on a phone (390x844, emulated): one column, the people list
    above the room, and the messages, the text box and its button on screen and usable
    (the centre of each hits it: nothing covers or clips it), no sideways scrolling."""
    from .test_demo_ui_chromium import phone, visible

    base = f"http://127.0.0.1:{example['web']}"
    carol = phone(browser())
    sign_in(carol, base, "carol")
    assert carol.execute_script("return innerWidth") == 390
    say(carol, "hello from a phone")
    wait_js(carol, f"{LINES}.includes('carolhello from a phone')", "carol's message")
    for sel in ("#people", "#messages", "#text", "#send button"):
        carol.execute_script(
            "document.querySelector(arguments[0]).scrollIntoView({block: 'nearest'})", sel
        )
        assert visible(carol, sel) is True, (sel, visible(carol, sel))
    assert carol.execute_script("return document.documentElement.scrollWidth <= innerWidth"), (
        "the page scrolls sideways on a phone"
    )
    layout = carol.execute_script(
        "const p = document.querySelector('#people').closest('aside').getBoundingClientRect();"
        "const m = document.querySelector('#messages').getBoundingClientRect();"
        "return {side: p.width, top: p.top, room: m.top, width: innerWidth};"
    )
    # one column: the people panel is as wide as the page, above the room
    assert layout["side"] > 0.8 * layout["width"], layout
    assert layout["top"] < layout["room"], layout
    assert console_errors(carol) == []
