"""The chat pipeline's answer in the internal model, for the edges of the other protocols.

A stream comes as deltas (:class:`StreamingDeltas`: the upstream's, or a cache hit's replayed), a
whole answer (the upstream's or the cache's) as the internal answer (:attr:`Answer.typed`); an
edge encodes either in its own protocol. (A passed-through answer, :class:`StreamingAnswer`
among them, is the upstream's own: its edge relays it.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from gateway.core.headers import dropped_header
from gateway.core.model import Answer as CoreAnswer
from gateway.drain import redeliver_deadline
from gateway.pipeline import Answer, DeltaBatch, StreamBroke, StreamingAnswer, StreamingDeltas

__all__ = ["EventStream", "StreamBroke", "answer_of", "delta_batches", "dropped_header", "send_events", "streams"]


def answer_of(answer: Answer) -> CoreAnswer:
    """A successful, translated answer as a whole."""
    if answer.typed is None:
        raise AssertionError("the pipeline answers a translated request in the internal model")
    return answer.typed


def streams(answer: Answer | StreamingAnswer | StreamingDeltas) -> bool:
    """Whether the client gets a stream (a cache hit's too: the pipeline replays it as deltas)."""
    return not isinstance(answer, Answer)


async def delta_batches(answer: StreamingDeltas) -> AsyncGenerator[DeltaBatch, None]:
    """The answer's deltas, batch by batch; None at its clean end, or a :class:`StreamBroke`.

    A stream is read to its end even after either: the pipeline logs, settles and fills
    the cache when its stream ends, and a stream closed early is a client that left.
    """
    try:
        async for batch in answer.deltas:
            yield batch
    finally:  # a stream closed early is logged as it closes, not when collected (t198)
        close = getattr(answer.deltas, "aclose", None)
        if close is not None:
            await close()


async def send_events(events: AsyncIterator[bytes], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Send a stream's events, and close it however it ends: its log line is written then.

    The drain's deadline may land in ``send`` (a slow client's, waiting for it to take bytes)
    rather than in the stream: it is delivered again to the stream, which ends in-band, as
    when the deadline finds it waiting (t198)."""
    task = asyncio.current_task()
    redelivered = False
    try:
        async for event in events:
            try:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            except asyncio.CancelledError:
                if redelivered or task is None or not redeliver_deadline(task):
                    raise
                redelivered = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


class _EventsResponse(ASGIStreamingResponse):
    __slots__ = ()

    async def _stream(self, send: Any) -> None:
        await send_events(self.iterator, send)  # type: ignore[arg-type]


class EventStream(Stream):
    """Litestar's :class:`Stream` of SSE bytes, sent by :func:`send_events` (Litestar's own never
    closes its iterator when its send is cancelled: a stream's log line was lost, t198)."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        assert type(response) is ASGIStreamingResponse
        response.__class__ = _EventsResponse
        return response
