"""The OpenAI API through the gateway, with the official SDK as the client."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from gateway.store import keyspace
from tests.conftest import inject, sdk_chat, upstream_stats
from tests.gateway_process import GatewayProcess

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "alpha beta gamma"},
]


def test_non_streamed_answer_with_gateway_headers(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "[simulated small] gamma beta alpha"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    headers = raw.headers
    assert headers["x-gateway-model"] == "small"
    assert headers["x-gateway-route"] == "fast"
    assert headers["x-gateway-cache"] == "bypass"
    assert float(headers["x-gateway-overhead-ms"]) >= 0
    record = gateway.wait_for_record(headers["x-request-id"])
    expected_cost = (completion.usage.prompt_tokens * 0.5 + completion.usage.completion_tokens * 1.5) / 1e6
    assert float(headers["x-gateway-cost-usd"]) == pytest.approx(expected_cost, abs=1e-8)
    assert record["cost_usd"] == pytest.approx(expected_cost)
    assert record["finish_reason"] == "stop"  # a non-streamed answer's too (dashboards count length cuts)
    # baseline: the same tokens at the pair's large model prices
    expected_baseline = (completion.usage.prompt_tokens * 5 + completion.usage.completion_tokens * 15) / 1e6
    assert record["baseline_cost_usd"] == pytest.approx(expected_baseline)
    assert record["tokens_source"] == "upstream"
    assert record["schema_version"] == 2
    assert record["cached_prompt_tokens"] == 0 and record["protocol"] == "openai.chat"
    assert record["route"] == "fast" and record["model"] == "small" and record["provider"] == "openai"
    assert record["stream"] is False and record["status"] == 200 and record["retries"] == 0


def test_streamed_answer_chunks_and_usage(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        request_id = response.headers["x-request-id"]
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    model = response.headers["x-gateway-model"]
    assert text == f"[simulated {model}] gamma beta alpha"
    assert response.headers["x-gateway-decision"] == model  # the classifier chose small or large
    assert 0 <= float(response.headers["x-gateway-p-large"]) <= 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # t91: OpenAI repeats these on its usage chunk, which the gateway writes itself; the SDK's
    # accumulated completion takes each chunk's, so it ended with no fingerprint
    assert {c.system_fingerprint for c in chunks} == {"simulated"}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    record = gateway.wait_for_record(request_id)
    assert record["stream"] is True and record["ttft_ms"] is not None
    assert record["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert record["decision"] == model and record["p_large"] == pytest.approx(
        float(response.headers["x-gateway-p-large"])
    )
    assert (record["p_large"] >= record["threshold"]) == (model == "large")  # the threshold it was held against


def test_stream_without_include_usage_has_no_usage_chunk_but_is_priced(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="fast", messages=MESSAGES, stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    assert all(c.choices for c in chunks)
    # The gateway asked the upstream for usage anyway: it is the authoritative count.
    assert upstream_stats(small_upstream)["last_request"]["body"]["stream_options"] == {"include_usage": True}
    record = gateway.wait_for_record(request_id)
    assert record["tokens_source"] == "upstream" and record["completion_tokens"] > 0 and record["cost_usd"] > 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_usage_on_the_upstreams_finish_chunk_reaches_the_client_once(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, include_usage: bool
) -> None:
    """TGI and llama.cpp put the usage on the finish chunk: the client gets it once, in the
    gateway's usage chunk, and only when it asked (t27: twice, and unasked)."""
    inject(small_upstream, {"usage_on_finish_chunk": True})
    with client.chat.completions.with_streaming_response.create(
        model="fast", messages=MESSAGES, stream=True, stream_options={"include_usage": include_usage}
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    said = [c.usage for c in chunks if c.usage is not None]
    record = gateway.wait_for_record(request_id)
    assert record["tokens_source"] == "upstream" and record["completion_tokens"] > 0
    if include_usage:
        assert len(said) == 1 and chunks[-1].choices == [] and chunks[-1].usage is not None
        assert said[0].completion_tokens == record["completion_tokens"]
    else:
        assert said == []


_PDF = "data:application/pdf;base64,JVBERi0xLjQK"
_IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_a_prompt_the_router_cannot_read_leans_large(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    """An image (the text encoder does not see it) or no text at all: the router cannot place
    it, and sends it to large rather than scoring an empty string low (t28)."""
    image = _IMAGE
    asks: list[list[ChatCompletionMessageParam]] = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
        [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                      {"type": "image_url", "image_url": {"url": image}}]}],
        [{"role": "user", "content": " "}],
        [{"role": "user", "content": "\u0000" * 50}],  # no character that shows reads as no text (t51)
        [{"role": "user", "content": "\u200b\u200b\u200b"}],
        # a PDF (or audio, where the models price it: test_chat_audio_billing) was scored on its
        # caption alone: "Summarize this." went small (t64)
        [{"role": "user", "content": [{"type": "text", "text": "Summarize this."},
                                      {"type": "file", "file": {"filename": "a.pdf", "file_data": _PDF}}]}],
    ]  # fmt: skip
    for messages in asks:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)
        assert raw.headers["x-gateway-decision"] == "unreadable", messages  # large, not the classifier's pick
        assert float(raw.headers["x-gateway-p-large"]) == 1.0
    plain = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert float(plain.headers["x-gateway-p-large"]) < 1.0


