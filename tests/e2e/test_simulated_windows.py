"""``make run``: ``serve --simulate-missing`` over the shipped policy. Each simulated upstream
refuses a prompt its model's ``context_window`` cannot hold, with vLLM's 400, as the model's
server would: an overlong prompt moves on to the route's next model, and when none holds it the
client gets the documented 400 ``context_length_exceeded`` in its protocol's words (t200: every
protocol answered 200, billed with ``usage_refused: prompt_over_window``).

The windows come from the policy (``SMALL_CONTEXT_WINDOW``, ``LARGE_CONTEXT_WINDOW``), kept small
here so the prompts are short.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, running_gateway

_SHIPPED = Path(__file__).resolve().parents[2] / "policies.yaml"
_OVER_BOTH = "hello world " * 400  # ~800 tokens: over small's 300 and large's 600
_OVER_SMALL = "hello world " * 200  # ~400 tokens: large's alone


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[GatewayProcess]:
    env = {
        "SMALL_MODEL_URL": "",
        "LARGE_MODEL_URL": "",
        "REDIS_URL": redis_server.url,
        "SMALL_CONTEXT_WINDOW": "300",
        "LARGE_CONTEXT_WINDOW": "600",
    }
    workdir = tmp_path_factory.mktemp("make-run")
    with running_gateway(workdir, "", policy_path=_SHIPPED, env=env, serve_args=("--simulate-missing",)) as gateway:
        yield gateway


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=30))


def test_a_prompt_over_the_small_window_is_answered_by_the_large_model(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": _OVER_SMALL}]
    )
    assert raw.headers["x-gateway-model"] == "large" and raw.parse().choices[0].message.content


def test_chat_gets_context_length_exceeded(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": _OVER_BOTH}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    assert "maximum context length is 600 tokens" in refused.value.message
    record = gateway.wait_for_record(refused.value.response.headers["x-request-id"])
    assert record["status"] == 400 and record["error_type"] == "context_length_exceeded"
    assert record["fallback_used"] is True and record.get("usage_refused") is None


def test_completions_get_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="fast", prompt=_OVER_BOTH)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"


def test_responses_get_context_length_exceeded_naming_input(client: openai.OpenAI) -> None:
    """t200: ``param: "messages"``, a field the Responses API has not."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="fast", input=_OVER_BOTH, stream=stream)
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"
        assert "maximum context length is 600 tokens" in refused.value.message


def test_responses_name_max_output_tokens_when_only_the_answer_does_not_fit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="small", input="Say hello.", max_output_tokens=1000)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_output_tokens"


def test_messages_get_anthropics_prompt_is_too_long(gateway: GatewayProcess) -> None:
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=30))
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="fast", max_tokens=64, messages=[{"role": "user", "content": _OVER_BOTH}])
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and "param" not in error
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 600 maximum", error["message"]), error["message"]
