"""A simulated OpenAI-compatible (and Anthropic Messages API) model server.

Endpoints:

* ``POST /v1/chat/completions``: answers are deterministic: ``"[simulated <name>] "``
  followed by the first 12 words of the last user message in reverse order, streamed
  one token per chunk. ``tools`` / ``tool_choice``, ``response_format``, ``n`` and
  ``logprobs`` are honoured as OpenAI does (:mod:`.openai_extras`); requests without
  them take the plain, fast path, whose choices name the stop string that ended them in
  ``stop_reason``, as vLLM's do.
* ``POST /v1/embeddings``: deterministic hashed-feature vectors (:mod:`.embeddings`).
* ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``
  (``limit``, ``order``), ``POST /v1/responses/{id}/cancel`` (a 400: nothing runs in the background):
  OpenAI's Responses API,
  stored turns and ``previous_response_id`` included (:mod:`.responses`).
* ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages
  API, with tools, thinking and structured output (:mod:`.anthropic_extras`); its usage
  says the ``speed`` and ``inference_geo`` asked, and counts each web search or fetch tool
  offered as used ``max_uses`` times (``server_tool_use``), as Anthropic bills them; a code
  execution tool offered is taken as run, in a ``container`` the answer names.
* ``GET /v1/models``, ``GET /healthz``.

Token counts use tiktoken's offline ``cl100k_base`` encoding. ``/_control/*`` endpoints
let tests queue faults (each applies to the next API request: chat, embeddings,
messages or count_tokens) and inspect what the server received; ``/_control/windows``
gives each model name the context window a chat prompt must fit (vLLM's 400 otherwise).

Client disconnects: the server runs with ``handler_cancellation=True``, so
aiohttp cancels the handler task (``asyncio.CancelledError``) when the peer goes
away mid-request; a write to a closed stream raises ``ConnectionResetError``.
Both are counted as ``cancelled`` in the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gateway.core.model import UsageReport
from gateway.protocols.openai_chat import answer_from_completion
from gateway.protocols.openai_responses import StreamEncoder as ResponsesStreamEncoder
from gateway.protocols.openai_responses import (
    assistant_message,
    input_items,
    item_count,
    output_items,
    response_object,
)
from gateway.simulated.answers import (
    Answer,
    content_parts,
    is_positive_int,
    last_user_text,
    make_answer,
    reply_words,
    stop_tuple,
)
from gateway.simulated.anthropic_extras import (
    MessagesPlan,
    MessagesRequestError,
    input_tokens,
    plan_messages,
    validate,
    without_system_messages,
)
from gateway.simulated.embeddings import EmbeddingInputError, embeddings_response
from gateway.simulated.openai_extras import (
    FINISH,
    ChatPlan,
    ChatRequestError,
    needs_extras,
    plan_chat,
    response_choices,
    stream_rounds,
)
from gateway.simulated.quality import FAILURE, judge_verdict, weak_on
from gateway.simulated.responses import ResponsesRequestError, TurnStore, plan_turn, stream_deltas, with_cache
from gateway.simulated.tokenizer import count, encoding

__all__ = ["build_app", "main"]

_CHAT_OVERHEAD_PER_MESSAGE = 3
_CHAT_OVERHEAD_REPLY = 3
_JSON = "application/json"

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode

# Which stats counter an API request bumps, and whether it answers errors Anthropic's way.
_KINDS: dict[str, tuple[str, bool]] = {
    "chat": ("chat_requests", False),
    "embeddings": ("embeddings_requests", False),
    "messages": ("messages_requests", True),
    "count_tokens": ("count_tokens_requests", True),
    "responses": ("responses_requests", False),
}


# --------------------------------------------------------------------------- state


class _Fault(msgspec.Struct, forbid_unknown_fields=True):
    """One queued fault; every field is optional (see the module docs).

    ``chunk_delay_ms`` is an extension: it overrides the server's chunk delay
    for one streamed answer (handy to keep a stream open in disconnect tests).
    """

    status: int | None = None
    retry_after: float | None = None
    headers: dict[str, str] | None = None
    """More headers on a fault's error response (OpenAI's ``x-ratelimit-*`` on a 429)."""
    body: str | None = None
    delay_ms: float = 0.0
    cut_after_chunks: int | None = None
    omit_usage: bool = False
    close: bool = False
    text: str | None = None
    chunk_delay_ms: float | None = None
    overloaded_after_events: int | None = None
    """Messages streams: Anthropic's in-band ``overloaded_error`` after this many events (how it
    says 529 once a stream began), then the end of the stream."""
    multiline_data: bool = False
    """Streams: each event's JSON over two ``data:`` lines (valid SSE, which joins them)."""
    error_after_chunks: int | None = None
    """Chat streams: vLLM's in-band ``{"error": ...}`` (what it sends when generation fails) after
    this many chunks, then ``[DONE]``."""
    failed_code: str = "server_error"
    """The ``error.code`` of that ``response.failed`` (``invalid_image_url``: the request's fault)."""
    failed_after_events: int | None = None
    """Responses streams: the server's own ``response.failed`` after this many writes (the first
    holds ``response.created``), then the end of the stream."""
    usage_on_finish_chunk: bool = False
    """Chat streams: the usage on the chunk that carries the finish reason and no usage chunk
    after it, as TGI and llama.cpp's server send it (with ``include_usage``)."""
    refusal: str | None = None
    """Chat: the model declines, as OpenAI's models do: ``message.refusal`` with null content
    and ``finish_reason`` stop (streamed as ``delta.refusal`` pieces)."""
    omit_message_delta: bool = False
    """Messages streams: no ``message_delta`` (no stop reason, no final usage: ``message_start``'s
    placeholder of 1 output token is all the usage said), then ``message_stop``."""
    omit_message_stop: bool = False
    """Messages streams: the end of the stream right after ``message_delta`` (its stop reason and
    usage given), without ``message_stop``, as some Anthropic-compatible proxies end one."""
    service_tier_as: str | None = None
    """Chat: the ``service_tier`` the server says processed the request, as it spells it (an
    OpenAI-compatible server's ``PRIORITY``), whatever was asked."""
    tier_off_usage_chunk: bool = False
    stop_reason: str | None = None
    """Messages: the answer's ``stop_reason``, whatever the plan made (``pause_turn``: a server
    tool's long turn, paused)."""
    """Chat streams: the tier on the answer's chunks and not on the usage chunk (OpenAI's repeats it)."""
    usage: dict[str, int] | None = None
    """Counts the server reports in place of its own, in its API's names (``prompt_tokens``,
    ``input_tokens``, ...), where its usage has them: a usage no answer can have (t103)."""
    stall_mid_body_ms: float | None = None
    """Whole (non-streamed) answers: the headers and the first half of the body at once, then this
    long silent before the rest, as a server stalled mid-answer (no first-byte timeout sees it)."""


