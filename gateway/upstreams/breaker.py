"""Per-upstream circuit breaker that judges the upstream's health, not one request's.

As Envoy's outlier detection does: the circuit opens when, over the last
``window_s`` seconds, at least ``min_requests`` requests reached the upstream and at
least ``failure_rate`` of them failed. A request counts once however many attempts
it made (the dispatcher gives one verdict), and only failures that say something
about the upstream count: connection errors, timeouts, 5xx and broken answers. A
prompt that fails on every model therefore cannot open anyone's circuit by itself.

After ``reset_after_s`` one probe goes through (half-open): success closes the
circuit and forgets the window, failure opens it again.

Circuits are per tenant (:class:`Breakers`): what a tenant's requests do to an upstream
(prompts that break a model server, generations that run past the timeout) opens that
tenant's circuit only, never another's; an upstream that is down opens each active
tenant's circuit after that tenant's own ``min_requests``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from gateway.config.schema import CircuitBreakerPolicy

__all__ = ["Breakers", "CircuitBreaker"]

_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    __slots__ = ("_buckets", "_clock", "_opened_at", "_policy", "_probing")

    def __init__(self, policy: CircuitBreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._buckets: deque[list[int]] = deque()
        """``[second, successes, failures]``, oldest first, within the window."""
        self._opened_at: float | None = None
        self._probing = False
        self._clock = clock

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._probing or self._clock() - self._opened_at >= self._policy.reset_after_s else "open"

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self._policy.reset_after_s:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        if self._opened_at is not None:  # the probe answered: a fresh start
            self._opened_at = None
            self._probing = False
            self._buckets.clear()
        self._count(ok=True)

    def record_failure(self) -> None:
        if self._probing:
            self._opened_at = self._clock()
            self._probing = False
            return
        self._count(ok=False)
        requests, failures = self._totals()
        policy = self._policy
        if requests >= policy.min_requests and failures >= policy.failure_rate * requests:
            self._opened_at = self._clock()

    def record_broken(self) -> None:
        """An answer that began well, then broke (a stream cut, stalled or errored mid-way): the
        success its start counted becomes a failure, so the request still has one verdict."""
        for bucket in reversed(self._buckets):
            if bucket[1] > 0:
                bucket[1] -= 1
                break
        self.record_failure()

    def update_policy(self, policy: CircuitBreakerPolicy) -> None:
        self._policy = policy

    def abandon(self) -> None:
        """A call ended with no verdict (the client left, or the request itself was refused): let the next one probe."""
        self._probing = False

    def _count(self, *, ok: bool) -> None:
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        buckets[-1][1 if ok else 2] += 1
        horizon = second - self._policy.window_s
        while buckets and buckets[0][0] <= horizon:
            buckets.popleft()

    def _totals(self) -> tuple[int, int]:
        horizon = int(self._clock()) - self._policy.window_s
        successes = failures = 0
        for second, ok, failed in self._buckets:
            if second > horizon:
                successes += ok
                failures += failed
        return successes + failures, failures


class Breakers:
    """Every tenant's circuit breaker for every model of the policy, made on a tenant's first request."""

    __slots__ = ("_by_tenant", "_names", "_off_path", "_policy")

    def __init__(self) -> None:
        self._policy = CircuitBreakerPolicy()
        self._names: tuple[str, ...] = ()
        self._by_tenant: dict[str, dict[str, CircuitBreaker]] = {}
        self._off_path: dict[str, dict[str, CircuitBreaker]] = {}

    def configure(self, names: Iterable[str], policy: CircuitBreakerPolicy) -> None:
        """The policy's models and breaker settings, at start and on each reload (circuits keep their state)."""
        self._names, self._policy = tuple(names), policy
        for breakers in (*self._by_tenant.values(), *self._off_path.values()):
            for breaker in breakers.values():
                breaker.update_policy(policy)
            for name in self._names:
                if name not in breakers:
                    breakers[name] = CircuitBreaker(policy)

    def for_tenant(self, tenant: str) -> Mapping[str, CircuitBreaker]:
        return self._made(self._by_tenant, tenant)

    def off_the_path(self, tenant: str) -> Mapping[str, CircuitBreaker]:
        """The tenant's circuits for calls no client waits for (shadow judging, cache audits): their
        failures (a long answer asked again unstreamed, past ``first_byte``) opened the circuits the
        tenant's own requests go through, which then got 502s from a healthy model (t32)."""
        return self._made(self._off_path, tenant)

    def _made(self, by_tenant: dict[str, dict[str, CircuitBreaker]], tenant: str) -> dict[str, CircuitBreaker]:
        breakers = by_tenant.get(tenant)
        if breakers is None:
            breakers = by_tenant[tenant] = _Circuits(self)
            breakers.update((name, CircuitBreaker(self._policy)) for name in self._names)
        return breakers

    def state(self, name: str) -> str:
        """The model's worst circuit over the tenants (what ``/readyz`` shows): open somewhere is worth knowing."""
        states = [breakers[name].state for breakers in self._by_tenant.values() if name in breakers]
        return max(states, key=_SEVERITY.__getitem__, default="closed")


class _Circuits(dict[str, CircuitBreaker]):
    """A tenant's circuits, with one made for a model the policy no longer names: a request that
    began before a reload renamed its model dispatches on the policy it began with (t56: the
    tenant's first such request was a KeyError, a 500)."""

    __slots__ = ("_breakers",)

    def __init__(self, breakers: Breakers) -> None:
        super().__init__()
        self._breakers = breakers

    def __missing__(self, name: str) -> CircuitBreaker:
        breaker = self[name] = CircuitBreaker(self._breakers._policy)
        return breaker
