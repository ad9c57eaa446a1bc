"""A reservation its process never settled (the worker was killed mid-request) must not hold the
tenant's budget for ever: the tenant's next reservation past PENDING_S undoes it, in the Redis
scripts and in the memory store alike (an outside tester found $0.80 of estimates held for good
against $0.00003 spent)."""

from __future__ import annotations

import uuid

import pytest

from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageFigures
from gateway.services.redis_server import EmbeddedRedis
from gateway.store import keyspace
from gateway.store.base import PENDING_S, Caps, CounterScope, LimitCounters, ReserveRequest, SettleRequest
from gateway.store.memory import MemoryLimitCounters
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect

DAY, MONTH = "20261202", "202612"
MINUTE = 29_400_000  # any minute: the scripts take time from the request


@pytest.mark.parametrize("store", ["redis", "memory"])
async def test_a_reservation_never_settled_is_undone_by_the_tenants_next_one(
    store: str, redis_server: EmbeddedRedis
) -> None:
    shared = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics()) if store == "redis" else None
    try:
        await _lost_reservation_given_back(RedisLimitCounters(shared) if shared else MemoryLimitCounters())
    finally:
        if shared is not None:
            await shared.aclose()


async def _lost_reservation_given_back(counters: LimitCounters) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    window, spend, tenant_window, tenant_spend = keyspace.limit_counters(tenant, "k|1")  # ids may hold "|"
    scopes = (CounterScope(window, spend, Caps(usd_per_day=1.0)), CounterScope(tenant_window, tenant_spend, Caps()))

    held: list[float] = []

    async def reserve(minute: int, cost: float) -> tuple[str, float]:
        mark = keyspace.reservation(tenant, uuid.uuid4().hex)
        outcome = await counters.reserve(ReserveRequest(scopes, 10, cost, minute, DAY, MONTH, 0.5, mark), 2.0)
        assert outcome.refused_by is None, outcome
        held.append(outcome.held[0][0])
        return mark, outcome.budget_share

    async def settle(mark: str, minute: int, estimate: float, cost: float) -> None:
        used = UsageFigures(requests=1, cost_usd=cost)
        request = SettleRequest(scopes, 0, cost - estimate, minute, DAY, MONTH, (), used, (), 10, cost, mark)
        await counters.settle(request, 2.0)

    lost, _ = await reserve(MINUTE, 0.8)  # its worker is killed: never settled
    _, share = await reserve(MINUTE + 2, 0.1)
    assert share == pytest.approx(0.8)  # held within PENDING_S: the request may still be running
    later = MINUTE + PENDING_S // 60 + 1  # past the lost one's deadline, not the next one's
    _, share = await reserve(later, 0.05)
    assert share == pytest.approx(0.1)  # the lost 0.8 was given back; the 0.1 is not due yet
    assert held[-1] == pytest.approx(0.1)  # nor held by a request in flight any more
    await settle(lost, later, 0.8, 0.0003)  # a settlement that comes after all counts whole
    _, share = await reserve(later, 0.0)
    assert share == pytest.approx(0.1 + 0.05 + 0.0003)
