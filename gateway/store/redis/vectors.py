""":class:`~gateway.store.base.VectorIndex` on Redis 8 vector sets (``VADD``/``VSIM``).

An index is a vector set; each element's entry is an ordinary key with a TTL, and a
sorted set records insertion times so the oldest elements go first past the cap.
"""

from __future__ import annotations

import time

import numpy as np
import redis.asyncio as aioredis

from gateway.store import keyspace
from gateway.store.base import VectorMatch
from gateway.store.redis.client import SharedRedis

__all__ = ["RedisVectorIndex"]

# Add one element, record its age, trim the set to its cap (oldest first), keep the set alive.
_ADD = """
local vkey, zkey = KEYS[1], KEYS[2]
local element, blob, now, cap, ttl, entry_prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
redis.call('VADD', vkey, 'FP32', blob, element)
redis.call('ZADD', zkey, now, element)
local excess = redis.call('ZCARD', zkey) - cap
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', zkey, excess)
  for i = 1, #oldest, 2 do
    redis.call('VREM', vkey, oldest[i])
    redis.call('DEL', entry_prefix .. oldest[i])
  end
end
redis.call('EXPIRE', vkey, ttl * 2)
redis.call('EXPIRE', zkey, ttl * 2)
return excess
"""


class RedisVectorIndex:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._add = redis.client.register_script(_ADD) if redis.client is not None else None

    async def nearest(self, index: str, vector: np.ndarray, count: int, timeout_s: float) -> list[VectorMatch]:
        blob = _fp32(vector)
        found = await self._redis.call(
            lambda r: r.execute_command("VSIM", index, "FP32", blob, "WITHSCORES", "COUNT", count),  # type: ignore[no-untyped-call]
            timeout_s,
        )
        # VSIM scores are (1 + cosine) / 2.
        return [VectorMatch(element, 2.0 * score - 1.0) for element, score in _pairs(found)]

    async def entries(self, index: str, elements: list[str], timeout_s: float) -> list[bytes | None]:
        if not elements:
            return []
        keys = [keyspace.semantic_entry(index, element) for element in elements]  # one tenant: one slot
        found = await self._redis.call(lambda r: r.mget(keys), timeout_s)
        return [raw.encode() if isinstance(raw, str) else raw for raw in found]

    async def add(
        self, index: str, element: str, vector: np.ndarray, entry: bytes, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        add = self._add
        if add is None:
            return
        blob = _fp32(vector)
        prefix = keyspace.semantic_entry_prefix(index)

        async def write(client: aioredis.Redis) -> None:
            await client.set(prefix + element, entry, ex=ttl_s)
            await add(
                keys=[index, keyspace.semantic_ages(index)],
                args=[element, blob, time.time(), max_entries, ttl_s, prefix],
            )

        await self._redis.call(write, timeout_s)

    async def remove(self, index: str, element: str, timeout_s: float) -> None:
        async def drop(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command("VREM", index, element)
                pipe.zrem(keyspace.semantic_ages(index), element)
                pipe.delete(keyspace.semantic_entry(index, element))
                await pipe.execute()

        await self._redis.call(drop, timeout_s)


def _fp32(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _pairs(found: object) -> list[tuple[str, float]]:
    """VSIM WITHSCORES replies as a map (RESP3) or a flat list (RESP2), best first."""
    if isinstance(found, dict):
        items = list(found.items())
    elif isinstance(found, list):
        items = list(zip(found[::2], found[1::2], strict=False))
    else:
        return []
    pairs = [(k.decode() if isinstance(k, bytes) else str(k), float(v)) for k, v in items]
    pairs.sort(key=lambda p: p[1], reverse=True)
    return pairs
