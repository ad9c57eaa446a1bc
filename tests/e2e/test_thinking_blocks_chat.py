"""Claude's signed thinking met by a chat client of the openai SDK (t128).

The loopback upstream answers as Anthropic does with two signed thinking blocks, each before a
text, streamed or not, and keeps every body it was sent, so a test sees what the next turn gave it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web

from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording

_BLOCKS: list[dict[str, Any]] = [
    {"type": "thinking", "thinking": "First, the sky.", "signature": "S1"},
    {"type": "text", "text": "It is blue"},
    {"type": "thinking", "thinking": "Then, the sea.", "signature": "S2"},
    {"type": "text", "text": " and so is the sea."},
]
"""Claude's answer: thinking, text, thinking again (interleaved thinking), text."""

_SENT_BACK: list[dict[str, Any]] = [
    {"type": "thinking", "thinking": "First, the sky.", "signature": "S1"},
    {"type": "thinking", "thinking": "Then, the sea.", "signature": "S2"},
]
"""The thinking the turn sent back must give Anthropic: each block whole, its own signature, in order."""

_MODELS = """  claude2:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-sonnet-4-5
    tier: large
    price: {{input: 3, output: 15}}
    timeouts: {{connect: 2, first_byte: 10, total: 20}}
"""


_OVERLOADED = "Claude is overloaded: fall back."


def _events(model: str) -> list[tuple[str, dict[str, Any]]]:
    start: dict[str, Any] = {"id": "msg_two", "type": "message", "role": "assistant", "model": model, "content": [],
                             "stop_reason": None, "stop_sequence": None,
                             "usage": {"input_tokens": 9, "output_tokens": 1}}  # fmt: skip
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(_BLOCKS):
        thinking = block["type"] == "thinking"
        opening = {"type": "thinking", "thinking": "", "signature": ""} if thinking else {"type": "text", "text": ""}
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening})
        )
        text = block["thinking" if thinking else "text"]
        for piece in (text[:6], text[6:]):  # each block's text in two deltas
            delta = {"type": "thinking_delta", "thinking": piece} if thinking else {"type": "text_delta", "text": piece}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        if thinking:
            delta = {"type": "signature_delta", "signature": block["signature"]}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    ending = {"stop_reason": "end_turn", "stop_sequence": None}
    events.append(("message_delta", {"type": "message_delta", "delta": ending, "usage": {"output_tokens": 20}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    if body["messages"][-1]["content"] == _OVERLOADED:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return web.json_response({"type": "error", "error": error}, status=529)
    if not body.get("stream"):
        return web.json_response({"id": "msg_two", "type": "message", "role": "assistant", "model": body["model"],
                                  "content": _BLOCKS, "stop_reason": "end_turn", "stop_sequence": None,
                                  "usage": {"input_tokens": 9, "output_tokens": 20}})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for name, data in _events(body["model"]):
        await response.write(f"event: {name}\n".encode() + b"data: " + msgspec.json.encode(data) + b"\n\n")
    return response


@pytest.fixture(scope="module")
def claude_upstream() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/messages": _messages}, name="claude-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    claude_upstream: RecordingUpstream,
) -> Iterator[GatewayProcess]:
    routes = "  two-thoughts: {model: claude2}\n  claude-then-chat: {model: claude2, fallbacks: [small]}\n"
    models = _MODELS.format(url=claude_upstream.url)
    with pair_gateway("thinking", extra_models=models, routes=routes, env={"TEST_LARGE_KEY": "k"}) as process:
        yield process


@pytest.fixture
def oai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=20))


_ASK: list[Any] = [{"role": "user", "content": "What colour are the sky and the sea?"}]


def _sent_back(oai: openai.OpenAI, upstream: RecordingUpstream, turn: dict[str, Any]) -> list[dict[str, Any]]:
    """The assistant turn ``turn`` as the next request gives it to Anthropic: its thinking, then its text."""
    messages: list[Any] = [*_ASK, turn, {"role": "user", "content": "Why?"}]
    oai.chat.completions.create(model="two-thoughts", messages=messages)
    content: list[dict[str, Any]] = upstream.bodies[-1]["messages"][1]["content"]
    assert content[len(_SENT_BACK) :] == [{"type": "text", "text": turn["content"]}]
    return content[: len(_SENT_BACK)]


def test_the_stream_helper_accumulates_each_thinking_block_and_it_goes_back_whole(
    oai: openai.OpenAI, claude_upstream: RecordingUpstream
) -> None:
    """t128: each streamed ``thinking_blocks`` entry lacked an ``index``, and the SDK's helper,
    which merges list entries by it (as tool calls'), raised; the blocks' texts came only joined,
    in ``reasoning_content``, so the turn sent back gave Anthropic blocks without their text."""
    with oai.chat.completions.stream(model="two-thoughts", messages=_ASK) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == "First, the sky.Then, the sea."
    assert _sent_back(oai, claude_upstream, message.model_dump(exclude_none=True)) == _SENT_BACK


def test_a_whole_answers_thinking_blocks_go_back_whole(oai: openai.OpenAI, claude_upstream: RecordingUpstream) -> None:
    message = oai.chat.completions.create(model="two-thoughts", messages=_ASK).choices[0].message
    blocks = (message.model_extra or {})["thinking_blocks"]
    assert [(b["thinking"], b["signature"]) for b in blocks] == [("First, the sky.", "S1"), ("Then, the sea.", "S2")]
    assert _sent_back(oai, claude_upstream, message.model_dump(exclude_none=True)) == _SENT_BACK


def test_a_streams_thinking_block_entries_are_numbered_and_a_raw_client_can_send_them_back(
    oai: openai.OpenAI, claude_upstream: RecordingUpstream
) -> None:
    """A client reading the chunks itself, collecting the ``thinking_blocks`` entries as they come."""
    chunks = list(oai.chat.completions.create(model="two-thoughts", messages=_ASK, stream=True))
    deltas = [chunk.choices[0].delta.model_extra or {} for chunk in chunks if chunk.choices]
    entries = [entry for delta in deltas for entry in delta.get("thinking_blocks") or ()]
    assert [(entry["index"], entry["signature"]) for entry in entries] == [(0, "S1"), (1, "S2")]
    turn = {
        "role": "assistant",
        "content": "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices),
        "reasoning_content": "".join(delta.get("reasoning_content") or "" for delta in deltas),
        "thinking_blocks": entries,
    }
    assert _sent_back(oai, claude_upstream, turn) == _SENT_BACK


def test_thinking_blocks_sent_back_do_not_reach_a_chat_upstream_the_route_falls_back_to(
    oai: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """t128: a turn's ``thinking_blocks`` (Anthropic's signatures included) reached the chat
    upstream while ``x-gateway-dropped`` said the thinking was left out."""
    message = oai.chat.completions.create(model="two-thoughts", messages=_ASK).choices[0].message
    turn = message.model_dump(exclude_none=True)
    messages: list[Any] = [*_ASK, turn, {"role": "user", "content": _OVERLOADED}]
    raw = oai.chat.completions.with_raw_response.create(model="claude-then-chat", messages=messages)
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["x-gateway-dropped"] == "thinking"
    sent = upstream_stats(small_upstream)["last_request"]["body"]["messages"][1]
    assert "thinking_blocks" not in sent and sent["content"] == turn["content"]
    assert "S1" not in json.dumps(sent)
