""":class:`~gateway.store.base.LimitCounters` on Redis: one Lua script per reservation and per settlement.

Each scope has two fixed-size hashes and no TTL: ``win`` holds this minute's and the
previous minute's requests and tokens (m, r, rp, t, tp), ``spend`` today's and this
month's USD (day, d, month, mo) and the part of them that reservations not yet settled
hold (hd, hm), and the same of the day and the month before (pday, pd, phd, pmonth, pmo,
phm). A period that has passed is rolled over here rather than expired, so
Redis's volatile-ttl eviction, which only takes keys with a TTL (cache entries), can
never reset a limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from gateway.accounting.usage import UsageFigures
from gateway.store import keyspace
from gateway.store.base import (
    BUDGET_ROUNDING,
    HELD_DUST,
    PENDING_S,
    Caps,
    ReserveOutcome,
    ReserveRequest,
    SettleRequest,
    Spent,
    StoreUnavailable,
)
from gateway.store.redis.client import SharedRedis

__all__ = ["RedisLimitCounters"]

_log = structlog.get_logger("gateway.redis")

_KEPT_S = 35 * 24 * 3600
"""How long an unsettled reservation's mark and its tenant's pending set are kept: a month's
budget counts it until the month ends, however long the tenant then stays away. A settled
mark is rewritten 's' for 120 s, so only reservations whose process died stay this long."""

# What the scripts below share. A spend field (d, mo) that holds no finite number (inf, kept by a
# gateway before t94 from a price of 1e308) refused every later increment, which wedged its key's
# settlements and budgets till the month ended: it is corrupt, and where a script meets it, it
# starts afresh from 0 (what it held is unknown; a negative correction is then dropped) and is
# named in the script's answer (``corrupt``), which the caller logs. A cost that is no finite
# number is never written: it would be such a field.
_SPEND = """
local corrupt = {}
local function finite(x) return x ~= nil and x == x and x > -math.huge and x < math.huge end
local function reset(key, field, value)
  redis.call('HSET', key, field, value)
  corrupt[#corrupt + 1] = key .. ' ' .. field
  return value
end
local function held(key, field, value)
  if value and not finite(tonumber(value)) then return reset(key, field, 0) end
  return tonumber(value or '0')
end
local function add(key, field, value, cost)
  if value and not finite(tonumber(value)) then reset(key, field, math.max(tonumber(cost), 0))
  else redis.call('HINCRBYFLOAT', key, field, cost) end
end
-- A request counts in the day and month it started (t114), and one started before midnight may
-- reserve, settle or be given up after it (f203: a slow upload from 23:59:50 reserved at 00:00:12,
-- and wrote December over January's counter, whose budget then let 3.5 times itself through). So
-- each counter keeps its latest day and month and the one before each: an older period is counted
-- in its own place and checked against its own budget, and never replaces a newer one.
local DAY = {'day', 'd', 'hd', 'pday', 'pd', 'phd'}
local MONTH = {'month', 'mo', 'hm', 'pmonth', 'pmo', 'phm'}
-- Where period p of kind f counts in key: 1 the latest, 2 the one before, 3 newer than the latest
-- (which becomes the one before), 4 between the two (nothing was counted in it), 0 older than both
-- (a request that outlasted a whole day: not counted).
local function slot(key, f, p)
  local v = redis.call('HMGET', key, f[1], f[4])
  if v[1] == p then return 1 end
  if v[2] == p then return 2 end
  if not v[1] or v[1] < p then return 3 end
  if not v[2] or v[2] < p then return 4 end
  return 0
end
-- The spend and held fields of a slot counted in (1 or 2), else nil.
local function fields(f, at)
  if at == 1 then return f[2], f[3] end
  if at == 2 then return f[5], f[6] end
end
-- What period p (in slot at) has spent and holds: 0 where nothing is counted in it yet.
local function tally(key, f, at)
  local spent, holding = fields(f, at)
  if not spent then return 0, 0 end
  local v = redis.call('HMGET', key, spent, holding)
  return held(key, spent, v[1]), tonumber(v[2] or '0')
end
-- Period p's spend and held set in slot at, room made for a new one.
local function put(key, f, p, at, spent, holding)
  if at == 3 then
    local v = redis.call('HMGET', key, f[1], f[2], f[3])
    if v[1] then redis.call('HSET', key, f[4], v[1], f[5], v[2] or 0, f[6], v[3] or 0) end
    redis.call('HSET', key, f[1], p, f[2], spent, f[3], holding)
  elseif at == 1 then redis.call('HSET', key, f[2], spent, f[3], holding)
  elseif at ~= 0 then redis.call('HSET', key, f[4], p, f[5], spent, f[6], holding) end
end
local function add_period(key, f, p, cost, fresh)
  local at = slot(key, f, p)
  local spent = fields(f, at)
  if spent then add(key, spent, redis.call('HGET', key, spent), cost)
  elseif fresh and at ~= 0 then put(key, f, p, at, cost, 0) end
end
local function add_spend(key, day, month, cost, fresh)
  if not finite(tonumber(cost)) then return end
  add_period(key, DAY, day, cost, fresh)
  add_period(key, MONTH, month, cost, fresh)
end
local function release_period(key, f, p, usd)
  local _, holding = fields(f, slot(key, f, p))
  local v = holding and redis.call('HGET', key, holding)
  local left = v and (tonumber(v) or 0) - usd
  if left then redis.call('HSET', key, holding, left > HELD_DUST and left or 0) end  -- float leftovers: none held
end
local function release(key, day, month, usd)
  if not finite(usd) then return end
  release_period(key, DAY, day, usd)
  release_period(key, MONTH, month, usd)
end
""".replace("HELD_DUST", repr(HELD_DUST))
"""``held``: what a spend field holds; ``add_spend``: ``cost`` added to a spend counter's day and
month (the latest or the one before), a new period opened when ``fresh`` (else left alone, as is
one older than both); ``release``: ``usd`` taken off what reservations in flight hold of that day and
month (hd, hm: the part of d and mo that is estimates of requests not yet settled)."""

# KEYS: window, spend of each scope, then (optionally) the tenant's pending reservations and the
# reservation's mark. ARGV: fraction, tokens, cost, minute, day, month, requests (0: counted
# already, and no rpm refuses it), then rpm, tpm, usd_per_day, usd_per_month of each scope (-1: no
# limit). A rate refusal also returns the refused measure's counts, this minute's and the previous
# one's. A marked reservation is also pending, with what undoes it in its mark, until settled: one
# its process never settled (killed mid-request) is undone by the tenant's next reservation once
# PENDING_S have passed, its mark then 'x' (a settlement that still comes counts whole, as one never
# reserved). The answer's fifth item is ``corrupt``, then a rate refusal's counts.
_RESERVE = (
    _SPEND
    + """
local scopes = (#ARGV - 7) / 4
local marked = #KEYS > scopes * 2
local frac, tokens, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not finite(cost) then cost = 0 end
local minute, day, month, requests = tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7])
local now = (minute + frac) * 60
if marked then
  local pending = KEYS[#KEYS - 1]
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', pending, '-inf', now, 'LIMIT', 0, 20)) do
    local v = redis.call('GET', m)
    if v and string.sub(v, 1, 2) == 'r{' then
      local u = cjson.decode(string.sub(v, 2))
      for _, key in ipairs(u.spends) do
        add_spend(key, u.day, u.month, -u.cost, false)
        release(key, u.day, u.month, u.cost)
      end
      redis.call('SET', m, 'x', 'EX', KEPT_S)
    end
    redis.call('ZREM', pending, m)
  end
end
local function window(key)
  local v = redis.call('HMGET', key, 'm', 'r', 'rp', 't', 'tp')
  local m = tonumber(v[1] or '-2')
  local r, rp, t, tp = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0'), tonumber(v[5] or '0')
  if m == minute then return {r, rp, t, tp} end
  if m == minute - 1 then return {0, r, 0, t} end
  return {0, 0, 0, 0}
end
local function past(spent, usd, cap) return spent + usd > cap * (1 + BUDGET_ROUNDING) end  -- base.past_budget
local share, seen, told = 0, {}, {}
for s = 0, scopes - 1 do
  local key = KEYS[s*2+2]
  local at_day, at_month = slot(key, DAY, day), slot(key, MONTH, month)
  local spent_day, held_day = tally(key, DAY, at_day)
  local spent_month, held_month = tally(key, MONTH, at_month)
  seen[s] = {at_day, at_month, spent_day, spent_month, held_day, held_month}
  told[#told + 1] = string.format('%.17g,%.17g,%.17g,%.17g', spent_day, spent_month, held_day, held_month)
end
told = table.concat(told, ';')
for s = 0, scopes - 1 do
  local a = 7 + s * 4
  local rpm, tpm, per_day, per_month = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3]), tonumber(ARGV[a+4])
  local w = window(KEYS[s*2+1])
  local spent_day, spent_month = seen[s][3], seen[s][4]
  seen[s].w = w
  if rpm >= 0 and requests > 0 and w[1] + w[2] * (1 - frac) + requests > rpm then return {1, s .. '.rpm', '0', told, corrupt, w[1], w[2]} end
  if tpm >= 0 and w[3] + w[4] * (1 - frac) + tokens > tpm then return {1, s .. '.tpm', '0', told, corrupt, w[3], w[4]} end
  if per_day >= 0 then
    if past(spent_day, cost, per_day) then return {1, s .. '.usd_per_day', tostring(spent_day), told, corrupt} end
    if per_day > 0 then share = math.max(share, spent_day / per_day) end
  end
  if per_month >= 0 then
    if past(spent_month, cost, per_month) then return {1, s .. '.usd_per_month', tostring(spent_month), told, corrupt} end
    if per_month > 0 then share = math.max(share, spent_month / per_month) end
  end
end
local hold = marked and cost or 0  -- a marked reservation is held until its settlement releases it
for s = 0, scopes - 1 do
  local w, v = seen[s].w, seen[s]
  redis.call('HSET', KEYS[s*2+1], 'm', minute, 'r', w[1] + requests, 'rp', w[2], 't', w[3] + tokens, 'tp', w[4])
  put(KEYS[s*2+2], DAY, day, v[1], v[3] + cost, v[5] + hold)
  put(KEYS[s*2+2], MONTH, month, v[2], v[4] + cost, v[6] + hold)
end
if marked then
  local spends = {}
  for s = 0, scopes - 1 do spends[#spends + 1] = KEYS[s*2+2] end
  local undo = cjson.encode({cost = cost, day = day, month = month, spends = spends})
  redis.call('SET', KEYS[#KEYS], 'r' .. undo, 'EX', KEPT_S)
  redis.call('ZADD', KEYS[#KEYS - 1], now + PENDING_S, KEYS[#KEYS])
  redis.call('EXPIRE', KEYS[#KEYS - 1], KEPT_S)
end
return {0, '', tostring(share), told, corrupt}
""".replace("PENDING_S", str(PENDING_S))
    .replace("KEPT_S", str(_KEPT_S))
    .replace("BUDGET_ROUNDING", repr(BUDGET_ROUNDING))
)

# KEYS: window, spend of each scope, then the usage sums, the expired sums and (optionally) the
# tenant's pending reservations and the reservation's mark. ARGV: token delta, cost delta, minute, day, month, number of scopes, number
# of usage sums, tokens and cost used, 1 when the last key is the mark (else 0), 1 when the
# reservation is known to be made (its call answered), the estimate it held, then field/value
# pairs to add to the usage sums. A mark "s": this settlement was applied already (sent again after
# a timeout), and is not applied twice. Else, for a reservation whose call timed out, "r" says it
# was made: the deltas correct it, and its estimate is no longer held; no mark, it never reached
# Redis: what was used counts whole. Answers ``corrupt``.
_SETTLE = (
    _SPEND
    + """
local scopes, sums = tonumber(ARGV[6]), tonumber(ARGV[7])
local marked = ARGV[10] == '1'
local made = true
if marked then
  local state = redis.call('GET', KEYS[#KEYS])
  if state == 's' then return corrupt end
  if state == 'x' then made = false  -- undone as never settled: what was used counts whole
  else made = ARGV[11] == '1' or (state and string.sub(state, 1, 1) == 'r') end
  redis.call('ZREM', KEYS[#KEYS - 1], KEYS[#KEYS])
end
local token_delta, cost_delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if not made then token_delta, cost_delta = tonumber(ARGV[8]), tonumber(ARGV[9]) end
local minute, day, month = tonumber(ARGV[3]), ARGV[4], ARGV[5]
for s = 0, scopes - 1 do
  local win, spend = KEYS[s*2+1], KEYS[s*2+2]
  if token_delta ~= 0 then
    local m = tonumber(redis.call('HGET', win, 'm') or '-2')
    if m == minute then redis.call('HINCRBY', win, 't', token_delta)
    elseif m == minute + 1 then redis.call('HINCRBY', win, 'tp', token_delta) end
  end
  if cost_delta ~= 0 then add_spend(spend, day, month, cost_delta, not made) end
  if marked and made then release(spend, day, month, tonumber(ARGV[12])) end
end
for i = scopes * 2 + 1, scopes * 2 + sums do
  for j = 13, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[i], ARGV[j], ARGV[j + 1]) end
end
for i = scopes * 2 + sums + 1, marked and #KEYS - 2 or #KEYS do redis.call('DEL', KEYS[i]) end
if marked then redis.call('SET', KEYS[#KEYS], 's', 'EX', 120) end
return corrupt
"""
)


# KEYS: one spend counter. ARGV: day, month, USD. A request that reserved nothing (no limit
# applied to it) spent this: counted as a reservation would count it, a period that has passed
# rolled over, and one older than the counter's left alone. A negative amount (the correction of
# a reservation's estimate) applies only to the period the reservation was counted in. Answers ``corrupt``.
_ADD_SPEND = (
    _SPEND
    + """
add_spend(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[3]) > 0)
return corrupt
"""
)


_ADD_USAGE = (
    _SPEND
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return corrupt end
local ops = cjson.decode(ARGV[2])
for _, op in ipairs(ops.u) do
  if op[4] then redis.call('HINCRBYFLOAT', KEYS[op[1]], op[2], op[3])
  else redis.call('HINCRBY', KEYS[op[1]], op[2], op[3]) end
end
for _, at in ipairs(ops.x) do redis.call('DEL', KEYS[at]) end
for _, op in ipairs(ops.s) do add_spend(KEYS[op[1]], op[2], op[3], op[4], tonumber(op[4]) > 0) end
return corrupt
"""
)
"""One tenant's part of a usage batch, applied once: its mark (``KEYS[1]``) is set with it. Answers ``corrupt``."""
_BATCH_MARK_TTL_S = 3600
"""How long an applied batch is remembered: longer than a batch is sent again for."""


class RedisLimitCounters:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        client = redis.client
        self._reserve = client.register_script(_RESERVE) if client is not None else None
        self._settle = client.register_script(_SETTLE) if client is not None else None
        self._add_spend = client.register_script(_ADD_SPEND) if client is not None else None
        self._add_usage = client.register_script(_ADD_USAGE) if client is not None else None

    async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
        script = self._reserve
        if script is None:
            raise StoreUnavailable
        keys = [key for scope in request.scopes for key in (scope.window, scope.spend)]
        if request.mark is not None:
            keys += [keyspace.pending_reservations(request.mark), request.mark]
        args: list[str | int | float] = [
            request.minute_fraction,
            request.tokens,
            repr(request.cost_usd),
            request.minute,
            request.day,
            request.month,
            request.requests,
        ]
        for scope in request.scopes:
            args += _cap_args(scope.caps)
        status, which, detail, told, corrupt, *window = await self._redis.call(
            lambda r: script(keys=keys, args=args), timeout_s
        )
        _said_corrupt(corrupt)
        figures = [[float(amount) for amount in scope.split(",")] for scope in _text(told).split(";")]
        spent = tuple((day, month) for day, month, _, _ in figures)
        held = tuple((day, month) for _, _, day, month in figures)
        if int(status) == 0:
            return ReserveOutcome(None, 0.0, float(_text(detail)), spent=spent, held=held)
        counted = (float(window[0]), float(window[1])) if window else (0.0, 0.0)
        return ReserveOutcome(_text(which), float(_text(detail)), 0.0, counted, spent, held)

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        script = self._settle
        if script is None:
            raise StoreUnavailable
        keys = [key for scope in request.scopes for key in (scope.window, scope.spend)]
        keys += [*request.usage_keys, *request.expired_keys]
        if request.mark is not None:
            keys += [keyspace.pending_reservations(request.mark), request.mark]
        args: list[str | int | float] = [
            request.token_delta,
            repr(request.cost_delta),
            request.minute,
            request.day,
            request.month,
            len(request.scopes),
            len(request.usage_keys),
            request.tokens,
            repr(request.cost_usd),
            1 if request.mark is not None else 0,
            1 if request.made else 0,
            repr(request.held_usd),
        ]
        for name, value in request.used.increments():
            args += [name, repr(value) if isinstance(value, float) else value]
        _said_corrupt(await self._redis.call(lambda r: script(keys=keys, args=args), timeout_s))

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        if batch is not None:
            await self._add_usage_once(sums, expired, spent, timeout_s, batch)
            return
        add_spend = self._add_spend

        async def write(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, used in sums.items():
                    for field, value in used.increments():
                        if isinstance(value, float):
                            pipe.hincrbyfloat(key, field, value)
                        else:
                            pipe.hincrby(key, field, value)
                for key in expired:
                    pipe.delete(key)
                await pipe.execute()
            # one script call per counter, not in the pipeline: a cluster's pipeline does not load scripts
            for (key, day, month), cost in spent.items():
                if add_spend is not None and cost:
                    _said_corrupt(await add_spend(keys=[key], args=[day, month, repr(cost)]))

        await self._redis.call(write, timeout_s)

    async def _add_usage_once(
        self, sums: Mapping[str, UsageFigures], expired: Iterable[str], spent: Spent, timeout_s: float, batch: str
    ) -> None:
        script = self._add_usage
        if script is None:
            raise StoreUnavailable
        parts: dict[str, _BatchPart] = {}

        def part_of(key: str) -> _BatchPart:
            tag = keyspace.hash_tag(key)  # one slot per script call
            found = parts.get(tag)
            if found is None:
                found = parts[tag] = _BatchPart([f"{tag}:ub:{batch}"])
            return found

        for key, used in sums.items():
            part = part_of(key)
            at = part.key(key)
            part.ops["u"].extend([at, name, repr(value), isinstance(value, float)] for name, value in used.increments())
        for key in expired:
            part = part_of(key)
            part.ops["x"].append(part.key(key))
        for (key, day, month), cost in spent.items():
            if cost:
                part = part_of(key)
                part.ops["s"].append([part.key(key), day, month, repr(cost)])

        async def write(client: aioredis.Redis) -> None:
            for part in parts.values():
                args: list[bytes | int] = [_BATCH_MARK_TTL_S, msgspec.json.encode(part.ops)]
                _said_corrupt(await script(keys=part.keys, args=args))

        await self._redis.call(write, timeout_s)

    async def index_usage(self, members: Mapping[str, Iterable[str]], ttl_s: int, timeout_s: float) -> None:
        async def write(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for day, names in members.items():
                    key = keyspace.usage_index(day)
                    pipe.sadd(key, *names)
                    pipe.expire(key, ttl_s)
                await pipe.execute()

        await self._redis.call(write, timeout_s)

    async def indexed_usage(self, days: Sequence[str], timeout_s: float) -> set[str]:
        async def read(client: aioredis.Redis) -> set[str]:
            async with client.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.smembers(keyspace.usage_index(day))
                found = await pipe.execute()
            return {_text(member) for members in found for member in members}

        return await self._redis.call(read, timeout_s)

    async def read_usage(self, keys: Sequence[str], timeout_s: float) -> list[UsageFigures]:
        async def read(client: aioredis.Redis) -> list[UsageFigures]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                rows = await pipe.execute()
            return [UsageFigures.from_hash(row) for row in rows]

        return await self._redis.call(read, timeout_s)


class _BatchPart:
    """One tenant's keys of a usage batch (its mark first) and what to do to them, by key position."""

    __slots__ = ("keys", "ops")

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.ops: dict[str, list[Any]] = {"u": [], "x": [], "s": []}

    def key(self, name: str) -> int:
        """``name``'s position in the script's KEYS (1-based), added if new."""
        self.keys.append(name)
        return len(self.keys)


def _said_corrupt(fields: Sequence[object]) -> None:
    """Log each spend field a script found corrupt and set to 0: said once, as it is then a number."""
    for field in fields:
        key, name = _text(field).rsplit(" ", 1)
        _log.warning(
            "spend_counter_reset",
            key=key,
            field=name,
            reason="held no finite number (what it held is unknown): set to 0",
        )


def _cap_args(caps: Caps) -> list[str]:
    return [str(-1 if v is None else v) for v in (caps.rpm, caps.tpm, caps.usd_per_day, caps.usd_per_month)]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
