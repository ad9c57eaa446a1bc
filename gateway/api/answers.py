"""The chat pipeline's answer in the internal model, for the edges of the other protocols.

A stream comes as deltas (:class:`StreamingDeltas`: the upstream's, or a cache hit's replayed), a
whole answer (the upstream's or the cache's) as the internal answer (:attr:`Answer.typed`); an
edge encodes either in its own protocol. (A passed-through answer, :class:`StreamingAnswer`
among them, is the upstream's own: its edge relays it.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.core.headers import dropped_header
from gateway.core.model import Answer as CoreAnswer
from gateway.pipeline import Answer, DeltaBatch, StreamBroke, StreamingAnswer, StreamingDeltas

__all__ = ["StreamBroke", "answer_of", "delta_batches", "dropped_header", "streams"]


def answer_of(answer: Answer) -> CoreAnswer:
    """A successful, translated answer as a whole."""
    if answer.typed is None:
        raise AssertionError("the pipeline answers a translated request in the internal model")
    return answer.typed


def streams(answer: Answer | StreamingAnswer | StreamingDeltas) -> bool:
    """Whether the client gets a stream (a cache hit's too: the pipeline replays it as deltas)."""
    return not isinstance(answer, Answer)


async def delta_batches(answer: StreamingDeltas) -> AsyncIterator[DeltaBatch]:
    """The answer's deltas, batch by batch; None at its clean end, or a :class:`StreamBroke`.

    A stream is read to its end even after either: the pipeline logs, settles and fills
    the cache when its stream ends, and a stream closed early is a client that left.
    """
    async for batch in answer.deltas:
        yield batch