_NO_FAULT = _Fault()


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    chat_requests: int = 0
    messages_requests: int = 0
    embeddings_requests: int = 0
    count_tokens_requests: int = 0
    responses_requests: int = 0
    models_requests: int = 0
    cancelled: int = 0
    in_flight: int = 0
    last_api_key: str | None = None
    # Kept as references and only serialised when /_control/stats is read.
    last_path: str | None = None
    last_headers: Mapping[str, str] | None = None
    last_body: Any = None
    last_stored_path: str | None = None
    """The path and query of the last request for a stored response (``GET``, ``DELETE``, its items)."""

    def reset(self) -> None:
        """Zero everything but ``in_flight``: running handlers still decrement it."""
        in_flight = self.in_flight
        for name, f in self.__dataclass_fields__.items():
            setattr(self, name, f.default)
        self.in_flight = in_flight

    def to_json(self) -> dict[str, Any]:
        last = None
        if self.last_path is not None and self.last_headers is not None:
            last = {
                "path": self.last_path,
                "headers": {k.lower(): v for k, v in self.last_headers.items()},
                "body": self.last_body,
            }
        return {
            "requests": self.requests,
            "chat_requests": self.chat_requests,
            "messages_requests": self.messages_requests,
            "embeddings_requests": self.embeddings_requests,
            "count_tokens_requests": self.count_tokens_requests,
            "responses_requests": self.responses_requests,
            "models_requests": self.models_requests,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "last_api_key": self.last_api_key,
            "last_request": last,
            "last_stored_path": self.last_stored_path,
        }


@dataclass(slots=True)
class _State:
    name: str
    latency_s: float
    chunk_delay_s: float
    faults: deque[_Fault] = field(default_factory=deque)
    weak_on: tuple[str, ...] = ()
    """Topics this model answers badly (gateway/simulated/quality.py)."""
    max_model_len: int | None = None
    """vLLM's ``--max-model-len``: a chat prompt and the completion it asks for must fit in it."""
    windows: dict[str, int] = field(default_factory=dict)
    """The window of each model name it stands in for (``/_control/windows``: ``serve --simulate-missing``
    sets the policy's ``context_window``), before ``max_model_len``; kept across ``/_control/reset``."""
    stats: _Stats = field(default_factory=_Stats)  # never replaced, see _Stats.reset
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    turns: TurnStore = field(default_factory=TurnStore)
    """Stored Responses API turns (kept across ``/_control/reset``, as a server keeps them)."""

    def next_id(self) -> int:
        return next(self.ids)

    def window(self, model: str) -> int | None:
        """The context window a chat request for ``model`` must fit in; None: any prompt fits."""
        return self.windows.get(model, self.max_model_len)


_STATE = web.AppKey("simulated_state", _State)


class _DropConnection(Exception):
    """Raised inside a handler to kill the TCP connection instead of answering."""


# -------------------------------------------------------------------------- answers


