"""Canonical request keys: the same question gives the same key whatever the JSON's layout."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from gateway.store import keyspace

__all__ = ["exact_key", "namespace_hash"]

_NOT_IN_KEY = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier", "gateway_cache"}
)
"""Fields that do not change the answer. Everything else, unknown fields included, is part of the key."""

_encoder = msgspec.json.Encoder(order="sorted")


def exact_key(tenant: str, route: str, body: dict[str, Any]) -> str:
    """The tenant's exact-cache key (see :mod:`gateway.store.keyspace`): no lookup can cross tenants.

    The hash covers the route asked for and every field that can change the answer,
    encoded with sorted keys (field order and whitespace in the client's JSON don't matter).
    """
    canonical = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(_encoder.encode([route, canonical])).hexdigest()
    return keyspace.exact(tenant, digest)


def namespace_hash(route: str, system_prompt: str, params: dict[str, Any]) -> str:
    """What a semantic vector set is specific to, besides its tenant."""
    return hashlib.sha256(_encoder.encode([route, system_prompt, params])).hexdigest()[:32]
