"""One contract for every store: the in-process one (unit tests' fake) and Redis 8 must agree.

Each test runs against both, so a unit test that passes on the fake says something
about production, and a new backend has a checklist.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageFigures
from gateway.services.redis_server import EmbeddedRedis, find_redis_server, start_embedded_redis
from gateway.store import keyspace
from gateway.store.base import (
    BOUNDED_ENTRY_BYTES,
    BOUNDED_EVICTIONS_AT_MOST,
    Caps,
    CounterScope,
    ReserveRequest,
    SettleRequest,
    Store,
    StoreTimedOut,
    StoreUnavailable,
)
from gateway.store.memory import memory_store
from gateway.store.redis import SharedRedis, connect, redis_store

T = 1.0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield memory_store()
        return
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    shared = SharedRedis(connect(server.url, timeout_s=2), Metrics())
    yield redis_store(shared)
    await shared.aclose()


def _tenant() -> str:
    return f"contract-{uuid.uuid4().hex[:8]}"


async def test_values_expire_and_leases_have_one_holder(store: Store) -> None:
    key = keyspace.exact(_tenant(), "abc")
    assert await store.kv.get(key, T) is None
    await store.kv.put(key, b"answer", 60, T)
    assert await store.kv.get(key, T) == b"answer"
    other = key + ":other"
    await store.kv.put(other, b"x", 60, T)
    assert await store.kv.delete(other, T) is True and await store.kv.get(other, T) is None
    assert await store.kv.delete(other, T) is False
    assert await store.kv.peek(key, T) == (b"answer", False)
    assert await store.kv.acquire(key, "one", 5_000, T)
    assert not await store.kv.acquire(key, "two", 5_000, T)
    assert (await store.kv.peek(key, T))[1] is True
    await store.kv.release(key, "two", T)  # not its lease: nothing happens
    assert (await store.kv.peek(key, T))[1] is True
    await store.kv.release(key, "one", T)
    assert (await store.kv.peek(key, T))[1] is False
    assert await store.kv.acquire(key, "two", 50, T)
    await asyncio.sleep(0.1)
    assert await store.kv.acquire(key, "three", 5_000, T)  # the abandoned lease ran out


async def test_a_leaders_answer_is_stored_and_its_lease_dropped_in_one_call(store: Store) -> None:
    key = keyspace.exact(_tenant(), "led")
    assert await store.kv.acquire(key, "leader", 5_000, T)
    await store.kv.put(key, b"first", 60, T, release="someone-else")  # not its lease: it stays
    assert await store.kv.peek(key, T) == (b"first", True)
    await store.kv.put(key, b"answer", 60, T, release="leader")
    assert await store.kv.peek(key, T) == (b"answer", False)
    assert await store.kv.acquire(key, "next", 5_000, T)


async def test_only_a_leases_holder_renews_it(store: Store) -> None:
    key = keyspace.exact(_tenant(), "renewed")
    assert await store.kv.acquire(key, "leader", 200, T)
    assert await store.kv.renew(key, "leader", 5_000, T)
    assert not await store.kv.renew(key, "someone-else", 5_000, T)
    await asyncio.sleep(0.3)
    assert (await store.kv.peek(key, T))[1] is True  # renewed past its first 200 ms
    await store.kv.release(key, "leader", T)
    assert not await store.kv.renew(key, "leader", 5_000, T)  # dropped: a late renewal brings nothing back
    assert (await store.kv.peek(key, T))[1] is False


async def test_the_nearest_vectors_come_first_with_cosine_similarity(store: Store) -> None:
    index = keyspace.semantic_index(_tenant(), "ns")
    assert await store.vectors.nearest(index, np.ones(4, dtype=np.float32), 4, T) == []
    vectors = {"east": [1, 0, 0, 0], "north": [0, 1, 0, 0], "north-east": [1, 1, 0, 0]}
    for name, vector in vectors.items():
        await store.vectors.add(index, name, np.array(vector, dtype=np.float32), name.encode(), 60, 10, T)
    found = await store.vectors.nearest(index, np.array([1, 0.1, 0, 0], dtype=np.float32), 2, T)
    assert [match.element for match in found] == ["east", "north-east"]
    assert found[0].similarity == pytest.approx(0.995, abs=0.01)
    assert found[1].similarity == pytest.approx(0.777, abs=0.01)
    assert await store.vectors.entries(index, ["north", "east", "west"], T) == [b"north", b"east", None]
    await store.vectors.remove(index, "north", T)
    assert await store.vectors.entries(index, ["north"], T) == [None]
    assert "north" not in [m.element for m in await store.vectors.nearest(index, np.array([0, 1, 0, 0]), 4, T)]


async def test_past_the_cap_the_oldest_elements_go(store: Store) -> None:
    index = keyspace.semantic_index(_tenant(), "capped")
    for i in range(5):
        vector = np.zeros(8, dtype=np.float32)
        vector[i] = 1
        await store.vectors.add(index, f"e{i}", vector, b"x", 60, 3, T)
        await asyncio.sleep(0.002)  # distinct insertion times
    names = {m.element for m in await store.vectors.nearest(index, np.ones(8, dtype=np.float32), 10, T)}
    assert names == {"e2", "e3", "e4"}
    assert await store.vectors.entries(index, ["e0", "e4"], T) == [None, b"x"]


async def test_entries_expire_even_while_their_vector_stays(store: Store) -> None:
    index = keyspace.semantic_index(_tenant(), "ttl")
    await store.vectors.add(index, "gone", np.ones(4, dtype=np.float32), b"x", 1, 10, T)
    await asyncio.sleep(1.1)
    assert await store.vectors.entries(index, ["gone"], T) == [None]


def _scopes(tenant: str, key: Caps, team: Caps) -> tuple[CounterScope, CounterScope]:
    window, spend, tenant_window, tenant_spend = keyspace.limit_counters(tenant, "k")
    return CounterScope(window, spend, key), CounterScope(tenant_window, tenant_spend, team)


def _ask(
    scopes: tuple[CounterScope, ...], tokens: int = 10, cost: float = 0.01, minute: int = 1000, fraction: float = 0.5
) -> ReserveRequest:
    return ReserveRequest(scopes, tokens, cost, minute, "20261130", "202611", fraction)


async def test_a_request_is_counted_only_if_every_scope_allows_it(store: Store) -> None:
    scopes = _scopes(_tenant(), Caps(rpm=3), Caps(rpm=2))
    assert (await store.counters.reserve(_ask(scopes), T)).refused_by is None
    assert (await store.counters.reserve(_ask(scopes), T)).refused_by is None
    by_tenant = await store.counters.reserve(_ask(scopes), T)
    assert by_tenant.refused_by == "1.rpm" and by_tenant.window == (2, 0)  # the tenant's cap, and its count
    # refused requests are not counted: the key has used 2 of its 3
    key_only = (CounterScope(scopes[0].window, scopes[0].spend, Caps(rpm=3)),)
    assert (await store.counters.reserve(_ask(key_only), T)).refused_by is None
    assert (await store.counters.reserve(_ask(key_only), T)).refused_by == "0.rpm"


async def test_a_reservation_of_a_request_counted_already_is_held_to_tokens_and_budgets_alone(store: Store) -> None:
    """f173: a request that gave its reservation back to wait on an identical one, and then calls
    upstream itself, reserves again: that reservation counts no request, and no ``rpm`` refuses it."""
    scopes = _scopes(_tenant(), Caps(rpm=1, tpm=100, usd_per_day=1.0), Caps(rpm=1))
    assert (await store.counters.reserve(_ask(scopes, tokens=20), T)).refused_by is None
    again = replace(_ask(scopes, tokens=20, cost=0.5), requests=0)
    assert (await store.counters.reserve(again, T)).refused_by is None  # at its rpm, and not refused
    refused = await store.counters.reserve(_ask(scopes), T)
    assert refused.refused_by == "0.rpm" and refused.window == (1, 0)  # the request counted once
    assert (await store.counters.reserve(replace(again, tokens=61), T)).refused_by == "0.tpm"  # 40 + 61 > 100
    over = await store.counters.reserve(replace(again, cost_usd=0.6), T)
    assert over.refused_by == "0.usd_per_day" and over.spent_usd == pytest.approx(0.51)


async def test_the_previous_minute_counts_for_what_is_left_of_it(store: Store) -> None:
    scopes = _scopes(_tenant(), Caps(tpm=100), Caps())
    assert (await store.counters.reserve(_ask(scopes, tokens=80, minute=1000), T)).refused_by is None
    # a quarter into the next minute, 3/4 of the previous 80 tokens still count: 60 + 50 > 100
    refused = await store.counters.reserve(_ask(scopes, tokens=50, minute=1001, fraction=0.25), T)
    assert refused.refused_by == "0.tpm" and refused.window == (0, 80)  # what retry-after is computed from
    assert (await store.counters.reserve(_ask(scopes, tokens=30, minute=1001, fraction=0.25), T)).refused_by is None
    # two minutes on, nothing counts
    assert (await store.counters.reserve(_ask(scopes, tokens=100, minute=1003), T)).refused_by is None


async def test_a_real_minute_across_a_boundary_can_hold_twice_the_rpm_less_one(store: Store) -> None:
    """t127: the README called the window sliding; it is two minutes, the previous one weighted by
    what is left of it. Every clock minute keeps to the limit, but 60 s straddling two can hold
    2 x rpm - 1: a full burst late in a quiet minute, then the next minute's room as its weight fades."""
    scopes = _scopes(_tenant(), Caps(rpm=30), Caps())
    start = 58.5 / 60  # the 60 s window: minute 1000 from 58.5 s, minute 1001 until 58.5 s
    burst = [await store.counters.reserve(_ask(scopes, minute=1000, fraction=start), T) for _ in range(31)]
    assert [outcome.refused_by for outcome in burst].count(None) == 30
    in_window = in_minute = 0
    for tenth in range(600):  # every 0.1 s of minute 1001, as many as it lets through
        while (await store.counters.reserve(_ask(scopes, minute=1001, fraction=tenth / 600), T)).refused_by is None:
            in_minute += 1
            in_window += tenth / 600 < start
    assert in_minute <= 30 and 30 + in_window == 2 * 30 - 1  # each clock minute within the rpm, 60 s not