def _content_tokens(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    return sum(count(part) for part in content_parts(content))


# Keyed by the payload's JSON; kept small because prompts can be large.
@functools.lru_cache(maxsize=256)
def _analyze_openai(messages_json: bytes) -> tuple[int, str]:
    """(prompt_tokens, reply words): content tokens + 3 per message + 3, as OpenAI counts."""
    messages = _decode_json(messages_json)
    tokens = _CHAT_OVERHEAD_REPLY + _CHAT_OVERHEAD_PER_MESSAGE * len(messages)
    tokens += sum(_content_tokens(message) for message in messages)
    return tokens, reply_words(messages)


# --------------------------------------------------------------------------- errors

_OPENAI_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _openai_error(status: int, message: str, param: str | None = None) -> bytes:
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    err_type, code = _OPENAI_ERROR_TYPES.get(status, default)
    return _encode_json({"error": {"message": message, "type": err_type, "param": param, "code": code}})


def _anthropic_error(status: int, message: str) -> bytes:
    default = "api_error" if status >= 500 else "invalid_request_error"
    err_type = _ANTHROPIC_ERROR_TYPES.get(status, default)
    return _encode_json({"type": "error", "error": {"type": err_type, "message": message}})


def _json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _fault_response(fault: _Fault, status: int, anthropic: bool) -> web.Response:
    message = f"simulated fault: HTTP {status}"
    if fault.body is not None:
        body = fault.body.encode()
    elif anthropic:
        body = _anthropic_error(status, message)
    else:
        body = _openai_error(status, message)
    headers = None
    if fault.retry_after is not None:
        value = fault.retry_after
        text = str(int(value)) if float(value).is_integer() else str(value)
        headers = {"Retry-After": text}
    if fault.headers:
        headers = {**(headers or {}), **fault.headers}
    return _json_response(body, status, headers)


# ------------------------------------------------------------------ shared plumbing


def _drop(request: web.Request, *, flush: bool) -> None:
    """Close the TCP connection; ``flush`` sends what is already buffered first."""
    transport = request.transport
    if transport is not None:
        if flush:
            transport.close()
        else:
            transport.abort()


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


async def _read_json(request: web.Request) -> Any:
    """Parsed JSON body, or ``msgspec.DecodeError`` if it is not JSON."""
    return _decode_json(await request.read())


def _record(state: _State, request: web.Request, body: Any, api_key: str | None) -> None:
    stats = state.stats
    stats.requests += 1
    stats.last_path = request.path
    stats.last_headers = request.headers
    stats.last_body = body
    stats.last_api_key = api_key


_Handler = Callable[[web.Request, _State, Any, _Fault], Awaitable[web.StreamResponse]]


async def _run_api_request(request: web.Request, handler: _Handler, kind: str) -> web.StreamResponse:
    """Common wrapper: stats, fault popping, latency, disconnect accounting."""
    state = request.app[_STATE]
    stats = state.stats
    counter, anthropic = _KINDS[kind]
    stats.in_flight += 1
    fault = _NO_FAULT
    try:
        try:
            body = await _read_json(request)
        except msgspec.DecodeError:
            body = None
        setattr(stats, counter, getattr(stats, counter) + 1)
        _record(state, request, body, _api_key(request))
        fault = state.faults.popleft() if state.faults else _NO_FAULT
        await _sleep_ms(fault.delay_ms)
        if fault.close:
            raise _DropConnection
        if fault.status is not None:
            return _fault_response(fault, fault.status, anthropic)
        if state.latency_s > 0:
            await asyncio.sleep(state.latency_s)
        answer = await handler(request, state, body, fault)
        if fault.stall_mid_body_ms is not None and isinstance(answer, web.Response):
            return await _stalled_mid_body(request, answer, fault.stall_mid_body_ms)
        return answer
    except _DropConnection:
        _drop(request, flush=fault.cut_after_chunks is not None or fault.error_after_chunks is not None)
        # Ending the handler as cancelled makes aiohttp give up on the connection
        # quietly, without logging or trying to send a 500.
        raise asyncio.CancelledError from None
    except (asyncio.CancelledError, ConnectionResetError):
        stats.cancelled += 1
        raise asyncio.CancelledError from None
    finally:
        stats.in_flight -= 1


async def _stalled_mid_body(request: web.Request, answer: web.Response, stall_ms: float) -> web.StreamResponse:
    """``answer`` sent in two halves ``stall_ms`` apart, its length declared up front."""
    body = answer.body
    assert isinstance(body, bytes)
    resp = web.StreamResponse(status=answer.status, headers=answer.headers)
    resp.content_length = len(body)
    await resp.prepare(request)
    half = len(body) // 2
    await resp.write(body[:half])
    await _sleep_ms(stall_ms)
    await resp.write(body[half:])
    await resp.write_eof()
    return resp


def _api_key(request: web.Request) -> str | None:
    """``x-api-key`` (Anthropic) or the ``Authorization: Bearer`` token.

    Recent ``anthropic`` SDKs send ``api_key`` as a Bearer token, so both count.
    """
    headers = request.headers
    key = headers.get("x-api-key")
    if key is not None:
        return key
    value = headers.get("Authorization")
    if value is not None and value[:7].lower() == "bearer ":
        return value[7:]
    return value


class _EventSink:
    """Writes SSE events, honouring the chunk delay and ``cut_after_chunks``."""

    __slots__ = ("_cut", "_delay_s", "_errored", "_multiline", "_overloaded", "_resp", "_sent")

    def __init__(self, resp: web.StreamResponse, fault: _Fault, default_delay_s: float) -> None:
        self._resp = resp
        self._cut = fault.cut_after_chunks
        self._overloaded = fault.overloaded_after_events
        self._errored = fault.error_after_chunks
        self._multiline = fault.multiline_data
        self._sent = 0
        delay_ms = fault.chunk_delay_ms
        self._delay_s = default_delay_s if delay_ms is None else delay_ms / 1000.0

    async def send(self, event: bytes) -> None:
        if self._cut is not None and self._sent >= self._cut:
            raise _DropConnection
        if self._overloaded is not None and self._sent >= self._overloaded:
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            await self._resp.write(_event("error", error))
            raise _DropConnection
        if self._errored is not None and self._sent >= self._errored:
            error = {"error": {"object": "error", "message": "CUDA error: an illegal memory access was encountered",
                               "type": "InternalServerError", "param": None, "code": 500}}  # fmt: skip
            await self._resp.write(b"data: " + _encode_json(error) + b"\n\ndata: [DONE]\n\n")
            raise _DropConnection
        if self._multiline:
            event = event.replace(b'data: {"', b'data: {\ndata: "')
        await self._resp.write(event)
        self._sent += 1

    async def finish(self) -> web.StreamResponse:
        await self._resp.write_eof()
        return self._resp

    async def pause(self) -> None:
        """Sleep between token chunks."""
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)


