"""Anthropic's Messages API served by the gateway over an OpenAI-compatible upstream, with the anthropic SDK."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import zlib
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import ImageBlockParam, MessageParam, TextBlockParam, ToolUnionParam

from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess


def test_a_message_is_answered_in_anthropics_shape(claude: anthropic.Anthropic, gateway: GatewayProcess) -> None:
    raw = claude.messages.with_raw_response.create(
        model="fast", max_tokens=64, messages=[{"role": "user", "content": "Name three primary colours."}]
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == "fast"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["request-id"].startswith("req_")
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["protocol"] == "anthropic.messages" and record["status"] == 200


def test_the_simulated_claude_takes_a_system_message_placed_in_the_conversation(claude: anthropic.Anthropic) -> None:
    """t208: `make run`'s simulated Claude refused a mid-conversation system message, which Claude
    Opus 4.8 takes and Claude Code sends for a model name it does not know: Claude Code's first
    request on such a route was a 400 from the simulator, though the gateway passed it on as sent."""
    messages: Any = [{"role": "user", "content": "Hello."}, {"role": "system", "content": "Answer in French."}]
    answer = claude.messages.create(model="claude", max_tokens=64, messages=messages)
    assert answer.stop_reason == "end_turn" and answer.content
    events = claude.messages.create(model="claude", max_tokens=64, messages=messages, stream=True)
    assert [event.type for event in events][-1] == "message_stop"
    assert claude.messages.count_tokens(model="claude", messages=messages).input_tokens > 0


def test_the_stream_helper_accumulates_the_same_answer(claude: anthropic.Anthropic) -> None:
    ask = {
        "model": "fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Describe the sea in a few words."}],
    }
    whole = claude.messages.create(**ask, extra_headers={"cache-control": "no-cache"})  # type: ignore[call-overload]
    with claude.messages.stream(**ask, extra_headers={"cache-control": "no-cache"}) as stream:  # type: ignore[arg-type]
        seen = list(stream)
        events = [event.type for event in seen]
        final = stream.get_final_message()
    start = seen[0]
    assert (
        start.type == "message_start" and start.message.usage.input_tokens > 0
    )  # said at the start, as Anthropic does
    assert final.content[0].type == "text" and whole.content[0].type == "text"
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events


def test_a_chat_models_refusal_ends_with_anthropics_refusal_stop(
    claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    declined = "I can't help with that."
    ask: dict[str, Any] = {"model": "fast", "max_tokens": 64, "messages": [{"role": "user", "content": "a secret?"}]}
    inject(small_upstream, {"refusal": declined})
    whole = claude.messages.create(**ask)
    assert whole.stop_reason == "refusal"
    assert [(block.type, getattr(block, "text", None)) for block in whole.content] == [("text", declined)]
    inject(small_upstream, {"refusal": declined})
    with claude.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "refusal" and final.content[0].type == "text" and final.content[0].text == declined


def test_a_stop_sequence_the_upstream_matched_is_reported_as_anthropic_does(claude: anthropic.Anthropic) -> None:
    """vLLM names the stop string it matched (``stop_reason``); the SDK's ``stop_reason`` and
    ``stop_sequence`` say it, streamed and not (replayed from the cache: ``test_cache_e2e``)."""
    ask: dict[str, Any] = {
        "model": "fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "alpha beta gamma delta epsilon"}],
        "stop_sequences": ["never", "beta"],
    }
    first = claude.messages.create(**ask)
    assert first.stop_reason == "stop_sequence" and first.stop_sequence == "beta"
    assert first.content[0].type == "text" and "beta" not in first.content[0].text
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == "beta"
    plain = claude.messages.create(**{**ask, "stop_sequences": ["never"]})
    assert plain.stop_reason == "end_turn" and plain.stop_sequence is None


def test_raw_stream_events_follow_anthropics_sequence(gateway: GatewayProcess) -> None:
    body = {"model": "fast", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": "hi there"}]}
    names: list[str] = []
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=15) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
        request_id = r.headers["x-request-id"]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    record = gateway.wait_for_record(request_id)  # the stream ran to its end: logged, settled and cached
    assert record["status"] == 200 and record["error_type"] is None and record["protocol"] == "anthropic.messages"


def test_a_claude_code_shaped_request_round_trips(gateway: GatewayProcess) -> None:
    """System blocks with cache_control, tools, a tool_use/tool_result history, anthropic-beta, a stream."""
    tools: list[ToolUnionParam] = [
        {
            "name": "read_file",
            "description": "Read a file from disk",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        }
    ]
    messages: list[MessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": "What is in README.md?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_01", "name": "read_file", "input": {"path": "README.md"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "# A gateway"},
                {"type": "text", "text": "Summarise it.", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    system: list[TextBlockParam] = [
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
    ]
    with anthropic.Anthropic(
        base_url=gateway.url,
        api_key="sk-unused",
        max_retries=0,
        timeout=15,
        default_headers={"anthropic-beta": "claude-code-20250219,prompt-caching-2024-07-31"},
    ) as client:
        with client.messages.stream(
            model="fast",
            max_tokens=128,
            system=system,
            tools=tools,
            messages=messages,
            metadata={"user_id": "dev-1"},
        ) as stream:
            final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "tool_use") and final.content


def test_thinking_is_dropped_with_a_note_for_a_chat_upstream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    signed = {"type": "thinking", "thinking": "Earlier reasoning.", "signature": "c2lnbmVk"}
    body = {
        "model": "fast",
        "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [signed, {"type": "text", "text": "4"}]},
            {"role": "user", "content": "And 3+3?"},
        ],
    }
    response = httpx.post(f"{gateway.url}/v1/messages", json=body, timeout=15)
    assert response.status_code == 200 and response.headers["x-gateway-dropped"] == "thinking"
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert "thinking" not in sent and "Earlier reasoning" not in json.dumps(sent)
    assert sent["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "4"}]}


def test_what_a_chat_upstream_cannot_take_of_the_turns_is_named_not_lost_silently(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/chart.png"}}
    signed = {"type": "thinking", "thinking": "Earlier reasoning.", "signature": "c2lnbmVk"}
    body = {
        "model": "fast",
        "max_tokens": 64,
        "tools": [{"name": "plot", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Plot it."},
            {"role": "assistant", "content": [signed, {"type": "tool_use", "id": "toolu_1", "name": "plot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                          "content": [{"type": "text", "text": "see"}, image]}]},
        ],
    }  # fmt: skip
    response = httpx.post(f"{gateway.url}/v1/messages", json=body, timeout=15)
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-dropped"] == "thinking,tool_result.image,tool_result.is_error"
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1", "content": "see"}


_THINKING: Any = {"type": "enabled", "budget_tokens": 1024}
_WEATHER: list[ToolUnionParam] = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
_ASK_WEATHER: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]


def test_thinking_reaches_an_anthropic_upstream_and_its_signed_blocks_come_back_through_a_tool_turn(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream
) -> None:
    raw = claude.messages.with_raw_response.create(
        model="claude", max_tokens=2048, thinking=_THINKING, tools=_WEATHER, messages=_ASK_WEATHER
    )
    assert "x-gateway-dropped" not in raw.headers
    first = raw.parse()
    assert upstream_stats(large_upstream)["last_request"]["body"]["thinking"] == _THINKING
    assert first.content[0].type == "thinking" and first.content[0].thinking and first.content[0].signature
    call = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use"
    # Claude Code's next turn: the assistant's blocks as they came (thinking first, signature
    # intact; the upstream refuses the turn otherwise), then the tool's result.
    history: list[MessageParam] = [
        *_ASK_WEATHER,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, clear"}]},
    ]
    follow = claude.messages.create(
        model="claude", max_tokens=2048, thinking=_THINKING, tools=_WEATHER, messages=history
    )
    assert follow.stop_reason == "end_turn" and any(block.type == "text" for block in follow.content)
    sent = upstream_stats(large_upstream)["last_request"]["body"]["messages"][1]["content"][0]
    assert sent == {"type": "thinking", "thinking": first.content[0].thinking, "signature": first.content[0].signature}
    # A tool-calling turn without its thinking (another model of the route answered it, t21): Anthropic
    # would refuse every later turn of the loop; the request goes without thinking instead.
    bare: list[MessageParam] = [*history[:1], {"role": "assistant", "content": first.content[1:]}, history[2]]
    claude.messages.create(model="claude", max_tokens=2048, thinking=_THINKING, tools=_WEATHER, messages=bare)
    assert "thinking" not in upstream_stats(large_upstream)["last_request"]["body"]


def test_streamed_thinking_arrives_as_anthropics_thinking_block_events(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(model="claude", max_tokens=2048, thinking=_THINKING, messages=_ASK_WEATHER)
    with claude.messages.stream(model="claude", max_tokens=2048, thinking=_THINKING, messages=_ASK_WEATHER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds  # the helper's own events for the two deltas
    assert [block.type for block in final.content] == [block.type for block in whole.content]
    assert final.content[0].type == "thinking" and whole.content[0].type == "thinking"
    assert (final.content[0].thinking, final.content[0].signature) == (
        whole.content[0].thinking, whole.content[0].signature,
    )  # fmt: skip


def test_errors_come_in_anthropics_shape_and_the_sdk_raises_its_own_types(
    claude: anthropic.Anthropic, gateway: GatewayProcess
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    response = httpx.post(f"{gateway.url}/v1/messages", json={"model": "fast", "messages": []}, timeout=10)
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    bad_role = {"model": "fast", "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}
    response = httpx.post(f"{gateway.url}/v1/messages", json=bad_role, timeout=10)
    assert response.status_code == 400 and "messages[0].role" in response.json()["error"]["message"]


@pytest.mark.parametrize("model", ["fast", "claude"])  # an OpenAI-compatible upstream, then Anthropic's
def test_a_tool_choice_without_tools_is_refused_as_anthropic_refuses_it(
    claude: anthropic.Anthropic, model: str
) -> None:
    """Anthropic's 400, on every route: on a chat route the choice was dropped, unnamed, and a call
    the client forced was answered with text (found by an outside tester). ``none`` asks for nothing."""
    ask: dict[str, Any] = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    choices: list[Any] = [{"type": "any"}, {"type": "auto"}, {"type": "tool", "name": "get_x"}]
    no_tools: list[dict[str, Any]] = [{}, {"tools": []}]  # an empty list is no tools
    for choice in choices:
        for tools in no_tools:
            with pytest.raises(anthropic.BadRequestError) as refused:
                claude.messages.create(**{**ask, **tools, "tool_choice": choice})
            assert refused.value.body == {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "tool_choice may only be specified while providing tools",
                },
            }
    with pytest.raises(anthropic.BadRequestError):  # what /v1/messages refuses is not counted either
        claude.messages.count_tokens(model=model, messages=ask["messages"], tool_choice={"type": "any"})
    assert claude.messages.create(**ask, tool_choice={"type": "none"}).content


@pytest.mark.parametrize("model", ["fast", "claude"])  # an OpenAI-compatible upstream, then Anthropic's
def test_metadata_is_a_user_id_of_at_most_256_characters_as_anthropic_takes_it(
    claude: anthropic.Anthropic, model: str
) -> None:
    """t147: ``metadata`` holds only ``user_id`` in Anthropic's API; other keys, or a longer id,
    were taken (a chat route has no place for them), where Anthropic refuses them."""
    ask: dict[str, Any] = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    refused_metadata: list[tuple[Any, str]] = [
        ({"user_id": "u-1", "team": "blue"}, "metadata.team"),
        ({"user_id": "u" * 257}, "metadata.user_id"),
    ]
    for metadata, named in refused_metadata:
        with pytest.raises(anthropic.BadRequestError) as refused:
            claude.messages.create(**ask, metadata=metadata)
        assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert named in refused.value.body["error"]["message"]  # type: ignore[index]
    assert claude.messages.create(**ask, metadata={"user_id": "u" * 256}).content


_OPTIONAL_FIELDS = (
    "stream", "system", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "tools", "tool_choice",
    "thinking", "output_config", "service_tier", "container", "mcp_servers", "context_management", "cache_control",
)  # fmt: skip


@pytest.mark.parametrize("model", ["fast", "claude"])  # an OpenAI-compatible upstream, then Anthropic's
def test_optional_fields_given_as_null_are_absent_as_anthropic_reads_them(gateway: GatewayProcess, model: str) -> None:
    """f119: ``"stream": null`` (an SDK or proxy that writes None) was a 400 ("Expected `bool`, got
    `null`"), where Anthropic's API takes a null optional field as not given: not streamed."""
    ask = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "alpha beta"}]}
    asks: list[dict[str, Any]] = [{**ask, **dict.fromkeys(_OPTIONAL_FIELDS)}]
    if model == "claude":  # ``top_k`` passes it through: the body goes upstream as it came, null and all
        asks.append({**ask, "stream": None, "top_k": 5})
    for body in asks:
        response = httpx.post(f"{gateway.url}/v1/messages", json=body, timeout=10)
        assert response.status_code == 200, (body, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["type"] == "message" and response.json()["content"]
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert record["passthrough"] is (True if body.get("top_k") else None)


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    short = claude.messages.count_tokens(model="fast", messages=[{"role": "user", "content": "hi"}])
    longer = claude.messages.count_tokens(
        model="fast", system="You are terse.", messages=[{"role": "user", "content": "hi " * 50}]
    )
    assert 0 < short.input_tokens < longer.input_tokens
    raw = claude.messages.with_raw_response.count_tokens(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["request-id"] == "req_" + raw.headers["x-request-id"]  # as every model endpoint's answer
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.request_id == unknown.value.response.headers["request-id"]
    # what /v1/messages refuses is not counted either (found by an outside tester)
    for model, messages in (("embed", [{"role": "user", "content": "hi"}]), ("fast", [])):
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.count_tokens(model=model, messages=messages)  # type: ignore[arg-type]


def _png(side: int) -> ImageBlockParam:
    """An image block of a real PNG, ``side`` pixels square (1-bit grey: a 1568 px one is a few kB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + b"\x01\x00\x00\x00\x00"
    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()},
    }


def test_images_are_counted_by_their_size(
    claude: anthropic.Anthropic,
    gateway: GatewayProcess,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> None:
    """(t100) Every image was 85 tokens, whatever its size: ``count_tokens`` on a chat model's route,
    the estimate budgets reserve and the prompt an answer without usage is billed at were 10-20
    times low for a screenshot. Each is counted by the rule of the model's provider."""

    def turn(side: int) -> list[MessageParam]:
        return [{"role": "user", "content": [{"type": "text", "text": "Describe it."}, _png(side)]}]

    counted = {
        side: claude.messages.count_tokens(model="fast", messages=turn(side)).input_tokens for side in (32, 1568)
    }
    assert counted[1568] - counted[32] == 765 - 255  # OpenAI's tiles: 4 of them, and 1
    for model, upstream, tokens in (("fast", small_upstream, (255, 765)), ("claude", large_upstream, (2, 1600))):
        billed = []
        for side in (32, 1568):
            inject(upstream, {"omit_usage": True})
            raw = claude.messages.with_raw_response.create(model=model, max_tokens=16, messages=turn(side))
            record = gateway.wait_for_record(raw.headers["x-request-id"])
            assert record["tokens_source"] == "gateway" and record["model"] == model.replace("fast", "small")
            billed.append(record["prompt_tokens"])
        assert billed[1] - billed[0] == tokens[1] - tokens[0], model


def _claude_code_body(model: str) -> dict[str, object]:
    return {
        "model": model,
        "max_tokens": 64,
        "system": [
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": "Project rules: be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "tools": [
            {
                "name": "read_file",
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"},
            }
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here is the repo layout."},
                    {"type": "text", "text": "What does main.py do?", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
    }


def test_cache_control_reaches_an_anthropic_upstream_as_the_client_wrote_it(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    response = httpx.post(f"{gateway.base_url}/messages", json=_claude_code_body("claude"),
                          headers={"x-api-key": "sk-unused", "anthropic-version": "2023-06-01"}, timeout=15)  # fmt: skip
    assert response.status_code == 200, response.text
    sent = upstream_stats(large_upstream)["last_request"]
    assert sent["path"] == "/v1/messages"
    body = sent["body"]
    assert body["system"] == [
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Project rules: be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    assert body["tools"][0]["cache_control"] == {"type": "ephemeral"}
    assert body["messages"][0]["content"][1] == {
        "type": "text", "text": "What does main.py do?", "cache_control": {"type": "ephemeral"},
    }  # fmt: skip


def test_cache_control_is_not_sent_to_an_openai_compatible_upstream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    response = httpx.post(f"{gateway.base_url}/messages", json=_claude_code_body("fast"),
                          headers={"x-api-key": "sk-unused"}, timeout=15)  # fmt: skip
    assert response.status_code == 200, response.text
    sent = upstream_stats(small_upstream)["last_request"]
    assert sent["path"] == "/v1/chat/completions"
    assert "cache_control" not in json.dumps(sent["body"])
    assert [p["text"] for p in sent["body"]["messages"][1]["content"]] == [
        "Here is the repo layout.", "What does main.py do?",
    ]  # fmt: skip


@pytest.mark.parametrize("model", ["fast", "claude"])  # an OpenAI-compatible upstream, then Anthropic's
def test_structured_output_parses_into_the_model_on_either_kind_of_upstream(
    claude: anthropic.Anthropic, model: str
) -> None:
    """``messages.parse()`` sends ``output_config.format``: a chat upstream gets it as its
    ``response_format``, an Anthropic one as it was written."""
    import pydantic

    class Capital(pydantic.BaseModel):
        country: str
        city: str

    parsed = claude.messages.parse(
        model=model,
        max_tokens=256,
        messages=[{"role": "user", "content": "The capital of Norway, as JSON."}],
        output_format=Capital,
    )
    assert isinstance(parsed.parsed_output, Capital)


def test_message_start_says_the_anthropic_upstreams_own_usage(claude: anthropic.Anthropic) -> None:
    """Consumers read input and cache tokens from message_start: there, an Anthropic upstream's own
    figures, not the gateway's estimate."""
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Count these words for me, please, one by one."}],
    }
    whole = claude.messages.create(**ask, extra_headers={"cache-control": "no-cache"})
    with claude.messages.stream(**ask, extra_headers={"cache-control": "no-cache"}) as stream:
        start = next(event for event in stream if event.type == "message_start")
        stream.until_done()
    assert start.message.usage.input_tokens == whole.usage.input_tokens


def test_the_anthropic_sdk_lists_and_pages_the_models(claude: anthropic.Anthropic) -> None:
    everything = [model.id for model in claude.models.list(limit=100)]
    assert {"fast", "best", "auto"} <= set(everything)
    first = claude.models.list(limit=2)
    assert [model.id for model in first.data] == everything[:2] and first.has_more
    assert all(model.type == "model" and model.display_name and model.created_at for model in first.data)
    assert [model.id for model in claude.models.list(limit=2)] == everything  # auto-paging by last_id


def test_the_anthropic_sdk_pages_the_models_backwards_and_ends(claude: anthropic.Anthropic) -> None:
    """t183: ``before_id`` was not read: the first page came back, and the SDK's auto-paging asked
    for the page before it for ever. ``limit`` outside 1-1000 gave the whole list."""
    everything = [model.id for model in claude.models.list(limit=100)]
    last = everything[-1]
    backwards = [model.id for model in itertools.islice(claude.models.list(before_id=last, limit=2), 100)]
    assert sorted(backwards) == sorted(everything[:-1])  # each page the one before, then an end
    page = claude.models.list(before_id=last, limit=2)
    assert [model.id for model in page.data] == everything[-3:-1] and page.has_more == (len(everything) > 3)
    assert claude.models.list(before_id=everything[0]).data == []
    for limit in (0, 1001):
        with pytest.raises(anthropic.BadRequestError) as refused:
            claude.models.list(limit=limit)
        assert "limit" in str(refused.value.body)


RefusalCheck = Callable[[str, dict[str, Any], list[tuple[dict[str, Any], str]]], None]
"""Asks each refused body on a route (``model``, with ``extra``): :func:`_refused_at_the_edge`."""


@pytest.fixture
def refused_at_the_edge(
    claude: anthropic.Anthropic, gateway: GatewayProcess, small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> RefusalCheck:  # fmt: skip
    return functools.partial(_refused_at_the_edge, claude, gateway, (small_upstream, large_upstream))


def _refused_at_the_edge(
    claude: anthropic.Anthropic,
    gateway: GatewayProcess,
    upstreams: tuple[SimulatedUpstream, SimulatedUpstream],
    model: str,
    extra: dict[str, Any],
    refused: list[tuple[dict[str, Any], str]],
) -> None:
    """Each request (its ``messages``, ``tools``, an ``extra_body``) refused with Anthropic's 400 and
    ``message`` on ``model``'s route (``extra``: fields that make it passed through), logged and not
    billed, refused by ``count_tokens`` too, and no upstream asked anything."""
    before = [upstream_stats(upstream) for upstream in upstreams]
    for asked, message in refused:
        fields = {**asked, "extra_body": {**extra, **asked.get("extra_body", {})}}
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.messages.create(model=model, max_tokens=32, **fields)
        assert caught.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        record = gateway.wait_for_record(caught.value.response.headers["x-request-id"])
        assert record["status"] == 400 and not record["cost_usd"]
        with pytest.raises(anthropic.BadRequestError) as counted:  # nor counted
            claude.messages.count_tokens(model=model, **asked)
        assert counted.value.body["error"]["message"] == message  # type: ignore[index]
    for upstream, then in zip(upstreams, before, strict=True):
        now = upstream_stats(upstream)
        for kind in ("chat_requests", "messages_requests", "count_tokens_requests"):
            assert now[kind] == then[kind], (upstream.name, kind)


_EVERY_ROUTE = pytest.mark.parametrize(
    ("model", "extra"),
    [("auto", {}), ("fast", {}), ("claude", {}), ("claude", {"top_k": 5})],  # the last passed through
)
"""A refusal test's routes: ``auto``, a chat model, Claude translated, and Claude passed through."""


_EMPTY = "all messages must have non-empty content except for the optional final assistant message"


@_EVERY_ROUTE
def test_empty_content_is_refused_as_anthropic_refuses_it(
    claude: anthropic.Anthropic, refused_at_the_edge: RefusalCheck, model: str, extra: dict[str, Any]
) -> None:
    """t178: a user turn of ``content: []`` was answered (the router read no text: ``unreadable``,
    to the large model), where Anthropic refuses it with a 400 that names the turn; a text block
    of no text too. Only a final assistant turn (a prefill) may be empty. Refused at the edge,
    nothing reaches an upstream, and the refusal is logged, not billed."""
    hi: MessageParam = {"role": "user", "content": "hi"}
    refused: list[tuple[list[MessageParam], str]] = [
        ([{"role": "user", "content": []}], f"messages.0: {_EMPTY}"),
        ([{"role": "user", "content": ""}], f"messages.0: {_EMPTY}"),
        ([hi, {"role": "assistant", "content": []}, hi], f"messages.1: {_EMPTY}"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": ""}]}],
            "messages.0.content.1.text: text content blocks must be non-empty",
        ),
    ]
    cases = [({"messages": messages}, message) for messages, message in refused]
    refused_at_the_edge(model, extra, cases)
    prefill: list[MessageParam] = [hi, {"role": "assistant", "content": ""}]  # a final assistant turn may be empty
    assert claude.messages.create(model=model, max_tokens=32, messages=prefill, extra_body=extra).content


_BLANK = "text content blocks must contain non-whitespace text"


@_EVERY_ROUTE
def test_whitespace_alone_is_refused_as_anthropic_refuses_it(
    claude: anthropic.Anthropic, refused_at_the_edge: RefusalCheck, model: str, extra: dict[str, Any]
) -> None:
    """t180: a turn of whitespace alone was left out on a route to Claude, the turns around it
    joined into one (a conversation opening with the assistant's turn when it was the first) and
    taken as written elsewhere; a final assistant turn (a prefill) ending in whitespace, and an
    empty system block, left the request with no prefill or no system prompt. Anthropic refuses
    each with a 400; so does the gateway on every route, before any upstream is called. A
    whitespace block beside a real one is taken, as Anthropic takes it."""
    a: MessageParam = {"role": "user", "content": "a"}
    b: MessageParam = {"role": "user", "content": "b"}
    spaces: list[TextBlockParam] = [{"type": "text", "text": " "}, {"type": "text", "text": "\n\t"}]
    refused: list[tuple[list[MessageParam], Any, str]] = [
        ([a, {"role": "assistant", "content": "  "}, b], None, f"messages.1: {_BLANK}"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}, b], None, f"messages.0: {_BLANK}"),
        ([{"role": "user", "content": spaces}], None, f"messages.0: {_BLANK}"),
        ([a, {"role": "assistant", "content": " \n"}], None, "messages.1: " + _TRAILING),
        ([a, {"role": "assistant", "content": [{"type": "text", "text": "Sure, "}]}], None, "messages.1: " + _TRAILING),
        ([a], [{"type": "text", "text": ""}], "system.0.text: text content blocks must be non-empty"),
    ]
    cases = [
        ({"messages": messages, "extra_body": {"system": system} if system is not None else {}}, message)
        for messages, system, message in refused
    ]
    refused_at_the_edge(model, extra, cases)
    beside: list[MessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": " "}, {"type": "text", "text": "b"}]}
    ]
    if not extra:  # passed through, the block reaches the (simulated) upstream as written
        assert claude.messages.create(model=model, max_tokens=32, messages=beside).content


_TRAILING = "final assistant content cannot end with trailing whitespace"


_GET_WEATHER: ToolUnionParam = _WEATHER[0]
_ASKED: MessageParam = {"role": "user", "content": "weather?"}


def _called(*ids: str) -> MessageParam:
    return {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": i, "name": "get_weather", "input": {}} for i in ids],
    }


def _answered(*ids: str) -> list[Any]:
    return [{"type": "tool_result", "tool_use_id": i, "content": "sunny"} for i in ids]


_ANSWER_RULES = "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
_CALL_RULES = "Each `tool_use` block must have a corresponding `tool_result` block in the next message."


@_EVERY_ROUTE
def test_tool_turns_and_names_anthropic_refuses_are_refused_on_every_route(
    claude: anthropic.Anthropic, refused_at_the_edge: RefusalCheck, model: str, extra: dict[str, Any]
) -> None:
    """f196: a chat route (and ``auto`` when it picked the small model) answered and billed what
    Anthropic refuses: a result answering no call of the turn before (an agent's history trimming
    split them), a call left unanswered, a turn repeating a call's id, results after text (passed
    on reordered), a custom tool's name outside Anthropic's pattern, and a name twice. Refused at
    the edge in Anthropic's words, counted by no one, nothing reaching an upstream."""
    refused: list[tuple[list[MessageParam], list[ToolUnionParam], str]] = [
        (
            [{"role": "user", "content": _answered("toolu_zzz")}],
            [_GET_WEATHER],
            f"messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_zzz. {_ANSWER_RULES}",
        ),
        (
            [_ASKED, _called("toolu_01"), {"role": "user", "content": _answered("toolu_01", "toolu_zzz")}],
            [_GET_WEATHER],
            f"messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_zzz. {_ANSWER_RULES}",
        ),
        (
            [_ASKED, _called("toolu_01", "toolu_02"), {"role": "user", "content": "never mind"}],
            [_GET_WEATHER],
            f"messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_01, "
            f"toolu_02. {_CALL_RULES}",
        ),
        (
            [_ASKED, _called("toolu_01", "toolu_01"), {"role": "user", "content": _answered("toolu_01", "toolu_01")}],
            [_GET_WEATHER],
            "messages.1.content.1: `tool_use` ids must be unique",
        ),
        (
            [
                _ASKED,
                _called("toolu_01"),
                {"role": "user", "content": [{"type": "text", "text": "here:"}, *_answered("toolu_01")]},
            ],
            [_GET_WEATHER],
            "messages.2: Did not find 1 `tool_result` block(s) at the beginning of this message. Messages following "
            "`tool_use` blocks must begin with a matching number of `tool_result` blocks.",
        ),
        (
            [_ASKED],
            [_GET_WEATHER, {"name": "get weather!", "input_schema": {"type": "object"}}],
            "tools.1.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
        ),
        ([_ASKED], [_GET_WEATHER, _GET_WEATHER], "tools: Tool names must be unique."),
    ]
    cases = [({"messages": messages, "tools": tools}, message) for messages, tools, message in refused]
    refused_at_the_edge(model, extra, cases)


_BUDGET_PAST_MAX = (
    "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
)


@_EVERY_ROUTE
def test_budgets_breakpoints_and_stops_anthropic_refuses_are_refused_on_every_route(
    claude: anthropic.Anthropic, refused_at_the_edge: RefusalCheck, model: str, extra: dict[str, Any]
) -> None:
    """f200: a chat route (and ``auto`` when it picked the small model) answered and billed a
    thinking budget under 1024 or not under ``max_tokens``, a fifth ``cache_control`` block and an
    empty stop string, all of which Anthropic refuses: refused at the edge in its words, counted by
    no one (``max_tokens`` is checked where the count is sent it), nothing reaching an upstream."""
    hi: list[MessageParam] = [{"role": "user", "content": "hi"}]
    mark: Any = {"type": "ephemeral"}
    marked: list[MessageParam] = [
        {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": mark}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b", "cache_control": mark}]},
        {"role": "user", "content": [{"type": "text", "text": "c", "cache_control": mark}]},
    ]
    system: list[TextBlockParam] = [{"type": "text", "text": "Be brief.", "cache_control": mark}]
    tools: Any = [{**_GET_WEATHER, "cache_control": mark}]
    refused: list[tuple[dict[str, Any], str]] = [
        (
            {"messages": hi, "thinking": {"type": "enabled", "budget_tokens": 1023}},
            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            {
                "messages": hi,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "extra_body": {"max_tokens": 1024},
            },
            _BUDGET_PAST_MAX,
        ),
        (
            {"messages": marked, "tools": tools, "extra_body": {"system": system}},
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {"messages": hi, "extra_body": {"stop_sequences": ["END", ""]}},
            "stop_sequences: each stop sequence must be non-empty",
        ),
    ]
    refused_at_the_edge(model, extra, refused)
    if model == "fast":  # four breakpoints are taken; with tools, interleaved thinking may spend past max_tokens
        taken = claude.messages.create(
            model=model, max_tokens=1024, messages=marked, tools=[_GET_WEATHER], system=system,
            thinking={"type": "enabled", "budget_tokens": 1024}, stop_sequences=["END"],
        )  # fmt: skip
        assert taken.content


@_EVERY_ROUTE
def test_whitespace_stops_and_system_blocks_are_refused_as_anthropic_refuses_them(
    claude: anthropic.Anthropic, refused_at_the_edge: RefusalCheck, model: str, extra: dict[str, Any]
) -> None:
    """f222: a stop of whitespace alone went to a chat upstream, which stopped at it, and was applied
    by the gateway for Claude, where a passed-through request got Anthropic's 400; a system block of
    whitespace alone (beside a real one too) reached a chat upstream as written. Anthropic refuses
    both: so does the gateway, on every route, before any upstream is asked."""
    hi: list[MessageParam] = [{"role": "user", "content": "hi"}]
    blank: list[TextBlockParam] = [{"type": "text", "text": " \n\t"}]
    beside: list[TextBlockParam] = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "\n\n"}]
    refused: list[tuple[dict[str, Any], str]] = [
        ({"messages": hi, "extra_body": {"stop_sequences": ["\n"]}},
         "stop_sequences: each stop sequence must contain non-whitespace"),
        ({"messages": hi, "extra_body": {"stop_sequences": ["END", " \t"]}},
         "stop_sequences: each stop sequence must contain non-whitespace"),
        ({"messages": hi, "extra_body": {"system": blank}}, f"system.0.text: {_BLANK}"),
        ({"messages": hi, "extra_body": {"system": beside}}, f"system.1.text: {_BLANK}"),
    ]  # fmt: skip
    refused_at_the_edge(model, extra, refused)
    padded: list[TextBlockParam] = [{"type": "text", "text": " Be brief. "}]
    taken = claude.messages.create(  # text around a visible stop or system text is no blank
        model=model, max_tokens=32, messages=hi, system=padded, stop_sequences=["\nEND"], extra_body=extra
    )
    assert taken.content


@pytest.mark.parametrize(("model", "extra"), [("fast", {}), ("claude", {}), ("claude", {"top_k": 5})])
def test_answered_calls_split_over_consecutive_user_turns_are_served(
    claude: anthropic.Anthropic, model: str, extra: dict[str, Any]
) -> None:
    """Anthropic merges consecutive turns of a role, so results split over two user turns answer
    the calls of the one turn before them."""
    split: list[MessageParam] = [
        _ASKED,
        _called("toolu_01", "toolu_02"),
        {"role": "user", "content": _answered("toolu_01")},
        {"role": "user", "content": [*_answered("toolu_02"), {"type": "text", "text": "and?"}]},
    ]
    assert claude.messages.create(model=model, max_tokens=32, messages=split, tools=[_GET_WEATHER], extra_body=extra)
    assert claude.messages.count_tokens(model=model, messages=split, tools=[_GET_WEATHER]).input_tokens
