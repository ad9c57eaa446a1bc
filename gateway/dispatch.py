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
from typing import TypeVar

from gateway.config.schema import RetryPolicy
from gateway.errors import (
    InvalidRequestError,
    UpstreamBusyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamUnavailableError,
)
from gateway.upstreams.base import Provider
from gateway.upstreams.breaker import CircuitBreaker
from gateway.upstreams.deadline import model_deadline
from gateway.upstreams.sending import SendMark

__all__ = ["DispatchInfo", "dispatch", "says_upstream_is_unhealthy"]

T = TypeVar("T")


@dataclass(slots=True)
class DispatchInfo:
    """How the answer was obtained, for headers, the log and metrics."""

    provider: Provider | None = None
    asked: Provider | None = None
    """The upstream at work (the one answering, or the one working when the client left); None
    between attempts, once one failed: that one answered, with an error, and costs nothing."""
    attempts: int = 0
    fallback_used: bool = False
    upstream_seconds: float = 0.0
    """Time spent waiting on upstreams (backoff included): excluded from the gateway's overhead."""
    client_seconds: float = 0.0
    """Time spent waiting for the client to send its body: excluded from the overhead too (t151)."""
    failures: list[UpstreamError] = field(default_factory=list)
    last_attempt: Callable[[], bool] | None = None
    """Set when the client left: whether the attempt at work, should it fail, is the last (none is
    made for a client that is gone, unless identical requests wait on its answer then)."""

    def goes_on_without_client(self, sending: SendMark | None, last_attempt: Callable[[], bool]) -> bool:
        """A client hung up on a whole (non-streamed) answer: whether its request goes on. An
        upstream bills the whole answer it was sent (OpenAI's and Anthropic's go on after a
        hang-up), so one at work on it is waited for, with no retry or fallback once
        ``last_attempt()`` says so; one still queued for a connection (t43) is not sent, and costs nothing."""
        if self.asked is None or sending is None or not sending.sent:
            return False
        self.last_attempt = last_attempt
        return True

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    @property
    def last_failure(self) -> UpstreamError | None:
        """The error of the last model called, if one was and failed: a circuit-open skip calls none (t72)."""
        return next((f for f in reversed(self.failures) if not isinstance(f, UpstreamUnavailableError)), None)


async def dispatch(
    candidates: tuple[str, ...],
    providers: Mapping[str, Provider],
    breakers: Mapping[str, CircuitBreaker],
    retry: RetryPolicy,
    call: Callable[[Provider], Awaitable[T]],
    info: DispatchInfo,
) -> T:
    """Run ``call`` on the first candidate that answers; if none does, raise the error of the
    last one called (the circuit-open skip only when none was called).

    An error that is not retryable (a 4xx other than 408/429: the request itself is
    wrong) is raised at once: another model would reject it the same way. Those that say
    ``try_next`` (the gateway's own credentials, a prompt too long for this model's window,
    its total timeout run out) move on to the next model.

    The error raised when every model failed says ``x-should-retry: false`` when the route's
    retries or fallbacks are spent (the SDKs' own retries would multiply them), every model was
    skipped for its open circuit (their retries would find it open again: t166) or the upstream
    asked for a wait too long to make; the ``Retry-After`` still says when. One no retry can
    change (the gateway's own key refused) says so from its first attempt (:class:`UpstreamStatusError`).

    A model's ``timeouts.total`` bounds all of its attempts together (:mod:`gateway.upstreams.deadline`):
    a retry gets what is left of it, and none is made once the backoff would outlast it; each
    model of the route has its own.
    """
    verdicts = _Verdicts()
    # The error of the last model called. A model skipped (circuit open) was not: its "circuit
    # open" hid the real failure of the one before it, and named the failure after it (t72).
    last_error: UpstreamError | None = None
    skipped: UpstreamError | None = None
    try:
        for position, name in enumerate(candidates):
            provider, breaker = providers[name], breakers[name]
            if not breaker.allow():
                skipped = UpstreamUnavailableError(name, "circuit open: the upstream is failing; skipped")
                info.failures.append(skipped)
                continue
            verdicts.tried(breaker)
            with model_deadline(provider.config.timeouts.total) as deadline:  # all its attempts together
                for attempt in range(retry.max_attempts):
                    info.attempts += 1
                    info.fallback_used = position > 0
                    started = time.perf_counter()
                    info.asked = provider
                    try:
                        result = await call(provider)
                        verdicts.answered(breaker)
                        info.provider = provider
                        return result
                    except InvalidRequestError:
                        info.asked = None
                        if position == 0:
                            raise  # the route's first model cannot take the request: the client's to change
                        # A fallback that cannot carry what the first model took (n > 1 to Claude, a file
                        # part): the client is told the failure that made the gateway fall back, not a
                        # 400 its SDK would never retry (t91).
                        break
                    except UpstreamError as exc:
                        info.asked = None  # it answered, with an error: a client leaving now is charged nothing
                        last_error = exc
                        info.failures.append(exc)
                        verdicts.failed(breaker, exc)
                        if info.last_attempt is not None and info.last_attempt():
                            raise
                        if exc.try_next:  # its total timeout among them: nothing is left of it
                            break
                        if not exc.retryable:
                            raise
                        delay = _backoff_s(retry, attempt, exc)
                        if delay is None or attempt + 1 >= retry.max_attempts:
                            break
                        if asyncio.get_running_loop().time() + delay >= deadline:
                            break  # the model's total would run out before the retry began
                        await asyncio.sleep(delay)
                    finally:
                        info.upstream_seconds += time.perf_counter() - started
    finally:
        verdicts.record()
    error = last_error or skipped  # a skip alone: no model was called, its circuit is the answer
    assert error is not None
    if info.attempts > 1 or error is skipped or _waits_too_long(retry, error):
        error.headers["x-should-retry"] = "false"
    raise error


