"""The shared Redis, used as an optimisation: every call is bounded and failure is an answer.

A call that cannot reach Redis (refused, reset, unknown host) returns its fallback,
the outage is logged once (not once per request; again when its cause changes, such as a
password Redis now asks for), and further calls skip Redis for
a second before trying again, so a dead Redis costs requests nothing. A call that is
merely slow returns its fallback at its deadline, but slow answers under load do not
mark Redis down (measured: at 8 connections on 2 cores, three timeouts in a row came
often enough to switch the cache off for 1 s at a time). Timeouts with no answer in
between for ``_DEGRADED_AFTER_S`` do: a hung or stopped server accepts connections and
never answers. Then calls are skipped and probed as for a server that is down. A command
Redis answers with an error (a bad argument) fails that call alone. So does a write that a
Redis whose memory is full refuses: it still answers reads (cache hits), so it is not down
(t116: that took every pod out of the Service at once); its refusals are counted, and said in
a ``redis_full`` line at most every 10 s.

:meth:`SharedRedis.call` raises :class:`~gateway.store.base.StoreUnavailable` instead of
returning a fallback; the store implementations beside this module are built on it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from gateway.accounting.metrics import Metrics
from gateway.sparse_log import SparseLog
from gateway.store.base import StoreTimedOut, StoreUnavailable

__all__ = ["SharedRedis", "connect"]

T = TypeVar("T")
_log = structlog.get_logger("gateway.redis")
_RETRY_AFTER_S = 1.0
_PROBE_S = 0.25
"""How long a fresh connection's PING may take, after a pooled connection failed, to show Redis is up."""
_SLOW_LOG_EVERY_S = 10.0
_DEGRADED_AFTER_S = 1.0
_SERVER_STATE_ERRORS = (redis.exceptions.ReadOnlyError, redis.exceptions.ClusterDownError)
"""Command errors that say the server cannot serve now (a replica after failover, a cluster
without quorum): Redis is treated as down, so /readyz, the metric and ``on_redis_error`` say so.
Any other command error fails only that command (a reservation Redis could not write, for a full
memory, included: the limiter then follows ``on_redis_error`` as for Redis down)."""

_UNREACHABLE = (OSError, aioredis.RedisError, redis.exceptions.RedisClusterException)
"""What a call raises when Redis cannot be reached. The cluster client's "no node answers"
(``RedisClusterUnreachableError``) is no ``RedisError``: it failed a serve's start (t134)."""


