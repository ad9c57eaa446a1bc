"""A prompt too long for one model's context window goes to the route's next model.

The small upstream here is a vLLM with ``--max-model-len 300``: it answers a prompt (with the
completion it asks for) that does not fit with vLLM's 400 in its flat error body of before
0.10.2. The route's next model may have a longer window; only when none fits does the client
get the error, as OpenAI words it (``context_length_exceeded``, ``param: messages``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import msgspec
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_LONG = "Summarise this report. " + "The quarterly figures rose again in every region we track. " * 40


@pytest.fixture(scope="module")
def short_window() -> Iterator[SimulatedUpstream]:
    upstream = start_simulated_upstream("small", max_model_len=300)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    short_window: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(short_window, large_upstream).replace(
        "tier: small\n", "tier: small\n    context_window: 300\n", 1
    )
    process = start_gateway(
        Path(tmp_path_factory.mktemp("context")),
        policy,
        env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "sk-large-secret-123"},
    )
    yield process
    process.stop()


def test_a_prompt_too_long_for_the_small_model_is_answered_by_the_next_one(
    client: openai.OpenAI, gateway: GatewayProcess, short_window: SimulatedUpstream
) -> None:
    refused_before = upstream_stats(short_window)["chat_requests"]
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": _LONG}])
    assert raw.headers["x-gateway-model"] == "large" and raw.parse().choices[0].message.content
    assert upstream_stats(short_window)["chat_requests"] == refused_before + 1  # asked once, not retried
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["fallback_used"] is True and record["status"] == 200
    asked_too_much = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
    )
    assert asked_too_much.headers["x-gateway-model"] == "large"


def test_when_no_model_of_the_route_fits_the_client_gets_openais_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": _LONG}])
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 300 tokens" in error["message"] and '"object"' not in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_client_is_told_in_anthropics_words(claude: anthropic.Anthropic, stream: bool) -> None:
    """(t59) Claude Code compacts its history on Anthropic's "prompt is too long: P tokens > W
    maximum", with the counts the upstream (vLLM) gave, and without the gateway's "upstream 'x'"."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        ask = claude.messages.stream if stream else claude.messages.create
        with_context = ask(model="small", max_tokens=64, messages=[{"role": "user", "content": _LONG}])
        if stream:
            with with_context as events:  # type: ignore[union-attr]
                events.get_final_message()
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 300 maximum", error["message"]), error["message"]


def test_an_anthropic_clients_max_tokens_is_lowered_to_what_the_window_leaves(
    claude: anthropic.Anthropic, short_window: SimulatedUpstream
) -> None:
    """(t59) Claude Code asks for 32,000 output tokens of a model it does not know: Anthropic's
    models write up to the window and stop there; a vLLM refuses, and is asked again for the room
    its own count leaves."""
    for stream in (False, True):
        ask = {"model": "small", "max_tokens": 32000, "messages": [{"role": "user", "content": "Say hello."}]}
        if stream:
            with claude.messages.stream(**ask) as events:  # type: ignore[arg-type]
                message = events.get_final_message()
        else:
            message = claude.messages.create(**ask)  # type: ignore[call-overload]
        assert message.content and message.content[0].type == "text" and message.content[0].text
        sent = upstream_stats(short_window)["last_request"]["body"]
        assert 0 < sent["max_tokens"] < 300


def test_an_openai_client_is_told_openais_code(client: openai.OpenAI) -> None:
    """Chat and Responses clients get OpenAI's ``context_length_exceeded``; a chat client's
    ``max_tokens`` is its own (OpenAI refuses one that does not fit): named, not lowered."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="small", max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="small", input=_LONG)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "input"  # t200: "messages", which the Responses API has not
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="small", input="hi", max_output_tokens=1000)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_output_tokens"


@pytest.mark.parametrize(
    ("said", "told"),
    [
        ("prompt is too long: 250123 tokens > 200000 maximum", "prompt is too long: 250123 tokens > 200000 maximum"),
        (
            "input length and `max_tokens` exceed context limit: 190000 + 32000 > 200000, decrease input length "
            "or `max_tokens` and try again",
            "input length and `max_tokens` exceed context limit: 190000 + 32000 > 200000, decrease input length "
            "or `max_tokens` and try again",
        ),
    ],
)
def test_an_anthropic_upstreams_own_words_reach_the_client_as_they_were(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream, said: str, told: str
) -> None:
    """(t59) Claude Code matches the start of the message: the gateway's "upstream 'claude': HTTP
    400: " hid it."""
    body = msgspec.json.encode({"type": "error", "error": {"type": "invalid_request_error", "message": said}})
    inject(large_upstream, {"status": 400, "body": body.decode()})
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="claude", max_tokens=32000, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["error"]["message"] == told  # type: ignore[index]


def test_short_prompts_stay_on_the_small_model(client: openai.OpenAI) -> None:
    """The refusals above opened no circuit: a prompt that fits is still the small model's."""
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "small"