def test_an_answer_routed_by_the_classifier_says_the_threshold_it_was_held_against(
    client: openai.OpenAI, claude: anthropic.Anthropic, gateway: GatewayProcess
) -> None:
    """t178: p_large 0.31 went large and 0.04 small, and only the request log said why: the
    moving threshold of a target-share route (0.0445 then) was in no header."""
    for route in ("auto", "auto-share"):
        raw = client.chat.completions.with_raw_response.create(
            model=route, messages=[{"role": "user", "content": "Explain how a hash map resolves collisions"}]
        )
        record = gateway.wait_for_record(raw.headers["x-request-id"])
        assert raw.headers["x-gateway-threshold"] == f"{record['threshold']:.4f}", route
        assert raw.headers["x-gateway-p-large"] == f"{record['p_large']:.4f}"
    with client.chat.completions.with_streaming_response.create(model="auto", messages=MESSAGES, stream=True) as stream:
        assert stream.headers["x-gateway-threshold"] == "0.5000"  # the route's threshold: the policy's default
        list(stream.parse())
    message = claude.messages.with_raw_response.create(
        model="auto", max_tokens=32, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.headers["x-gateway-threshold"] == "0.5000"
    fixed = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    assert "x-gateway-threshold" not in fixed.headers and "x-gateway-p-large" not in fixed.headers  # no classifier


def test_prompts_the_router_cannot_read_stay_out_of_the_target_share(
    client: openai.OpenAI, redis_server: EmbeddedRedis
) -> None:
    """They go large, outside the share: counted in at p_large 1, images at 40 % of a tenant's
    traffic took a 30 % target whole, and every hard text prompt went small (t51)."""
    window = keyspace.large_share_window("default", "auto-share")
    store = redis.Redis.from_url(redis_server.url)
    try:
        store.delete(window)
        shown: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _IMAGE}}]}
        ]
        for _ in range(60):  # past the tracker's update, every 50 scores
            raw = client.chat.completions.with_raw_response.create(model="auto-share", messages=shown)
            assert raw.headers["x-gateway-decision"] == "unreadable"
            assert raw.headers["x-gateway-model"] == "large"
        assert not store.exists(window)
        for n in range(50):
            client.chat.completions.create(model="auto-share", messages=[{"role": "user", "content": f"Hi {n}"}])
        deadline = time.monotonic() + 30
        while not store.exists(window) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.exists(window)  # text prompts are counted
    finally:
        store.close()


