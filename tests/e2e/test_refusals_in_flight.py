"""A field the upstream refuses, met by several requests already in flight when it is learned.

OpenAI's reasoning models refuse ``stop`` and ``max_tokens``, Claude's newer models ``temperature``
with ``top_p``: the gateway learns it from the first 400 and sends that request again as the model
takes it. The requests sent with the field before the lesson came back got the same 400, and only
the one that taught it was sent again: the others' clients got the refusal (a stream's in-band
error: f232). The loopback upstream here answers each request with the refused field only once
all of them have reached it, so that every one is in flight before the first 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, policy_text, start_gateway
from tests.loopback_app import serve_app, write_sse

_IN_FLIGHT = 4
"""Requests sent at once, half of them streamed."""

_MODELS = """  refuses-stop:
    base_url: {url}/v1
    upstream_model: refuses-stop
    tier: large
    price: {{input: 1, output: 4}}
    timeouts: {{connect: 2, first_byte: 60, total: 60}}
  refuses-max-tokens:
    base_url: {url}/v1
    upstream_model: refuses-max-tokens
    tier: large
    price: {{input: 1, output: 4}}
    timeouts: {{connect: 2, first_byte: 60, total: 60}}
  takes-one-sampler:
    provider: anthropic
    base_url: {url}
    upstream_model: takes-one-sampler
    tier: large
    price: {{input: 3, output: 15}}
    timeouts: {{connect: 2, first_byte: 60, total: 60}}
"""


@dataclass
class RefusingUpstream:
    """Refuses, as OpenAI and Anthropic word it, what its model does not take; holds each refusal
    until ``_IN_FLIGHT`` requests with the field have come (or 30 s have passed)."""

    url: str = ""
    refused: dict[str, int] = field(default_factory=dict)
    all_came: dict[str, asyncio.Event] = field(default_factory=dict)

    async def refuse(self, model: str, error: dict[str, Any]) -> web.Response:
        self.refused[model] = self.refused.get(model, 0) + 1
        came = self.all_came.setdefault(model, asyncio.Event())
        if self.refused[model] >= _IN_FLIGHT:
            came.set()
        try:
            await asyncio.wait_for(came.wait(), 30)
        except TimeoutError:
            pass  # answered all the same: the test's count tells
        return web.json_response(error, status=400)


def _openai_refusal(param: str) -> dict[str, Any]:
    message = f"Unsupported parameter: '{param}' is not supported with this model."
    if param == "max_tokens":
        message += " Use 'max_completion_tokens' instead."
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": "unsupported_parameter"}}  # fmt: skip


async def _chat(request: web.Request, upstream: RefusingUpstream) -> web.StreamResponse:
    body = await request.json()
    model = body["model"]
    if model == "refuses-stop" and body.get("stop") is not None:
        return await upstream.refuse(model, _openai_refusal("stop"))
    if model == "refuses-max-tokens" and "max_tokens" in body:
        return await upstream.refuse(model, _openai_refusal("max_tokens"))
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "one two three"}
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                  "usage": usage})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": "one two three"}, "stop")):
        await write_sse(response, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip
    await write_sse(response, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                               "choices": [], "usage": usage})  # fmt: skip
    await write_sse(response, b"[DONE]")
    return response


async def _messages(request: web.Request, upstream: RefusingUpstream) -> web.StreamResponse:
    body = await request.json()
    model = body["model"]
    if "temperature" in body and "top_p" in body:  # Anthropic's own words, for its models since Sonnet 4.5
        message = "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
        return await upstream.refuse(
            model, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        )
    usage = {"input_tokens": 5, "output_tokens": 3}
    if not body.get("stream"):
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                                  "content": [{"type": "text", "text": "one two three"}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": usage})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "one two three"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    for name, data in events:
        await write_sse(response, data, name)
    return response


@pytest.fixture(scope="module")
def refusing_upstream() -> Iterator[RefusingUpstream]:
    upstream = RefusingUpstream()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _chat(request, upstream)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _messages(request, upstream)

    with serve_app({"/v1/chat/completions": chat, "/v1/messages": messages}, name="refusing-upstream") as served:
        upstream.url = served.url
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    refusing_upstream: RefusingUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=refusing_upstream.url))
    process = start_gateway(tmp_path_factory.mktemp("refusals"), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


async def _openai_text(client: openai.AsyncOpenAI, model: str, stream: bool, refused: dict[str, Any]) -> str:
    messages: Any = [{"role": "user", "content": "Count to three."}]
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=messages, **refused)
        return answer.choices[0].message.content or ""
    chunks = [chunk async for chunk in await client.chat.completions.create(
        model=model, messages=messages, stream=True, **refused)]  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def _anthropic_text(client: anthropic.AsyncAnthropic, stream: bool) -> str:
    asked: Any = {"model": "takes-one-sampler", "max_tokens": 16, "messages": [{"role": "user", "content": "Count."}],
                  "extra_body": {"temperature": 0.2, "top_p": 0.9}}  # fmt: skip
    if not stream:
        message = await client.messages.create(**asked)
        return "".join(block.text for block in message.content if block.type == "text")
    async with client.messages.stream(**asked) as events:
        final = await events.get_final_message()
    return "".join(block.text for block in final.content if block.type == "text")


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ("refuses-stop", {"stop": ["never"]}),
        ("refuses-max-tokens", {"max_tokens": 32}),
        ("takes-one-sampler", {}),
    ],
)
async def test_every_request_in_flight_when_a_refusal_is_learned_is_sent_again_without_the_field(
    gateway: GatewayProcess, refusing_upstream: RefusingUpstream, model: str, refused: dict[str, Any]
) -> None:
    streams = [index % 2 == 1 for index in range(_IN_FLIGHT)]
    async with (
        openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=60) as oai,
        anthropic.AsyncAnthropic(base_url=gateway.url, api_key="x", max_retries=0, timeout=60) as claude,
    ):
        if model == "takes-one-sampler":
            texts = await asyncio.gather(*(_anthropic_text(claude, stream) for stream in streams))
        else:
            texts = await asyncio.gather(*(_openai_text(oai, model, stream, refused) for stream in streams))
    assert refusing_upstream.refused[model] == _IN_FLIGHT  # all were in flight before the first refusal
    assert texts == ["one two three"] * _IN_FLIGHT
