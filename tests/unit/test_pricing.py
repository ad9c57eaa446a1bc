"""Cached-prompt, cache-write and reasoning tokens are priced at their own fields, to the cent."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

from gateway import pricing
from gateway.config.schema import Price
from gateway.pricing import PricedOptions, cost_usd, unpriced
from gateway.sparse_log import SparseLog
from tests.unit.conftest import POLICY, MakeHarness, answer_of

# $ per million tokens, as policies.yaml writes them (names as in the file).
_PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0, cached_input_per_mtok=0.3, cache_write_per_mtok=3.75,
               reasoning_per_mtok=15.0)  # fmt: skip


def test_a_long_cached_prompt_costs_a_tenth() -> None:
    # 1,000,000 prompt tokens of which 900,000 cached; 10,000 output tokens.
    cost = cost_usd(_PRICE, 1_000_000, 10_000, cached_prompt_tokens=900_000)
    assert cost == pytest.approx(0.30 + 0.27 + 0.15)  # 100k at $3, 900k at $0.30, 10k at $15


def test_cache_writes_and_reasoning_have_their_own_prices() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=4.0, cache_write_per_mtok=1.25, reasoning_per_mtok=8.0)
    cost = cost_usd(price, 200_000, 50_000, cache_write_tokens=100_000, reasoning_tokens=20_000)
    # 100k uncached at $1 + 100k written at $1.25 + 30k output at $4 + 20k reasoning at $8
    assert round(cost, 2) == round(0.10 + 0.125 + 0.12 + 0.16, 2) == 0.51


def test_hour_long_cache_writes_have_their_own_price() -> None:
    """t40: 1M tokens written with ttl 1h were billed $3.75 (the 5-minute price), not $6.00."""
    price = Price(input_per_mtok=3.0, output_per_mtok=15.0, cache_write_per_mtok=3.75, cache_write_1h_per_mtok=6.0)
    assert cost_usd(price, 1_000_000, 0, cache_write_tokens=1_000_000, cache_write_1h_tokens=1_000_000) == 6.0
    both = cost_usd(price, 1_000_000, 0, cache_write_tokens=1_000_000, cache_write_1h_tokens=400_000)
    assert both == pytest.approx(0.6 * 3.75 + 0.4 * 6.0)
    unset = Price(input_per_mtok=3.0, output_per_mtok=15.0, cache_write_per_mtok=3.75)  # the write price, as before
    assert cost_usd(unset, 1_000_000, 0, cache_write_tokens=1_000_000, cache_write_1h_tokens=1_000_000) == 3.75


def test_a_cost_past_a_floats_range_is_zero_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """t94: 1e308 per million tokens made each request's cost inf: null in the log, +Inf in the
    metrics, and kept by Redis as the key's spend for the month. The policy's prices are bounded
    now; an upstream's absurd token count can still overflow, or raise where an int is past a
    float's range."""
    monkeypatch.setattr(pricing, "_not_finite", SparseLog(structlog.get_logger("test"), "cost_not_finite", every_s=0))
    dearest = Price(input_per_mtok=1e6, output_per_mtok=1e6, speed_multipliers={"fast": 100.0})
    unbounded = Price(input_per_mtok=1e308, output_per_mtok=0.2)  # built by hand: the loader refuses it
    with capture_logs() as logs:
        assert cost_usd(dearest, 10**303, 0) == 0.0  # inf
        assert cost_usd(dearest, 10**302, 10**302, speed="fast") == 0.0  # inf, times 100
        assert cost_usd(dearest, 10**400, 1) == 0.0  # OverflowError
        assert cost_usd(unbounded, 1000, 10) == 0.0
        assert cost_usd(dearest, 1000, 10) == pytest.approx(1010.0)
    said = [log for log in logs if log["event"] == "cost_not_finite"]
    assert len(said) == 4 and said[0]["prompt_tokens"] == 10**303, said


async def test_an_upstreams_absurd_token_count_bills_no_inf(make_harness: MakeHarness) -> None:
    """The answer is served and billed at the gateway's own count (a prompt past the model's window
    is no count an answer can have, 168b11c), the same in the header, the log line and the usage:
    never inf, never the upstream's 10**303."""
    harness = await make_harness(
        POLICY.replace("price: {input: 0.5, output: 1.5}", "price: {input: 1000000, output: 1}")
    )
    harness.upstream.usage = {"prompt_tokens": 10**303, "completion_tokens": 2, "total_tokens": 10**303 + 2}
    with capture_logs() as logs:
        status, _, headers = answer_of(await harness.ask("hello", cache_control="no-store"))
        await asyncio.sleep(0)  # the request is accounted for just after its answer
    [line] = [log for log in logs if log["event"] == "request"]
    assert line["usage_refused"] == "prompt_over_window" and line["tokens_source"] == "gateway"
    assert 0 < line["prompt_tokens"] < 100 and math.isfinite(line["cost_usd"]) and line["cost_usd"] > 0
    assert status == 200 and float(headers["x-gateway-cost-usd"]) == pytest.approx(line["cost_usd"], rel=1e-6)
    await harness.limiter.drain()
    await harness.limiter.ledger.flush()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = await harness.limiter.ledger.read([("alice", "team-a")], today, today)
    assert totals is not None and totals["alice", "team-a"].cost_usd == pytest.approx(line["cost_usd"])