def connect(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client for ``REDIS_URL``: ``redis://`` / ``rediss://`` (TLS; ``rediss://:password@host``),
    or ``redis+cluster://`` / ``rediss+cluster://`` for Redis Cluster.

    Every key the gateway writes carries its tenant's hash tag, so the multi-key scripts
    (limits, semantic cache) always run on one slot.

    No ``socket_timeout``: :meth:`SharedRedis.call` bounds every command with ``asyncio.timeout``,
    and with one set redis-py wraps each send in ``asyncio.wait_for``, which on Python 3.11 can
    swallow a cancellation that lands in the same step (CPython gh-86296). (It is not the only
    place that can: :meth:`SharedRedis.call` re-raises a cancel its call swallowed.)
    """
    if "+cluster://" in url:
        from redis.asyncio.cluster import RedisCluster

        cluster = RedisCluster.from_url(url.replace("+cluster://", "://", 1), socket_connect_timeout=timeout_s)
        return cluster  # type: ignore[return-value]  # the commands the gateway uses are the same
    return aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)


class SharedRedis:
    def __init__(self, client: aioredis.Redis | None, metrics: Metrics) -> None:
        self.client = client
        self._metrics = metrics
        self.up = client is not None
        self.full = False
        """Whether Redis's memory is full (it refuses writes): from the last refusal to the next probe that wrote."""
        self._down_since: float | None = None
        self._down_error = ""
        """Why Redis is down, as last logged: the error's class."""
        self._down_error_said_at = float("-inf")
        self._last_attempt = 0.0
        self._vector_sets: bool | None = None
        self._slow = SparseLog(_log, "redis_slow", every_s=_SLOW_LOG_EVERY_S)
        self._refused = SparseLog(_log, "redis_refused", level="error", every_s=_SLOW_LOG_EVERY_S)
        self._replaced = SparseLog(_log, "redis_connections_replaced", every_s=_SLOW_LOG_EVERY_S)
        self._full = SparseLog(_log, "redis_full", every_s=_SLOW_LOG_EVERY_S)
        self._timeouts_since: float | None = None
        """When the current run of timeouts (with no answer in between) began."""
        metrics.redis_up.set(1 if self.up else 0)

    async def run(self, operation: Callable[[aioredis.Redis], Awaitable[T]], fallback: T, timeout_s: float) -> T:
        """``operation(client)`` within ``timeout_s``, or ``fallback`` if Redis cannot answer."""
        try:
            return await self.call(operation, timeout_s)
        except StoreUnavailable:
            return fallback

    async def call(self, operation: Callable[[aioredis.Redis], Awaitable[T]], timeout_s: float) -> T:
        """``operation(client)`` within ``timeout_s``; raises :class:`StoreUnavailable` if Redis cannot answer."""
        client = self.client
        if client is None:
            raise StoreUnavailable
        if not self.up and time.monotonic() - self._last_attempt < _RETRY_AFTER_S:
            raise StoreUnavailable
        self._last_attempt = time.monotonic()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(timeout_s):
                result = await operation(client)
        except (TimeoutError, aioredis.TimeoutError) as exc:
            self._metrics.redis_timeouts.inc()
            now = time.monotonic()
            if self._timeouts_since is None:
                self._timeouts_since = now
            if now - self._timeouts_since >= _DEGRADED_AFTER_S:
                self._mark_down(exc, "redis_degraded")
            else:
                self._log_slow(timeout_s)
            raise StoreTimedOut from None
        except redis.exceptions.MaxConnectionsError as exc:  # our pool is busy, Redis is not down
            self._log_refused(exc)
            raise StoreUnavailable from None
        except redis.exceptions.OutOfMemoryError:
            self._refused_write()
            raise _Full from None
        except aioredis.ResponseError as exc:
            if isinstance(exc, _SERVER_STATE_ERRORS):
                self._mark_down(exc, "redis_unavailable")
            else:  # Redis answered and refused this one command: the others still work
                self._log_refused(exc)
            raise StoreUnavailable from None
        except _UNREACHABLE as exc:
            if not (self.up and await self._answers_afresh(client)):
                self._mark_down(exc, "redis_unavailable")
                raise StoreUnavailable from None
            # A connection a restarted Redis left dead: the call never reached the Redis that
            # answers now, so it is sent once more, on a fresh connection (t23: else one request
            # of a burst was refused under on_redis_error: closed).
            self._replaced(error=type(exc).__name__)
            try:
                async with asyncio.timeout(timeout_s):
                    result = await operation(client)
            except TimeoutError:
                raise StoreTimedOut from None
            except _UNREACHABLE:
                raise StoreUnavailable from None
        self._answered()
        if task is not None and task.cancelling() > cancels:
            # Cancelled during the call, yet it returned: redis-py (dropping and re-opening a
            # connection) can swallow a cancel. A client that left must not have its request go on.
            raise asyncio.CancelledError
        return result

    async def check(self, timeout_s: float = 0.5) -> bool:
        """Probe now with a small write (readiness probes), updating the state like any other call:
        whether Redis answered, full (:attr:`full`) or not."""
        if self.client is None:
            return False
        self._last_attempt = 0.0
        try:
            await self.call(_ping, timeout_s)
        except _Full:
            return True
        except StoreUnavailable:
            return False
        self.full = False
        return True

    async def has_vector_sets(self, timeout_s: float = 0.5) -> bool | None:
        """Whether this Redis has vector sets (Redis 8), which the semantic cache needs; None
        when it cannot be asked. Known once, it is not asked again."""
        if self._vector_sets is None:
            found = await self.run(_vector_sets, None, timeout_s)
            if found is False:
                _log.error("redis_lacks_vector_sets", effect="the semantic cache is off: it needs Redis 8")
            self._vector_sets = found
        return self._vector_sets

    def _log_slow(self, timeout_s: float) -> None:
        self._slow(timeout_ms=round(timeout_s * 1000, 1), effect="call skipped; see gateway_redis_timeouts_total")

    def _answered(self) -> None:
        self._timeouts_since = None
        if not self.up:
            self._mark_up()

    def _refused_write(self) -> None:
        self._answered()
        self.full = True
        self._metrics.redis_writes_refused.inc()
        self._full(
            effect="write skipped (limits follow on_redis_error), reads go on; see gateway_redis_writes_refused_total"
        )

    def _log_refused(self, exc: BaseException) -> None:
        self._refused(error=type(exc).__name__, detail=_without_secrets(str(exc))[:200])

    def _mark_down(self, exc: BaseException, event: str) -> None:
        now, error = time.monotonic(), type(exc).__name__
        if self.up or self._down_since is None:
            self._down_since, self._down_error, self._down_error_said_at = now, error, float("-inf")
            _log.error(event, error=error, detail=_without_secrets(str(exc))[:200])
        elif error != self._down_error and now - self._down_error_said_at >= _SLOW_LOG_EVERY_S:
            # A new cause keeps the outage going (t130: a Redis restarted with a password the
            # gateway lacks); the first change at once, then at most every 10 s (a flapping cause).
            self._down_error, self._down_error_said_at = error, now
            down_s = round(now - self._down_since, 3)
            _log.error("redis_still_unavailable", error=error, detail=_without_secrets(str(exc))[:200], down_s=down_s)
        self.up = False
        self._metrics.redis_up.set(0)

    async def _answers_afresh(self, client: aioredis.Redis) -> bool:
        """Whether Redis answers on a new connection once the idle ones are closed: a Redis that
        restarted left every pooled connection dead, each failing once when next used, and marking
        it down for each one refused every request for a second under ``on_redis_error: closed``
        (t13, t19: up to half a burst refused after /readyz said 200)."""
        await self._drop_idle_connections()
        try:
            async with asyncio.timeout(_PROBE_S):
                await client.ping()
        except (TimeoutError, *_UNREACHABLE):
            return False
        return True

    async def _drop_idle_connections(self) -> None:
        """A Redis that restarted left every pooled connection dead, each failing once when next
        used: each failure a second of outage (an outside tester counted 54 after one restart,
        and half the requests refused a minute later under ``on_redis_error: closed``). Those
        idle now are closed together; the next call opens fresh ones."""
        pool = getattr(self.client, "connection_pool", None)  # a cluster client keeps one per node
        if pool is None:
            return
        try:
            await pool.disconnect(inuse_connections=False)
        except (OSError, aioredis.RedisError):
            pass

    def _mark_up(self) -> None:
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        _log.info("redis_recovered", down_s=round(down_for, 3))
        self.up = True
        self._down_since = None
        self._metrics.redis_up.set(1)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class _Full(StoreUnavailable):
    """Redis answered, refusing a write: its memory is full. A command, script or transaction it
    refuses applied nothing."""


def _without_secrets(text: str) -> str:
    """redis-py quotes the URL in some errors; a password in it must not reach the log."""
    return re.sub(r"(password=|://[^:/@]*:)[^@&\s]+", r"\1***", text)


async def _vector_sets(client: aioredis.Redis) -> bool:
    try:  # Redis 7 has no VCARD; an ACL may deny it: either way, no vector sets to use
        await client.execute_command("VCARD", "gw:{probe}:vector-sets")  # type: ignore[no-untyped-call]
    except aioredis.ResponseError:
        return False
    return True


async def _ping(client: aioredis.Redis) -> bool:
    """A write, not a PING: a Redis whose memory is full answers PING but refuses every write."""
    return bool(await client.set("gw:{probe}:ready", b"1", ex=60))
