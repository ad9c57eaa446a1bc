"""OpenAI's legacy Completions API (``POST /v1/completions``) served by the chat pipeline, with the openai SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess

PROMPT = "alpha beta gamma"


def _last_upstream_body(upstream: SimulatedUpstream) -> dict[str, Any]:
    last = upstream_stats(upstream)["last_request"]
    assert isinstance(last, dict)
    body = last["body"]
    assert isinstance(body, dict)
    return body


def test_a_completion_is_a_text_completion_and_logged_as_such(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    raw = client.completions.with_raw_response.create(
        model="fast", prompt=PROMPT, max_tokens=64, seed=3, presence_penalty=0.1
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.object == "text_completion" and completion.id == f"cmpl-{request_id}"
    assert completion.model == "fast" and completion.created > 0
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.text == "[simulated small] gamma beta alpha"
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["x-gateway-model"] == "small" and raw.headers["x-gateway-route"] == "fast"
    upstream = _last_upstream_body(small_upstream)
    assert upstream["messages"] == [{"role": "user", "content": PROMPT}]
    assert upstream["max_tokens"] == 64 and upstream["seed"] == 3 and upstream["presence_penalty"] == 0.1
    record = gateway.wait_for_record(request_id)
    assert record["protocol"] == "openai.completions" and record["status"] == 200
    assert record["route"] == "fast" and record["stream"] is False
    assert record["completion_tokens"] == completion.usage.completion_tokens


def test_max_tokens_defaults_to_16_and_echo_puts_the_prompt_first(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    completion = client.completions.create(model="fast", prompt=[PROMPT], echo=True)
    assert _last_upstream_body(small_upstream)["max_tokens"] == 16
    assert completion.choices[0].text == PROMPT + "[simulated small] gamma beta alpha"


def test_a_short_max_tokens_finishes_with_length(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="fast", prompt="one two three four five six seven", max_tokens=2)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens <= 2


def test_a_stream_accumulates_the_same_text_and_ends_with_usage(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    ask: dict[str, Any] = {
        "model": "fast",
        "prompt": PROMPT,
        "max_tokens": 64,
        "extra_headers": {"cache-control": "no-cache"},
    }
    whole = client.completions.create(**ask)
    with client.completions.with_streaming_response.create(
        **ask, stream=True, stream_options={"include_usage": True}
    ) as response:
        request_id = response.headers["x-request-id"]
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    assert all(chunk.object == "text_completion" and chunk.id == f"cmpl-{request_id}" for chunk in chunks)
    assert all(chunk.model == "fast" for chunk in chunks)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert whole.usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    record = gateway.wait_for_record(request_id)
    assert record["protocol"] == "openai.completions" and record["stream"] is True and record["status"] == 200
    assert record["completion_tokens"] == whole.usage.completion_tokens


def test_raw_frames_follow_openais_legacy_stream(gateway: GatewayProcess) -> None:
    body = {"model": "fast", "prompt": "hi there", "max_tokens": 32, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/completions", json=body, timeout=15) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert '"usage"' not in "".join(data)  # not asked for
    assert all('"object":"text_completion"' in frame for frame in data[:-1])
    assert '"finish_reason":"stop"' in data[-2]


def test_errors_are_openais_and_the_sdk_raises_its_own_types(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model="fast", prompt=["one", "two"])
    assert several.value.status_code == 400
    assert isinstance(several.value.body, dict) and several.value.body["param"] == "prompt"
    assert "only a single text prompt is supported" in several.value.body["message"]
    with pytest.raises(openai.BadRequestError) as tokens:
        client.completions.create(model="fast", prompt=[1, 2, 3])
    assert isinstance(tokens.value.body, dict) and "token-id prompts" in tokens.value.body["message"]
    with pytest.raises(openai.BadRequestError) as n:
        client.completions.create(model="fast", prompt="x", n=2)
    assert isinstance(n.value.body, dict) and n.value.body["param"] == "n"
    response = httpx.post(f"{gateway.base_url}/completions", json={"model": "fast", "prompt": "x", "suffix": "y"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "suffix"
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["protocol"] == "openai.completions" and record["status"] == 400


def test_stream_options_without_stream_is_openais_400(client: openai.OpenAI) -> None:
    """As OpenAI and vLLM answer it (t112); ``stream_options: null`` is no options, and taken."""
    for asked in ({"stream": False}, {}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="fast", prompt="x", stream_options={"include_usage": True}, **asked)  # type: ignore[call-overload]
        assert isinstance(refused.value.body, dict) and refused.value.body["type"] == "invalid_request_error"
        assert refused.value.param == "stream_options"
        assert (
            refused.value.body["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        )
    assert client.completions.create(model="fast", prompt="x", max_tokens=4, stream_options=None).choices


def test_an_upstream_refusing_the_messages_names_the_prompt(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    refusal = '{"error": {"message": "context too long", "type": "invalid_request_error", "param": "messages"}}'
    inject(small_upstream, {"status": 400, "body": refusal})
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="fast", prompt="too long for the upstream")
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "prompt"  # what the client sent


def test_unknown_fields_are_named_in_a_header(gateway: GatewayProcess) -> None:
    body = {"model": "fast", "prompt": "x", "max_tokens": 4, "vendor_option": 3}
    response = httpx.post(f"{gateway.base_url}/completions", json=body, timeout=15)
    assert response.status_code == 200 and response.headers["x-gateway-dropped"] == "vendor_option"
