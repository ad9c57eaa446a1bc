"""A prompt too long for one model's context window goes to the route's next model.

The small upstream here is a vLLM with ``--max-model-len 300``: it answers a prompt (with the
completion it asks for) that does not fit with vLLM's 400 in its flat error body of before
0.10.2. The route's next model may have a longer window; only when none fits does the client
get the error, as OpenAI words it (``context_length_exceeded``, ``param: messages``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from tests.conftest import upstream_stats
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


def test_an_anthropic_client_is_told_in_its_own_shape(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="small", max_tokens=64, messages=[{"role": "user", "content": _LONG}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "maximum context length" in refused.value.message


def test_short_prompts_stay_on_the_small_model(client: openai.OpenAI) -> None:
    """The refusals above opened no circuit: a prompt that fits is still the small model's."""
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "small"
