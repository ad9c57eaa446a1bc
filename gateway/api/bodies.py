"""Reading a request's body: within a size limit and a deadline, whatever the client sends.

The limit holds for what the client announces (``Content-Length``), for what it streams, and
for the body once inflated (``Content-Encoding``); a client that sends too slowly gets a 408.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from litestar.exceptions import InternalServerException

from gateway.api.content_encoding import decoded_body
from gateway.errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError

__all__ = ["BodySource", "BodyUnreadableError", "inflated_body", "read_body", "received_body"]


class BodyUnreadableError(InvalidRequestError):
    """The server said the client left before its body was whole. Logged 499 as a client gone,
    and answered 400, which reaches only a client the server misreported: granian says so of a
    chunk size it cannot parse, the client still there (t126: it was sent a bare 499)."""

    code = "body_unreadable"


class BodySource(Protocol):
    """A request, as far as reading its body goes (Litestar's, or the chat route's bare one)."""

    @property
    def headers(self) -> Mapping[str, str]: ...
    def stream(self) -> AsyncIterator[bytes]: ...


async def read_body(request: BodySource, limit: int, timeout_s: float) -> bytes:
    """The body, inflated; raises a 413, 408 or 400 in the caller's error hierarchy
    (:class:`BodyUnreadableError` when the client left while sending)."""
    return await inflated_body(request, await received_body(request, limit, timeout_s), limit)


async def received_body(request: BodySource, limit: int, timeout_s: float) -> bytes:
    """The body as the client sent it (not inflated): :func:`read_body`'s wait on the client."""
    announced = request.headers.get("content-length")
    if announced is not None:
        if not announced.isdigit():
            raise InvalidRequestError("invalid Content-Length header")
        if int(announced) > limit:
            if int(announced) <= _DRAINED_AT_MOST:
                await _drain(request.stream(), timeout_s)
            raise _too_large(f"request body of {announced} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    stream = request.stream()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body was not received within {timeout_s:g}s", headers={"connection": "close"}
        ) from None
    except InternalServerException:  # Litestar's (and the chat route's) word for the client leaving
        raise BodyUnreadableError(
            "the request body could not be read: the connection ended, or its chunked framing was invalid, "
            "before the body was whole"
        ) from None
    if size > limit:  # drained with a time of its own: a 413, not a 408, however slowly the rest comes
        await _drain(stream, timeout_s, size)
        raise _too_large(f"request body exceeds the limit of {limit} bytes")
    return b"".join(chunks)


_DRAINED_AT_MOST = 32 << 20
"""A body past the limit is still read, and dropped, up to this size before the 413 goes out: a
server that closes while the client still sends resets the connection, and a client whose
sending failed never reads the answer (t205: 11 of 20 bodies of 3 MB over a 64 kB limit reached
the openai SDK's async client as a connection error, not a 413). A larger one is cut at once."""


async def _drain(stream: AsyncIterator[bytes], timeout_s: float, size: int = 0) -> None:
    """Read ``stream`` to its end and drop it, while it stays within :data:`_DRAINED_AT_MOST`
    and ``timeout_s``; a client that leaves meanwhile is left to the 413's write."""
    with contextlib.suppress(TimeoutError, InternalServerException):
        async with asyncio.timeout(timeout_s):
            async for chunk in stream:
                size += len(chunk)
                if size > _DRAINED_AT_MOST:
                    return


def _too_large(message: str) -> PayloadTooLargeError:
    """A 413: the connection is not kept (the rest of a body past :data:`_DRAINED_AT_MOST` was not
    read). Said in a header, as granian otherwise sometimes closed it unannounced, failing a
    kept-alive client's next request (t168)."""
    return PayloadTooLargeError(message, headers={"connection": "close"})


async def inflated_body(request: BodySource, body: bytes, limit: int) -> bytes:
    """``body`` inflated as its ``Content-Encoding`` says, within ``limit``."""
    encoding = request.headers.get("content-encoding")
    return body if encoding is None else await decoded_body(body, encoding, limit)