def test_unset_prices_charge_as_before() -> None:
    plain = Price(input_per_mtok=2.0, output_per_mtok=6.0)
    assert cost_usd(plain, 1000, 100, cached_prompt_tokens=900, reasoning_tokens=50) == cost_usd(plain, 1000, 100)


async def test_the_pipeline_charges_what_the_upstream_says_was_cached(make_harness: MakeHarness) -> None:
    policy = POLICY.replace(
        "small: {base_url: \"http://small.test/v1\", price: {input: 0.5, output: 1.5}, tier: small}",
        "small: {base_url: \"http://small.test/v1\", price: {input: 3, output: 15, cached_input: 0.3, reasoning: 60}, tier: small, context_window: 200000}",
    )  # fmt: skip
    assert policy != POLICY
    harness = await make_harness(policy)
    harness.upstream.usage = {
        "prompt_tokens": 100_000, "completion_tokens": 2_000, "total_tokens": 102_000,
        "prompt_tokens_details": {"cached_tokens": 80_000}, "completion_tokens_details": {"reasoning_tokens": 1_500},
    }  # fmt: skip
    status, body, headers = answer_of(await harness.ask("summarise the long document", cache_control="no-store"))
    assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 80_000
    # 20k uncached at $3 + 80k cached at $0.30 + 500 output at $15 + 1,500 reasoning at $60
    expected = 0.06 + 0.024 + 0.0075 + 0.09
    assert float(headers["x-gateway-cost-usd"]) == pytest.approx(expected)
    assert round(float(headers["x-gateway-cost-usd"]), 2) == 0.18


async def test_a_cache_hit_is_priced_on_the_tokens_split_of_the_answer_it_replays(make_harness: MakeHarness) -> None:
    """The hit's baseline is the miss's (cached prompt and reasoning tokens priced as they were):
    a hit saves what the answer cost, not more (savings ran 39 % over the cost)."""
    from datetime import UTC, datetime

    policy = POLICY.replace(
        "small: {base_url: \"http://small.test/v1\", price: {input: 0.5, output: 1.5}, tier: small}",
        "small: {base_url: \"http://small.test/v1\", price: {input: 3, output: 15, cached_input: 0.3, reasoning: 60}, tier: small}",
    ).replace("fast: {model: small", "fast: {baseline: small, model: small")  # fmt: skip
    harness = await make_harness(policy)
    harness.upstream.usage = {
        "prompt_tokens": 1_000, "completion_tokens": 200, "total_tokens": 1_200,
        "prompt_tokens_details": {"cached_tokens": 800}, "completion_tokens_details": {"reasoning_tokens": 150},
    }  # fmt: skip
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    async def usage() -> tuple[float, float, float]:
        await harness.limiter.drain()
        await harness.limiter.ledger.flush()
        totals = await harness.limiter.ledger.read([("alice", "team-a")], today, today)
        assert totals is not None
        figures = totals["alice", "team-a"]
        return figures.cost_usd, figures.baseline_cost_usd, figures.cache_saved_usd

    missed = answer_of(await harness.ask("the long document again", temperature=0))
    await asyncio.sleep(0.05)
    cost, baseline_after_miss, _ = await usage()
    hit = answer_of(await harness.ask("the long document again", temperature=0))
    assert (missed[2]["x-gateway-cache"], hit[2]["x-gateway-cache"]) == ("miss", "exact")
    await asyncio.sleep(0.05)
    _, baseline_after_hit, saved = await usage()
    assert baseline_after_hit - baseline_after_miss == pytest.approx(baseline_after_miss)  # the same baseline
    assert saved == pytest.approx(cost)
    assert hit[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 800


def test_a_cache_hit_keeps_the_hour_long_writes_of_the_answer_it_replays() -> None:
    """t44: a hit said all its writes were 5-minute ones, and its baseline fell below its savings."""
    from gateway.cache.entries import CachedAnswer
    from gateway.core.model import Answer

    entry = CachedAnswer(answer=Answer(id="", model="m", text="hi"), model="m", provider="anthropic",
                         prompt_tokens=1_000, completion_tokens=5, cost_usd=0.01, created_at=0.0,
                         cache_write_tokens=1_000, cache_write_1h_tokens=600)  # fmt: skip
    decoded = CachedAnswer.decode(entry.encode())
    assert decoded is not None
    usage = decoded.served_as("msg_1").usage
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1_000, 600)


