"""The semantic cache measures its own error in production.

A sampled share of semantic hits (``cache.semantic.audit.sample_rate``, at most
``max_per_minute`` per process) is also asked upstream, off the request path, after the
cached answer was served. The two answers are compared (:func:`compare_answers`); the
share of decided audits whose answers disagree is the estimated false-hit rate of that
tenant's route, exported as ``gateway_semantic_cache_false_hits_ratio`` and logged with
every audit. Once ``min_audits`` audits are decided and the estimate is above
``max_false_hit_rate``, the cache tightens itself for that tenant and route: the
verifier's threshold goes up by ``tighten_step``, and when it cannot go higher the route
stops serving semantic hits; each step is logged (``semantic_cache_tightened``), and
measuring starts over at the new setting. A policy reload starts every route afresh.

State is per process: with several workers each measures and tightens on its own share.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from gateway.accounting.metrics import Metrics
from gateway.background import BackgroundTasks
from gateway.config.schema import SemanticAuditPolicy
from gateway.judge import yes_no_request

__all__ = [
    "CEILING",
    "AuditJob",
    "AuditOutcome",
    "SemanticAudit",
    "compare_answers",
    "judge_request",
]

_log = structlog.get_logger("gateway.cache")

CEILING = 0.995
"""No tightening raises the verifier's threshold past this; the next one stops semantic hits."""
_CHOICE = re.compile(
    r"(?:^|\b(?i:answer)(?: is)?[:\s]*|\b(?i:option)\s+|\b(?i:correct (?:answer|option|choice) is)[:\s]*)"
    r"\(?([A-J])\)?(?:[.):\s]|$)"
)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class AuditOutcome:
    agree: bool | None
    """None: the comparison could not decide (free text and no judge model)."""
    method: str


def compare_answers(cached: str, fresh: str) -> AuditOutcome:
    """Whether two answers to one question agree, by what can be compared without a judge:
    the same text, the same chosen option letter, the same final number."""
    a, b = " ".join(cached.split()).lower(), " ".join(fresh.split()).lower()
    if a == b:
        return AuditOutcome(True, "exact")
    x, y = _choice(cached), _choice(fresh)
    if x is not None and y is not None:
        return AuditOutcome(x == y, "choice")
    m, n = _final_number(a), _final_number(b)
    if m is not None and n is not None and (len(a) < 400 or len(b) < 400 or _short_tail(a, b)):
        return AuditOutcome(abs(m - n) <= 1e-6 * max(1.0, abs(m), abs(n)), "number")
    return AuditOutcome(None, "undecided")


_JUDGE_INSTRUCTIONS = (
    "You compare two answers to the same request. Reply with exactly one word: 'yes' if a user "
    "who got either answer would get the same result (same facts, numbers, choice, code behaviour, "
    "language and format asked for), 'no' if they differ in anything the request asked for."
)


def judge_request(model: str, prompt: str, cached: str, fresh: str) -> dict[str, object]:
    """The chat request that asks ``model`` whether two answers to ``prompt`` agree."""
    return yes_no_request(
        model, _JUDGE_INSTRUCTIONS, f"Request:\n{prompt}\n\nAnswer 1:\n{cached}\n\nAnswer 2:\n{fresh}"
    )


def _choice(text: str) -> str | None:
    found = _CHOICE.findall(text.strip())
    return found[-1] if found else None


def _final_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _short_tail(a: str, b: str) -> bool:
    """Long answers: the final number counts when both end on a stated result."""
    return all(re.search(r"(answer|total|result|=)[^.]{0,60}$", t[-120:]) for t in (a, b))


@dataclass(frozen=True, slots=True)
class AuditJob:
    """One served semantic hit to check."""

    policy: SemanticAuditPolicy
    base_threshold: float
    """The policy's ``verify_threshold``: what tightening raises from."""
    tenant: str
    route: str
    cached_text: str
    ask_upstream: Callable[[], Awaitable[tuple[str, float]]]
    """The fresh answer's text and what it cost."""
    judge: Callable[[str, str], Awaitable[bool | None]] | None = None
    """Whether two free-text answers agree (a judge model); None: they stay undecided."""


@dataclass(slots=True)
class _RouteState:
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=500))
    raised_by: float = 0.0
    stopped: bool = False