async def _start_sse(request: web.Request, fault: _Fault, state: _State) -> _EventSink:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return _EventSink(resp, fault, state.chunk_delay_s)


# --------------------------------------------------------------------------- OpenAI


_REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")
"""OpenAI's reasoning models, which refuse ``max_tokens`` for ``max_completion_tokens``, and ``stop``."""


def _unsupported(param: str, message: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}
    return _json_response(_encode_json({"error": error}), 400)


def _openai_request_error(body: Any) -> web.Response | None:
    """400 response for a malformed chat request, or None when it is fine."""
    if not isinstance(body, dict):
        return _json_response(_openai_error(400, "request body must be a JSON object"), 400)
    if not isinstance(body.get("model"), str):
        return _json_response(_openai_error(400, "'model' is required and must be a string", "model"), 400)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _json_response(_openai_error(400, "'messages' must be a non-empty array", "messages"), 400)
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None and not is_positive_int(body[key]):
            return _json_response(_openai_error(400, f"'{key}' must be a positive integer", key), 400)
    if body["model"].startswith(_REASONING_MODELS):  # as OpenAI answers
        if "max_tokens" in body:
            return _unsupported(
                "max_tokens",
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
            )
        if body.get("stop") is not None:
            return _unsupported("stop", "Unsupported parameter: 'stop' is not supported with this model.")
    if body.get("continue_final_message") is True:  # vLLM's checks
        if body.get("add_generation_prompt", True) is True:
            message = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            return _json_response(_openai_error(400, message), 400)
        if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            message = "continue_final_message is set but the final message is not from the assistant"
            return _json_response(_openai_error(400, message), 400)
    if stop_tuple(body.get("stop")) is None:
        return _json_response(_openai_error(400, "'stop' must be a string or an array of strings", "stop"), 400)
    return None


def _context_error(body: dict[str, Any], max_model_len: int) -> web.Response | None:
    """vLLM's 400 for a prompt that, with the completion asked for, does not fit its window."""
    prompt_tokens, _ = _analyze_openai(_encode_json(body["messages"]))
    completion = _max_tokens(body) or 0
    if prompt_tokens + completion <= max_model_len and prompt_tokens < max_model_len:
        return None
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion."
    )
    error = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
    return _json_response(msgspec.json.encode(error), 400)


def _max_tokens(body: dict[str, Any]) -> int | None:
    max_tokens = body.get("max_completion_tokens")
    return body.get("max_tokens") if max_tokens is None else max_tokens


def _openai_answer(state: _State, body: dict[str, Any], fault: _Fault) -> tuple[int, Answer]:
    prompt_tokens, words = _analyze_openai(_encode_json(body["messages"]))
    full = fault.text if fault.text is not None else f"[simulated {state.name}] {words}"
    if body.get("continue_final_message") is True:  # the final (assistant) message goes on
        full = fault.text if fault.text is not None else f" ...continued by {state.name}: {words}"
    elif fault.text is None:
        verdict = judge_verdict(body["messages"])
        if verdict is not None:
            full = verdict
        elif state.weak_on and weak_on(last_user_text(body["messages"]), state.weak_on):
            full = f"[simulated {state.name}] {FAILURE} {words}"
    stops = stop_tuple(body.get("stop")) or ()
    return prompt_tokens, make_answer(full, _max_tokens(body), stops)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _reported(usage: dict[str, Any], fault: _Fault) -> dict[str, Any]:
    """``usage`` with the fault's counts written over those it has."""
    return usage | {name: value for name, value in (fault.usage or {}).items() if name in usage}


def _chunk_base(state: _State, body: dict[str, Any], fault: _Fault = _NO_FAULT) -> dict[str, Any]:
    return _with_tier(
        {
            "id": f"chatcmpl-sim-{state.next_id()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "simulated",
        },
        body,
        fault,
    )


def _with_tier(answer: dict[str, Any], body: dict[str, Any], fault: _Fault = _NO_FAULT) -> dict[str, Any]:
    """OpenAI says which tier processed a request that named one (``auto`` is the project's:
    ``default`` here); vLLM, which has none, says nothing."""
    asked = body.get("service_tier")
    if fault.service_tier_as is not None:
        answer["service_tier"] = fault.service_tier_as
    elif asked in ("auto", "default", "flex", "priority", "scale"):  # OpenAI refuses others; vLLM ignores them
        answer["service_tier"] = "default" if asked == "auto" else asked
    return answer


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _chat(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    error = _openai_request_error(body)
    window = state.window(body["model"]) if error is None else None
    if window is not None:
        error = _context_error(body, window)
    if error is not None:
        return error
    if fault.refusal is not None:
        return await _chat_refusal(request, state, body, fault, fault.refusal)
    if needs_extras(body):
        return await _chat_extras(request, state, body, fault)
    prompt_tokens, answer = _openai_answer(state, body, fault)
    if body.get("stream") is True:
        return await _chat_stream(request, state, body, fault, prompt_tokens, answer)
    return _json_response(_encode_json(_plain_completion(state, body, fault, prompt_tokens, answer)))


def _completion(state: _State, body: dict[str, Any], fault: _Fault) -> dict[str, Any]:
    """A valid chat request's ``chat.completion`` (:class:`ChatRequestError` for bad extras)."""
    if needs_extras(body):
        return _extras_completion(state, body, fault, _extras_plan(state, body, fault))
    prompt_tokens, answer = _openai_answer(state, body, fault)
    return _plain_completion(state, body, fault, prompt_tokens, answer)


def _plain_completion(
    state: _State, body: dict[str, Any], fault: _Fault, prompt_tokens: int, answer: Answer
) -> dict[str, Any]:
    completion: dict[str, Any] = {
        "id": f"chatcmpl-sim-{state.next_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "simulated",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": FINISH[answer.finish],
                "stop_reason": answer.stop_sequence,
            }
        ],
    }
    if not fault.omit_usage:
        completion["usage"] = _reported(_usage(prompt_tokens, answer.n_tokens), fault)
    return _with_tier(completion, body, fault)


