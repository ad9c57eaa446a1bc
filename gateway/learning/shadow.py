"""Shadow judging: labels without waiting for users.

For a sampled share (``learning.shadow_share``) of a classifier route's answered requests,
after the client has its answer, the gateway asks the *other* model of the pair the same
request and has a judge model compare the two answers (:func:`judge_request`, the prompt
below). "The small model's answer is as good" labels the prompt *small was enough*;
otherwise *needed large*. Shadow calls cost money: each tenant's route stops for the day
once its shadow spend reaches ``learning.usd_per_day`` (its jobs run one at a time per
process, so the cap is overrun by at most one job per worker); the spend is logged
(``shadow_judgement``) and exported, never charged to the tenant. Each call's cost counts
as soon as it is paid, so a judge that keeps failing cannot spend past the cap. A shadow
call that fails is logged and dropped: it never touches what the client received. At most
:data:`MAX_WAITING` jobs wait per tenant and route in a process; more are skipped (a slow
judge must not pile requests up in memory).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway.accounting.metrics import Metrics
from gateway.background import BackgroundTasks
from gateway.config.schema import LearningPolicy
from gateway.core.model import Message, Request
from gateway.judge import parse_yes_no, yes_no_request
from gateway.learning.examples import LabelledExample, LearningStore, RoutingTrace
from gateway.store.base import StoreUnavailable

__all__ = ["JUDGE_INSTRUCTIONS", "ShadowJob", "ShadowJudge", "judge_request", "judged_conversation", "parse_verdict"]

_log = structlog.get_logger("gateway.learning")

JUDGE_INSTRUCTIONS = (
    "You grade whether a cheaper model's answer is good enough. You see a request, Answer A "
    "(cheaper model) and Answer B (stronger model). Reply with exactly one word: 'yes' if A "
    "answers the request as correctly and completely as B (same facts, numbers, code behaviour, "
    "constraints met, language and format asked for; wording may differ), 'no' if A is wrong, "
    "incomplete or clearly worse in anything the request asked for."
)
_MAX_CHARS = 12_000
MAX_WAITING = 16
"""Shadow jobs that may wait per tenant and route in a process."""


def judge_request(model: str, request: str, small_answer: str, large_answer: str) -> Request:
    """The chat request that asks ``model`` whether the small model's answer was good enough."""
    question = (
        f"Request:\n{_clipped(request)}\n\nAnswer A:\n{_clipped(small_answer)}\n\nAnswer B:\n{_clipped(large_answer)}"
    )
    return yes_no_request(model, JUDGE_INSTRUCTIONS, question)


def judged_conversation(messages: Sequence[Message]) -> str:
    """The request as the judge reads it: the last user turn first in line for room (a quarter
    of it from its start, a question before a pasted document; the rest from its end), then
    what came before it (its start and, mostly, its end)."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages))
    turn = "\n\n".join(f"{m.role}: {m.text}" for m in messages[last:])
    before = "\n\n".join(f"{m.role}: {m.text}" for m in messages[:last])
    if not before:
        return _clipped(turn)
    turn = _clipped(turn, max(_MAX_CHARS - len(before) - 2, _MAX_CHARS * 2 // 3))
    return f"{_clipped(before, _MAX_CHARS - len(turn) - 2)}\n\n{turn}"


def _clipped(text: str, room: int = _MAX_CHARS, head_share: int = 4) -> str:
    """A long text in ``room`` characters: its start (1/``head_share`` of the room) and its end."""
    if len(text) <= room:
        return text
    marker = f"\n[... {len(text) - room} characters left out ...]\n"
    keep = max(room - len(marker), 0)
    head = keep // head_share
    return f"{text[:head]}{marker}{text[len(text) - (keep - head) :]}"


def parse_verdict(reply: str) -> bool | None:
    """True: the small model's answer was good enough."""
    return parse_yes_no(reply)


