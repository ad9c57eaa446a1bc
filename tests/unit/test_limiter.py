"""The limiter on the memory store: what is refused, how it is told, and failing open or closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import pytest

from gateway.accounting.ledger import UsageLedger, usage_keys
from gateway.accounting.usage import UsageFigures
from gateway.auth import Principal
from gateway.config.loader import load_policy_text
from gateway.config.schema import Limits, Policy
from gateway.errors import BudgetExceededError, LimiterUnavailableError, RateLimitError
from gateway.limits import Limiter
from gateway.store import keyspace
from gateway.store.base import ReserveOutcome, ReserveRequest, SettleRequest, Spent, StoreTimedOut, StoreUnavailable
from gateway.store.memory import MemoryLimitCounters

_POLICY = """
pair: {small: s, large: l}
models:
  s: {base_url: "http://s.test/v1", price: {input: 1, output: 1}, tier: small}
  l: {base_url: "http://l.test/v1", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: s}}
auth: {mode: none}
tenants:
  team: {limits: {usd_per_month: 1.0}}
limits: {on_redis_error: %s}
"""


def _setup(on_error: str = "open") -> tuple[Policy, Limiter, MemoryLimitCounters]:
    policy = load_policy_text(_POLICY % on_error, environ={}).policy
    counters = MemoryLimitCounters()
    return policy, Limiter(counters, UsageLedger(counters)), counters


def _principal(**limits: float) -> Principal:
    return Principal("app", "team", frozenset({"*"}), Limits(**limits))  # type: ignore[arg-type]


async def test_the_rate_limit_names_the_limit_and_when_to_retry() -> None:
    policy, limiter, _ = _setup()
    principal = _principal(rpm=1)
    await limiter.reserve(policy, principal, 10, 0.0)
    with pytest.raises(RateLimitError) as refused:
        await limiter.reserve(policy, principal, 10, 0.0)
    assert "key 'app' allows 1 requests per minute (key.rpm)" in refused.value.message
    assert 1 <= float(refused.value.headers["retry-after"]) <= 120  # until the one request slides out of the window


async def test_the_tenants_budget_binds_every_key_of_the_tenant() -> None:
    policy, limiter, _ = _setup()
    await limiter.settle(policy, await limiter.reserve(policy, _principal(), 10, 0.7), UsageFigures(cost_usd=0.7))
    with pytest.raises(BudgetExceededError) as refused:
        await limiter.reserve(policy, Principal("other", "team", frozenset({"*"}), Limits()), 10, 0.5)
    assert "tenant 'team' may spend $1.00, $0.7000 is spent" in refused.value.message
    assert "(tenant.usd_per_month)" in refused.value.message
    assert int(refused.value.headers["retry-after"]) >= 1


async def test_the_budget_share_spent_is_reported_for_downgrades() -> None:
    policy, limiter, _ = _setup()
    await limiter.reserve(policy, _principal(), 10, 0.25)
    reservation = await limiter.reserve(policy, _principal(), 10, 0.25)
    assert reservation.budget_share == pytest.approx(0.25)


async def test_settling_gives_back_what_the_estimate_overstated() -> None:
    policy, limiter, _ = _setup()
    reservation = await limiter.reserve(policy, _principal(), 1000, 0.9)
    await limiter.settle(policy, reservation, UsageFigures(requests=1, prompt_tokens=10, cost_usd=0.1))
    await limiter.reserve(policy, _principal(), 10, 0.85)  # 0.1 + 0.85 fits in 1.0


async def test_an_unreachable_store_fails_open_or_closed_by_policy() -> None:
    policy, limiter, counters = _setup("open")
    counters.down = True
    reservation = await limiter.reserve(policy, _principal(rpm=1), 10, 0.0)
    assert reservation.scopes == ()
    policy, limiter, counters = _setup("closed")
    counters.down = True
    with pytest.raises(LimiterUnavailableError):
        await limiter.reserve(policy, _principal(rpm=1), 10, 0.0)


class _Stalling(MemoryLimitCounters):
    """Answers until ``stalled``; then every call times out, as a Redis slower than ``redis_timeout_ms``."""

    stalled = False
    settlements_too = False

    async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
        if self.stalled:
            raise StoreTimedOut
        return await super().reserve(request, timeout_s)

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        if self.stalled and self.settlements_too:
            raise StoreUnavailable  # marked down: not asked
        await super().settle(request, timeout_s)


async def _a_dollar_a_day_with_nothing_spent(counters: _Stalling) -> tuple[Policy, Limiter, Principal]:
    """A key with a $1.00 daily budget, and the store's word on it: $0.01 spent, nothing in flight."""
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    limiter = Limiter(counters, UsageLedger(counters))
    principal = Principal("app", "other", frozenset({"*"}), Limits(usd_per_day=1.0))
    first = await limiter.reserve(policy, principal, 10, 0.01)
    await limiter.settle(policy, first, UsageFigures(requests=1, cost_usd=0.01))
    return policy, limiter, principal


