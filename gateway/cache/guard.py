"""Refuse a semantic hit when two prompts differ in what makes their answers differ.

Embeddings put "what is 17 × 23?" and "what is 17 × 24?" side by side; the answer
differs all the same. Before serving a semantic hit, the two prompts must agree on
their *answer-determining tokens*: numbers, quoted strings, code, capitalised names,
and the text of lettered answer options. Paraphrases keep those and pass; edits
that change them are refused. ``docs/semantic-cache.md`` has the measurements.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

__all__ = ["answer_determinants", "guard_allows"]

_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|‘([^’\n]{1,200})’|(?<!\w)'([^'\n]{1,200})'(?!\w)")
_NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:[.,]\d+)*(?:/\d+)?%?")
_NUMBER_WORDS = re.compile(
    r"\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    r"seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|million|"
    r"billion|half|twice|double|triple|first|second|third|fourth|fifth|tenth)\b",
    re.I,
)
_OPTION = re.compile(r"(?m)^\s*\(?([A-Ja-j])[).:]\s+(.+?)\s*$")
_WORD = re.compile(r"[A-Za-z][\w'’-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?\n]\s*|[\"“(]\s*)$")
_COMMON_CAPITALISED = frozenset(
    "I A An The What Which Who Whom Whose Why How When Where Is Are Was Were Do Does Did Can Could Should Would Will "
    "Please Explain Tell Give List Describe Write Find Calculate Compute Answer Question Options Choose Select True "
    "False Yes No If In On At Of For To From By With And Or But Not All None Both Neither Let Suppose Assume Consider "
    "Given Then Thus So It This That These Those There Here My Your Our Their His Her Its We You They He She".split()
)


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("−", "-")


def answer_determinants(prompt: str) -> Counter[str]:
    """The multiset of tokens that, if changed, change the answer."""
    text = _normalise(prompt)
    found: Counter[str] = Counter()
    for block in _CODE.findall(text):
        found["code:" + " ".join(block.strip("`").split())] += 1
    text = _CODE.sub(" ", text)
    for match in _QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None)
        found["quote:" + " ".join(quoted.lower().split())] += 1
    for letter, option in _OPTION.findall(text):
        found[f"option:{letter.upper()}:" + " ".join(option.lower().split())] += 1
    for number in _NUMBER.findall(text):
        found["num:" + number.replace(",", "").rstrip(".")] += 1
    for word in _NUMBER_WORDS.findall(text):
        found["numword:" + word.lower()] += 1
    for match in _WORD.finditer(text):
        word = match.group(0)
        if word[0].isupper() and word not in _COMMON_CAPITALISED and not _SENTENCE_START.search(text[: match.start()]):
            found["name:" + word] += 1
    return found


def guard_allows(new_prompt: str, cached_prompt: str) -> bool:
    return answer_determinants(new_prompt) == answer_determinants(cached_prompt)
