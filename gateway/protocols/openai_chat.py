"""OpenAI Chat Completions: the internal model to a chat body, and completions and chunks back.

The OpenAI-compatible path through the pipeline carries the client's own bytes; this
codec is for requests that arrive in another protocol and are answered by the chat
pipeline (Anthropic Messages, Responses, completions).

What OpenAI's format has no field for travels in the chat body under the names that
providers read and OpenAI-compatible upstreams never see (``for_openai_upstream``):
``cache_control`` on parts and tools, a top-level ``thinking``, and assistant content
parts ``{"type": "thinking", "thinking", "signature"}`` / ``{"type":
"redacted_thinking", "data"}``. Answers carry reasoning as ``message.reasoning_content``
(the field vLLM and DeepSeek use) and, with Anthropic's signatures, ``thinking_blocks``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from gateway.core.model import (
    Answer,
    Delta,
    Finish,
    FinishReason,
    ImagePart,
    Message,
    Part,
    RedactedThinking,
    RedactedThinkingPart,
    Request,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ThinkingSignature,
    Tool,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    Usage,
    UsageReport,
)

__all__ = [
    "ChunkReader",
    "answer_from_completion",
    "chat_stream_chunks",
    "chunk_body",
    "completion_body",
    "to_chat_body",
    "usage_body",
    "usage_from",
]

_encode = msgspec.json.Encoder().encode

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def to_chat_body(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "messages": [_message(m) for m in request.messages]}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop[:4]
    if request.user is not None:
        body["user"] = request.user
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
        choice = request.tool_choice
        if choice is not None:
            if choice.mode == "tool":
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = choice.mode
            if not choice.parallel:
                body["parallel_tool_calls"] = False
    if request.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": request.json_schema},
        }
    if request.thinking is not None:
        body["thinking"] = request.thinking
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _tool(tool: Tool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "function",
        "function": _drop_none({"name": tool.name, "description": tool.description, "parameters": tool.parameters}),
    }
    if tool.cache_control is not None:
        out["cache_control"] = tool.cache_control  # read by the Anthropic provider, removed for others
    return out


def _part(part: Part) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        return {"type": "image_url", "image_url": {"url": part.url}}
    if isinstance(part, ThinkingPart):
        return {"type": "thinking", "thinking": part.text, "signature": part.signature}
    if isinstance(part, RedactedThinkingPart):
        return {"type": "redacted_thinking", "data": part.data}
    if part.cache_control is not None:
        return {"type": "text", "text": part.text, "cache_control": part.cache_control}
    return {"type": "text", "text": part.text}


def _plain(part: Part) -> bool:
    return isinstance(part, TextPart) and part.cache_control is None


def _message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text}
    out: dict[str, Any] = {"role": message.role}
    if not all(_plain(part) for part in message.parts):
        out["content"] = [_part(part) for part in message.parts]
    else:
        out["content"] = message.text if message.parts or not message.tool_calls else None
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    return out


def usage_body(
    prompt_tokens: int, completion_tokens: int, *, cached_tokens: int | None = None, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """OpenAI's usage object; the details only when given."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def completion_body(
    answer_id: str | None,
    created: int | None,
    model: str | None,
    message: dict[str, Any],
    finish_reason: str | None,
    usage: dict[str, Any] | None,
) -> bytes:
    """A one-choice ``chat.completion``; ``created`` defaults to now."""
    body: dict[str, Any] = {
        "id": answer_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return _encode(body)


def chunk_body(
    chunk_id: str | None,
    created: int | None,
    model: str | None,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """A ``chat.completion.chunk`` of the first choice; ``delta`` None: the usage chunk, with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return _encode(body)


def usage_from(raw: Any) -> Usage:
    """OpenAI's usage object, cached-prompt and reasoning details included."""
    if not isinstance(raw, dict):
        return Usage()
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=_int(raw.get("prompt_tokens")),
        output_tokens=_int(raw.get("completion_tokens")),
        cached_input_tokens=_int(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0),
        reasoning_tokens=_int(
            completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
        ),
    )


def answer_from_completion(body: dict[str, Any]) -> Answer:
    """The first choice of a chat completion."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = [
        ToolCall(
            id=str(call.get("id") or f"call_{index}"),
            name=str((call.get("function") or {}).get("name") or ""),
            arguments=str((call.get("function") or {}).get("arguments") or ""),
        )
        for index, call in enumerate(message.get("tool_calls") or [])
    ]
    content = message.get("content")
    return Answer(
        id=str(body.get("id") or ""),
        model=str(body.get("model") or ""),
        thinking=_thinking(message),
        text=content if isinstance(content, str) else None,
        tool_calls=calls,
        finish_reason=_FINISH.get(str(choice.get("finish_reason"))),
        usage=usage_from(body.get("usage")),
    )


def _thinking(message: dict[str, Any]) -> list[ThinkingPart | RedactedThinkingPart]:
    """Anthropic's blocks when the answer kept them, else an unsigned part for ``reasoning_content``."""
    parts: list[ThinkingPart | RedactedThinkingPart] = []
    for block in message.get("thinking_blocks") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking":
            parts.append(ThinkingPart(str(block.get("thinking") or ""), str(block.get("signature") or "")))
        elif block.get("type") == "redacted_thinking":
            parts.append(RedactedThinkingPart(str(block.get("data") or "")))
    reasoning = message.get("reasoning_content")
    if not parts and isinstance(reasoning, str) and reasoning:
        parts.append(ThinkingPart(reasoning))
    return parts


class ChunkReader:
    """Chat completion chunks (first choice) to deltas; tool calls keep their upstream index."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started: set[int] = set()

    def read(self, chunk: dict[str, Any]) -> list[Delta]:
        deltas: list[Delta] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                deltas.append(ThinkingDelta(reasoning))
            for block in delta.get("thinking_blocks") or []:
                if isinstance(block, dict) and block.get("type") == "redacted_thinking":
                    deltas.append(RedactedThinking(str(block.get("data") or "")))
                elif isinstance(block, dict) and block.get("signature"):
                    deltas.append(ThinkingSignature(str(block["signature"])))
            content = delta.get("content")
            if isinstance(content, str) and content:
                deltas.append(TextDelta(content))
            for call in delta.get("tool_calls") or []:
                index = int(call.get("index", 0))
                function = call.get("function") or {}
                if index not in self._started:
                    self._started.add(index)
                    name = str(function.get("name") or "")
                    deltas.append(ToolCallStart(index, str(call.get("id") or f"call_{index}"), name))
                fragment = function.get("arguments")
                if isinstance(fragment, str) and fragment:
                    deltas.append(ToolArgumentsDelta(index, fragment))
            reason = _FINISH.get(str(choice.get("finish_reason")))
            if reason is not None:
                deltas.append(Finish(reason))
        if chunk.get("usage"):
            deltas.append(UsageReport(usage_from(chunk["usage"])))
        return deltas


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


async def chat_stream_chunks(events: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any] | None]:
    """The chat pipeline's SSE frames as chunks, ending with None for ``data: [DONE]`` or with an
    in-band error (a chunk with an ``error`` key); nothing is yielded after either.

    The stream is still read to its end: the pipeline logs, settles and fills the cache
    when its stream ends, and a stream closed early is a client that left.
    """
    pending = b""
    ended = False
    async for piece in events:
        if ended:
            continue
        pending += piece
        *frames, pending = pending.split(b"\n\n")
        for frame in frames:
            if not frame.startswith(b"data: "):
                continue
            data = frame[6:]
            chunk = None if data == b"[DONE]" else msgspec.json.decode(data)
            yield chunk
            if chunk is None or "error" in chunk:
                ended = True
                break
