"""Responses API turns kept in the shared store, per tenant, for ``previous_response_id`` and ``GET``.

A stored turn is the response object as the client got it and the whole conversation
up to and including its answer, as internal messages (the earlier turns', this turn's
input items, the assistant's answer; never the ``instructions``, which OpenAI does not
carry into the next turn). A later turn naming it loads one record, however long the
chain: there is nothing to follow recursively.

A passed-through response lives at its upstream; its record holds only ``held_by``, and the
client's own identifiers the upstream keeps as the tenant's digests (``own_ids``).

Keys are :func:`gateway.store.keyspace.response` (``gw:{<tenant hash>}:resp:<id>``): a
tenant's lookup can only ever reach its own turns. Records expire after
:data:`RESPONSE_TTL_S` (30 days, OpenAI's retention for stored responses), or sooner when
the tenant's kept turns outgrow its cap in bytes (its oldest go first): one tenant's turns
never push out another's, which a full Redis evicting by TTL would otherwise do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from gateway.core.model import Message
from gateway.store import keyspace
from gateway.store.base import KeyValue

__all__ = ["KEPT_ID_CHARS", "RESPONSE_TTL_S", "STORE_TIMEOUT_S", "ResponseStore", "StoredResponse", "kept_ids"]

RESPONSE_TTL_S = 30 * 24 * 3600
"""How long a stored response is kept: 30 days, as OpenAI keeps them."""
STORE_TIMEOUT_S = 1.0
"""Deadline of one store call (a record holds a whole conversation: larger than a cache entry)."""


class StoredResponse(msgspec.Struct, kw_only=True):
    response: dict[str, Any] = msgspec.field(default_factory=dict)
    """The response object, as ``GET /v1/responses/{id}`` returns it."""
    messages: list[Message] = msgspec.field(default_factory=list)
    """The conversation so far, this turn's answer last."""
    held_by: str | None = None
    """A passed-through response lives at its upstream: the model (policy name) that keeps it.
    The gateway then keeps only this, so that only the tenant that made it can read, continue
    or delete it (the upstream's key is shared by every tenant: it cannot tell them apart)."""
    own_ids: dict[str, str | None] = msgspec.field(default_factory=dict)
    """A passed-through response's end-user and prompt-cache identifiers as its upstream keeps
    them (the tenant's digests, :mod:`gateway.protocols.tenant_ids`), each with the client's own
    value, which a digest cannot give back: reading the response tells the client its own (t48).
    ``None`` for a value longer than :data:`KEPT_ID_CHARS`, which is then read back as ``null``."""


KEPT_ID_CHARS = 256
"""The longest identifier value a passed-through response's record keeps (OpenAI allows 64): the
record is outside the tenant's cap, so what a client writes there is bounded."""


def kept_ids(own_ids: dict[str, str]) -> dict[str, str | None]:
    """``own_ids`` (digest: the client's value) as a record keeps them."""
    return {digest: value if len(value) <= KEPT_ID_CHARS else None for digest, value in own_ids.items()}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StoredResponse)
_log = structlog.get_logger("gateway.responses")


class ResponseStore:
    """Every method raises :class:`~gateway.store.base.StoreUnavailable` when the store cannot answer.

    ``cap`` gives a tenant's bound on its kept turns, in bytes.
    """

    __slots__ = ("_cap", "_kv", "_timeout_s")

    def __init__(self, kv: KeyValue, cap: Callable[[str], int], timeout_s: float = STORE_TIMEOUT_S) -> None:
        self._kv = kv
        self._cap = cap
        self._timeout_s = timeout_s

    async def load(self, tenant: str, response_id: str) -> StoredResponse | None:
        raw = await self._kv.get(keyspace.response(tenant, response_id), self._timeout_s)
        if not raw:
            return None
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError:
            return None  # written by an incompatible version: as good as gone

    async def save(self, tenant: str, response_id: str, record: StoredResponse) -> bool:
        """Whether it was kept: not when the record alone is larger than the tenant's cap.

        A passed-through response's record (``held_by``) is outside the cap: evicting it would
        leave the response at its upstream, where no tenant could reach or delete it. It is at
        most about a kilobyte (three identifiers of :data:`KEPT_ID_CHARS`) for a paid upstream call."""
        if record.held_by is not None:
            key = keyspace.response(tenant, response_id)
            await self._kv.put(key, _encoder.encode(record), RESPONSE_TTL_S, self._timeout_s)
            return True
        deleted = await self._kv.put_bounded(
            keyspace.response(tenant, response_id),
            _encoder.encode(record),
            RESPONSE_TTL_S,
            keyspace.stored_responses(tenant),
            self._cap(tenant),
            self._timeout_s,
        )
        if deleted:
            _log.info("stored_responses_evicted", tenant=tenant, count=deleted, reason="over the tenant's cap")
        return deleted is not None

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Whether there was a response to delete."""
        return await self._kv.delete_bounded(
            keyspace.response(tenant, response_id), keyspace.stored_responses(tenant), self._timeout_s
        )
