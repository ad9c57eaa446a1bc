"""The learning loop's parts without a network: labels, the learnt router's fit and its promotion rule."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from gateway.accounting.metrics import Metrics
from gateway.config.schema import LearningPolicy, Price
from gateway.core.model import Message, TextPart
from gateway.learning.examples import LabelledExample, LearningStore, RoutingTrace
from gateway.learning.learned import (
    ClassifierInputs,
    LearnedRouters,
    active_version,
    apgr,
    cpt,
    fit_candidate,
    latest_labels,
    promote,
    rollback,
    same_classifier,
)
from gateway.learning.shadow import (
    MAX_WAITING,
    Ask,
    Judge,
    ShadowCosts,
    ShadowJob,
    ShadowJudge,
    judge_request,
    judged_conversation,
    parse_verdict,
    read_tokens,
)
from gateway.protocols.openai_chat import to_chat_body
from gateway.simulated.quality import FAILURE, judge_verdict
from gateway.store import keyspace
from gateway.store.memory import MemoryKeyValue


def _examples(n: int, rule: bool, seed: int = 0) -> list[LabelledExample]:
    """Examples whose label follows a direction of the embedding (rule) or nothing (noise)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=384)
    direction /= np.linalg.norm(direction)
    out = []
    for i in range(n):
        emb = rng.normal(size=384)
        emb /= np.linalg.norm(emb)
        needed = bool(emb @ direction > 0.02) if rule else bool(rng.random() < 0.3)
        trace = RoutingTrace.of("k", "auto", "small", float(rng.uniform(0.1, 0.3)), emb, rng.normal(size=12))
        example = LabelledExample.of(f"r{i}", trace, needed, "shadow", False)
        out.append(msgspec_replace_at(example, float(i)))
    return out


def msgspec_replace_at(example: LabelledExample, at: float) -> LabelledExample:
    import msgspec

    return msgspec.structs.replace(example, at=at)


def test_a_learnable_rule_is_learnt_and_beats_the_shipped_router_beyond_its_interval() -> None:
    candidate, evaluation = fit_candidate(_examples(600, rule=True), None)
    assert evaluation.better and evaluation.difference_ci95[0] > 0
    assert evaluation.candidate_apgr > evaluation.current_apgr + 0.1
    assert evaluation.held_out == 150 and evaluation.trained_on == 450 and candidate.labels == 450


def test_labels_that_say_nothing_give_a_candidate_that_is_not_promoted() -> None:
    _, evaluation = fit_candidate(_examples(600, rule=False, seed=1), None)
    assert not evaluation.better


def test_a_router_that_learnt_repeated_prompts_by_heart_is_not_promoted() -> None:
    """t32: 20 prompts asked 8 times each, each with a fixed label that says nothing of how hard
    it is: split by time, every held-out prompt had been trained on, and such a router was
    promoted (APGR 0.39 to 0.78) that then scored 0.25 on fresh prompts."""
    rng = np.random.default_rng(7)
    prompts = []
    for _ in range(20):
        emb = rng.normal(size=384)
        prompts.append((emb / np.linalg.norm(emb), bool(rng.random() < 0.4), rng.normal(size=12)))
    examples = []
    for i in range(160):
        emb, needed, features = prompts[i % 20]
        trace = RoutingTrace.of("k", "auto", "small", float(rng.uniform(0.1, 0.3)), emb, features)
        examples.append(msgspec_replace_at(LabelledExample.of(f"r{i}", trace, needed, "shadow", False), float(i)))
    _, evaluation = fit_candidate(examples, None)
    assert not evaluation.better
    assert evaluation.held_out >= 40 and evaluation.trained_on == 160 - evaluation.held_out


def test_too_few_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 40"):
        fit_candidate(_examples(30, rule=True), None)


def test_the_learnt_router_leaves_a_prompt_without_features_alone() -> None:
    candidate, _ = fit_candidate(_examples(200, rule=True), None)
    emb = np.ones(384, dtype=np.float32) / np.sqrt(384)
    assert candidate.apply(0.3, emb, None) == 0.3
    assert 0.0 <= candidate.apply(0.3, emb, np.zeros(12, dtype=np.float32)) <= 1.0


