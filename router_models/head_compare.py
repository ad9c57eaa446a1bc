"""Two routers on one hand-labelled file: each one's AUC and the paired bootstrap of the difference.

    python -m router_models.head_compare --file router_models/data/routing/general_test_d.jsonl \
        --previous-artifacts /tmp/previous_artifacts --artifacts gateway/classifier/artifacts

A refit is shipped on a rule written down before its test file is read (for instance "at least
the previous head's AUC minus 0.01"); the interval of the difference says how much of a move is
noise. Both routers score the same prompts, so the prompts are resampled together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classifier import load_classifier
from router_models.evaluate import score_texts
from router_models.head_evaluate import RESAMPLES, auc, emit


def compare(file: Path, previous: str, current: str, seed: int = 0) -> dict[str, Any]:
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    texts = [row["prompt"] for row in rows]
    hard = np.array([row["label"] == "hard" for row in rows])
    scores = []
    for artifacts in (previous, current):
        router = load_classifier(artifacts, prefer_gpu=False)
        if router is None:
            raise SystemExit(f"no classifier in {artifacts}")
        scores.append(np.asarray(score_texts(router, texts)[0], float))
    before, after = scores
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(RESAMPLES):
        pick = rng.integers(0, len(hard), len(hard))
        if hard[pick].all() or not hard[pick].any():
            continue
        differences.append(auc(hard[pick], after[pick]) - auc(hard[pick], before[pick]))
    return {
        "file": file.name,
        "n": len(rows),
        "previous_auc": round(auc(hard, before), 4),
        "auc": round(auc(hard, after), 4),
        "difference": round(auc(hard, after) - auc(hard, before), 4),
        "difference_ci95": [round(float(np.percentile(differences, q)), 4) for q in (2.5, 97.5)],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True, type=Path, action="append", help="a labelled file (repeatable)")
    ap.add_argument("--previous-artifacts", required=True)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report = [compare(file, args.previous_artifacts, args.artifacts) for file in args.file]
    emit(report, args.out)


if __name__ == "__main__":
    main()
