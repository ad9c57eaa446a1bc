"""t94: a price of 1e308 overflowed each request's cost to inf, which a gateway before the fix wrote
to Redis as its key's and tenant's spend. Redis then refused every later increment of that counter
("increment would produce NaN or Infinity"): the key's usage went unrecorded and a budget answered
"$inf is spent" till the month ended, long after the price was reverted. Such a counter is set to
0 where a script meets it, and said once (``spend_counter_reset``); no script writes a cost that is
not a finite number."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis as redis_sync
from structlog.testing import capture_logs

from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageFigures
from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.store import keyspace
from gateway.store.base import Caps, CounterScope, ReserveRequest, SettleRequest
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect
from tests.conftest import PairGateway
from tests.gateway_process import GatewayProcess

DAY, MONTH = "20261203", "202612"
MINUTE = 29_401_000
INF = {"day": DAY, "d": "inf", "month": MONTH, "mo": "inf"}
"""A spend counter as a gateway before t94 left it."""


def _spend(client: redis_sync.Redis, key: str) -> tuple[float, float]:
    held = client.hmget(key, "d", "mo")
    return float(held[0] or 0), float(held[1] or 0)


async def test_each_script_resets_a_spend_counter_holding_inf_once_and_counts_on(redis_server: EmbeddedRedis) -> None:
    shared = SharedRedis(connect(redis_server.url, timeout_s=2), Metrics())
    counters = RedisLimitCounters(shared)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    window, spend, tenant_window, tenant_spend = keyspace.limit_counters(tenant, "k")
    unlimited = keyspace.limit_counters(tenant, "free")[1]
    batched = keyspace.limit_counters(tenant, "batched")[1]
    scopes = (
        CounterScope(window, spend, Caps(usd_per_month=1000.0)),
        CounterScope(tenant_window, tenant_spend, Caps(usd_per_day=10.0)),
    )
    usage = f"{keyspace.tenant_prefix(tenant)}:usage:test"
    try:
        with redis_sync.Redis.from_url(redis_server.url) as client:
            for key in (spend, tenant_spend, unlimited, batched):
                client.hset(key, mapping=INF)
            with capture_logs() as logs:
                # reserve: was refused ("$inf is spent"), or wrote inf + cost back
                mark = keyspace.reservation(tenant, uuid.uuid4().hex)
                outcome = await counters.reserve(ReserveRequest(scopes, 10, 0.5, MINUTE, DAY, MONTH, 0.5, mark), 2.0)
                assert outcome.refused_by is None and outcome.spent == ((0.0, 0.0), (0.0, 0.0)), outcome
                # settle: was refused, so the key's usage went unrecorded
                client.hset(spend, mapping=INF)  # as if met again between the two calls
                used = UsageFigures(requests=1, cost_usd=0.25)
                await counters.settle(
                    SettleRequest(scopes, 0, 0.25 - 0.5, MINUTE, DAY, MONTH, (usage,), used, (), 10, 0.25, mark), 2.0
                )
                # the usage batches of keys that reserved nothing, sent once and sent as a batch
                await counters.add_usage({}, (), {(unlimited, DAY, MONTH): 0.125}, 2.0)
                await counters.add_usage({}, (), {(batched, DAY, MONTH): 0.0625}, 2.0, batch=uuid.uuid4().hex)
                # the limits' next reservation meets numbers: nothing more to say
                again = keyspace.reservation(tenant, uuid.uuid4().hex)
                later = await counters.reserve(ReserveRequest(scopes, 10, 0.5, MINUTE, DAY, MONTH, 0.5, again), 2.0)
            # the key's counter met again by the settlement starts from 0: its correction (-0.25) is dropped
            assert later.refused_by is None and later.spent == ((0.0, 0.0), (0.25, 0.25)), later
            assert _spend(client, spend) == (0.5, 0.5) and _spend(client, tenant_spend) == (0.75, 0.75)
            assert _spend(client, unlimited) == (0.125, 0.125) and _spend(client, batched) == (0.0625, 0.0625)
            assert float(client.hget(usage, "cost_usd") or 0) == 0.25
            resets = sorted((log["key"], log["field"]) for log in logs if log["event"] == "spend_counter_reset")
            expected = [(spend, "d"), (spend, "mo")] * 2  # met once by reserve, once by settle
            expected += [(key, field) for key in (tenant_spend, unlimited, batched) for field in ("d", "mo")]
            assert resets == sorted(expected), resets
            assert all(log["log_level"] == "warning" for log in logs if log["event"] == "spend_counter_reset")

            # a cost that is no finite number is never written: it would be such a counter
            await counters.add_usage({}, (), {(unlimited, DAY, MONTH): math.inf}, 2.0)
            await counters.add_usage({}, (), {(batched, DAY, MONTH): math.nan}, 2.0, batch=uuid.uuid4().hex)
            fresh = keyspace.reservation(tenant, uuid.uuid4().hex)
            await counters.reserve(ReserveRequest(scopes, 10, math.inf, MINUTE, DAY, MONTH, 0.5, fresh), 2.0)
            assert _spend(client, unlimited) == (0.125, 0.125) and _spend(client, batched) == (0.0625, 0.0625)
            assert all(math.isfinite(value) for key in (spend, tenant_spend) for value in _spend(client, key))
    finally:
        await shared.aclose()


# ------------------------------------------------------------- through a gateway, as the report met it

_AUTH = """auth:
  mode: keys
  keys:
    - {id: healed, tenant: healed, hash: "%(healed)s", limits: {usd_per_month: 1000}}
    - {id: admin, tenant: ops, hash: "%(admin)s", admin: true}