async def test_promotion_rollback_and_tenant_scopes() -> None:
    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    second, _ = fit_candidate(_examples(200, rule=True, seed=2), first)
    await promote(kv, "a", first)
    await promote(kv, "a", second)
    routers = LearnedRouters(kv, refresh_s=0.0)
    assert (await routers.refresh("a")) == second
    assert await routers.refresh("b") is None  # tenant a's router is not tenant b's
    await promote(kv, None, first)  # the pooled router: for tenants without their own, on pooling routes
    assert (await routers.refresh("b", pooled=True)) == first
    assert await routers.refresh("b") is None  # a route with scope: tenant never takes others' labels
    assert await rollback(kv, "a") == first.version
    assert await active_version(kv, "a") == first.version
    assert await rollback(kv, "a") is None  # nothing before: back to the pooled / shipped router
    assert (await routers.refresh("a", pooled=True)) == first  # the pooled one
    assert await routers.refresh("a") is None  # the shipped one
    await routers.aclose()


async def test_a_router_this_classifier_cannot_use_is_not_applied() -> None:
    """A learnt router fitted on another classifier (an upgrade: another scale, another width),
    or any value under its keys this gateway cannot read, leaves the shipped router in force."""
    kv = MemoryKeyValue()
    inputs = ClassifierInputs("graph-1/head-1", 384, 396)
    ours = msgspec.structs.replace(fit_candidate(_examples(200, rule=True), None)[0], inputs="graph-1/head-1")
    theirs = msgspec.structs.replace(ours, version="theirs", inputs="graph-0/head-0")
    narrow = msgspec.structs.replace(ours, version="narrow", inputs="", weight=ours.weight[:-8])
    routers = LearnedRouters(kv, inputs, refresh_s=0.0)
    await promote(kv, "a", ours)
    assert await routers.refresh("a") == ours
    for refused in (theirs, narrow):
        await promote(kv, "a", refused)
        assert await routers.refresh("a") is None
    await kv.put(keyspace.learned_router("a", "v:broken"), b"\x00 not msgpack", 60, 1.0)
    await kv.put(keyspace.learned_router("a", "active"), b"broken", 60, 1.0)
    assert await routers.in_force("a") is None
    await kv.put(keyspace.learned_router("a", "active"), b"\xff\xfe", 60, 1.0)
    assert await routers.in_force("a") is None
    await promote(kv, "a", ours)  # fixed: applies again
    assert await routers.refresh("a") == ours
    await routers.aclose()


async def test_a_new_process_routes_its_first_request_with_the_router_in_force() -> None:
    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    await promote(kv, "a", first)
    routers = LearnedRouters(kv)  # nothing read yet
    assert await routers.in_force("a") == first
    await routers.aclose()


def _count_reads(kv: MemoryKeyValue) -> list[int]:
    """From now on, ``kv``'s reads counted in the list's one item."""
    reads = [0]
    real = kv.get

    async def counted(key: str, timeout_s: float) -> bytes | None:
        reads[0] += 1
        return await real(key, timeout_s)

    kv.get = counted  # type: ignore[method-assign]
    return reads


async def test_a_store_that_is_down_costs_the_first_request_one_read_not_every_request() -> None:
    kv = MemoryKeyValue()
    kv.down = True
    routers = LearnedRouters(kv, refresh_s=5.0)
    reads = _count_reads(kv)
    for _ in range(20):
        assert await routers.in_force("a") is None
    assert reads == [1]
    await routers.aclose()


async def test_a_store_that_goes_down_after_a_quiet_spell_costs_one_read_too() -> None:
    """A tenant read once, then quiet for two refresh periods, waited for the store on every
    request while it was down (the failed read kept the old date)."""
    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    await promote(kv, "a", first)
    routers = LearnedRouters(kv, refresh_s=0.05)
    assert await routers.in_force("a") == first
    await asyncio.sleep(0.12)  # quiet for two refresh periods
    kv.down = True
    reads = _count_reads(kv)
    for _ in range(20):
        assert await routers.in_force("a") == first  # what was in force stays in force
    assert reads == [1]
    await routers.aclose()


def test_labels_of_another_classifier_are_left_out_of_a_fit() -> None:
    old = [msgspec.structs.replace(e, inputs="old") for e in _examples(200, rule=False, seed=4)]
    wide = [msgspec.structs.replace(e, inputs="new", features=e.features + b"\0\0\0\0", at=e.at + 300) for e in old[:5]]
    new = [msgspec.structs.replace(e, inputs="new", at=e.at + 1000) for e in _examples(200, rule=True)]
    assert same_classifier(old + wide + new) == new
    candidate, evaluation = fit_candidate(old + wide + new, None)
    assert candidate.inputs == "new" and evaluation.trained_on + evaluation.held_out == 200


