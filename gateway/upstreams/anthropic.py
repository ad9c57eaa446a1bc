"""Anthropic's Messages API behind the OpenAI chat-completions interface.

Request (OpenAI → Anthropic, ``POST {base_url}/v1/messages``), through the internal model:
:func:`gateway.protocols.openai_chat.request_from_chat_body` reads the chat body and
:func:`gateway.protocols.anthropic_messages.encode_request` writes Anthropic's, so:

- ``system`` and ``developer`` messages, wherever they are, become the top-level
  ``system`` string (joined with a blank line), or its text blocks when a part carries
  ``cache_control``; ``cache_control`` on content parts and on tools is passed on.
- ``user`` / ``assistant`` messages become ``messages``; content is a string or a list
  of parts: ``text`` → text block, ``image_url`` → image block (``data:`` URLs as a
  base64 source, http(s) URLs as a url source). Consecutive messages of one role are
  merged, since Anthropic requires user/assistant alternation; empty text is dropped
  (Anthropic rejects empty text blocks).
- Assistant ``tool_calls`` → ``tool_use`` blocks (arguments JSON-decoded to ``input``);
  ``tool`` messages → a user message of ``tool_result`` blocks.
- ``max_tokens`` / ``max_completion_tokens`` → ``max_tokens`` (4096 when absent, since
  Anthropic requires it); ``temperature`` (clamped to [0, 1]); ``top_p``; ``stop`` →
  ``stop_sequences``; ``user`` → ``metadata.user_id``; ``tools`` → ``tools``
  (``parameters`` → ``input_schema``); ``tool_choice`` ``auto`` / ``required`` /
  named function → ``auto`` / ``any`` / ``tool``, ``none`` omits the tools;
  ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.
- ``thinking`` (the gateway's carrier for Anthropic's setting) is passed on, and so are
  assistant ``thinking`` / ``redacted_thinking`` parts (signed reasoning from earlier
  turns, which Anthropic needs back before a tool result); unsigned reasoning (another
  upstream's) is left out, since Anthropic would refuse it.
- Dropped, having no Anthropic equivalent: ``n`` (``n > 1`` is refused with a 400),
  ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``seed``,
  ``response_format``, ``logprobs``, ``top_logprobs``, ``stream_options``, the
  deprecated ``functions`` / ``function_call``, tools' ``strict`` and any other
  unknown field.

Response (Anthropic → OpenAI): text blocks are joined into ``message.content``
(``null`` when there are none), ``tool_use`` blocks become ``message.tool_calls``,
``thinking`` blocks become ``message.reasoning_content`` (their text) and
``message.thinking_blocks`` (with signatures; redacted ones too); ``stop_reason`` maps to ``finish_reason``
(end_turn/stop_sequence → stop, max_tokens → length, tool_use → tool_calls,
refusal → content_filter); ``prompt_tokens`` counts cached input tokens too.
Streams are re-encoded event by event as ``chat.completion.chunk`` payloads; usage
goes to the stream's tally, never into a chunk.

Error bodies (``{"type": "error", "error": {"type", "message"}}``) are read by
:func:`gateway.upstreams.base._error_detail` as is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from gateway.errors import GatewayError, InvalidRequestError, UpstreamProtocolError, UpstreamStatusError
from gateway.protocols.anthropic_messages import encode_error, encode_request
from gateway.protocols.openai_chat import chunk_body, completion_body, request_from_chat_body, usage_body
from gateway.upstreams.base import (
    ChatStream,
    Completion,
    Provider,
    RelayedStream,
    UpstreamEvents,
    Usage,
    decode_event,
    decode_json_object,
)

__all__ = ["AnthropicProvider"]

ANTHROPIC_VERSION = "2023-06-01"
_MESSAGES_PATH = "v1/messages"

_FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

Block = dict[str, Any]


class AnthropicProvider(Provider):
    kind = "anthropic"

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION, **self.config.headers}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else self.upstream_model

    async def complete(self, body: dict[str, Any]) -> Completion:
        payload = _translate_request(self.name, self._model(body), body, stream=False)
        response = await self._post(_MESSAGES_PATH, payload, self._headers(), stream=False)
        data = decode_json_object(self.name, response.content)
        return _translate_response(self.name, data)

    async def open_stream(self, body: dict[str, Any]) -> ChatStream:
        payload = _translate_request(self.name, self._model(body), body, stream=True)
        response = await self._post(_MESSAGES_PATH, payload, self._headers(), stream=True)
        return _AnthropicChatStream(self, response)

    async def relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> Completion:
        response = await self._post(_MESSAGES_PATH, body, {**self._headers(), **headers}, stream=False)
        data = decode_json_object(self.name, response.content)
        content = data.get("content")
        text = "".join(
            block["text"]
            for block in (content if isinstance(content, list) else ())
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )
        return Completion(body=response.content, usage=_usage(data.get("usage")), text=text)

    async def open_relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> ChatStream:
        response = await self._post(_MESSAGES_PATH, body, {**self._headers(), **headers}, stream=True)
        return _RelayedMessageStream(self, response)


# -- request translation ------------------------------------------------------


def _translate_request(upstream: str, model: str, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """Through the internal model: the chat codec reads the body, the Messages codec writes it."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise InvalidRequestError(f"n > 1 is not supported by anthropic upstream '{upstream}'", param="n")
    return encode_request(request_from_chat_body(body), model, stream=stream)


