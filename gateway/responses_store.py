"""Responses API turns kept in the shared store, per tenant, for ``previous_response_id`` and ``GET``.

A stored turn is the response object as the client got it and what the turn added to the
conversation, as internal messages (its input items and the assistant's answer; never the
``instructions``, which OpenAI does not carry into the next turn) with the ids its items keep
(``item_ids``), and the ids of the turns before it (``ancestors``). A turn then costs its own
bytes, however long its conversation: a record holding the whole conversation so far made a
chain of n turns cost n²/2 turns, and one long session pushed out its tenant's other
conversations (t60). A later turn naming it reads
its conversation back by the ids: :data:`ANCESTORS_AT_MOST` turns a round trip (one ``MGET``),
and reading them marks them used, so that a tenant past its cap loses its idle turns first.
One that is gone (expired, evicted or deleted) leaves its descendants readable but not
continuable: ``previous_response_not_found``, as for a response that is gone itself.
A turn stored before (``version`` 1) holds the whole conversation up to it, and is read so.

A passed-through response lives at its upstream; its record holds only ``held_by``, and the
client's own identifiers the upstream keeps as the tenant's digests (``own_ids``), and counts in
the tenant's cap as a turn does.

Keys are :func:`gateway.store.keyspace.response` (``gw:{<tenant hash>}:resp:<id>``): a
tenant's lookup can only ever reach its own turns. Records expire :data:`RESPONSE_TTL_S`
after they were last stored or continued from (30 days, OpenAI's retention for stored
responses), or sooner when the tenant's kept turns outgrow its cap in bytes (the least
recently used go first): one tenant's turns never push out another's, which a full Redis
evicting by TTL would otherwise do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from gateway.config.schema import Policy
from gateway.core.model import Message
from gateway.sparse_log import SparseLog
from gateway.store import keyspace
from gateway.store.base import KeyValue

__all__ = [
    "ANCESTORS_AT_MOST",
    "KEPT_ID_CHARS",
    "RESPONSE_TTL_S",
    "STORE_TIMEOUT_S",
    "WITHDRAWN_S",
    "ResponseStore",
    "StoredResponse",
    "kept_ids",
    "stored_bytes_cap",
]

RESPONSE_TTL_S = 30 * 24 * 3600
"""How long a stored response is kept: 30 days, as OpenAI keeps them."""
STORE_TIMEOUT_S = 1.0
"""Deadline of one store call (a call reads up to :data:`ANCESTORS_AT_MOST` turns: larger than a cache entry)."""
ANCESTORS_AT_MOST = 100
"""How many ids of the turns before it a turn's record names, the nearest first to go: the oldest
of them names those before it. A conversation of n turns is read in 1 + n / 100 round trips, and
a record's ids stay under 4 KB (every record naming all its ancestors would cost n²/2 ids again)."""
WITHDRAWN_S = 3600
"""How long the id of a turn :meth:`ResponseStore.withdraw` deleted stays out, for the write sent
before it to reach Redis: a paused Redis reads both once it goes on, and TCP gives up resending
a write after about 15 minutes."""
VERSION = 2
"""The version of the records :class:`ResponseStore` writes (see :attr:`StoredResponse.version`)."""


