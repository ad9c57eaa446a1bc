"""An OpenAI-compatible upstream (one model Anthropic-compatible) that misbehaves the way real
servers and proxies do.

The behaviour is the model name the gateway sends (``upstream_model`` in the test
policy), so one server serves every fault:

- ``comments``: a streamed answer of SSE comments (``: keep-alive``) only, for ever;
- ``trickle``: one content chunk, then comments for ever (an upstream that stalls mid-answer);
- ``endless-line``: ``data: `` and then bytes without a newline, up to 40 MB;
- ``no-choices``: ``{"choices": []}``, or a stream of ``data: [DONE]`` alone;
- ``firehose``: content chunks as fast as the gateway takes them, for ever (the connection's
  closing is counted in ``released``);
- ``few-huge``: ten content chunks of 420 KB each, then the finish;
- ``one-huge``: one content chunk of 900 KB, then the finish and a usage of 1 token;
- ``long-answer``: 200 KB of content chunks as fast as the gateway takes them, then the finish;
  ``big-answer``: the same with 5.5 MB (more than a loopback socket's send buffer grows to,
  ``net.ipv4.tcp_wmem``'s usual 4 MB, so that it cannot all be handed to the kernel, and less
  than the 8 MB the gateway reads ahead of a client);
- ``two-choices``: ``n`` = 2 with usage in every chunk (vLLM's ``continuous_usage_stats``);
  the first choice finishes, then 2.5 s of silence before the second goes on;
- ``drop-after-finish``: a whole streamed answer (its finish and usage chunks), then the
  connection drops before ``[DONE]``; ``stall-after-finish``: the same, then comments for ever;
- ``calls-at-zero``: two tool calls, both at index 0 with their own ids (as some compatible
  servers number every call), their arguments sent as JSON objects rather than text;
- ``odd-calls``: tool calls streamed in the shape the last user message names (one of
  :data:`CALL_SHAPES`): the id and name repeated whole in every chunk, indices 0 and 2, indices
  from 1, a first call whose arguments begin after the second's, or calls with empty or absent
  arguments; not streamed, the message they add up to;
- ``js-written``: an answer as a Node.js proxy writes it (t75): its text ends in half an emoji
  (a lone surrogate escape, ``"\\ud83d"``, which ``JSON.stringify`` writes and the SDKs read)
  and its usage counts are doubles (``22.0``), streamed or not;
- ``aborted``: a normal answer that ends with vLLM's ``finish_reason`` ``abort`` (a request
  the engine aborted), streamed or not;
- ``reasoning``: an answer as vLLM's ``--reasoning-parser`` writes it: its reasoning in
  ``reasoning_content`` (two chunks when streamed), then its text, streamed or not;
- ``echoing``: a normal answer, but a 400 for a ``guided_choice`` that is not a list, quoting the
  client's value in its message as vLLM's validation errors do; a 422 as FastAPI writes it for a
  ``payment_method`` (a field it does not take: its name in ``loc``, its value in ``input``); and a
  400 in vLLM's flat shape for any tool, naming it unquoted;
- ``echoing-claude``, at ``/v1/messages``: an Anthropic message, but a 400 for a stop sequence
  over 32 characters, quoting it in its message as vLLM's Anthropic endpoint's validation errors do,
  and one for an ``anthropic-beta`` value starting ``x-``, quoting it as Anthropic does;
- ``flat-error``: streamed, a role chunk and some text, then vLLM's flat error object
  (``{"object": "error", ...}``, no ``error`` key: a guided-decoding failure) and ``[DONE]``;
  ``no-finish``: a role chunk and some text, then ``[DONE]`` with no finish reason (not
  streamed, an answer whose ``finish_reason`` is null);
- ``in-band-error``: streamed, a role chunk, then vLLM's ``{"error": {...}}`` whose ``code`` is the
  status the last user message names (``"400"``, ``"503"``), then ``[DONE]``;
- ``fastapi-422``: a 422 as FastAPI writes it, ``{"detail": [...]}`` (pydantic's errors), streamed
  or not;
- ``thinking-firehose``, at ``/v1/messages``, streamed: a thinking block's deltas as fast as the
  gateway takes them for the first 256 KiB, then one every 20 ms, for ever (the connection's
  closing is counted in ``released``). The drip keeps a slow client's hang-up ahead of the
  gateway's 16-bytes-per-token bound on a loaded machine, where loopback buffers take megabytes;
- ``marked``: a normal answer unless the prompt carries one of :data:`FAULTS`, which
  picks the failure (a 500, a body that is not JSON, no choices, an answer cut half-way,
  a hang, a stream of comments only);
- anything else: a normal answer, streamed or not.

It runs on loopback in a thread of its own, like the servers it stands in for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import ClientConnectionResetError, web

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, policy_text, start_gateway
from tests.loopback_app import serve_app

__all__ = ["CALL_SHAPES", "FAULTS", "REASONING", "FaultyUpstream", "start_faulty_upstream"]

FAULTS = ("FAULT-500", "FAULT-GARBAGE", "FAULT-EMPTY", "FAULT-CUT", "FAULT-HANG", "FAULT-COMMENTS")


@dataclass
class FaultyUpstream:
    url: str
    calls: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    """Per model: streams the gateway closed while they were still being written."""
    last_body: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model: the body of the last request it was sent."""


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-faulty", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }  # fmt: skip


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None, *, index: int = 0, usage: Any = None) -> bytes:
    payload = {
        "id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _handle(request: web.Request, upstream: FaultyUpstream) -> web.StreamResponse:
    try:
        return await _answer(request, upstream)
    except (ConnectionError, ClientConnectionResetError):  # the gateway gave up on an endless answer
        return web.Response(status=499)


async def _answer(request: web.Request, upstream: FaultyUpstream) -> web.StreamResponse:
    body = await request.json()
    model = str(body.get("model"))
    upstream.calls[model] = upstream.calls.get(model, 0) + 1
    upstream.last_body[model] = body
    stream = bool(body.get("stream"))
    if model == "echoing" and not isinstance(body.get("guided_choice", []), list):
        return _echoed(body["guided_choice"])
    if model == "echoing" and "payment_method" in body:
        extra = {"type": "extra_forbidden", "loc": ["body", "payment_method"], "msg": "Extra inputs are not permitted",
                 "input": body["payment_method"]}  # fmt: skip
        return web.json_response({"detail": [extra]}, status=422)
    if model == "echoing" and body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        refused = {"object": "error", "message": f"Value error, tool name {name} is not allowed",
                   "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip
        return web.json_response(refused, status=400)
    if model == "marked":
        prompt = msgspec.json.encode(body.get("messages")).decode()
        fault = next((name for name in FAULTS if name in prompt), None)
        if fault is not None:
            return await _marked_fault(request, fault, model, stream)
    if model == "calls-at-zero":
        return await _calls_at_zero(request, model, stream)
    if model == "odd-calls":
        return await _odd_calls(request, model, stream, str(body["messages"][-1]["content"]))
    if model == "js-written":
        return await _js_written(request, model, stream)
    if model == "reasoning":
        return await _reasoning(request, model, stream)
    if model in ("flat-error", "no-finish") and stream:
        return await _unfinished(request, model)
    if model == "in-band-error" and stream:
        return await _in_band_error(request, model, int(body["messages"][-1]["content"]))
    if model == "fastapi-422":
        problems = [{"type": "missing", "loc": ["body", "messages", 0, "name"], "msg": "Field required", "input": None},
                    {"type": "int_type", "loc": ["body", "seed"], "msg": "Input should be a valid integer"}]  # fmt: skip
        return web.json_response({"detail": problems}, status=422)
    if model == "no-choices" and not stream:
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": []})
    finish = "abort" if model == "aborted" else None if model == "no-finish" else "stop"
    if not stream:
        completion = _completion(model, "a fine answer")
        completion["choices"][0]["finish_reason"] = finish
        return web.json_response(completion)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    if model == "no-choices":
        await response.write(b"data: [DONE]\n\n")
    elif model in ("comments", "trickle"):
        if model == "trickle":
            await response.write(_chunk(model, {"role": "assistant", "content": "a fine"}))
        while True:
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
    elif model == "firehose":
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        piece = _chunk(model, {"content": "flood " * 200})
        try:
            while True:
                await response.write(piece)
        except (ConnectionError, ClientConnectionResetError):
            upstream.released[model] = upstream.released.get(model, 0) + 1
            raise
    elif model == "few-huge":
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        piece = _chunk(model, {"content": "flood " * 70_000})
        try:
            for _ in range(10):
                await response.write(piece)
            await response.write(_chunk(model, {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionError, ClientConnectionResetError):
            upstream.released[model] = upstream.released.get(model, 0) + 1
            raise
    elif model == "one-huge":
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        await response.write(_chunk(model, {"content": "x" * 900_000}))
        await response.write(_chunk(model, {}, "stop", usage={"prompt_tokens": 5, "completion_tokens": 1}))
        await response.write(b"data: [DONE]\n\n")
    elif model in ("long-answer", "big-answer"):
        await response.write(_chunk(model, {"role": "assistant", "content": ""}))
        piece = _chunk(model, {"content": "flood " * 200})
        for _ in range((200_000 if model == "long-answer" else 5_500_000) // len(piece)):
            await response.write(piece)
        await response.write(_chunk(model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
    elif model == "two-choices":
        written = 0

        async def say(index: int, delta: dict[str, Any], finish: str | None = None) -> None:
            nonlocal written
            written += 1 if delta.get("content") else 0
            usage = {"prompt_tokens": 5, "completion_tokens": written, "total_tokens": 5 + written}
            await response.write(_chunk(model, delta, finish, index=index, usage=usage))

        for index in (0, 1):
            await say(index, {"role": "assistant", "content": ""})
        await say(0, {"content": "short"})
        await say(0, {}, "stop")
        await asyncio.sleep(2.5)  # the other choice is still being written (a busy server)
        for word in ("a", " longer", " answer"):
            await say(1, {"content": word})
        await say(1, {}, "stop")
        await response.write(b"data: [DONE]\n\n")
    elif model in ("drop-after-finish", "stall-after-finish"):
        await response.write(_chunk(model, {"role": "assistant", "content": "a fine"}))
        await response.write(_chunk(model, {"content": " answer"}, "stop"))
        usage = {"id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}  # fmt: skip
        await response.write(b"data: " + msgspec.json.encode(usage) + b"\n\n")
        while model == "stall-after-finish":
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # no [DONE], and the chunked body never ends
        return response
    elif model == "endless-line":
        await response.write(b"data: ")
        piece = b"x" * 65536
        for _ in range(40 * 16):
            await response.write(piece)
            await asyncio.sleep(0)
    else:
        await response.write(_chunk(model, {"role": "assistant", "content": "a fine"}))
        await response.write(_chunk(model, {"content": " answer"}, finish))
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _messages(request: web.Request, upstream: FaultyUpstream) -> web.StreamResponse:
    """The Messages API: ``echoing-claude`` and ``thinking-firehose`` (see the module's docstring)."""
    body = await request.json()
    model = str(body.get("model"))
    upstream.calls[model] = upstream.calls.get(model, 0) + 1
    upstream.last_body[model] = body
    if model == "thinking-firehose" and body.get("stream"):
        return await _thinking_firehose(request, upstream, model)
    betas = [beta for beta in request.headers.get("anthropic-beta", "").split(",") if beta.startswith("x-")]
    if betas:  # as Anthropic answers a beta it does not know, quoting it
        unknown = f"Unexpected value(s) `{betas[0]}` for the `anthropic-beta` header. Please consult our documentation."
        return web.json_response(
            {"type": "error", "error": {"type": "invalid_request_error", "message": unknown}}, status=400
        )
    long = [(at, stop) for at, stop in enumerate(body.get("stop_sequences") or []) if len(stop) > 32]
    if long:
        at, stop = long[0]
        problem = [{"type": "string_too_long", "loc": ("body", "stop_sequences", at),
                    "msg": "String should have at most 32 characters", "input": stop}]  # fmt: skip
        error = {"type": "invalid_request_error", "message": str(problem)}
        return web.json_response({"type": "error", "error": error}, status=400)
    message = {"id": "msg_faulty", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": "a fine answer"}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3}}  # fmt: skip
    return web.json_response(message)


def _event(data: dict[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


async def _thinking_firehose(request: web.Request, upstream: FaultyUpstream, model: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    message: dict[str, Any] = {"id": "msg_thinking", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    await response.write(_event({"type": "message_start", "message": message}))
    block = {"type": "thinking", "thinking": "", "signature": ""}
    await response.write(_event({"type": "content_block_start", "index": 0, "content_block": block}))
    piece = _event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm " * 50}}
    )
    written = 0
    try:
        while True:
            await response.write(piece)
            written += len(piece)
            if written > 256 * 1024:
                await asyncio.sleep(0.02)
    except (ConnectionError, ClientConnectionResetError):
        upstream.released[model] = upstream.released.get(model, 0) + 1
        raise


def _echoed(value: object) -> web.Response:
    """vLLM's 400 for a field of the wrong type: its validation error as text, the value quoted."""
    problem = [{"type": "list_type", "loc": ("body", "guided_choice"), "msg": "Input should be a valid list",
                "input": value}]  # fmt: skip
    error = {"message": str(problem), "type": "BadRequestError", "param": None, "code": 400}
    return web.json_response({"error": error}, status=400)


_GUIDED_DECODING_FAILED = {"object": "error", "message": "Guided decoding backend failed: bad schema",
                           "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip


async def _unfinished(request: web.Request, model: str) -> web.StreamResponse:
    """Some text, then no finish: vLLM's flat error object (``flat-error``) or nothing, then ``[DONE]``."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": ""}))
    await response.write(_chunk(model, {"content": "half an"}))
    if model == "flat-error":
        await response.write(b"data: " + msgspec.json.encode(_GUIDED_DECODING_FAILED) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _in_band_error(request: web.Request, model: str, code: int) -> web.StreamResponse:
    """vLLM's error when generation fails before any text: in band, its status as ``code``."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": ""}))
    said = {"message": "engine dead", "type": "InternalServerError"} if code >= 500 else {}
    error = {**_GUIDED_DECODING_FAILED, "code": code, **said}
    await response.write(b"data: " + msgspec.json.encode({"error": error}) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


_JS_USAGE = b'{"prompt_tokens":22.0,"completion_tokens":7.0,"total_tokens":29.0}'


async def _js_written(request: web.Request, model: str, stream: bool) -> web.StreamResponse:
    head = b'{"id":"chatcmpl-js","created":0,"model":"%s",' % model.encode()
    text = b'"half an emoji \\ud83d"'
    if not stream:
        body = head + b'"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":'
        return web.Response(body=body + text + b'},"finish_reason":"stop"}],"usage":' + _JS_USAGE + b"}",
                            content_type="application/json")  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = head + b'"object":"chat.completion.chunk","choices":['
    await response.write(b"data: " + chunk + b'{"index":0,"delta":{"role":"assistant","content":' + text + b"}}]}\n\n")
    await response.write(b"data: " + chunk + b'{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    await response.write(b"data: " + chunk + b'],"usage":' + _JS_USAGE + b"}\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


REASONING = ("2 and 2 ", "make 4.")


async def _reasoning(request: web.Request, model: str, stream: bool) -> web.StreamResponse:
    if not stream:
        completion = _completion(model, "4")
        completion["choices"][0]["message"]["reasoning_content"] = "".join(REASONING)
        return web.json_response(completion)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": ""}))
    for piece in REASONING:
        await response.write(_chunk(model, {"reasoning_content": piece}))
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    await response.write(_chunk(model, {"content": "4"}))
    await response.write(_chunk(model, {}, "stop", usage=usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


_CALLS = (("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_time", {"zone": "CET"}))


async def _calls_at_zero(request: web.Request, model: str, stream: bool) -> web.StreamResponse:
    if not stream:
        completion = _completion(model, "")
        calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in _CALLS]
        completion["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        completion["choices"][0]["finish_reason"] = "tool_calls"
        return web.json_response(completion)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": None}))
    for call_id, name, arguments in _CALLS:
        start = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        await response.write(_chunk(model, {"tool_calls": [start]}))
        await response.write(_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}))
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    await response.write(_chunk(model, {}, "tool_calls", usage=usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _call(index: int, call_id: str | None, name: str | None, arguments: str | None = None) -> dict[str, Any]:
    function = {key: value for key, value in (("name", name), ("arguments", arguments)) if value is not None}
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        call |= {"id": call_id, "type": "function"}
    return call


CALL_SHAPES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "repeated": (  # the id and name again with every piece of the arguments
        [_call(0, "call_a", "get_weather", '{"city":'), _call(0, "call_a", "get_weather", ' "Paris"}')],
        [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    ),
    "gap": (  # numbered 0, 2
        [_call(0, "call_a", "get_weather", '{"city": "Paris"}'), _call(2, "call_b", "get_time", '{"zone": "CET"}')],
        [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}],
    ),
    "from-one": (  # numbered 1, 2
        [_call(1, "call_a", "get_weather", '{"city":'), _call(2, "call_b", "get_time", '{"zone": "CET"}'),
         _call(1, None, None, ' "Paris"}')],
        [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}],
    ),
    "late-arguments": (  # the first call's arguments begin after the second call's (t128)
        [_call(0, "call_a", "get_weather", ""), _call(1, "call_b", "get_time", '{"zone":'),
         _call(0, None, None, '{"city": "Paris"}'), _call(1, None, None, ' "CET"}')],
        [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}],
    ),
    "no-arguments": (  # one with empty arguments, one with none at all
        [_call(0, "call_a", "get_weather", ""), _call(1, "call_b", "get_time")],
        [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
         {"id": "call_b", "type": "function", "function": {"name": "get_time"}}],
    ),
}  # fmt: skip
"""Per shape: the tool-call deltas streamed one a chunk, and the message's calls when not streamed."""


async def _odd_calls(request: web.Request, model: str, stream: bool, shape: str) -> web.StreamResponse:
    deltas, calls = CALL_SHAPES[shape]
    if not stream:
        completion = _completion(model, "")
        completion["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        completion["choices"][0]["finish_reason"] = "tool_calls"
        return web.json_response(completion)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, {"role": "assistant", "content": None}))
    for call in deltas:
        await response.write(_chunk(model, {"tool_calls": [call]}))
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    await response.write(_chunk(model, {}, "tool_calls", usage=usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _marked_fault(request: web.Request, fault: str, model: str, stream: bool) -> web.StreamResponse:
    if fault == "FAULT-500":
        return web.json_response({"error": {"message": "simulated failure", "type": "server_error"}}, status=500)
    if fault == "FAULT-GARBAGE":
        return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
    if fault == "FAULT-EMPTY":
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": []})
    if fault == "FAULT-HANG":
        await asyncio.sleep(3600)
    response = web.StreamResponse(headers={"content-type": "text/event-stream" if stream else "application/json"})
    await response.prepare(request)
    if fault == "FAULT-COMMENTS":
        while True:
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
    # FAULT-CUT: half an answer, then the connection drops.
    await response.write(_chunk(model, {"role": "assistant", "content": "half"}) if stream else b'{"id": "x", "choi')
    assert request.transport is not None
    request.transport.close()
    return response


@contextmanager
def start_faulty_upstream() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _handle(request, upstream)

    async def messages(request: web.Request) -> web.StreamResponse:
        try:
            return await _messages(request, upstream)
        except (ConnectionError, ClientConnectionResetError):  # the gateway gave up on an endless answer
            return web.Response(status=499)

    routes = {"/v1/chat/completions": handle, "/v1/messages": messages}
    with serve_app(routes, name="faulty-upstream") as served:
        upstream.url = f"{served.url}/v1"
        yield upstream


_TWO_TENANTS = """auth:
  mode: keys
  keys:
    - {{id: a, tenant: tenant-a, hash: "{a}"}}
    - {{id: b, tenant: tenant-b, hash: "{b}"}}
"""


@contextmanager
def two_tenants_and_an_echoing_model(
    workdir: Path,
    model: str,
    redis: EmbeddedRedis,
    small: SimulatedUpstream,
    large: SimulatedUpstream,
    env: dict[str, str] | None = None,
    **policy: str,
) -> Iterator[tuple[GatewayProcess, FaultyUpstream]]:
    """A gateway whose keys ``key-a`` and ``key-b`` belong to two tenants, with ``model`` (a policy
    entry whose ``{url}`` is this upstream's ``/v1`` URL, ``{root}`` the same without it) served by
    a faulty upstream: a tenant's request that gets an upstream to quote it must teach nothing
    that reaches the other tenant. ``policy``: more of :func:`policy_text`'s arguments."""
    with start_faulty_upstream() as upstream:
        models = model.format(url=upstream.url, root=upstream.url.removesuffix("/v1"))
        auth = _TWO_TENANTS.format(a=hash_key("key-a"), b=hash_key("key-b"))
        text = policy_text(small, large, extra_models=models, auth=auth, **policy)
        process = start_gateway(workdir, text, env={"REDIS_URL": redis.url, **(env or {})})
        try:
            yield process, upstream
        finally:
            process.stop()
