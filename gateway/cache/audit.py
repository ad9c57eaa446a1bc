"""The semantic cache measures its own error in production.

A sampled share of semantic hits (``cache.semantic.audit.sample_rate``, at most
``max_per_minute`` per tenant and process) is also asked upstream, off the request path, after the
cached answer was served. The two answers are compared (:func:`compare_answers`); the
share of decided audits whose answers disagree is the estimated false-hit rate of that
tenant's route, exported as ``gateway_semantic_cache_false_hits_ratio`` and logged with
every audit. Once ``min_audits`` audits are decided and the estimate is above
``max_false_hit_rate``, the cache tightens itself for that tenant and route: the
verifier's threshold goes up by ``tighten_step``, and when it cannot go higher the route
stops serving semantic hits; each step is logged (``semantic_cache_tightened``), and
measuring starts over at the new setting. A policy reload that changes the audit setting
or any of the verifier's thresholds starts every route afresh. Per entry, one audit is enough: the
stored prompt whose hit was found wrong leaves the vector index at once
(``semantic_cache_entry_retired``), since the prompts near it are likely to be the same
kind of near miss.

With a shared store (Redis) the state is shared by every process: outcomes go to one
list per tenant, route and setting, so several workers measure one estimate together,
and a tightening (taken under a lease, so that two processes that cross the budget at
once tighten one step, not two) is seen by every process within ``refresh_s``. Without
a store, or while it is unavailable, each process measures on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from gateway.accounting.metrics import Metrics
from gateway.background import BackgroundTasks
from gateway.cache.semantic import ServeBar
from gateway.config.schema import SemanticAuditPolicy
from gateway.core.model import Request
from gateway.judge import yes_no_request
from gateway.store import keyspace
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = [
    "CEILING",
    "AuditJob",
    "AuditOutcome",
    "SemanticAudit",
    "compare_answers",
    "effective_threshold",
    "judge_request",
]

_log = structlog.get_logger("gateway.cache")

CEILING = 0.998
"""No tightening raises the verifier's threshold past this; the next one stops semantic hits.
The shipped verifier serves nothing at 0.999: its scores stop short of it."""


def effective_threshold(base: float, raised: float) -> float:
    """The verifier's threshold for a route: the policy's, raised by the audits up to
    :data:`CEILING`, and never below the policy's own (which may sit above the ceiling)."""
    return max(base, min(CEILING, base + raised))


_CHOICE = re.compile(
    r"(?:^|\b(?i:answer)(?: is)?[:\s]*|\b(?i:option)\s+|\b(?i:correct (?:answer|option|choice) is)[:\s]*)"
    r"\(?([A-J])\)?(?:[.):\s]|$)"
)
_WINDOW = 500
"""Audits an estimate is made of: the newest ones of the current setting."""
_TTL_S = 7 * 86400
_TIMEOUT_S = 0.1
_LEASE_MS = 5000
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


def judge_request(model: str, prompt: str, cached: str, fresh: str) -> Request:
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
    bar: ServeBar
    """The policy's verifier thresholds: what tightening raises from (a change of any starts afresh)."""
    tenant: str
    route: str
    cached_text: str
    ask_upstream: Callable[[], Awaitable[tuple[str, float]]]
    """The fresh answer's text and what it cost."""
    judge: Callable[[str, str], Awaitable[bool | None]] | None = None
    """Whether two free-text answers agree (a judge model); None: they stay undecided."""
    retire_entry: Callable[[], Awaitable[None]] | None = None
    """Stop the stored entry that served the hit from serving more, once an audit finds it wrong."""


class _Setting(msgspec.Struct):
    """What tightening has done to a route, as the store keeps it."""

    generation: int = 0
    """Raised at each tightening: the outcomes of the setting before it no longer count."""
    raised_by: float = 0.0
    stopped: bool = False


_setting_codec = msgspec.json.Decoder(_Setting)