async def test_budgets_report_what_was_spent_and_the_share_used(store: Store) -> None:
    scopes = _scopes(_tenant(), Caps(usd_per_day=1.0), Caps(usd_per_month=10.0))
    first = await store.counters.reserve(_ask(scopes, cost=0.6), T)
    assert first.refused_by is None and first.budget_share == 0
    second = await store.counters.reserve(_ask(scopes, cost=0.3), T)
    assert second.refused_by is None and second.budget_share == pytest.approx(0.6)
    assert _flat(second.spent) == pytest.approx([0.6] * 4)  # each scope's day and month, before it
    refused = await store.counters.reserve(_ask(scopes, cost=0.2), T)
    assert refused.refused_by == "0.usd_per_day" and refused.spent_usd == pytest.approx(0.9)
    assert _flat(refused.spent) == pytest.approx([0.9] * 4)  # what the limiter goes by in a stall
    # a new day starts from nothing; the month goes on
    tomorrow = ReserveRequest(scopes, 10, 0.2, 3000, "20261201", "202611", 0.5)
    outcome = await store.counters.reserve(tomorrow, T)
    assert outcome.refused_by is None and outcome.budget_share == pytest.approx(0.09)
    assert _flat(outcome.spent) == pytest.approx([0.0, 0.9, 0.0, 0.9])


