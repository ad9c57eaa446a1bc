"""Rate limits and budgets per key and per tenant, enforced in Redis for every gateway process.

Before the upstream call, one Lua script checks every limit of the key and of its
tenant against the request's *estimate* (prompt tokens + the completion it may ask
for, priced at the first model) and reserves it, atomically: two processes behind a
load balancer enforce one limit. After the call, :meth:`RateLimiter.settle` replaces
the estimate with the actual tokens and cost and records the usage ``/v1/usage`` reads.

Requests and tokens per minute use a sliding window (this minute's count plus the
previous minute's, weighted by how much of it still falls in the last 60 s); spend is
per UTC day and per UTC month.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from gateway.accounting.usage import UsageFigures
from gateway.auth import Principal
from gateway.cache.keys import tenant_prefix
from gateway.config.schema import Limits, Policy
from gateway.errors import BudgetExceededError, LimiterUnavailableError, RateLimitError
from gateway.services.redis_client import SharedRedis

__all__ = ["USAGE_FLUSH_S", "RateLimiter", "Reservation"]

# Counters live in two fixed-size hashes per scope (the key, its tenant) and carry no TTL:
# ``win`` holds this minute's and the previous minute's requests and tokens (m, r, rp, t, tp),
# ``spend`` today's and this month's USD (day, d, month, mo). A period that has passed is
# rolled over here rather than expired, so Redis's volatile-lru eviction, which only takes
# keys with a TTL (cache entries), can never reset a limit.
_RESERVE = """
local frac, tokens, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local minute, day, month = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local function window(key)
  local v = redis.call('HMGET', key, 'm', 'r', 'rp', 't', 'tp')
  local m = tonumber(v[1] or '-2')
  local r, rp, t, tp = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0'), tonumber(v[5] or '0')
  if m == minute then return {r, rp, t, tp} end
  if m == minute - 1 then return {0, r, 0, t} end
  return {0, 0, 0, 0}
end
local function spent(key)
  local v = redis.call('HMGET', key, 'day', 'd', 'month', 'mo')
  return (v[1] == day) and tonumber(v[2]) or 0, (v[3] == month) and tonumber(v[4]) or 0
end
local share, seen = 0, {}
for s = 0, 1 do
  local a = 6 + s * 4
  local rpm, tpm, per_day, per_month = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3]), tonumber(ARGV[a+4])
  local scope = (s == 0) and 'key' or 'tenant'
  local w = window(KEYS[s*2+1])
  local spent_day, spent_month = spent(KEYS[s*2+2])
  seen[s] = {w, spent_day, spent_month}
  if rpm >= 0 and w[1] + w[2] * (1 - frac) + 1 > rpm then return {1, scope .. '.rpm', '0'} end
  if tpm >= 0 and w[3] + w[4] * (1 - frac) + tokens > tpm then return {1, scope .. '.tpm', '0'} end
  if per_day >= 0 then
    if spent_day + cost > per_day then return {2, scope .. '.usd_per_day', tostring(spent_day)} end
    if per_day > 0 then share = math.max(share, spent_day / per_day) end
  end
  if per_month >= 0 then
    if spent_month + cost > per_month then return {2, scope .. '.usd_per_month', tostring(spent_month)} end
    if per_month > 0 then share = math.max(share, spent_month / per_month) end
  end
end
for s = 0, 1 do
  local w, spent_day, spent_month = seen[s][1], seen[s][2], seen[s][3]
  redis.call('HSET', KEYS[s*2+1], 'm', minute, 'r', w[1] + 1, 'rp', w[2], 't', w[3] + tokens, 'tp', w[4])
  redis.call('HSET', KEYS[s*2+2], 'day', day, 'd', spent_day + cost, 'month', month, 'mo', spent_month + cost)
end
return {0, '', tostring(share)}
"""

# Replace the reservation by the actual figures (in the periods it was made in), add them
# to the day's usage hashes, and drop the usage hashes that left the retention period.
_SETTLE = """
local token_delta, cost_delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local minute, day, month = tonumber(ARGV[3]), ARGV[4], ARGV[5]
for s = 0, 1 do
  local win, spend = KEYS[s*2+1], KEYS[s*2+2]
  if token_delta ~= 0 then
    local m = tonumber(redis.call('HGET', win, 'm') or '-2')
    if m == minute then redis.call('HINCRBY', win, 't', token_delta)
    elseif m == minute + 1 then redis.call('HINCRBY', win, 'tp', token_delta) end
  end
  if cost_delta ~= 0 then
    if redis.call('HGET', spend, 'day') == day then redis.call('HINCRBYFLOAT', spend, 'd', cost_delta) end
    if redis.call('HGET', spend, 'month') == month then redis.call('HINCRBYFLOAT', spend, 'mo', cost_delta) end
  end
end
for i = 5, 6 do
  for j = 6, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[i], ARGV[j], ARGV[j + 1]) end
