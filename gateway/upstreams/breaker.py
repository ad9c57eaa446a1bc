"""Per-upstream circuit breaker: skip a dead upstream quickly, probe it again later."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config.schema import CircuitBreakerPolicy

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Closed → open after ``failure_threshold`` consecutive failures; after ``reset_after_s``
    one probe goes through (half-open): success closes it, failure opens it again."""

    __slots__ = ("_policy", "_failures", "_opened_at", "_probing", "_clock")

    def __init__(self, policy: CircuitBreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._failures = 0
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
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._policy.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def update_policy(self, policy: CircuitBreakerPolicy) -> None:
        self._policy = policy

    def abandon(self) -> None:
        """A call ended with no verdict (the client left): let the next one probe."""
        self._probing = False