def _flat(spent: tuple[tuple[float, float], ...]) -> list[float]:
    return [amount for pair in spent for amount in pair]


async def test_what_reservations_in_flight_hold_is_told_apart_from_what_is_spent(store: Store) -> None:
    """t157: a budget the estimates of requests in flight fill was told as spent until midnight;
    what marked reservations hold until their settlements is told beside what is spent."""
    tenant = _tenant()
    scopes = _scopes(tenant, Caps(usd_per_day=1.0), Caps(usd_per_month=10.0))
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    marks = [keyspace.reservation(tenant, f"in-flight-{index}") for index in range(2)]
    for mark in marks:
        reserve = ReserveRequest(scopes, 10, 0.4, 1000, "20261130", "202611", 0.5, mark)
        assert (await store.counters.reserve(reserve, T)).refused_by is None
    refused = await store.counters.reserve(_ask(scopes, cost=0.3), T)
    assert refused.refused_by == "0.usd_per_day" and refused.spent_usd == pytest.approx(0.8)
    assert _flat(refused.held) == pytest.approx([0.8] * 4)  # all of it held: nothing spent yet

    def settlement(mark: str, cost: float) -> SettleRequest:
        used = UsageFigures(requests=1, cost_usd=cost)
        return SettleRequest(scopes, 0, cost - 0.4, 1000, "20261130", "202611", today, used, gone, 10, cost, mark,
                             held_usd=0.4)  # fmt: skip

    await store.counters.settle(settlement(marks[0], 0.1), T)
    await store.counters.settle(settlement(marks[0], 0.1), T)  # sent again after a timeout: released once
    outcome = await store.counters.reserve(_ask(scopes, cost=0.3), T)  # unmarked: counted, not held
    assert outcome.refused_by is None
    assert _flat(outcome.spent) == pytest.approx([0.5] * 4) and _flat(outcome.held) == pytest.approx([0.4] * 4)
    # a new day holds nothing of the last one's; its month holds the reservation still in flight
    tomorrow = ReserveRequest(scopes, 10, 0.2, 3000, "20261201", "202611", 0.5)
    assert _flat((await store.counters.reserve(tomorrow, T)).held) == pytest.approx([0.0, 0.4, 0.0, 0.4])
    await store.counters.settle(settlement(marks[1], 0.05), T)  # settled after midnight: its month's
    outcome = await store.counters.reserve(tomorrow, T)
    assert _flat(outcome.held) == pytest.approx([0.0] * 4)
    assert _flat(outcome.spent) == pytest.approx([0.2, 0.65, 0.2, 0.65])  # 0.1 + 0.3 + 0.2 + 0.05


async def test_a_request_begun_in_the_last_period_counts_there_and_leaves_the_new_one_alone(store: Store) -> None:
    """f203: a request begun at 23:59:50 on December 31 that reserved after midnight read January's
    counter as empty and wrote December over it: a $0.03 monthly budget let $0.1056 through in
    January's first seconds. December is kept beside January, and each checks its own requests."""
    tenant = _tenant()
    scopes = _scopes(tenant, Caps(), Caps(usd_per_month=0.03, usd_per_day=0.03))
    today, gone = keyspace.usage(tenant, "k", "20261231"), keyspace.usage(tenant, "k", "20261001")

    def ask(day: str, cost: float, mark: str | None = None) -> ReserveRequest:
        return ReserveRequest(scopes, 10, cost, 1000, day, day[:6], 0.5, mark)

    assert (await store.counters.reserve(ask("20261231", 0.02), T)).refused_by is None
    assert (await store.counters.reserve(ask("20270101", 0.025), T)).refused_by is None  # January starts afresh
    refused = await store.counters.reserve(ask("20261231", 0.011), T)  # late, begun in December: its budget
    assert refused.refused_by == "1.usd_per_day" and _flat(refused.spent)[2:] == pytest.approx([0.02, 0.02])
    late = keyspace.reservation(tenant, "late")
    assert (await store.counters.reserve(ask("20261231", 0.008, late), T)).refused_by is None
    january = await store.counters.reserve(ask("20270101", 0.006), T)
    assert january.refused_by == "1.usd_per_day" and _flat(january.spent)[2:] == pytest.approx([0.025, 0.025])
    assert _flat(january.held) == pytest.approx([0.0] * 4)  # December's request holds nothing of January
    used = UsageFigures(requests=1, cost_usd=0.001)
    await store.counters.settle(SettleRequest(scopes, 0, 0.001 - 0.008, 1000, "20261231", "202612", today, used,
                                              gone, 10, 0.001, late, held_usd=0.008), T)  # fmt: skip
    december = await store.counters.reserve(ask("20261231", 0.0), T)
    assert _flat(december.spent)[2:] == pytest.approx([0.021, 0.021]) and _flat(december.held) == [0.0] * 4
    assert (await store.counters.reserve(ask("20270101", 0.005), T)).refused_by is None  # January's 0.03 exactly
    # what arrives late for December (a usage batch) counts there too, and never opens it again
    await store.counters.add_usage({}, [], {(scopes[1].spend, "20261231", "202612"): 0.004}, T)
    await store.counters.add_usage({}, [], {(scopes[1].spend, "20261130", "202611"): 0.5}, T)  # older: dropped
    december = await store.counters.reserve(ask("20261231", 0.0), T)
    assert _flat(december.spent)[2:] == pytest.approx([0.025, 0.025])
    assert (await store.counters.reserve(ask("20270101", 1e-6), T)).refused_by == "1.usd_per_day"