tenants:
  healed: {limits: {usd_per_day: 10}}
""" % {name: hash_key(f"key-{name}") for name in ("healed", "admin")}


@pytest.fixture(scope="module")
def budget_gateway(
    pair_gateway: PairGateway,
) -> Iterator[GatewayProcess]:
    with pair_gateway("spend-counters", auth=_AUTH) as process:
        yield process


def _requests_recorded(gw: GatewayProcess) -> int:
    answer = httpx.get(f"{gw.base_url}/usage", headers={"authorization": "Bearer key-healed"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["total"]["requests"])


def test_a_key_whose_spend_an_older_gateway_left_at_inf_is_billed_and_counted_again(
    budget_gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """The report's key after the price was reverted: every request was refused 429 "$1000.00 may
    be spent, $inf is spent", and its usage stayed where it was."""
    gw = budget_gateway
    now = datetime.now(UTC)
    day, month = now.strftime("%Y%m%d"), now.strftime("%Y%m")
    _, spend, _, tenant_spend = keyspace.limit_counters("healed", "healed")
    with redis_sync.Redis.from_url(redis_server.url) as client:
        for key in (spend, tenant_spend):
            client.hset(key, mapping={"day": day, "d": "inf", "month": month, "mo": "inf"})
        before = _requests_recorded(gw)
        for i in range(3):
            answer = httpx.post(
                f"{gw.base_url}/chat/completions",
                json={"model": "fast", "messages": [{"role": "user", "content": f"after the revert {i}"}]},
                headers={"authorization": "Bearer key-healed"},
                timeout=15,
            )
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 30
        while _requests_recorded(gw) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _requests_recorded(gw) == before + 3, gw.stderr_text()[-2000:]
        for key in (spend, tenant_spend):
            day_spent, month_spent = _spend(client, key)
            assert 0 < day_spent == month_spent < 0.01, (key, day_spent, month_spent)
    resets = sorted((r["key"], r["field"]) for r in gw.wait_for_ops("spend_counter_reset", count=4))
    assert resets == sorted((key, field) for key in (spend, tenant_spend) for field in ("d", "mo")), resets
    assert not gw.ops_records("redis_refused")
