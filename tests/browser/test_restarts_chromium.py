"""Issue P7 in headless Chromium: fastim.js (and the demo) across node restarts.

A real page loads ``/fastim.js`` from a node process that the test kills (SIGKILL) or
stops (SIGTERM) and starts again on the same ports, so the page's client reconnects to
the same address; the test publishes and sends through the node's HTTP API.

1. The two observations of the issue, as a page sees them (memory store):
   a. a direct message sent after a restart reaches ``onDirect`` (seq 1 of a new inbox
      epoch) after one ``onDirectGap`` saying where the old numbering ended, and is
      acknowledged in the new epoch;
   b. channel messages published after a restart, before the page came back, reach it:
      a gap (reason "epoch", lastOffset 5), then the new epoch from its start, then live;
   and an ack that reaches the node after it lost the numbering is sent once, not in a
   loop.
2. Every store (sqlite, the default; memory; redis) through a graceful restart and a
   kill -9, with a channel stream and a direct-message stream: on sqlite and redis
   everything once, in order, no gap; on memory the old epoch up to the gap, the new one
   from 1, nothing twice, everything published or sent after the restart.
3. The demo says where a room's (and the direct messages') history was lost, between
   the old and the new messages, and shows what came after the restart.

Every wait is bounded (``WAIT``); nothing asserts on speed.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults._node import NodeProc, free_port  # type: ignore[import-not-found]
from store._redis import RedisServer  # type: ignore[import-not-found]

from .conftest import WAIT, Browser, api, console_errors
from .test_demo_chromium import ROOM_TEXTS, click, login, say, wait_js

KEY = "browser-restarts-api-key-0123456789"
#: Chromium logs each refused reconnect while the node is down: expected, nothing else is
REFUSED = "net::ERR_CONNECTION_REFUSED"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``nodes(*serve_args)``: a node process on two free ports, started, with the HTTP
    API on (``KEY``), in the test's directory (the default sqlite store's file is there);
    ``restart(node, how)`` brings it back on the same ports. All stopped at the end."""
    made: list[Any] = []

    def make(*args: str) -> Any:
        node = NodeProc(tmp_path, free_port(), free_port(), "--api-key", KEY, *args)
        made.append(node)
        node.start()
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis-browser")))
    server.start()
    yield server
    server.kill()


def restart(node: Any, how: str) -> None:
    """kill9: SIGKILL (no goodbye, no flush), else SIGTERM (a graceful drain, exit 0);
    then start again with the same arguments, on the same ports."""
    assert node.alive
    if how == "kill9":
        node.kill()
    else:
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(15) == 0, node.log()
    node.start()


def publish(node: Any, ch: str, i: int) -> tuple[int, int, str]:
    """Publish ``{"i": i}``: (i, offset, epoch) once the node stored it."""
    r = api(node.ws_port, KEY, "POST", "publish", {"channel": ch, "data": {"i": i}})
    return i, r["offset"], r["epoch"]


def send(node: Any, to: str, n: int) -> tuple[int, int, str]:
    """A direct message ``{"n": n}`` from "sam": (n, seq, inbox epoch) once stored."""
    r = api(node.ws_port, KEY, "POST", "send", {"to": to, "from": "sam", "data": {"n": n}})
    assert r["dup"] is False
    return n, r["seq"], r["epoch"]


#: a page's client: every channel message and gap in `chan`, every direct message and
#: direct gap in `direct`, each list in the order the callbacks were called
PAGE = """
const [user, ch, backoff, done] = arguments;
import('/fastim.js').then(async (f) => {
  window.f = f;
  window.chan = [];
  window.direct = [];
  const client = window.client = f.connect({
    user, backoff,
    onDirect: (dm) => { direct.push(['dm', dm.seq, dm.epoch, dm.data.n]); },
    onDirectGap: (g) => { direct.push(['gap', g.lastEpoch, g.lastSeq, g.epoch]); },
  });
  window.sub = client.subscribe(ch, {
    onMessage: (m) => chan.push(['msg', m.offset, m.data.i]),
    onGap: (g) => chan.push(['gap', g.reason, g.lastEpoch, g.lastOffset, g.epoch, g.offset]),
  });
  done(await sub.ready);
}).catch((e) => done('error: ' + e));
"""


