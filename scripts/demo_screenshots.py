"""Screenshots of the demo chat for the docs: docs/img/demo-desktop.png (1200x760) and
docs/img/demo-phone.png (390x844, a phone emulated by Chromium, at 2x).

    .venv/bin/python scripts/demo_screenshots.py [--out docs/img]

Starts a node (``python -m fastim serve``, memory store, join/leave events on rooms) on
free ports, and headless Chromium windows (selenium with Debian's chromium and
chromedriver, as tests/browser/) for four people who chat in a room, open a second room
and send direct messages; then photographs alice's window (desktop) and dana's (phone),
and dana's side panel (demo-phone-menu.png). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(tmp: Path) -> tuple[subprocess.Popen[str], int]:
    config = tmp / "fastim.toml"
    config.write_text("[namespaces.room]\njoin_leave = true\n")
    ws = free_port()
    cmd = [sys.executable, "-m", "fastim", "serve", "--config", str(config)]
    cmd += ["--tcp-port", str(free_port()), "--ws-port", str(ws)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening" in line:
            return proc, ws
        if not line:
            break
    proc.kill()
    raise SystemExit("the node did not start")


def browser(width: int = 1200, height: int = 760, mobile: bool = False) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit(
            "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(WAIT)
    if mobile:
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    else:  # the page's viewport exactly, whatever the window decorations take
        d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
    return d


def wait(d: Any, script: str, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        v = d.execute_script(f"return ({script});")
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"waited {WAIT}s for {what}")


def login(d: Any, base: str, name: str) -> None:
    d.get(f"{base}/demo/")
    d.find_element("id", "name").send_keys(name)
    d.find_element("id", "join").click()
    wait(d, "document.querySelector('#status').dataset.state === 'connected'", f"{name} in")


def say(d: Any, text: str) -> None:
    d.find_element("id", "text").send_keys(text)
    d.find_element("id", "send").click()
    wait(d, "!document.querySelector('#messages li.pending')", "the line sent")


def click(d: Any, selector: str) -> None:
    wait(d, f"document.querySelector({selector!r})", selector)
    d.execute_script("document.querySelector(arguments[0]).click()", selector)


def room_lines(d: Any) -> int:
    return int(
        d.execute_script("return document.querySelectorAll('#messages li[data-off]').length")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        node, port = start_node(Path(tmp))
        base = f"http://127.0.0.1:{port}"
        opened: list[Any] = []
        try:
            alice, bob, carol = browser(), browser(), browser()
            dana = browser(mobile=True)
            opened += [alice, bob, carol, dana]
            for d, name in ((alice, "alice"), (bob, "bob"), (carol, "carol"), (dana, "dana")):
                login(d, base, name)
            wait(alice, "document.querySelectorAll('#presence li').length === 4", "presence")
            script = [
                (bob, "Morning! Is the staging deploy done?"),
                (carol, "Yes, 10 minutes ago. All checks green."),
                (alice, "Great, I'll start the load test: 10k subscribers, one publisher."),
                (dana, "Ping me when it runs, I'd like to watch the latency graph."),
                (bob, "p99 was 4 ms last time on this box."),
                (alice, "Running now."),
                (carol, "Looking good from here."),
                (dana, "Same here. Nice!"),
            ]
            for i, (d, text) in enumerate(script, 1):
                say(d, text)
                wait(
                    alice,
                    f"document.querySelectorAll('#messages li[data-off]').length === {i}",
                    "line",
                )
            # a second room for alice, then back to the lobby
            alice.find_element("id", "room-name").send_keys("load-tests")
            click(alice, "#new-room button")
            wait(
                alice,
                "document.querySelector('#conversation').dataset.name === 'load-tests'",
                "room",
            )
            click(alice, "#rooms li[data-room='lobby']")
            # direct messages: bob to alice and dana (unread: the badges)
            click(bob, "#presence li[data-user='alice']")
            say(bob, "Can you send me the numbers after?")
            click(bob, "#rooms li[data-room='lobby']")
            click(bob, "#presence li[data-user='dana']")
            say(bob, "Lunch at 1?")
            wait(alice, "document.querySelector(\"#dms li[data-peer='bob'] .badge\")", "badge")
            wait(dana, "document.querySelector('#menu .badge')", "the menu badge")
            time.sleep(0.3)  # the last scroll settles
            for d in (alice, dana):
                d.execute_script("document.activeElement && document.activeElement.blur()")
            alice.save_screenshot(str(out / "demo-desktop.png"))
            dana.save_screenshot(str(out / "demo-phone.png"))
            click(dana, "#menu")
            wait(dana, "document.querySelector('#side').offsetParent", "the side panel")
            dana.save_screenshot(str(out / "demo-phone-menu.png"))
        finally:
            for d in opened:
                d.quit()
            node.send_signal(signal.SIGTERM)
            node.wait(15)
    for name in ("demo-desktop.png", "demo-phone.png", "demo-phone-menu.png"):
        print(out / name, os.path.getsize(out / name), "bytes")


if __name__ == "__main__":
    main()
