"""What the HTTP handlers share, created once per worker process in the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestLogWriter
from gateway.pipeline import ChatPipeline
from gateway.runtime import RuntimeHolder

__all__ = ["GatewayState", "RedisHealth"]

_log = structlog.get_logger("gateway.redis")


@dataclass
class RedisHealth:
    """Redis reachability, checked at most once a second; logs once per outage, not per request."""

    client: aioredis.Redis | None
    metrics: Metrics
    timeout_s: float = 0.5
    up: bool = False
    _checked_at: float = 0.0
    _outage_logged: bool = False

    async def check(self) -> bool:
        if self.client is None:
            return False
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return self.up
        self._checked_at = now
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
            up = True
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            up = False
            if not self._outage_logged:
                _log.error("redis_unavailable", error=type(exc).__name__)
                self._outage_logged = True
        if up and not self.up and self._outage_logged:
            _log.info("redis_recovered")
            self._outage_logged = False
        self.up = up
        self.metrics.redis_up.set(1 if up else 0)
        return up


@dataclass
class GatewayState:
    holder: RuntimeHolder
    pipeline: ChatPipeline
    metrics: Metrics
    redis: RedisHealth
    request_log: RequestLogWriter
    ops_log: RequestLogWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.holder.aclose()
        if self.redis.client is not None:
            await self.redis.client.aclose()
        self.request_log.close()
        self.ops_log.close()
