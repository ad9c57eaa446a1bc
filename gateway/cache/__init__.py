"""The cache in front of routing: exact (a hash of the canonical request), then semantic.

Everything lives in Redis, namespaced by tenant, so every gateway process shares it
and no tenant can read another's answers. The cache is an optimisation: when Redis
is slow or down, requests go on without it.
"""