async def test_what_settled_reservations_held_is_given_back_to_exactly_nothing(store: Store) -> None:
    """t189: 0.1 + 0.2 held and then released left 5.6e-17 held, and every later budget refusal
    said "(and $0.0000 reserved for requests still running)"."""
    tenant = _tenant()
    scopes = _scopes(tenant, Caps(usd_per_day=1.0), Caps(usd_per_month=1.0))
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    for index, cost in enumerate((0.1, 0.2)):
        mark = keyspace.reservation(tenant, f"dust-{index}")
        assert (await store.counters.reserve(ReserveRequest(scopes, 10, cost, 1000, "20261130", "202611", 0.5, mark),
                                             T)).refused_by is None  # fmt: skip
    for index, cost in enumerate((0.1, 0.2)):
        mark = keyspace.reservation(tenant, f"dust-{index}")
        used = UsageFigures(requests=1, cost_usd=cost)
        await store.counters.settle(SettleRequest(scopes, 0, 0.0, 1000, "20261130", "202611", today, used, gone, 10,
                                                  cost, mark, held_usd=cost), T)  # fmt: skip
    assert _flat((await store.counters.reserve(_ask(scopes, cost=0.0), T)).held) == [0.0] * 4


async def test_settling_corrects_the_estimate_and_adds_the_usage(store: Store) -> None:
    tenant = _tenant()
    scopes = _scopes(tenant, Caps(usd_per_day=1.0), Caps())
    assert (await store.counters.reserve(_ask(scopes, cost=0.9), T)).refused_by is None
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    await store.counters.add_usage({gone[0]: UsageFigures(requests=7)}, [], {}, T)
    used = UsageFigures(requests=1, prompt_tokens=5, completion_tokens=2, cost_usd=0.1, cache_hits=1)
    settle = SettleRequest(scopes, -3, -0.8, 1000, "20261130", "202611", today, used, gone)
    await store.counters.settle(settle, T)
    # 0.9 reserved, 0.1 used: 0.85 more fits
    assert (await store.counters.reserve(_ask(scopes, cost=0.85), T)).refused_by is None
    key_day, tenant_day, expired = await store.counters.read_usage([today[0], today[1], gone[0]], T)
    assert (key_day.requests, key_day.prompt_tokens, key_day.completion_tokens, key_day.cache_hits) == (1, 5, 2, 1)
    assert key_day.cost_usd == pytest.approx(0.1) and tenant_day.requests == 1
    assert expired == UsageFigures()


async def test_batched_usage_adds_up(store: Store) -> None:
    key = keyspace.usage(_tenant(), "k", "20261130")[0]
    await store.counters.add_usage({key: UsageFigures(requests=2, cost_usd=0.5)}, [], {}, T)
    await store.counters.add_usage({key: UsageFigures(requests=1, errors=1, cost_usd=0.25)}, [], {}, T)
    (figures,) = await store.counters.read_usage([key], T)
    assert (figures.requests, figures.errors) == (3, 1) and figures.cost_usd == pytest.approx(0.75)


async def test_a_usage_batch_sent_again_counts_each_tenants_part_once(store: Store) -> None:
    first, second = _tenant(), _tenant()
    mine, theirs = keyspace.usage(first, "k", "20261130")[0], keyspace.usage(second, "k", "20261130")[0]
    spend = keyspace.limit_counters(second, "k")[1]
    # the first tenant's part arrived, the call's answer was lost, and the whole batch is sent again
    await store.counters.add_usage({mine: UsageFigures(requests=2, cost_usd=0.5)}, [], {}, T, batch="b1")
    whole = {mine: UsageFigures(requests=2, cost_usd=0.5), theirs: UsageFigures(requests=1, cost_usd=0.25)}
    for _ in range(2):
        await store.counters.add_usage(whole, [], {(spend, "20261130", "202611"): 0.25}, T, batch="b1")
    mine_figures, theirs_figures = await store.counters.read_usage([mine, theirs], T)
    assert (mine_figures.requests, theirs_figures.requests) == (2, 1)
    assert theirs_figures.cost_usd == pytest.approx(0.25)
    await store.counters.add_usage(whole, [], {}, T, batch="b2")  # another batch counts
    assert [f.requests for f in await store.counters.read_usage([mine, theirs], T)] == [4, 2]
    reserve = ReserveRequest([CounterScope(keyspace.limit_counters(second, "k")[0], spend, Caps(usd_per_day=0.3))],
                             0, 0.1, 1, "20261130", "202611", 0.0)  # fmt: skip
    assert (await store.counters.reserve(reserve, T)).refused_by == "0.usd_per_day"  # 0.25 spent once, not twice


