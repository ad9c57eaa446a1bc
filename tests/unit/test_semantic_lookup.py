"""A semantic lookup's checks, with the shipped verifier and an in-memory index."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from gateway.cache.entries import CachedAnswer
from gateway.cache.semantic import SemanticCache, ServeBar
from gateway.cache.verifier import PairVerifier, Verdict, load_verifier
from gateway.config.schema import SemanticCachePolicy
from gateway.core.model import Answer
from gateway.store.memory import MemoryVectorIndex

INDEX = "gw:{t}:v:test"


@pytest.fixture(scope="module")
async def verifier() -> AsyncIterator[PairVerifier]:
    loaded = load_verifier(prefer_gpu=False)
    assert loaded is not None, "the verifier ships with the package"
    yield loaded
    await loaded.aclose()


def _entry(prompt: str) -> CachedAnswer:
    return CachedAnswer(
        answer=Answer(id="", model="m", text="{}"), model="m", provider="p", prompt_tokens=1, completion_tokens=1, cost_usd=0.0,
        created_at=time.time(), prompt=prompt,
    )  # fmt: skip


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


async def _cache_with(prompt: str, verifier: PairVerifier | None) -> tuple[SemanticCache, np.ndarray]:
    cache = SemanticCache(MemoryVectorIndex(), verifier)
    vector = _unit(0)
    await cache.store(INDEX, vector, _entry(prompt), 60, 100, 1.0)
    return cache, vector


async def test_a_reworded_question_is_served_and_an_edited_one_is_not(verifier: PairVerifier) -> None:
    cache, vector = await _cache_with("How do I reverse a list in Python?", verifier)
    # the same vector for all: the embedding proposes, only the checks decide
    served = await cache.lookup(
        INDEX, vector, "python: what's the way to reverse a list?", 0.75, ServeBar(0.8, 0.8), True, 1.0
    )
    assert served.hit is not None and served.hit.p_same >= 0.8
    refused = await cache.lookup(
        INDEX, vector, "How do I reverse a list in JavaScript?", 0.75, ServeBar(0.8, 0.8), True, 1.0
    )
    assert refused.hit is None and refused.refused == 1


async def test_the_rules_refuse_before_the_verifier_is_asked(verifier: PairVerifier) -> None:
    cache, vector = await _cache_with("What is 17 times 23?", verifier)
    found = await cache.lookup(INDEX, vector, "What is 17 times 24?", 0.75, ServeBar(0.0, 0.0), True, 1.0)
    assert found.hit is None and found.refused == 1  # refused even at verify_threshold 0


async def test_another_identifier_is_refused_before_the_verifier_is_asked(verifier: PairVerifier) -> None:
    """t163: a short prompt that differs from the stored one only by an id was served its answer
    (similarity 0.81, p 0.997): the digits after a letter were no number to the rules."""
    cache, vector = await _cache_with("lookup a72b1428", verifier)
    found = await cache.lookup(INDEX, vector, "lookup d7bf14ec", 0.75, ServeBar(0.0, 0.0), True, 1.0)
    assert found.hit is None and found.refused == 1
    same = await cache.lookup(INDEX, vector, "Lookup A72B1428?", 0.75, ServeBar(0.0, 0.0), True, 1.0)
    assert same.hit is not None and same.refused == 0


async def test_without_a_verifier_nothing_is_served() -> None:
    cache, vector = await _cache_with("How do I reverse a list in Python?", None)
    found = await cache.lookup(INDEX, vector, "How do I reverse a list in Python?", 0.75, ServeBar(0.8, 0.8), True, 1.0)
    assert found.hit is None


async def test_a_pair_too_long_to_judge_is_a_miss_unless_equal_but_for_spacing(verifier: PairVerifier) -> None:
    story = "The committee met on a rainy Tuesday to weigh the budget for the new library wing " * 12
    cache, vector = await _cache_with(story + "How many members voted?", verifier)
    longer = await cache.lookup(
        INDEX, vector, story + "How many members voted, and who abstained?", 0.75, ServeBar(0.5, 0.5), True, 1.0
    )
    assert longer.hit is None
    assert verifier.judge_sync([(story, story + "?")])[0].unsure
    # what both share is not read: the same long story, then two short questions, is judged
    told = story.replace(" wing ", " wing. ")
    assert not verifier.judge_sync([(told + "How many voted?", told + "How many members voted?")])[0].unsure
    same = await cache.lookup(
        INDEX,
        vector,
        "  " + story.replace(" ", "  ") + "How many members voted?\n",
        0.75,
        ServeBar(0.8, 0.8),
        True,
        1.0,
    )
    assert same.hit is not None and same.hit.p_same == 1.0


async def test_a_prompt_equal_but_for_meaningful_case_or_marks_is_judged_not_served_outright(
    verifier: PairVerifier,
) -> None:
    # equal to the embedding and to plain_text, and so served at p 1.0 to an outside tester:
    # now the verifier is asked (and its close bar refuses them; the rules would, too)
    for stored, new in [
        ("What does git branch -d do?", "What does git branch -D do?"),
        ("ベッドの選び方を教えてください", "ペットの選び方を教えてください"),
    ]:
        cache, vector = await _cache_with(stored, verifier)
        found = await cache.lookup(INDEX, vector, new, 0.75, ServeBar(0.998, 0.998), False, 1.0)
        assert found.hit is None
    cache, vector = await _cache_with("What is the capital of France?", verifier)
    for same_question in ("  What is the capital of  France", "what is the capital of france"):
        same = await cache.lookup(INDEX, vector, same_question, 0.75, ServeBar(0.998, 0.998), False, 1.0)
        assert same.hit is not None and same.hit.p_same == 1.0


async def test_below_the_similarity_floor_nothing_is_judged(verifier: PairVerifier) -> None:
    cache, _ = await _cache_with("How do I reverse a list in Python?", verifier)
    found = await cache.lookup(
        INDEX, _unit(1), "How do I reverse a list in Python?", 0.75, ServeBar(0.8, 0.8), True, 1.0
    )
    assert found.hit is None and found.refused == 0 and found.best_similarity is not None


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ("how many calories in a banana", "How many calories in an apple?"),
        ("What is the population of Tokyo?", "what is the population of osaka"),
        ("what is the capital of france", "What is the capital of Spain?"),
        ("How do I center a div horizontally in CSS?", "css center a div vertically??"),
    ],
)
def test_a_question_mark_on_one_side_only_does_not_pass_a_near_miss(
    verifier: PairVerifier, stored: str, new: str
) -> None:
    """t121: the verifier had learnt that a closing "?" on one side only marks a rewording
    (p 0.999 for the first three, "??" against "?" too); it judges the pair as if both closed alike."""
    (as_sent,) = verifier.judge_sync([(stored, new)])
    (both_asking,) = verifier.judge_sync([(stored.rstrip("?") + "?", new.rstrip("?") + "?")])
    assert as_sent.p_same == pytest.approx(both_asking.p_same, abs=1e-6)
    assert as_sent.p_same < SemanticCachePolicy().verify_threshold  # not served


@pytest.mark.parametrize(
    ("stored", "new", "bare"),
    [
        (
            "Sort numbers ascending in JavaScript",
            "Sort numbers descending in JavaScript thanks",
            "Sort numbers descending in JavaScript",
        ),
        (
            "What is the capital of Austria?",
            "What is the capital of Australia? thanks",
            "What is the capital of Australia?",
        ),
        (
            "How do I reverse a list in Python?",
            "hey, how do I reverse a string in Python?",
            "how do I reverse a string in Python?",
        ),
        ("Recommend a good sci-fi book.", "Recommend a good sci-fi movie pls.", "Recommend a good sci-fi movie."),
    ],
)
def test_a_courtesy_word_at_either_end_does_not_pass_a_near_miss(
    verifier: PairVerifier, stored: str, new: str, bare: str
) -> None:
    """t122: "... thanks" or "hey, ..." on one side only served 14-16 of 20 one-edit near misses
    that the same pair without it did not get; the verifier reads the pair without them."""
    (with_it,) = verifier.judge_sync([(stored, new)])
    (without,) = verifier.judge_sync([(stored, bare)])
    assert with_it.p_same == pytest.approx(without.p_same, abs=1e-6)
    assert with_it.p_same < SemanticCachePolicy().verify_threshold  # not served


@pytest.mark.parametrize(
    ("stored", "new", "bare"),
    [
        ("capital of france? (order 7731)", "capital of germany? order 7731", ("capital of france?", "capital of germany?")),
        ("who wrote hamlet? Ticket 88", "which author wrote macbeth? ticket 88",
         ("who wrote hamlet?", "which author wrote macbeth?")),
    ],
)  # fmt: skip
def test_a_shared_reference_typed_otherwise_does_not_pass_a_near_miss(
    verifier: PairVerifier, stored: str, new: str, bare: tuple[str, str]
) -> None:
    """t135: the reference, bracketed or capitalized on one side only, was read, and the verifier
    took the two questions for one (p 0.997); it reads them without it, as when it is typed alike."""
    (as_sent,) = verifier.judge_sync([(stored, new)])
    (questions,) = verifier.judge_sync([bare])
    assert as_sent.p_same == pytest.approx(questions.p_same, abs=1e-6)
    assert as_sent.p_same < SemanticCachePolicy().verify_threshold  # not served


def test_the_verifier_reads_pairs_in_a_batch_as_it_reads_them_alone(verifier: PairVerifier) -> None:
    a, b = "How do I reverse a list in Python?", "python: what's the way to reverse a list?"
    c, d = "What is the capital of France?", "What is the capital of Spain?"
    together = verifier.judge_sync([(a, b), (c, d)])
    alone = verifier.judge_sync([(a, b)]) + verifier.judge_sync([(c, d)])
    assert [v.p_same for v in together] == pytest.approx(
        [v.p_same for v in alone], abs=0.02
    )  # int8: padding moves it a little
    assert together[0].p_same > together[1].p_same


async def test_a_failing_verifier_is_a_miss_not_an_error(
    verifier: PairVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, vector = await _cache_with("How do I reverse a list in Python?", verifier)

    def broken(pairs: list[tuple[str, str]]) -> list[object]:
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(verifier, "judge_sync", broken)
    found = await cache.lookup(
        INDEX, vector, "python: what's the way to reverse a list?", 0.75, ServeBar(0.8, 0.8), True, 1.0
    )
    assert found.hit is None and found.refused == 1


async def test_a_close_candidate_must_clear_the_higher_bar(verifier: PairVerifier) -> None:
    cache, vector = await _cache_with("How do I reverse a list in Python?", verifier)
    reworded = "python: what's the way to reverse a list?"
    p_same = verifier.judge_sync([("How do I reverse a list in Python?", reworded)])[0].p_same
    below, above = p_same - 0.01, min(1.0, p_same + 0.005)
    # every candidate here sits at cosine 1.0: the close bar applies from close_similarity on
    far = await cache.lookup(INDEX, vector, reworded, 0.75, ServeBar(below, below, above, 1.01), True, 1.0)
    assert far.hit is not None
    close = await cache.lookup(INDEX, vector, reworded, 0.75, ServeBar(below, below, above, 0.95), True, 1.0)
    assert close.hit is None and close.refused == 1


def test_the_bar_takes_the_higher_of_the_two_for_a_close_candidate() -> None:
    bar = ServeBar(base=0.98, matched=0.97, close=0.997, close_similarity=0.92)
    assert bar.at(0.91, matched=False) == 0.98
    assert bar.at(0.91, matched=True) == 0.97
    assert bar.at(0.92, matched=True) == 0.997
    assert ServeBar(0.999, 0.999, 0.997, 0.92).at(0.99, matched=False) == 0.999  # never lowered


def test_a_far_candidate_must_clear_the_far_bar() -> None:
    bar = ServeBar(base=0.98, matched=0.97, close=0.997, close_similarity=0.92, far=0.998, far_similarity=0.75)
    assert bar.at(0.74, matched=False) == 0.998
    assert bar.at(0.74, matched=True) == 0.998
    assert bar.at(0.75, matched=False) == 0.98
    assert bar.raised(lambda t: min(0.999, t + 0.01)).at(0.5, matched=False) == 0.999


async def test_a_verdict_waits_past_the_redis_timeout_and_a_late_one_is_a_miss_that_says_so(
    verifier: PairVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t87: held to the Redis timeout (50 ms), most lookups of 20 concurrent clients gave up on a
    verdict queued behind the others' in the verifier's one thread, logged as plain misses."""
    cache, vector = await _cache_with("How do I reverse a list in Python?", verifier)
    reworded = "python: what's the way to reverse a list?"
    judge = verifier.judge_sync

    def busy(pairs: list[tuple[str, str]]) -> list[Verdict]:
        time.sleep(0.1)  # the thread is busy with other requests' verdicts
        return judge(pairs)

    monkeypatch.setattr(verifier, "judge_sync", busy)
    bar = ServeBar(0.8, 0.8)
    served = await cache.lookup(INDEX, vector, reworded, 0.75, bar, True, 0.05, verify_timeout_s=1.0)
    assert served.hit is not None and served.timed_out is None
    late = await cache.lookup(INDEX, vector, reworded, 0.75, bar, True, 1.0, verify_timeout_s=0.02)
    assert late.hit is None and late.timed_out == "verdict"


async def test_a_batch_whose_lookup_gave_up_is_not_run(verifier: PairVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load the one thread would spend itself on verdicts no one waits for any more."""
    ran: list[int] = []
    judge = verifier.judge_sync

    def counted(pairs: list[tuple[str, str]]) -> list[Verdict]:
        ran.append(len(pairs))
        return judge(pairs)

    monkeypatch.setattr(verifier, "judge_sync", counted)
    with pytest.raises(TimeoutError):
        await verifier.judge([("a", "b")], deadline=time.monotonic() - 1)
    assert ran == [] and len(await verifier.judge([("a", "b")], deadline=time.monotonic() + 5)) == 1
