"""Shadow judging: labels without waiting for users.

For a sampled share (``learning.shadow_share``) of a classifier route's answered requests,
after the client has its answer, the gateway asks the *other* model of the pair the same
request and has a judge model compare the two answers (:func:`judge_request`, the prompt
below). "The small model's answer is as good" labels the prompt *small was enough*;
otherwise *needed large*. Shadow calls cost money: each tenant's route has
``learning.usd_per_day`` a day. A job starts only when what it may cost (:class:`ShadowCosts`,
priced from the counts the request path made) fits in what is left of it, and asks the judge
only when the judge's call still fits once the other model's answer is paid (t152: one prompt
of 60,000 words spent 15 times a cap it was checked against before the job only). Its jobs
run one at a time per process, so the cap is overrun only by an estimate's error or by jobs
of other workers running at the same time; the spend is logged (``shadow_judgement``) and
exported, never charged to the tenant. Each call's cost counts as soon as it is paid, so a
judge that keeps failing cannot spend past the cap. A shadow call that fails is logged and
dropped: it never touches what the client received. At most
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
from gateway.config.schema import LearningPolicy, Price
from gateway.core.model import Message, Request
from gateway.judge import YES_NO_TOKENS, parse_yes_no, yes_no_request
from gateway.learning.examples import LabelledExample, LearningStore, RoutingTrace
from gateway.pricing import cost_usd
from gateway.store.base import StoreUnavailable

__all__ = [
    "JUDGE_INSTRUCTIONS",
    "ShadowCosts",
    "ShadowJob",
    "ShadowJudge",
    "judge_request",
    "judged_conversation",
    "parse_verdict",
    "read_tokens",
]

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
_FRAME_TOKENS = 200
"""The judge's instructions and the headings around the texts (about 130 tokens)."""


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


def read_tokens(tokens: int, chars: int) -> int:
    """Of a text of ``tokens`` tokens in ``chars`` characters, what the judge reads: its share
    left after clipping to :data:`_MAX_CHARS` characters."""
    return tokens if chars <= _MAX_CHARS else -(-tokens * _MAX_CHARS // chars)


@dataclass(frozen=True, slots=True)
class ShadowCosts:
    """What a shadow job's two calls may cost, priced before they are made from what the request
    path counted (nothing is tokenized again)."""

    other_usd: float
    """The other model's answer at most: the request's prompt and ``max_tokens`` (else the
    policy's default), priced as the request's own reservation prices them."""
    judge: Price
    tokens_read: int
    """What the judge reads of the request and of the answer the client received (:func:`read_tokens`)."""
    most_written: int
    """The most tokens the other model may write."""

    def judge_usd(self, other_answer: str | None = None) -> float:
        """The judge's call: the other model's answer taken at ``most_written`` tokens, and once
        it is known at no more tokens than characters (a token holds a character at least)."""
        other = self.most_written if other_answer is None else min(self.most_written, len(other_answer))
        return cost_usd(self.judge, _FRAME_TOKENS + self.tokens_read + min(other, _MAX_CHARS), YES_NO_TOKENS)


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
    costs: ShadowCosts


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
            if self._over_budget(job, spent, job.costs.other_usd + job.costs.judge_usd(), cost):
                return
            other, cost = await job.ask_other()
            spent = await self._store.add_shadow_spend(tenant, route, cost)  # paid, whatever the judge does
            # again: the answer may have cost more than its estimate
            if self._over_budget(job, spent, job.costs.judge_usd(other), cost):
                return
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

    def _over_budget(self, job: ShadowJob, spent: float, estimate: float, cost: float) -> bool:
        """Whether the calls still to make (``estimate``) would take the day's spend past the cap;
        ``cost``: what the job has paid so far."""
        cap = job.policy.usd_per_day
        if spent < cap and spent + estimate <= cap:
            return False
        self._metrics.shadow_judgement(job.trace.route, "over_budget", cost)
        _log.info(
            "shadow_skipped",
            tenant=job.tenant,
            route=job.trace.route,
            request_id=job.request_id,
            reason="daily budget spent",
            spent_usd=round(spent, 6),
            estimate_usd=round(estimate, 6),
            cost_usd=round(cost, 8),
        )
        return True

    async def aclose(self) -> None:
        await self._background.aclose()