class StoredResponse(msgspec.Struct, kw_only=True):
    version: int = 1
    """2: the turn holds what it added (``added``) and names the turns before it (``ancestors``);
    1 (a record without the field, stored before t60): ``messages`` is the whole conversation."""
    response: dict[str, Any] = msgspec.field(default_factory=dict)
    """The response object, as ``GET /v1/responses/{id}`` returns it."""
    messages: list[Message] | None = None
    """Version 1: the conversation so far, this turn's answer last. None in version 2, so that a
    gateway from before cannot decode the record (it answers ``previous_response_not_found``,
    which clients recover from, instead of continuing a conversation with its history lost)."""
    added: list[Message] = msgspec.field(default_factory=list)
    """This turn's input items and its answer, last."""
    ancestors: list[str] = msgspec.field(default_factory=list)
    """The ids of the turns before this one, oldest first: the nearest :data:`ANCESTORS_AT_MOST`."""
    item_ids: list[str] = msgspec.field(default_factory=list)
    """The ids of ``added``'s items as ``input_items`` lists them (the ids they were sent with, or
    their answer's output items'), which they keep in every later turn's listing, as in OpenAI's
    API (f76). Empty in a record from before: its items' ids are derived from its id and their place (t167)."""
    held_by: str | None = None
    """A passed-through response lives at its upstream: the model (policy name) that keeps it.
    The gateway then keeps only this, so that only the tenant that made it can read, continue
    or delete it (the upstream's key is shared by every tenant: it cannot tell them apart)."""
    own_ids: dict[str, str | None] = msgspec.field(default_factory=dict)
    """A passed-through response's end-user and prompt-cache identifiers as its upstream keeps
    them (the tenant's digests, :mod:`gateway.protocols.tenant_ids`), each with the client's own
    value, which a digest cannot give back: reading the response tells the client its own (t48).
    ``None`` for a value longer than :data:`KEPT_ID_CHARS`, which is then read back as ``null``."""

    @classmethod
    def turn(
        cls, response: dict[str, Any], added: list[Message], ancestors: list[str], item_ids: list[str] | None = None
    ) -> StoredResponse:
        """A turn the gateway answered."""
        return cls(version=VERSION, response=response, added=added, ancestors=ancestors, item_ids=item_ids or [])

    @classmethod
    def held(cls, held_by: str, own_ids: dict[str, str | None]) -> StoredResponse:
        """A passed-through response's record (``messages`` empty: a gateway from before reads it too)."""
        return cls(version=VERSION, messages=[], held_by=held_by, own_ids=own_ids)

    @property
    def own(self) -> list[Message]:
        """What this turn adds to the conversation before it (for version 1: the whole conversation)."""
        return self.added if self.version >= 2 else self.messages or []

    def then(self, response_id: str) -> list[str]:
        """The ancestors of a turn that continues this one, ``response_id``."""
        return [*self.ancestors, response_id][-ANCESTORS_AT_MOST:]


KEPT_ID_CHARS = 256
"""The longest identifier value a passed-through response's record keeps (OpenAI allows 64), so that
the record stays about a kilobyte against the tenant's cap."""


