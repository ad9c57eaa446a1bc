"""A cached answer, and how it is replayed as JSON or as an SSE stream."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.protocols.openai_chat import chunk_body, completion_body, usage_body
from gateway.upstreams.base import StreamTally

__all__ = ["CachedAnswer", "answer_text", "completion_from_stream", "replay_json", "replay_sse", "without_identity"]


class CachedAnswer(msgspec.Struct, kw_only=True):
    body: bytes
    """OpenAI ``chat.completion`` JSON; without ``id`` and ``created`` when ``identity_free``."""
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    created_at: float
    prompt: str | None = None
    """Semantic entries: the prompt text a new prompt is checked against."""
    identity_free: bool = False
    """``body`` was stored without its id and time (entries written before this field have them)."""

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @staticmethod
    def decode(raw: bytes | str) -> CachedAnswer:
        """From what Redis returned (bytes: the gateway's clients never decode responses)."""
        return _decoder.decode(raw.encode() if isinstance(raw, str) else raw)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedAnswer)


def completion_from_stream(tally: StreamTally, prompt_tokens: int, completion_tokens: int) -> bytes:
    """The ``chat.completion`` a finished stream amounts to (so a stream can fill the cache)."""
    usage = usage_body(prompt_tokens, completion_tokens)
    chunk_id = tally.id or "chatcmpl-gateway"
    return completion_body(chunk_id, tally.created, tally.model, tally.message(), tally.finish_reason, usage)


_PIECE_CHARS = 24


def answer_text(answer: CachedAnswer) -> str:
    """The first choice's message text (what an audit compares with a fresh answer)."""
    try:
        message = msgspec.json.decode(answer.body)["choices"][0]["message"]
        content = message.get("content")
        return content if isinstance(content, str) else ""
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def without_identity(completion_body: bytes) -> bytes:
    """The completion without ``id`` and ``created``: parsed once when stored, so a hit only splices."""
    completion: dict[str, Any] = msgspec.json.decode(completion_body)
    completion.pop("id", None)
    completion.pop("created", None)
    return msgspec.json.encode(completion)


def replay_json(answer: CachedAnswer, answer_id: str, created: int) -> bytes:
    """The cached ``chat.completion`` under an id and time of its own: a served answer is a new answer
    (clients key conversations and de-duplication on ``id``)."""
    body = answer.body
    if answer.identity_free and body.startswith(b"{") and len(body) > 2:
        return b'{"id":' + msgspec.json.encode(answer_id) + b',"created":' + str(created).encode() + b"," + body[1:]
    completion: dict[str, Any] = msgspec.json.decode(body)
    completion["id"], completion["created"] = answer_id, created
    return msgspec.json.encode(completion)


def _reasoning_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's reasoning as the deltas that stream it: its text in pieces, then each signature."""
    blocks = message.get("thinking_blocks")
    reasoning = message.get("reasoning_content")
    if not isinstance(blocks, list):
        blocks = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if isinstance(reasoning, str) else []
    deltas: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "redacted_thinking":
            deltas.append({"thinking_blocks": [block]})
            continue
        text = str(block.get("thinking") or "")
        deltas += [{"reasoning_content": text[i : i + _PIECE_CHARS]} for i in range(0, len(text), _PIECE_CHARS)]
        if block.get("signature"):
            deltas.append({"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": block["signature"]}]})
    return deltas


def replay_sse(answer: CachedAnswer, include_usage: bool, answer_id: str, created: int) -> list[bytes]:
    """The SSE events of a cached answer: role, content pieces, finish, usage if asked, ``[DONE]``."""
    completion: dict[str, Any] = msgspec.json.decode(answer.body)
    model = completion.get("model")
    events: list[bytes] = []

    def emit(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> None:
        events.append(b"data: " + chunk_body(answer_id, created, model, delta, finish_reason, **extra) + b"\n\n")

    for choice in completion.get("choices", [])[:1]:  # answers are stored only when n is 1
        message = choice.get("message") or {}
        emit({"role": "assistant", "content": ""})
        for delta in _reasoning_deltas(message):
            emit(delta)
        content = message.get("content") or ""
        for start in range(0, len(content), _PIECE_CHARS):
            emit({"content": content[start : start + _PIECE_CHARS]})
        if message.get("tool_calls"):
            emit({"tool_calls": [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]})
        emit({}, choice.get("finish_reason") or "stop")
    if include_usage:
        emit(None, usage=usage_body(answer.prompt_tokens, answer.completion_tokens))
    events.append(b"data: [DONE]\n\n")
    return events
