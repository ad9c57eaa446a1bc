"""Where usage is written and read back: daily sums per key and per tenant in the store.

Requests that reserved nothing (no limits) are summed in memory and written every
:data:`USAGE_FLUSH_S` in one batch, so they cost no store call each; requests that
reserved are written with their settlement (see :class:`gateway.limits.Limiter`).
Sums are kept :data:`USAGE_RETENTION_DAYS` days (today and the days before it), the days
``/v1/usage`` answers for: each write deletes its key's day that left, one day later.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from gateway.accounting.usage import UsageFigures
from gateway.store import keyspace
from gateway.store.base import LimitCounters, StoreUnavailable

__all__ = [
    "CLOSING_RETRY_S",
    "USAGE_FLUSH_S",
    "USAGE_RETENTION_DAYS",
    "UsageKeys",
    "UsageLedger",
    "usage_kept_since",
    "usage_keys",
]

_log = structlog.get_logger("gateway.usage")

_SEPARATOR = "\x1f"
"""Between a tenant and a key id in the usage index (neither may hold a control character)."""

USAGE_FLUSH_S = 1.0
USAGE_RETENTION_DAYS = 92
_DELETED_AFTER_DAYS = USAGE_RETENTION_DAYS + 1
"""A key's write deletes its sums of this many days before: a day after they leave the retention,
so that a read at midnight, or on a gateway whose clock is a little behind another's, never counts
a day that some keys' writes have deleted already (t63)."""

UsageKeys = tuple[tuple[str, str], tuple[str, str]]
"""Today's sums (key, tenant), then the two deleted today (see :data:`_DELETED_AFTER_DAYS`)."""


def usage_kept_since(today: datetime) -> datetime:
    """The first day whose usage is still whole on ``today`` (midnight UTC): older days are
    deleted key by key, as each key writes, so their sums are partial or gone (t63)."""
    return today - timedelta(days=USAGE_RETENTION_DAYS - 1)


