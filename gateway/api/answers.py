"""The chat pipeline's answer in the internal model, for the edges of the other protocols.

A stream comes as deltas (:class:`StreamingDeltas`) and a cache hit as the internal answer
(:attr:`Answer.typed`); a whole answer from an upstream comes in chat's shape and is read
here. Either way an edge encodes what it gets here in its own protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from gateway.core.model import Answer as CoreAnswer
from gateway.core.replay import deltas_of
from gateway.pipeline import Answer, DeltaBatch, StreamBroke, StreamingAnswer, StreamingDeltas
from gateway.protocols import openai_chat

__all__ = ["PipelineAnswer", "StreamBroke", "answer_of", "delta_batches", "streams"]

PipelineAnswer = Answer | StreamingAnswer | StreamingDeltas
"""What the chat pipeline answers."""


def answer_of(answer: Answer) -> CoreAnswer:
    """A successful answer as a whole: the cache's own, or the upstream's completion read."""
    if answer.typed is not None:
        return answer.typed
    return openai_chat.answer_from_completion(msgspec.json.decode(answer.body))


def streams(answer: PipelineAnswer, asked_to_stream: bool) -> bool:
    """Whether the client gets a stream: it asked for one (a cache hit comes whole, and is told
    as a stream by :func:`delta_batches`)."""
    return not isinstance(answer, Answer) or (asked_to_stream and answer.typed is not None)


async def delta_batches(answer: PipelineAnswer) -> AsyncIterator[DeltaBatch]:
    """The answer's deltas, batch by batch; None at its clean end, or a :class:`StreamBroke`.

    A stream is read to its end even after either: the pipeline logs, settles and fills
    the cache when its stream ends, and a stream closed early is a client that left.
    """
    if isinstance(answer, StreamingDeltas):
        async for batch in answer.deltas:
            yield batch
        return
    if isinstance(answer, Answer):
        yield deltas_of(answer_of(answer))
        yield None
        return
    reader = openai_chat.ChunkReader()  # a passed-through stream never gets here: its edge relays it
    async for chunk in openai_chat.chat_stream_chunks(answer.events):
        if chunk is None:
            yield None
        elif "error" in chunk:
            yield StreamBroke(chunk)
        else:
            yield reader.read(chunk)