end
redis.call('DEL', KEYS[7], KEYS[8])
return 1
"""

_NO_LIMIT = Limits()


@dataclass(slots=True)
class Reservation:
    scope_keys: tuple[str, ...]
    """The key's and the tenant's counter hashes (window, spend); empty when nothing was reserved."""
    periods: tuple[int, str, str]
    """The minute, UTC day and month the reservation was counted in."""
    usage_keys: tuple[str, str, str, str]
    """Today's usage hashes (key, tenant), then the two that leave the retention period today."""
    tokens: int
    cost_usd: float
    budget_share: float
    """The largest share of a daily or monthly budget spent before this request."""


class RateLimiter:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        client = redis.client
        self._reserve = client.register_script(_RESERVE) if client is not None else None
        self._settle = client.register_script(_SETTLE) if client is not None else None
        self._usage = _UsageBuffer()
        self._flusher: asyncio.Task[None] | None = None

    def _ensure_flusher(self, timeout_s: float) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(USAGE_FLUSH_S, timeout_s))

    async def _flush_every(self, interval_s: float, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush_usage(timeout_s)

    async def flush_usage(self, timeout_s: float = 1.0) -> None:
        """Write buffered usage (requests without limits) in one pipeline; at shutdown too."""
        pending, expired = self._usage.take()
        if not pending:
            return

        async def write(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, used in pending.items():
                    for field, value in used.increments():
                        if isinstance(value, float):
                            pipe.hincrbyfloat(key, field, value)
                        else:
                            pipe.hincrby(key, field, value)
                for key in expired:
                    pipe.delete(key)
                await pipe.execute()

        await self._redis.run(write, None, timeout_s)

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush_usage()

    def enforces(self, policy: Policy, principal: Principal) -> bool:
        """Whether this key or its tenant has a limit to check (only then is an estimate needed)."""
        key_limits, tenant_limits = _limits(policy, principal)
        return self._reserve is not None and (key_limits.any or tenant_limits.any)

    async def reserve(self, policy: Policy, principal: Principal, tokens: int, cost_usd: float) -> Reservation:
        """Check and reserve; raises RateLimitError / BudgetExceededError naming the limit."""
        now = time.time()
        key_limits, tenant_limits = _limits(policy, principal)
        usage = _usage_keys(principal, now)
        periods = _periods(now)
        if not self.enforces(policy, principal):
            return Reservation((), periods, usage, 0, 0.0, 0.0)  # nothing to enforce: usage is recorded in batches
        minute = periods[0]
        keys = _counter_keys(principal)
        reservation = Reservation(keys, periods, usage, tokens, cost_usd, 0.0)
        args: list[str | int | float] = [
            now / 60 - minute,
            tokens,
            repr(cost_usd),
            *periods,
            *_limit_args(key_limits),
            *_limit_args(tenant_limits),
        ]
        reserve = self._reserve
        assert reserve is not None  # enforces() said so
        result = await self._redis.run(
            lambda r: reserve(keys=list(keys), args=args), None, policy.limits.redis_timeout_ms / 1000
        )
        if result is None:
            if policy.limits.on_redis_error == "closed":
                raise LimiterUnavailableError("rate limits cannot be checked (Redis unavailable); refusing by policy")
            return Reservation((), periods, usage, 0, 0.0, 0.0)
        status, which, detail = int(result[0]), _text(result[1]), _text(result[2])
        if status == 1:
            limit = getattr(key_limits if which.startswith("key") else tenant_limits, which.split(".")[1])
            owner = f"key '{principal.key_id}'" if which.startswith("key") else f"tenant '{principal.tenant}'"
            unit = "requests" if which.endswith("rpm") else "tokens"
            raise RateLimitError(
                f"rate limit exceeded: {owner} allows {limit} {unit} per minute ({which})",
                retry_after_s=max(1.0, math.ceil(60 - (now % 60))),
                code="rate_limit_exceeded",
            )
        if status == 2:
            field = which.split(".")[1]
            limit = getattr(key_limits if which.startswith("key") else tenant_limits, field)
            owner = f"key '{principal.key_id}'" if which.startswith("key") else f"tenant '{principal.tenant}'"
            period = "daily" if field == "usd_per_day" else "monthly"
            error = BudgetExceededError(
                f"{period} budget exhausted: {owner} may spend ${limit:.2f}, ${float(detail):.4f} is spent "
                f"and this request may cost up to ${cost_usd:.4f} ({which})",
            )
            error.headers["retry-after"] = str(_seconds_to_next_period(now, field))
            raise error
        reservation.budget_share = float(detail)
        return reservation

    async def settle(self, policy: Policy, reservation: Reservation, used: UsageFigures) -> None:
        """Replace the reservation by what ``used`` (one request's figures) says, and record the usage."""
        if self._settle is None:
            return
        if not reservation.scope_keys:
            self._usage.add(reservation.usage_keys, used)
            self._ensure_flusher(policy.limits.redis_timeout_ms / 1000)
            return
        tokens = used.prompt_tokens + used.completion_tokens
        token_delta = tokens - reservation.tokens if reservation.tokens else 0
        cost_delta = used.cost_usd - reservation.cost_usd if reservation.tokens else 0.0
        args: list[str | int | float] = [token_delta, repr(cost_delta), *reservation.periods]
        for name, value in used.increments():
            args += [name, repr(value) if isinstance(value, float) else value]
        settle = self._settle
        await self._redis.run(
            lambda r: settle(keys=[*reservation.scope_keys, *reservation.usage_keys], args=args),
            None,
            policy.limits.redis_timeout_ms / 1000,
        )

    async def usage(
        self, keys: list[tuple[str, str]], start: datetime, end: datetime
    ) -> dict[str, UsageFigures] | None:
        """Daily usage hashes of ``(key_id, tenant)`` pairs summed per key over [start, end] (UTC days).

        None when Redis cannot answer.
        """
        days = [(start + timedelta(days=i)).strftime("%Y%m%d") for i in range((end - start).days + 1)]

        async def read(client: aioredis.Redis) -> dict[str, UsageFigures]:
            async with client.pipeline(transaction=False) as pipe:
                for key_id, tenant in keys:
                    for day in days:
                        pipe.hgetall(f"{tenant_prefix(tenant)}:use:k:{key_id}:{day}")
                rows = await pipe.execute()
            totals = {key_id: UsageFigures() for key_id, _ in keys}
            for index, row in enumerate(rows):
                totals[keys[index // len(days)][0]].add(UsageFigures.from_hash(row))
            return totals

        return await self._redis.run(read, None, 2.0)


USAGE_FLUSH_S = 1.0
_USAGE_RETENTION_DAYS = 92


class _UsageBuffer:
    """Usage of requests without limits, summed in memory between flushes (no Redis call per request)."""

    def __init__(self) -> None:
        self._pending: dict[str, UsageFigures] = {}
        self._expired: set[str] = set()

    def add(self, keys: tuple[str, str, str, str], used: UsageFigures) -> None:
        self._expired.update(keys[2:])
        for key in keys[:2]:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = UsageFigures()
            pending.add(used)

    def take(self) -> tuple[dict[str, UsageFigures], set[str]]:
        pending, self._pending = self._pending, {}
        expired, self._expired = self._expired, set()
        return pending, expired


def _limits(policy: Policy, principal: Principal) -> tuple[Limits, Limits]:
    tenant = policy.tenants.get(principal.tenant)
    return principal.limits, tenant.limits if tenant else _NO_LIMIT


def _limit_args(limits: Limits) -> list[str]:
    return [str(-1 if v is None else v) for v in (limits.rpm, limits.tpm, limits.usd_per_day, limits.usd_per_month)]


def _counter_keys(principal: Principal) -> tuple[str, str, str, str]:
    return _counter_keys_of(principal.tenant, principal.key_id)


@functools.lru_cache(maxsize=4096)
def _counter_keys_of(tenant_name: str, key_id: str) -> tuple[str, str, str, str]:
    prefix = tenant_prefix(tenant_name)
    key, tenant = f"{prefix}:rl:k:{key_id}", f"{prefix}:rl:t"
    return f"{key}:win", f"{key}:spend", f"{tenant}:win", f"{tenant}:spend"


def _periods(now: float) -> tuple[int, str, str]:
    return _periods_of_minute(int(now // 60))


@functools.lru_cache(maxsize=4)
def _periods_of_minute(minute: int) -> tuple[int, str, str]:
    """The minute and its UTC day and month: formatted once a minute, not on every request."""
    stamp = datetime.fromtimestamp(minute * 60, UTC)
    return minute, stamp.strftime("%Y%m%d"), stamp.strftime("%Y%m")


def _usage_keys(principal: Principal, now: float) -> tuple[str, str, str, str]:
    return _usage_keys_of_day(principal.tenant, principal.key_id, int(now // 86400))


@functools.lru_cache(maxsize=4096)
def _usage_keys_of_day(tenant: str, key_id: str, day: int) -> tuple[str, str, str, str]:
    """Today's usage hashes, then those of the day that leaves the retention period (built once a day per key)."""
    prefix = tenant_prefix(tenant)
    keys: list[str] = []
    for number in (day, day - _USAGE_RETENTION_DAYS):
        stamp = datetime.fromtimestamp(number * 86400, UTC).strftime("%Y%m%d")
        keys += [f"{prefix}:use:k:{key_id}:{stamp}", f"{prefix}:use:t:{stamp}"]
    return keys[0], keys[1], keys[2], keys[3]


def _seconds_to_next_period(now: float, field: str) -> int:
    stamp = datetime.fromtimestamp(now, UTC)
    if field == "usd_per_day":
        boundary = (stamp + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        year, month = (stamp.year + 1, 1) if stamp.month == 12 else (stamp.year, stamp.month + 1)
        boundary = stamp.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil(boundary.timestamp() - now))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