async def test_a_stalled_store_leaves_budgets_to_its_last_word_and_what_was_let_through_since() -> None:
    """Found by an outside tester: on a busy host every check of a wave ran past the 100 ms
    deadline, and a spent budget let them all through (27 % over) with no downgrade."""
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    counters = _Stalling()
    limiter = Limiter(counters, UsageLedger(counters))
    fresh = await limiter.reserve(policy, _principal(), 10, 0.5)  # the store's word: 0.5 of $1.00 spent
    limiter.settle_later(policy, fresh, UsageFigures(requests=1, cost_usd=0.5))
    await limiter.drain()
    counters.stalled = True
    let_through = await limiter.reserve(policy, _principal(), 10, 0.3)
    assert let_through.budget_share == pytest.approx(0.5)  # a downgrade still sees the spend
    with pytest.raises(RateLimitError) as refused:
        await limiter.reserve(policy, _principal(), 10, 0.3)  # 0.5 + 0.3 let through + 0.3 > 1.00
    # the $0.30 let through is still in flight: a short wait, as with the store's word (t157)
    assert "$0.5000 is spent and $0.3000 is reserved for requests still running" in refused.value.message
    assert "(tenant.usd_per_month)" in refused.value.message and refused.value.headers["retry-after"] == "5"
    assert (await limiter.reserve(policy, _principal(), 10, 0.15)).budget_share == pytest.approx(0.8)
    counters.stalled = False
    with pytest.raises(BudgetExceededError):
        await limiter.reserve(policy, _principal(), 10, 0.6)  # the store refuses, and says $0.50 is spent
    counters.stalled = True
    # a refusal of a large request leaves room for small ones (a tester saw them all refused); the
    # $0.45 let through in the stall, not yet settled, still counts beside the store's word (t39)
    assert (await limiter.reserve(policy, _principal(), 10, 0.01)).budget_share == pytest.approx(0.95)
    # the tenant's word is every key's: another key of the tenant, never seen, is held to it
    other_key = Principal("other", "team", frozenset({"*"}), Limits())
    with pytest.raises(BudgetExceededError) as tenant_refused:
        await limiter.reserve(policy, other_key, 10, 0.6)
    assert "(tenant.usd_per_month)" in tenant_refused.value.message
    await limiter.aclose()


async def test_in_a_stall_what_requests_cost_replaces_their_estimates(monkeypatch: pytest.MonkeyPatch) -> None:
    """t19: one request at a time, each writing more than estimated, took a $1.00 budget to $4.65:
    only estimates counted while settlements could not land. And a new UTC day went unchecked."""
    monkeypatch.setattr("gateway.limits.limiter._SETTLE_RETRIES_S", (0.0,))  # no minute of retries here
    monkeypatch.setattr("gateway.limits.limiter._DOWN_SETTLE_FOR_S", 0.0)  # nor the hour a down store gets
    counters = _Stalling()
    policy, limiter, principal = await _a_dollar_a_day_with_nothing_spent(counters)
    counters.stalled = counters.settlements_too = True
    for _ in range(2):
        reservation = await limiter.reserve(policy, principal, 10, 0.1)  # estimated at $0.10 ...
        await limiter.settle(policy, reservation, UsageFigures(requests=1, cost_usd=0.45))  # ... cost $0.45
    with pytest.raises(BudgetExceededError):
        await limiter.reserve(policy, principal, 10, 0.1)  # 0.01 + 0.45 + 0.45 + 0.1 > 1.00
    tomorrow = time.time() + 86400
    monkeypatch.setattr("gateway.limits.limiter.time.time", lambda: tomorrow)
    assert (await limiter.reserve(policy, principal, 10, 0.05)).budget_share == 0.0  # nothing known spent
    with pytest.raises(LimiterUnavailableError):  # a day the store said nothing of: a tenth of the budget
        await limiter.reserve(policy, principal, 10, 0.06)
    await limiter.aclose()


