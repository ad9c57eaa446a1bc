"""The shipped router on MT-Bench: APGR against GPT-4's judgements of a weak and a strong model.

MT-Bench's 80 questions (``lm-sys/FastChat``, ``fastchat/llm_judge/data/mt_bench/question.jsonl``)
and RouteLLM's GPT-4 judgements of Mixtral-8x7B and GPT-4 answering them
(``lm-sys/RouteLLM``, ``routellm/evals/mt_bench/judgements.jsonl``), transcribed to two small
JSONL files (``--questions``: question_id, category, turn1; ``--scores``: question_id, model,
turn, score). Neither file guided any choice of the router: it was frozen before they were read.

As RouteLLM does, a question is routed on its first turn, and a model's quality on it is the
mean judge score of its turns (``--turns 1`` for the first turn's alone). Beside the router:
the previous version (the graph's own ``p_large``), prompt length, kNN on the router's
embedding over the head's general-traffic training rows (hard = 1), each with a 95 %
bootstrap interval over questions, and random routing (the mean over 200 orders).

    python -m router_models.mtbench_eval --questions mtbench_questions.jsonl --scores mtbench_scores.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classifier import load_classifier
from router_models.data import GENERAL_TRAIN_FILES, load_general
from router_models.evaluate import knn_scores, score_texts
from router_models.head_evaluate import apgr_report
from router_models.metrics import random_summary

STRONG, WEAK = "gpt-4-1106-preview", "mixtral-8x7b-instruct-v0.1"


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quality(scores: list[dict[str, Any]], model: str, turns: int) -> dict[int, float]:
    """Per question, the mean judge score of ``model`` over its first ``turns`` turns (ratings of -1, none given, left out)."""
    by_question: dict[int, list[float]] = defaultdict(list)
    for row in scores:
        if row["model"] == model and int(row["turn"]) <= turns and float(row["score"]) >= 0:
            by_question[int(row["question_id"])].append(float(row["score"]))
    return {q: float(np.mean(v)) for q, v in by_question.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--scores", type=Path, required=True)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--turns", type=int, default=2, choices=(1, 2))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    questions = _read(args.questions)
    scores = _read(args.scores)
    strong, weak = quality(scores, STRONG, args.turns), quality(scores, WEAK, args.turns)
    rows = [q for q in questions if q["question_id"] in strong and q["question_id"] in weak]
    texts = [q["turn1"] for q in rows]
    large = np.array([strong[q["question_id"]] for q in rows])
    small = np.array([weak[q["question_id"]] for q in rows])

    router = load_classifier(args.artifacts, prefer_gpu=False)
    graph = load_classifier(args.artifacts, prefer_gpu=False, use_head=False)
    if router is None or graph is None:
        raise SystemExit(f"no classifier in {args.artifacts}")
    p, emb = score_texts(router, texts)
    p_prev, _ = score_texts(graph, texts)
    train = [r for part in load_general(("general_dev.jsonl", *GENERAL_TRAIN_FILES)).values() for r in part]
    _, train_emb = score_texts(router, [r["prompt"] for r in train])
    hard = np.array([r["label"] == "hard" for r in train], float)
    thresholds = router.config["thresholds"]["by_large_share"]
    report: dict[str, Any] = {
        "questions": len(rows),
        "turns_scored": args.turns,
        "strong": STRONG,
        "weak": WEAK,
        "strong_mean_score": round(float(large.mean()), 3),
        "weak_mean_score": round(float(small.mean()), 3),
        "router": apgr_report(p, small, large),
        "previous_version": apgr_report(p_prev, small, large),
        "prompt_length": apgr_report(np.array([len(t) for t in texts], float), small, large),
        "knn20_general_traffic": apgr_report(knn_scores(train_emb, hard, emb, 20), small, large),
        "random": random_summary(small, large),
        "routed_large_at_shipped_thresholds": {
            share: round(float((p >= float(t)).mean()), 4) for share, t in sorted(thresholds.items())
        },
        "per_category_mean_p_large": {
            c: round(float(np.mean([pi for pi, q in zip(p, rows, strict=True) if q["category"] == c])), 4)
            for c in sorted({q["category"] for q in rows})
        },
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