async def _chat_stream(
    request: web.Request,
    state: _State,
    body: dict[str, Any],
    fault: _Fault,
    prompt_tokens: int,
    answer: Answer,
) -> web.StreamResponse:
    include_usage = _include_usage(body)
    base = _chunk_base(state, body, fault)

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = answer.stop_sequence  # vLLM's: the stop string matched
        data = {**base, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return b"data: " + _encode_json(data) + b"\n\n"

    sink = await _start_sse(request, fault, state)
    await sink.send(chunk({"role": "assistant", "content": ""}))
    for piece in answer.pieces:
        await sink.pause()
        await sink.send(chunk({"content": piece}))
    if fault.usage_on_finish_chunk and include_usage:
        finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": FINISH[answer.finish]}
        data = {**base, "choices": [finish], "usage": _reported(_usage(prompt_tokens, answer.n_tokens), fault)}
        await sink.send(b"data: " + _encode_json(data) + b"\n\n")
    else:
        await sink.send(chunk({}, FINISH[answer.finish]))
    if include_usage and not fault.omit_usage and not fault.usage_on_finish_chunk:
        data = {**base, "choices": [], "usage": _reported(_usage(prompt_tokens, answer.n_tokens), fault)}
        if fault.tier_off_usage_chunk:
            data.pop("service_tier", None)
        await sink.send(b"data: " + _encode_json(data) + b"\n\n")
    await sink.send(b"data: [DONE]\n\n")
    return await sink.finish()


async def _chat_refusal(
    request: web.Request, state: _State, body: dict[str, Any], fault: _Fault, refusal: str
) -> web.StreamResponse:
    prompt_tokens, _ = _analyze_openai(_encode_json(body["messages"]))
    usage = _usage(prompt_tokens, count(refusal))
    if body.get("stream") is not True:
        message = {"role": "assistant", "content": None, "refusal": refusal}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        completion = {
            "id": f"chatcmpl-sim-{state.next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }
        return _json_response(_encode_json(completion))
    base = _chunk_base(state, body)
    sink = await _start_sse(request, fault, state)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + _encode_json(data) + b"\n\n"

    await sink.send(chunk({"role": "assistant", "content": None, "refusal": ""}))
    for start in range(0, len(refusal), 7):
        await sink.send(chunk({"refusal": refusal[start : start + 7]}))
    await sink.send(chunk({}, "stop"))
    if _include_usage(body):
        await sink.send(b"data: " + _encode_json({**base, "choices": [], "usage": usage}) + b"\n\n")
    await sink.send(b"data: [DONE]\n\n")
    return await sink.finish()


async def _chat_extras(request: web.Request, state: _State, body: dict[str, Any], fault: _Fault) -> web.StreamResponse:
    """Tools, response_format, n and logprobs (see :mod:`.openai_extras`)."""
    try:
        plan = _extras_plan(state, body, fault)
    except ChatRequestError as exc:
        return _json_response(_openai_error(400, str(exc), exc.param), 400)
    if body.get("stream") is True:
        return await _chat_extras_stream(request, state, body, fault, plan)
    return _json_response(_encode_json(_extras_completion(state, body, fault, plan)))


def _extras_plan(state: _State, body: dict[str, Any], fault: _Fault) -> ChatPlan:
    prompt_tokens, words = _analyze_openai(_encode_json(body["messages"]))
    return plan_chat(
        body,
        name=state.name,
        prompt_tokens=prompt_tokens,
        echo=words,
        fault_text=fault.text,
        max_tokens=_max_tokens(body),
        stops=stop_tuple(body.get("stop")) or (),
    )


def _extras_completion(state: _State, body: dict[str, Any], fault: _Fault, plan: ChatPlan) -> dict[str, Any]:
    completion: dict[str, Any] = {
        "id": f"chatcmpl-sim-{state.next_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "simulated",
        "choices": response_choices(plan),
    }
    if not fault.omit_usage:
        completion["usage"] = _reported(_usage(plan.prompt_tokens, plan.completion_tokens), fault)
    return completion


async def _chat_extras_stream(
    request: web.Request, state: _State, body: dict[str, Any], fault: _Fault, plan: ChatPlan
) -> web.StreamResponse:
    include_usage = _include_usage(body)
    base = _chunk_base(state, body)
    sink = await _start_sse(request, fault, state)
    rounds = stream_rounds(plan)
    for number, deltas in enumerate(rounds):
        if 0 < number < len(rounds) - 1:
            await sink.pause()
        for index, delta, logprobs, finish in deltas:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            data = {**base, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            await sink.send(b"data: " + _encode_json(data) + b"\n\n")
    if include_usage and not fault.omit_usage:
        data = {**base, "choices": [], "usage": _reported(_usage(plan.prompt_tokens, plan.completion_tokens), fault)}
        await sink.send(b"data: " + _encode_json(data) + b"\n\n")
    await sink.send(b"data: [DONE]\n\n")
    return await sink.finish()


async def _chat_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _chat, "chat")


async def _embeddings(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    try:
        data = embeddings_response(body)
    except EmbeddingInputError as exc:
        return _json_response(_openai_error(400, str(exc), exc.param), 400)
    if fault.omit_usage:
        del data["usage"]
    else:
        data["usage"] = _reported(data["usage"], fault)
    return _json_response(_encode_json(data))


async def _embeddings_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _embeddings, "embeddings")


# ------------------------------------------------------------------------ Anthropic


# ------------------------------------------------------------------- OpenAI Responses


def _responses_error(exc: ResponsesRequestError) -> web.Response:
    error = {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": exc.code}
    return _json_response(_encode_json({"error": error}), exc.status)


async def _responses(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    if not isinstance(body, dict):
        return _json_response(_openai_error(400, "request body must be a JSON object"), 400)
    key = _api_key(request) or ""
    try:
        turn = plan_turn(_encode_json(body), state.turns, key)
        completion = _completion(state, turn.chat, fault)
    except ResponsesRequestError as exc:
        return _responses_error(exc)
    except ChatRequestError as exc:
        return _json_response(_openai_error(400, str(exc), exc.param), 400)
    answer = answer_from_completion(completion)
    history_tokens, _ = _analyze_openai(_encode_json(turn.history_chat)) if turn.history_chat else (0, "")
    usage = None if fault.omit_usage else with_cache(answer.usage, history_tokens)
    response_id = state.turns.new_id()
    created_at = int(time.time())
    messages = [*turn.history, *turn.decoded.request.messages, assistant_message(answer)]
    if body.get("stream") is not True:
        response = response_object(
            turn.decoded,
            response_id,
            created_at,
            output=output_items(answer),
            usage=usage,
            finish_reason=answer.finish_reason,
        )
        if turn.decoded.store:
            state.turns.keep(key, response, messages)
        return _json_response(_encode_json(response))
    encoder = ResponsesStreamEncoder(turn.decoded, response_id, created_at)
    sink = await _start_sse(request, fault, state)
    await sink.send(encoder.start())
    for written, deltas in enumerate(stream_deltas(answer), start=1):
        if fault.failed_after_events is not None and written >= fault.failed_after_events:
            await sink.send(encoder.fail("The model failed to generate a response.", fault.failed_code))
            return await sink.finish()
        await sink.pause()
        await sink.send(encoder.feed(deltas))
    if usage is not None:
        encoder.feed([UsageReport(usage)])
    last = encoder.finish()
    if turn.decoded.store and encoder.response is not None:
        state.turns.keep(key, encoder.response, messages)
    await sink.send(last)
    return await sink.finish()


async def _responses_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _responses, "responses")


async def _stored_response_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.stats.last_stored_path = request.path_qs
    fault = state.faults.popleft() if state.faults else _NO_FAULT  # OpenAI limits and fails these calls too
    if fault.status is not None:
        return _fault_response(fault, fault.status, anthropic=False)
    key, response_id = _api_key(request) or "", request.match_info["response_id"]
    stored = state.turns.get(key, response_id)
    if stored is None:
        message = f"Response with id '{response_id}' not found."
        return _responses_error(ResponsesRequestError(404, message))
    if request.method == "DELETE":
        state.turns.delete(key, response_id)
        return _json_response(_encode_json({"id": response_id, "object": "response", "deleted": True}))
    if request.path.endswith("/cancel"):  # nothing the simulator keeps ran in the background
        message = "Only responses created with background=true can be cancelled."
        return _responses_error(ResponsesRequestError(400, message))
    if request.path.endswith("/input_items"):
        conversation = stored[1][:-1]  # the whole of it, as one turn
        items = input_items(conversation, [(response_id, item_count(conversation))])
        if request.query.get("order", "desc") == "desc":
            items.reverse()
        items = _items_between(items, request.query.get("after"), request.query.get("before"))
        limit = int(request.query.get("limit", "20"))
        page = {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
        page.update(first_id=items[0]["id"] if items else None, last_id=items[:limit][-1]["id"] if items else None)
        return _json_response(_encode_json(page))
    return _json_response(_encode_json(stored[0]))


def _items_between(items: list[dict[str, Any]], after: str | None, before: str | None) -> list[dict[str, Any]]:
    """The listed items after ``after`` and before ``before`` (ids, in the list's order), as OpenAI
    pages ``input_items``: the SDKs' auto-paging asks ``after`` the last id it was given."""
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    end = ids.index(before) if before in ids else len(items)
    return items[start:end]


def _anthropic_bad(message: str) -> web.Response:
    return _json_response(_anthropic_error(400, message), 400)


def _anthropic_request_error(request: web.Request, body: Any, *, count_only: bool = False) -> web.Response | None:
    """400 response for a malformed Messages request, or None when it is fine."""
    if "anthropic-version" not in request.headers:
        return _anthropic_bad("anthropic-version: header is required")
    if not isinstance(body, dict):
        return _anthropic_bad("request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        return _anthropic_bad("model: Field required")
    if not count_only and not is_positive_int(body.get("max_tokens")):
        return _anthropic_bad("max_tokens: Field required (a positive integer)")
    extra = sorted(set(body) - _COUNT_TOKENS_FIELDS) if count_only else []
    if extra:  # Anthropic's count_tokens takes no max_tokens, stream, metadata, ...
        return _anthropic_bad(f"{extra[0]}: Extra inputs are not permitted")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _anthropic_bad("messages: must be a non-empty list")
    stops = stop_tuple(body.get("stop_sequences"))
    if stops is None:
        return _anthropic_bad("stop_sequences: must be a list of strings")
    if any(not stop.strip() for stop in stops):
        return _anthropic_bad("stop_sequences: each stop sequence must contain non-whitespace")
    if _blank_text(messages) or _blank_text([{"content": body.get("system")}]):
        return _anthropic_bad("messages: text content blocks must contain non-whitespace text")
    if "temperature" in body and "top_p" in body and _ONE_SAMPLER.search(body["model"]):
        return _anthropic_bad("`temperature` and `top_p` cannot both be specified for this model. Please use only one.")
    try:
        validate(body)
    except MessagesRequestError as exc:
        return _anthropic_bad(str(exc))
    return None


_COUNT_TOKENS_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "context_management",
     "output_config", "output_format"}
)  # fmt: skip

_ONE_SAMPLER = re.compile(r"claude-(opus|sonnet|haiku)-4-[1-9]")
"""Claude's models since Opus 4.1 and Sonnet 4.5 take ``temperature`` or ``top_p``, not both."""


def _blank_text(messages: list[Any]) -> bool:
    """A text block, or a string content, of whitespace alone (Anthropic refuses them)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks if isinstance(blocks, list) else ():
            text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
            if isinstance(text, str) and text.isspace():
                return True
    return False


def _anthropic_usage(plan: MessagesPlan, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


_SERVER_TOOL = re.compile(r"(web_search|web_fetch)_\d{8}")


def _ran_with(body: dict[str, Any]) -> dict[str, Any]:
    """What Anthropic's usage says the answer ran at, as asked: ``speed``, ``inference_geo``."""
    return {name: body[name] for name in ("speed", "inference_geo") if isinstance(body.get(name), str)}


def _server_tool_use(body: dict[str, Any]) -> dict[str, Any]:
    """``server_tool_use`` as Anthropic counts it: each web search or fetch tool offered is used
    its ``max_uses`` times (once when unset), as if Claude needed every one it may have."""
    used: dict[str, int] = {}
    for tool in body.get("tools") or ():
        matched = _SERVER_TOOL.fullmatch(str(tool.get("type"))) if isinstance(tool, dict) else None
        if matched is not None:
            uses = tool.get("max_uses")
            name = f"{matched[1]}_requests"
            used[name] = used.get(name, 0) + (uses if isinstance(uses, int) and uses > 0 else 1)
    return {"server_tool_use": used} if used else {}


_CODE_EXECUTION = re.compile(r"code_execution_\d{8}")


def _container(body: dict[str, Any], msg_id: str) -> dict[str, Any]:
    """The ``container`` Anthropic's answer names when a code execution tool is offered (taken as
    run: its usage counts no runs, and Anthropic bills the container's time)."""
    tools = body.get("tools")
    if not any(isinstance(tool, dict) and _CODE_EXECUTION.fullmatch(str(tool.get("type"))) for tool in tools or ()):
        return {}
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    return {"container": {"id": f"container_{msg_id.removeprefix('msg_')}", "expires_at": expires}}


async def _messages(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    error = _anthropic_request_error(request, body)
    if error is not None:
        return error
    body = without_system_messages(body)
    plan = plan_messages(body, name=state.name, fault_text=fault.text)
    if fault.stop_reason is not None:
        plan = replace(plan, stop_reason=fault.stop_reason)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.get("stream") is True:
        return await _messages_stream(request, state, body, fault, msg_id, plan)
    message: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [block.content() for block in plan.blocks],
        "stop_reason": plan.stop_reason,
        "stop_sequence": plan.stop_sequence,
        **_container(body, msg_id),
    }
    if not fault.omit_usage:
        usage = _reported(_anthropic_usage(plan, plan.output_tokens), fault)
        message["usage"] = usage | _ran_with(body) | _server_tool_use(body)
    return _json_response(_encode_json(message))


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode_json(data) + b"\n\n"


async def _messages_stream(
    request: web.Request,
    state: _State,
    body: dict[str, Any],
    fault: _Fault,
    msg_id: str,
    plan: MessagesPlan,
) -> web.StreamResponse:
    start: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": plan.stop_reason, "stop_sequence": plan.stop_sequence, **_container(body, msg_id)},
    }
    if not fault.omit_usage:
        start["usage"] = _reported(_anthropic_usage(plan, 1), fault) | _ran_with(body)
        final = _reported({"output_tokens": plan.output_tokens}, fault)
        delta["usage"] = final | _server_tool_use(body)  # the final count
    sink = await _start_sse(request, fault, state)
    await sink.send(_event("message_start", {"type": "message_start", "message": start}))
    for index, block in enumerate(plan.blocks):
        begin = {"type": "content_block_start", "index": index, "content_block": block.start()}
        await sink.send(_event("content_block_start", begin))
        if index == 0:
            await sink.send(_event("ping", {"type": "ping"}))
        for part in block.deltas():
            await sink.pause()
            await sink.send(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": part})
            )
        await sink.send(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    if not fault.omit_message_delta:
        await sink.send(_event("message_delta", delta))
    if not fault.omit_message_stop:
        await sink.send(_event("message_stop", {"type": "message_stop"}))
    return await sink.finish()


async def _messages_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _messages, "messages")


async def _count_tokens(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    error = _anthropic_request_error(request, body, count_only=True)
    if error is not None:
        return error
    return _json_response(_encode_json({"input_tokens": input_tokens(without_system_messages(body))}))


async def _count_tokens_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _count_tokens, "count_tokens")


# ------------------------------------------------------------------ other endpoints


async def _models_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.stats.models_requests += 1
    data = {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "simulated"}]}
    return _json_response(_encode_json(data))


