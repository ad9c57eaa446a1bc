"""Which Anthropic thread messages (the message-threads beta) each tenant's requests made.

A thread is kept by the upstream under the gateway's one key, for every tenant: a ``continue``
naming another tenant's message by its ``previous_message_id`` would read that tenant's
conversation (t202). The id of every message an upstream answered to a request with a
``thread`` is claimed for the request's tenant here, and a ``continue`` goes upstream only
when it names one of its tenant's own.

Keys are :func:`gateway.store.keyspace.thread_message`: a tenant's lookup only ever reaches
its own claims. A claim lasts :data:`THREAD_TTL_S` (Anthropic drops a thread an hour after its
last use; each turn of a thread is a new message, claimed in its turn), and a tenant's claims
are bounded in bytes as its stored Responses turns are (the oldest go first).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.store import keyspace
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = ["THREAD_TTL_S", "ThreadStore"]

THREAD_TTL_S = 24 * 3600
_TIMEOUT_S = 1.0
_CLAIMED = b"1"


class ThreadStore:
    def __init__(self, kv: KeyValue, cap: Callable[[str], int], timeout_s: float = _TIMEOUT_S) -> None:
        self._kv = kv
        self._cap = cap
        self._timeout_s = timeout_s

    async def claim(self, tenant: str, message_id: str) -> bool:
        """Record ``message_id`` as ``tenant``'s; whether it was (False: the store did not answer)."""
        try:
            stored = await self._kv.put_bounded(
                keyspace.thread_message(tenant, message_id),
                _CLAIMED,
                THREAD_TTL_S,
                keyspace.thread_messages(tenant),
                self._cap(tenant),
                self._timeout_s,
            )
        except StoreUnavailable:
            return False
        return stored is not None

    async def owns(self, tenant: str, message_id: str) -> bool:
        """Whether ``message_id`` is ``tenant``'s. Raises :class:`StoreUnavailable`."""
        return await self._kv.get(keyspace.thread_message(tenant, message_id), self._timeout_s) == _CLAIMED
