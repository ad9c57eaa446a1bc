""":class:`~gateway.store.base.KeyValue` on Redis: ``GET``/``SET EX``, leases as ``SET NX PX``
(renewed by a script), bounded lists as ``RPUSH``/``LTRIM``, float totals as ``INCRBYFLOAT``, collections bounded in bytes
as Lua scripts."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.store import keyspace
from gateway.store.base import BOUNDED_ENTRY_BYTES, BOUNDED_EVICTIONS_AT_MOST, StoreUnavailable
from gateway.store.redis.client import SharedRedis

__all__ = ["RedisKeyValue"]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_PUT_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

_PUT_BOUNDED = """#!lua
local size = string.len(ARGV[1]) + tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[2]) * 1000
local max = tonumber(ARGV[3])
if size > max then return -1 end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local total = tonumber(redis.call('HGET', KEYS[3], '#') or '0')
local function forget(key)
  local had = redis.call('HGET', KEYS[3], key)
  if had then
    total = total - tonumber(had)
    redis.call('HDEL', KEYS[3], key)
  end
  redis.call('ZREM', KEYS[2], key)
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl_ms)) do forget(key) end
forget(KEYS[1])
local deleted = 0
while total + size > max do
  if deleted == tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[3], '#', total)
    redis.call('DEL', KEYS[1])
    return -1
  end
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then
    total = 0
    break
  end
  forget(oldest[1])
  redis.call('DEL', oldest[1])
  deleted = deleted + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl_ms)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size, '#', total + size)
redis.call('PEXPIRE', KEYS[2], ttl_ms)
redis.call('PEXPIRE', KEYS[3], ttl_ms)
return deleted
"""
"""The ledger is a sorted set of its keys by the time they were stored (Redis's clock: every
host agrees) and a hash of their sizes with the total under ``#``. A key already gone (expired
or evicted) is forgotten when it is the oldest or its time is up: until then its bytes still
count, which errs on the side of the cap. The shebang (no flags; Redis 7) has a full Redis refuse
the whole script: one without it is checked at its first write only, here a removal, and a full
Redis kept every stored response past its ``maxmemory`` (t130)."""

_GET_BOUNDED = """#!lua flags=allow-oom
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl_ms = tonumber(ARGV[1]) * 1000
local values = {}
local used = false
for i = 3, #KEYS do
  local value = redis.call('GET', KEYS[i])
  values[i - 2] = value
  if value and redis.call('ZSCORE', KEYS[1], KEYS[i]) then
    redis.call('ZADD', KEYS[1], now, KEYS[i])
    redis.call('PEXPIRE', KEYS[i], ttl_ms)
    used = true
  end
