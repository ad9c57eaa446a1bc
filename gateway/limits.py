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
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from gateway.auth import Principal
from gateway.cache.keys import tenant_prefix
from gateway.config.schema import Limits, Policy
from gateway.errors import BudgetExceededError, LimiterUnavailableError, RateLimitError
from gateway.services.redis_client import SharedRedis

__all__ = ["RateLimiter", "Reservation"]

_RESERVE = """
local frac, tokens, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function num(key) return tonumber(redis.call('GET', key) or '0') end
local share = 0
for s = 0, 1 do
  local k, a = s * 6, 3 + s * 4
  local rpm, tpm, day, month = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3]), tonumber(ARGV[a+4])
  local scope = (s == 0) and 'key' or 'tenant'
  if rpm >= 0 and num(KEYS[k+1]) + num(KEYS[k+2]) * (1 - frac) + 1 > rpm then return {1, scope .. '.rpm', '0'} end
  if tpm >= 0 and num(KEYS[k+3]) + num(KEYS[k+4]) * (1 - frac) + tokens > tpm then return {1, scope .. '.tpm', '0'} end
  local spent_day, spent_month = num(KEYS[k+5]), num(KEYS[k+6])
  if day >= 0 then
    if spent_day + cost > day then return {2, scope .. '.usd_per_day', tostring(spent_day)} end
    if day > 0 then share = math.max(share, spent_day / day) end
  end
  if month >= 0 then
    if spent_month + cost > month then return {2, scope .. '.usd_per_month', tostring(spent_month)} end
    if month > 0 then share = math.max(share, spent_month / month) end
  end
end
for s = 0, 1 do
  local k = s * 6
  redis.call('INCR', KEYS[k+1]); redis.call('EXPIRE', KEYS[k+1], 150)
  redis.call('INCRBY', KEYS[k+3], tokens); redis.call('EXPIRE', KEYS[k+3], 150)
  redis.call('INCRBYFLOAT', KEYS[k+5], cost); redis.call('EXPIRE', KEYS[k+5], 172800)
  redis.call('INCRBYFLOAT', KEYS[k+6], cost); redis.call('EXPIRE', KEYS[k+6], 2764800)
end
return {0, '', tostring(share)}
"""

# Replace the reservation by the actual figures, and add them to the day's usage hashes.
_SETTLE = """
local token_delta, cost_delta = tonumber(ARGV[1]), tonumber(ARGV[2])
for s = 0, 1 do
  local k = s * 3
  if token_delta ~= 0 then redis.call('INCRBY', KEYS[k+1], token_delta); redis.call('EXPIRE', KEYS[k+1], 150) end
  if cost_delta ~= 0 then
    redis.call('INCRBYFLOAT', KEYS[k+2], cost_delta)
    redis.call('INCRBYFLOAT', KEYS[k+3], cost_delta)
  end
end
for i = 7, 8 do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  redis.call('HINCRBY', KEYS[i], 'prompt_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[i], 'completion_tokens', ARGV[4])
  redis.call('HINCRBYFLOAT', KEYS[i], 'cost_usd', ARGV[5])
  redis.call('HINCRBYFLOAT', KEYS[i], 'baseline_cost_usd', ARGV[6])
  redis.call('HINCRBYFLOAT', KEYS[i], 'cache_saved_usd', ARGV[7])
  redis.call('HINCRBY', KEYS[i], 'cache_hits', ARGV[8])
  redis.call('HINCRBY', KEYS[i], 'errors', ARGV[9])
  redis.call('EXPIRE', KEYS[i], 8000000)
end
return 1
"""

_NO_LIMIT = Limits()


