"""What the gateway needs from shared storage, as three small Protocols.

- :class:`KeyValue`: bytes under a key with a TTL, plus *leases* (one holder per key,
  released by its token) that coalesce identical requests across processes;
- :class:`VectorIndex`: nearest-neighbour search over prompt embeddings, each element
  carrying an entry that expires;
- :class:`LimitCounters`: the atomic check-and-reserve of rate and spend counters, and
  the usage sums ``/v1/usage`` reads.

Every method raises :class:`StoreUnavailable` when the store could not be asked or did
not answer in time; callers decide what that means (the cache goes on without itself,
the limiter fails open or closed by policy). ``gateway.store.redis`` implements them on
Redis 8, ``gateway.store.memory`` in process (for unit tests only). Key names come
from :mod:`gateway.store.keyspace` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.accounting.usage import UsageFigures

__all__ = [
    "BOUNDED_ENTRY_BYTES",
    "BOUNDED_EVICTIONS_AT_MOST",
    "BUDGET_ROUNDING",
    "HELD_DUST",
    "PENDING_S",
    "Caps",
    "CounterScope",
    "KeyValue",
    "LimitCounters",
    "ReserveOutcome",
    "ReserveRequest",
    "SettleRequest",
    "Spent",
    "Store",
    "StoreTimedOut",
    "StoreUnavailable",
    "VectorIndex",
    "VectorMatch",
    "past_budget",
]

BOUNDED_ENTRY_BYTES = 320
"""What a key of a bounded collection costs Redis beyond its value (the key, its ledger entries,
the objects' headers): a 46-byte record took ~390 bytes (an outside tester's measure)."""
BOUNDED_EVICTIONS_AT_MOST = 1000
"""Keys one store call deletes at most to make room: 200,000 held Redis (every tenant's) for a second."""

HELD_DUST = 1e-12
"""USD held by requests in flight below which none is: what releasing the estimates held leaves
of their float sum (t189: 5.6e-17 held by nothing told every refusal "$0.0000 reserved")."""
PENDING_S = 3600
"""How long a reservation may stay unsettled before the tenant's next one undoes it (its process
died mid-request, and nothing else ever would). Longer than a request lasts (a model's ``total``);
one that outlasts it is settled as never reserved: its whole cost counts then."""

BUDGET_ROUNDING = 1e-9
"""The share of a budget by which what is spent plus a request's cost may pass it: float sums of
USD are off by their rounding (0.2 + 0.1 > 0.3 refused a $0.30 budget's third $0.10 request, t114),
which a month's sums keep far below a billionth of the budget, an amount that buys nothing."""


def past_budget(spent: float, cost: float, budget: float) -> bool:
    """Whether ``cost`` on top of ``spent`` passes ``budget``; one that spends it exactly does not.
    The Redis scripts compute the same (``counters.py``)."""
    return spent + cost > budget * (1 + BUDGET_ROUNDING)


Spent = Mapping[tuple[str, str, str], float]
"""USD by (spend counter, UTC day ``yyyymmdd``, month ``yyyymm``)."""


class StoreUnavailable(Exception):
    """The store was not asked (marked down) or did not answer in time."""


class StoreTimedOut(StoreUnavailable):
    """The store was asked and did not answer in time: a write may have been applied all the
    same (so it is not sent again, which could count it twice)."""


class KeyValue(Protocol):
    async def get(self, key: str, timeout_s: float) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: int, timeout_s: float, release: str | None = None) -> None:
        """Store ``value`` for ``ttl_s``; with ``release``, also drop the lease on ``key`` if that
        token still holds it, in the same round trip (a coalescing leader's answer)."""
        ...

    async def get_many(self, keys: list[str], timeout_s: float) -> list[bytes | None]:
        """:meth:`get` of each key, in one round trip (the keys share one tenant's hash tag)."""
        ...

    async def put_many(self, items: list[tuple[str, bytes]], ttl_s: int, timeout_s: float) -> None:
        """:meth:`put` of each (key, value), in one round trip."""
        ...

    async def put_bounded(
        self,
        key: str,
        value: bytes,
        ttl_s: int,
        ledger: str,
        max_bytes: int,
        timeout_s: float,
        *,
        new_only: bool = False,
    ) -> int | None:
        """Store ``value`` for ``ttl_s`` and count it in ``ledger`` (a tenant's collection: the
        keys share its hash tag, and every key in it has the same ``ttl_s``) as its bytes plus
        :data:`BOUNDED_ENTRY_BYTES`; the ledger's oldest keys are deleted until its total fits
        ``max_bytes``, at most :data:`BOUNDED_EVICTIONS_AT_MOST` of them. How many were deleted,
        or None (nothing stored) when it does not fit even so, or (``new_only``) when ``key``
        holds a value already, which is then left as it is."""
        ...

    async def get_bounded(self, keys: list[str], ledger: str, ttl_s: int, timeout_s: float) -> list[bytes | None]:
        """:meth:`get_many` of keys :meth:`put_bounded` stored, in one round trip, each one found
        in ``ledger`` used: it becomes the ledger's newest (the last its cap deletes) and its
        ``ttl_s`` starts again. (A key that is not in the ledger is read and left as it is.)"""
        ...

    async def delete_bounded(self, key: str, ledger: str, timeout_s: float, *, keep_out_s: int = 0) -> bool:
        """:meth:`delete` of a key :meth:`put_bounded` stored, taken out of its ledger; with
        ``keep_out_s``, ``key`` then holds an empty value for that long, which a ``new_only``
        :meth:`put_bounded` leaves as it is (one that timed out and reaches the store later)."""
        ...

    async def delete(self, key: str, timeout_s: float) -> bool:
        """Remove ``key``; whether it was there."""
        ...

    async def acquire(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        """Take the lease on ``key`` for ``ttl_ms`` unless another token holds it."""
        ...

    async def release(self, key: str, token: str, timeout_s: float) -> None:
        """Drop the lease on ``key`` if ``token`` still holds it."""
        ...

    async def renew(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        """Make the lease on ``key`` last ``ttl_ms`` from now if ``token`` still holds it; whether it does."""
        ...

    async def peek(self, key: str, timeout_s: float) -> tuple[bytes | None, bool]:
        """The value under ``key`` and whether its lease is held, in one round trip."""
        ...

    async def append(self, key: str, value: bytes, max_len: int, ttl_s: int, timeout_s: float) -> None:
        """Add ``value`` to the list under ``key``, keeping the newest ``max_len``; the list expires
        ``ttl_s`` after its last append."""
        ...

    async def append_counted(
        self, key: str, value: bytes, max_len: int, ttl_s: int, counter: str, counter_ttl_s: int, at_most: int,
        timeout_s: float,
    ) -> bool:  # fmt: skip
        """:meth:`append` and :meth:`add_float` of 1 to ``counter`` (``key``'s hash tag) in one step,
        both or neither, unless ``counter`` is at ``at_most`` already; whether it was done."""
        ...

    async def read_list(self, key: str, timeout_s: float) -> list[bytes]:
        """The list under ``key``, oldest first (empty when there is none)."""
        ...

    async def add_float(self, key: str, amount: float, ttl_s: int, timeout_s: float) -> float:
        """Add ``amount`` to the number under ``key`` (created at 0 with ``ttl_s``); the new total."""
        ...


@dataclass(frozen=True, slots=True)
class VectorMatch:
    element: str
    similarity: float
    """Cosine similarity, in [-1, 1]."""


class VectorIndex(Protocol):
    async def nearest(self, index: str, vector: np.ndarray, count: int, timeout_s: float) -> list[VectorMatch]:
        """Up to ``count`` elements, most similar first."""
        ...

    async def entries(self, index: str, elements: list[str], timeout_s: float) -> list[bytes | None]:
        """The elements' entries, in order, in one round trip; None for one that has expired."""
        ...

    async def add(
        self, index: str, element: str, vector: np.ndarray, entry: bytes, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        """Add (or replace) an element; past ``max_entries`` the oldest elements go."""
        ...

    async def remove(self, index: str, element: str, timeout_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Caps:
    """One scope's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None


@dataclass(frozen=True, slots=True)
class CounterScope:
    """The counters of one scope (a key or a tenant) and the caps they are checked against."""

    window: str
    """Requests and tokens of this minute and the previous one."""
    spend: str
    """USD spent today and this month."""
    caps: Caps


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    scopes: Sequence[CounterScope]
    tokens: int
    cost_usd: float
    minute: int
    day: str
    month: str
    minute_fraction: float
    """How far into ``minute`` the request is (0..1): the previous minute counts for the rest."""
    mark: str | None = None
    """Where a reservation made says so (``keyspace.reservation``), for its settlement to read:
    a reservation whose call timed out may or may not have reached the store."""
    requests: int = 1
    """The requests it counts in ``rpm``: 0 for one counted already (it gave its reservation back
    to wait on an identical request, and reserves again to call upstream itself), which no
    ``rpm`` refuses either."""


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    refused_by: str | None
    """None when reserved; else ``"<scope index>.<cap>"``, e.g. ``"0.rpm"`` or ``"1.usd_per_day"``."""
    spent_usd: float
    """When refused by a budget: what its period had spent already."""
    budget_share: float
    """When reserved: the largest share of a budget spent before this request."""
    window: tuple[float, float] = (0.0, 0.0)
    """When refused by a rate: the refused measure (requests or tokens) counted this minute and
    the minute before, so the caller can say when a retry would pass."""
    spent: tuple[tuple[float, float], ...] = ()
    """USD spent this day and this month in each scope before this request, as the store counts
    them (reserved or refused alike): what the caller goes by while the store cannot answer."""
    held: tuple[tuple[float, float], ...] = ()
    """The part of ``spent`` that marked reservations not yet settled hold (their estimates: the
    requests in flight), each scope's day and month: a budget they fill is free again as they settle."""


@dataclass(frozen=True, slots=True)
class SettleRequest:
    scopes: Sequence[CounterScope]
    """Those the reservation was made in (empty: none was)."""
    token_delta: int
    cost_delta: float
    minute: int
    day: str
    month: str
    usage_keys: Sequence[str]
    """Usage sums to add ``used`` to."""
    used: UsageFigures
    expired_keys: Sequence[str]
    """Usage sums that have left the retention period."""
    tokens: int = 0
    cost_usd: float = 0.0
    """What was used: counted whole in the limits when the reservation never reached the store."""
    mark: str | None = None
    """The reservation's mark: it says whether this settlement was already applied (a settlement
    sent again after a timeout counts once) and, unless ``made``, whether the reservation was made
    (then the deltas apply; else what was used counts whole). None: applied every time it is sent."""
    made: bool = True
    """The reservation call answered: it was made, whatever became of its mark (Redis may evict
    it under memory pressure). False: it timed out, and only the mark can tell."""
    held_usd: float = 0.0
    """The estimate a marked reservation held while in flight, released from what the scopes hold
    when it was made (:attr:`ReserveOutcome.held`)."""


class LimitCounters(Protocol):
    async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
        """Check every cap of every scope and, only if all allow it, count the request in all of them."""
        ...

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        """Correct a reservation to what was used (in the periods it was made in) and add the usage;
        a reservation that was never made has the whole of what was used counted instead, and a
        settlement already applied is not applied again (both read from ``request.mark``)."""
        ...

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        """Add batched usage (requests that reserved nothing) and drop expired sums; add ``spent``,
        USD by (spend counter, day, month), to those counters' day and month as a reservation
        would, so that a budget set later starts from what was spent. With ``batch`` (an id
        unique to this content), each tenant's part is applied once however often it is sent:
        a batch whose call failed is sent again whole, never counted twice."""
        ...

    async def read_usage(self, keys: Sequence[str], timeout_s: float) -> list[UsageFigures]: ...

    async def index_usage(self, members: Mapping[str, Iterable[str]], ttl_s: int, timeout_s: float) -> None:
        """Add members to the usage index of each day (``keyspace.usage_index``), kept ``ttl_s``."""
        ...

    async def indexed_usage(self, days: Sequence[str], timeout_s: float) -> set[str]:
        """Every member of those days' usage indexes."""
        ...


@dataclass(frozen=True, slots=True)
class Store:
    """The three parts, as the pipeline and the limiter are given them."""

    kv: KeyValue
    vectors: VectorIndex
    counters: LimitCounters