async def test_a_settlement_reads_whether_its_reservation_was_made_and_applies_once(store: Store) -> None:
    tenant = _tenant()
    scopes = _scopes(tenant, Caps(usd_per_day=1.0), Caps())
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    used = UsageFigures(requests=1, cost_usd=0.1)

    def settlement(mark: str, answered: bool) -> SettleRequest:
        return SettleRequest(scopes, -3, -0.4, 1000, "20261130", "202611", today, used, gone, 7, 0.1, mark, answered)

    for name, marked in (("made", True), ("mark-evicted", False)):
        mark = keyspace.reservation(tenant, name)
        reserve = ReserveRequest(scopes, 10, 0.5, 1000, "20261130", "202611", 0.5, mark if marked else None)
        assert (await store.counters.reserve(reserve, T)).refused_by is None
        await store.counters.settle(settlement(mark, True), T)  # answered: made, mark or no mark
        await store.counters.settle(settlement(mark, True), T)  # sent again after a timeout: applied once
    # a reservation whose call timed out and never reached the store: what was used counts whole
    await store.counters.settle(settlement(keyspace.reservation(tenant, "never-made"), False), T)
    refused = await store.counters.reserve(_ask(scopes, cost=0.8), T)
    assert refused.refused_by == "0.usd_per_day" and refused.spent_usd == pytest.approx(0.3)
    (figures,) = await store.counters.read_usage([today[0]], T)
    assert figures.requests == 3 and figures.cost_usd == pytest.approx(0.3)


async def test_a_request_that_spends_a_budget_exactly_passes(store: Store) -> None:
    """t114: a $0.30 budget refused its third $0.10 request, as 0.2 + 0.1 > 0.3 in floats."""
    tenant = _tenant()
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    scopes = _scopes(tenant, Caps(usd_per_month=0.3), Caps(usd_per_day=0.3))
    settled = SettleRequest(scopes, 0, 0.0, 1000, "20261130", "202611", today, UsageFigures(requests=1), gone)
    for _ in range(3):
        assert (await store.counters.reserve(_ask(scopes, cost=0.1), T)).refused_by is None
        await store.counters.settle(settled, T)
    refused = await store.counters.reserve(_ask(scopes, cost=0.1), T)
    assert refused.refused_by == "0.usd_per_month" and refused.spent_usd == pytest.approx(0.3)
    assert (await store.counters.reserve(_ask(scopes, cost=1e-6), T)).refused_by == "0.usd_per_month"


async def test_many_small_costs_may_add_up_to_a_budget_exactly(store: Store) -> None:
    tenant = _tenant()
    today, gone = keyspace.usage(tenant, "k", "20261130"), keyspace.usage(tenant, "k", "20260830")
    scopes = _scopes(tenant, Caps(usd_per_day=0.3), Caps())
    corrected = SettleRequest(scopes, 0, -0.02, 1000, "20261130", "202611", today, UsageFigures(requests=1), gone)
    for _ in range(4):  # spent without a reservation, with the ledger's batches
        await store.counters.add_usage({}, [], {(scopes[0].spend, "20261130", "202611"): 0.03}, T)
    for _ in range(5):  # estimated at $0.05, settled at $0.03
        assert (await store.counters.reserve(_ask(scopes, cost=0.05), T)).refused_by is None
        await store.counters.settle(corrected, T)
    assert (await store.counters.reserve(_ask(scopes, cost=0.03), T)).refused_by is None  # the tenth $0.03
    refused = await store.counters.reserve(_ask(scopes, cost=0.01), T)
    assert refused.refused_by == "0.usd_per_day" and refused.spent_usd == pytest.approx(0.3)


async def test_spend_of_unlimited_requests_counts_for_a_budget_set_later(store: Store) -> None:
    tenant = _tenant()
    spend = keyspace.limit_counters(tenant, "k")[1]
    key = keyspace.usage(tenant, "k", "20261130")[0]
    await store.counters.add_usage({key: UsageFigures(requests=1)}, [], {(spend, "20261129", "202611"): 0.3}, T)
    await store.counters.add_usage({key: UsageFigures(requests=1)}, [], {(spend, "20261130", "202611"): 0.5}, T)
    # a batch that arrives late for the day before counts in it (kept beside today), and in its month
    await store.counters.add_usage({key: UsageFigures(requests=1)}, [], {(spend, "20261129", "202611"): 0.1}, T)
    # a correction (negative) applies to its own period only, never opening one below zero
    await store.counters.add_usage({}, [], {(spend, "20261130", "202611"): -0.05}, T)
    await store.counters.add_usage({}, [], {(spend, "20261128", "202610"): -0.5}, T)
    await store.counters.add_usage({}, [], {(spend, "20261130", "202611"): 0.05}, T)
    scopes = _scopes(tenant, Caps(usd_per_day=0.6, usd_per_month=1.0), Caps())
    refused = await store.counters.reserve(_ask(scopes, cost=0.2), T)
    assert refused.refused_by == "0.usd_per_day" and refused.spent_usd == pytest.approx(0.5)
    refused = await store.counters.reserve(_ask(_scopes(tenant, Caps(usd_per_month=1.0), Caps()), cost=0.2), T)
    assert refused.refused_by == "0.usd_per_month" and refused.spent_usd == pytest.approx(0.9)
    assert (await store.counters.reserve(_ask(scopes, cost=0.05), T)).refused_by is None


async def test_a_store_that_cannot_answer_says_so() -> None:
    shared = SharedRedis(connect("redis://127.0.0.1:1", timeout_s=0.2), Metrics())
    store = redis_store(shared)
    with pytest.raises(StoreUnavailable):
        await store.kv.get("k", T)
    with pytest.raises(StoreUnavailable):
        await store.counters.reserve(_ask(_scopes("t", Caps(rpm=1), Caps())), T)
    await shared.aclose()
    fake = memory_store()
    fake.kv.down = True  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        await fake.kv.get("k", T)