def open_page(
    browser: Callable[[], Browser], node: Any, user: str, ch: str, backoff: dict[str, Any]
) -> Browser:
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/health")  # a page of the node's origin
    ready = d.execute_async_script(PAGE, user, ch, backoff)
    assert isinstance(ready, dict) and ready["offset"] == 0, ready
    return d


def js(d: Browser, expr: str) -> Any:
    return d.execute_script(f"return ({expr});")


def page_errors(d: Browser) -> list[str]:
    return [e for e in console_errors(d) if REFUSED not in e]


#: quick reconnects: the node is back within a second
QUICK = {"base": 100, "factor": 2, "max": 400, "jitter": "full"}


# ----------------------------------------------------------------------- the observations


def test_a_direct_message_after_a_restart_reaches_the_page(
    browser: Callable[[], Browser], nodes: Callable[..., Any]
) -> None:
    node = nodes("--store", "memory", "--dm-retry", "0.5")
    d = open_page(browser, node, "bob", "news", QUICK)
    before = [send(node, "bob", n) for n in (1, 2, 3)]
    e1 = before[0][2]
    assert [s for _, s, _ in before] == [1, 2, 3] and {e for *_, e in before} == {e1}
    wait_js(d, "direct.length === 3 && client.inbox.acked === 3", "3 dms, acked")
    assert js(d, "client.inbox.epoch") == e1

    node.kill()
    node.start()  # --store memory: the inbox numbers from 1 again, in a new epoch
    _, seq, e2 = send(node, "bob", 4)
    assert seq == 1 and e2 != e1
    wait_js(d, "direct.length === 5", "the dm sent after the restart")
    assert js(d, "direct") == [
        ["dm", 1, e1, 1],
        ["dm", 2, e1, 2],
        ["dm", 3, e1, 3],
        ["gap", e1, 3, e2],  # onDirectGap, once, in order: nothing of E1 was missed
        ["dm", 1, e2, 4],  # delivered, not dropped as a copy of seq 1
    ]
    assert js(d, "client.inbox.lastGap") == {"lastEpoch": e1, "lastSeq": 3, "epoch": e2}
    assert js(d, "client.inbox.gaps") == 1
    wait_js(d, "client.inbox.acked === 1", "the ack in the new epoch")
    assert js(d, "client.inbox.epoch") == e2
    state = d.execute_async_script(
        "const done = arguments[0]; client.inboxState().then(done, (e) => done(String(e)));"
    )
    assert state == {"acked": 1, "top": 1, "epoch": e2}
    assert page_errors(d) == []