class SemanticAudit:
    def __init__(self, metrics: Metrics, *, rng: random.Random | None = None) -> None:
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._routes: dict[tuple[str, str], _RouteState] = {}
        self._policy_id: int | None = None
        self._window_start = 0.0
        self._in_window = 0
        self._background = BackgroundTasks()

    def raised_by(self, policy: SemanticAuditPolicy, tenant: str, route: str) -> float | None:
        """How far the verifier's thresholds are raised for this tenant's route (up to
        :data:`CEILING`); None when the route no longer serves semantic hits."""
        state = self._state(policy, tenant, route)
        if state is None:
            return 0.0
        return None if state.stopped else state.raised_by

    def sample(self, policy: SemanticAuditPolicy) -> bool:
        """Whether to audit this hit: the sample rate, within the per-minute budget."""
        if policy.sample_rate <= 0 or self._rng.random() >= policy.sample_rate:
            return False
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._in_window = now, 0
        if self._in_window >= policy.max_per_minute:
            return False
        self._in_window += 1
        return True

    def start(self, job: AuditJob) -> None:
        """Audit one served hit in the background."""
        self._background.spawn(self._audit(job), "semantic-audit")

    def record(
        self, policy: SemanticAuditPolicy, base_threshold: float, tenant: str, route: str, outcome: AuditOutcome
    ) -> float | None:
        """Count one audit; the estimate afterwards (None until one is decided)."""
        state = self._state(policy, tenant, route, create=True)
        assert state is not None
        self._metrics.semantic_audit(route, "undecided" if outcome.agree is None else str(outcome.agree).lower())
        if outcome.agree is not None:
            state.outcomes.append(not outcome.agree)
        if not state.outcomes:
            return None
        estimate = sum(state.outcomes) / len(state.outcomes)
        self._metrics.semantic_false_hits(tenant, route, estimate)
        if len(state.outcomes) >= policy.min_audits and estimate > policy.max_false_hit_rate and not state.stopped:
            self._tighten(state, policy, base_threshold, tenant, route, estimate)
        return estimate

    async def aclose(self) -> None:
        await self._background.aclose()

    def _state(
        self, policy: SemanticAuditPolicy, tenant: str, route: str, *, create: bool = False
    ) -> _RouteState | None:
        if self._policy_id != id(policy):  # a reloaded policy: every route starts afresh
            self._policy_id, self._routes = id(policy), {}
        key = (tenant, route)
        state = self._routes.get(key)
        if state is None and create:
            state = self._routes[key] = _RouteState()
        return state

    def _tighten(
        self,
        state: _RouteState,
        policy: SemanticAuditPolicy,
        base: float,
        tenant: str,
        route: str,
        estimate: float,
    ) -> None:
        before = min(CEILING, base + state.raised_by)
        if before >= CEILING or policy.tighten_step <= 0:
            state.stopped = True
            after: float | None = None
        else:
            state.raised_by += policy.tighten_step
            after = min(CEILING, base + state.raised_by)
        decided = len(state.outcomes)
        state.outcomes.clear()
        self._metrics.semantic_threshold(tenant, route, after)
        _log.warning(
            "semantic_cache_tightened",
            tenant=tenant,
            route=route,
            false_hit_estimate=round(estimate, 4),
            audits=decided,
            budget=policy.max_false_hit_rate,
            verify_threshold_before=round(before, 4),
            verify_threshold_after=None if after is None else round(after, 4),
            action="stopped serving semantic hits" if after is None else "raised the verifier's threshold",
        )

    async def _audit(self, job: AuditJob) -> None:
        try:
            fresh, cost = await job.ask_upstream()
            outcome = compare_answers(job.cached_text, fresh)
            if outcome.agree is None and job.judge is not None:
                verdict = await job.judge(job.cached_text, fresh)
                outcome = AuditOutcome(verdict, "judge" if verdict is not None else "undecided")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an audit that fails tells nothing: not counted
            _log.info("semantic_audit_failed", tenant=job.tenant, route=job.route, error=type(exc).__name__)
            return
        estimate = self.record(job.policy, job.base_threshold, job.tenant, job.route, outcome)
        self._metrics.semantic_audit_cost(job.route, cost)
        _log.info(
            "semantic_audit",
            tenant=job.tenant,
            route=job.route,
            agree=outcome.agree,
            method=outcome.method,
            cost_usd=round(cost, 8),
            false_hit_estimate=None if estimate is None else round(estimate, 4),
        )