async def test_a_command_redis_refuses_fails_alone(redis_server: EmbeddedRedis) -> None:
    # A refused command (here an invalid expiry) is not an outage: marking Redis down would
    # switch limits and budgets open and drop usage for every request of the next second.
    shared = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics())
    key = keyspace.exact(_tenant(), "refused")
    with pytest.raises(StoreUnavailable):
        await shared.call(lambda client: client.set(key, b"v", ex=-5), T)
    assert shared.up
    assert await shared.call(lambda client: client.set(key, b"v", ex=5), T)
    await shared.aclose()


async def test_a_redis_whose_memory_is_full_still_reads_and_refuses_each_write_alone(tmp_path: Path) -> None:
    """t116: OOM marked a full Redis (``noeviction``) down: cache hits were lost and ``/readyz``
    took every pod out of the Service. Reads go on; each refused write fails alone (applied: none),
    counted, and a reservation still meets the counts Redis holds (one within them, which cannot
    be counted, is left to ``on_redis_error``, as with Redis down)."""
    server = start_embedded_redis(tmp_path)
    metrics = Metrics()
    shared = SharedRedis(connect(server.url, timeout_s=2), metrics)
    store, tenant = redis_store(shared), _tenant()
    kept, used = keyspace.exact(tenant, "kept"), _scopes(tenant, Caps(rpm=1), Caps())
    admin = shared.client
    assert admin is not None
    try:
        await store.kv.put(kept, b"answer", 60, T)
        assert (await store.counters.reserve(_ask(used), T)).refused_by is None  # its one request a minute
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        for write in (
            store.kv.put(keyspace.exact(tenant, "new"), b"v", 60, T),
            store.counters.reserve(_ask(_scopes(_tenant(), Caps(rpm=5), Caps())), T),
        ):
            with pytest.raises(StoreUnavailable) as refused:
                await write
            assert not isinstance(refused.value, StoreTimedOut)  # refused whole: nothing to correct later
        assert await store.kv.get(kept, T) == b"answer"  # at once: not skipped as if Redis were down
        assert (await store.counters.reserve(_ask(used), T)).refused_by == "0.rpm"
        assert shared.up and await shared.check() and shared.full  # the probe's write is refused too
        text = metrics.render().decode()
        assert "gateway_redis_up 1.0" in text.splitlines()
        assert "gateway_redis_writes_refused_total 3.0" in text.splitlines()
        await admin.config_set("maxmemory", 0)
        assert await shared.check() and not shared.full
    finally:
        await shared.aclose()
        server.stop()


async def test_many_values_are_read_and_written_in_one_call(store: Store) -> None:
    tenant = _tenant()
    keys = [keyspace.exact(tenant, f"many-{i}") for i in range(300)]  # more than a pool has connections
    assert await store.kv.get_many(keys, T) == [None] * 300
    await store.kv.put_many([(key, key.encode()) for key in keys[::2]], 60, T)
    assert await store.kv.get_many(keys, T) == [key.encode() if i % 2 == 0 else None for i, key in enumerate(keys)]
    assert await store.kv.get_many([], T) == []


async def test_a_bounded_collection_drops_its_oldest_keys_past_its_bytes(store: Store) -> None:
    tenant, other = _tenant(), _tenant()
    ledger, others = keyspace.stored_responses(tenant), keyspace.stored_responses(other)
    keys = [keyspace.response(tenant, f"r{i}") for i in range(4)]
    theirs = keyspace.response(other, "r0")
    w, cap = BOUNDED_ENTRY_BYTES, 300 + 3 * BOUNDED_ENTRY_BYTES  # each key costs its bytes and w
    assert await store.kv.put_bounded(theirs, b"t" * 250, 60, others, cap, T) == 0
    for key in keys[:3]:
        assert await store.kv.put_bounded(key, b"x" * 100, 60, ledger, cap, T) == 0
        await asyncio.sleep(0.002)  # distinct times stored
    assert await store.kv.put_bounded(keys[1], b"y" * 100, 60, ledger, cap, T) == 0  # replaced: counted once
    assert await store.kv.put_bounded(keys[3], b"z" * 150, 60, ledger, cap, T) == 2  # the two oldest go
    assert await store.kv.get_many(keys, T) == [None, b"y" * 100, None, b"z" * 150]
    assert await store.kv.get(theirs, T) == b"t" * 250  # another ledger: untouched
    assert await store.kv.put_bounded(keys[0], b"w" * (cap - w + 1), 60, ledger, cap, T) is None  # alone over it
    assert await store.kv.get(keys[0], T) is None
    assert await store.kv.delete_bounded(keys[3], ledger, T) is True  # its bytes are free again
    assert await store.kv.delete_bounded(keys[3], ledger, T) is False
    assert await store.kv.put_bounded(keys[2], b"v" * 200, 60, ledger, cap, T) == 0
    assert await store.kv.get_many(keys[1:3], T) == [b"y" * 100, b"v" * 200]
    assert await store.kv.put_bounded(keys[0], b"u" * 100, 60, ledger, 150 + w, T) == 2  # a lower cap: both go
    assert await store.kv.get_many(keys, T) == [b"u" * 100, None, None, None]


