"""Child process of the kill -9 test: appends to a sqlite store and reports each ack.

Usage: ``python -m tests.store._appender PATH``. Prints ``epoch E`` once, then one line
per acknowledged write, flushed at once: ``ack OFFSET TOKEN`` for channel appends and
``inbox SEQ MSG_ID TOKEN`` for inbox sends. It mixes single awaited appends, appends
gathered in one tick (group commit) and append_many batches, and runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from fastim.store import HistoryLimits
from fastim.store.sqlite import SqliteStore


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(path: str) -> None:
    store = await SqliteStore.open(path, HistoryLimits(size=1_000_000))
    say(f"epoch {(await store.state('c')).epoch}")
    token = 0
    while True:
        token += 1
        off, _ = await store.append("c", b"t%d" % token)
        say(f"ack {off} {token}")
        tokens = list(range(token + 1, token + 11))
        token += 10
        results = await asyncio.gather(*(store.append("c", b"t%d" % t) for t in tokens))
        for t, r in zip(tokens, results, strict=True):
            say(f"ack {r.offset} {t}")
        tokens = list(range(token + 1, token + 21))
        token += 20
        first, _ = await store.append_many("c", [b"t%d" % t for t in tokens])
        for i, t in enumerate(tokens):
            say(f"ack {first + i} {t}")
        token += 1
        sent = await store.inbox_append("u", b"t%d" % token, f"c{token}", "s")
        say(f"inbox {sent.seq} {sent.msg_id} {token}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
