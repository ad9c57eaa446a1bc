"""Surface features of a prompt that the routing head reads beside the embedding.

The encoder sees only the first ``max_tokens`` tokens and is trained for meaning, which
washes out what makes a request demanding in form: how long it is, how many numbers and
symbols it carries, whether it holds code, lists of requirements or another script.
These are counted on the whole selected text with a few regular expressions (tens of
microseconds per prompt), so they cost nothing next to the forward pass.
"""

from __future__ import annotations

import math
import re

import numpy as np

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH = re.compile(r"[=+*/^<>≤≥≠∑∫√π∞±×÷%]|\\[a-z]+")
_CODE = re.compile(r"[{};]|`|=>|->|::|\bdef |\breturn\b|\bimport\b|\bSELECT\b|\bfunction\b|\bclass\b", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_REQUIREMENT = re.compile(
    r"\b(?:must|exactly|at least|at most|no more than|without|do not|don't|never|only|each|every|"
    r"include|exclude|avoid|between|must not)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")

NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_numbers",
    "digit_share",
    "log_math_symbols",
    "log_code_marks",
    "log_list_items",
    "log_requirements",
    "non_ascii_share",
    "question_marks",
    "mean_word_length",
)
"""The order of the features in :func:`surface_features`' output (stored with the head)."""


def surface_features(text: str) -> np.ndarray:
    """The features in :data:`NAMES` order, float32."""
    chars = len(text)
    words = _WORD.findall(text)
    n_words = len(words)
    digits = sum(c.isdigit() for c in text)
    non_ascii = sum(not c.isascii() for c in text)
    letters_per_word = sum(len(w) for w in words) / n_words if n_words else 0.0
    return np.array(
        (
            math.log1p(chars),
            math.log1p(n_words),
            math.log1p(text.count("\n")),
            math.log1p(len(_NUMBER.findall(text))),
            digits / chars if chars else 0.0,
            math.log1p(len(_MATH.findall(text))),
            math.log1p(len(_CODE.findall(text))),
            math.log1p(len(_LIST_ITEM.findall(text))),
            math.log1p(len(_REQUIREMENT.findall(text))),
            non_ascii / chars if chars else 0.0,
            min(text.count("?"), 5),
            min(letters_per_word, 20.0),
        ),
        dtype=np.float32,
    )
