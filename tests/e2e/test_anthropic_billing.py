"""Anthropic options billed above the base price, with the anthropic SDK (t59).

Fast mode (``speed: "fast"``), US-only inference (``inference_geo: "us"``) and server tools
(web search, ``usage.server_tool_use.web_search_requests``) are billed from what the upstream's
usage says was used, at the multipliers and fees the model's ``price`` sets; a request asking
for one its reachable models do not price is refused before it costs anything, and budgets
reserve the dearer estimate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, MessageParam, Usage

from gateway.auth import hash_key
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess

MODELS = """
  opus:
    provider: anthropic
    base_url: {root}
    upstream_model: claude-sim
    price: {{input: 5, output: 25, speed: {{fast: 6}}, inference_geo: {{us: 1.1}},
             server_tools: {{web_search: 10, web_fetch: 0, code_execution: 50}}}}
    tier: large
  sonnet:
    provider: anthropic
    base_url: {root}
    upstream_model: claude-sim
    price: {{input: 3, output: 15}}
    tier: large
"""
ROUTES = """
  opus-r: {model: opus}
  sonnet-r: {model: sonnet}
  opus-or-sonnet: {model: opus, fallbacks: [sonnet]}
"""
KEYS = """
auth:
  mode: keys
  keys:
    - {id: open, tenant: acme, hash: "%(open)s"}
    - {id: thrifty, tenant: frugal, hash: "%(thrifty)s", limits: {usd_per_day: 0.01}}