async def test_with_redis_marked_down_what_requests_cost_replaces_their_estimates() -> None:
    """t23: once Redis was marked down a reservation had no scopes, its settlement went straight
    to the ledger, and only estimates counted in the view: $5.45 of a $1.00 budget."""
    policy, limiter, counters = _setup("open")
    principal = _principal()  # tenant team: usd_per_month 1.0
    first = await limiter.reserve(policy, principal, 10, 0.05)
    await limiter.settle(policy, first, UsageFigures(requests=1, cost_usd=0.05))
    counters.down = True
    let_through = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(20):
            reservation = await limiter.reserve(policy, principal, 10, 0.05)
            limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.3))
            let_through += 1
    assert let_through == 4  # 0.05 + 3 x 0.30 + 0.05 fits; then 1.25 is spent
    counters.down = False  # back before the shutdown, which would otherwise try its 10 s for it (t74)
    await limiter.aclose()


async def test_with_redis_marked_down_a_request_that_spends_a_budget_exactly_passes() -> None:
    """t114: 0.2 + 0.1 > 0.3 in floats refused the third $0.10 request of a $0.30 budget."""
    policy, limiter, counters = _setup("open")
    principal = _principal(usd_per_day=0.3)
    first = await limiter.reserve(policy, principal, 10, 0.1)  # the store's word: nothing spent before it
    await limiter.settle(policy, first, UsageFigures(requests=1, cost_usd=0.1))
    counters.down = True
    for _ in range(2):
        limiter.settle_later(policy, await limiter.reserve(policy, principal, 10, 0.1), UsageFigures(cost_usd=0.1))
    with pytest.raises(BudgetExceededError) as refused:
        await limiter.reserve(policy, principal, 10, 0.1)
    assert "(key.usd_per_day)" in refused.value.message
    counters.down = False
    await limiter.aclose()


async def test_with_redis_down_a_budget_held_by_requests_in_flight_is_a_short_wait() -> None:
    """t157: the estimates of requests in flight were told as spent, until midnight, with
    ``x-should-retry: false``; a worker's view, while Redis is away, tells them apart as Redis does."""
    policy, limiter, counters = _setup("open")
    principal = _principal(usd_per_day=1.0)
    first = await limiter.reserve(policy, principal, 10, 0.1)  # the store's word: $0.10 spent
    await limiter.settle(policy, first, UsageFigures(requests=1, cost_usd=0.1))
    counters.down = True
    in_flight = [await limiter.reserve(policy, principal, 10, 0.4) for _ in range(2)]
    with pytest.raises(RateLimitError) as held:
        await limiter.reserve(policy, principal, 10, 0.4)
    assert "$0.1000 is spent and $0.8000 is reserved for requests still running" in held.value.message
    assert held.value.headers["retry-after"] == "5" and "x-should-retry" not in held.value.headers
    for reservation in in_flight:
        limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.4))
    with pytest.raises(BudgetExceededError) as spent:  # now spent: 0.1 + 2 x 0.4 + 0.4 > 1.00
        await limiter.reserve(policy, principal, 10, 0.4)
    assert (
        "$0.9000 is spent, $0.1000 is left" in spent.value.message and spent.value.headers["x-should-retry"] == "false"
    )
    await limiter.reserve(policy, principal, 10, 0.1)  # what is left still passes
    counters.down = False
    await limiter.aclose()


class _Hanging(_Stalling):
    """Stalled settlements hang (a paused Redis: the call waits out its deadline) rather than fail."""

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        if self.stalled:
            await asyncio.sleep(3600)
        await super().settle(request, timeout_s)


async def _hanging_settlements(
    requests: int, *, estimate: float, cost: float, counters: _Hanging | None = None
) -> tuple[Policy, Limiter, Principal]:
    """The $1.00-a-day key, then ``requests`` let through in a stall, each estimated at ``estimate``
    and costing ``cost``, their settlements hanging."""
    counters = counters or _Hanging()
    policy, limiter, principal = await _a_dollar_a_day_with_nothing_spent(counters)
    counters.stalled = True
    for _ in range(requests):
        reservation = await limiter.reserve(policy, principal, 10, estimate)
        limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=cost))
        await asyncio.sleep(0)  # the settlement starts, and hangs
    return policy, limiter, principal


async def test_a_settlement_still_waiting_counts_what_the_request_cost() -> None:
    """t24: against a paused Redis a settlement waits seconds before it fails, and until then only
    estimates counted: sequential requests spent $3.41 of a $1.00 budget."""
    policy, limiter, principal = await _hanging_settlements(2, estimate=0.06, cost=0.31)
    assert (await limiter.reserve(policy, principal, 10, 0.06)).budget_share == pytest.approx(0.63)
    with pytest.raises(BudgetExceededError):  # 0.01 + 2 x 0.31 + 0.06 + 0.4 > 1.00
        await limiter.reserve(policy, principal, 10, 0.4)
    for task in limiter._settling:
        task.cancel()


