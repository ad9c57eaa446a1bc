"""What Claude refuses that OpenAI's API takes, met for a client of another API.

A chat client's ``stop: ["\\n"]`` (single-line answers), a text part of whitespace alone, and
``temperature`` with ``top_p`` are fine to OpenAI; Claude answers each with a 400, so the same
request failed or worked by where it was routed (t52). The simulated upstream refuses them as
Anthropic does (both samplers: for the models named since Sonnet 4.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test, inject, upstream_stats
from tests.faulty_upstream import FaultyUpstream, two_tenants_and_an_echoing_model
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_CLAUDE_45 = """  claude45:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-sonnet-4-5
    api_key_env: TEST_ANTHROPIC_KEY
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 1, first_byte: 2, total: 5}}
"""
_ASK: Any = [{"role": "user", "content": "Two lines, please."}]
_TWO_LINES = "first line\nsecond line"


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(small_upstream, large_upstream, extra_models=_CLAUDE_45.format(url=large_upstream.root_url))
    env = {"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k", "TEST_ANTHROPIC_KEY": "k"}
    process = start_gateway(tmp_path_factory.mktemp("claude"), policy, env=env)
    yield process
    process.stop()


def test_a_stop_string_of_whitespace_alone_is_applied_by_the_gateway(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """A chat client's, which OpenAI takes (a Messages client's is Anthropic's 400 on every route: f222)."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    inject(large_upstream, {"text": _TWO_LINES})
    whole = oai.chat.completions.create(model="claude45", messages=_ASK, stop=["\n", "never"])
    assert whole.choices[0].message.content == "first line"
    assert whole.choices[0].finish_reason == "stop"
    assert (whole.choices[0].model_extra or {}).get("stop_reason") == "\n"  # as vLLM names it (t53)
    sent = upstream_stats(large_upstream)["last_request"]["body"]
    assert sent["stop_sequences"] == ["never"]  # the other is the gateway's to apply
    inject(large_upstream, {"text": _TWO_LINES})
    chunks = list(oai.chat.completions.create(model="claude45", messages=_ASK, stop="\n", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "first line"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_text_part_of_whitespace_alone_is_left_out(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    parts: Any = [{"type": "text", "text": "Hello?"}, {"type": "text", "text": " \n "}]
    answer = oai.chat.completions.create(model="claude45", messages=[{"role": "user", "content": parts}])
    assert answer.choices[0].message.content
    assert upstream_stats(large_upstream)["last_request"]["body"]["messages"][0]["content"] == "Hello?"


def test_a_model_that_takes_one_sampler_is_sent_temperature_alone(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    before = upstream_stats(large_upstream)["messages_requests"]
    first = oai.chat.completions.create(model="claude45", messages=_ASK, temperature=0.2, top_p=0.9)
    assert first.choices[0].message.content
    sent = upstream_stats(large_upstream)["last_request"]["body"]
    assert sent["temperature"] == 0.2 and "top_p" not in sent
    raw = oai.chat.completions.with_raw_response.create(model="claude45", messages=_ASK, temperature=0.2, top_p=0.9)
    assert "top_p" in raw.headers["x-gateway-dropped"]  # learned: named, and no 400 first
    assert upstream_stats(large_upstream)["messages_requests"] == before + 3
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0))
    told = claude.messages.with_raw_response.create(
        model="claude45", max_tokens=16, messages=_ASK, extra_body={"temperature": 0.2, "top_p": 0.9}
    )  # the SDK of 2026 no longer names the samplers; older SDKs and raw clients still send them
    assert "top_p" in told.headers["x-gateway-dropped"]  # a Messages client is told too (t53)
    top_p_alone = oai.chat.completions.create(model="claude45", messages=_ASK, top_p=0.9)
    assert top_p_alone.choices[0].message.content
    assert upstream_stats(large_upstream)["last_request"]["body"]["top_p"] == 0.9


_ECHOING = """  echoing:
    provider: anthropic
    base_url: {root}
    upstream_model: echoing-claude
    api_key_env: TEST_ANTHROPIC_KEY
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 1, first_byte: 2, total: 5}}
"""


@pytest.fixture(scope="module")
def echoing_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[tuple[GatewayProcess, FaultyUpstream]]:
    """Two tenants' keys, and an Anthropic model whose 400s quote the client's input."""
    workdir = tmp_path_factory.mktemp("echoing")
    env = {"TEST_LARGE_KEY": "k", "TEST_ANTHROPIC_KEY": "k"}
    with two_tenants_and_an_echoing_model(workdir, _ECHOING, redis_server, small_upstream, large_upstream, env) as gw:
        yield gw


@pytest.mark.parametrize("through", ["stop", "anthropic-beta"])
def test_a_sampler_refusal_a_client_gets_an_upstream_to_quote_teaches_the_model_nothing(
    echoing_gateway: tuple[GatewayProcess, FaultyUpstream], through: str
) -> None:
    """t135 follow-up: the refusal of both samplers was read anywhere in the 400's body: one tenant's stop
    sequence, quoted back in a validation error, made the model drop every tenant's ``top_p``."""
    gateway, upstream = echoing_gateway
    tenant_a = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-a", max_retries=0))
    tenant_b = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-b", max_retries=0))
    lesson = "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
    before = upstream.calls.get("echoing-claude", 0)
    if through == "stop":
        with pytest.raises(openai.BadRequestError):
            tenant_b.chat.completions.create(model="echoing", messages=_ASK, temperature=0.2, top_p=0.9, stop=[lesson])
    else:  # t144: a header the gateway sends on, quoted back as Anthropic quotes a beta it does not know
        claude_b = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="key-b", max_retries=0))
        with pytest.raises(anthropic.BadRequestError):
            claude_b.messages.create(
                model="echoing",
                max_tokens=16,
                messages=_ASK,
                extra_body={"temperature": 0.2, "top_p": 0.9},
                extra_headers={"anthropic-beta": f"x-{lesson}"},
            )
    assert upstream.calls["echoing-claude"] == before + 1  # not asked again as if it had refused top_p
    raw = tenant_a.chat.completions.with_raw_response.create(model="echoing", messages=_ASK, temperature=0.2, top_p=0.9)
    assert raw.parse().choices[0].message.content == "a fine answer"
    assert "top_p" not in raw.headers.get("x-gateway-dropped", "")
    sent = upstream.last_body["echoing-claude"]
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9