async def test_values_a_gateway_cannot_read_are_skipped_not_raised() -> None:
    kv = MemoryKeyValue()
    store = LearningStore(kv)
    for example in _examples(3, rule=True):
        await store.add_label("a", example, max_labels=25)
    await kv.append(keyspace.routing_labels("a"), b"\xc1 garbage", 25, 60, 1.0)
    assert [e.request_id for e in await store.labels("a")] == ["r0", "r1", "r2"]
    await kv.put(keyspace.routing_trace("a", "req-9"), b"\x93garbage", 60, 1.0)
    assert await store.trace("a", "req-9") is None


async def test_labels_kept_before_they_named_their_requests_trace_still_read_and_count_once() -> None:
    """t196: a label now names its request by its id and its trace's time; one kept before has
    the id alone, and a relabel of it still counts once."""
    kv = MemoryKeyValue()
    older = _examples(1, rule=True)[0]
    fields = msgspec.structs.asdict(older)
    del fields["traced_at"], fields["tenant"]  # as an older gateway wrote it
    for needed_large in (True, False):
        await kv.append(keyspace.routing_labels("a"), msgspec.msgpack.encode({**fields, "needed_large": needed_large}),
                        25, 60, 1.0)  # fmt: skip
    read = await LearningStore(kv).labels("a")
    assert [(e.request_id, e.traced_at, e.needed_large) for e in read] == [("r0", 0.0, True), ("r0", 0.0, False)]
    assert [e.needed_large for e in latest_labels(read)] == [False]


async def test_labels_are_kept_per_tenant_and_bounded() -> None:
    store = LearningStore(MemoryKeyValue())
    for example in _examples(30, rule=True):
        await store.add_label("a", example, max_labels=25)
    assert [e.request_id for e in await store.labels("a")] == [f"r{i}" for i in range(5, 30)]
    assert await store.labels("b") == []
    trace = RoutingTrace.of("key-1", "auto", "large", 0.7, np.zeros(384), np.zeros(12))
    assert await store.keep_trace("a", "req-1", trace, keep_hours=1, max_bytes=1 << 20)
    assert await store.trace("a", "req-1") == trace
    assert await store.trace("b", "req-1") is None


def test_apgr_and_cpt_of_labels() -> None:
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    assert apgr(y.astype(float), y) > 0.85  # the labels themselves rank perfectly
    assert apgr(-y.astype(float), y) < 0.2
    assert cpt(y.astype(float), y) == 0.125  # one large call of eight recovers half the needed ones
    assert cpt(-y.astype(float), y) == 0.875


def test_the_judge_prompt_and_the_simulated_judge_agree_on_the_protocol() -> None:
    request = judge_request("large", "user: draft an email", f"[simulated small] {FAILURE} x", "fine answer")
    assert judge_verdict(to_chat_body(request)["messages"]) == "no"  # as an OpenAI-compatible judge reads it
    request = judge_request("large", "user: draft an email", "a good answer", "fine answer")
    assert judge_verdict(to_chat_body(request)["messages"]) == "yes"
    assert parse_verdict("Yes.") is True and parse_verdict("no") is False and parse_verdict("maybe") is None
    # a long system prompt or document comes first; the judge must still see the question, last
    long = "system: " + "policy text. " * 3000 + "\nuser: what is the refund window?"
    question = to_chat_body(judge_request("large", long, "a", "b"))["messages"][-1]["content"]
    assert "what is the refund window?" in question and len(question) < 13_000
    # a long system prompt, then a question followed by a pasted document: the judge sees the question
    messages = [
        Message("system", (TextPart("house rules. " * 400),)),
        Message("user", (TextPart("Which clause sets the notice period? Contract: " + "clause text. " * 2000),)),
    ]
    question = to_chat_body(judge_request("large", judged_conversation(messages), "a", "b"))["messages"][-1]["content"]
    assert "Which clause sets the notice period?" in question and "house rules." in question
    # one long turn keeps three quarters of the room for its end, as before
    single = [Message("user", (TextPart("context. " * 3000 + "What changed in 2021? " + "note. " * 800),))]
    assert "What changed in 2021?" in judged_conversation(single) and len(judged_conversation(single)) <= 12_000
    # ... and so does one behind a short system prompt, the usual case
    briefed = [Message("system", (TextPart("Be brief."),)), *single]
    assert "What changed in 2021?" in judged_conversation(briefed) and len(judged_conversation(briefed)) <= 12_000