def _waits_too_long(retry: RetryPolicy, exc: UpstreamError) -> bool:
    """An upstream's Retry-After the route judged too long to wait for: so it is for the SDKs,
    which would wait it out themselves, the Anthropic SDK any length (t100: an OpenAI limit's
    ``x-ratelimit-reset`` of 8 h left a Claude client asleep for 16 h over two retries)."""
    return exc.retry_after_s is not None and exc.retry_after_s > retry.max_retry_after_s


class _Verdicts:
    """What one request says about the health of each upstream it reached: one verdict each.

    Only failures that can be the upstream's count (connection errors, timeouts, 5xx,
    broken answers; never 429 or the request's own 4xx). And a request that failed on
    every one of several upstreams may be the one at fault (a prompt that breaks every
    server): then only connection failures, which no request can cause, count. So a
    share of poisonous requests never opens a circuit for the traffic that is healthy,
    while an upstream that fails requests another upstream answers is judged by them, as
    is one a request could reach alone (its only evidence). The breakers are the tenant's
    own, so whatever a tenant's requests do opens no other tenant's circuit.
    """

    __slots__ = ("_answered", "_order", "_succeeded", "_worst")

    def __init__(self) -> None:
        self._order: list[CircuitBreaker] = []
        self._worst: dict[CircuitBreaker, UpstreamError] = {}
        self._succeeded: set[CircuitBreaker] = set()
        self._answered = False

    def tried(self, breaker: CircuitBreaker) -> None:
        self._order.append(breaker)

    def failed(self, breaker: CircuitBreaker, exc: UpstreamError) -> None:
        if says_upstream_is_unhealthy(exc):
            self._worst[breaker] = exc

    def answered(self, breaker: CircuitBreaker) -> None:
        self._answered = True
        self._succeeded.add(breaker)  # a retry on the same upstream answered: it is healthy
        breaker.record_success()

    def record(self) -> None:
        alone = len(self._order) == 1
        for breaker in self._order:
            if breaker in self._succeeded:
                continue
            failure = self._worst.get(breaker)
            if failure is not None and (self._answered or alone or isinstance(failure, UpstreamConnectError)):
                breaker.record_failure()
            else:
                breaker.abandon()  # no verdict; a half-open circuit lets the next request probe


def says_upstream_is_unhealthy(exc: UpstreamError) -> bool:
    """Connection errors, timeouts, 5xx, broken answers and refusing the gateway's own
    credentials; not 429 or the request's own 4xx.

    Laxer than the draft server's rule (:func:`gateway.speculative.drafts._says_server_is_unhealthy`,
    t77): this one opens a circuit that takes the model from every client, and a busy upstream
    (429, 408) is waited for and retried instead."""
    if isinstance(exc, UpstreamStatusError):
        return exc.upstream_status >= 500 or exc.code == "upstream_misconfigured"
    return not isinstance(exc, UpstreamUnavailableError | UpstreamBusyError)


def _backoff_s(retry: RetryPolicy, attempt: int, exc: UpstreamError) -> float | None:
    """Seconds to wait before the next attempt, or None to move to the next fallback now."""
    retry_after = exc.retry_after_s
    if retry_after is not None:
        return retry_after if retry_after <= retry.max_retry_after_s else None
    ceiling = min(retry.backoff_max_ms, retry.backoff_initial_ms * (2 ** min(attempt, 30))) / 1000
    return random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread retries, keep a floor
