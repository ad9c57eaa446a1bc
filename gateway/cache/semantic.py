"""The semantic cache: Redis 8 vector sets, one per namespace, answers in ordinary keys with a TTL.

Layout, all under the tenant's hash-tagged prefix (``gw:{t}``):
- ``gw:{t}:v:<ns>``: the vector set (VADD/VSIM) of prompt embeddings for a namespace
  (route, system prompt and the parameters that change the answer);
- ``gw:{t}:v:<ns>:e:<id>``: the answer for element ``<id>``, expiring after ``ttl_s``;
- ``gw:{t}:v:<ns>:z``: element ids by insertion time, for evicting the oldest past the cap.
An element whose answer has expired is never served: the lookup removes it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from gateway.cache.entries import CachedAnswer
from gateway.cache.guard import guard_allows
from gateway.cache.keys import tenant_prefix
from gateway.services.redis_client import SharedRedis

__all__ = ["SemanticCache", "SemanticHit", "SemanticLookup"]

_CANDIDATES = 4

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


@dataclass(slots=True)
class SemanticHit:
    answer: CachedAnswer
    similarity: float


@dataclass(slots=True)
class SemanticLookup:
    hit: SemanticHit | None
    best_similarity: float | None
    refused_by_guard: int = 0
    expired_removed: int = 0


class SemanticCache:
    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._add = redis.client.register_script(_ADD) if redis.client is not None else None

    @staticmethod
    def set_key(tenant: str, namespace: str) -> str:
        return f"{tenant_prefix(tenant)}:v:{namespace}"

    async def lookup(
        self,
        set_key: str,
        embedding: np.ndarray,
        prompt: str,
        threshold: float,
        guard: bool,
        timeout_s: float,
        *,
        truncated: bool = False,
    ) -> SemanticLookup:
        """The best entry at or above ``threshold`` that the guard allows. ``truncated``: the
        prompt ran past the embedding's window (see ``guard_allows(beyond_window=...)``)."""
        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()

        async def search(client: aioredis.Redis) -> SemanticLookup:
            found = await client.execute_command(  # type: ignore[no-untyped-call]
                "VSIM", set_key, "FP32", blob, "WITHSCORES", "COUNT", _CANDIDATES
            )
            result = SemanticLookup(hit=None, best_similarity=None)
            for element, score in _pairs(found):
                similarity = 2.0 * float(score) - 1.0  # VSIM reports (1 + cosine) / 2
                if result.best_similarity is None:
                    result.best_similarity = similarity
                if similarity < threshold:
                    break
                raw = await client.get(f"{set_key}:e:{element}")
                if raw is None:  # its answer expired: never serve it, drop it from the set
                    await client.execute_command("VREM", set_key, element)  # type: ignore[no-untyped-call]
                    await client.zrem(f"{set_key}:z", element)
                    result.expired_removed += 1
                    continue
                answer = CachedAnswer.decode(raw)
                if (
                    guard
                    and answer.prompt is not None
                    and not guard_allows(prompt, answer.prompt, beyond_window=truncated or answer.prompt_truncated)
                ):
                    result.refused_by_guard += 1
                    continue
                result.hit = SemanticHit(answer, similarity)
                break
            return result

        return await self._redis.run(search, SemanticLookup(hit=None, best_similarity=None), timeout_s)

    async def store(
        self, set_key: str, embedding: np.ndarray, answer: CachedAnswer, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        if self._add is None or answer.prompt is None:
            return
        element = hashlib.sha256(answer.prompt.encode()).hexdigest()[:20]
        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        add = self._add
        entry_prefix = f"{set_key}:e:"

        async def write(client: aioredis.Redis) -> None:
            await client.set(entry_prefix + element, answer.encode(), ex=ttl_s)
            await add(
                keys=[set_key, f"{set_key}:z"], args=[element, blob, time.time(), max_entries, ttl_s, entry_prefix]
            )

        await self._redis.run(write, None, timeout_s)


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