def test_raw_sse_ends_with_done(gateway: GatewayProcess) -> None:
    body = {"model": "fast", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_unknown_fields_are_passed_through(client: openai.OpenAI, small_upstream: SimulatedUpstream) -> None:
    client.chat.completions.create(
        model="fast", messages=MESSAGES, temperature=0.2, extra_body={"vendor_option": {"x": 1}, "top_k": 5}
    )
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert sent["vendor_option"] == {"x": 1} and sent["top_k"] == 5 and sent["temperature"] == 0.2
    assert sent["model"] == "small"  # the upstream's model name replaces the alias


def test_what_a_chat_upstream_is_not_sent_is_named(client: openai.OpenAI, small_upstream: SimulatedUpstream) -> None:
    """A chat client's ``thinking`` (the carrier for Anthropic's setting) is left out for an
    OpenAI-compatible upstream and named, as a Messages client's is (t78: left out silently)."""
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=MESSAGES, extra_body={"thinking": {"type": "enabled", "budget_tokens": 1024}}
    )
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["x-gateway-dropped"] == "thinking"
    assert "thinking" not in upstream_stats(small_upstream)["last_request"]["body"]
    plain = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    assert "x-gateway-dropped" not in plain.headers


def test_stream_options_without_stream_is_openais_400(client: openai.OpenAI) -> None:
    """As OpenAI and vLLM answer it (t112); ``stream_options: null`` is no options, and taken."""
    for asked in ({"stream": False}, {}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(  # type: ignore[call-overload]
                model="fast", messages=MESSAGES, stream_options={"include_usage": True}, **asked
            )
        assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "invalid_request_error"
        assert refused.value.param == "stream_options"
        assert (
            refused.value.body["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        )
    assert client.chat.completions.create(model="fast", messages=MESSAGES, stream_options=None).choices


def test_best_of_above_one_is_refused_as_on_completions(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """vLLM generates ``best_of`` sequences and counts the one it returns in its usage: the
    estimate and the bill held one answer of up to 20 (t150). 1 and null ask for nothing more."""
    asked = upstream_stats(small_upstream)["requests"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="fast", messages=MESSAGES, stream=stream, extra_body={"best_of": 3})
        assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "invalid_request_error"
        assert refused.value.param == "best_of"
        assert refused.value.body["message"] == "invalid parameter 'best_of': best_of > 1 is not supported"
    assert upstream_stats(small_upstream)["requests"] == asked
    for best_of in (1, None):
        assert client.chat.completions.create(model="fast", messages=MESSAGES, extra_body={"best_of": best_of}).choices


@pytest.mark.parametrize("model", ["fast", "claude"])
def test_stream_null_is_not_streamed_on_every_openai_route(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, model: str
) -> None:
    """t121 #3: ``"stream": null`` on chat was a 400 ("Expected `bool`, got `null`"), where OpenAI's
    API takes it as not streamed; completions and Responses took it already."""
    asks: dict[str, dict[str, Any]] = {
        "chat/completions": {"messages": [{"role": "user", "content": "alpha beta"}]},
        "completions": {"prompt": "alpha beta"},
        "responses": {"input": "alpha beta", "store": False},
    }
    for path, ask in asks.items():
        answer = httpx.post(f"{gateway.base_url}/{path}", json={"model": model, "stream": None, **ask}, timeout=10)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/json"), path
        if path == "chat/completions" and model == "fast":  # its body goes on as it came, less the null
            assert "stream" not in upstream_stats(small_upstream)["last_request"]["body"]


@pytest.mark.parametrize("model", ["fast", "claude"])
def test_a_history_reads_the_same_on_every_route(
    client: openai.OpenAI, large_upstream: SimulatedUpstream, model: str
) -> None:
    """What OpenAI takes or refuses is taken or refused on a chat and a Claude route alike, so
    that ``auto``'s pick does not decide (t78): an answer's ``refusal`` sent back is taken (the
    assistant's text for Claude), a ``tool_choice`` without ``tools`` is OpenAI's 400."""
    history: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "a secret?", "name": "alice"},
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        {"role": "user", "content": "alpha beta gamma", "name": "bob"},
    ]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=history)
    assert raw.parse().choices[0].message.content
    if model == "claude":
        sent = upstream_stats(large_upstream)["last_request"]["body"]["messages"]
        assert sent[1] == {"role": "assistant", "content": "I can't help with that."}
        assert raw.headers["x-gateway-dropped"] == "messages.name"  # Anthropic's turns have no speaker
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model, messages=MESSAGES, tool_choice={"type": "function", "function": {"name": "f"}}
        )
    assert refused.value.param == "tool_choice" and "only allowed when 'tools' are specified" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:  # an empty list is no tools (t80)
        client.chat.completions.create(model=model, messages=MESSAGES, tools=[], tool_choice="required")
    assert refused.value.param == "tool_choice"
    assert client.chat.completions.create(model=model, messages=MESSAGES, tool_choice="none").choices