def test_an_ack_of_a_lost_numbering_is_not_repeated(
    browser: Callable[[], Browser], nodes: Callable[..., Any]
) -> None:
    """An ack that reaches the node after it lost the inbox's numbering (memory store
    restarted; here ``autoAck: false`` and the ack made after the reconnect; with autoAck
    an ack on its way at the kill does the same) changes nothing there: the node answers
    with another epoch (or none). The client used to send it again at once, forever:
    thousands of acks a second until a message of the new epoch came."""
    node = nodes("--store", "memory")
    d = browser()
    d.get(f"http://127.0.0.1:{node.ws_port}/health")
    d.execute_async_script(
        """
        const done = arguments[0];
        import('/fastim.js').then(async (f) => {
          window.direct = [];
          window.client = f.connect({user: 'eve', autoAck: false, backoff: {base: 50, max: 200},
            onDirect: (dm) => { direct.push(['dm', dm.seq, dm.epoch, dm.data.n]); },
            onDirectGap: (g) => { direct.push(['gap', g.lastEpoch, g.lastSeq, g.epoch]); }});
          await client.ready();
          done(true);
        }).catch((e) => done('error: ' + e));
        """
    )
    e1 = {send(node, "eve", n)[2] for n in (1, 2, 3)}.pop()
    wait_js(d, "direct.length === 3", "3 dms, not acked")
    node.kill()
    node.start()
    wait_js(d, "client.reconnects === 1 && client.state === 'connected'", "the page back")
    d.execute_script("client.ack(3)")  # one request (its id taken now)...
    before = js(d, "client._nextId")
    time.sleep(1.0)
    again = js(d, "client._nextId") - before
    assert again == 0, f"the ack was sent {again} more times in 1 s"  # ...and no more
    assert js(d, "[client.inbox.taken, client.inbox.acked]") == [3, 0]
    # the new numbering arrives, and its acks count
    _, seq, e2 = send(node, "eve", 4)
    assert seq == 1 and e2 != e1
    wait_js(d, "direct.length === 5", "the new epoch's first dm")
    assert js(d, "direct.slice(3)") == [["gap", e1, 3, e2], ["dm", 1, e2, 4]]
    d.execute_script("client.ack(1)")
    wait_js(d, f"client.inbox.acked === 1 && client.inbox.epoch === '{e2}'", "the ack counts")
    assert page_errors(d) == []


def test_a_channel_message_after_a_restart_is_not_skipped(
    browser: Callable[[], Browser], nodes: Callable[..., Any]
) -> None:
    node = nodes("--store", "memory")
    # the page comes back 3 s after it lost the node: after the publishes below
    late = {"base": 3000, "factor": 1, "max": 3000, "jitter": "none"}
    d = open_page(browser, node, "cleo", "news", late)
    first = [publish(node, "news", i) for i in range(5)]
    e1 = first[0][2]
    wait_js(d, "chan.length === 5", "5 messages live")
    assert js(d, "sub.epoch") == e1

    node.kill()
    node.start()
    after = [publish(node, "news", i) for i in range(5, 8)]
    e2 = after[0][2]
    assert [off for _, off, _ in after] == [1, 2, 3] and e2 != e1  # the new epoch
    assert js(d, "client.reconnects === 0 && client.state === 'reconnecting'"), (
        "the page came back before the publishes: too early for this test"
    )
    wait_js(d, "chan.length === 9", "the gap and the new epoch's 3 messages")
    publish(node, "news", 8)
    wait_js(d, "chan.length === 10", "live after the recovery")
    assert js(d, "chan") == [
        *(["msg", off, off - 1] for off in range(1, 6)),
        ["gap", "epoch", e1, 5, e2, 3],
        ["msg", 1, 5],
        ["msg", 2, 6],
        ["msg", 3, 7],
        ["msg", 4, 8],
    ]
    assert js(d, "client.reconnects") == 1
    assert page_errors(d) == []


# ---------------------------------------------------------------- every store, both ways


