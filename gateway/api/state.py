"""What the HTTP handlers share, created once per worker process in the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestLogWriter
from gateway.background import BackgroundTasks
from gateway.embeddings import EmbeddingsPipeline
from gateway.learning.loop import LearningLoop
from gateway.limits import Limiter
from gateway.pipeline import ChatPipeline
from gateway.runtime import RuntimeHolder
from gateway.store.base import KeyValue
from gateway.store.redis import SharedRedis

__all__ = ["GatewayState"]


@dataclass
class GatewayState:
    holder: RuntimeHolder
    pipeline: ChatPipeline
    metrics: Metrics
    redis: SharedRedis
    limiter: Limiter
    request_log: RequestLogWriter
    ops_log: RequestLogWriter
    embeddings: EmbeddingsPipeline
    kv: KeyValue
    """The shared store's key-value part (stored Responses API turns)."""
    learning: LearningLoop
    """Routing traces, labels and learnt routers (``POST /v1/feedback``)."""
    classifier_info: dict[str, object] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    background: BackgroundTasks = field(default_factory=BackgroundTasks)
    """Work a handler starts after its answer (deleting a response no tenant can reach)."""

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.pipeline.aclose()  # streams' upstreams read on past their clients: billed and logged
        await self.background.aclose()
        await self.limiter.aclose()
        for close in self.closers:
            await close()
        await self.holder.aclose()
        await self.redis.aclose()
        self.request_log.close()
        self.ops_log.close()
