"""Canonical request keys: the same question gives the same key whatever the JSON's layout."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from gateway.store import keyspace

__all__ = ["canonical_params", "exact_key", "namespace_hash"]

_NOT_IN_KEY = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier", "gateway_cache"}
)
"""Fields that do not change the answer. Everything else, unknown fields included, is part of the key."""

_encoder = msgspec.json.Encoder(order="sorted")


def exact_key(tenant: str, route: str, body: dict[str, Any]) -> str:
    """The tenant's exact-cache key (see :mod:`gateway.store.keyspace`): no lookup can cross tenants.

    The hash covers the route asked for and every field that can change the answer, in
    :func:`canonical_params` form and encoded with sorted keys (field order and whitespace
    in the client's JSON don't matter).
    """
    digest = hashlib.sha256(_encoder.encode([route, canonical_params(body)])).hexdigest()
    return keyspace.exact(tenant, digest)


def canonical_params(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of a chat body that can change the answer, written one way: numbers as floats
    (``0`` and ``0.0``), ``max_completion_tokens`` as ``max_tokens``, a content list of one plain
    text part as its string. So one question asked through two APIs (whose codecs write the
    same request differently) has one key."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in _NOT_IN_KEY:
            continue
        if key == "max_completion_tokens":
            key = "max_tokens"
        out[key] = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    messages = out.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
        out["messages"] = [_one_way(m) for m in messages]
    return out


def _one_way(message: Any) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list) and len(content) == 1:
        part = content[0]
        if isinstance(part, dict) and part.keys() == {"type", "text"} and part["type"] == "text":
            return {**message, "content": part["text"]}
    return message


def namespace_hash(route: str, system_prompt: str, params: dict[str, Any]) -> str:
    """What a semantic vector set is specific to, besides its tenant."""
    return hashlib.sha256(_encoder.encode([route, system_prompt, params])).hexdigest()[:32]