async def test_a_bounded_key_read_as_used_is_the_last_to_go(store: Store) -> None:
    """t60: a conversation continued is read as used, so that a tenant past its cap loses its idle
    turns first, not those of the conversations in use."""
    tenant = _tenant()
    ledger, w = keyspace.stored_responses(tenant), BOUNDED_ENTRY_BYTES
    keys = [keyspace.response(tenant, f"u{i}") for i in range(4)]
    outside, missing = keyspace.response(tenant, "outside"), keyspace.response(tenant, "missing")
    cap = 300 + 3 * w
    for key in keys[:3]:
        assert await store.kv.put_bounded(key, b"x" * 100, 60, ledger, cap, T) == 0
        await asyncio.sleep(0.002)
    await store.kv.put(outside, b"o", 60, T)  # not in the ledger: read, and left as it is
    assert await store.kv.get_bounded([keys[0], missing, outside], ledger, 60, T) == [b"x" * 100, None, b"o"]
    assert await store.kv.get_bounded([], ledger, 60, T) == []
    await asyncio.sleep(0.002)
    assert await store.kv.put_bounded(keys[3], b"z" * 100, 60, ledger, cap, T) == 1
    assert await store.kv.get_many(keys, T) == [b"x" * 100, None, b"x" * 100, b"z" * 100]  # keys[1] went
    assert await store.kv.get(outside, T) == b"o"


async def test_a_bounded_key_read_as_used_is_kept_its_ttl_again(store: Store) -> None:
    tenant = _tenant()
    ledger, key = keyspace.stored_responses(tenant), keyspace.response(tenant, "again")
    assert await store.kv.put_bounded(key, b"x", 2, ledger, 1 << 20, T) == 0
    await asyncio.sleep(1.2)
    assert await store.kv.get_bounded([key], ledger, 2, T) == [b"x"]
    await asyncio.sleep(1.2)  # past the first TTL, within the second
    assert await store.kv.get(key, T) == b"x"


async def test_one_call_deletes_a_bounded_number_of_keys(store: Store) -> None:
    """200,000 small keys deleted in one call held Redis, every tenant's, for a second (t17)."""
    tenant = _tenant()
    ledger, w = keyspace.stored_responses(tenant), BOUNDED_ENTRY_BYTES
    many = BOUNDED_EVICTIONS_AT_MOST + 1
    for i in range(many):
        assert await store.kv.put_bounded(keyspace.response(tenant, f"s{i}"), b"", 60, ledger, many * w, T) == 0
    big = keyspace.response(tenant, "big")
    assert await store.kv.put_bounded(big, b"b" * (many * w - w), 60, ledger, many * w, T) is None
    assert await store.kv.get(big, T) is None
    assert await store.kv.put_bounded(big, b"b" * (many * w - w), 60, ledger, many * w, T) == 1  # the rest
    assert await store.kv.get(keyspace.response(tenant, f"s{many - 1}"), T) is None


async def test_a_bounded_collections_expired_keys_free_their_bytes(store: Store) -> None:
    tenant = _tenant()
    ledger, first, second = (
        keyspace.stored_responses(tenant),
        keyspace.response(tenant, "a"),
        keyspace.response(tenant, "b"),
    )
    cap = 300 + BOUNDED_ENTRY_BYTES
    assert await store.kv.put_bounded(first, b"x" * 200, 1, ledger, cap, T) == 0
    await asyncio.sleep(1.1)
    assert await store.kv.put_bounded(second, b"y" * 200, 1, ledger, cap, T) == 0  # nothing left to delete
    assert await store.kv.get(second, T) == b"y" * 200


async def test_a_bounded_key_stored_only_if_new_keeps_its_first_value_counted_once(store: Store) -> None:
    """Routing traces (t101): bounded like stored Responses, and the first request under an id keeps it."""
    tenant = _tenant()
    ledger, w = keyspace.routing_traces(tenant, "auto"), BOUNDED_ENTRY_BYTES
    first, second, outside = (keyspace.routing_trace(tenant, name) for name in ("first", "second", "outside"))
    cap = 200 + 2 * w
    assert await store.kv.put_bounded(first, b"a" * 100, 60, ledger, cap, T, new_only=True) == 0
    for _ in range(3):  # not stored, not counted again, and the first one's time stands
        assert await store.kv.put_bounded(first, b"b" * 100, 60, ledger, cap, T, new_only=True) is None
    assert await store.kv.get(first, T) == b"a" * 100
    await asyncio.sleep(0.002)
    assert await store.kv.put_bounded(second, b"c" * 100, 60, ledger, cap, T, new_only=True) == 0  # both fit
    await store.kv.put(outside, b"o", 60, T)  # written before traces were bounded: left as it is
    assert await store.kv.put_bounded(outside, b"d" * 100, 60, ledger, cap, T, new_only=True) is None
    assert await store.kv.get_many([first, second, outside], T) == [b"a" * 100, b"c" * 100, b"o"]
    await asyncio.sleep(0.002)
    third = keyspace.routing_trace(tenant, "third")
    assert await store.kv.put_bounded(third, b"e" * 100, 60, ledger, cap, T, new_only=True) == 1  # the oldest goes
    assert await store.kv.get_many([first, second, third], T) == [None, b"c" * 100, b"e" * 100]
    assert await store.kv.put_bounded(first, b"f" * 100, 60, ledger, cap, T, new_only=True) == 1  # gone: new again
    assert await store.kv.get_many([first, second, third], T) == [b"f" * 100, None, b"e" * 100]


