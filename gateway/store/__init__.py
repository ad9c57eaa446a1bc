"""Shared storage behind small Protocols: key-value with leases, a vector index, limit counters.

:mod:`gateway.store.base` defines them, :mod:`gateway.store.keyspace` names every key,
:mod:`gateway.store.redis` implements them on Redis 8 and :mod:`gateway.store.memory`
in process (for unit tests). A new backend is one package beside ``redis/`` that implements the three.
"""
