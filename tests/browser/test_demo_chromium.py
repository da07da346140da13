"""End to end in headless Chromium: the demo chat and fastim.js against a real node process.

1. The demo (/demo/): two browsers chat as two users through the node; each sees the
   other in the room's presence list (join and leave events); a direct message from
   one reaches the other; one leaves the page while messages are sent, comes back, and
   the history it missed is on the page, in order, once; a reload changes nothing.
2. fastim.js itself: a page's client subscribed to a channel and receiving direct
   messages while the node is stopped and started again (sqlite store: same history).
   Messages and direct messages stored while the page was cut off arrive by recovery
   and replay, every one exactly once and in order; the node's retries of unacked
   direct messages are dropped as copies; the ack reaches the store; a send made while
   disconnected is stored once; a disconnect by the server (4510) ends the client
   instead of reconnecting.
3. A page hidden (pagehide: its socket closed, the node sees it go) and shown again
   from the back/forward cache (pageshow) recovers what it missed once and in order,
   and a gap where the namespace's history was too short, at its place in the stream.

Every wait is bounded (``WAIT``); nothing asserts on speed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import WAIT, Browser, api, console_errors, free_port

KEY = "browser-test-api-key-0123456789"

CONFIG = """
api_key = "{key}"
store = "sqlite"
store_path = "{db}"
dm_retry = {dm_retry}
[namespaces.room]
join_leave = true
"""


def write_config(tmp_path: Path, dm_retry: float = 2.0, extra: str = "") -> str:
    path = tmp_path / "fastim.toml"
    text = CONFIG.format(key=KEY, db=tmp_path / "fastim.db", dm_retry=dm_retry) + extra
    path.write_text(text)
    return str(path)


def wait_js(driver: Browser, script: str, what: str, timeout: float = WAIT) -> Any:
    """Poll ``script`` (a JS expression) until it is truthy; return its value."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.wait import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: d.execute_script(f"return ({script});")
        )
    except TimeoutException:
        state = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"waited {timeout}s for {what}; page shows:\n{state}") from None


