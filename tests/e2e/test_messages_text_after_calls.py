"""Text an upstream writes after a tool call, on a translated ``POST /v1/messages``: the anthropic
SDK's accumulated stream and the whole message have the same blocks (f142).

The loopback upstream answers as Anthropic (text, a call, text, a call, text) and as an
OpenAI-compatible server (content deltas after tool call deltas), streamed or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import msgspec
import pytest
from aiohttp import web
from anthropic.types import Message

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, policy_text, running_gateway
from tests.loopback_app import serve_app, write_sse

_MODELS = """  interleaving_chat:
    base_url: {url}/v1
    upstream_model: chat-model
    tier: large
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 20}}
  interleaving_claude:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-sonnet-4-5
    tier: large
    price: {{input: 3, output: 15}}
    timeouts: {{connect: 2, first_byte: 10, total: 20}}
"""

_CALLS = [("toolu_1", {"q": "x"}), ("toolu_2", {"q": "y"})]
_TEXTS = ["Let me check.", "Found one.", "Done."]
"""Written around and between the two calls: text, call, text, call, text."""

_USAGE = {"input_tokens": 12, "output_tokens": 30}


def _claude_blocks() -> list[dict[str, Any]]:
    calls = [{"type": "tool_use", "id": i, "name": "lookup", "input": arguments} for i, arguments in _CALLS]
    return [{"type": "text", "text": _TEXTS[0]}, calls[0], {"type": "text", "text": _TEXTS[1]}, calls[1],
            {"type": "text", "text": _TEXTS[2]}]  # fmt: skip


async def _anthropic(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    blocks, model = _claude_blocks(), body["model"]
    if not body.get("stream"):
        return web.json_response({"id": "msg_up", "type": "message", "role": "assistant", "model": model,
                                  "content": blocks, "stop_reason": "tool_use", "stop_sequence": None,
                                  "usage": _USAGE})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {"id": "msg_up", "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {**_USAGE, "output_tokens": 1}}  # fmt: skip
    await write_sse(response, {"type": "message_start", "message": start}, "message_start")
    for index, block in enumerate(blocks):
        text = block["type"] == "text"
        opening = {**block, "text": ""} if text else {**block, "input": {}}
        await write_sse(response, {"type": "content_block_start", "index": index, "content_block": opening},
                   "content_block_start")  # fmt: skip
        if text:
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            delta = {"type": "input_json_delta", "partial_json": msgspec.json.encode(block["input"]).decode()}
        await write_sse(
            response, {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
        )
        await write_sse(response, {"type": "content_block_stop", "index": index}, "content_block_stop")
    ending = {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": _USAGE}
    await write_sse(response, ending, "message_delta")
    await write_sse(response, {"type": "message_stop"}, "message_stop")
    return response


def _openai_call(index: int) -> dict[str, Any]:
    call_id, arguments = _CALLS[index]
    function = {"name": "lookup", "arguments": msgspec.json.encode(arguments).decode()}
    return {"index": index, "id": call_id, "type": "function", "function": function}


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    content = " ".join(_TEXTS)  # the whole answer's content: what the stream's deltas add up to
    if not body.get("stream"):
        calls = [{k: v for k, v in _openai_call(i).items() if k != "index"} for i in range(len(_CALLS))]
        message = {"role": "assistant", "content": content, "tool_calls": calls}
        return web.json_response({"id": "chatcmpl-up", "object": "chat.completion", "created": 1,
                                  "model": "chat-model", "usage": usage,
                                  "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)

    async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
        await write_sse(response, {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                              "model": "chat-model",
                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    await chunk({"role": "assistant", "content": _TEXTS[0]})
    await chunk({"tool_calls": [_openai_call(0)]})
    await chunk({"content": " " + _TEXTS[1]})
    await chunk({"tool_calls": [_openai_call(1)]})
    await chunk({"content": " " + _TEXTS[2]})
    await chunk({}, "tool_calls")
    await write_sse(response, {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                          "model": "chat-model", "choices": [], "usage": usage})  # fmt: skip
    await write_sse(response, b"[DONE]")
    return response


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    routes = {"/v1/chat/completions": _openai, "/v1/messages": _anthropic}
    with serve_app(routes, name="interleaving-upstream") as served:
        policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=served.url))
        workdir: Path = tmp_path_factory.mktemp("textaftercalls")
        with running_gateway(workdir, policy, env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"}) as process:
            yield process


def _blocks(message: Message) -> list[tuple[str, Any]]:
    return [
        (block.type, block.text if block.type == "text" else (block.id, block.name, block.input))
        if block.type in ("text", "tool_use")
        else (block.type, None)
        for block in message.content
    ]


@pytest.mark.parametrize(
    ("model", "joined"),
    [("interleaving_claude", "\n".join(_TEXTS)), ("interleaving_chat", " ".join(_TEXTS))],
)
def test_text_after_a_tool_call_streams_into_the_blocks_the_whole_message_has(
    gateway: GatewayProcess, model: str, joined: str
) -> None:
    """README: calls come last, whole, "in the order and with the input the non-streamed answer
    has", the texts joined: one text block, streamed or not (f142: the stream opened a second
    text block for the text after a call)."""
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0))
    ask: Any = {
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Look up x and y."}],
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
    }
    whole = claude.messages.create(**ask)
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    calls = [("tool_use", (call_id, "lookup", arguments)) for call_id, arguments in _CALLS]
    assert _blocks(whole) == [("text", joined), *calls]
    assert _blocks(streamed) == _blocks(whole)
    assert streamed.stop_reason == whole.stop_reason == "tool_use"