def test_building_the_cli_does_not_import_prometheus_before_serve_sets_its_multiprocess_dir() -> None:
    import subprocess
    import sys

    code = "import sys, gateway.cli; sys.exit('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_router_command_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import main

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # its default --data-dir, ./.gateway, is not a `make run`'s (t96)
    assert main(["router", "status", "--tenant", "a"]) == 1
    assert "REDIS_URL" in capsys.readouterr().err
    assert main(["router", "learn", "--redis", "redis://127.0.0.1:9"]) == 2  # usage errors, as argparse's (t152)
    assert "exactly one --tenant" in capsys.readouterr().err
    assert main(["router", "learn", "--global", "--redis", "redis://127.0.0.1:9"]) == 2
    assert "the tenants whose labels to pool" in capsys.readouterr().err
    assert main(["router", "learn", "--tenant", "a", "--tenant", "b", "--redis", "redis://127.0.0.1:9"]) == 2
    assert "exactly one --tenant" in capsys.readouterr().err


def test_the_router_command_refuses_a_tenant_it_would_not_use(capsys: pytest.CaptureFixture[str]) -> None:
    """t152: ``status --global --tenant X`` ignored the tenant (exit 0), and ``--tenant ""`` was taken."""
    from gateway.cli import main

    offline = ("--redis", "redis://127.0.0.1:9")
    for command in ("status", "rollback"):  # --global with tenants pools their labels: learn's alone
        assert main(["router", command, "--global", "--tenant", "a", *offline]) == 2
        assert "--global" in capsys.readouterr().err
    for command in ("learn", "status", "rollback"):
        for name in ("", " a", "a\tb"):  # no tenant can have such a name
            with pytest.raises(SystemExit) as refused:
                main(["router", command, "--tenant", name, *offline])
            assert refused.value.code == 2 and "--tenant" in capsys.readouterr().err


def test_a_request_labelled_twice_counts_once_by_its_last_label() -> None:
    import msgspec

    examples = _examples(200, rule=True)
    flipped = [msgspec.structs.replace(e, needed_large=not e.needed_large, at=e.at + 1000) for e in examples]
    _, once = fit_candidate(examples, None)
    _, relabelled = fit_candidate(examples + flipped, None)  # every request relabelled the other way, later
    assert relabelled.held_out == once.held_out and relabelled.trained_on == once.trained_on
    assert relabelled.current_apgr != once.current_apgr  # judged on the flipped labels only


_FREE = ShadowCosts(0.0, Price(input_per_mtok=0.0, output_per_mtok=0.0), 0, 0)
"""Calls that cost nothing as estimated: only the spend paid stops a job."""


def _shadow_jobs(usd_per_day: float) -> tuple[LearningStore, ShadowJudge, Callable[..., ShadowJob]]:
    """A store, a judge over it, and a maker of jobs of tenant t's route auto under that cap."""
    store = LearningStore(MemoryKeyValue())
    policy = LearningPolicy(shadow_share=1.0, usd_per_day=usd_per_day)
    trace = RoutingTrace.of("k", "auto", "small", 0.2, np.zeros(384), np.zeros(12))

    def job(i: int, ask: Ask, grade: Judge, costs: ShadowCosts = _FREE) -> ShadowJob:
        return ShadowJob(policy, "t", f"r{i}", trace, "answer", ask, grade, policy.max_labels, costs)

    return store, ShadowJudge(store, Metrics()), job


async def test_a_shadow_job_runs_only_where_what_it_may_cost_fits_in_the_days_cap() -> None:
    """t152: the spend was checked before a job, never against what the job would cost: with
    $0.009 of a $0.06 cap left, one prompt of 60,000 words made one job spend $0.91."""
    store, judge, job = _shadow_jobs(0.06)
    await store.add_shadow_spend("t", "auto", 0.051)
    asked = graded = 0

    async def ask() -> tuple[str, float]:
        nonlocal asked
        asked += 1
        return "other answer", 0.4

    async def grade(small: str, large: str) -> tuple[str, float]:
        nonlocal graded
        graded += 1
        return "yes", 0.001

    price = Price(input_per_mtok=5.0, output_per_mtok=15.0)
    long_prompt = ShadowCosts(0.4, price, read_tokens(80_000, 400_000), 512)
    assert long_prompt.judge_usd() == pytest.approx((200 + 2_400 + 512) * 5e-6 + 3 * 15e-6)
    await judge._run(job(0, ask, grade, long_prompt))
    assert (asked, graded) == (0, 0)  # not started: $0.41 does not fit in $0.009
    short = ShadowCosts(0.004, price, 300, 100)  # $0.0063 in all: it fits
    await judge._run(job(1, ask, grade, short))  # ... but its answer cost $0.4: the judge is not asked
    assert (asked, graded) == (1, 0)
    assert await store.add_shadow_spend("t", "auto", 0.0) == pytest.approx(0.451)  # only what was paid