Ask = Callable[[], Awaitable[tuple[str, float]]]
"""The other model's answer's text and what it cost."""
Judge = Callable[[str, str], Awaitable[tuple[str, float]]]
"""The judge's reply to (small answer, large answer) and what it cost."""


@dataclass(frozen=True, slots=True)
class ShadowJob:
    policy: LearningPolicy
    tenant: str
    request_id: str
    trace: RoutingTrace
    answered: str
    """The text the client received."""
    ask_other: Ask
    judge: Judge
    max_labels: int
    """The tenant's labels kept (``Router.labels_kept``: every route's, not this route's alone)."""


class ShadowJudge:
    def __init__(self, store: LearningStore, metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._background = BackgroundTasks()
        self._one_at_a_time: dict[tuple[str, str], asyncio.Lock] = {}
        """Per tenant and route: a job checks the day's spend after the one before it added its cost."""
        self._waiting: dict[tuple[str, str], int] = {}

    def sample(self, policy: LearningPolicy) -> bool:
        return policy.shadow_share > 0 and self._rng.random() < policy.shadow_share

    def start(self, job: ShadowJob) -> None:
        key = (job.tenant, job.trace.route)
        if self._waiting.get(key, 0) >= MAX_WAITING:
            self.skip(job, "backlog")
            return
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._background.spawn(self._run(job), "shadow-judge")

    def skip(self, job: ShadowJob, reason: str) -> None:
        self._metrics.shadow_judgement(job.trace.route, "skipped", 0.0)
        _log.info("shadow_skipped", tenant=job.tenant, route=job.trace.route, request_id=job.request_id, reason=reason)

    async def _run(self, job: ShadowJob) -> None:
        # Checked before the calls and added after them: jobs run side by side would all pass
        # the check and overrun the cap together, so one tenant's route judges one at a time
        # in a process (shadow judging is background work; its latency is nobody's).
        key = (job.tenant, job.trace.route)
        try:
            async with self._one_at_a_time.setdefault(key, asyncio.Lock()):
                await self._judge(job)
        finally:
            left = self._waiting.pop(key, 1) - 1
            if left:
                self._waiting[key] = left

    async def _judge(self, job: ShadowJob) -> None:
        route, tenant = job.trace.route, job.tenant
        cost = 0.0
        try:
            spent = await self._store.add_shadow_spend(tenant, route, 0.0)
            if spent >= job.policy.usd_per_day:
                self._metrics.shadow_judgement(route, "over_budget", 0.0)
                _log.info(
                    "shadow_skipped", tenant=tenant, route=route, reason="daily budget spent", spent_usd=round(spent, 6)
                )
                return
            other, cost = await job.ask_other()
            spent = await self._store.add_shadow_spend(tenant, route, cost)  # paid, whatever the judge does
            small, large = (job.answered, other) if job.trace.side == "small" else (other, job.answered)
            reply, judge_cost = await job.judge(small, large)
            cost += judge_cost
            verdict = parse_verdict(reply)
            spent = await self._store.add_shadow_spend(tenant, route, judge_cost)
            if verdict is not None:
                example = LabelledExample.of(
                    job.request_id, job.trace, not verdict, "shadow", job.policy.scope == "global"
                )
                await self._store.add_label(tenant, example, job.max_labels)
        except asyncio.CancelledError:
            raise
        except (StoreUnavailable, Exception) as exc:  # a shadow call that fails teaches nothing
            self._metrics.shadow_judgement(route, "failed", cost)
            _log.info("shadow_failed", tenant=tenant, route=route, error=type(exc).__name__, cost_usd=round(cost, 8))
            return
        outcome = "undecided" if verdict is None else ("small_enough" if verdict else "needed_large")
        self._metrics.shadow_judgement(route, outcome, cost)
        _log.info(
            "shadow_judgement",
            tenant=tenant,
            route=route,
            request_id=job.request_id,
            answered_by=job.trace.side,
            outcome=outcome,
            cost_usd=round(cost, 8),
            spent_today_usd=round(spent, 6),
        )

    async def aclose(self) -> None:
        await self._background.aclose()
