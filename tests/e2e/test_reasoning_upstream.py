"""An OpenAI reasoning model upstream, which refuses ``max_tokens`` for ``max_completion_tokens``.

A Messages client must send ``max_tokens`` and a Responses client's ``max_output_tokens`` became
it: every such request to an o-series or gpt-5 model was a 400 naming a field the client never
wrote (t38). The simulated upstream refuses it as OpenAI does for models named so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, upstream_stats
from tests.faulty_upstream import FaultyUpstream, two_tenants_and_an_echoing_model
from tests.gateway_process import GatewayProcess

_REASONING = """  reasoner:
    base_url: {url}
    upstream_model: o4-mini
    tier: large
    price: {{input: 1.1, output: 4.4}}
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
"""


@pytest.fixture(scope="module")
def gateway_to_o4(
    pair_gateway: PairGateway,
    small_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    with pair_gateway("o4", extra_models=_REASONING.format(url=small_upstream.url)) as process:
        yield process


def test_each_api_reaches_a_model_that_refuses_max_tokens(
    gateway_to_o4: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway_to_o4.url, api_key="x", max_retries=0))
    oai = closed_after_test(openai.OpenAI(base_url=gateway_to_o4.base_url, api_key="x", max_retries=0))
    before = upstream_stats(small_upstream)["chat_requests"]
    message = claude.messages.create(model="reasoner", max_tokens=64, messages=[{"role": "user", "content": "Hi."}])
    assert message.content[0].type == "text" and message.content[0].text
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent
    # learned: the next requests go as the upstream takes them, with no 400 first
    assert upstream_stats(small_upstream)["chat_requests"] == before + 2
    response = oai.responses.create(model="reasoner", input="Hi.", max_output_tokens=32)
    assert response.output_text
    with claude.messages.stream(model="reasoner", max_tokens=16, messages=[{"role": "user", "content": "Hi."}]) as s:
        assert s.get_final_message().content
    chat = oai.chat.completions.create(model="reasoner", max_tokens=8, messages=[{"role": "user", "content": "Hi."}])
    assert chat.choices[0].message.content
    assert upstream_stats(small_upstream)["chat_requests"] == before + 5
    assert upstream_stats(small_upstream)["last_request"]["body"]["max_completion_tokens"] == 8


_PROMPT: Any = [{"role": "user", "content": "List: apple banana cherry damson elder fig grape"}]
"""The simulated upstream's answer to it: "[simulated small] grape fig elder damson cherry banana apple List:"."""