_OPUS = Price(input_per_mtok=5.0, output_per_mtok=25.0, cache_write_per_mtok=6.25, speed_multipliers={"fast": 6.0},
              inference_geo_multipliers={"us": 1.1}, server_tools_per_1k={"web_search": 10.0, "web_fetch": 0.0})  # fmt: skip


def test_fast_mode_and_us_inference_multiply_every_token_price_one_on_the_other() -> None:
    """t59: fast mode (6x) and US-only inference (1.1x) were billed at the base price; both
    multiply cache writes too, as Anthropic stacks its modifiers."""
    base = cost_usd(_OPUS, 1_000_000, 100_000, cache_write_tokens=200_000)
    assert base == pytest.approx(0.8 * 5 + 0.2 * 6.25 + 0.1 * 25)
    assert cost_usd(_OPUS, 1_000_000, 100_000, cache_write_tokens=200_000, speed="fast") == pytest.approx(base * 6)
    both = cost_usd(_OPUS, 1_000_000, 100_000, cache_write_tokens=200_000, speed="fast", inference_geo="us")
    assert both == pytest.approx(base * 6 * 1.1)
    assert cost_usd(_OPUS, 1_000_000, 100_000, cache_write_tokens=200_000, speed="standard") == base


def test_server_tools_add_their_fee_per_use_outside_the_multipliers() -> None:
    uses = {"web_search": 3, "web_fetch": 2}
    assert cost_usd(_OPUS, 0, 0, server_tool_requests=uses) == pytest.approx(0.03)  # $10 per 1,000; fetch free
    fast = cost_usd(_OPUS, 1_000_000, 0, speed="fast", server_tool_requests=uses)
    assert fast == pytest.approx(5 * 6 + 0.03)


def test_options_a_price_does_not_set_are_named_with_their_field() -> None:
    asked = PricedOptions(speed="fast", inference_geo="us", server_tools={"web_search": 5})
    plain = Price(input_per_mtok=3.0, output_per_mtok=15.0)
    assert [(one.param, one.field) for one in unpriced(plain, asked)] == [
        ("speed", "speed.fast"), ("inference_geo", "inference_geo.us"), ("tools", "server_tools.web_search")
    ]  # fmt: skip
    assert unpriced(_OPUS, asked) == []
    assert unpriced(plain, PricedOptions(speed="standard", inference_geo="global")) == []  # the base price's own


def test_audio_tokens_have_their_own_prices_and_unset_ones_are_named() -> None:
    """t150: gpt-4o-audio's audio tokens ($40 in, $80 out) were billed at its text prices ($2.5, $10)."""
    voice = Price(input_per_mtok=2.5, output_per_mtok=10.0, audio_input_per_mtok=40.0, audio_output_per_mtok=80.0)
    cost = cost_usd(voice, 1_000_000, 100_000, audio_prompt_tokens=400_000, audio_completion_tokens=60_000)
    assert cost == pytest.approx(0.6 * 2.5 + 0.4 * 40 + 0.04 * 10 + 0.06 * 80)
    plain = Price(input_per_mtok=2.5, output_per_mtok=10.0)
    assert cost_usd(plain, 1_000_000, 100_000, audio_prompt_tokens=400_000) == pytest.approx(2.5 + 1)
    asked = PricedOptions(audio_input="messages", audio_output="audio", web_search_options=True)
    assert [(one.param, one.field) for one in unpriced(plain, asked)] == [
        ("messages", "audio_input"), ("audio", "audio_output"), ("web_search_options", "server_tools.web_search")
    ]  # fmt: skip
    assert unpriced(msgspec.structs.replace(voice, server_tools_per_1k={"web_search": 25.0}), asked) == []
    assert asked.tool_uses() == {"web_search": 1}


def test_only_option_names_are_read_from_usage() -> None:
    """A tier or speed an upstream echoes from the client's text is neither priced nor logged:
    it would be a free-text group on the cost dashboards."""
    from gateway.pricing import option_name
    from gateway.protocols import openai_chat

    assert option_name("priority") == "priority" and option_name("standard_only") == "standard_only"
    for given in ("x" * 300, "Priority", "pri ority", "", None, 3):
        assert option_name(given) is None
    usage = openai_chat.read_usage({"prompt_tokens": 1, "completion_tokens": 1}, service_tier="<b>x</b>")
    assert usage is not None and usage.service_tier is None