def test_a_late_system_message_moved_for_anthropic_is_named(
    client: openai.OpenAI, large_upstream: SimulatedUpstream
) -> None:
    """t128: a system message after the conversation began went into Claude's top-level ``system``
    without a word; Anthropic's turns have no place for it. A leading one is where it was."""
    late: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "LATE SYS"},
        {"role": "user", "content": "alpha beta gamma"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=late)
    assert raw.headers["x-gateway-dropped"] == "system.position"
    sent = upstream_stats(large_upstream)["last_request"]["body"]
    assert sent["system"] == "LATE SYS" and [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    leading: list[ChatCompletionMessageParam] = [*MESSAGES[:1], {"role": "developer", "content": "x"}, *late[:2]]
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=[*leading, late[-1]])
    assert "x-gateway-dropped" not in raw.headers


def test_unsigned_reasoning_sent_back_to_anthropic_is_named(
    client: openai.OpenAI, large_upstream: SimulatedUpstream
) -> None:
    """t128: an answer's ``reasoning_content`` sent back without Anthropic's signed
    ``thinking_blocks`` (another upstream's reasoning) was left out without a word: Anthropic
    refuses unsigned reasoning. Signed, it goes, and nothing is named."""
    for field in ("reasoning_content", "reasoning"):
        history = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", field: "I thought"},
            {"role": "user", "content": "alpha beta gamma"},
        ]
        raw = client.chat.completions.with_raw_response.create(model="claude", messages=history)  # type: ignore[arg-type]
        assert raw.headers["x-gateway-dropped"] == field
        assert upstream_stats(large_upstream)["last_request"]["body"]["messages"][1]["content"] == "b"
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "a"}]
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    answer = client.chat.completions.create(model="claude", messages=question, extra_body=thinking).choices[0]
    signed: Any = answer.message.model_dump(exclude_none=True)
    assert signed["reasoning_content"] and signed["thinking_blocks"][0]["signature"]
    raw = client.chat.completions.with_raw_response.create(
        model="claude", messages=[*question, signed, {"role": "user", "content": "c"}]
    )
    assert "x-gateway-dropped" not in raw.headers
    sent = upstream_stats(large_upstream)["last_request"]["body"]["messages"][1]["content"]
    assert sent[0] == {"type": "thinking", "thinking": signed["reasoning_content"], **signed["thinking_blocks"][0]}


def test_an_unsigned_thinking_block_a_messages_client_sends_back_to_anthropic_is_named(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream
) -> None:
    """t171: a Messages client's thinking block without a signature (a small model's reasoning,
    shown to it unsigned on an earlier turn) was left out of an Anthropic upstream's request
    without a word, where a chat upstream's request named it."""
    history: Any = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "let me think", "signature": ""},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": "alpha beta gamma"},
    ]  # fmt: skip
    raw = claude.messages.with_raw_response.create(model="claude", max_tokens=64, messages=history)
    assert raw.headers["x-gateway-dropped"] == "thinking"
    assert upstream_stats(large_upstream)["last_request"]["body"]["messages"][1]["content"] == "b"


