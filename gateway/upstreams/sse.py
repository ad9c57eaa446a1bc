"""Incremental Server-Sent Events parsing over a byte stream.

Linear in the bytes received: each byte is searched for a newline once, however the
upstream splits its lines, and a line (or an event's data) past ``max_line_bytes``
ends the stream instead of growing a buffer without bound.

An event whose data spans several ``data:`` lines has them joined with a space, not the
newline the SSE standard joins them with: every payload read here is JSON (or ``[DONE]``),
where the two are the same whitespace, and a passed-through event's data is sent on behind
a single ``data:`` field, where a newline would cut it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

__all__ = ["DEFAULT_MAX_LINE_BYTES", "SSEEvent", "SSELineTooLong", "iter_sse"]

DEFAULT_MAX_LINE_BYTES = 1 << 20


class SSELineTooLong(ValueError):
    """A line, or one event's data, grew past the cap."""


class SSEEvent:
    __slots__ = ("data", "event")

    def __init__(self, event: str | None, data: bytes) -> None:
        self.event = event
        self.data = data


async def iter_sse(
    chunks: AsyncIterator[bytes], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> AsyncIterator[SSEEvent]:
    """Yield events as soon as their blank-line terminator arrives; lines end in LF, CRLF or CR,
    and may be split anywhere."""
    buffer = bytearray()
    event: str | None = None
    data: list[bytes] = []
    data_size = 0
    carried_cr = False
    async for chunk in chunks:
        if carried_cr:
            chunk, carried_cr = b"\r" + chunk, False
        if b"\r" in chunk:  # a lone CR ends a line as CRLF and LF do (the SSE standard): all become LF
            if chunk.endswith(b"\r"):  # its LF may be the next chunk's first byte
                chunk, carried_cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        scan_from = len(buffer)  # what is already buffered holds no newline
        buffer += chunk
        start = 0
        while True:
            newline = buffer.find(b"\n", max(start, scan_from))
            if newline < 0:
                break
            line = bytes(buffer[start:newline]).rstrip(b"\r")
            start = newline + 1
            if not line:
                if data:
                    yield SSEEvent(event, b" ".join(data))
                event, data, data_size = None, [], 0
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data_size += len(value) + 1
                if data_size > max_line_bytes:
                    raise SSELineTooLong(f"an event's data exceeds {max_line_bytes} bytes")
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace")
        if start:
            del buffer[:start]
        if len(buffer) > max_line_bytes:
            raise SSELineTooLong(f"a line exceeds {max_line_bytes} bytes")
    if data:
        yield SSEEvent(event, b" ".join(data))
