"""The exact cache and request coalescing, both keyed by :func:`gateway.cache.keys.exact_key`."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.cache.entries import CachedAnswer
from gateway.services.redis_client import RedisUnavailable, SharedRedis

__all__ = ["ExactCache", "Lease"]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(slots=True)
class Lease:
    """Held by the one request that calls upstream for a key; others wait for its answer."""

    key: str
    token: str
    future: asyncio.Future[CachedAnswer | None]
    held_in_redis: bool


class ExactCache:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._flights: dict[str, asyncio.Future[CachedAnswer | None]] = {}
        self._release = redis.client.register_script(_RELEASE) if redis.client is not None else None

    async def get(self, key: str, timeout_s: float) -> CachedAnswer | None:
        """The stored answer, or None; raises RedisUnavailable when the cache could not be asked."""
        raw = await self._redis.call(lambda r: r.get(key), timeout_s)
        return CachedAnswer.decode(raw) if raw else None

    async def put(self, key: str, answer: CachedAnswer, ttl_s: int, timeout_s: float) -> None:
        await self._redis.run(lambda r: r.set(key, answer.encode(), ex=ttl_s), None, timeout_s)

    async def join_or_lead(self, key: str, wait_s: float, timeout_s: float) -> tuple[CachedAnswer | None, Lease | None]:
        """Coalesce identical in-flight requests, within this process and across processes.

        Returns ``(answer, None)`` when another request's answer arrived in time,
        ``(None, lease)`` when this request must call upstream and release the lease
        after, and ``(None, None)`` when waiting gave nothing (call upstream, no lease).
        """
        local = self._flights.get(key)
        if local is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(local), wait_s), None
            except TimeoutError:
                return None, None
        future: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
        self._flights[key] = future
        token = secrets.token_hex(8)
        lock_ms = int(wait_s * 1000) + 1000
        try:
            acquired = await self._redis.call(lambda r: r.set(_lock(key), token, nx=True, px=lock_ms), timeout_s)
        except RedisUnavailable:  # no lock to be had: this process answers alone
            return None, Lease(key, token, future, held_in_redis=False)
        if acquired:
            return None, Lease(key, token, future, held_in_redis=True)
        # Another process is answering: wait for its answer to appear in the cache.
        answer = await self._await_other_process(key, wait_s, timeout_s)
        self._settle(key, future, answer)
        return answer, None

    async def release(self, lease: Lease, answer: CachedAnswer | None, timeout_s: float) -> None:
        """Hand the answer (or None: failed, or not cacheable) to the waiters and drop the lock."""
        self._settle(lease.key, lease.future, answer)
        if lease.held_in_redis and self._release is not None:
            release = self._release
            await self._redis.run(lambda r: release(keys=[_lock(lease.key)], args=[lease.token]), None, timeout_s)

    def _settle(self, key: str, future: asyncio.Future[CachedAnswer | None], answer: CachedAnswer | None) -> None:
        if not future.done():
            future.set_result(answer)
        if self._flights.get(key) is future:
            del self._flights[key]

    async def _await_other_process(self, key: str, wait_s: float, timeout_s: float) -> CachedAnswer | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        delay = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.05)
            nothing: tuple[bytes | None, int] = (None, 0)
            raw, locked = await self._redis.run(lambda r: _get_and_lock_state(r, key), nothing, timeout_s)
            if raw:
                return CachedAnswer.decode(raw)
            if not locked:
                return None  # the leader finished without an answer (error, or not cacheable)
        return None


def _lock(key: str) -> str:
    return key + ":lock"


async def _get_and_lock_state(client: aioredis.Redis, key: str) -> tuple[bytes | None, int]:
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.exists(_lock(key))
        raw, locked = await pipe.execute()
    return raw, locked
