"""The exact cache and request coalescing, both keyed by :func:`gateway.cache.keys.exact_key`."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway.background import BackgroundTasks
from gateway.cache.entries import CachedAnswer
from gateway.errors import UpstreamError
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = ["LEADER_LEFT", "ExactCache", "Lease", "Outcome"]


class _LeaderLeft:
    """The request others waited on ended without an answer or an error: its client left."""


LEADER_LEFT = _LeaderLeft()


class _LeaseFreed:
    """Another process's lease on a key went without an answer in the cache."""


_FREED = _LeaseFreed()


class _StoreLost:
    """The store stopped answering while this process waited on another's lease."""


_STORE_LOST = _StoreLost()

_RELEASE_RETRY_S = 0.5
_LEASE_MS = 5000
"""How long a lease lasts in the store unless its holder renews it: how long identical requests
wait on a leader whose process died. (Set to the whole wait, ~31 s, and never renewed, the lease of
a killed worker's request held every identical request, on every worker, for 20-33 s: t97.)"""
_RENEW_S = 1.5
"""How often a leader still at work renews its lease: three renewals may fail in a row (Redis slow,
the event loop busy) before it lapses. A request answered sooner sends none."""

Outcome = CachedAnswer | UpstreamError | _LeaderLeft | None
"""What a request waiting on an identical one is handed: its answer, its upstream error,
:data:`LEADER_LEFT` (one of the waiters leads now), or nothing."""


@dataclass(slots=True)
class Lease:
    """Held by the one request that calls upstream for a key; others wait for its answer."""

    key: str
    token: str
    future: asyncio.Future[Outcome]
    held_in_store: bool
    expires_at: float = 0.0
    """When the store drops the lease by itself unless it is renewed (the event loop's clock)."""
    renew_until: float = 0.0
    """Renewals stop here, 1 s past the wait of the requests that came with it: as before leases
    were renewed, one that came later leads a flight of its own after that."""
    renewal: asyncio.TimerHandle | None = None
    """The next renewal, while the lease is held."""
    waited: bool = False
    """It was taken after waiting on an identical request that gave no answer: that wait was
    on an upstream call, not the gateway's work (t70)."""


