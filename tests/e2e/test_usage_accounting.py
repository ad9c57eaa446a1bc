"""Usage figures round-trip through Redis exactly, on both paths: the settle script (keys with
limits) and the in-memory buffer flushed in batches (keys without)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import USAGE_FIELDS, UsageFigures
from gateway.auth import Principal
from gateway.config.loader import load_policy_text
from gateway.config.schema import Limits
from gateway.limits import Limiter
from gateway.services.redis_server import EmbeddedRedis
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect

_POLICY = """
pair: {small: s, large: l}
models:
  s: {base_url: "http://127.0.0.1:9", price: {input: 1, output: 1}, tier: small}
  l: {base_url: "http://127.0.0.1:9", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: s}}
auth: {mode: none}
"""


@pytest.mark.parametrize("limited", [True, False], ids=["settle-script", "batched-buffer"])
async def test_usage_figures_round_trip_exactly(redis_server: EmbeddedRedis, limited: bool) -> None:
    policy = load_policy_text(_POLICY, environ={}).policy
    limits = Limits(usd_per_day=100.0) if limited else Limits()
    principal = Principal(
        key_id=f"acct-{limited}-{datetime.now(UTC).timestamp()}", tenant="acct", allowed=frozenset({"*"}), limits=limits
    )
    shared = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics())
    counters = RedisLimitCounters(shared)
    limiter = Limiter(counters, UsageLedger(counters))
    used = [
        UsageFigures(requests=1, prompt_tokens=120, completion_tokens=30, cost_usd=0.00123, baseline_cost_usd=0.0099),
        UsageFigures(requests=1, prompt_tokens=80, cache_saved_usd=0.004, cache_hits=1, baseline_cost_usd=0.004),
        UsageFigures(requests=1, errors=1),
    ]
    for figures in used:
        reservation = await limiter.reserve(policy, principal, 200, 0.002)
        assert bool(reservation.scopes) is limited
        await limiter.settle(policy, reservation, figures)
    await limiter.ledger.flush()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = await limiter.ledger.read([(principal.key_id, principal.tenant)], today, today)
    assert totals is not None
    got = totals[principal.key_id, principal.tenant]
    assert (got.requests, got.prompt_tokens, got.completion_tokens, got.cache_hits, got.errors) == (3, 200, 30, 1, 1)
    assert got.cost_usd == pytest.approx(0.00123)
    assert got.baseline_cost_usd == pytest.approx(0.0139)
    assert got.cache_saved_usd == pytest.approx(0.004)
    # The key is in the day's usage index: an admin's /v1/usage lists it once the policy no longer does.
    assert (principal.key_id, "acct") in (await limiter.ledger.indexed_keys(today, today) or [])
    await limiter.aclose()
    await shared.aclose()


def test_adding_figures_covers_every_field() -> None:
    """add() names the fields one by one (it is on every request): it must not miss one."""
    import msgspec

    ones = UsageFigures(**{field.name: field.type(1) for field in msgspec.structs.fields(UsageFigures)})
    total = UsageFigures()
    total.add(ones)
    total.add(ones)
    assert msgspec.structs.asdict(total) == {name: 2 * value for name, value in msgspec.structs.asdict(ones).items()}


def test_reported_dollars_carry_no_float_noise() -> None:
    """Finance reads ``savings_usd`` 0 as 0, not -2.8e-17 (an outside tester's find)."""
    figures = UsageFigures(requests=3, cost_usd=0.1, baseline_cost_usd=0.3)
    figures.add(UsageFigures(cost_usd=0.2, cache_saved_usd=0.1 + 0.2))
    assert figures.baseline_cost_usd - figures.cost_usd != 0  # what summing floats leaves
    reported = figures.as_reported()
    assert reported["savings_usd"] == 0 and reported["cost_usd"] == 0.3 and reported["cache_saved_usd"] == 0.3
    assert reported["requests"] == 3 and set(reported) == {*USAGE_FIELDS, "savings_usd"}
