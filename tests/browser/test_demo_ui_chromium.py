"""The demo chat's page in headless Chromium, item by item (issue P8, item 10).

- the new-room box accepts a valid name after refusing an invalid one;
- on a phone-sized screen (390x844, emulated) the rooms, people and direct messages
  stay reachable however many messages a room has (never a squeezed sidebar);
- a room message sent while offline shows as pending, then as sent or as not sent;
- the login screen: its error is red, and it does not say "connecting" before anything
  connects;
- ``/`` points to the demo (and is 404 with the demo off: tests/server/test_static.py);
- direct conversations survive a reload.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import WAIT, Browser, api, console_errors
from .test_demo_chromium import KEY, click, login, say, wait_js, write_config

#: the demo's error red (--bad: #c81e1e) as getComputedStyle reports it
RED = "rgb(200, 30, 30)"
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}

#: an element is on screen and not clipped or covered: the point at its centre hits it
VISIBLE = """
const el = document.querySelector(arguments[0]);
if (!el) return 'missing';
const r = el.getBoundingClientRect();
if (r.width < 1 || r.height < 1) return 'no size: ' + r.width + 'x' + r.height;
if (r.top < 0 || r.left < 0 || r.bottom > innerHeight || r.right > innerWidth)
  return 'off screen: ' + JSON.stringify(r);
