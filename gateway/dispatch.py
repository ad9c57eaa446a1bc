"""Send a request along a route: retries with jittered backoff, fallbacks, circuit breakers.

Everything here happens before the first byte reaches the client; once a stream
has started nothing is retried (the client would see tokens twice).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.config.schema import RetryPolicy
from gateway.errors import UpstreamError, UpstreamStatusError, UpstreamUnavailableError
from gateway.upstreams.base import Provider
from gateway.upstreams.breaker import CircuitBreaker

__all__ = ["DispatchInfo", "dispatch"]

T = TypeVar("T")


@dataclass(slots=True)
class DispatchInfo:
    """How the answer was obtained, for headers, the log and metrics."""

    provider: Provider | None = None
    attempts: int = 0
    fallback_used: bool = False
    upstream_seconds: float = 0.0
    """Time spent waiting on upstreams (backoff included): excluded from the gateway's overhead."""
    failures: list[UpstreamError] = field(default_factory=list)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


async def dispatch(
    candidates: tuple[str, ...],
    providers: Mapping[str, Provider],
    breakers: Mapping[str, CircuitBreaker],
    retry: RetryPolicy,
    body: dict[str, Any],
    call: Callable[[Provider, dict[str, Any]], Awaitable[T]],
    info: DispatchInfo,
) -> T:
    """Run ``call`` on the first candidate that answers; raise the last error if none does.

    An error that is not retryable (a 4xx other than 408/429: the request itself is
    wrong) is raised at once: another model would reject it the same way.
    """
    last_error: UpstreamError | None = None
    for position, name in enumerate(candidates):
        provider, breaker = providers[name], breakers[name]
        if not breaker.allow():
            last_error = UpstreamUnavailableError(name, "circuit open: the upstream is failing; skipped")
            info.failures.append(last_error)
            continue
        healthy: bool | None = None  # one verdict per request and upstream, whatever the attempts
        try:
            for attempt in range(retry.max_attempts):
                info.attempts += 1
                info.fallback_used = position > 0
                started = time.perf_counter()
                try:
                    result = await call(provider, {**body, "model": provider.upstream_model})
                    healthy = True
                    info.provider = provider
                    return result
                except UpstreamError as exc:
                    last_error = exc
                    info.failures.append(exc)
                    if _says_upstream_is_unhealthy(exc):
                        healthy = False
                    if not exc.retryable:
                        raise
                    delay = _backoff_s(retry, attempt, exc)
                    if delay is None or attempt + 1 >= retry.max_attempts:
                        break
                    await asyncio.sleep(delay)
                finally:
                    info.upstream_seconds += time.perf_counter() - started
        finally:
            if healthy is True:
                breaker.record_success()
            elif healthy is False:
                breaker.record_failure()
            else:
                breaker.abandon()
    assert last_error is not None
    raise last_error


def _says_upstream_is_unhealthy(exc: UpstreamError) -> bool:
    """Connection errors, timeouts, 5xx and broken answers; not 429 or the request's own 4xx."""
    if isinstance(exc, UpstreamStatusError):
        return exc.upstream_status >= 500
    return not isinstance(exc, UpstreamUnavailableError)


def _backoff_s(retry: RetryPolicy, attempt: int, exc: UpstreamError) -> float | None:
    """Seconds to wait before the next attempt, or None to move to the next fallback now."""
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        return retry_after if retry_after <= retry.max_retry_after_s else None
    ceiling = min(retry.backoff_max_ms, retry.backoff_initial_ms * (2**attempt)) / 1000
    return random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread retries, keep a floor