async def test_a_refusal_in_a_stall_gives_nothing_back_to_the_view() -> None:
    """t31: a request the view refused while the store did not answer was settled at $0, which took
    an estimate the view never counted off it: every refusal let the next request through ($8.99 of $1.00)."""
    counters = _Stalling()
    policy, limiter, principal = await _a_dollar_a_day_with_nothing_spent(counters)
    counters.stalled = True
    passed = refused = 0
    for _ in range(12):  # a client that retries its 429s
        try:
            reservation = await limiter.reserve(policy, principal, 10, 0.3)
        except BudgetExceededError:
            refused += 1
        else:
            passed += 1
            limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.3))
        await asyncio.sleep(0)
    assert passed == 3 and refused == 9  # 0.01 + 3 x 0.30 fits; nothing after it
    for task in limiter._settling:
        task.cancel()


async def test_spend_held_while_the_store_was_away_counts_against_its_next_word() -> None:
    """t24: the first reservation the store answered after an outage took its word, which lacked
    what was spent meanwhile (still in the usage batch): one worker spent a $1.00 budget twice."""
    policy, limiter, counters = _setup("open")
    principal = _principal()  # tenant team: usd_per_month 1.0
    first = await limiter.reserve(policy, principal, 10, 0.05)
    await limiter.settle(policy, first, UsageFigures(requests=1, cost_usd=0.05))
    counters.down = True
    with pytest.raises(BudgetExceededError):
        for _ in range(20):
            reservation = await limiter.reserve(policy, principal, 10, 0.05)
            limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.3))
    counters.down = False  # back, before the usage batch with the outage's 4 x $0.30 is written
    with pytest.raises(BudgetExceededError) as refused:
        await limiter.reserve(policy, principal, 10, 0.01)  # the store says $0.05; with what is held, $1.25
    assert "$1.2500 is spent" in refused.value.message and "(tenant.usd_per_month)" in refused.value.message
    await limiter.drain()
    await limiter.ledger.flush()  # the batch lands: the store's word has it, and nothing is held
    with pytest.raises(BudgetExceededError) as still:
        await limiter.reserve(policy, principal, 10, 0.01)
    assert "$1.2500 is spent" in still.value.message
    await limiter.aclose()


async def test_reservations_that_never_arrived_count_against_the_stores_first_word_after_a_stall() -> None:
    """t39: reservations that timed out before they were sent were let through by the view, but
    the store's first word after the stall lacked them, and replaced the view: 20 requests passed
    the budget in the 250 ms before their settlements landed."""
    counters = _Hanging()  # reservations time out unsent; settlements hang until the store is back
    policy, limiter, principal = await _hanging_settlements(3, estimate=0.1, cost=0.25, counters=counters)
    counters.stalled = False  # back: its word is $0.01, the three costs not yet settled
    with pytest.raises(BudgetExceededError) as refused:
        await limiter.reserve(policy, principal, 10, 0.3)  # 0.01 + 3 x 0.25 + 0.3 > 1.00
    assert "$0.7600 is spent" in refused.value.message
    for _ in range(3):
        await asyncio.sleep(0)  # the refused reservation's cancellation lands
    await limiter.reserve(policy, principal, 10, 0.2)  # 0.01 + 0.75 + 0.2 fits
    for task in limiter._settling:
        task.cancel()


async def test_with_no_word_from_the_store_yet_a_stall_lets_a_tenth_of_a_budget_through() -> None:
    """Another worker served the tenant, this one never heard of it: its whole budget was open to
    each worker (a tester's two workers spent $3.30 of $1.00)."""
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    counters = _Stalling()
    counters.stalled = True
    limiter = Limiter(counters, UsageLedger(counters))
    assert (await limiter.reserve(policy, _principal(), 10, 0.06)).budget_share == 0.0  # no downgrade for it
    with pytest.raises(LimiterUnavailableError) as refused:  # 0.06 + 0.06 > a tenth of 1.00: unchecked, not spent
        await limiter.reserve(policy, _principal(), 10, 0.06)
    assert refused.value.message == (
        "monthly budget cannot be checked while Redis is unreachable: this worker's allowance for tenant 'team' "
        "meanwhile is $0.10 of its $1.00, $0.0600 was let through and this request may cost up to $0.0600 "
        "(tenant.usd_per_month); retry shortly"
    )
    assert refused.value.headers == {"retry-after": "5"}  # soon, and no x-should-retry: false
    unlimited = Principal("free", "other", frozenset({"*"}), Limits())
    assert (await limiter.reserve(policy, unlimited, 10, 50.0)).budget_share == 0.0  # no budget: open
    await limiter.aclose()