const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
if (el.contains(hit)) return true;
return 'covered or clipped (hit: ' + (hit && hit.outerHTML.slice(0, 80)) + ')';
"""


def visible(driver: Browser, selector: str) -> Any:
    return driver.execute_script(VISIBLE, selector)


def rect(driver: Browser, selector: str) -> dict[str, float]:
    r: dict[str, float] = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {width: r.width, height: r.height, top: r.top, bottom: r.bottom};",
        selector,
    )
    return r


def phone(driver: Browser) -> Browser:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    return driver


def show_side(driver: Browser) -> None:
    """Where the rooms and people are behind a menu button (narrow screens), open it."""
    from selenium.webdriver.common.by import By

    closed = "return !document.querySelector('#side').offsetParent"
    if visible(driver, "#menu") is True and driver.execute_script(closed):
        click(driver, By.ID, "menu")
    wait_js(driver, "document.querySelector('#side').offsetParent !== null", "the side panel")


# ----------------------------------------------------------------------------- (a)


def test_new_room_box_accepts_a_valid_name_after_an_invalid_one(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    d = browser()
    login(d, f"http://127.0.0.1:{node.ws_port}", "ada")
    box = d.find_element(By.ID, "room-name")
    box.send_keys("Dev Talk")
    click(d, By.CSS_SELECTOR, "#new-room button")
    assert d.execute_script("return document.querySelectorAll('#rooms li').length") == 1
    assert d.execute_script("return document.querySelector('#room-name').validationMessage")
    box.clear()
    box.send_keys("dev-talk")
    click(d, By.CSS_SELECTOR, "#new-room button")
    wait_js(d, "document.querySelector(\"#rooms li[data-room='dev-talk']\")", "the new room")
    assert d.execute_script("return document.querySelector('#conversation').dataset.name") == (
        "dev-talk"
    )
    assert d.execute_script("return document.querySelector('#room-name').value") == ""
    assert console_errors(d) == []


# ----------------------------------------------------------------------------- (b)


def test_phone_size_keeps_rooms_people_and_dm_badge_reachable(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    """390x844 (a phone, emulated): a room with many messages, a direct message waiting.
    The conversation takes the screen; the rooms, the people and the direct messages
    (with their unread badge) are one tap away and shown whole, never squeezed."""
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    base = f"http://127.0.0.1:{node.ws_port}"
    a, b = phone(browser()), browser()
    login(a, base, "alice")
    login(b, base, "bob")
    for i in range(15):
        api(node.ws_port, KEY, "POST", "publish", {"channel": "room:lobby", "data": {
            "user": "carol", "text": f"message {i} " + "words " * (i % 4), "ts": 0}})  # fmt: skip
    wait_js(a, "document.querySelectorAll('#messages li[data-off]').length === 15", "history")
    click(b, By.CSS_SELECTOR, "#presence li[data-user='alice']")
    say(b, "hi from bob")
    wait_js(b, "!document.querySelector('#messages li.pending')", "the dm stored")
    # the conversation has the screen: its last message and the composer are on it
    assert visible(a, "#messages li:last-child") is True
    assert visible(a, "#text") is True
    assert rect(a, "#messages")["height"] >= 300
    # the waiting direct message shows without opening anything
    wait_js(a, "document.querySelector('#menu .badge')?.textContent === '1'", "menu badge")
    assert visible(a, "#menu .badge") is True

    show_side(a)
    assert rect(a, "#side")["height"] >= 300, rect(a, "#side")
    wait_js(a, "document.querySelector(\"#presence li[data-user='bob']\")", "bob present")
    for sel in (
        "#rooms li[data-room='lobby']",
        "#presence li[data-user='bob']",
        "#dms li[data-peer='bob'] .badge",
        "#room-name",
    ):
        assert visible(a, sel) is True, (sel, visible(a, sel))
    click(a, By.CSS_SELECTOR, "#dms li[data-peer='bob']")
    wait_js(a, "document.querySelector('#conversation').dataset.kind === 'dm'", "dm view")
    wait_js(a, "document.querySelector('#messages li[data-who=bob]')", "bob's message")
    assert visible(a, "#messages li[data-who=bob]") is True
    assert visible(a, "#text") is True
    # and back to a room the same way
    show_side(a)
    click(a, By.CSS_SELECTOR, "#rooms li[data-room='lobby']")
    wait_js(a, "document.querySelector('#conversation').dataset.kind === 'room'", "room view")
    assert visible(a, "#messages li:last-child") is True

    # on the desktop the sidebar keeps its width next to a long room
    assert b.execute_script("return document.querySelector('#side').offsetWidth") >= 180
    for d in (a, b):
        assert console_errors(d) == []


# ----------------------------------------------------------------------------- (c)

LINE = "[...document.querySelectorAll('#messages li')].filter(li => li.textContent.includes({}))"


def test_room_message_sent_offline_shows_pending_then_sent_or_failed(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    node = node_process("--config", config)
    ports = ("--tcp-port", str(node.tcp_port), "--ws-port", str(node.ws_port))
    d = browser()
    login(d, f"http://127.0.0.1:{node.ws_port}", "otto")

    # the node goes away; a line said meanwhile waits, marked, then goes out once
    assert node.terminate(signal.SIGTERM) == 0
    wait_js(d, "document.querySelector('#status').dataset.state === 'reconnecting'", "offline")
    say(d, "said while offline")
    back = LINE.format("'said while offline'")
    wait_js(d, f"{back}.length === 1 && {back}[0].classList.contains('pending')", "pending", 3)
    second = node_process("--config", config, *ports)
    wait_js(d, f"{back}.length === 1 && {back}[0].dataset.off === '1'", "sent, with its offset")
    assert d.execute_script(f"return {back}[0].className") == "mine"
    history = api(node.ws_port, KEY, "GET", "history?channel=room:lobby")["messages"]
    assert [m["data"]["text"] for m in history] == ["said while offline"]  # stored once

    # gone for longer than the page waits (requestTimeout, 10 s): marked as not sent
    assert second.terminate(signal.SIGTERM) == 0
    wait_js(d, "document.querySelector('#status').dataset.state === 'reconnecting'", "offline")
    say(d, "lost line")
    lost = LINE.format("'lost line'")
    wait_js(d, f"{lost}.length === 1 && {lost}[0].classList.contains('pending')", "pending", 3)
    wait_js(d, f"{lost}.length === 1 && {lost}[0].classList.contains('failed')", "failed")
    assert "not sent" in d.execute_script(f"return {lost}[0].textContent")
    assert not d.execute_script(f"return {lost}[0].classList.contains('pending')")
    # Chromium logs each refused reconnect while the node was down; nothing else
    # the attempts while the node was down: WebSocket, then the fallbacks (/stream, /sse)
    refused = "net::ERR_CONNECTION_REFUSED"
    assert [e for e in console_errors(d) if refused not in e] == []


# ----------------------------------------------------------------------------- (d), (e)


def test_login_screen_error_is_red_and_no_connecting_before_joining(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/demo/")
    wait_js(d, "document.querySelector('#name')", "the login form")
    text = d.execute_script("return document.body.innerText")
    assert "connecting" not in text.lower(), text  # nothing connects before joining
    d.find_element(By.ID, "name").send_keys("   ")
    click(d, By.ID, "join")
    wait_js(d, "document.querySelector('#login-error').textContent", "the error")
    color = d.execute_script(
        "return getComputedStyle(document.querySelector('#login-error')).color"
    )
    assert color == RED
    # then a good name joins, and the status shows from then on
    d.find_element(By.ID, "name").send_keys("ines")
    click(d, By.ID, "join")
    wait_js(d, "document.querySelector('#status').dataset.state === 'connected'", "connected")
    assert visible(d, "#status") is True
    assert console_errors(d) == []


# ----------------------------------------------------------------------------- (f)


def test_root_points_to_the_demo(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/")
    assert "fastim" in d.title
    links = d.execute_script("return [...document.querySelectorAll('a')].map(a => a.href)")
    base = f"http://127.0.0.1:{node.ws_port}"
    assert f"{base}/demo/" in links and f"{base}/fastim.js" in links
    click(d, By.CSS_SELECTOR, "a[href='demo/']")
    wait_js(d, "document.querySelector('#login') && location.pathname === '/demo/'", "demo")
    assert console_errors(d) == []


# ----------------------------------------------------------------------------- (g)


def test_direct_conversations_survive_a_reload(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    base = f"http://127.0.0.1:{node.ws_port}"
    a, b = browser(), browser()
    login(a, base, "alice")
    login(b, base, "bob")
    wait_js(b, "document.querySelector(\"#presence li[data-user='alice']\")", "alice present")
    click(b, By.CSS_SELECTOR, "#presence li[data-user='alice']")
    say(b, "remember me")
    wait_js(b, "!document.querySelector('#messages li.pending')", "the dm stored")
    wait_js(a, "document.querySelector(\"#dms li[data-peer='bob'] .badge\")", "alice's badge")

    # alice reloads before reading it: the conversation and its unread count are there
    a.refresh()
    wait_js(a, "document.querySelector('#status').dataset.state === 'connected'", "back")
    badge = wait_js(
        a, "document.querySelector(\"#dms li[data-peer='bob'] .badge\")?.textContent", "badge"
    )
    assert badge == "1"
    click(a, By.CSS_SELECTOR, "#dms li[data-peer='bob']")
    shown = (
        "[...document.querySelectorAll('#messages li')]"
        ".filter(li => li.dataset.who === {} && li.textContent.includes('remember me'))"
    )
    wait_js(a, f"{shown.format(repr('bob'))}.length === 1", "the dm after a reload")
    say(a, "i do")
    wait_js(a, "!document.querySelector('#messages li.pending')", "the reply stored")

    # bob reloads: his side of the conversation is there too, in order, once
    b.refresh()
    wait_js(b, "document.querySelector('#status').dataset.state === 'connected'", "back")
    wait_js(b, "document.querySelector(\"#dms li[data-peer='alice']\")", "the conversation")
    click(b, By.CSS_SELECTOR, "#dms li[data-peer='alice']")
    lines = (
        "[...document.querySelectorAll('#messages li')]"
        ".map(li => [li.dataset.who, li.querySelector('.text').textContent, li.className])"
    )
    wait_js(b, f"{lines}.length === 2", "both lines", WAIT)
    assert b.execute_script(f"return {lines}") == [
        ["bob", "remember me", "mine"],
        ["alice", "i do", ""],
    ]
    for d in (a, b):
        assert console_errors(d) == []