async def test_concurrent_shadow_jobs_stay_within_the_days_cap() -> None:
    # Each job checks the spend, then calls two models: side by side, 20 jobs all passed the
    # check of an empty day and spent 2.7x the cap (found by an outside tester).
    store, judge, job = _shadow_jobs(0.002)

    async def ask() -> tuple[str, float]:
        await asyncio.sleep(0.01)
        return "other answer", 0.0008

    async def grade(small: str, large: str) -> tuple[str, float]:
        await asyncio.sleep(0.01)
        return "yes", 0.0002

    await asyncio.gather(*(judge._run(job(i, ask, grade)) for i in range(20)))
    spent = await store.add_shadow_spend("t", "auto", 0.0)
    assert spent == pytest.approx(0.002)  # two jobs of $0.001, then the day is spent


async def test_a_failing_judge_cannot_spend_past_the_days_cap() -> None:
    # The other model's answer was added to the day's spend only once the judge answered: a
    # judge answering 500 let one tenant spend $379 against a $5 cap (an outside tester).
    store, judge, job = _shadow_jobs(0.002)

    async def ask() -> tuple[str, float]:
        return "other answer", 0.0008

    async def broken(small: str, large: str) -> tuple[str, float]:
        raise RuntimeError("judge answered 500")

    for i in range(20):
        await judge._run(job(i, ask, broken))
    assert await store.add_shadow_spend("t", "auto", 0.0) == pytest.approx(0.0024)  # 3 calls, then spent


async def test_shadow_jobs_waiting_on_a_slow_judge_are_bounded() -> None:
    _, judge, job = _shadow_jobs(5.0)
    asked = 0

    async def ask() -> tuple[str, float]:
        nonlocal asked
        asked += 1
        return "other answer", 0.0

    async def slow(small: str, large: str) -> tuple[str, float]:
        await asyncio.sleep(0.05)
        return "yes", 0.0

    for i in range(3 * MAX_WAITING):
        judge.start(job(i, ask, slow))
    for _ in range(400):
        await asyncio.sleep(0.01)
        if not judge._waiting:
            break
    assert asked == MAX_WAITING and not judge._waiting
    await judge.aclose()


def test_a_persons_label_outranks_a_later_shadow_verdict() -> None:
    import msgspec

    people = [msgspec.structs.replace(e, source="feedback") for e in _examples(200, rule=True)]
    judged = [msgspec.structs.replace(e, source="shadow", needed_large=not e.needed_large, at=e.at + 1e6)
              for e in people]  # fmt: skip
    _, by_people = fit_candidate(people, None)
    _, both = fit_candidate(people + judged, None)
    assert both.current_apgr == by_people.current_apgr and both.trained_on == by_people.trained_on


async def test_rollbacks_go_back_one_promotion_at_a_time() -> None:
    """Two rollbacks after three promotions put the first back, not the shipped router (an outside
    tester); a version whose stored router expired is passed over."""
    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    second, _ = fit_candidate(_examples(200, rule=True, seed=2), first)
    third, _ = fit_candidate(_examples(200, rule=True, seed=3), second)
    for router in (first, second, third):
        await promote(kv, "a", router)
    assert await rollback(kv, "a") == second.version
    assert await rollback(kv, "a") == first.version == await active_version(kv, "a")
    assert await rollback(kv, "a") is None and await active_version(kv, "a") is None
    for router in (first, second, third):
        await promote(kv, "a", router)
    await kv.delete(keyspace.learned_router("a", f"v:{second.version}"), 1.0)  # expired
    assert await rollback(kv, "a") == first.version


