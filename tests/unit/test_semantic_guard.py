"""The semantic-cache guard: refuse a hit when what decides the answer differs (no model, no Redis)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.cache.guard import answer_determinants, guard_allows, refusal_reasons
from tests.bench.semantic_testset import DEFAULT_DATA, build_testset

MMLU = """Which of the following is true of the derivative of sin(x)?
A. It is cos(x)
B. It is -cos(x)
C. It is sin(x)
D. It is 0
Answer:"""


def refused(new: str, cached: str, *rules: str) -> None:
    assert not guard_allows(new, cached), (new, cached)
    assert not guard_allows(cached, new), (cached, new)
    reasons = refusal_reasons(new, cached)
    for rule in rules:
        assert rule in reasons, (rule, reasons)


def allowed(new: str, cached: str) -> None:
    assert guard_allows(new, cached), (new, cached, refusal_reasons(new, cached))
    assert guard_allows(cached, new), (cached, new, refusal_reasons(cached, new))


# ------------------------------------------------------------------------ numbers


def test_the_issue_example_17_times_23_vs_24() -> None:
    refused("what is 17 × 24?", "what is 17 × 23?", "num")


def test_numbers_written_differently_are_the_same_number() -> None:
    allowed("Josh buys a house for $80000.", "Josh buys a house for $80,000.")
    allowed("The pen costs $5.00.", "The pen costs $5.")
    allowed("Sam ran three miles on Monday.", "Sam ran 3 miles on Monday.")
    allowed("There are twenty-five apples.", "There are 25 apples.")
    allowed("What is 0.5 plus 1?", "What is .5 plus 1?")


def test_changed_numbers_are_refused() -> None:
    refused("Sam ran 4 miles on Monday.", "Sam ran 3 miles on Monday.", "num")
    refused("What is 0.75 of 12?", "What is 0.25 of 12?", "num")
    refused("What is -5 squared?", "What is 5 squared?", "num")
    refused("What is 3/4 as a decimal?", "What is 1/4 as a decimal?", "num")
    refused("Sam ran four miles.", "Sam ran three miles.", "num")
    refused("He earns twice as much.", "He earns half as much.", "numword")


def test_one_that_does_not_count_is_not_a_number() -> None:
    allowed("Which one of the following is a prime number?", "Which of the following is a prime number?")
    refused("She has one dog and 2 cats.", "She has 2 cats.", "num")


# -------------------------------------------------------------------------- names


def test_swapped_names_are_refused_wherever_they_are() -> None:
    refused(
        "Mark buys a house for $80,000. How much did Mark pay?",
        "Josh buys a house for $80,000. How much did Josh pay?",
        "name",
    )
    refused("What is the capital of Germany?", "What is the capital of France?", "name")
    refused("How far is it from Paris to Rome?", "How far is it from Paris to Madrid?", "name")


def test_names_compare_case_insensitively() -> None:
    allowed("josh buys a house. how much did josh's house cost?", "Josh buys a house. How much did Josh's house cost?")
    allowed("what is the capital of france", "What is the capital of France?")


def test_capitalised_common_words_are_not_names() -> None:
    allowed("Please answer: Quick question. What is the capital of France?", "What is the capital of France?")
    allowed("Thanks! Could you tell me the capital of France?", "Could you tell me the capital of France?")


# ------------------------------------------------------------------ quotes and code


def test_quoted_strings() -> None:
    refused('Translate "good night" into Spanish.', 'Translate "good morning" into Spanish.', "quote")
    refused("What does 'ambiguous' mean?", "What does 'ubiquitous' mean?", "quote")
    refused("Reverse the string “hello world”.", "Reverse the string “hello word”.", "quote")
    allowed('Please translate "Good Morning" into Spanish', 'Translate "good morning" into Spanish.')


def test_code() -> None:
    refused("What does `sorted(xs, reverse=True)` return?", "What does `sorted(xs)` return?", "code")
    refused("What does `Foo()` print?", "What does `foo()` print?", "code")
    refused("What does ```\nprint(2 + 3)\n``` print?", "What does ```\nprint(2 + 2)\n``` print?", "code")
    allowed("What does ```\nprint(2 + 2)\n```  print?", "what does ```\nprint(2  +  2)\n``` print")


# ------------------------------------------------------------------------ options


def test_options_changed_or_swapped_are_refused() -> None:
    swapped = MMLU.replace("A. It is cos(x)", "A. It is sin(x)").replace("C. It is sin(x)", "C. It is cos(x)")
    refused(swapped, MMLU, "option")
    refused(MMLU.replace("D. It is 0", "D. It is 1"), MMLU, "option")
    refused(MMLU.replace("B. It is -cos(x)", "B. It is tan(x)"), MMLU, "option")


def test_option_formats_are_the_same_options() -> None:
    allowed(MMLU.replace("A. ", "(A) ").replace("B. ", "(B) ").replace("C. ", "(C) ").replace("D. ", "(D) "), MMLU)
    allowed(MMLU.replace("A. ", "A) ").replace("B. ", "B) ").replace("C. ", "C) ").replace("D. ", "D) "), MMLU)
    allowed(MMLU.lower(), MMLU)
    allowed(MMLU.replace("\nAnswer:", ""), MMLU)


# ---------------------------------------------------- negation, polarity, units


def test_negation_and_polarity() -> None:
    refused("Which of the following is not true?", "Which of the following is true?", "neg")
    refused("Which of the following isn't a mammal?", "Which of the following is a mammal?", "neg")
    refused(
        "What is the smallest planet in the solar system?", "What is the largest planet in the solar system?", "polar"
    )
    refused("What happened after the war?", "What happened before the war?", "polar")
    allowed("Which of the following isn't true?", "Which of the following is not true?")
    allowed("I can't open the file, what's wrong?", "I cannot open the file, what is wrong?")


def test_units_and_currencies() -> None:
    refused("How far does she drive in 3 minutes at 60 mph?", "How far does she drive in 3 hours at 60 mph?", "unit")
    refused("A book costs £4. How much do 3 cost?", "A book costs $4. How much do 3 cost?", "unit")
    refused("A 200 MB file downloads at 2 MB/s.", "A 200 GB file downloads at 2 GB/s.", "unit")
    allowed("It is 50% off.", "It is 50 percent off.")


# ------------------------------------------------------------------------ lexical


def test_a_replaced_content_word_is_refused() -> None:
    refused("What is the freezing point of water?", "What is the boiling point of water?", "lexical")
    refused("How do I sort a list in Python?", "How do I reverse a list in Python?", "lexical")
    assert guard_allows("What is the freezing point of water?", "What is the boiling point of water?", lexical=False)


def test_adding_or_dropping_words_alone_is_allowed() -> None:
    allowed("I'm preparing for a test. How many legs does a spider have? I'd appreciate the answer.",
            "How many legs does a spider have?")  # fmt: skip
    allowed("How many legs do spiders have?", "How many legs does a spider have?")


def test_past_the_embedding_window_no_content_word_may_be_added() -> None:
    """When a prompt ran past the encoder's window, an appended question is invisible to the
    similarity; the guard then wants the same content words (harmless rewrites still pass)."""
    long = "Explain how the Treaty of Westphalia shaped the idea of state sovereignty in Europe."
    extra = long + " Also explain why historians still debate it."
    assert guard_allows(extra, long)  # the window saw everything: the threshold's job
    for new, cached in ((extra, long), (long, extra)):
        assert not guard_allows(new, cached, beyond_window=True)
        assert "unseen" in refusal_reasons(new, cached, beyond_window=True)
    assert guard_allows("  " + long.lower() + "\n", long, beyond_window=True)


# -------------------------------------------------------------- harmless rewrites


@pytest.mark.parametrize(
    "rewrite",
    [
        "  What is 17 × 23?\n",
        "what is 17 × 23",
        "WHAT IS 17 × 23?",
        "Question: What is 17 × 23?",
        "Please answer: what's 17 × 23?",
        "What is 17 × 23? Thanks!",
        "What is 17 × 23?\nThank you.",
        "Q: What is 17 × 23?",
    ],
)
def test_harmless_rewrites_pass(rewrite: str) -> None:
    allowed(rewrite, "What is 17 × 23?")


def test_word_problem_rewrites_pass() -> None:
    cached = ("Toulouse has twice as many sheep as Charleston. Charleston has 4 times as many sheep as Seattle. "
              "How many sheep do Toulouse, Charleston, and Seattle have together if Seattle has 20 sheep?")  # fmt: skip
    allowed(cached.replace("How many", "What number of"), cached)
    allowed(cached.replace(", and Seattle", " and Seattle").rstrip("?"), cached)
    allowed(cached.replace("4 times", "four times"), cached)
    allowed(cached.lower(), cached)
    allowed("Can you help me with this? " + cached, cached)
    refused(cached.replace("Seattle has 20", "Seattle has 30"), cached, "num")
    refused(cached.replace("Toulouse", "Denver"), cached, "name")
    refused(cached.replace("twice", "three times"), cached)


# --------------------------------------------------------------------- the API


def test_answer_determinants_is_a_multiset() -> None:
    found = answer_determinants("Josh's 2 dogs and 2 cats cost $80,000, not 'cheap'. Is that the most?")
    assert isinstance(found, Counter)
    assert found["num:2"] == 2
    assert found["num:80000"] == 1
    assert found["unit:$"] == 1
    assert found["quote:cheap"] == 1
    assert found["neg:not"] == 1
    assert found["polar:most"] == 1
    assert found["name:josh"] == 1


def test_identical_prompts_are_allowed_and_empty_ones_too() -> None:
    assert guard_allows(MMLU, MMLU)
    assert guard_allows("", "")
    assert refusal_reasons(MMLU, MMLU) == []


@pytest.mark.skipif(not (DEFAULT_DATA / "gsm8k_dev.jsonl").exists(), reason="routing data not present")
def test_the_bench_test_set_is_deterministic_and_the_guard_keeps_its_measured_behaviour() -> None:
    a = build_testset(n_prompts=60, per_prompt=2, distractors=10, seed=3)
    b = build_testset(n_prompts=60, per_prompt=2, distractors=10, seed=3)
    assert [(v.original_id, v.transform, v.text) for v in a.variants] == [
        (v.original_id, v.transform, v.text) for v in b.variants
    ]
    originals = {o.id: o.prompt for o in a.originals}
    pos = [v for v in a.variants if v.positive]
    neg = [v for v in a.variants if not v.positive and v.transform not in ("extra_question",)]
    assert sum(guard_allows(v.text, originals[v.original_id]) for v in pos) >= 0.9 * len(pos)
    assert sum(not guard_allows(v.text, originals[v.original_id]) for v in neg) >= 0.95 * len(neg)
