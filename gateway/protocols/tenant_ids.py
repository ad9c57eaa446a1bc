"""A client's own identifiers of its end users and prompt-cache groups, made its tenant's own.

Every tenant's requests go upstream under one key, so the upstream sees one organization:
a ``user`` or ``safety_identifier`` of ``"user-1"`` from two tenants would be one end user to
OpenAI's abuse enforcement (one tenant's abuse gets another's user blocked), and a shared
``prompt_cache_key`` would route two tenants' requests to the same prompt-cache machines, where
one can time the other's prefixes. Each such value goes upstream as
``sha256(tenant + "\\0" + value)``, first 32 hex digits: stable for the same tenant and value, so an
upstream still groups one end user's requests, within the 64 characters OpenAI allows, and
computable by ops from a tenant and a value when an upstream names one.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.core.model import Request

__all__ = ["SCOPED_FIELDS", "scoped", "scoped_body", "scoped_request", "told_back"]

SCOPED_FIELDS = ("user", "safety_identifier", "prompt_cache_key")
"""The OpenAI fields (chat, Responses, embeddings) that name an end user or a prompt-cache group."""


def scoped(tenant: str, value: str) -> str:
    """``value`` as ``tenant``'s own, as it goes upstream."""
    return hashlib.sha256(f"{tenant}\0{value}".encode()).hexdigest()[:32]


def scoped_body(body: dict[str, Any], tenant: str, *, anthropic: bool = False) -> dict[str, Any]:
    """``body`` (a request as its client wrote it) with its identifiers scoped to ``tenant``: the
    OpenAI fields, or for ``anthropic`` ``metadata.user_id``. The same dict when it has none, else a
    copy."""
    if anthropic:
        metadata = body.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        if not (isinstance(user_id, str) and user_id and isinstance(metadata, dict)):
            return body
        return {**body, "metadata": {**metadata, "user_id": scoped(tenant, user_id)}}
    if "user" not in body and "safety_identifier" not in body and "prompt_cache_key" not in body:
        return body  # the usual request: three lookups, not a comprehension's frame, on the hot path
    found = _named(body)
    return {**body, **{name: scoped(tenant, body[name]) for name in found}} if found else body


def scoped_request(request: Request, tenant: str) -> None:
    """``request``'s end user and the OpenAI identifiers among its extra fields, scoped to
    ``tenant`` in place (a request another protocol's edge decoded)."""
    if request.user:
        request.user = scoped(tenant, request.user)
    if request.extra:
        request.extra = scoped_body(request.extra, tenant)


def told_back(body: dict[str, Any], tenant: str) -> dict[str, str]:
    """For an upstream's answer that echoes the request (a Responses object), each of ``body``'s
    identifiers as the upstream was sent it, with the client's own value: the client reads its
    own values back, not the gateway's digests (t43)."""
    return {scoped(tenant, body[name]): body[name] for name in _named(body)}


def _named(body: dict[str, Any]) -> list[str]:
    """The identifier fields ``body`` gives a value."""
    return [name for name in SCOPED_FIELDS if isinstance(body.get(name), str) and body[name]]