end
if used then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('PEXPIRE', KEYS[2], ttl_ms)
end
return values
"""
"""A key used is stored again, as far as the ledger can tell: its time (the sorted set's score,
which the expired keys' sweep also reads) and its TTL restart together. A full Redis runs it too
(``allow-oom``): it only changes what is there, a score and TTLs, and refusing it refused the read,
so a conversation could not be continued while its turns could be read (t130)."""

_DELETE_BOUNDED = """#!lua flags=allow-oom
local had = redis.call('HGET', KEYS[3], KEYS[1])
if had then
  redis.call('HDEL', KEYS[3], KEYS[1])
  redis.call('HINCRBY', KEYS[3], '#', -tonumber(had))
end
redis.call('ZREM', KEYS[2], KEYS[1])
local deleted = redis.call('DEL', KEYS[1])
if ARGV[1] ~= '0' then redis.call('SET', KEYS[1], '', 'EX', ARGV[1]) end
return deleted
"""
"""Run by a full Redis too: a delete frees memory, and the mark that keeps a late write out
(``keep_out_s``) is a few bytes."""

_APPEND_COUNTED = """#!lua
local count = tonumber(redis.call('GET', KEYS[2]) or '0')
if count == nil then return redis.error_reply('ERR the count is not a number') end
if count >= tonumber(ARGV[5]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('INCRBYFLOAT', KEYS[2], 1)
redis.call('EXPIRE', KEYS[2], ARGV[4], 'NX')
return 1
"""
"""A script runs whole unless a command in it fails, and what ran before stays: the commands that
can fail (a key holding another type) come before any write, and a full Redis refuses it whole
(the shebang). ``INCRBYFLOAT``: the count is the one :meth:`add_float` kept, as older gateways keep it."""


class RedisKeyValue:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        client = redis.client
        self._release = client.register_script(_RELEASE) if client is not None else None
        self._renew = client.register_script(_RENEW) if client is not None else None
        self._put_and_release = client.register_script(_PUT_AND_RELEASE) if client is not None else None
        self._put_bounded = client.register_script(_PUT_BOUNDED) if client is not None else None
        self._get_bounded = client.register_script(_GET_BOUNDED) if client is not None else None
        self._delete_bounded = client.register_script(_DELETE_BOUNDED) if client is not None else None
        self._append_counted = client.register_script(_APPEND_COUNTED) if client is not None else None

    async def get(self, key: str, timeout_s: float) -> bytes | None:
        raw = await self._redis.call(lambda r: r.get(key), timeout_s)
        return raw.encode() if isinstance(raw, str) else raw

    async def put(self, key: str, value: bytes, ttl_s: int, timeout_s: float, release: str | None = None) -> None:
        script = self._put_and_release
        if release is None or script is None:
            await self._redis.call(lambda r: r.set(key, value, ex=ttl_s), timeout_s)
        else:  # the key and its lease share the tenant's hash tag: one slot in a cluster
            keys = [key, keyspace.lease(key)]
            args: list[bytes | int | str] = [value, ttl_s, release]
            await self._redis.call(lambda r: script(keys=keys, args=args), timeout_s)

    async def get_many(self, keys: list[str], timeout_s: float) -> list[bytes | None]:
        if not keys:
            return []
        raws = await self._redis.call(lambda r: r.mget(keys), timeout_s)
        return [raw.encode() if isinstance(raw, str) else raw for raw in raws]

    async def put_many(self, items: list[tuple[str, bytes]], ttl_s: int, timeout_s: float) -> None:
        if not items:
            return

        async def write(r: aioredis.Redis) -> None:
            pipe = r.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=ttl_s)
            await pipe.execute()

        await self._redis.call(write, timeout_s)

    async def put_bounded(
        self,
        key: str,
        value: bytes,
        ttl_s: int,
        ledger: str,
        max_bytes: int,
        timeout_s: float,
        *,
        new_only: bool = False,
    ) -> int | None:
        script = self._put_bounded
        if script is None:
            raise StoreUnavailable
        keys = [key, ledger, f"{ledger}:bytes"]
        args: list[bytes | int | str] = [
            value,
            ttl_s,
            max_bytes,
            BOUNDED_ENTRY_BYTES,
            BOUNDED_EVICTIONS_AT_MOST,
            int(new_only),
        ]
        deleted = await self._redis.call(lambda r: script(keys=keys, args=args), timeout_s)
        return None if deleted < 0 else int(deleted)

    async def get_bounded(self, keys: list[str], ledger: str, ttl_s: int, timeout_s: float) -> list[bytes | None]:
        script = self._get_bounded
        if script is None:
            raise StoreUnavailable
        if not keys:
            return []
        every = [ledger, f"{ledger}:bytes", *keys]
        raws = await self._redis.call(lambda r: script(keys=every, args=[ttl_s]), timeout_s)
        return [raw.encode() if isinstance(raw, str) else raw for raw in raws]

    async def delete_bounded(self, key: str, ledger: str, timeout_s: float, *, keep_out_s: int = 0) -> bool:
        script = self._delete_bounded
        if script is None:
            raise StoreUnavailable
        keys = [key, ledger, f"{ledger}:bytes"]
        return bool(await self._redis.call(lambda r: script(keys=keys, args=[keep_out_s]), timeout_s))

    async def delete(self, key: str, timeout_s: float) -> bool:
        return bool(await self._redis.call(lambda r: r.delete(key), timeout_s))

    async def acquire(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        lease = keyspace.lease(key)
        return bool(await self._redis.call(lambda r: r.set(lease, token, nx=True, px=ttl_ms), timeout_s))

    async def release(self, key: str, token: str, timeout_s: float) -> None:
        release = self._release
        if release is not None:
            lease = keyspace.lease(key)
            await self._redis.call(lambda r: release(keys=[lease], args=[token]), timeout_s)

    async def renew(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        renew = self._renew
        if renew is None:
            raise StoreUnavailable
        lease = keyspace.lease(key)
        return bool(await self._redis.call(lambda r: renew(keys=[lease], args=[token, ttl_ms]), timeout_s))

    async def peek(self, key: str, timeout_s: float) -> tuple[bytes | None, bool]:
        return await self._redis.call(lambda r: _value_and_lease(r, key), timeout_s)

    async def append(self, key: str, value: bytes, max_len: int, ttl_s: int, timeout_s: float) -> None:
        async def write(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, value)
                pipe.ltrim(key, -max_len, -1)
                pipe.expire(key, ttl_s)
                await pipe.execute()

        await self._redis.call(write, timeout_s)

    async def append_counted(
        self, key: str, value: bytes, max_len: int, ttl_s: int, counter: str, counter_ttl_s: int, at_most: int,
        timeout_s: float,
    ) -> bool:  # fmt: skip
        script = self._append_counted
        if script is None:
            raise StoreUnavailable
        args: list[bytes | int | str] = [value, max_len, ttl_s, counter_ttl_s, at_most]
        return bool(await self._redis.call(lambda r: script(keys=[key, counter], args=args), timeout_s))

    async def read_list(self, key: str, timeout_s: float) -> list[bytes]:
        items = await self._redis.call(lambda r: r.lrange(key, 0, -1), timeout_s)
        return [i.encode() if isinstance(i, str) else i for i in items]

    async def add_float(self, key: str, amount: float, ttl_s: int, timeout_s: float) -> float:
        async def add(client: aioredis.Redis) -> float:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(key, amount)
                pipe.expire(key, ttl_s, nx=True)
                total, _ = await pipe.execute()
            return float(total)

        return await self._redis.call(add, timeout_s)


async def _value_and_lease(client: aioredis.Redis, key: str) -> tuple[bytes | None, bool]:
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.exists(keyspace.lease(key))
        raw, leased = await pipe.execute()
    return raw, bool(leased)