def _finish_reason(stop_reason: Any) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _prompt_tokens(usage: dict[str, Any]) -> int:
    return (
        _int(usage.get("input_tokens"))
        + _int(usage.get("cache_read_input_tokens"))
        + _int(usage.get("cache_creation_input_tokens"))
    )


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
        return None
    return _usage_of(data, _prompt_tokens(data), _int(data.get("output_tokens")))


def _usage_of(usage: dict[str, Any], prompt_tokens: int, output_tokens: int) -> Usage:
    """Anthropic bills cache reads and writes at their own prices: keep them apart."""
    return Usage(
        prompt_tokens,
        output_tokens,
        cached_prompt_tokens=_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=_int(usage.get("cache_creation_input_tokens")),
    )


def _translate_response(upstream: str, data: dict[str, Any]) -> Completion:
    content = data.get("content")
    if data.get("type") != "message" or not isinstance(content, list):
        raise UpstreamProtocolError(upstream, "answer is not an Anthropic message")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    thinking: list[Block] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking":
            thinking.append({"type": "thinking", "thinking": str(block.get("thinking") or ""),
                             "signature": str(block.get("signature") or "")})  # fmt: skip
        elif block.get("type") == "redacted_thinking":
            thinking.append({"type": "redacted_thinking", "data": str(block.get("data") or "")})
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            arguments = msgspec.json.encode(block.get("input") or {}).decode()
            function = {"name": block.get("name"), "arguments": arguments}
            tool_calls.append({"id": block.get("id"), "type": "function", "function": function})
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text if texts else None}
    if thinking:
        message["reasoning_content"] = "".join(b.get("thinking", "") for b in thinking)
        message["thinking_blocks"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = _usage(data.get("usage"))
    wire_usage = (
        None
        if usage is None
        else usage_body(usage.prompt_tokens, usage.completion_tokens, cached_tokens=usage.cached_prompt_tokens)
    )
    answer_id, model = data.get("id"), data.get("model")
    body = completion_body(
        answer_id if isinstance(answer_id, str) else None, None, model if isinstance(model, str) else None,
        message, _finish_reason(data.get("stop_reason")), wire_usage,
    )  # fmt: skip
    return Completion(body=body, usage=usage, text=text)


class _AnthropicChatStream(ChatStream):
    """Re-encodes Anthropic's stream events as OpenAI chunks, one event at a time."""

    def __init__(self, provider: AnthropicProvider, response: httpx.Response) -> None:
        super().__init__()
        self._provider = provider
        self._response = response
        self._events = UpstreamEvents(provider, response)
        self._started = False
        self._done = False
        self._prompt_tokens = 0
        self._cache_usage: dict[str, Any] = {}
        """The usage that reported the prompt (message_start, or a later message_delta): its cache fields."""
        self._tool_indexes: dict[int, int] = {}
        """Anthropic content block index → OpenAI tool call index."""

    async def __anext__(self) -> bytes:
        try:
            while not self._done:
                chunk = self._handle(await self._next_event())
                if chunk is not None:
                    self.tally.chunks += 1
                    return chunk
        except Exception:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._response.aclose()

    async def _next_event(self) -> dict[str, Any]:
        name = self._provider.name
        event = await self._events.next()
        if event is None:
            raise UpstreamProtocolError(name, "stream ended before message_stop")
        return decode_event(name, event.data)

    def _handle(self, event: dict[str, Any]) -> bytes | None:
        """Update the tally from one event; return the chunk it becomes, if any."""
        kind = event.get("type")
        if kind == "message_start":
            return self._on_message_start(event)
        if kind == "error":
            raise _stream_error(self._provider.name, event)
        if not self._started:
            if kind == "ping":
                return None
            raise UpstreamProtocolError(self._provider.name, f"stream event {kind!r} came before message_start")
        if kind == "content_block_start":
            return self._on_block_start(event)
        if kind == "content_block_delta":
            return self._on_block_delta(event)
        if kind == "message_delta":
            return self._on_message_delta(event)
        if kind == "message_stop":
            self._done = True
        return None  # ping, content_block_stop, and event types added later

    def _on_message_start(self, event: dict[str, Any]) -> bytes:
        message = event.get("message")
        message = message if isinstance(message, dict) else {}
        tally = self.tally
        self._started = True
        tally.id = message.get("id") if isinstance(message.get("id"), str) else None
        tally.model = message.get("model") if isinstance(message.get("model"), str) else self._provider.upstream_model
        tally.created = int(time.time())
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._prompt_tokens = _prompt_tokens(usage)
            self._cache_usage = usage
            tally.usage = _usage_of(usage, self._prompt_tokens, _int(usage.get("output_tokens")))
        return self._chunk({"role": "assistant", "content": ""})

    def _on_block_start(self, event: dict[str, Any]) -> bytes | None:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return None
        if block.get("type") == "text":
            return self._text_chunk(block.get("text"))
        if block.get("type") == "redacted_thinking":
            redacted = {"type": "redacted_thinking", "data": str(block.get("data") or "")}
            return self._chunk({"thinking_blocks": [redacted]})
        if block.get("type") != "tool_use":
            return None  # a thinking block: its text and signature come as deltas
        tool_index = len(self._tool_indexes)
        self._tool_indexes[_int(event.get("index"))] = tool_index
        call = {
            "index": tool_index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return self._chunk({"tool_calls": [call]})

    def _on_block_delta(self, event: dict[str, Any]) -> bytes | None:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return None
        if delta.get("type") == "text_delta":
            return self._text_chunk(delta.get("text"))
        if delta.get("type") == "input_json_delta":
            tool_index = self._tool_indexes.get(_int(event.get("index")))
            partial = delta.get("partial_json")
            if tool_index is None or not isinstance(partial, str) or not partial:
                return None
            return self._chunk({"tool_calls": [{"index": tool_index, "function": {"arguments": partial}}]})
        if delta.get("type") == "thinking_delta":
            thinking = delta.get("thinking")
            return self._chunk({"reasoning_content": thinking}) if isinstance(thinking, str) and thinking else None
        if delta.get("type") == "signature_delta":
            signature = delta.get("signature")
            if not isinstance(signature, str) or not signature:
                return None
            return self._chunk({"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": signature}]})
        return None  # citations_delta, and delta types added later

    def _on_message_delta(self, event: dict[str, Any]) -> bytes:
        tally = self.tally
        usage = event.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("input_tokens"), int):
                self._prompt_tokens = _prompt_tokens(usage)
                self._cache_usage = usage
            output = _int(usage.get("output_tokens"))
            tally.usage = _usage_of(self._cache_usage, self._prompt_tokens, output)
        delta = event.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        tally.finish_reason = _finish_reason(stop_reason)
        return self._chunk({}, tally.finish_reason)

    def _text_chunk(self, text: Any) -> bytes | None:
        if not isinstance(text, str) or not text:
            return None
        return self._chunk({"content": text})

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        tally = self.tally
        tally.take_delta(delta)
        return chunk_body(tally.id, tally.created, tally.model, delta, finish_reason)


