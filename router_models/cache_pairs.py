"""Prompt pairs for the semantic cache's models: hand-written paraphrases and near misses.

Files are JSONL rows with ``source`` (the stored prompt), ``variant`` (the new one),
``kind`` (``paraphrase`` or ``near_miss``), ``origin`` and ``edit`` (see
``router_models/data/semantic_cache/README.md``). The shared development pairs call their
origins ``mmlu``/``gsm8k``; they are read as ``exam``/``math`` like ours.

``hard_negatives`` and ``light_rewrites`` build rule-made near misses and paraphrases for
*training only*: they say nothing about quality on real rewording and are never used in
an evaluation. The light rewrites exist because hand-written near misses are mostly
one-word edits of their source: without them a model learns "almost the same text means
a different answer", and refuses "what is the capital of France" after "What is the
capital of France?".
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pair", "first_half", "hard_negatives", "light_rewrites", "load_pairs", "second_half", "source_key"]

_ORIGIN_ALIASES = {"mmlu": "exam", "gsm8k": "math"}


@dataclass(frozen=True, slots=True)
class Pair:
    id: str
    origin: str
    lang: str
    source: str
    variant: str
    paraphrase: bool
    edit: str


def load_pairs(paths: Iterable[str | Path]) -> list[Pair]:
    pairs: list[Pair] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            origin = _ORIGIN_ALIASES.get(row["origin"], row["origin"])
            pairs.append(
                Pair(
                    id=row["id"],
                    origin=origin,
                    lang=row.get("lang") or "en",
                    source=row["source"],
                    variant=row["variant"],
                    paraphrase=row["kind"] == "paraphrase",
                    edit=row.get("edit") or "",
                )
            )
    return pairs


def source_key(pair: Pair) -> str:
    """Rows of one source share it: splits and bootstrap resamples go by source, not by row."""
    return pair.id.rsplit("-", 1)[0]


def first_half(pairs: list[Pair]) -> list[Pair]:
    """Every other source, sorted by id, from the first: the rest chooses the threshold."""
    keys = sorted({source_key(p) for p in pairs})
    kept = set(keys[0::2])
    return [p for p in pairs if source_key(p) in kept]


def second_half(pairs: list[Pair]) -> list[Pair]:
    kept = {source_key(p) for p in first_half(pairs)}
    return [p for p in pairs if source_key(p) not in kept]


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_OPTION = re.compile(r"(?m)^([A-D])\. (.+)$")


def _replace_match(table: dict[str, str], m: re.Match[str]) -> str:
    return table.get(m.group(), m.group())


def _swap_option(texts: dict[str, str], m: re.Match[str]) -> str:
    return f"{m.group(1)}. {texts.get(m.group(1), m.group(2))}"


def hard_negatives(prompts: Iterable[str], seed: int = 0) -> Iterator[tuple[str, str]]:
    """(prompt, edited prompt) whose answers differ: a number changed or two swapped, two options' texts swapped."""
    rng = random.Random(seed)
    for prompt in prompts:
        numbers = list(_NUMBER.finditer(prompt))
        if numbers:
            m = rng.choice(numbers)
            value = m.group()
            new = str(int(float(value)) + rng.choice([1, 2, 3, 5, 10])) if "." not in value else value + "5"
            yield prompt, prompt[: m.start()] + new + prompt[m.end() :]
        distinct = {m.group() for m in numbers}
        if len(distinct) >= 2:
            a, b = rng.sample(sorted(distinct), 2)
            trade = {a: b, b: a}
            swapped = _NUMBER.sub(functools.partial(_replace_match, trade), prompt)
            if swapped != prompt:
                yield prompt, swapped
        options = list(_OPTION.finditer(prompt))
        if len(options) >= 2:
            x, y = rng.sample(options, 2)
            texts = {x.group(1): y.group(2), y.group(1): x.group(2)}
            yield prompt, _OPTION.sub(functools.partial(_swap_option, texts), prompt)


_DIGITS = {
    str(i): w
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    )
}
_PREFIXES = ["please ", "hey, ", "quick question: ", "Can you tell me: ", "hi! ", "I need help. "]
_SUFFIXES = [" thanks!", " pls", " thank you", " (asking for a friend)", "", " ??"]
_CONTRACTIONS = [("What is", "What's"), ("what is", "what's"), ("do not", "don't"), ("It is", "It's"), ("I am", "I'm")]


def light_rewrites(prompts: Iterable[str], seed: int = 0) -> Iterator[tuple[str, str]]:
    """(prompt, a trivially reworded copy): case, punctuation, spacing, a polite prefix or
    suffix, a contraction, a small number spelled out; the answer cannot change."""
    rng = random.Random(seed)
    for prompt in prompts:
        text = prompt
        for _ in range(rng.randint(1, 3)):
            step = rng.randrange(6)
            if step == 0:
                text = text.lower()
            elif step == 1:
                text = re.sub(r"[?.!]+(\s*)$", r"\1", text.rstrip()) if rng.random() < 0.7 else text.rstrip() + "?"
            elif step == 2:
                text = rng.choice(_PREFIXES) + text[:1].lower() + text[1:]
            elif step == 3:
                text = text.rstrip() + rng.choice(_SUFFIXES)
            elif step == 4:
                for long, short in _CONTRACTIONS:
                    text = text.replace(long, short)
            else:
                text = re.sub(
                    r"(?<![\d.,])\b(\d{1,2})\b(?![\d.,])", lambda m: _DIGITS.get(m.group(1), m.group(1)), text, count=1
                )
        if text != prompt:
            yield prompt, text