def usage_keys(tenant: str, key_id: str, now: float) -> UsageKeys:
    return _usage_keys_of_day(tenant, key_id, int(now // 86400))


@functools.lru_cache(maxsize=4096)
def _usage_keys_of_day(tenant: str, key_id: str, day: int) -> UsageKeys:
    """Built once a day per key, not per request."""
    today, gone = (
        datetime.fromtimestamp(number * 86400, UTC).strftime("%Y%m%d") for number in (day, day - _DELETED_AFTER_DAYS)
    )
    return keyspace.usage(tenant, key_id, today), keyspace.usage(tenant, key_id, gone)


CLOSING_RETRY_S = 10.0
"""At shutdown, how long what the store has not taken is tried for (README: "up to 10 s more")."""
_CLOSING_RETRY_EVERY_S = 0.25
"""A store marked down refuses calls for a second after the last attempt (without a round trip),
so a Redis that is back is reached within about a second of it."""
_CLOSING_CALL_LEAST_S = 0.25
"""The least time a write at shutdown is given, however little is left: a Redis that answers takes
milliseconds."""

_BATCH_IDS = (f"{os.urandom(6).hex()}{n:x}" for n in itertools.count())
_RESEND_FOR_S = 1800.0
"""How long a batch is sent again for: well within the hour its marks are kept in the store."""
_UNSENT_AT_MOST = 3600
"""Batches kept unsent at most (a flush a second: an hour of a store that does not answer)."""


@dataclass(slots=True)
class _Batch:
    id: str
    since: float
    sums: dict[str, UsageFigures]
    expired: set[str]
    spent: dict[tuple[str, str, str], float]


def _bounded(timeout_s: float, left_s: float) -> float:
    """A write's timeout within the time the shutdown has left."""
    return max(min(timeout_s, left_s), _CLOSING_CALL_LEAST_S)


def _held(batches: Iterable[_Batch]) -> tuple[int, float]:
    """The requests and USD in ``batches`` (each request is in its key's sums and its tenant's: counted once)."""
    figures = [used for batch in batches for used in batch.sums.values()]
    return sum(used.requests for used in figures) // 2, round(sum(used.cost_usd for used in figures) / 2, 6)


def _unrecorded(batch: _Batch, reason: str) -> None:
    """Said with what it held and whose it was (key ids are unique in a policy, tenants are
    hashed in the key names)."""
    keys = sorted({name.split(":use:k:", 1)[1].rsplit(":", 1)[0] for name in batch.sums if ":use:k:" in name})
    requests, cost = _held([batch])
    _log.warning("usage_unrecorded", requests=requests, cost_usd=cost, key_ids=keys, reason=reason)


class UsageLedger:
    def __init__(self, counters: LimitCounters, *, store_configured: bool = True) -> None:
        """``store_configured``: False where the gateway runs with no Redis at all, whose usage no
        wait at shutdown would write."""
        self._counters = counters
        self._store_configured = store_configured
        self._pending: dict[str, UsageFigures] = {}
        self._spent: dict[tuple[str, str, str], float] = {}
        """USD by (spend counter, day, month) of requests that reserved nothing."""
        self._expired: set[str] = set()
        self._noted: dict[int, set[tuple[str, str]]] = {}
        """Per UTC day number, the (tenant, key id) pairs this process has put in the usage index."""
        self._to_index: dict[str, set[str]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._timeout_s = 1.0
        self._unsent: deque[_Batch] = deque()
        """Batches the store has not confirmed, oldest first: each is sent again as it was."""

    def note(self, tenant: str, key_id: str, now: float) -> None:
        """The key has usage today: it goes in the day's usage index (once a day per process), so
        an admin's usage lists it after the policy no longer does."""
        day = int(now // 86400)
        noted = self._noted.get(day)
        if noted is None:
            noted = self._noted[day] = set()
            for old in [d for d in self._noted if d < day - 1]:
                del self._noted[old]
        if (tenant, key_id) in noted:
            return
        noted.add((tenant, key_id))
        name = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y%m%d")
        self._to_index.setdefault(name, set()).add(f"{tenant}{_SEPARATOR}{key_id}")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(USAGE_FLUSH_S))

    async def indexed_keys(self, start: datetime, end: datetime) -> list[tuple[str, str]] | None:
        """The (key id, tenant) pairs that had usage in [start, end]; None when unreadable."""
        days = [(start + timedelta(days=i)).strftime("%Y%m%d") for i in range((end - start).days + 1)]
        try:
            members = await self._counters.indexed_usage(days, 2.0)
        except StoreUnavailable:
            return None
        pairs = (member.split(_SEPARATOR, 1) for member in members)
        return sorted((key_id, tenant) for tenant, key_id in (pair for pair in pairs if len(pair) == 2))

    def record(
        self,
        keys: UsageKeys,
        used: UsageFigures,
        timeout_s: float,
        spend: tuple[tuple[str, ...], str, str, float] | None = None,
    ) -> None:
        """Add ``used`` to today's sums at the next flush; with ``spend`` (counters, day, month,
        USD), that to those spend counters too: the cost of a request that reserved nothing, or
        the correction of a reservation whose settlement could not reach the store (negative
        where the estimate was more; it applies only to the day and month it was made in)."""
        if spend is not None and spend[3]:
            counters, day, month, usd = spend
            for counter in counters:
                self._spent[counter, day, month] = self._spent.get((counter, day, month), 0.0) + usd
        self._expired.update(keys[1])
        for key in keys[0]:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = UsageFigures()
            pending.add(used)
        self._timeout_s = timeout_s
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every(USAGE_FLUSH_S))

    def held_spend(self, counter: str, day: str, month: str) -> float:
        """USD spent on ``day`` (of ``month``) that this process holds for ``counter`` and the store
        has not taken yet (spent while it was away): what the store's word on the counter lacks."""
        key = (counter, day, month)
        return sum(batch.spent.get(key, 0.0) for batch in self._unsent) + self._spent.get(key, 0.0)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Write what is buffered in one batch (before a read, and at shutdown)."""
        if self._to_index:
            index, self._to_index = self._to_index, {}
            try:
                await self._counters.index_usage(index, (_DELETED_AFTER_DAYS + 1) * 86400, timeout_s or self._timeout_s)
            except StoreUnavailable:
                for members in self._noted.values():  # noted again on the key's next request
                    members.clear()
        if self._pending:
            batch = _Batch(next(_BATCH_IDS), time.monotonic(), self._pending, self._expired, self._spent)
            self._pending, self._expired, self._spent = {}, set(), {}
            self._unsent.append(batch)
        while self._unsent:
            batch = self._unsent[0]
            try:
                await self._counters.add_usage(
                    batch.sums, batch.expired, batch.spent, timeout_s or self._timeout_s, batch=batch.id
                )
            except StoreUnavailable:  # perhaps partly applied: sent again whole, its marks apply each part once
                self._give_up_on_old_batches()
                return
            self._unsent.popleft()

    def _give_up_on_old_batches(self) -> None:
        """A batch unsent for longer than its marks are kept could count twice if sent again: it is
        dropped, and said (the request log has every request it held)."""
        now = time.monotonic()
        while self._unsent and (now - self._unsent[0].since > _RESEND_FOR_S or len(self._unsent) > _UNSENT_AT_MOST):
            _unrecorded(self._unsent.popleft(), "the store did not take it for too long")

    async def read(
        self, keys: Sequence[tuple[str, str]], start: datetime, end: datetime
    ) -> dict[tuple[str, str], UsageFigures] | None:
        """The daily sums of ``(key_id, tenant)`` pairs over [start, end] (UTC days), per pair (a key
        moved to another tenant has a sum in each); None when unreadable."""
        days = [(start + timedelta(days=i)).strftime("%Y%m%d") for i in range((end - start).days + 1)]
        names = [keyspace.usage(tenant, key_id, day)[0] for key_id, tenant in keys for day in days]
        try:
            rows = await self._counters.read_usage(names, 2.0)
        except StoreUnavailable:
            return None
        totals = {pair: UsageFigures() for pair in keys}
        for index, row in enumerate(rows):
            totals[keys[index // len(days)]].add(row)
        return totals

    async def aclose(self, until: float | None = None) -> None:
        """Write what is held, sent again every :data:`_CLOSING_RETRY_EVERY_S` while the store does
        not take it, up to ``until`` (the event loop's clock; default :data:`CLOSING_RETRY_S` from
        now): a Redis back within that still gets it. Tried once, it was refused at once while
        Redis was marked down, and dropped 0.17 s after SIGTERM (t74)."""
        if self._flusher is not None:
            self._flusher.cancel()
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSING_RETRY_S if until is None else until
        await self.flush(_bounded(self._timeout_s, until - loop.time()))
        if self._unsent and self._store_configured and until > loop.time():
            await self._flush_again_until(until)
        while self._unsent:
            _unrecorded(self._unsent.popleft(), "shutting down while the store did not take it")

    async def _flush_again_until(self, until: float) -> None:
        """At shutdown, send what the store did not take again until it does or ``until`` passes."""
        loop = asyncio.get_running_loop()
        requests, cost = _held(self._unsent)
        _log.info(
            "usage_held_at_shutdown", requests=requests, cost_usd=cost, trying_for_s=round(until - loop.time(), 1)
        )
        while self._unsent and (left := until - loop.time()) > 0:
            await asyncio.sleep(min(_CLOSING_RETRY_EVERY_S, left))
            await self.flush(_bounded(self._timeout_s, until - loop.time()))

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