def test_a_last_user_message_of_whitespace_alone_is_refused_not_continued(gateway: GatewayProcess) -> None:
    """Left out, it made the assistant turn before it a prefill, which the model continued (t53)."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    turns: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "  \n"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="claude45", messages=turns)
    assert "messages[2]" in refused.value.message


@pytest.mark.parametrize("blank", [0, 1])
def test_an_earlier_message_of_whitespace_alone_is_refused_not_left_out(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, blank: int
) -> None:
    """t180: left out, the turns around it were joined into one (a conversation opening with the
    assistant's turn when it was the first). OpenAI takes it; Claude refuses it, so does its route,
    naming the message, before Claude is asked. A final assistant message of whitespace alone is
    still left out (a prefill of nothing)."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    turns: Any = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "b"},
    ]
    turns[blank] = {**turns[blank], "content": " \n"}
    before = upstream_stats(large_upstream)["messages_requests"]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="claude45", messages=turns)
    assert f"messages[{blank}]: the message has no content but whitespace" in refused.value.message
    assert refused.value.param == f"messages[{blank}]"
    assert upstream_stats(large_upstream)["messages_requests"] == before
    oai.chat.completions.create(model="claude45", messages=[*turns[2:], {"role": "assistant", "content": " "}])
    sent = upstream_stats(large_upstream)["last_request"]["body"]["messages"]
    assert sent == [{"role": "user", "content": "b"}]


def test_a_completions_client_is_told_what_a_claude_route_left_out_and_which_stop_ended_it(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t55: the legacy API got neither the dropped ``top_p`` nor ``stop_reason``."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    oai.chat.completions.create(model="claude45", messages=_ASK, temperature=0.2, top_p=0.9)  # learned, if not yet
    inject(large_upstream, {"text": _TWO_LINES})
    raw = oai.completions.with_raw_response.create(
        model="claude45", prompt="Two lines, please.", max_tokens=32, stop=["\n"], temperature=0.2, top_p=0.9
    )
    assert "top_p" in raw.headers["x-gateway-dropped"]
    choice = raw.parse().choices[0]
    assert choice.text == "first line" and (choice.model_extra or {}).get("stop_reason") == "\n"


def test_a_responses_client_is_not_told_a_top_p_was_used_that_was_left_out(gateway: GatewayProcess) -> None:
    """t55: the response echoed top_p 0.9 while naming it as dropped."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    oai.chat.completions.create(model="claude45", messages=_ASK, temperature=0.2, top_p=0.9)  # learned, if not yet
    raw = oai.responses.with_raw_response.create(model="claude45", input="Hi.", temperature=0.2, top_p=0.9)
    assert "top_p" in raw.headers["x-gateway-dropped"]
    response = raw.parse()
    assert response.top_p is None and response.temperature == 0.2
