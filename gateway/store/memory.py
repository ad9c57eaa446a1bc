"""The store in process: the same contracts as the Redis store, for unit tests (nothing in the
gateway itself uses it).

Nothing is shared between processes and nothing survives a restart. ``clock`` is
injectable so tests can move time (TTLs, leases, minute windows) without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.accounting.usage import UsageFigures
from gateway.store import keyspace
from gateway.store.base import (
    BOUNDED_ENTRY_BYTES,
    BOUNDED_EVICTIONS_AT_MOST,
    HELD_DUST,
    PENDING_S,
    Caps,
    ReserveOutcome,
    ReserveRequest,
    SettleRequest,
    Spent,
    Store,
    StoreUnavailable,
    VectorMatch,
    past_budget,
)
from gateway.store.keyspace import pending_reservations

__all__ = ["MemoryKeyValue", "MemoryLimitCounters", "MemoryVectorIndex", "memory_store"]

Clock = Callable[[], float]


class _Outage:
    """``down = True`` makes every call raise StoreUnavailable, as a dead Redis does."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable


class MemoryKeyValue(_Outage):
    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._lists: dict[str, tuple[list[bytes], float]] = {}
        self._ledgers: dict[str, dict[str, tuple[int, float]]] = {}
        """Ledger -> its keys, oldest first -> (bytes, time stored)."""

    async def get(self, key: str, timeout_s: float) -> bytes | None:
        self._check()
        return self._live(key)

    async def put(self, key: str, value: bytes, ttl_s: int, timeout_s: float, release: str | None = None) -> None:
        self._check()
        self._values[key] = (value, self._clock() + ttl_s)
        if release is not None:
            lease = keyspace.lease(key)
            if self._live(lease) == release.encode():
                del self._values[lease]

    async def get_many(self, keys: list[str], timeout_s: float) -> list[bytes | None]:
        self._check()
        return [self._live(key) for key in keys]

    async def put_many(self, items: list[tuple[str, bytes]], ttl_s: int, timeout_s: float) -> None:
        self._check()
        for key, value in items:
            self._values[key] = (value, self._clock() + ttl_s)

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
        self._check()
        size = len(value) + BOUNDED_ENTRY_BYTES
        if size > max_bytes or (new_only and self._live(key) is not None):
            return None
        now = self._clock()
        held = self._ledgers.setdefault(ledger, {})
        for old in [k for k, (_, stored) in held.items() if stored <= now - ttl_s]:
            del held[old]
        held.pop(key, None)
        deleted = 0
        while held and sum(weight for weight, _ in held.values()) + size > max_bytes:
            if deleted == BOUNDED_EVICTIONS_AT_MOST:
                self._values.pop(key, None)
                return None
            oldest = next(iter(held))
            del held[oldest]
            self._values.pop(oldest, None)
            deleted += 1
        held[key] = (size, now)
        self._values[key] = (value, now + ttl_s)
        return deleted

    async def get_bounded(self, keys: list[str], ledger: str, ttl_s: int, timeout_s: float) -> list[bytes | None]:
        self._check()
        now = self._clock()
        held = self._ledgers.setdefault(ledger, {})
        values = [self._live(key) for key in keys]
        for key, value in zip(keys, values, strict=True):
            if value is not None and key in held:
                held[key] = (held.pop(key)[0], now)  # the newest now: last in the ledger's order
                self._values[key] = (value, now + ttl_s)
        return values

    async def delete_bounded(self, key: str, ledger: str, timeout_s: float, *, keep_out_s: int = 0) -> bool:
        self._check()
        self._ledgers.get(ledger, {}).pop(key, None)
        deleted = await self.delete(key, timeout_s)
        if keep_out_s:
            self._values[key] = (b"", self._clock() + keep_out_s)
        return deleted

    async def delete(self, key: str, timeout_s: float) -> bool:
        self._check()
        return self._live(key) is not None and self._values.pop(key, None) is not None

    async def acquire(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        self._check()
        lease = keyspace.lease(key)
        if self._live(lease) is not None:
            return False
        self._values[lease] = (token.encode(), self._clock() + ttl_ms / 1000)
        return True

    async def release(self, key: str, token: str, timeout_s: float) -> None:
        self._check()
        lease = keyspace.lease(key)
        if self._live(lease) == token.encode():
            del self._values[lease]

    async def renew(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        self._check()
        lease = keyspace.lease(key)
        if self._live(lease) != token.encode():
            return False
        self._values[lease] = (token.encode(), self._clock() + ttl_ms / 1000)
        return True

    async def peek(self, key: str, timeout_s: float) -> tuple[bytes | None, bool]:
        self._check()
        return self._live(key), self._live(keyspace.lease(key)) is not None

    async def append(self, key: str, value: bytes, max_len: int, ttl_s: int, timeout_s: float) -> None:
        self._check()
        items = self._lists.get(key)
        if items is None or items[1] <= self._clock():
            items = ([], 0.0)
        kept = [*items[0], value][-max_len:]
        self._lists[key] = (kept, self._clock() + ttl_s)

    async def append_counted(
        self, key: str, value: bytes, max_len: int, ttl_s: int, counter: str, counter_ttl_s: int, at_most: int,
        timeout_s: float,
    ) -> bool:  # fmt: skip
        self._check()
        current = self._live(counter)
        if current is not None and float(current) >= at_most:
            return False
        await self.append(key, value, max_len, ttl_s, timeout_s)
        await self.add_float(counter, 1.0, counter_ttl_s, timeout_s)
        return True

    async def read_list(self, key: str, timeout_s: float) -> list[bytes]:
        self._check()
        items = self._lists.get(key)
        return list(items[0]) if items is not None and items[1] > self._clock() else []

    async def add_float(self, key: str, amount: float, ttl_s: int, timeout_s: float) -> float:
        self._check()
        current = self._live(key)
        total = (float(current) if current is not None else 0.0) + amount
        expires = self._values[key][1] if current is not None else self._clock() + ttl_s
        self._values[key] = (repr(total).encode(), expires)
        return total

    def keys(self) -> list[str]:
        return [key for key in self._values if self._live(key) is not None]

    def _live(self, key: str) -> bytes | None:
        found = self._values.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._values[key]
            return None
        return found[0]


@dataclass(slots=True)
class _Element:
    unit: np.ndarray
    entry: bytes
    expires: float
    added: float


@dataclass(slots=True)
class _Index:
    elements: dict[str, _Element] = field(default_factory=dict)


class MemoryVectorIndex(_Outage):
    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._indexes: dict[str, _Index] = {}

    async def nearest(self, index: str, vector: np.ndarray, count: int, timeout_s: float) -> list[VectorMatch]:
        self._check()
        found = self._indexes.get(index)
        if found is None or not found.elements:
            return []
        query = _unit(vector)
        scored = [VectorMatch(name, float(element.unit @ query)) for name, element in found.elements.items()]
        scored.sort(key=lambda match: match.similarity, reverse=True)
        return scored[:count]

    async def entries(self, index: str, elements: list[str], timeout_s: float) -> list[bytes | None]:
        self._check()
        found = self._indexes.get(index)
        now = self._clock()
        items = [found.elements.get(element) if found is not None else None for element in elements]
        return [item.entry if item is not None and item.expires > now else None for item in items]

    async def add(
        self, index: str, element: str, vector: np.ndarray, entry: bytes, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        self._check()
        now = self._clock()
        elements = self._indexes.setdefault(index, _Index()).elements
        elements.pop(element, None)
        elements[element] = _Element(_unit(vector), entry, now + ttl_s, now)
        while len(elements) > max_entries:
            del elements[next(iter(elements))]  # insertion order: the oldest first

    async def remove(self, index: str, element: str, timeout_s: float) -> None:
        self._check()
        found = self._indexes.get(index)
        if found is not None:
            found.elements.pop(element, None)

    def size(self, index: str) -> int:
        found = self._indexes.get(index)
        return len(found.elements) if found is not None else 0


@dataclass(slots=True)
class _Window:
    minute: int = -2
    requests: float = 0
    previous_requests: float = 0
    tokens: float = 0
    previous_tokens: float = 0

    def seen_at(self, minute: int) -> tuple[float, float, float, float]:
        if self.minute == minute:
            return self.requests, self.previous_requests, self.tokens, self.previous_tokens
        if self.minute == minute - 1:
            return 0, self.requests, 0, self.tokens
        return 0, 0, 0, 0


@dataclass(slots=True)
class _Period:
    """What one day or month has spent, and the part of it marked reservations not yet settled hold."""

    name: str = ""
    spent: float = 0.0
    held: float = 0.0


@dataclass(slots=True)
class _Periods:
    """A counter's latest day (or month) and the one before it, as the Redis scripts keep them: a
    request started before midnight counts in its own period after it, never over the newer one (f203)."""

    latest: _Period = field(default_factory=_Period)
    before: _Period = field(default_factory=_Period)

    def find(self, name: str) -> _Period | None:
        """Where ``name`` is counted, or None."""
        if self.latest.name == name:
            return self.latest
        return self.before if self.before.name == name else None

    def open(self, name: str) -> _Period | None:
        """Where ``name`` is counted, made room for where it is new: None for one older than both."""
        found = self.find(name)
        if found is not None:
            return found
        if self.latest.name < name:
            self.before, self.latest = self.latest, _Period(name)
            return self.latest
        if self.before.name < name:  # between the two: nothing was counted in it
            self.before = _Period(name)
            return self.before
        return None

    def release(self, name: str, usd: float) -> None:
        found = self.find(name)
        if found is not None:
            left = found.held - usd
            found.held = left if left > HELD_DUST else 0.0


@dataclass(slots=True)
class _Spend:
    days: _Periods = field(default_factory=_Periods)
    months: _Periods = field(default_factory=_Periods)

    @property
    def spent_day(self) -> float:
        """What the latest day has spent."""
        return self.days.latest.spent

    def release(self, day: str, month: str, usd: float) -> None:
        self.days.release(day, usd)
        self.months.release(month, usd)

    def add(self, day: str, month: str, cost: float, fresh: bool) -> None:
        """``cost`` added to its day and month where counted; a new period opened when ``fresh``."""
        for periods, name in ((self.days, day), (self.months, month)):
            found = periods.open(name) if fresh else periods.find(name)
            if found is not None:
                found.spent += cost


class MemoryLimitCounters(_Outage):
    """The Redis scripts' arithmetic, in Python (the unit tests hold both to one contract)."""

    def __init__(self) -> None:
        self.windows: dict[str, _Window] = {}
        self.spends: dict[str, _Spend] = {}
        self.usage: dict[str, UsageFigures] = {}
        self.indexed: dict[str, set[str]] = {}
        self.marks: dict[str, str] = {}
        """Reservations made ("r"), settled ("s") and undone unsettled ("x"), as the Redis scripts
        keep them (no expiry here)."""
        self.batches: set[tuple[str, str]] = set()
        """(tenant hash tag, batch id) of the usage batches' parts applied."""
        self._pending: dict[str, dict[str, float]] = {}
        """Per tenant: unsettled reservations' marks, by when they are given up."""
        self._undo: dict[str, tuple[float, str, str, tuple[str, ...]]] = {}

    def _give_up_unsettled(self, pending: dict[str, float], now: float) -> None:
        for mark, due in list(pending.items()):
            if due > now:
                continue
            del pending[mark]
            if self.marks.get(mark) == "r":
                cost, day, month, spends = self._undo.pop(mark)
                for key in spends:
                    spend = self.spends.get(key)
                    if spend is not None:
                        spend.add(day, month, -cost, fresh=False)
                        spend.release(day, month, cost)
                self.marks[mark] = "x"

    async def reserve(self, request: ReserveRequest, timeout_s: float) -> ReserveOutcome:
        self._check()
        now = (request.minute + request.minute_fraction) * 60
        if request.mark is not None:
            self._give_up_unsettled(self._pending.setdefault(pending_reservations(request.mark), {}), now)
        share = 0.0
        seen = []
        rest = 1 - request.minute_fraction
        spents, helds = [], []
        for scope in request.scopes:
            spend = self.spends.get(scope.spend, _Spend())
            of_day, of_month = spend.days.find(request.day) or _Period(), spend.months.find(request.month) or _Period()
            spents.append((of_day.spent, of_month.spent))
            helds.append((of_day.held, of_month.held))
        told, held = tuple(spents), tuple(helds)
        for index, scope in enumerate(request.scopes):
            r, rp, t, tp = self.windows.get(scope.window, _Window()).seen_at(request.minute)
            day, month = spents[index]
            seen.append((r, rp, t, tp, day, month))
            caps: Caps = scope.caps
            if caps.rpm is not None and request.requests and r + rp * rest + request.requests > caps.rpm:
                return ReserveOutcome(f"{index}.rpm", 0.0, 0.0, (r, rp), told, held)
            if caps.tpm is not None and t + tp * rest + request.tokens > caps.tpm:
                return ReserveOutcome(f"{index}.tpm", 0.0, 0.0, (t, tp), told, held)
            for cap, spent, name in (
                (caps.usd_per_day, day, "usd_per_day"),
                (caps.usd_per_month, month, "usd_per_month"),
            ):
                if cap is None:
                    continue
                if past_budget(spent, request.cost_usd, cap):
                    return ReserveOutcome(f"{index}.{name}", spent, 0.0, spent=told, held=held)
                if cap > 0:
                    share = max(share, spent / cap)
        hold = request.cost_usd if request.mark is not None else 0.0
        for scope, (r, rp, t, tp, _, _) in zip(request.scopes, seen, strict=True):
            self.windows[scope.window] = _Window(request.minute, r + request.requests, rp, t + request.tokens, tp)
            spend = self.spends.setdefault(scope.spend, _Spend())
            for periods, name in ((spend.days, request.day), (spend.months, request.month)):
                found = periods.open(name)
                if found is not None:  # None: older than both periods kept (it outlasted a day)
                    found.spent += request.cost_usd
                    found.held += hold
        if request.mark is not None:
            self.marks[request.mark] = "r"
            spends = tuple(scope.spend for scope in request.scopes)
            self._undo[request.mark] = (request.cost_usd, request.day, request.month, spends)
            self._pending[pending_reservations(request.mark)][request.mark] = now + PENDING_S
        return ReserveOutcome(None, 0.0, share, spent=told, held=held)

    async def settle(self, request: SettleRequest, timeout_s: float) -> None:
        self._check()
        made = True
        if request.mark is not None:
            state = self.marks.get(request.mark)
            if state == "s":
                return
            made = state != "x" and (request.made or state == "r")
            self.marks[request.mark] = "s"
            self._undo.pop(request.mark, None)
            self._pending.get(pending_reservations(request.mark), {}).pop(request.mark, None)
        tokens, cost = (request.token_delta, request.cost_delta) if made else (request.tokens, request.cost_usd)
        for scope in request.scopes:
            window = self.windows.get(scope.window)
            if window is not None and tokens:
                if window.minute == request.minute:
                    window.tokens += tokens
                elif window.minute == request.minute + 1:
                    window.previous_tokens += tokens
            spend = self.spends.get(scope.spend)
            if request.mark is not None and made and spend is not None:
                spend.release(request.day, request.month, request.held_usd)
            if not cost:
                continue
            if made:
                if spend is not None:
                    spend.add(request.day, request.month, cost, fresh=False)
            else:  # never reserved: counted as spend without a reservation is
                await self.add_usage({}, (), {(scope.spend, request.day, request.month): cost}, timeout_s)
        await self.add_usage(dict.fromkeys(request.usage_keys, request.used), request.expired_keys, {}, timeout_s)

    async def add_usage(
        self,
        sums: Mapping[str, UsageFigures],
        expired: Iterable[str],
        spent: Spent,
        timeout_s: float,
        batch: str | None = None,
    ) -> None:
        self._check()
        if batch is not None:  # each tenant's part once, as the Redis script marks it
            keys = [*sums, *expired, *(key for key, _, _ in spent)]
            done = {keyspace.hash_tag(key) for key in keys if (keyspace.hash_tag(key), batch) in self.batches}
            self.batches.update((keyspace.hash_tag(key), batch) for key in keys)
            sums = {key: used for key, used in sums.items() if keyspace.hash_tag(key) not in done}
            expired = [key for key in expired if keyspace.hash_tag(key) not in done]
            spent = {counter: cost for counter, cost in spent.items() if keyspace.hash_tag(counter[0]) not in done}
        for key, used in sums.items():
            self.usage.setdefault(key, UsageFigures()).add(used)
        for key in expired:
            self.usage.pop(key, None)
        for (key, day, month), cost in spent.items():
            self.spends.setdefault(key, _Spend()).add(day, month, cost, fresh=cost > 0)

    async def index_usage(self, members: Mapping[str, Iterable[str]], ttl_s: int, timeout_s: float) -> None:
        self._check()
        for day, names in members.items():
            self.indexed.setdefault(day, set()).update(names)

    async def indexed_usage(self, days: Sequence[str], timeout_s: float) -> set[str]:
        self._check()
        return {member for day in days for member in self.indexed.get(day, ())}

    async def read_usage(self, keys: Sequence[str], timeout_s: float) -> list[UsageFigures]:
        self._check()
        result = []
        for key in keys:
            figures = UsageFigures()
            found = self.usage.get(key)
            if found is not None:
                figures.add(found)
            result.append(figures)
        return result


def memory_store(clock: Clock = time.time) -> Store:
    return Store(MemoryKeyValue(clock), MemoryVectorIndex(clock), MemoryLimitCounters())


def _unit(vector: np.ndarray) -> np.ndarray:
    values = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values