def test_a_refused_tool_or_tool_choice_names_its_param_on_a_claude_route(client: openai.OpenAI) -> None:
    """t128: an ``allowed_tools`` choice and a custom tool were 400s naming ``messages``."""
    tools: Any = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get"}}]},
    }
    asks: dict[str, dict[str, Any]] = {
        "tool_choice": {"tools": tools, "tool_choice": allowed},
        "tools": {"tools": [{"type": "custom", "custom": {"name": "grep"}}]},
    }
    for param, ask in asks.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="claude", messages=MESSAGES, **ask)
        assert refused.value.param == param, refused.value.body


def test_an_unknown_key_in_a_content_part_is_refused_on_a_claude_route(
    client: openai.OpenAI, large_upstream: SimulatedUpstream
) -> None:
    """t128: an unknown key of a content part was dropped without a word, where an unknown field of
    a message is a 400 naming it (OpenAI refuses both); an empty one is taken, as a message's is."""
    part: Any = {"type": "text", "text": "alpha beta gamma", "foo": 1}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": [part]}])
    assert refused.value.param == "messages"
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["message"] == "messages[0].content[0].foo cannot be sent to this upstream"
    assert upstream_stats(large_upstream)["requests"] == 0
    part["foo"] = None
    assert client.chat.completions.create(model="claude", messages=[{"role": "user", "content": [part]}]).choices


def test_gateway_counts_tokens_when_upstream_reports_no_usage(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"omit_usage": True})
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["tokens_source"] == "gateway"
    assert record["prompt_tokens"] == 3 + 3 * 2 + 2 + 3  # "be brief" = 2 tokens, "alpha beta gamma" = 3
    assert record["completion_tokens"] > 0 and record["cost_usd"] > 0


@pytest.mark.parametrize(
    "usage", [None, {"prompt_tokens": None, "completion_tokens": "10"}], ids=["absent", "not-counts"]
)
def test_an_answer_without_usable_usage_carries_the_usage_billed(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, usage: dict[str, object] | None
) -> None:
    """t69: the client got no usage at all (or the upstream's null and string) while the bill used
    the gateway's count; a stream's usage chunk already told the billed counts."""
    answer: dict[str, object] = {
        "id": "chatcmpl-u", "object": "chat.completion", "created": 1, "model": "small",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a fine answer"}, "finish_reason": "stop"}],
    }  # fmt: skip
    if usage is not None:
        answer["usage"] = usage
    inject(small_upstream, {"status": 200, "body": json.dumps(answer)})
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", json={"model": "fast", "messages": MESSAGES}, timeout=15
    )
    assert response.status_code == 200, response.text
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["tokens_source"] == "gateway"
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "a fine answer" and body["id"] == "chatcmpl-u"
    said = body["usage"]
    assert (said["prompt_tokens"], said["completion_tokens"]) == (record["prompt_tokens"], record["completion_tokens"])
    assert said["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
    assert "tokens_source" not in said  # said in the log only


@pytest.mark.parametrize("stream", [False, True])
def test_without_usage_the_gateway_counts_tool_calls_too(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """An answer that is all tool call costs output tokens: counted, not logged as 0."""
    inject(small_upstream, {"omit_usage": True})
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}  # fmt: skip
    ask = {"model": "fast", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool],
           "tool_choice": "required", "stream": stream}  # fmt: skip
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=ask, timeout=15)
    assert response.status_code == 200 and "get_weather" in response.text
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["tokens_source"] == "gateway" and record["completion_tokens"] >= 3


def test_upstream_api_key_comes_from_the_environment(client: openai.OpenAI, large_upstream: SimulatedUpstream) -> None:
    client.chat.completions.create(model="best", messages=MESSAGES)
    assert upstream_stats(large_upstream)["last_request"]["headers"]["authorization"] == "Bearer sk-large-secret-123"


def test_models_lists_routes_and_simulated_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {"auto", "fast", "best", "small", "large", "claude"} <= set(models)
    assert models["small"].owned_by == "simulated"
    assert models["auto"].owned_by == "gateway-route"


