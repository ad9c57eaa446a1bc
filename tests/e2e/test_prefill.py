"""Anthropic's prefill (a request that ends on an assistant turn) over OpenAI-compatible upstreams.

Anthropic continues the final assistant message. vLLM does so when asked
(``continue_final_message: true`` with ``add_generation_prompt: false``, and refuses the pair
set otherwise); OpenAI's API has no such switch and answers with a new turn, which the
gateway says in ``x-gateway-dropped``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, upstream_stats
from tests.gateway_process import GatewayProcess

_VLLM = """  vllm:
    base_url: {url}
    continue_final_message: true
    price: {{input: 0.5, output: 1.5}}
    tier: small
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
"""
_PREFILLED: list[Any] = [
    {"role": "user", "content": "Describe a cat as JSON."},
    {"role": "assistant", "content": '{"animal":'},
]


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    small_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    with pair_gateway(
        "prefill", extra_models=_VLLM.format(url=small_upstream.url), cache="{enabled: true, redis_timeout_ms: 2000}"
    ) as process:
        yield process


def _sent(upstream: SimulatedUpstream) -> dict[str, Any]:
    body: dict[str, Any] = upstream_stats(upstream)["last_request"]["body"]
    return body


def test_a_vllm_upstream_continues_the_prefill(claude: anthropic.Anthropic, small_upstream: SimulatedUpstream) -> None:
    raw = claude.messages.with_raw_response.create(model="vllm", max_tokens=64, messages=_PREFILLED)
    message = raw.parse()
    sent = _sent(small_upstream)
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["messages"][-1] == {"role": "assistant", "content": '{"animal":'}
    assert message.content[0].type == "text" and message.content[0].text.startswith(" ...continued by")
    assert "prefill" not in raw.headers.get("x-gateway-dropped", "")
    with claude.messages.stream(model="vllm", max_tokens=64, messages=_PREFILLED) as stream:
        streamed = stream.get_final_message()
    assert _sent(small_upstream)["continue_final_message"] is True
    assert streamed.content[0].type == "text" and streamed.content[0].text == message.content[0].text


def test_a_request_that_ends_on_the_user_is_not_a_continuation(
    claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    claude.messages.create(model="vllm", max_tokens=64, messages=_PREFILLED[:1])
    sent = _sent(small_upstream)
    assert "continue_final_message" not in sent and "add_generation_prompt" not in sent


def test_an_upstream_that_cannot_continue_answers_a_new_turn_and_says_so(
    claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    raw = claude.messages.with_raw_response.create(model="small", max_tokens=64, messages=_PREFILLED)
    assert "continue_final_message" not in _sent(small_upstream)
    assert "prefill" in raw.headers["x-gateway-dropped"].split(", ")
    answer = raw.parse().content[0]
    assert answer.type == "text" and answer.text.startswith("[simulated")


def test_a_chat_clients_last_assistant_message_keeps_openais_meaning(
    claude: anthropic.Anthropic, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """OpenAI's Chat Completions has no prefill: a chat client's body goes to vLLM as it came,
    and the cache keeps the two apart (the continued answer is no answer to the chat request)."""
    continued = claude.messages.create(model="vllm", max_tokens=64, messages=_PREFILLED)
    assert continued.content[0].type == "text" and continued.content[0].text.startswith(" ...continued by")
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(model="vllm", messages=_PREFILLED, max_tokens=64)
    assert raw.headers["x-gateway-cache"] == "miss" and "continue_final_message" not in _sent(small_upstream)
    assert (raw.parse().choices[0].message.content or "").startswith("[simulated")