class _RelayedMessageStream(RelayedStream):
    """A Messages stream passed through. The tally reads the message id, text deltas, usage
    (``message_start``, then each ``message_delta``) and the stop reason; an ``error`` event
    raises and the gateway answers it in Anthropic's shape."""

    end_events = frozenset({"message_stop"})

    def __init__(self, provider: AnthropicProvider, response: httpx.Response) -> None:
        super().__init__(provider, response)
        self._prompt_tokens = 0
        self._cache_usage: dict[str, Any] = {}

    def _take(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "error":
            raise _stream_error(self._provider.name, data)
        tally = self.tally
        if kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                tally.text_parts.append(delta["text"])
            return
        usage = None
        if kind == "message_start" and isinstance(message := data.get("message"), dict):
            tally.id, tally.model = message.get("id"), message.get("model")
            usage = message.get("usage")
        elif kind == "message_delta":
            usage = data.get("usage")
            delta = data.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                tally.finish_reason = _finish_reason(delta["stop_reason"])
        if isinstance(usage, dict):
            if isinstance(usage.get("input_tokens"), int):
                self._prompt_tokens = _prompt_tokens(usage)
                self._cache_usage = usage
            tally.usage = _usage_of(self._cache_usage, self._prompt_tokens, _int(usage.get("output_tokens")))

    def error_event(self, error: GatewayError) -> bytes:
        return b"event: error\ndata: " + encode_error(error.status_code, error.message) + b"\n\n"


def _stream_error(upstream: str, event: dict[str, Any]) -> UpstreamStatusError:
    """An in-band ``error`` event: an overloaded upstream as the 529 Anthropic would have sent."""
    error = event.get("error")
    error = error if isinstance(error, dict) else {}
    status = 529 if error.get("type") == "overloaded_error" else 500
    return UpstreamStatusError(upstream, status, str(error.get("message", "error in stream"))[:500])