def click(driver: Browser, by: str, selector: str, timeout: float = WAIT) -> None:
    """Find and click, again if the page re-rendered the element in between (the demo
    redraws its lists on presence and direct-message events: a found element can go
    stale before the click reaches it)."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            driver.find_element(by, selector).click()
            return
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ----------------------------------------------------------------------------- the demo

ROOM_TEXTS = (
    "Array.from(document.querySelectorAll('#messages li[data-off]'))"
    ".map(li => [li.dataset.who, li.querySelector('.text').textContent, +li.dataset.off])"
)
PEOPLE = "Array.from(document.querySelectorAll('#presence li')).map(li => li.dataset.user)"


def login(driver: Browser, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/demo")  # the 301 to /demo/ is followed
    driver.find_element(By.ID, "name").send_keys(name)
    click(driver, By.ID, "join")
    wait_js(driver, "document.querySelector('#status').dataset.state === 'connected'", "connected")


def say(driver: Browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "text")
    box.send_keys(text)
    click(driver, By.ID, "send")


def room_lines(driver: Browser) -> list[tuple[str, str, int]]:
    return [tuple(x) for x in driver.execute_script(f"return {ROOM_TEXTS};")]


def test_demo_two_users_chat_presence_dm_and_history(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = node_process("--config", write_config(tmp_path))
    base = f"http://127.0.0.1:{node.ws_port}"
    a, b = browser(), browser()
    login(a, base, "alice")
    login(b, base, "bob")
    # presence: each sees both (bob's join reached alice as an event or a refresh)
    for d in (a, b):
        wait_js(d, f"{PEOPLE}.sort().join() === 'alice,bob'", "alice and bob in presence")

    # chat both ways
    say(a, "hello bob")
    wait_js(b, f"{ROOM_TEXTS}.some(([w, t]) => w === 'alice' && t === 'hello bob')", "a's line")
    say(b, "hi alice")
    wait_js(a, f"{ROOM_TEXTS}.some(([w, t]) => w === 'bob' && t === 'hi alice')", "b's line")

    # a direct message: alice opens bob from the presence list
    click(a, By.CSS_SELECTOR, "#presence li[data-user='bob']")
    wait_js(a, "document.querySelector('#conversation').dataset.kind === 'dm'", "dm view")
    say(a, "psst, bob")
    wait_js(a, "!document.querySelector('#messages li.pending')", "the send acknowledged")
    badge = wait_js(
        b, "document.querySelector(\"#dms li[data-peer='alice'] .badge\")?.textContent", "dm badge"
    )
    assert badge == "1"
    click(b, By.CSS_SELECTOR, "#dms li[data-peer='alice']")
    dm_shown = (
        "[...document.querySelectorAll('#messages li')]"
        ".some(li => li.dataset.who === 'alice' && li.textContent.includes('psst, bob'))"
    )
    wait_js(b, dm_shown, "the dm")
    click(b, By.CSS_SELECTOR, "#rooms li[data-room='lobby']")
    seen_before = room_lines(b)
    assert [(w, t) for w, t, _ in seen_before] == [("alice", "hello bob"), ("bob", "hi alice")]

    # bob leaves the page: alice sees him go (leave event), then chats on without him
    b.get(f"{base}/health")
    click(a, By.CSS_SELECTOR, "#rooms li[data-room='lobby']")
    wait_js(a, f"{PEOPLE}.join() === 'alice'", "bob gone from presence")
    missed = [f"while you were away {i}" for i in range(3)]
    for text in missed:
        say(a, text)
    wait_js(a, f"{ROOM_TEXTS}.length === 5", "alice's own lines back from the node")

    # bob comes back (same tab: the page remembers his name): the history he missed
    b.get(f"{base}/demo/")
    wait_js(b, "document.querySelector('#status').dataset.state === 'connected'", "reconnected")
    wait_js(b, f"{ROOM_TEXTS}.length >= 5", "history on join")
    back = room_lines(b)
    expected = [("alice", "hello bob"), ("bob", "hi alice")] + [("alice", t) for t in missed]
    assert [(w, t) for w, t, _ in back] == expected  # in order, each once
    offsets = [o for _, _, o in back]
    assert offsets == sorted(set(offsets)) and offsets[:2] == [o for _, _, o in seen_before]
    wait_js(a, f"{PEOPLE}.sort().join() === 'alice,bob'", "bob back in presence")

    # live again after the history, and a reload shows the same, once
    say(a, "welcome back")
    wait_js(b, f"{ROOM_TEXTS}.length === 6", "the live line after the history")
    b.refresh()
    wait_js(b, f"{ROOM_TEXTS}.length >= 6", "history after a reload")
    assert [(w, t) for w, t, _ in room_lines(b)] == [*expected, ("alice", "welcome back")]
    for d in (a, b):
        assert console_errors(d) == []


def test_demo_off_is_not_served(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    node = node_process("--config", write_config(tmp_path), "--demo", "0")
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/demo/")
    assert "no such endpoint" in d.find_element("tag name", "body").text
    # the client is served all the same
    d.get(f"http://127.0.0.1:{node.ws_port}/health")
    kind = d.execute_async_script(
        "const done = arguments[0];"
        "import('/fastim.js').then(m => done(typeof m.connect), e => done(String(e)));"
    )
    assert kind == "function"


# ----------------------------------------------------------------------------- fastim.js

PAGE_SETUP = """
const done = arguments[arguments.length - 1];
const [user] = arguments;
import('/fastim.js').then(async (f) => {
  window.f = f;
  window.got = []; window.gaps = []; window.dms = []; window.states = [];
  const client = window.client = f.connect({
    user,
    backoff: {base: 200, max: 1000},
    onState: (s) => window.states.push(s),
    // slow on purpose: the node sends an unacked message again every dm_retry
    onDirect: async (dm) => { window.dms.push([dm.seq, dm.from, dm.data.n]);
                              await new Promise(r => setTimeout(r, 700)); },
  });
  const sub = window.sub = client.subscribe('feed', {
    onMessage: (m) => window.got.push([m.offset, m.data.i]),
    onGap: (g) => window.gaps.push(g),
  });
  done(await sub.ready);
}).catch(e => done('error: ' + e));
"""


def test_fastim_js_exactly_once_across_a_node_restart(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    config = write_config(tmp_path, dm_retry=0.25)
    first = node_process("--config", config)
    ports = ("--tcp-port", str(first.tcp_port), "--ws-port", str(first.ws_port))
    d = browser()
    d.get(f"http://127.0.0.1:{first.ws_port}/health")  # any page of the node's origin
    ready = d.execute_async_script(PAGE_SETUP, "tess")
    assert isinstance(ready, dict) and ready["offset"] == 0, ready

    def publish(port: int, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            api(port, KEY, "POST", "publish", {"channel": "feed", "data": {"i": i}})

    def dm(port: int, n: int) -> None:
        api(port, KEY, "POST", "send", {"to": "tess", "from": "sam", "data": {"n": n}})

    publish(first.ws_port, 0, 10)
    for n in (1, 2, 3):
        dm(first.ws_port, n)
    wait_js(d, "window.got.length === 10 && window.dms.length === 3", "live messages and dms")
    # the slow handler let the node resend: copies were dropped, each seq handed over once
    wait_js(d, "client.inbox.acked === 3", "the cumulative ack")
    assert d.execute_script("return client.inbox.duplicates") > 0

    # the node stops (1001: reconnect); meanwhile a node on other ports, same store,
    # takes messages and direct messages the page cannot see live
    assert first.terminate(signal.SIGTERM) == 0
    wait_js(d, "client.state === 'reconnecting'", "the page noticed")
    d.execute_script(
        "window.sent = null;"
        "client.send('pat', {n: 99}, {cid: 'tess-to-pat-1'}).then(s => window.sent = s,"
        "  e => window.sent = 'error: ' + e);"
    )  # made while disconnected: goes out (once) when connected again
    side = node_process("--config", config)
    publish(side.ws_port, 10, 20)
    for n in (4, 5):
        dm(side.ws_port, n)
    assert side.terminate(signal.SIGTERM) == 0

    node_process("--config", config, *ports)
    wait_js(d, "window.got.length >= 20 && window.dms.length >= 5", "recovery and replay")
    wait_js(d, "client.inbox.acked === 5", "acks after the replay")
    got = d.execute_script("return window.got")
    assert got == [[off, off - 1] for off in range(1, 21)]  # offsets 1..20, each once
    assert d.execute_script("return window.gaps") == []
    assert d.execute_script("return client.reconnects") >= 1
    assert d.execute_script("return window.dms") == [[s, "sam", s] for s in range(1, 6)]
    sent = wait_js(d, "window.sent", "the send made while disconnected")
    assert sent == {"mid": sent["mid"], "seq": 1, "dup": False, "epoch": sent["epoch"]}, sent
    assert sent["epoch"], "a send names the recipient inbox's epoch"

    # pat's inbox holds that message once: a client of pat's in the page gets seq 1 only
    pat = d.execute_async_script(
        """
        const done = arguments[0];
        const pat = f.connect({user: 'pat', onDirect: (dm) => window.pats.push(dm.seq)});
        window.pats = [];
        pat.ready().then(async () => {
          for (let i = 0; i < 100 && !(window.pats.length && pat.inbox.acked); i++)
            await new Promise(r => setTimeout(r, 50));
          done({state: await pat.inboxState(), seqs: window.pats});
        }, e => done('error: ' + e));
        """
    )
    assert pat == {"state": {"acked": 1, "top": 1, "epoch": sent["epoch"]}, "seqs": [1]}, pat
    # live after all that, still once
    publish(first.ws_port, 20, 21)  # (back listens on the first node's ports)
    wait_js(d, "window.got.length === 21", "live after recovery")
    assert d.execute_script("return window.got.at(-1)") == [21, 20]
    # disconnected by the server (4510: do not reconnect automatically): closed for good
    api(first.ws_port, KEY, "POST", "disconnect", {"user": "tess", "reason": "bye"})
    wait_js(d, "client.state === 'closed'", "the client closed for good")
    err = d.execute_async_script(
        "const done = arguments[0];"
        "client.publish('feed', 1).then(() => done('published'), e => done([e.name, e.code]));"
    )
    assert err == ["ConnectionClosed", 4510]
    assert d.execute_script("return window.states.at(-1)") == "closed"
    # Chromium logs each refused reconnect while the node was down; nothing else
    # the attempts while the node was down: WebSocket, then the fallbacks (/stream, /sse)
    refused = "net::ERR_CONNECTION_REFUSED"
    assert [e for e in console_errors(d) if refused not in e] == []


RESUME_SETUP = """
const done = arguments[0];
import('/fastim.js').then(async (f) => {
  window.log = [];
  const client = window.client = f.connect({user: 'una'});
  for (const ch of ['feed', 'tiny:x']) {
    client.subscribe(ch, {
      onMessage: (m) => log.push(['msg', m.channel, m.offset, m.data]),
      onGap: (g) => log.push(['gap', g.channel, g.lastOffset, g.offset, g.reason]),
    });
  }
  await Promise.all([...client.subscriptions.values()].map((s) => s.ready));
  done(true);
}).catch((e) => done('error: ' + e));
"""


def test_fastim_js_page_hidden_and_shown_again_recovers_and_reports_a_gap(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    """pagehide closes the socket (the node sees the user go); pageshow from the
    back/forward cache reconnects and recovers: what the node kept arrives once, in
    order, and what it no longer had is a gap at its place in the stream."""
    tiny = "[namespaces.tiny]\nhistory_size = 3\n"
    node = node_process("--config", write_config(tmp_path, extra=tiny))
    port = node.ws_port
    d = browser()
    d.get(f"http://127.0.0.1:{port}/health")
    assert d.execute_async_script(RESUME_SETUP) is True

    def publish(ch: str, values: range) -> None:
        for i in values:
            api(port, KEY, "POST", "publish", {"channel": ch, "data": i})

    publish("feed", range(2))
    publish("tiny:x", range(2))
    wait_js(d, "log.length === 4", "live messages")

    d.execute_script("dispatchEvent(new PageTransitionEvent('pagehide', {persisted: true}))")
    wait_js(d, "client.state === 'suspended'", "suspended")
    for _ in range(int(WAIT / 0.05)):  # the node sees the socket closed
        if api(port, KEY, "GET", "presence?channel=feed")["count"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the node still counts the hidden page's subscription")
    publish("feed", range(2, 5))
    publish("tiny:x", range(2, 8))  # offsets 3..8; the namespace keeps the last 3

    d.execute_script("dispatchEvent(new PageTransitionEvent('pageshow', {persisted: true}))")
    wait_js(d, "log.length === 4 + 3 + 1 + 3", "recovery after pageshow")
    log = d.execute_script("return log")
    feed = [e for e in log if e[1] == "feed"]
    assert feed == [["msg", "feed", off, off - 1] for off in range(1, 6)]
    assert [e for e in log if e[1] == "tiny:x"] == [
        ["msg", "tiny:x", 1, 0],
        ["msg", "tiny:x", 2, 1],
        ["gap", "tiny:x", 2, 8, "trimmed"],  # 3..5 are gone: said so, in stream order
        ["msg", "tiny:x", 6, 5],
        ["msg", "tiny:x", 7, 6],
        ["msg", "tiny:x", 8, 7],
    ]
    assert d.execute_script("return client.reconnects") == 1
    publish("feed", range(5, 6))
    wait_js(d, "log.at(-1)[2] === 6", "live again")
    assert console_errors(d) == []


def test_fastim_js_tries_the_next_url(
    browser: Callable[[], Browser], node_process: Any, tmp_path: Path
) -> None:
    """A node that refuses the connection is followed by the next URL of the list."""
    node = node_process("--config", write_config(tmp_path))
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/health")
    dead = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there
    live = f"ws://127.0.0.1:{node.ws_port}/ws"
    got = d.execute_async_script(
        """
        const [urls, done] = arguments;
        import('/fastim.js').then(async (f) => {
          const states = [];
          const c = f.connect({url: urls, user: 'ulf', backoff: {base: 50},
                               onState: (s, info) => states.push([s, info.code ?? null])});
          await c.ready();
          const off = await c.publish('feed', 'via the second url');
          done({states, off, node: c.welcome.node});
        }).catch((e) => done('error: ' + e));
        """,
        [dead, live],
    )
    assert got == {
        "states": [["reconnecting", 1006], ["connected", None]],
        "off": 1,
        "node": "proc-node",
    }, got
