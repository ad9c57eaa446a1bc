"""The semantic cache's self-measurement: comparing answers, the estimate, tightening."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.accounting.metrics import Metrics
from gateway.cache.audit import CEILING, AuditJob, AuditOutcome, SemanticAudit, compare_answers, effective_threshold
from gateway.cache.semantic import ServeBar
from gateway.config.schema import SemanticAuditPolicy
from gateway.judge import parse_yes_no as parse_judgement
from gateway.store.memory import MemoryKeyValue


@pytest.mark.parametrize(
    ("cached", "fresh", "agree", "method"),
    [
        ("Paris.", "  paris. ", True, "exact"),
        ("The answer is B.", "B. Jupiter is the largest planet.", True, "choice"),
        ("Answer: (C)", "The correct answer is B", False, "choice"),
        ("She pays 3 * 4 = $12 in total, so the answer is 12.", "Total: 12", True, "number"),
        ("So he has 1,250 left.", "He has 1250.0 left", True, "number"),
        ("The result is 41.", "The result is 42.", False, "number"),
        ("A warm, sunny coastal city.", "Known for its beaches and mild winters.", None, "undecided"),
    ],
)
def test_answers_are_compared_by_what_can_be_compared(cached: str, fresh: str, agree: bool | None, method: str) -> None:
    assert compare_answers(cached, fresh) == AuditOutcome(agree, method)


def test_a_judges_reply_is_read_as_yes_no_or_nothing() -> None:
    assert parse_judgement(" Yes.") is True
    assert parse_judgement("'no'") is False
    assert parse_judgement("maybe") is None
    # the whole first word: a prefix is not a verdict
    assert parse_judgement("nope") is None and parse_judgement("Note: both") is None
    assert parse_judgement("yes-and-no") is None and parse_judgement("No, A is wrong") is False
    assert parse_judgement("Yes\u2014same facts") is True and parse_judgement("yes<|eot_id|>") is True
    assert parse_judgement("**No**") is False and parse_judgement("") is None
    assert parse_judgement("\u201cYes\u201d") is True and parse_judgement("(no)") is False
    assert parse_judgement("Yes/No") is None


def _bar(base: float) -> ServeBar:
    return ServeBar(base, base)


def _threshold(audit: SemanticAudit, policy: SemanticAuditPolicy, tenant: str, base: float) -> float | None:
    raised = audit.raised_by(policy, _bar(base), tenant, "fast")
    return None if raised is None else effective_threshold(base, raised)


async def test_the_estimate_tightens_the_route_then_stops_it() -> None:
    policy = SemanticAuditPolicy(min_audits=4, max_false_hit_rate=0.2, tighten_step=0.1)
    audit = SemanticAudit(Metrics())
    assert _threshold(audit, policy, "t", 0.8) == 0.8
    for agree in (True, True, False):
        await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(agree, "number"))
    assert _threshold(audit, policy, "t", 0.8) == 0.8  # 3 decided: fewer than min_audits
    await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(None, "undecided"))  # not counted
    assert _threshold(audit, policy, "t", 0.8) == 0.8
    await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(True, "exact"))  # 1 wrong in 4: 0.25 > 0.2
    assert _threshold(audit, policy, "t", 0.8) == pytest.approx(0.9)
    assert _threshold(audit, policy, "other-tenant", 0.8) == 0.8  # per tenant and route
    for _ in range(4):  # measured afresh at 0.9; still wrong: up to the ceiling, then stopped
        await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "choice"))
    assert _threshold(audit, policy, "t", 0.8) == pytest.approx(CEILING)
    for _ in range(4):
        await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "choice"))
    assert _threshold(audit, policy, "t", 0.8) is None
    reloaded = SemanticAuditPolicy(min_audits=4, max_false_hit_rate=0.2, tighten_step=0.1)
    assert _threshold(audit, reloaded, "t", 0.8) == 0.8  # a new policy starts afresh


async def test_a_changed_close_bar_starts_the_measurement_afresh() -> None:
    policy = SemanticAuditPolicy(min_audits=2, max_false_hit_rate=0.2, tighten_step=0.05)
    audit = SemanticAudit(Metrics())
    bar = ServeBar(0.9, 0.9, 0.99, 0.92)
    for _ in range(2):
        await audit.record(policy, bar, "t", "fast", AuditOutcome(False, "number"))
    assert audit.raised_by(policy, bar, "t", "fast") == pytest.approx(0.05)
    # the same base threshold with another close bar is another setting: its errors are its own
    assert audit.raised_by(policy, ServeBar(0.9, 0.9, 0.995, 0.92), "t", "fast") == 0.0


def test_a_policy_threshold_above_the_ceiling_is_never_lowered() -> None:
    assert effective_threshold(0.999, 0.0) == 0.999
    assert effective_threshold(0.999, 0.05) == 0.999
    assert effective_threshold(0.99, 0.05) == CEILING
    assert effective_threshold(0.9, 0.05) == pytest.approx(0.95)


async def test_a_route_at_the_ceiling_stops_at_its_first_tightening() -> None:
    policy = SemanticAuditPolicy(min_audits=2, max_false_hit_rate=0.2, tighten_step=0.05)
    audit = SemanticAudit(Metrics())
    for _ in range(2):
        await audit.record(policy, _bar(CEILING), "t", "fast", AuditOutcome(False, "choice"))
    assert _threshold(audit, policy, "t", CEILING) is None


def test_sampling_keeps_to_the_rate_and_each_tenants_per_minute_budget() -> None:
    audit = SemanticAudit(Metrics(), rng=random.Random(0))
    assert not any(audit.sample(SemanticAuditPolicy(sample_rate=0.0), "a") for _ in range(100))
    budget = SemanticAuditPolicy(sample_rate=1.0, max_per_minute=7)
    assert sum(audit.sample(budget, "flooding") for _ in range(100)) == 7
    assert sum(audit.sample(budget, "quiet") for _ in range(3)) == 3  # not spent by the flooding tenant


async def test_an_audit_runs_in_the_background_and_a_failed_one_counts_nothing() -> None:
    policy = SemanticAuditPolicy(min_audits=1, max_false_hit_rate=0.5)
    audit = SemanticAudit(Metrics())

    async def wrong() -> tuple[str, float]:
        return "The answer is 7.", 0.001

    async def broken() -> tuple[str, float]:
        raise ConnectionError

    audit.start(AuditJob(policy, _bar(0.8), "t", "fast", "The answer is 8.", broken))
    await asyncio.sleep(0.01)
    assert _threshold(audit, policy, "t", 0.8) == 0.8
    audit.start(AuditJob(policy, _bar(0.8), "t", "fast", "The answer is 8.", wrong))
    await asyncio.sleep(0.01)
    assert _threshold(audit, policy, "t", 0.8) == pytest.approx(0.85)
    await audit.aclose()


async def test_free_text_goes_to_the_judge_when_there_is_one() -> None:
    policy = SemanticAuditPolicy(min_audits=1, max_false_hit_rate=0.5)
    audit = SemanticAudit(Metrics())
    asked: list[tuple[str, str]] = []

    async def fresh() -> tuple[str, float]:
        return "Lisbon is hilly.", 0.0

    async def judge(cached: str, new: str) -> bool | None:
        asked.append((cached, new))
        return False

    audit.start(AuditJob(policy, _bar(0.8), "t", "fast", "Lisbon is flat.", fresh, judge))
    await asyncio.sleep(0.01)
    assert asked == [("Lisbon is flat.", "Lisbon is hilly.")]
    assert _threshold(audit, policy, "t", 0.8) == pytest.approx(0.85)
    await audit.aclose()


async def test_processes_sharing_a_store_measure_one_estimate_and_tighten_once() -> None:
    """Two workers, each seeing half the audits: neither alone reaches min_audits, together they do."""
    kv = MemoryKeyValue()
    policy = SemanticAuditPolicy(min_audits=4, max_false_hit_rate=0.2, tighten_step=0.1)
    first, second = (SemanticAudit(Metrics(), kv=kv, refresh_s=0.0) for _ in range(2))
    await first.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "number"))
    await second.record(policy, _bar(0.8), "t", "fast", AuditOutcome(True, "number"))
    await first.record(policy, _bar(0.8), "t", "fast", AuditOutcome(True, "exact"))
    assert _threshold(first, policy, "t", 0.8) == 0.8 and _threshold(second, policy, "t", 0.8) == 0.8
    estimate = await second.record(policy, _bar(0.8), "t", "fast", AuditOutcome(True, "exact"))
    assert estimate == 0.25  # 1 wrong of 4, counted across both
    assert _threshold(second, policy, "t", 0.8) == pytest.approx(0.9)
    _threshold(first, policy, "t", 0.8)  # starts a refresh from the store
    await asyncio.sleep(0.01)
    assert _threshold(first, policy, "t", 0.8) == pytest.approx(0.9)  # the other process's tightening
    assert _threshold(first, policy, "other-tenant", 0.8) == 0.8
    # Measured afresh at 0.9 by both: the next breach is one more step, not one per process.
    for audit in (first, second, first, second):
        await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "choice"))
    _threshold(first, policy, "t", 0.8)
    await asyncio.sleep(0.01)
    assert _threshold(first, policy, "t", 0.8) == _threshold(second, policy, "t", 0.8) == pytest.approx(CEILING)
    changed = SemanticAuditPolicy(min_audits=4, max_false_hit_rate=0.1, tighten_step=0.1)
    assert _threshold(first, changed, "t", 0.8) == 0.8  # another setting starts afresh
    await first.aclose()
    await second.aclose()


async def test_an_unavailable_store_leaves_each_process_measuring_on_its_own() -> None:
    kv = MemoryKeyValue()
    kv.down = True
    policy = SemanticAuditPolicy(min_audits=2, max_false_hit_rate=0.2, tighten_step=0.1)
    audit = SemanticAudit(Metrics(), kv=kv, refresh_s=0.0)
    await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "number"))
    assert await audit.record(policy, _bar(0.8), "t", "fast", AuditOutcome(False, "number")) == 1.0
    assert _threshold(audit, policy, "t", 0.8) == pytest.approx(0.9)
    await audit.aclose()
