"""Who is calling: API keys from policy, stored and looked up as sha256 digests, never compared as secrets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.config.schema import AuthPolicy, Limits
from gateway.errors import AuthenticationError

__all__ = ["ANONYMOUS", "AmbiguousKey", "Authenticator", "Credentials", "Principal", "hash_key"]


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tenant: str
    allowed: frozenset[str]
    """Route and model names this key may call; ``*`` for all."""
    limits: Limits = Limits()  # noqa: RUF009 - a frozen struct: one shared default is safe
    admin: bool = False
    engine_fields: frozenset[str] = frozenset()
    """The engine fields its requests may send on (``AuthKey.engine_fields``); none for most keys."""


@dataclass(frozen=True, slots=True)
class AmbiguousKey:
    """A request that sent more than one key (``gateway.api.credentials``): refused, whichever
    of them is valid, where keys are asked for."""

    why: str
    """Which headers disagree, never what they carry."""


Credentials = str | AmbiguousKey | None
"""What a request presents: an ``Authorization`` header value, more than one key, or none."""

ANONYMOUS = Principal(key_id="anonymous", tenant="default", allowed=frozenset({"*"}))


def hash_key(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


class Authenticator:
    def __init__(self, policy: AuthPolicy) -> None:
        self.enabled = policy.mode == "keys"
        self._by_hash = {
            key.hash: Principal(
                key.id, key.tenant, frozenset(key.models), key.limits, key.admin, frozenset(key.engine_fields)
            )
            for key in policy.keys
        }

    def authenticate(self, authorization: Credentials) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if isinstance(authorization, AmbiguousKey):
            raise AuthenticationError(f"ambiguous API key: {authorization.why}; send one key", code="ambiguous_api_key")
        if not authorization:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' (Anthropic clients: 'x-api-key: <key>')"
            )
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
        digest = hash_key(secret.strip())
        # Secrets are never compared, only their sha256 digests: a lookup's timing can
        # at most reveal a prefix of a digest, which says nothing usable about a secret.
        principal = self._by_hash.get(digest)
        if principal is None:
            raise AuthenticationError("invalid API key")
        return principal