def stored_bytes_cap(policy: Policy, tenant: str) -> int:
    """The bytes ``tenant`` may keep of responses (and of thread messages: :mod:`gateway.thread_store`)."""
    own = policy.tenants.get(tenant)
    mib = own.stored_responses_mib if own is not None else None
    return int((mib if mib is not None else policy.limits.stored_responses_mib_per_tenant) * 1024 * 1024)


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

    __slots__ = ("_cap", "_evicted", "_kv", "_timeout_s")

    def __init__(self, kv: KeyValue, cap: Callable[[str], int], timeout_s: float = STORE_TIMEOUT_S) -> None:
        self._kv = kv
        self._cap = cap
        self._timeout_s = timeout_s
        self._evicted: dict[str, SparseLog] = {}
        """Per tenant (the policy's, a bounded set): a tenant at its cap evicts on every store
        (t101: 2,429 lines for 3,000 responses), and one tenant's must not hide another's."""

    async def load(self, tenant: str, response_id: str, *, use: bool = False) -> StoredResponse | None:
        """The turn; ``use``: it is being continued, which keeps it from its tenant's cap longer."""
        key = keyspace.response(tenant, response_id)
        if use:
            (raw,) = await self._kv.get_bounded(
                [key], keyspace.stored_responses(tenant), RESPONSE_TTL_S, self._timeout_s
            )
        else:
            raw = await self._kv.get(key, self._timeout_s)
        return _decoded(raw)

    async def load_many(
        self, tenant: str, response_ids: list[str], *, use: bool = False
    ) -> list[StoredResponse | None]:
        """:meth:`load` of each, in one round trip."""
        keys = [keyspace.response(tenant, response_id) for response_id in response_ids]
        if use:
            raws = await self._kv.get_bounded(keys, keyspace.stored_responses(tenant), RESPONSE_TTL_S, self._timeout_s)
        else:
            raws = await self._kv.get_many(keys, self._timeout_s)
        return [_decoded(raw) for raw in raws]

    async def conversation(
        self, tenant: str, record: StoredResponse, *, use: bool = False
    ) -> tuple[list[Message], str | None]:
        """The conversation up to and including ``record``'s answer, and the id of the latest
        earlier turn that is gone (None: the conversation is whole): with one gone, only what
        follows it (``use``: as :meth:`load`)."""
        turns, gone = await self.turns(tenant, record, use=use)
        return [message for turn in turns for message in turn.own], gone

    async def turns(
        self, tenant: str, record: StoredResponse, *, use: bool = False
    ) -> tuple[list[StoredResponse], str | None]:
        """The turns of :meth:`conversation`, oldest first, ``record`` last, and the gone one's id.

        Each round trip reads the ancestors one record names, whose oldest names those before."""
        turns = [record]
        ancestors = record.ancestors
        ledger = keyspace.stored_responses(tenant)
        while ancestors:
            keys = [keyspace.response(tenant, ancestor) for ancestor in ancestors]
            if use:
                raws = await self._kv.get_bounded(keys, ledger, RESPONSE_TTL_S, self._timeout_s)
            else:
                raws = await self._kv.get_many(keys, self._timeout_s)
            found = [_decoded(raw) for raw in raws]
            for ancestor, earlier in zip(reversed(ancestors), reversed(found), strict=True):
                if earlier is None:
                    return turns[::-1], ancestor
                turns.append(earlier)
            oldest = found[0]
            assert oldest is not None
            ancestors = oldest.ancestors
        return turns[::-1], None

    async def save(self, tenant: str, response_id: str, record: StoredResponse) -> bool:
        """Whether it was kept: not when the record alone is larger than the tenant's cap.

        A passed-through response's record (``held_by``) counts in the cap too (t160: outside it,
        one tenant's ~1 KB records, each for a tiny upstream call, filled Redis until it evicted
        other tenants' turns). One evicted leaves its response at the upstream, which no tenant
        can then reach through the gateway, until the upstream's own retention ends."""
        deleted = await self._kv.put_bounded(
            keyspace.response(tenant, response_id),
            _encoder.encode(record),
            RESPONSE_TTL_S,
            keyspace.stored_responses(tenant),
            self._cap(tenant),
            self._timeout_s,
            # a translated turn's id is new: only one withdrawn (:meth:`withdraw`) is there; a
            # passed-through one's is the upstream's: refused, it would be deleted there
            new_only=record.held_by is None,
        )
        if deleted:
            said = self._evicted.get(tenant)
            if said is None:
                said = self._evicted[tenant] = SparseLog(_log, "stored_responses_evicted", level="info", every_s=60.0)
            said(tenant=tenant, count=deleted, reason="over the tenant's cap")
        return deleted is not None

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Whether there was a response to delete."""
        return await self._kv.delete_bounded(
            keyspace.response(tenant, response_id), keyspace.stored_responses(tenant), self._timeout_s
        )

    async def withdraw(self, tenant: str, response_id: str) -> None:
        """Delete a turn whose :meth:`save` timed out: Redis may have stored it all the same, or
        may yet (a write it reads late); its id is kept out for :data:`WITHDRAWN_S`, so such a
        write then stores nothing, whichever comes first."""
        await self._kv.delete_bounded(
            keyspace.response(tenant, response_id),
            keyspace.stored_responses(tenant),
            self._timeout_s,
            keep_out_s=WITHDRAWN_S,
        )


def _decoded(raw: bytes | None) -> StoredResponse | None:
    if not raw:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None  # written by an incompatible version: as good as gone