async def _healthz_handler(request: web.Request) -> web.Response:
    name = request.app[_STATE].name
    return _json_response(_encode_json({"status": "ok", "simulated": True, "name": name}))


async def _faults_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        body = await _read_json(request)
        raw_faults = body.get("faults") if isinstance(body, dict) else None
        if not isinstance(raw_faults, list):
            raise ValueError('body must be {"faults": [...]}')
        faults = [msgspec.convert(raw, _Fault) for raw in raw_faults]
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        return _json_response(_openai_error(400, f"bad faults: {exc}"), 400)
    state.faults.extend(faults)
    return _json_response(_encode_json({"queued": len(state.faults)}))


async def _stats_handler(request: web.Request) -> web.Response:
    return _json_response(_encode_json(request.app[_STATE].stats.to_json()))


async def _windows_handler(request: web.Request) -> web.Response:
    """``{"model name": tokens, ...}``: the context window of each model this server stands in for."""
    state = request.app[_STATE]
    try:
        windows = msgspec.convert(await _read_json(request), dict[str, int])
        if any(tokens < 1 for tokens in windows.values()):
            raise ValueError("each window must be a positive number of tokens")
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        return _json_response(_openai_error(400, f"bad windows: {exc}"), 400)
    state.windows.update(windows)
    return _json_response(_encode_json({"windows": state.windows}))