@dataclass(slots=True)
class _RouteState:
    key: str
    """The store key of this tenant's route under this audit setting."""
    setting: _Setting = field(default_factory=_Setting)
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    """This process's own outcomes: used when there is no store, or it is unavailable."""
    fetched_at: float = float("-inf")
    refreshing: bool = False


class SemanticAudit:
    def __init__(
        self,
        metrics: Metrics,
        *,
        kv: KeyValue | None = None,
        rng: random.Random | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        self._metrics = metrics
        self._kv = kv
        self._rng = rng or random.Random()
        self._refresh_s = refresh_s
        self._routes: dict[tuple[str, str], _RouteState] = {}
        self._setting_of: tuple[int, ServeBar] | None = None
        self._setting_id = ""
        self._windows: dict[str, tuple[float, int]] = {}
        """Per tenant: when its minute began, and how many of its hits were audited in it."""
        self._background = BackgroundTasks()

    def raised_by(self, policy: SemanticAuditPolicy, bar: ServeBar, tenant: str, route: str) -> float | None:
        """How far the verifier's thresholds are raised for this tenant's route (up to
        :data:`CEILING`); None when the route no longer serves semantic hits. With a store,
        the shared setting is read again in the background every ``refresh_s``."""
        state = self._state(policy, bar, tenant, route, create=self._kv is not None)
        if state is None:
            return 0.0
        if self._kv is not None and not state.refreshing and time.monotonic() - state.fetched_at >= self._refresh_s:
            state.refreshing = True
            self._background.spawn(self._refresh(state, tenant, route, bar.base), "semantic-audit-refresh")
        return None if state.setting.stopped else state.setting.raised_by

    def sample(self, policy: SemanticAuditPolicy, tenant: str) -> bool:
        """Whether to audit this hit: the sample rate, within the tenant's per-minute budget (one
        tenant's flood of hits must not spend every audit, leaving others' estimates unchecked)."""
        if policy.sample_rate <= 0 or self._rng.random() >= policy.sample_rate:
            return False
        now = time.monotonic()
        started, audited = self._windows.get(tenant, (0.0, 0))
        if now - started >= 60:
            started, audited = now, 0
        if audited >= policy.max_per_minute:
            return False
        self._windows[tenant] = (started, audited + 1)
        return True

    def start(self, job: AuditJob) -> None:
        """Audit one served hit in the background."""
        self._background.spawn(self._audit(job), "semantic-audit")

    async def record(
        self, policy: SemanticAuditPolicy, bar: ServeBar, tenant: str, route: str, outcome: AuditOutcome
    ) -> float | None:
        """Count one audit; the estimate afterwards (None until one is decided)."""
        state = self._state(policy, bar, tenant, route, create=True)
        assert state is not None
        self._metrics.semantic_audit(route, "undecided" if outcome.agree is None else str(outcome.agree).lower())
        if outcome.agree is None:
            outcomes = list(state.outcomes)
        else:
            outcomes = await self._outcomes_with(state, not outcome.agree)
        if not outcomes:
            return None
        estimate = sum(outcomes) / len(outcomes)
        self._metrics.semantic_false_hits(tenant, route, estimate)
        if len(outcomes) >= policy.min_audits and estimate > policy.max_false_hit_rate and not state.setting.stopped:
            await self._tighten(state, policy, bar.base, tenant, route, estimate, len(outcomes))
        return estimate

    async def aclose(self) -> None:
        await self._background.aclose()

    def _state(
        self, policy: SemanticAuditPolicy, bar: ServeBar, tenant: str, route: str, *, create: bool = False
    ) -> _RouteState | None:
        if self._setting_of != (id(policy), bar):  # a reloaded policy: every route starts afresh if it changed
            self._setting_of, self._routes = (id(policy), bar), {}
            fingerprint = msgspec.json.encode([policy, bar])
            self._setting_id = hashlib.sha256(fingerprint).hexdigest()[:12]
        key = (tenant, route)
        state = self._routes.get(key)
        if state is None and create:
            state = self._routes[key] = _RouteState(keyspace.semantic_audit(tenant, route, self._setting_id))
        return state

    async def _outcomes_with(self, state: _RouteState, wrong: bool) -> list[bool]:
        """The route's outcomes (the newest :data:`_WINDOW`) once this one is added: the shared
        ones when there is a store, this process's own when it is unavailable."""
        state.outcomes.append(wrong)
        if self._kv is not None:
            outcomes_key = f"{state.key}:o:{state.setting.generation}"
            try:
                await self._kv.append(outcomes_key, b"1" if wrong else b"0", _WINDOW, _TTL_S, _TIMEOUT_S)
                return [item == b"1" for item in await self._kv.read_list(outcomes_key, _TIMEOUT_S)]
            except StoreUnavailable:
                pass
        return list(state.outcomes)

    async def _refresh(self, state: _RouteState, tenant: str, route: str, base: float) -> None:
        try:
            if self._kv is not None:
                shared = await self._read_setting(state)
                if shared is not None and shared.generation > state.setting.generation:
                    self._adopt(state, shared, tenant, route, base)
        finally:
            state.fetched_at, state.refreshing = time.monotonic(), False

    async def _read_setting(self, state: _RouteState) -> _Setting | None:
        assert self._kv is not None
        try:
            raw = await self._kv.get(state.key, _TIMEOUT_S)
        except StoreUnavailable:
            return None
        try:
            return _setting_codec.decode(raw) if raw else _Setting()
        except msgspec.DecodeError:
            return None

    def _adopt(self, state: _RouteState, setting: _Setting, tenant: str, route: str, base: float) -> None:
        state.setting = setting
        state.outcomes.clear()
        self._metrics.semantic_threshold(
            tenant, route, None if setting.stopped else effective_threshold(base, setting.raised_by)
        )

    async def _tighten(
        self,
        state: _RouteState,
        policy: SemanticAuditPolicy,
        base: float,
        tenant: str,
        route: str,
        estimate: float,
        decided: int,
    ) -> None:
        token = uuid.uuid4().hex
        lease = keyspace.lease(state.key)
        shared = self._kv is not None
        if shared:
            assert self._kv is not None
            try:
                if not await self._kv.acquire(lease, token, _LEASE_MS, _TIMEOUT_S):
                    return  # another process is tightening this route now
                current = await self._read_setting(state)
            except StoreUnavailable:
                shared, current = False, None
            if current is not None and current.generation > state.setting.generation:
                self._adopt(state, current, tenant, route, base)  # it was tightened already
                await self._release(lease, token)
                return
        before = effective_threshold(base, state.setting.raised_by)
        if before >= CEILING or policy.tighten_step <= 0:
            after: float | None = None
            setting = _Setting(state.setting.generation + 1, state.setting.raised_by, stopped=True)
        else:
            setting = _Setting(state.setting.generation + 1, state.setting.raised_by + policy.tighten_step)
            after = effective_threshold(base, setting.raised_by)
        if shared:
            assert self._kv is not None
            try:
                await self._kv.put(state.key, msgspec.json.encode(setting), _TTL_S, _TIMEOUT_S)
            except StoreUnavailable:
                pass  # tightened here; the others tighten on their own estimate
            await self._release(lease, token)
        self._adopt(state, setting, tenant, route, base)
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

    async def _release(self, lease: str, token: str) -> None:
        assert self._kv is not None
        try:
            await self._kv.release(lease, token, _TIMEOUT_S)
        except StoreUnavailable:
            pass  # the lease expires by itself

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
        estimate = await self.record(job.policy, job.bar, job.tenant, job.route, outcome)
        self._metrics.semantic_audit_cost(job.route, cost)
        if outcome.agree is False and job.retire_entry is not None:
            await job.retire_entry()
            _log.info("semantic_cache_entry_retired", tenant=job.tenant, route=job.route, method=outcome.method)
        _log.info(
            "semantic_audit",
            tenant=job.tenant,
            route=job.route,
            agree=outcome.agree,
            method=outcome.method,
            cost_usd=round(cost, 8),
            false_hit_estimate=None if estimate is None else round(estimate, 4),
        )
