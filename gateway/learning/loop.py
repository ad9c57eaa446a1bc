"""What the request path hands the learning loop once a routed request is answered."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import structlog

from gateway.accounting.metrics import Metrics
from gateway.background import BackgroundTasks
from gateway.config.schema import LearningPolicy
from gateway.learning.examples import LearningStore, RoutingTrace, Side
from gateway.learning.learned import ClassifierInputs, LearnedRouters
from gateway.learning.shadow import Ask, Judge, ShadowCosts, ShadowJob, ShadowJudge
from gateway.sparse_log import SparseLog
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = ["LearningLoop"]

_log = structlog.get_logger("gateway.learning")
_trace_dropped = SparseLog(_log, "routing_trace_dropped", level="info")


class LearningLoop:
    def __init__(self, kv: KeyValue, metrics: Metrics, inputs: ClassifierInputs | None = None) -> None:
        self.store = LearningStore(kv)
        self.shadow = ShadowJudge(self.store, metrics)
        self.inputs = inputs
        """The classifier in this process (stamped on traces; learnt routers must fit it)."""
        self.routers = LearnedRouters(kv, inputs)
        self.metrics = metrics
        self._background = BackgroundTasks()

    def after_answer(
        self,
        policy: LearningPolicy,
        *,
        tenant: str,
        key_id: str,
        request_id: str,
        route: str,
        side: Side,
        p_base: float,
        embedding: np.ndarray,
        features: np.ndarray,
        answered: str,
        ask_other: Ask,
        judge: Judge,
        max_labels: int,
        costs: Callable[[], ShadowCosts],
    ) -> None:
        """Keep what the router saw (for feedback), and maybe judge the answer in the shadow;
        all of it in the background. ``costs`` is priced only for a request judged."""
        signature = "" if self.inputs is None else self.inputs.signature
        trace = RoutingTrace.of(key_id, route, side, p_base, embedding, features, signature)
        job = None
        if self.shadow.sample(policy):
            job = ShadowJob(policy, tenant, request_id, trace, answered, ask_other, judge, max_labels, costs())
        self._background.spawn(self._keep(tenant, request_id, trace, policy, job), "routing-trace")

    async def _keep(
        self, tenant: str, request_id: str, trace: RoutingTrace, policy: LearningPolicy, job: ShadowJob | None
    ) -> None:
        kept = False
        try:
            kept = await self.store.keep_trace(
                tenant, request_id, trace, policy.keep_hours, policy.traces_bytes_per_tenant
            )
        except StoreUnavailable:
            _trace_dropped(reason="store unavailable")
        if job is None:
            return
        if kept:
            self.shadow.start(job)
        else:  # most often the id is another request's (t125): a verdict would label that one's prompt
            self.shadow.skip(job, "trace not kept")

    async def aclose(self) -> None:
        await self._background.aclose()  # first: a trace kept starts its shadow job
        await self.shadow.aclose()
        await self.routers.aclose()
