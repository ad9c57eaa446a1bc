"""A cached answer: the internal answer and what it cost, rendered by whichever protocol asks."""

from __future__ import annotations

import hashlib
import re

import msgspec

from gateway.core.model import Answer, ToolCall, Usage

__all__ = ["CachedAnswer"]


class CachedAnswer(msgspec.Struct, kw_only=True):
    answer: Answer
    """The answer without its id (each time it is served it is a new answer, with an id of its own)."""
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    created_at: float
    prompt: str | None = None
    """Semantic entries: the prompt text a new prompt is checked against."""
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    """How the first answer's tokens split (the upstream's prompt cache, its reasoning): a hit's
    baseline is priced on the same split as the miss's was."""
    system_fingerprint: str | None = None
    """What an OpenAI chat upstream said of its backend, said again by a chat client's hit (t116:
    a hit said none); None where the upstream said none, and in entries stored before it."""

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @staticmethod
    def decode(raw: bytes | str) -> CachedAnswer | None:
        """From what Redis returned (bytes: the gateway's clients never decode responses);
        None for an entry this version cannot read (another version's, or damaged): a miss."""
        try:
            return _decoder.decode(raw.encode() if isinstance(raw, str) else raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def served_as(self, answer_id: str, prompt_tokens: int | None = None) -> Answer:
        """The answer under a new id, its tool calls too, with the usage it had when it was first
        answered; with ``prompt_tokens``, for another prompt (a semantic hit), whose count that is.
        A call's id is the upstream's, new with every answer: replayed as stored, two users of a
        tenant got one id, which an app that keeps results by call id mixes up (t83, t87)."""
        usage = Usage(
            input_tokens=self.prompt_tokens if prompt_tokens is None else prompt_tokens,
            output_tokens=self.completion_tokens,
            cached_input_tokens=self.cached_prompt_tokens if prompt_tokens is None else 0,
            cache_write_tokens=self.cache_write_tokens if prompt_tokens is None else 0,
            cache_write_1h_tokens=self.cache_write_1h_tokens if prompt_tokens is None else 0,
            reasoning_tokens=self.reasoning_tokens,
        )
        if not self.answer.tool_calls:
            return msgspec.structs.replace(self.answer, id=answer_id, usage=usage)
        calls = [_renamed(call, answer_id, index) for index, call in enumerate(self.answer.tool_calls)]
        return msgspec.structs.replace(self.answer, id=answer_id, usage=usage, tool_calls=calls)


def _renamed(call: ToolCall, answer_id: str, index: int) -> ToolCall:
    """``call`` under an id of this answer's, spelled as the upstream spells them (``call_``,
    ``toolu_``): the same for the answer streamed or not."""
    prefix = _ID_PREFIX.match(call.id)
    digest = hashlib.blake2b(f"{answer_id}:{index}".encode(), digest_size=12).hexdigest()
    return msgspec.structs.replace(call, id=(prefix[0] if prefix else "call_") + digest)


_ID_PREFIX = re.compile(r"[A-Za-z]+_")


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedAnswer)
