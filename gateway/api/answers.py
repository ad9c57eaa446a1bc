"""The chat pipeline's answer in the internal model, for the edges of the other protocols.

The pipeline answers in chat's shape (a completion, or a stream of chunks) what an
upstream answered, and in the internal model what the cache held (:attr:`Answer.typed`);
either way an edge reads it here and encodes it in its own protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.core.model import Answer as CoreAnswer
from gateway.core.model import Delta
from gateway.core.replay import deltas_of
from gateway.pipeline import Answer, StreamingAnswer
from gateway.protocols import openai_chat

__all__ = ["StreamBroke", "answer_of", "delta_batches", "streams"]


@dataclass(slots=True, frozen=True)
class StreamBroke:
    """The stream failed after it began: the pipeline's in-band error chunk (nothing follows it)."""

    chunk: dict[str, Any]

    @property
    def error(self) -> dict[str, Any]:
        error = self.chunk.get("error")
        return error if isinstance(error, dict) else {}


def answer_of(answer: Answer) -> CoreAnswer:
    """A successful answer as a whole: the cache's own, or the upstream's completion read."""
    if answer.typed is not None:
        return answer.typed
    return openai_chat.answer_from_completion(msgspec.json.decode(answer.body))


def streams(answer: Answer | StreamingAnswer, asked_to_stream: bool) -> bool:
    """Whether the client gets a stream: it asked for one (a cache hit comes whole, and is told
    as a stream by :func:`delta_batches`)."""
    return isinstance(answer, StreamingAnswer) or (asked_to_stream and answer.typed is not None)


async def delta_batches(answer: Answer | StreamingAnswer) -> AsyncIterator[list[Delta] | StreamBroke | None]:
    """The answer's deltas, chunk by chunk; None at its clean end, or a :class:`StreamBroke`.

    A stream is read to its end even after either: the pipeline logs, settles and fills
    the cache when its stream ends, and a stream closed early is a client that left.
    """
    if isinstance(answer, Answer):
        yield deltas_of(answer_of(answer))
        yield None
        return
    reader = openai_chat.ChunkReader()
    async for chunk in openai_chat.chat_stream_chunks(answer.events):
        if chunk is None:
            yield None
        elif "error" in chunk:
            yield StreamBroke(chunk)
        else:
            yield reader.read(chunk)