def test_concrete_model_can_be_called_directly(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="large", messages=MESSAGES)
    assert raw.headers["x-gateway-model"] == "large" and raw.headers["x-gateway-route"] == "large"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_provider_end_to_end(
    client: openai.OpenAI, gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    request_id, text, usage = sdk_chat(client, "claude", MESSAGES, stream=stream)
    assert usage is not None
    assert text == "[simulated large] gamma beta alpha"
    sent = upstream_stats(large_upstream)["last_request"]
    assert sent["path"] == "/v1/messages"
    assert sent["body"]["system"] == "be brief" and sent["body"]["model"] == "claude-sim"
    assert sent["headers"]["x-api-key"] == "sk-ant-456"
    record = gateway.wait_for_record(request_id)
    assert record["provider"] == "anthropic" and record["tokens_source"] == "upstream" and record["cost_usd"] > 0


async def test_concurrent_requests_all_answered(aclient: openai.AsyncOpenAI) -> None:
    import asyncio

    results = await asyncio.gather(
        *(
            aclient.chat.completions.create(model="fast", messages=[{"role": "user", "content": f"n{i}"}])
            for i in range(40)
        )
    )
    assert [r.choices[0].message.content for r in results] == [f"[simulated small] n{i}" for i in range(40)]


_CALLED: ChatCompletionMessageParam = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_w", "arguments": "{}"}}],
}
_WEATHER: Any = [{"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("asked", "param", "message"),
    [
        (  # a history trimmed between a call and its answer
            {"messages": [*MESSAGES, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
            "messages.[2].role",
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
            "'tool_calls'.",
        ),
        (  # an agent that kept an aborted call's answer and its retry's (f202)
            {
                "messages": [
                    *MESSAGES,
                    _CALLED,
                    {"role": "tool", "tool_call_id": "call_1", "content": "aborted"},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                ],
                "tools": _WEATHER,
            },
            "messages.[4].tool_call_id",
            "Invalid parameter: Duplicate value for 'tool_call_id' of 'call_1', in messages[3] and messages[4].",
        ),
        (
            {"messages": [*MESSAGES, _CALLED, {"role": "user", "content": "and?"}], "tools": _WEATHER},
            "messages.[2].role",
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            "'tool_call_id'. The following tool_call_ids did not have response messages: call_1",
        ),
        (
            {"messages": MESSAGES, "response_format": {"type": "json_object"}},
            "messages",
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
        ),
        (
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools[0].function.name",
            "Invalid 'tools[0].function.name': string does not match pattern. Expected a string that matches the "
            "pattern '^[a-zA-Z0-9_-]+$'.",
        ),
        (
            {"messages": MESSAGES, "parallel_tool_calls": False},
            "parallel_tool_calls",
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are "
            "specified.",
        ),
    ],
)
def test_what_openai_refuses_in_a_conversation_or_its_tools_is_refused_before_it_is_served(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, asked: dict[str, Any], param: str, message: str
) -> None:
    """OpenAI refuses these with a 400; the gateway served and billed them (t179): JSON mode without
    the word may write whitespace until ``max_tokens``, and an agent learns its trimming split a call
    from its answer."""
    sent = upstream_stats(small_upstream)["requests"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="fast", stream=stream, **asked)
        assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "invalid_request_error"
        assert (refused.value.param, refused.value.body["message"]) == (param, message)
    assert upstream_stats(small_upstream)["requests"] == sent


@pytest.mark.parametrize("model", ["fast", "claude"])
def test_an_answered_call_and_json_mode_said_in_a_part_are_served(client: openai.OpenAI, model: str) -> None:
    answered: list[ChatCompletionMessageParam] = [
        *MESSAGES,
        _CALLED,
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert client.chat.completions.create(
        model=model, messages=answered, tools=_WEATHER, parallel_tool_calls=False
    ).choices
    json_said: list[ChatCompletionMessageParam] = [{"role": "user", "content": [{"type": "text", "text": "JSON"}]}]
    assert client.chat.completions.create(
        model=model, messages=json_said, response_format={"type": "json_object"}
    ).choices
