"""OpenAI's processing tiers billed at what the upstream says processed the request.

``service_tier: "priority"`` costs about twice the list price on OpenAI's API and ``flex``
half; the answer says which tier served it (``auto`` reads back as the project's, ``default``),
and the model's ``price.service_tier`` multiplies every token price by it. A tier the policy
does not price is served at the list price and said to ops, as vLLM, which has no tiers,
serves any.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, inject
from tests.gateway_process import GatewayProcess

MODELS = """
  tiered:
    provider: openai
    base_url: {root}
    upstream_model: gpt-sim
    price: {{input: 2, output: 8, service_tier: {{priority: 2, flex: 0.5}}}}
    tier: large
"""
ROUTES = """
  tiered-r: {model: tiered}
  plain-r: {model: large}
"""


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    with pair_gateway("tiers", extra_models=MODELS.format(root=large_upstream.url), routes=ROUTES) as process:
        yield process


def _client(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="none", max_retries=0, timeout=15))


def _usd(prompt: int, completion: int, input_price: float, output_price: float) -> float:
    return (prompt * input_price + completion * output_price) / 1_000_000


@pytest.mark.parametrize(("tier", "multiplier"), [("priority", 2.0), ("flex", 0.5), ("auto", 1.0)])
def test_a_tier_is_billed_at_its_multiplier(gateway: GatewayProcess, tier: str, multiplier: float) -> None:
    request_id = f"tier-{tier}"
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="tiered-r",
        messages=[{"role": "user", "content": f"which tier is {tier}?"}],
        extra_body={"service_tier": tier},
        extra_headers={"x-request-id": request_id},
    )
    completion = raw.parse()
    assert completion.usage is not None
    expected = _usd(completion.usage.prompt_tokens, completion.usage.completion_tokens, 2, 8) * multiplier
    record = gateway.wait_for_record(request_id)
    assert record["service_tier"] == ("default" if tier == "auto" else tier)
    assert record["cost_usd"] == pytest.approx(expected, rel=1e-6)


def _billed_at_priority(gateway: GatewayProcess, content: str, request_id: str, stream: bool = True) -> None:
    """A chat request on ``tiered-r`` asking for priority: logged as priority and billed at twice the
    price of the usage the client was given."""
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="tiered-r",
        messages=[{"role": "user", "content": content}],
        service_tier="priority",
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
        extra_headers={"x-request-id": request_id},
    )
    parsed = raw.parse()
    usage = [c.usage for c in parsed if c.usage is not None][-1] if stream else parsed.usage  # type: ignore[union-attr]
    assert usage is not None
    record = gateway.wait_for_record(request_id)
    assert record["service_tier"] == "priority"
    assert record["cost_usd"] == pytest.approx(_usd(usage.prompt_tokens, usage.completion_tokens, 2, 8) * 2, rel=1e-6)


def test_a_streamed_priority_answer_is_billed_at_its_multiplier(gateway: GatewayProcess) -> None:
    _billed_at_priority(gateway, "stream me on priority", "tier-stream")


def test_an_unpriced_tier_is_served_at_the_list_price_and_said_to_ops(gateway: GatewayProcess) -> None:
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="plain-r",
        messages=[{"role": "user", "content": "priority on a model without tier prices"}],
        service_tier="priority",
        extra_headers={"x-request-id": "tier-unpriced"},
    )
    assert raw.http_response.status_code == 200
    record = gateway.wait_for_record("tier-unpriced")
    assert record["service_tier"] == "priority"
    said: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30  # the ops line is written apart from the request log, maybe after it
    while not said and time.monotonic() < deadline:
        said = [r for r in gateway.ops_records("unpriced_usage") if r.get("request_id") == "tier-unpriced"]
        time.sleep(0.02)
    assert said and said[0]["unpriced"] == ["models.large.price.service_tier.priority"]


@pytest.mark.parametrize("given", [[], ["priority"], {}, {"a": 1}, 3])
def test_a_tier_that_is_no_string_is_refused(gateway: GatewayProcess, given: object) -> None:
    """t67: a list or an object was a 500 (``in`` a frozenset of strings)."""
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).chat.completions.create(
            model="tiered-r", messages=[{"role": "user", "content": "hi"}], extra_body={"service_tier": given}
        )
    assert refused.value.body is not None and "service_tier" in str(refused.value.body)


def test_a_tier_no_api_takes_is_not_logged_as_asked(gateway: GatewayProcess) -> None:
    """The client's text would be a free-text group in the cost dashboards."""
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="plain-r",
        messages=[{"role": "user", "content": "a made-up tier"}],
        extra_body={"service_tier": "x" * 300},
        extra_headers={"x-request-id": "tier-made-up"},
    )
    assert raw.http_response.status_code == 200
    assert gateway.wait_for_record("tier-made-up")["service_tier"] is None


def test_a_streamed_tier_is_read_from_any_chunk(gateway: GatewayProcess, large_upstream: SimulatedUpstream) -> None:
    """t68: only the usage chunk's tier was read: a compatible server that said ``priority`` on
    the answer's chunks alone was billed at the base price, with no ``unpriced_usage`` either."""
    inject(large_upstream, {"tier_off_usage_chunk": True})
    _billed_at_priority(gateway, "say the tier on the answer alone", "tier-off-usage")


@pytest.mark.parametrize("stream", [False, True])
def test_a_tier_is_read_whatever_its_case(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t68: an upstream that wrote ``PRIORITY`` was billed at the base price, with no warning."""
    inject(large_upstream, {"service_tier_as": "PRIORITY"})
    _billed_at_priority(gateway, f"priority in capitals, streamed {stream}", f"tier-upper-{stream}", stream)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tier_said_without_usage_is_billed_on_the_gateways_count(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t71: an answer with no usage, billed on the gateway's count, was billed at the tier the
    request asked (flex here), though the upstream said another (priority) processed it."""
    request_id = f"tier-no-usage-{stream}"
    inject(large_upstream, {"omit_usage": True, "service_tier_as": "priority"})
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="tiered-r",
        messages=[{"role": "user", "content": f"no usage, streamed {stream}"}],
        service_tier="flex",
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
        extra_headers={"x-request-id": request_id},
    )
    raw.parse()
    record = gateway.wait_for_record(request_id)
    assert (record["tokens_source"], record["service_tier"]) == ("gateway", "priority")
    billed = _usd(record["prompt_tokens"], record["completion_tokens"], 2, 8) * 2
    assert record["cost_usd"] == pytest.approx(billed, rel=1e-6)


def test_a_responses_object_says_the_tier_said_without_usage(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t71: a Responses object billed on the gateway's count said ``service_tier: null``,
    though the upstream's answer said priority: it says the tier the bill uses."""
    inject(large_upstream, {"omit_usage": True, "service_tier_as": "priority"})
    client = _client(gateway)
    raw = client.responses.with_raw_response.create(model="tiered-r", input="no usage, on priority")
    response = raw.parse()
    assert response.service_tier == "priority"
    assert client.responses.retrieve(response.id).service_tier == "priority"
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert (record["tokens_source"], record["service_tier"]) == ("gateway", "priority")