class Streams(threading.Thread):
    """Publishes ``{"i": 0, 1, ...}`` to a channel and sends ``{"n": 0, 1, ...}`` to a
    user (a send every third publish), each once, paced, through the HTTP API, whatever
    happens to the node meanwhile, until :meth:`wait_for` has what it asks for. What the
    node acknowledged goes to ``acked`` / ``sent`` as (number, offset or seq, epoch);
    what failed (the node down, or stopped before it answered: stored or not) to
    ``unsure``. Nothing is retried, so nothing can be stored twice."""

    def __init__(self, node: Any, ch: str, to: str) -> None:
        super().__init__(daemon=True)
        self.node, self.ch, self.to = node, ch, to
        self.acked: list[tuple[int, int, str]] = []
        self.sent: list[tuple[int, int, str]] = []
        self.unsure: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.done.is_set() and i < 1000:
            self._one(self.acked, publish, self.ch, i)
            if i % 3 == 0:
                self._one(self.sent, send, self.to, i // 3)
            i += 1
            time.sleep(0.01)

    def _one(self, out: list[tuple[int, int, str]], call: Callable[..., Any], *args: Any) -> None:
        try:
            out.append(call(self.node, *args))
        except (OSError, http.client.HTTPException) as e:  # refused, reset, 503...
            self.unsure.append(f"{call.__name__} {args}: {e}")
            time.sleep(0.05)

    def wait_for(self, acked: int, sent: int) -> None:
        """Until ``acked`` publishes and ``sent`` sends are acknowledged in all."""
        deadline = time.monotonic() + WAIT
        while len(self.acked) < acked or len(self.sent) < sent:
            assert self.is_alive() and time.monotonic() < deadline, (
                f"{len(self.acked)} publishes and {len(self.sent)} sends acknowledged: "
                f"{self.unsure[-3:]}"
            )
            time.sleep(0.005)


@pytest.mark.parametrize("how", ["restart", "kill9"])
@pytest.mark.parametrize("store", ["sqlite", "memory", "redis"])
def test_streams_across_a_restart_on_every_store(
    browser: Callable[[], Browser],
    nodes: Callable[..., Any],
    request: pytest.FixtureRequest,
    store: str,
    how: str,
) -> None:
    """A channel stream and a direct-message stream to a page, the node restarted
    (SIGTERM, then start) or killed (SIGKILL, then start) in the middle: 20 publishes
    and 7 sends acknowledged before, as many after (the page back or not yet)."""
    args: list[str] = []  # sqlite: the default, no flag
    if store == "memory":
        args = ["--store", "memory"]
    elif store == "redis":
        server = request.getfixturevalue("redis_server")
        prefix = f"browser{uuid.uuid4().hex[:8]}"
        args = ["--store", "redis", "--redis-url", server.url, "--redis-prefix", prefix]
    node = nodes(*args, "--dm-retry", "0.5")
    d = open_page(browser, node, "dora", "stream", QUICK)

    streams = Streams(node, "stream", "dora")
    streams.start()
    try:
        streams.wait_for(20, 7)
        restart(node, how)
        streams.wait_for(len(streams.acked) + 20, len(streams.sent) + 7)  # after the restart
    finally:
        streams.done.set()
        streams.join(WAIT)
    acked, sent = streams.acked, streams.sent
    e1, e2 = acked[0][2], acked[-1][2]
    d1, d2 = sent[0][2], sent[-1][2]
    new_pubs = [(i, off) for i, off, e in acked if e == e2]
    new_sends = [(n, s) for n, s, e in sent if e == d2]

    # everything acknowledged (durable) or acknowledged after the restart (memory) arrives
    want_i = [i for i, _, e in acked if store != "memory" or e == e2]
    want_n = [n for n, _, e in sent if store != "memory" or e == d2]
    wait_js(
        d,
        f"{want_i}.every((i) => chan.some((x) => x[0] === 'msg' && x[2] === i))"
        f" && {want_n}.every((n) => direct.some((x) => x[0] === 'dm' && x[3] === n))",
        "what the node acknowledged",
    )
    wait_js(d, "client.inbox.acked > 0 && client.inbox.acked === client.inbox.delivered", "dm acks")
    # a late copy would come before a marker published and sent last (both -1)
    _, mark_off, _ = publish(node, "stream", -1)
    _, mark_seq, _ = send(node, "dora", -1)
    wait_js(
        d,
        "chan.length > 0 && chan[chan.length - 1][0] === 'msg' && chan[chan.length - 1][2] === -1"
        " && direct.length > 0 && direct[direct.length - 1][0] === 'dm'"
        " && direct[direct.length - 1][3] === -1",
        "the markers, last",
    )
    chan, direct = js(d, "chan"), js(d, "direct")
    assert chan.pop()[:3] == ["msg", mark_off, -1] and direct.pop()[:2] == ["dm", mark_seq]
    numbers = [x[2] for x in chan if x[0] == "msg"]
    assert len(numbers) == len(set(numbers)), f"a message came twice: {chan}"
    dm_numbers = [x[3] for x in direct if x[0] == "dm"]
    assert len(dm_numbers) == len(set(dm_numbers)), f"a dm came twice: {direct}"

    if store != "memory":
        # the same history and the same inbox: nothing missed, nothing to tell the page
        assert (e1, d1) == (e2, d2)
        assert [x[:2] for x in chan] == [["msg", off] for off in range(1, len(chan) + 1)], chan
        by_off = {x[1]: x[2] for x in chan}
        assert all(by_off[off] == i for i, off, _ in acked), chan
        assert [x[:3] for x in direct] == [["dm", s, d1] for s in range(1, len(direct) + 1)]
        by_seq = {x[1]: x[3] for x in direct}
        assert all(by_seq[s] == n for n, s, _ in sent), direct
        assert js(d, "sub.epoch") == e1 and js(d, "client.inbox.epoch") == d1
        assert js(d, "[sub.gaps, client.inbox.gaps]") == [0, 0]
        assert page_errors(d) == []
        return

    # memory: a new history and a new inbox numbering after the restart; the page got
    # the old epoch up to where the gap says it ended, then the new one from its start
    assert e1 != e2 and d1 != d2
    gaps = [k for k, x in enumerate(chan) if x[0] == "gap"]
    assert len(gaps) == 1, chan
    cut = gaps[0]
    _, reason, last_epoch, last_offset, epoch, _ = chan[cut]
    assert (reason, last_epoch, epoch) == ("epoch", e1, e2), chan[cut]
    old, new = chan[:cut], chan[cut + 1 :]
    assert [x[1] for x in old] == list(range(1, last_offset + 1)), chan
    old_by_i = {i: off for i, off, e in acked if e == e1}
    assert all(old_by_i.get(x[2], x[1]) == x[1] for x in old), chan
    assert [x[1] for x in new] == list(range(1, len(new) + 1)), chan
    assert [x for x in new if x[2] in dict(new_pubs)] == [["msg", o, i] for i, o in new_pubs]

    dgaps = [k for k, x in enumerate(direct) if x[0] == "gap"]
    assert len(dgaps) == 1, direct
    dcut = dgaps[0]
    _, dlast_epoch, last_seq, depoch = direct[dcut]
    assert (dlast_epoch, depoch) == (d1, d2), direct[dcut]
    dold, dnew = direct[:dcut], direct[dcut + 1 :]
    assert [x[:3] for x in dold] == [["dm", s, d1] for s in range(1, last_seq + 1)], direct
    old_by_n = {n: s for n, s, e in sent if e == d1}
    assert all(old_by_n.get(x[3], x[1]) == x[1] for x in dold), direct
    assert [x[:3] for x in dnew] == [["dm", s, d2] for s in range(1, len(dnew) + 1)], direct
    assert [x for x in dnew if x[3] in dict(new_sends)] == [["dm", s, d2, n] for n, s in new_sends]
    assert js(d, "[sub.epoch, client.inbox.epoch]") == [e2, d2]
    assert page_errors(d) == []


# ----------------------------------------------------------------------------- the demo

#: the conversation as shown: [kind, text, offset] per line ("gap" lines: the notice)
SHOWN = """
return [...document.querySelectorAll('#messages li')].map((li) => [
  li.classList.contains('gap') ? 'gap:' + li.dataset.gap : li.dataset.who || 'notice',
  li.querySelector('.text').textContent,
  li.dataset.off === undefined ? null : +li.dataset.off,
]);
"""


def test_demo_shows_where_history_was_lost(
    browser: Callable[[], Browser], nodes: Callable[..., Any], tmp_path: Path
) -> None:
    """The demo against a node without a store (memory): a room's messages, a direct
    conversation, kill -9, start again, more messages. The room shows a line saying its
    history was lost, between the old messages and the new ones (offsets from 1 again:
    shown, not dropped); the direct conversation the same. A screenshot of it goes to
    $DEMO_SCREENSHOTS (docs/img/demo-history-lost.png was taken so), else tmp_path."""
    from selenium.webdriver.common.by import By

    node = nodes("--store", "memory")
    base = f"http://127.0.0.1:{node.ws_port}"
    d = browser()
    d.set_window_size(1200, 760)
    login(d, base, "alice")
    shown: list[tuple[str, str, int]] = []

    def bob(text: str) -> None:
        data = {"user": "bob", "text": text, "ts": int(time.time() * 1000)}
        api(node.ws_port, KEY, "POST", "publish", {"channel": "room:lobby", "data": data})

    def post(who: str, text: str) -> None:
        if who == "alice":
            say(d, text)
        else:
            bob(text)
        shown.append((who, text, len(shown) + 1))
        n = sum(1 for w, *_ in shown if not w.startswith("gap"))
        wait_js(d, f"{ROOM_TEXTS}.length === {n}", f"{text!r} shown")

    post("alice", "morning! is the release still on for today?")
    post("bob", "yes, tagging it after lunch")
    post("alice", "great, I'll update the changelog")
    api(node.ws_port, KEY, "POST", "send", {"to": "alice", "from": "bob", "data": {
        "text": "can you review my PR first?", "ts": int(time.time() * 1000)}})  # fmt: skip
    wait_js(d, "document.querySelector(\"#dms li[data-peer='bob'] .badge\")", "bob's dm")

    node.kill()  # kill -9: the memory store's history and inboxes are gone
    wait_js(d, "document.querySelector('#status').dataset.state === 'reconnecting'", "offline")
    node.start()
    wait_js(d, "document.querySelector('#status').dataset.state === 'connected'", "back")
    gap = wait_js(d, "document.querySelector('#messages li.gap')?.textContent", "the gap line")
    assert gap == (
        "history was lost here: messages after #3 are gone (the node restarted without its store)"
    )
    shown.append(("gap:epoch", gap, 0))
    post("bob", "the server just restarted, did you get my last message?")
    post("alice", "no, that one is gone - can you send it again?")
    wait_js(d, "!document.querySelector('#messages li.pending')", "alice's line confirmed")

    lines = [tuple(x) for x in d.execute_script(SHOWN)]
    assert lines == [
        ("alice", shown[0][1], 1),
        ("bob", shown[1][1], 2),
        ("alice", shown[2][1], 3),
        ("gap:epoch", gap, None),  # between the old messages and the new ones
        ("bob", shown[4][1], 1),  # the new history, from its start: shown, not dropped
        ("alice", shown[5][1], 2),
    ], lines
    out = Path(os.environ.get("DEMO_SCREENSHOTS") or tmp_path)
    d.save_screenshot(str(out / "demo-history-lost.png"))

    # the direct conversation: the new numbering's first message after a line that says so
    api(node.ws_port, KEY, "POST", "send", {"to": "alice", "from": "bob", "data": {
        "text": "here it is again: can you review my PR first?", "ts": 0}})  # fmt: skip
    wait_js(d, "document.querySelector(\"#dms li[data-peer='bob'] .badge\")", "the new dm")
    click(d, By.CSS_SELECTOR, "#dms li[data-peer='bob']")
    wait_js(d, "document.querySelectorAll('#messages li').length === 3", "the conversation")
    dm_lines = [tuple(x[:2]) for x in d.execute_script(SHOWN)]
    assert dm_lines == [
        ("bob", "can you review my PR first?"),
        ("gap:epoch", "history was lost here: messages sent to you before this line and not "
         "shown are gone (the node restarted without its store)"),
        ("bob", "here it is again: can you review my PR first?"),
    ], dm_lines  # fmt: skip
    assert page_errors(d) == []
