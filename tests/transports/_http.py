"""A raw HTTP client for the stream transports: the bytes on the wire, nothing hidden."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

T = 5.0


@dataclass
class Event:
    """One SSE event as a browser's parser sees it (comments kept apart)."""

    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        assert self.data is not None, self
        return orjson.loads(self.data)


class Stream:
    """An open SSE / HTTP-streaming response."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, head: str
    ) -> None:
        self.reader, self.writer, self.status, self.head = reader, writer, status, head
        self.buf = b""

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    async def event(self, timeout: float = T) -> Event:
        """The next event (an id-only or comment-only block counts as one)."""
        while b"\n\n" not in self.buf:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                raise EOFError(f"stream ended; buffered {self.buf!r}")
            self.buf += chunk
        block, self.buf = self.buf.split(b"\n\n", 1)
        ev = Event()
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                ev.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                ev.data = value if ev.data is None else ev.data + "\n" + value
            elif name == "id":
                ev.id = value
            elif name == "retry":
                ev.retry = int(value)
        return ev

    async def data(self, timeout: float = T, skip_ids: bool = True) -> Any:
        """The next event with data, as JSON (id-only events and comments skipped)."""
        while True:
            ev = await self.event(timeout)
            if ev.data is not None:
                return ev.json
            if not skip_ids and ev.id is not None:
                return ev

    async def until(self, op: str, timeout: float = T) -> Any:
        while True:
            obj = await self.data(timeout)
            if obj.get("op") == op:
                return obj

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Stream:
    """Send one request; return once the response head is in (the body may go on)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = await asyncio.wait_for(reader.read(65536), T)
        if not chunk:
            break
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    status = int(text.split(" ", 2)[1]) if text else 0
    s = Stream(reader, writer, status, text)
    s.buf = rest
    return s


async def whole(port: int, method: str, target: str, **kw: Any) -> tuple[int, str, bytes]:
    """A request whose response ends: (status, head, body)."""
    s = await request(port, method, target, **kw)
    body = s.buf
    while True:
        chunk = await asyncio.wait_for(s.reader.read(65536), T)
        if not chunk:
            break
        body += chunk
    await s.close()
    return s.status, s.head, body


async def post(port: int, sid: str, *cmds: dict[str, Any], **kw: Any) -> int:
    body = b"\n".join(orjson.dumps(c) for c in cmds)
    status, _, _ = await whole(port, "POST", f"/stream/{sid}", body=body, **kw)
    return status