async def test_usage_without_limits_is_batched_and_read_back_per_key() -> None:
    from datetime import UTC, datetime

    policy = load_policy_text(
        (_POLICY % "open").replace("team: {limits: {usd_per_month: 1.0}}", "team: {}"), environ={}
    ).policy
    counters = MemoryLimitCounters()
    limiter = Limiter(counters, UsageLedger(counters))
    for key_id in ("a", "a", "b"):
        principal = Principal(key_id, "team", frozenset({"*"}), Limits())
        reservation = await limiter.reserve(policy, principal, 10, 0.0)
        assert reservation.scopes == ()
        await limiter.settle(policy, reservation, UsageFigures(requests=1, cost_usd=0.5))
    assert counters.usage == {}  # nothing written per request
    await limiter.ledger.flush()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = await limiter.ledger.read([("a", "team"), ("b", "team")], today, today)
    assert totals is not None
    assert (totals["a", "team"].requests, totals["b", "team"].requests) == (2, 1)
    assert totals["a", "team"].cost_usd == pytest.approx(1.0)
    await limiter.aclose()


async def test_a_request_counts_on_the_day_it_started_and_its_rates_in_the_present_minute() -> None:
    """t114: the request's start (its log line's ``started_at``) picks the day and month of its
    usage and budgets, as ``gateway report`` files it; a request begun before midnight is
    yesterday's, and today's budget is untouched by it."""
    policy, limiter, _ = _setup()
    principal = Principal("app", "solo", frozenset({"*"}), Limits(usd_per_day=1.0, rpm=2))  # no tenant budget
    minute = int(time.time() // 60)
    before_midnight = time.time() // 86400 * 86400 - 0.5
    yesterday = await limiter.reserve(policy, principal, 10, 0.9, at=before_midnight)
    assert yesterday.periods[1:] == _days_of(before_midnight)
    assert minute <= yesterday.periods[0] <= int(time.time() // 60)
    assert yesterday.usage == usage_keys("solo", "app", before_midnight)
    await limiter.settle(policy, yesterday, UsageFigures(requests=1, cost_usd=0.9))
    await limiter.reserve(policy, principal, 10, 0.9)  # today's budget is its own
    with pytest.raises(RateLimitError):  # the rates are the present minute's, whenever the request began
        await limiter.reserve(policy, principal, 10, 0.0, at=before_midnight)
    other = Principal("other", "solo", frozenset({"*"}), Limits(usd_per_day=1.0))
    await limiter.settle(
        policy, await limiter.reserve(policy, other, 10, 0.9, at=before_midnight), UsageFigures(cost_usd=0.9)
    )
    with pytest.raises(BudgetExceededError) as refused:  # yesterday's budget: it ended half a second after
        await limiter.reserve(policy, other, 10, 0.2, at=before_midnight)
    assert refused.value.headers["retry-after"] == "1"
    await limiter.aclose()


def _days_of(at: float) -> tuple[str, str]:
    stamp = time.gmtime(at)
    return time.strftime("%Y%m%d", stamp), time.strftime("%Y%m", stamp)


async def test_a_budget_set_later_starts_from_what_was_spent_without_one() -> None:
    # finance sees a key spend too much and gives it a budget: what it spent today counts
    policy = load_policy_text(
        (_POLICY % "open").replace("team: {limits: {usd_per_month: 1.0}}", "team: {}"), environ={}
    ).policy
    counters = MemoryLimitCounters()
    limiter = Limiter(counters, UsageLedger(counters))
    unlimited = Principal("app", "team", frozenset({"*"}), Limits())
    for _ in range(3):
        reservation = await limiter.reserve(policy, unlimited, 10, 0.0)
        assert reservation.scopes == ()
        limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.25))
    await limiter.ledger.flush()
    with pytest.raises(BudgetExceededError) as refused:
        await limiter.reserve(policy, _principal(usd_per_day=1.0), 10, 0.3)
    assert "$0.7500 is spent" in refused.value.message
    await limiter.reserve(policy, _principal(usd_per_day=1.0), 10, 0.2)
    await limiter.aclose()


class _PausingCounters(MemoryLimitCounters):
    """A store that pauses 0.5 s (a fork for a snapshot): a call given less times out, as SharedRedis's would."""

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        if timeout_s < 0.5:
            raise StoreTimedOut
        await super().settle(request, timeout_s)

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        if timeout_s < 0.5:
            raise StoreTimedOut
        await super().add_usage(sums, expired, spent, timeout_s, batch)


