""":class:`~gateway.store.base.KeyValue` on Redis: ``GET``/``SET EX``, leases as ``SET NX PX``."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.store import keyspace
from gateway.store.redis.client import SharedRedis

__all__ = ["RedisKeyValue"]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisKeyValue:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._release = redis.client.register_script(_RELEASE) if redis.client is not None else None

    async def get(self, key: str, timeout_s: float) -> bytes | None:
        raw = await self._redis.call(lambda r: r.get(key), timeout_s)
        return raw.encode() if isinstance(raw, str) else raw

    async def put(self, key: str, value: bytes, ttl_s: int, timeout_s: float) -> None:
        await self._redis.call(lambda r: r.set(key, value, ex=ttl_s), timeout_s)

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

    async def peek(self, key: str, timeout_s: float) -> tuple[bytes | None, bool]:
        return await self._redis.call(lambda r: _value_and_lease(r, key), timeout_s)


async def _value_and_lease(client: aioredis.Redis, key: str) -> tuple[bytes | None, bool]:
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.exists(keyspace.lease(key))
        raw, leased = await pipe.execute()
    return raw, bool(leased)
