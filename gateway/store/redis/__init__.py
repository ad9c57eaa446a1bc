"""The store on Redis 8 (standalone, TLS or Cluster), shared by every gateway process."""

from gateway.store.base import Store
from gateway.store.redis.client import SharedRedis, connect
from gateway.store.redis.counters import RedisLimitCounters
from gateway.store.redis.kv import RedisKeyValue
from gateway.store.redis.vectors import RedisVectorIndex

__all__ = ["RedisKeyValue", "RedisLimitCounters", "RedisVectorIndex", "SharedRedis", "connect", "redis_store"]


def redis_store(redis: SharedRedis) -> Store:
    return Store(RedisKeyValue(redis), RedisVectorIndex(redis), RedisLimitCounters(redis))