async def test_usage_outlasts_a_store_pause_longer_than_a_limit_checks_deadline() -> None:
    # redis_timeout_ms (100 by default) bounds limit checks on the request's path; the usage
    # written after it is not sent again once timed out, so it is given longer
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    assert policy.limits.redis_timeout_ms < 500
    counters = _PausingCounters()
    limiter = Limiter(counters, UsageLedger(counters))
    for principal in (_principal(usd_per_day=1.0), Principal("free", "other", frozenset({"*"}), Limits())):
        reservation = await limiter.reserve(policy, principal, 10, 0.1)
        limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.05))
    await limiter.aclose()
    assert sorted(figures.requests for figures in counters.usage.values()) == [1, 1, 1, 1]


class _NeverArrives(MemoryLimitCounters):
    """Reservations time out before they reach the store (a connection still opening)."""

    async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
        raise StoreTimedOut


class _AnswerLost(MemoryLimitCounters):
    """The first settlement is applied, but its answer does not come in time."""

    settled = 0

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        await super().settle(request, timeout_s)
        self.settled += 1
        if self.settled == 1:
            raise StoreTimedOut


async def test_a_reservation_that_never_arrived_is_settled_at_the_whole_cost() -> None:
    # Settled as a correction (actual - estimate), it drove the spend counter below zero under
    # short Redis pauses, and an outside tester's key overspent its daily budget by 30-40 %
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    counters = _NeverArrives()
    limiter = Limiter(counters, UsageLedger(counters))
    principal = Principal("app", "other", frozenset({"*"}), Limits(usd_per_day=10.0))  # a tenth: room for it
    reservation = await limiter.reserve(policy, principal, 600, 0.6)
    assert reservation.scopes  # taken as made: it may have been
    limiter.settle_later(policy, reservation, UsageFigures(requests=1, prompt_tokens=10, cost_usd=0.05))
    await limiter.aclose()
    assert [spend.spent_day for spend in counters.spends.values()] == pytest.approx([0.05, 0.05])


async def test_a_settlement_sent_again_after_a_lost_answer_counts_once() -> None:
    policy = load_policy_text(_POLICY % "open", environ={}).policy
    counters = _AnswerLost()
    limiter = Limiter(counters, UsageLedger(counters))
    reservation = await limiter.reserve(policy, _principal(usd_per_day=1.0), 600, 0.6)
    limiter.settle_later(policy, reservation, UsageFigures(requests=1, prompt_tokens=10, cost_usd=0.05))
    await limiter.aclose()
    assert counters.settled == 2
    assert sorted(figures.requests for figures in counters.usage.values()) == [1, 1]
    assert [spend.spent_day for spend in counters.spends.values()] == pytest.approx([0.05, 0.05])


@pytest.mark.parametrize(
    ("start_s", "rpm", "then_s"), [(31.0, 3, 0.0), (5.0, 3, 0.0), (50.0, 10, 0.0), (2.0, 1, 0.0), (50.0, 3, 15.0)]
)
async def test_a_retry_at_retry_after_passes_and_one_before_it_does_not(
    monkeypatch: pytest.MonkeyPatch, start_s: float, rpm: int, then_s: float
) -> None:
    # The window slides: the previous minute still counts for a while after it turns, so
    # "when the minute turns" would send clients back into another 429.
    policy, limiter, _ = _setup()
    principal = _principal(rpm=rpm)
    clock = [60 * 29_000_000 + start_s]
    monkeypatch.setattr("gateway.limits.limiter.time.time", lambda: clock[0])
    for _ in range(rpm):
        await limiter.reserve(policy, principal, 10, 0.0)
    clock[0] += then_s  # 15 s: refused early in the next minute, while the last one's weight fades
    with pytest.raises(RateLimitError) as refused:
        await limiter.reserve(policy, principal, 10, 0.0)
    wait = int(refused.value.headers["retry-after"])
    clock[0] += wait - 2
    with pytest.raises(RateLimitError):
        await limiter.reserve(policy, principal, 10, 0.0)
    clock[0] += 2
    await limiter.reserve(policy, principal, 10, 0.0)


async def test_a_request_larger_than_the_minutes_tokens_is_refused_without_inviting_a_retry() -> None:
    policy, limiter, _ = _setup()
    with pytest.raises(RateLimitError) as refused:
        await limiter.reserve(policy, _principal(tpm=2000), 3000, 0.0)
    assert refused.value.headers == {"x-should-retry": "false"}
    assert "request too large: it counts 3000 tokens" in refused.value.message and "(key.tpm)" in refused.value.message


class _TimesOutOnce(MemoryLimitCounters):
    """The first usage batch times out, applied (its answer lost) or not (the stall came first)."""

    def __init__(self, applied: bool) -> None:
        super().__init__()
        self.applied, self.timed_out = applied, False

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        if not self.timed_out:
            self.timed_out = True
            if self.applied:
                await super().add_usage(sums, expired, spent, timeout_s, batch)
            raise StoreTimedOut
        await super().add_usage(sums, expired, spent, timeout_s, batch)