""" % {name: hash_key(f"key-{name}") for name in ("open", "thrifty")}

FAST = "fast-mode-2026-02-01"


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    models = MODELS.format(root=large_upstream.root_url)
    with pair_gateway("billing", auth=KEYS, extra_models=models, routes=ROUTES) as process:
        yield process


def _claude(gateway: GatewayProcess, key: str = "open") -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key=f"key-{key}", max_retries=0, timeout=15))


def _tokens_usd(usage: Usage, input_price: float, output_price: float) -> float:
    return (usage.input_tokens * input_price + usage.output_tokens * output_price) / 1_000_000


ASK: list[MessageParam] = [{"role": "user", "content": "What is new today?"}]


def test_fast_mode_in_the_us_is_billed_at_both_multipliers(gateway: GatewayProcess) -> None:
    raw = _claude(gateway).messages.with_raw_response.create(
        model="opus-r",
        max_tokens=64,
        messages=ASK,
        extra_body={"speed": "fast", "inference_geo": "us"},
        extra_headers={"anthropic-beta": FAST},
    )
    message = raw.parse()
    expected = _tokens_usd(message.usage, 5, 25) * 6 * 1.1
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(expected, rel=1e-6)
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["passthrough"] is True and record["speed"] == "fast" and record["inference_geo"] == "us"
    assert record["cost_usd"] == pytest.approx(expected, rel=1e-6)


def test_a_streamed_fast_answer_is_billed_at_the_multiplier(gateway: GatewayProcess) -> None:
    with _claude(gateway).messages.stream(
        model="opus-r",
        max_tokens=64,
        messages=ASK,
        extra_body={"speed": "fast"},
        extra_headers={"anthropic-beta": FAST, "x-request-id": "billing-fast-stream"},
    ) as stream:
        final = stream.get_final_message()
    record = gateway.wait_for_record("billing-fast-stream")
    assert record["speed"] == "fast" and record["inference_geo"] is None
    assert record["cost_usd"] == pytest.approx(_tokens_usd(final.usage, 5, 25) * 6, rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_web_searches_are_billed_their_fee_each(gateway: GatewayProcess, stream: bool) -> None:
    """The simulated upstream uses the tool ``max_uses`` times: 3 searches at $10 per 1,000."""
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    request_id = f"billing-search-{stream}"
    headers = {"x-request-id": request_id}
    claude = _claude(gateway)
    if stream:
        with claude.messages.stream(
            model="opus-r", max_tokens=64, messages=ASK, tools=tools, extra_headers=headers
        ) as streamed:
            message: Message = streamed.get_final_message()
    else:
        raw = claude.messages.with_raw_response.create(
            model="opus-r", max_tokens=64, messages=ASK, tools=tools, extra_headers=headers
        )
        message = raw.parse()
    assert message.usage.server_tool_use is not None and message.usage.server_tool_use.web_search_requests == 3
    expected = _tokens_usd(message.usage, 5, 25) + 3 * 10 / 1000
    if not stream:
        assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(expected, rel=1e-6)
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] == {"web_search": 3}
    assert record["cost_usd"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_the_simulated_code_execution_is_billed_once_per_container(gateway: GatewayProcess, stream: bool) -> None:
    """The simulated upstream names a container when the tool is offered, as Anthropic does (f175)."""
    tools: Any = [{"type": "code_execution_20250825", "name": "code_execution"}]
    request_id = f"billing-code-{stream}"
    asked: Any = {"model": "opus-r", "max_tokens": 64, "messages": ASK, "tools": tools,
                  "extra_headers": {"x-request-id": request_id}}  # fmt: skip
    if stream:
        with _claude(gateway).messages.stream(**asked) as streamed:
            message = streamed.get_final_message()
    else:
        message = _claude(gateway).messages.create(**asked)
    assert message.container is not None and message.container.id.startswith("container_")
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] == {"code_execution": 1}
    assert record["cost_usd"] == pytest.approx(_tokens_usd(message.usage, 5, 25) + 50 / 1000, rel=1e-6)


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("sonnet-r", {"speed": "fast"}, "models.sonnet.price.speed.fast"),
        ("sonnet-r", {"inference_geo": "us"}, "models.sonnet.price.inference_geo.us"),
        ("sonnet-r", {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, "models.sonnet.price.server_tools.web_fetch"),
        # a fallback that does not price it could bill it at the base price
        ("opus-or-sonnet", {"speed": "fast"}, "models.sonnet.price.speed.fast"),
        ("opus-r", {"inference_geo": "eu"}, "models.opus.price.inference_geo.eu"),
    ],
)  # fmt: skip
def test_an_option_the_policy_does_not_price_is_refused_before_it_is_sent(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, route: str, extra: dict[str, Any], field: str
) -> None:
    sent = upstream_stats(large_upstream)["messages_requests"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        _claude(gateway).messages.create(
            model=route, max_tokens=64, messages=ASK, extra_body=extra, extra_headers={"anthropic-beta": FAST}
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert field in refused.value.message and "billed above the base price" in refused.value.message
    assert upstream_stats(large_upstream)["messages_requests"] == sent


def test_the_base_speed_and_geo_need_no_price(gateway: GatewayProcess) -> None:
    raw = _claude(gateway).messages.with_raw_response.create(
        model="sonnet-r", max_tokens=64, messages=ASK, extra_body={"speed": "standard", "inference_geo": "global"}
    )
    message = raw.parse()
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(_tokens_usd(message.usage, 3, 15), rel=1e-6)


def test_budgets_reserve_the_multiplied_estimate(gateway: GatewayProcess) -> None:
    """100 completion tokens at $25 are $0.0025, under the $0.01 a day; at 6x, or with five
    searches allowed ($0.05), the estimate is over it, and the request is refused unsent."""
    thrifty = _claude(gateway, "thrifty")
    with pytest.raises(anthropic.RateLimitError) as fast:
        thrifty.messages.create(
            model="opus-r",
            max_tokens=100,
            messages=ASK,
            extra_body={"speed": "fast"},
            extra_headers={"anthropic-beta": FAST},
        )
    assert "usd_per_day" in fast.value.message
    searches: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    with pytest.raises(anthropic.RateLimitError):
        thrifty.messages.create(model="opus-r", max_tokens=100, messages=ASK, tools=searches)
    assert thrifty.messages.create(model="opus-r", max_tokens=100, messages=ASK).content  # the base price fits