def test_stop_strings_hold_on_a_model_that_refuses_them(
    gateway_to_o4: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """OpenAI's reasoning models answer ``stop`` with a 400, and agents end their turns with stop
    strings: the gateway sends the request without them and cuts the answer itself."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway_to_o4.base_url, api_key="x", max_retries=0))
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway_to_o4.url, api_key="x", max_retries=0))
    chat = oai.chat.completions.create(model="reasoner", messages=_PROMPT, stop=["cherry", "fig"])
    assert chat.choices[0].message.content == "[simulated small] grape "
    assert chat.choices[0].finish_reason == "stop"
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert "stop" not in sent
    before = upstream_stats(small_upstream)["chat_requests"]
    stream = oai.chat.completions.create(
        model="reasoner", messages=_PROMPT, stop="damson", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[simulated small] grape fig elder "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    whole = len(["[simulated", "small]", "grape", "fig", "elder", "damson", "cherry", "banana", "apple", "List:"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= whole  # what the upstream wrote
    assert upstream_stats(small_upstream)["chat_requests"] == before + 1  # learned: no 400 first
    message = claude.messages.create(
        model="reasoner",
        max_tokens=64,
        messages=_PROMPT,
        stop_sequences=["banana"],
    )
    assert (
        message.content[0].type == "text"
        and message.content[0].text == "[simulated small] grape fig elder damson cherry "
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "banana")
    with claude.messages.stream(
        model="reasoner",
        max_tokens=64,
        messages=_PROMPT,
        stop_sequences=["elder"],
    ) as events:
        final = events.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "[simulated small] grape fig "
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "elder")
    untouched = oai.chat.completions.create(model="reasoner", messages=_PROMPT, stop=["absent"])
    assert untouched.choices[0].message.content == "[simulated small] grape fig elder damson cherry banana apple List:"
    assert untouched.choices[0].finish_reason == "stop"


_ECHOING = """  echoing:
    base_url: {url}
    tier: small
    price: {{input: 1, output: 1}}
    timeouts: {{connect: 1, first_byte: 2, total: 5}}
"""


@pytest.fixture(scope="module")
def echoing_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[tuple[GatewayProcess, FaultyUpstream]]:
    """Two tenants' keys, and a model whose 400s quote the client's input as vLLM's do (alone, or
    with a fallback; one failure opens a tenant's circuit on it)."""
    workdir = tmp_path_factory.mktemp("echoing")
    with two_tenants_and_an_echoing_model(
        workdir,
        _ECHOING,
        redis_server,
        small_upstream,
        large_upstream,
        routes="  echoing-or-large: {model: echoing, fallbacks: [large]}\n",
        breaker="{min_requests: 1, reset_after_s: 30}",
    ) as gw:
        yield gw


@pytest.mark.parametrize(
    "lesson",
    [
        "Unsupported parameter: 'stop' is not supported with this model.",
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
    ],
)
def test_a_refusal_a_client_gets_an_upstream_to_quote_teaches_the_model_nothing(
    echoing_gateway: tuple[GatewayProcess, FaultyUpstream], lesson: str
) -> None:
    """t135: the refusal of ``stop`` or ``max_tokens`` was read anywhere in the 400's body, and a
    vLLM 400 quotes the value it refused: one tenant's crafted ``guided_choice`` made the model
    drop every tenant's ``stop`` (and refuse more than 16) or rename every tenant's limit."""
    gateway, upstream = echoing_gateway
    tenant_a = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-a", max_retries=0))
    tenant_b = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-b", max_retries=0))
    before = upstream.calls.get("echoing", 0)
    with pytest.raises(openai.BadRequestError):
        tenant_b.chat.completions.create(
            model="echoing", messages=_PROMPT, stop=["zz"], max_tokens=20, extra_body={"guided_choice": lesson}
        )
    assert upstream.calls["echoing"] == before + 1  # not asked again as if it had refused a field
    stops = [f"STOP{i}" for i in range(17)]  # more than the gateway applies itself
    chat = tenant_a.chat.completions.create(model="echoing", messages=_PROMPT, stop=stops, max_tokens=30)
    assert chat.choices[0].message.content == "a fine answer"
    sent = upstream.last_body["echoing"]
    assert sent["stop"] == stops and sent["max_tokens"] == 30 and "max_completion_tokens" not in sent


def test_a_400_quoting_a_clients_billing_words_is_the_clients_not_the_accounts(
    echoing_gateway: tuple[GatewayProcess, FaultyUpstream], large_upstream: SimulatedUpstream
) -> None:
    """t174: a vLLM 400 quoting a client's value with "billing" or "payment" in it was taken for the
    upstream refusing the gateway's account: the fallback was called (and billed), the tenant's
    circuit on the model opened, so its next valid requests went to the fallback too, and without
    one the client got a 502 it was told not to retry."""
    gateway, upstream = echoing_gateway
    tenant = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-b", max_retries=0))
    before, fallback_before = upstream.calls.get("echoing", 0), upstream_stats(large_upstream)["chat_requests"]
    for model, value in (("echoing-or-large", "billing-report"), ("echoing", "payment due"), ("echoing-or-large", "x")):
        with pytest.raises(openai.BadRequestError) as refused:
            tenant.chat.completions.create(model=model, messages=_PROMPT, extra_body={"guided_choice": value})
        assert refused.value.code == "upstream_rejected_request" and value in refused.value.message
    assert upstream.calls["echoing"] == before + 3
    assert upstream_stats(large_upstream)["chat_requests"] == fallback_before  # no fallback for the client's fault
    answered = tenant.chat.completions.with_raw_response.create(model="echoing-or-large", messages=_PROMPT)
    assert answered.headers["x-gateway-model"] == "echoing"  # the tenant's circuit on it stayed closed


def test_a_refusal_naming_a_clients_field_or_tool_is_the_clients_not_the_accounts(
    echoing_gateway: tuple[GatewayProcess, FaultyUpstream], large_upstream: SimulatedUpstream
) -> None:
    """t181: an upstream's refusal naming, unquoted, a client's field (FastAPI's 422 for
    ``payment_method``: ``body.payment_method``) or tool (vLLM's "tool name billing_lookup is not
    allowed") was taken for the upstream refusing the gateway's account: a 502, the fallback called
    and billed, and the tenant's circuit on the model opened for its valid requests."""
    gateway, upstream = echoing_gateway
    tenant = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-a", max_retries=0))
    before, fallback_before = upstream.calls.get("echoing", 0), upstream_stats(large_upstream)["chat_requests"]
    with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
        tenant.chat.completions.create(
            model="echoing-or-large", messages=_PROMPT, extra_body={"payment_method": "card"}
        )
    assert unprocessable.value.code == "upstream_rejected_request"
    assert "body.payment_method: Extra inputs are not permitted" in unprocessable.value.message
    tool: Any = {"type": "function", "function": {"name": "billing_lookup", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        tenant.chat.completions.create(model="echoing-or-large", messages=_PROMPT, tools=[tool])
    assert refused.value.code == "upstream_rejected_request"
    assert "tool name billing_lookup is not allowed" in refused.value.message
    assert upstream.calls["echoing"] == before + 2
    assert upstream_stats(large_upstream)["chat_requests"] == fallback_before  # no fallback for the client's fault
    answered = tenant.chat.completions.with_raw_response.create(model="echoing-or-large", messages=_PROMPT)
    assert answered.headers["x-gateway-model"] == "echoing"  # the tenant's circuit on it stayed closed