async def _reset_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.faults.clear()
    state.stats.reset()
    return _json_response(b'{"reset":true}')


async def _warm_tokenizer(app: web.Application) -> None:
    encoding().encode("warm up")


def build_app(
    name: str,
    *,
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    weak: tuple[str, ...] = (),
    max_model_len: int | None = None,
) -> web.Application:
    """The aiohttp application; run it with ``handler_cancellation=True`` (see module docs)."""
    app = web.Application()
    app[_STATE] = _State(
        name=name,
        latency_s=latency_ms / 1000.0,
        chunk_delay_s=chunk_delay_ms / 1000.0,
        weak_on=weak,
        max_model_len=max_model_len,
    )
    app.on_startup.append(_warm_tokenizer)
    app.router.add_post("/v1/chat/completions", _chat_handler)
    app.router.add_post("/v1/embeddings", _embeddings_handler)
    app.router.add_post("/v1/messages", _messages_handler)
    app.router.add_post("/v1/responses", _responses_handler)
    app.router.add_get("/v1/responses/{response_id}", _stored_response_handler)
    app.router.add_get("/v1/responses/{response_id}/input_items", _stored_response_handler)
    app.router.add_post("/v1/responses/{response_id}/cancel", _stored_response_handler)
    app.router.add_delete("/v1/responses/{response_id}", _stored_response_handler)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens_handler)
    app.router.add_get("/v1/models", _models_handler)
    app.router.add_get("/healthz", _healthz_handler)
    app.router.add_post("/_control/faults", _faults_handler)
    app.router.add_get("/_control/stats", _stats_handler)
    app.router.add_post("/_control/reset", _reset_handler)
    app.router.add_post("/_control/windows", _windows_handler)
    return app