@dataclass(slots=True)
class Reservation:
    scope_keys: tuple[str, ...]
    """The key's and the tenant's (tokens this minute, usd today, usd this month) counters."""
    usage_keys: tuple[str, str]
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
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(_USAGE_FLUSH_S, timeout_s))

    async def _flush_every(self, interval_s: float, timeout_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush_usage(timeout_s)

    async def flush_usage(self, timeout_s: float = 1.0) -> None:
        """Write buffered usage (requests without limits) in one pipeline; at shutdown too."""
        pending = self._usage.take()
        if not pending:
            return

        async def write(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, fields in pending.items():
                    for field, value in fields.items():
                        if isinstance(value, float):
                            pipe.hincrbyfloat(key, field, value)
                        elif value:
                            pipe.hincrby(key, field, value)
                    pipe.expire(key, _USAGE_TTL_S)
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
        if not self.enforces(policy, principal):
            return Reservation((), usage, 0, 0.0, 0.0)  # nothing to enforce: usage is recorded in batches
        minute = int(now // 60)
        keys = _counter_keys(principal, minute, now)
        reservation = Reservation((keys[2], keys[4], keys[5], keys[8], keys[10], keys[11]), usage, tokens, cost_usd, 0.0)
        args = [now / 60 - minute, tokens, repr(cost_usd), *_limit_args(key_limits), *_limit_args(tenant_limits)]
        reserve = self._reserve
        result = await self._redis.run(
            lambda r: reserve(keys=list(keys), args=args), None, policy.limits.redis_timeout_ms / 1000
        )
        if result is None:
            if policy.limits.on_redis_error == "closed":
                raise LimiterUnavailableError("rate limits cannot be checked (Redis unavailable); refusing by policy")
            return Reservation((), usage, 0, 0.0, 0.0)
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

    async def settle(
        self, policy: Policy, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, cost_usd: float,
        baseline_cost_usd: float, cache_saved_usd: float, cache_hit: bool, error: bool,
    ) -> None:  # fmt: skip
        if self._settle is None:
            return
        if not reservation.scope_keys:
            self._usage.add(reservation.usage_keys, prompt_tokens, completion_tokens, cost_usd, baseline_cost_usd,
                            cache_saved_usd, cache_hit, error)  # fmt: skip
            self._ensure_flusher(policy.limits.redis_timeout_ms / 1000)
            return
        token_delta = prompt_tokens + completion_tokens - reservation.tokens if reservation.tokens else 0
        cost_delta = cost_usd - reservation.cost_usd if reservation.tokens else 0.0
        args = [token_delta, repr(cost_delta), prompt_tokens, completion_tokens, repr(cost_usd), repr(baseline_cost_usd),
                repr(cache_saved_usd), int(cache_hit), int(error)]  # fmt: skip
        settle = self._settle
        await self._redis.run(
            lambda r: settle(keys=[*reservation.scope_keys, *reservation.usage_keys], args=args),
            None,
            policy.limits.redis_timeout_ms / 1000,
        )

    async def usage(self, keys: list[tuple[str, str]], start: datetime, end: datetime) -> dict[str, dict[str, float]] | None:
        """Daily usage hashes of ``(key_id, tenant)`` pairs summed per key over [start, end] (UTC days).

        None when Redis cannot answer.
        """
        days = [(start + timedelta(days=i)).strftime("%Y%m%d") for i in range((end - start).days + 1)]

        async def read(client: aioredis.Redis) -> dict[str, dict[str, float]]:
            async with client.pipeline(transaction=False) as pipe:
                for key_id, tenant in keys:
                    for day in days:
                        pipe.hgetall(f"{tenant_prefix(tenant)}:use:k:{key_id}:{day}")
                rows = await pipe.execute()
            totals: dict[str, dict[str, float]] = {key_id: {} for key_id, _ in keys}
            for index, row in enumerate(rows):
                key_id = keys[index // len(days)][0]
                bucket = totals.setdefault(key_id, {})
                for field, value in row.items():
                    name = field.decode() if isinstance(field, bytes) else field
                    bucket[name] = bucket.get(name, 0.0) + float(value)
            return totals

        return await self._redis.run(read, None, 2.0)


_USAGE_FLUSH_S = 1.0
_USAGE_TTL_S = 8_000_000


class _UsageBuffer:
    """Usage of requests without limits, summed in memory between flushes (no Redis call per request)."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, int | float]] = {}

    def add(
        self, keys: tuple[str, str], prompt_tokens: int, completion_tokens: int, cost_usd: float,
        baseline_cost_usd: float, cache_saved_usd: float, cache_hit: bool, error: bool,
    ) -> None:  # fmt: skip
        for key in keys:
            fields = self._pending.get(key)
            if fields is None:
                fields = self._pending[key] = {
                    "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                    "baseline_cost_usd": 0.0, "cache_saved_usd": 0.0, "cache_hits": 0, "errors": 0,
                }  # fmt: skip
            fields["requests"] += 1
            fields["prompt_tokens"] += prompt_tokens
            fields["completion_tokens"] += completion_tokens
            fields["cost_usd"] += cost_usd
            fields["baseline_cost_usd"] += baseline_cost_usd
            fields["cache_saved_usd"] += cache_saved_usd
            fields["cache_hits"] += int(cache_hit)
            fields["errors"] += int(error)

    def take(self) -> dict[str, dict[str, int | float]]:
        pending, self._pending = self._pending, {}
        return pending


def _limits(policy: Policy, principal: Principal) -> tuple[Limits, Limits]:
    tenant = policy.tenants.get(principal.tenant)
    return principal.limits, tenant.limits if tenant else _NO_LIMIT


def _limit_args(limits: Limits) -> list[str]:
    return [str(-1 if v is None else v) for v in (limits.rpm, limits.tpm, limits.usd_per_day, limits.usd_per_month)]


def _counter_keys(principal: Principal, minute: int, now: float) -> tuple[str, ...]:
    prefix = tenant_prefix(principal.tenant)
    stamp = datetime.fromtimestamp(now, UTC)
    day, month = stamp.strftime("%Y%m%d"), stamp.strftime("%Y%m")
    keys: list[str] = []
    for scope in (f"k:{principal.key_id}", "t"):
        base = f"{prefix}:rl:{scope}"
        keys += [f"{base}:r:{minute}", f"{base}:r:{minute - 1}", f"{base}:tk:{minute}", f"{base}:tk:{minute - 1}",
                 f"{base}:d:{day}", f"{base}:m:{month}"]  # fmt: skip
    return tuple(keys)


def _usage_keys(principal: Principal, now: float) -> tuple[str, str]:
    day = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
    return (f"{tenant_prefix(principal.tenant)}:use:k:{principal.key_id}:{day}", f"{tenant_prefix(principal.tenant)}:use:t:{day}")


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