@pytest.mark.parametrize("applied", [True, False])
async def test_a_usage_batch_that_timed_out_is_sent_again_and_counted_once(applied: bool) -> None:
    """An outside tester's repeated 2 s Redis stalls lost 94 of 250 requests' usage without a
    word: a batch that timed out was dropped (sent again, it could have counted twice)."""
    from datetime import UTC, datetime

    counters = _TimesOutOnce(applied)
    ledger = UsageLedger(counters)
    keys = [("a", "t1"), ("b", "t2")]
    for key_id, tenant in keys:
        ledger.record(usage_keys(tenant, key_id, time.time()), UsageFigures(requests=1, cost_usd=0.5), 1.0)
    await ledger.flush()  # timed out: kept
    ledger.record(usage_keys("t1", "a", time.time()), UsageFigures(requests=1, cost_usd=0.5), 1.0)
    await ledger.flush()  # the lost batch again (its marks skip it), then the new one
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = await ledger.read(keys, today, today)
    assert totals is not None and [totals[k].requests for k in keys] == [2, 1]
    await ledger.aclose()


async def test_usage_made_while_the_store_is_down_is_written_when_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths: a key with limits (its settlement) and one without (the ledger's batch)."""
    import time
    from datetime import UTC, datetime

    from gateway.store.base import PENDING_S

    monkeypatch.setattr("gateway.limits.limiter._SETTLE_RETRIES_S", ())  # down past the settlement's retries
    monkeypatch.setattr("gateway.limits.limiter._DOWN_SETTLE_FOR_S", 0.0)
    policy, limiter, counters = _setup()
    limited, free = _principal(usd_per_day=10.0), Principal("free", "team", frozenset({"*"}))
    reservations = [await limiter.reserve(policy, principal, 10, 0.01) for principal in (limited, free)]
    counters.down = True
    for reservation in reservations:
        await limiter.settle(policy, reservation, UsageFigures(requests=1, prompt_tokens=10, cost_usd=0.002))
    await limiter.ledger.flush()  # fails: kept
    counters.down = False
    await limiter.ledger.flush()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    totals = await limiter.ledger.read([("app", "team"), ("free", "team")], today, today)
    assert totals is not None
    assert [(totals[key, "team"].requests, totals[key, "team"].prompt_tokens) for key in ("app", "free")] == [
        (1, 10),
        (1, 10),
    ]
    # the batch counts the cost; the estimate stands until the pending reservation is given back
    # (correcting it in the batch as well took it off twice: an outside tester's -$0.80 spend)
    key_spend = keyspace.limit_counters("team", "app")[1]
    assert counters.spends[key_spend].spent_day == pytest.approx(0.012)
    later = time.time() + PENDING_S + 60
    monkeypatch.setattr("gateway.limits.limiter.time.time", lambda: later)
    if datetime.fromtimestamp(later, UTC).date() == today.date():  # (not across midnight)
        await limiter.reserve(policy, limited, 10, 0.0)
        assert counters.spends[key_spend].spent_day == pytest.approx(0.002)


async def test_a_settlement_waits_for_a_store_that_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """t31: sent to the usage batch at once, a settlement left its estimate pending for an hour
    beside the whole cost ($0.86 counted of $0.03 spent), and requests within budget were refused."""
    monkeypatch.setattr("gateway.limits.limiter._SETTLE_RETRIES_S", (0.01,) * 3)
    monkeypatch.setattr("gateway.limits.limiter._DOWN_SETTLE_EVERY_S", 0.02)  # t34: down past the first minute
    policy, limiter, counters = _setup()
    principal = _principal(usd_per_day=1.0)
    reservation = await limiter.reserve(policy, principal, 10, 0.4)  # reserved: the store counts $0.40
    counters.down = True  # Redis killed while the request runs
    limiter.settle_later(policy, reservation, UsageFigures(requests=1, cost_usd=0.03))
    await asyncio.sleep(0.05)
    counters.down = False  # back a moment later
    await limiter.drain()
    key_spend = keyspace.limit_counters("team", "app")[1]
    assert counters.spends[key_spend].spent_day == pytest.approx(0.03)  # the cost, not the estimate beside it
    assert (await limiter.reserve(policy, principal, 10, 0.9)).budget_share == pytest.approx(0.03)
    await limiter.aclose()


async def test_a_reservation_a_stalled_store_applied_late_is_corrected_to_what_was_spent() -> None:
    """Redis that stalls past the deadline still applies the reservation when it wakes: taken as
    made, it is settled (a key was charged 55 times what it spent, then refused for the day)."""
    from gateway.store.base import StoreTimedOut

    class Stalled(MemoryLimitCounters):
        async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
            await super().reserve(request, timeout_s)  # applied ...
            raise StoreTimedOut  # ... but the answer came too late

    policy = load_policy_text(_POLICY % "open", environ={}).policy
    counters = Stalled()
    limiter = Limiter(counters, UsageLedger(counters))
    principal = Principal("app", "other", frozenset({"*"}), Limits(usd_per_day=10.0))
    reservation = await limiter.reserve(policy, principal, 1_000, 0.5)  # served: within a tenth of the budget
    await limiter.settle(policy, reservation, UsageFigures(requests=1, prompt_tokens=10, cost_usd=0.001))
    spent = [spend.spent_day for spend in counters.spends.values()]
    assert spent and all(abs(value - 0.001) < 1e-9 for value in spent)


async def test_token_counts_use_a_request_window_of_their_own_and_no_budget() -> None:
    policy, limiter, _ = _setup()
    principal = _principal(rpm=2, usd_per_day=0.0)
    await limiter.admit_count(policy, principal)
    await limiter.admit_count(policy, principal)
    with pytest.raises(RateLimitError) as refused:
        await limiter.admit_count(policy, principal)
    assert "(key.rpm)" in refused.value.message
    await limiter.reserve(policy, _principal(rpm=2), 10, 0.0)  # messages keep their own window
    await limiter.admit_count(policy, _principal(usd_per_day=0.0))  # no rpm: nothing to count against


async def test_feedback_has_a_request_window_of_its_own() -> None:
    """t88: feedback ignored the key's rpm (400 calls in 13 s on a key of 5 a minute), each
    holding a connection and reading Redis while it waits for its request's trace."""
    policy, limiter, _ = _setup()
    principal = _principal(rpm=1)
    await limiter.admit_count(policy, principal, "feedback")
    with pytest.raises(RateLimitError):
        await limiter.admit_count(policy, principal, "feedback")
    await limiter.admit_count(policy, principal)  # token counts keep their own window
    await limiter.reserve(policy, principal, 10, 0.0)  # and so do messages


async def test_token_counts_fail_open_or_closed_by_policy() -> None:
    policy, limiter, counters = _setup("open")
    counters.down = True
    await limiter.admit_count(policy, _principal(rpm=1))
    policy, limiter, counters = _setup("closed")
    counters.down = True
    with pytest.raises(LimiterUnavailableError):
        await limiter.admit_count(policy, _principal(rpm=1))


class _CountedUsage(MemoryLimitCounters):
    def __init__(self) -> None:
        super().__init__()
        self.usage_writes = 0

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        self.usage_writes += 1
        await super().add_usage(sums, expired, spent, timeout_s, batch)


async def test_with_no_store_configured_the_shutdown_does_not_wait_for_one() -> None:
    """No Redis at all: nothing held is ever written, so the close tries once, not for 10 s (t74)."""
    counters = _CountedUsage()
    counters.down = True
    ledger = UsageLedger(counters, store_configured=False)
    ledger.record(usage_keys("t", "a", time.time()), UsageFigures(requests=1, cost_usd=0.5), 1.0)
    await ledger.aclose()
    assert counters.usage_writes == 1


async def test_with_redis_down_a_request_begun_before_midnight_leaves_the_new_days_view_alone() -> None:
    """t193: with Redis down, a request begun before midnight that reserved after it took this
    process's view of the budget back a day, and the next request of the new day started from
    nothing: a spent $0.10 budget let two more requests through. The late one counts in its own
    day (the store files it there); the new day's view keeps what it knew."""
    policy, limiter, counters = _setup("open")
    principal = Principal("app", "solo", frozenset({"*"}), Limits(usd_per_day=1.0))  # no tenant budget
    before_midnight = time.time() // 86400 * 86400 - 0.5
    spent = await limiter.reserve(policy, principal, 10, 0.9)  # the store's word on today: $0.90 spent
    await limiter.settle(policy, spent, UsageFigures(requests=1, cost_usd=0.9))
    more = await limiter.reserve(policy, principal, 10, 0.05)
    await limiter.settle(policy, more, UsageFigures(requests=1, cost_usd=0.05))
    await limiter.reserve(policy, principal, 10, 0.0)  # the store's word, as this process keeps it: $0.95 of $1.00
    counters.down = True
    late = await limiter.reserve(policy, principal, 10, 0.05, at=before_midnight)  # yesterday's request
    assert late.periods[1:] == _days_of(before_midnight)
    with pytest.raises(BudgetExceededError):  # today's view still holds today's $0.95
        await limiter.reserve(policy, principal, 10, 0.1)
    counters.down = False
    await limiter.aclose()