class ExactCache:
    def __init__(self, store: KeyValue) -> None:
        self._store = store
        self._flights: dict[str, asyncio.Future[Outcome]] = {}
        self._waiting: dict[str, int] = {}
        """How many requests in this process wait on each key's flight now."""
        self._background = BackgroundTasks()
        """Releases and renewals that outlive the request that started them."""

    async def get(self, key: str, timeout_s: float) -> CachedAnswer | None:
        """The stored answer, or None; raises StoreUnavailable when the cache could not be asked."""
        raw = await self._store.get(key, timeout_s)
        return CachedAnswer.decode(raw) if raw else None

    async def put(
        self, key: str, answer: CachedAnswer, ttl_s: int, timeout_s: float, lease: Lease | None = None
    ) -> None:
        """Store ``answer``; with the request's ``lease``, drop it in the same round trip and
        hand the answer to the requests waiting on it."""
        release = lease.token if lease is not None and lease.held_in_store else None
        if lease is not None:
            _stop_renewing(lease)
        try:
            await self._store.put(key, answer.encode(), ttl_s, timeout_s, release)
        except StoreUnavailable:  # an answer not stored is a later miss, nothing worse
            if lease is not None and lease.held_in_store:
                self._release_later(lease, timeout_s)
        if lease is not None:
            self._settle(lease.key, lease.future, answer)

    async def join_or_lead(
        self, key: str, wait_s: float, timeout_s: float, on_wait: Callable[[], None] | None = None
    ) -> tuple[CachedAnswer | UpstreamError | None, Lease | None]:
        """Coalesce identical in-flight requests, within this process and across processes.

        Returns ``(answer, None)`` when another request's answer arrived in time,
        ``(error, None)`` when the request this one waited on in this process failed upstream
        (the same request would fail the same way: its waiters are not sent after it),
        ``(None, lease)`` when this request must call upstream and release the lease
        after, and ``(None, None)`` when waiting gave nothing (call upstream, no lease).
        When the request waited on in this process was abandoned by its client, or the one in
        another process went without an answer or could no longer be watched (the store failed),
        one of the waiters here takes the lead and the others wait on it (not each its own
        upstream call). ``on_wait`` is called once, when it first waits on an identical request
        (in this process or another).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        waited = False
        while (local := self._flights.get(key)) is not None:
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a client's cancel
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    outcome = await asyncio.shield(local)
            except TimeoutError:
                return None, None
            finally:
                self._stop_waiting(key)
            if not isinstance(outcome, _LeaderLeft):
                return outcome, None
        future: asyncio.Future[Outcome] = loop.create_future()
        self._flights[key] = future
        token = secrets.token_hex(8)
        lock_ms = int(wait_s * 1000) + 1000  # how long it is renewed at most
        lease_ms = min(lock_ms, _LEASE_MS)
        lease = Lease(key, token, future, held_in_store=True, expires_at=loop.time() + lease_ms / 1000, waited=waited)
        try:
            while True:
                asked = loop.time()
                try:
                    acquired = await self._store.acquire(key, token, lease_ms, timeout_s)
                except StoreUnavailable:  # no lease to be had: this process answers alone
                    return None, Lease(key, token, future, held_in_store=False, waited=lease.waited)
                if acquired:
                    lease.expires_at, lease.renew_until = asked + lease_ms / 1000, asked + lock_ms / 1000
                    self._keep(lease, timeout_s)
                    return None, lease
                # Another process is answering: wait for its answer to appear in the cache.
                if not lease.waited and on_wait is not None:
                    on_wait()
                answer = await self._await_other_process(key, max(0.0, deadline - loop.time()), timeout_s)
                if isinstance(answer, _StoreLost):  # as when no lease could be had; the waiters here wait on it
                    return None, Lease(key, token, future, held_in_store=False, waited=True)
                if not isinstance(answer, _LeaseFreed):
                    self._settle(key, future, answer)
                    return answer, None
                lease.waited = True
                # Its lease went without an answer (its client left, or the answer was not one to
                # keep): this one takes the lead and the waiters here wait on it, rather than each
                # calling upstream on its own (12 calls for one burst, t35).
        except asyncio.CancelledError:
            # Its client left while it took the lead: the requests that came to wait on it take
            # the lead in turn (left as it was, each later one waited its whole wait_s: t33), once
            # a lease the store may have granted it is dropped (told first, the one taking over
            # found the lease held and sent every waiter upstream on its own: t34).
            self._background.spawn(self._hand_over(lease, timeout_s))
            raise

    def awaited(self, lease: Lease) -> bool:
        """Whether a request in this process waits on ``lease``'s answer now. Those in other
        processes are not seen: a leader that gives up leaves its lease without an answer, and
        one of them calls upstream in its turn."""
        return self._flights.get(lease.key) is lease.future and self._waiting.get(lease.key, 0) > 0

    def _stop_waiting(self, key: str) -> None:
        left = self._waiting.pop(key) - 1
        if left:
            self._waiting[key] = left

    async def release(self, lease: Lease, answer: Outcome, timeout_s: float) -> None:
        """Drop the lease and hand the answer, the upstream's error, :data:`LEADER_LEFT` or None
        (not cacheable, or the request ended without either) to the waiters: the lease first,
        so that a waiter taking the lead finds it free; the waiters are told even when the release is
        cut short (else each later identical request would wait its whole ``wait_s`` on them)."""
        _stop_renewing(lease)
        try:
            if lease.held_in_store:
                try:
                    await self._store.release(lease.key, lease.token, timeout_s)
                except StoreUnavailable:
                    self._release_later(lease, timeout_s)
                except asyncio.CancelledError:  # the store may not have heard: told again, on a task of its own
                    self._background.spawn(self._hand_over(lease, timeout_s))
                    raise
        finally:
            self._settle(lease.key, lease.future, answer)

    async def _hand_over(self, lease: Lease, timeout_s: float) -> None:
        """Drop the lease of a request that left while taking the lead, then tell its waiters."""
        _stop_renewing(lease)
        try:
            await self._store.release(lease.key, lease.token, timeout_s)
        except StoreUnavailable:
            self._release_later(lease, timeout_s)
        finally:
            self._settle(lease.key, lease.future, LEADER_LEFT)

    def _keep(self, lease: Lease, timeout_s: float) -> None:
        """Renew the lease in :data:`_RENEW_S`, up to its ``renew_until``: a live leader keeps it
        as long as its waiters wait, however slow its upstream, and a dead one's lapses within
        :data:`_LEASE_MS` (its waiters see it gone and one of them leads)."""
        if lease.renew_until > lease.expires_at:
            lease.renewal = asyncio.get_running_loop().call_later(_RENEW_S, self._start_renewal, lease, timeout_s)

    def _start_renewal(self, lease: Lease, timeout_s: float) -> None:
        self._background.spawn(self._renew(lease, timeout_s))

    async def _renew(self, lease: Lease, timeout_s: float) -> None:
        """One renewal, and the next one unless the lease was lost or its request ended meanwhile
        (a renewal that lands after the lease was dropped finds another token or none: a no-op)."""
        if lease.renewal is None:  # its request ended between the timer and this task's first step
            return
        asked = asyncio.get_running_loop().time()
        ttl_ms = int(min(_LEASE_MS / 1000, lease.renew_until - asked) * 1000)
        if ttl_ms <= 0:
            return
        try:
            held = await self._store.renew(lease.key, lease.token, ttl_ms, timeout_s)
        except StoreUnavailable:
            held = True  # it may be held still: the next renewal may reach the store
        else:
            if held:
                lease.expires_at = asked + ttl_ms / 1000
        if held and lease.renewal is not None:
            self._keep(lease, timeout_s)

    def _release_later(self, lease: Lease, timeout_s: float) -> None:
        """Drop a lease the store could not be told about, once it answers again: left to expire,
        every identical request in every process would wait its whole time (~30 s) after an outage."""
        self._background.spawn(self._retry_release(lease, timeout_s))

    async def _retry_release(self, lease: Lease, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < lease.expires_at:
            await asyncio.sleep(_RELEASE_RETRY_S)
            try:
                await self._store.release(lease.key, lease.token, timeout_s)
            except StoreUnavailable:
                continue
            return

    def _settle(
        self,
        key: str,
        future: asyncio.Future[Outcome],
        answer: Outcome,
    ) -> None:
        if not future.done():
            future.set_result(answer)
        if self._flights.get(key) is future:
            del self._flights[key]

    async def _await_other_process(
        self, key: str, wait_s: float, timeout_s: float
    ) -> CachedAnswer | _LeaseFreed | _StoreLost | None:
        """The other process's answer once it is in the cache; :data:`_FREED` when its lease went
        without one; :data:`_STORE_LOST` when the store stopped answering (t74: told None, every
        waiter here called upstream on its own, 7 calls for 8 requests); None when the wait gave nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        delay = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.05)
            try:
                raw, leased = await self._store.peek(key, timeout_s)
            except StoreUnavailable:
                return _STORE_LOST
            if raw:
                return CachedAnswer.decode(raw)
            if not leased:
                return _FREED  # the leader finished without an answer (gone, an error, or not cacheable)
        return None


def _stop_renewing(lease: Lease) -> None:
    """Every way a lease's request ends: the store drops it, or it lapses within :data:`_LEASE_MS`."""
    if lease.renewal is not None:
        lease.renewal.cancel()
        lease.renewal = None
