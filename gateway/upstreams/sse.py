"""Incremental Server-Sent Events parsing over a byte stream."""

from __future__ import annotations

from collections.abc import AsyncIterator


class SSEEvent:
    __slots__ = ("event", "data")

    def __init__(self, event: str | None, data: bytes) -> None:
        self.event = event
        self.data = data


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    """Yield events as soon as their blank-line terminator arrives; tolerates CRLF and split lines."""
    buffer = b""
    event: str | None = None
    data: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line = buffer[:newline].rstrip(b"\r")
            buffer = buffer[newline + 1 :]
            if not line:
                if data:
                    yield SSEEvent(event, b"\n".join(data))
                event, data = None, []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode()
    if data:
        yield SSEEvent(event, b"\n".join(data))