async def test_a_bounded_key_withdrawn_keeps_out_a_write_that_lands_late(store: Store) -> None:
    """t130: a write that timed out may land before its withdrawal or after it: neither way is it kept."""
    tenant = _tenant()
    ledger = keyspace.stored_responses(tenant)
    early, late = keyspace.response(tenant, "early"), keyspace.response(tenant, "late")
    assert await store.kv.put_bounded(early, b"x" * 100, 60, ledger, 10_000, T, new_only=True) == 0
    assert await store.kv.delete_bounded(early, ledger, T, keep_out_s=60) is True
    assert await store.kv.delete_bounded(late, ledger, T, keep_out_s=60) is False
    assert await store.kv.put_bounded(late, b"y" * 100, 60, ledger, 10_000, T, new_only=True) is None
    assert await store.kv.get_many([early, late], T) == [b"", b""]  # kept out, for keep_out_s


async def test_a_cancel_that_lands_during_a_redis_call_is_never_lost(redis_server: EmbeddedRedis) -> None:
    """A client that leaves cancels its request's task once; that cancel may land while the
    task is in a Redis call (redis-py, re-opening a connection, and Python 3.11's
    ``asyncio.wait_for`` can swallow one), and must still end the task there."""
    shared = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics())
    key = keyspace.exact(_tenant(), "cancel")
    cancelled = went_on = 0
    asked_to_stop = asyncio.Event()

    async def request() -> None:
        nonlocal went_on
        for _ in range(200):
            await shared.call(lambda client: client.get(key), T)
            if asked_to_stop.is_set():  # a call returned after the cancel: the request would go on upstream
                went_on += 1
                return

    for delay in range(300):
        asked_to_stop.clear()
        task = asyncio.create_task(request())
        for _ in range(delay % 60):
            await asyncio.sleep(0)
        asked_to_stop.set()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
    await shared.aclose()
    assert (cancelled, went_on) == (300, 0)


async def test_a_redis_without_vector_sets_is_told_apart(redis_server: EmbeddedRedis) -> None:
    """The semantic cache needs Redis 8's vector sets; a Redis 7 (here: a user denied them)
    answers everything else, and the cache would quietly never hit."""
    admin = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics())
    assert await admin.has_vector_sets() is True
    user = f"novec{uuid.uuid4().hex[:6]}"
    await admin.call(lambda r: r.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"],
                                              commands=["+@all", "-vcard"]), T)  # fmt: skip
    limited = SharedRedis(connect(f"unix://{user}:pw@{redis_server.socket_path}?db=0", timeout_s=2), Metrics())
    try:
        assert await limited.has_vector_sets() is False
    finally:
        await limited.aclose()
        await admin.call(lambda r: r.acl_deluser(user), T)
        await admin.aclose()


async def test_after_a_quiet_restart_the_dead_pooled_connections_are_no_outage(tmp_path: Path) -> None:
    """A Redis restarted while no request came left every pooled connection dead: the first one
    used marked Redis down, and for a second every limit check was refused under
    on_redis_error: closed (t13, t19: 59 of 100 requests 503 after /readyz said 200)."""
    import signal
    import subprocess

    from tests.gateway_process import free_port

    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        args = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path)]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    server = start()
    shared = SharedRedis(connect(f"redis://127.0.0.1:{port}/0", timeout_s=2), Metrics())
    key = keyspace.exact(_tenant(), "quiet")
    try:
        while not await shared.check(0.5):
            await asyncio.sleep(0.05)
        await asyncio.gather(*(shared.call(lambda client: client.get(key), 2.0) for _ in range(8)))  # 8 pooled
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = start()
        probe = SharedRedis(connect(f"redis://127.0.0.1:{port}/0", timeout_s=2), Metrics())
        while not await probe.check(0.5):  # a readiness probe of its own: this pool hears nothing
            await asyncio.sleep(0.05)
        await probe.aclose()
        # a call on a dead connection is sent again on a fresh one, and Redis is not taken for down
        assert await shared.call(lambda client: client.get(key), 2.0) is None
        assert shared.up
        outcomes = await asyncio.gather(
            *(shared.call(lambda client: client.get(key), 2.0) for _ in range(8)), return_exceptions=True
        )
        assert outcomes == [None] * 8  # the other dead connections were closed with it: none fails
    finally:
        await shared.aclose()
        server.kill()
        server.wait()


async def test_a_change_of_why_redis_cannot_be_reached_is_logged(tmp_path: Path) -> None:
    """t130: Redis restarted with a password the gateway lacks: the log said only the first
    ``Connection refused``, never the authentication error that kept the outage going."""
    import subprocess

    from structlog.testing import capture_logs

    from tests.gateway_process import free_port

    port = free_port()

    def start(*args: str) -> subprocess.Popen[bytes]:
        command = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", *args]
        return subprocess.Popen(
            [*command, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    server = start()
    shared = SharedRedis(connect(f"redis://127.0.0.1:{port}/0", timeout_s=2), Metrics())
    try:
        while not await shared.check(0.5):
            await asyncio.sleep(0.05)
        server.kill()
        server.wait()
        with capture_logs() as logs:
            assert not await shared.check(0.5)
            server = start("--requirepass", "s3cret-pw")
            for _ in range(30):  # probes over ~6 s: the new cause said once, not once a probe
                assert not await shared.check(0.5)  # it needs a password now
                await asyncio.sleep(0.2)
        said = [(line["event"], line["error"]) for line in logs if line["event"].startswith("redis_")]
        assert said == [("redis_unavailable", "ConnectionError"), ("redis_still_unavailable", "AuthenticationError")]
    finally:
        await shared.aclose()
        server.kill()
        server.wait()
