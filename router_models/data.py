"""Routing training data: loading and the fixed subject-wise split.

The data (``../shared/data/routing`` relative to the repo root, or ``--data``) holds
MMLU and GSM8K prompts with whether a small (Mixtral-8x7B) and a large (GPT-4) model
answered correctly. It is never copied into the repo.

Split (fixed, documented in README.md):
- MMLU: the subjects in ``HELDOUT_SUBJECTS`` are the validation set; no question of
  those subjects is ever used for training, so the figures are for unseen subjects.
- GSM8K: one source only, so it is split by question: a stable hash of the prompt
  puts ~30% of the questions in validation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "routing"

# 12 of the 42 MMLU subjects (2,758 of 10,885 rows), picked by hand to mix STEM,
# humanities, social sciences and medicine, and to leave professional_law (14% of rows)
# in training.  Fixed: changing it changes every reported figure.
HELDOUT_SUBJECTS: tuple[str, ...] = (
    "college_chemistry",
    "econometrics",
    "electrical_engineering",
    "high_school_biology",
    "high_school_mathematics",
    "high_school_us_history",
    "jurisprudence",
    "machine_learning",
    "nutrition",
    "philosophy",
    "professional_psychology",
    "virology",
)
GSM8K_VAL_FRACTION = 0.30


class RoutingRow(TypedDict):
    """One line of ``mmlu_dev.jsonl`` / ``gsm8k_dev.jsonl``."""

    prompt: str
    source: str  # "gsm8k" or "mmlu/<subject>"
    small_correct: bool
    large_correct: bool


@dataclass
class Split:
    prompts: list[str]
    source: np.ndarray  # str objects
    small: np.ndarray  # float32 0/1
    large: np.ndarray  # float32 0/1

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, mask: np.ndarray) -> Split:
        idx = np.flatnonzero(mask)
        return Split([self.prompts[i] for i in idx], self.source[idx], self.small[idx], self.large[idx])

    @property
    def is_gsm8k(self) -> np.ndarray:
        mask: np.ndarray = self.source == "gsm8k"
        return mask


def _read(path: Path) -> list[RoutingRow]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _gsm8k_is_val(prompt: str) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return (h % 10_000) < GSM8K_VAL_FRACTION * 10_000


def load_all(data_dir: str | Path | None = None) -> tuple[Split, np.ndarray]:
    """All rows, plus a boolean mask: True for validation rows."""
    d = Path(data_dir) if data_dir else DEFAULT_DATA
    rows = _read(d / "mmlu_dev.jsonl") + _read(d / "gsm8k_dev.jsonl")
    held = {f"mmlu/{s}" for s in HELDOUT_SUBJECTS}
    val = np.array(
        [(r["source"] in held) if r["source"] != "gsm8k" else _gsm8k_is_val(r["prompt"]) for r in rows],
        dtype=bool,
    )
    split = Split(
        prompts=[r["prompt"] for r in rows],
        source=np.array([r["source"] for r in rows], dtype=object),
        small=np.array([r["small_correct"] for r in rows], dtype=np.float32),
        large=np.array([r["large_correct"] for r in rows], dtype=np.float32),
    )
    return split, val


def load_splits(data_dir: str | Path | None = None) -> tuple[Split, Split]:
    """(train, validation)."""
    allrows, val = load_all(data_dir)
    return allrows.subset(~val), allrows.subset(val)


# ---------------------------------------------------------------- the routing head's data
# The routing head (gateway/classifier/head.py) is fitted on the graph's outputs, so its
# final test rows must be ones the graph never trained on either: half of the subjects the
# graph held out, and half of its GSM8K validation questions. Fixed before any figure of
# the head was looked at; the other halves are development data.
HEAD_TEST_SUBJECTS: tuple[str, ...] = HELDOUT_SUBJECTS[1::2]
PROJECT_DATA = REPO_ROOT / "router_models" / "data" / "routing"
GENERAL_LONG_TRAIN_FILES: tuple[str, ...] = (
    "general_long_dev.jsonl",  # it chose how a long prompt is read; training data since
    *(f"general_long_train_{c}.jsonl" for c in "abcde"),
)
GENERAL_TRAIN_FILES: tuple[str, ...] = (
    *(f"general_train_{c}.jsonl" for c in "abcdefghijkl"),
    *GENERAL_LONG_TRAIN_FILES,
)
GENERAL_TEST_FILE = "general_test.jsonl"


class GeneralRow(TypedDict):
    """One hand-labelled prompt of general traffic (see data/routing/README.md)."""

    id: str
    category: str
    prompt: str
    label: str  # "easy" | "hard"
    why: str


def gsm8k_is_head_test(prompt: str) -> bool:
    """Half of the graph's GSM8K validation questions: the routing head's final test rows."""
    h = int.from_bytes(hashlib.sha256(("final:" + prompt).encode()).digest()[:8], "big")
    return _gsm8k_is_val(prompt) and h % 2 == 0


def is_head_test(source: str, prompt: str) -> bool:
    if source == "gsm8k":
        return gsm8k_is_head_test(prompt)
    return source.removeprefix("mmlu/") in HEAD_TEST_SUBJECTS


def load_general(files: tuple[str, ...], data_dir: str | Path | None = None) -> dict[str, list[GeneralRow]]:
    """Rows per file; ``general_dev.jsonl`` is read from the shared data folder, the rest from the project's."""
    out: dict[str, list[GeneralRow]] = {}
    for name in files:
        folder = Path(data_dir) if data_dir and name == "general_dev.jsonl" else DEFAULT_DATA
        path = folder / name if name == "general_dev.jsonl" else PROJECT_DATA / name
        if path.is_file():
            out[name] = [json.loads(line) for line in path.open() if line.strip()]
    return out