# ----------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulated", description="Simulated OpenAI/Anthropic-compatible upstream."
    )
    parser.add_argument("--name", required=True, help="model name served and echoed in answers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sleep before every answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="sleep between stream chunks")
    parser.add_argument("--ready-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    parser.add_argument(
        "--weak-on",
        default="",
        help="comma-separated words: answer badly when the prompt mentions one, and judge shadow "
        "requests by it (gateway/simulated/quality.py)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="refuse chat prompts that do not fit, with vLLM's 400 (its flat error body of before 0.10.2)",
    )
    return parser.parse_args(argv)


def _write_ready_file(path: Path, port: int) -> None:
    """Atomic write, so a polling parent never reads a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            stop.set()
            return
        await asyncio.sleep(0.5)


async def _serve(args: argparse.Namespace) -> None:
    weak = tuple(w.strip().lower() for w in args.weak_on.split(",") if w.strip())
    app = build_app(
        args.name,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        weak=weak,
        max_model_len=args.max_model_len,
    )
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(args.parent_pid, stop)) if args.parent_pid else None
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = int(runner.addresses[0][1])
        if args.ready_file is not None:
            _write_ready_file(args.ready_file, port)
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run a simulated upstream until SIGTERM/SIGINT; returns the exit code."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"simulated upstream {args.name!r}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