async def test_a_quiet_tenants_next_request_sees_a_rollback_made_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    second, _ = fit_candidate(_examples(200, rule=True, seed=2), first)
    await promote(kv, "a", first)
    await promote(kv, "a", second)
    now = [0.0]
    monkeypatch.setattr("gateway.learning.learned.time.monotonic", lambda: now[0])
    routers = LearnedRouters(kv, refresh_s=5.0)
    assert await routers.refresh("a") == second
    await rollback(kv, "a")
    now[0] = 12.0  # no request for 12 s: the next one must not be answered by the rolled-back router
    assert await routers.in_force("a") == first
    now[0] = 13.0  # busy: within the refresh period the cached router answers, refreshed behind
    assert await routers.in_force("a") == first
    await routers.aclose()


def test_pooled_tenants_may_reuse_each_others_request_ids() -> None:
    """Request ids are the clients' to choose: the same id in two tenants is two requests."""
    import msgspec

    ours = [msgspec.structs.replace(e, tenant="a") for e in _examples(200, rule=True)]
    theirs = [msgspec.structs.replace(e, tenant="b", needed_large=not e.needed_large, at=e.at + 1000) for e in ours]
    _, alone = fit_candidate(ours, None)
    _, pooled = fit_candidate(ours + theirs, None)
    assert pooled.trained_on + pooled.held_out == 2 * (alone.trained_on + alone.held_out)


async def test_status_does_not_name_a_version_whose_router_is_gone() -> None:
    """Gateways serve the shipped router then; status said the expired version was in force."""
    from gateway.cli.router import _status

    kv = MemoryKeyValue()
    first, _ = fit_candidate(_examples(200, rule=True), None)
    await promote(kv, "a", first)
    assert (await _status(kv, "a", await active_version(kv, "a")))["active"] == first.version
    await kv.delete(keyspace.learned_router("a", f"v:{first.version}"), 1.0)  # expired or evicted
    assert (await _status(kv, "a", await active_version(kv, "a")))["active"] is None


async def test_status_names_no_pooled_router_where_no_route_pools_labels() -> None:
    """t152: ``pooled_routes`` named the pooled version for a policy whose every route has
    ``learning.scope: tenant``, where no pooled router serves the tenant."""
    from gateway.cli.router import _status

    kv = MemoryKeyValue()
    pooled, _ = fit_candidate(_examples(200, rule=True), None)
    await promote(kv, None, pooled)
    assert (await _status(kv, "a", None, pools=True))["pooled_routes"] == pooled.version
    assert (await _status(kv, "a", None, pools=False))["pooled_routes"] is None
    own, _ = fit_candidate(_examples(200, rule=True, seed=3), None)
    await promote(kv, "a", own)
    assert (await _status(kv, "a", own.version, pools=False)) | {"labels": 0} == {
        "scope": "a", "active": own.version, "pooled_routes": None, "labels": 0,
    }  # fmt: skip


_POLICY = """
version: 1
pair: {{small: small, large: large}}
models:
  small: {{base_url: "${{SMALL_MODEL_URL}}", price: {{input: 0.2, output: 0.2}}, tier: small}}
  large: {{base_url: "${{LARGE_MODEL_URL}}", price: {{input: 2.5, output: 10}}, tier: large}}
routes:
  auto: {{strategy: classifier, model: small, fallbacks: [large], learning: {{scope: {scope}}}}}
  fast: {{model: small}}
auth: {{mode: none}}
"""


def test_status_reads_which_routes_pool_from_the_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.router import _policy, _pools

    policy = tmp_path / "policies.yaml"
    for scope, pools in (("tenant", False), ("global", True)):
        policy.write_text(_POLICY.format(scope=scope))
        loaded = _policy(str(policy))
        assert loaded is not None and _pools(loaded) is pools
    assert _policy(str(tmp_path / "none.yaml")) is None
    assert "--policies tells which routes the pooled router serves" in capsys.readouterr().err


async def test_learn_global_counts_a_relabelled_request_left_out_once(capsys: pytest.CaptureFixture[str]) -> None:
    """t125: the note on labels left out of the pool counted each relabel, as learn and status do not."""
    from gateway.cli.router import _learn

    kv = MemoryKeyValue()
    store = LearningStore(kv)
    examples = _examples(30, rule=True)  # a route with learning scope 'tenant': not poolable
    relabelled = [msgspec.structs.replace(e, needed_large=not e.needed_large, source="feedback") for e in examples]
    for example in examples + relabelled:
        await store.add_label("a", example, max_labels=1000)
    assert await _learn(kv, None, ["a"], False) == 1
    assert "30 labelled requests of these tenants were left out" in capsys.readouterr().err
