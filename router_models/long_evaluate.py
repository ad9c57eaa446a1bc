"""The router on long prompts (pasted material and a request): read at both ends, or at the start.

    python -m router_models.long_evaluate --file PATH [--out bench-results/router_long.json]

``PATH``: hand-written long prompts labelled easy/hard as the general files are (fields
``prompt``, ``label``, ``layout``, ``pair``; see router_models/README.md, "Long prompts"). Beside
the router: the previous version (``--previous-artifacts``; without it, the window's start only), prompt length, kNN-20 over the
head's training prompts and random, with 95 % bootstrap intervals; per layout; and, over pairs
that share their material, how often the hard request scores above the easy one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classifier import load_classifier
from router_models.data import GENERAL_TRAIN_FILES, load_general
from router_models.evaluate import knn_scores, score_texts
from router_models.head_evaluate import auc, auc_report, emit

SHIPPED_SHARE = "0.3"


def _pairs_ranked(rows: list[dict[str, Any]], p: np.ndarray) -> float | None:
    """The share of same-material pairs whose hard request outscores the easy one (ties: half)."""
    by: dict[str, dict[str, float]] = {}
    for row, score in zip(rows, p, strict=True):
        if row.get("pair"):
            by.setdefault(row["pair"], {})[row["label"]] = float(score)
    won = [1.0 if d["hard"] > d["easy"] else 0.5 if d["hard"] == d["easy"] else 0.0 for d in by.values() if len(d) == 2]
    return round(float(np.mean(won)), 3) if won else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--data", default=None)
    ap.add_argument("--file", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--previous-artifacts", default=None, help="the router this one replaces (scored beside it)")
    args = ap.parse_args(argv)
    router = load_classifier(args.artifacts, prefer_gpu=False)
    if router is None:
        raise SystemExit(f"no classifier in {args.artifacts}")
    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    texts = [row["prompt"] for row in rows]
    y = np.array([row["label"] == "hard" for row in rows], float)
    layouts = np.array([row.get("layout") or row.get("kind") or "" for row in rows])  # test_c names kinds

    p, _ = score_texts(router, texts)
    router.read_ends = False
    p_start, _ = score_texts(router, texts)
    router.read_ends = True
    previous = load_classifier(args.previous_artifacts, prefer_gpu=False) if args.previous_artifacts else None
    p_prev = score_texts(previous, texts)[0] if previous is not None else p_start
    train = [r for part in load_general(("general_dev.jsonl", *GENERAL_TRAIN_FILES), args.data).values() for r in part]
    _, train_emb = score_texts(router, [r["prompt"] for r in train])
    _, emb = score_texts(router, texts)
    knn = knn_scores(train_emb, np.array([r["label"] == "hard" for r in train], float), emb, 20)
    length = np.array([len(t) for t in texts], float)
    random = np.random.default_rng(0).random(len(rows))
    threshold = float(router.config["thresholds"]["by_large_share"][SHIPPED_SHARE])
    scorers = {"router": p, "previous_version": p_prev, "prompt_length": length, "knn20": knn, "random": random}
    if previous is not None:
        scorers["start_only"] = p_start
    report: dict[str, Any] = {
        "file": args.file,
        "n": len(rows),
        **{name: auc_report(y, s) for name, s in scorers.items()},
        "pairs_ranked": {name: _pairs_ranked(rows, s) for name, s in scorers.items()},
        "per_layout": {
            layout: {
                "n": int((layouts == layout).sum()),
                **{name: round(auc(y[layouts == layout], s[layouts == layout]), 3) for name, s in scorers.items()},
            }
            for layout in sorted(set(layouts))
        },
        "at_shipped_threshold": {
            name: {
                "hard_to_large": round(float((s[y == 1] >= threshold).mean()), 3),
                "easy_to_large": round(float((s[y == 0] >= threshold).mean()), 3),
            }
            for name, s in (("router", p), ("previous_version", p_prev), ("start_only", p_start))
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
