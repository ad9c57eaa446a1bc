"""Final figures of the shipped router (graph + routing head) on data that never touched it.

    python -m router_models.head_evaluate --artifacts gateway/classifier/artifacts --final \
        --out bench-results/router_final.json

Test sets (read nowhere else): ``general_test.jsonl`` (hand-written general traffic, ROC AUC
hard vs easy), the MMLU subjects in ``data.HEAD_TEST_SUBJECTS`` and the GSM8K questions of
``data.gsm8k_is_head_test`` (APGR). Beside the router: the previous version (the graph's own
``p_large``), prompt length, kNN on the router's embedding (over the head's training rows) and
random, each with a 95 % bootstrap interval. Then the share of large calls on the unseen
traffic: at the shipped thresholds (calibrated on out-of-file scores of the training prompts), and with ``target_large_share``
(the gateway's LargeShareTracker fed the unseen prompts in a shuffled stream).

``--final`` is required: the figures are meant to be computed once, after every choice is made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classifier import load_classifier
from gateway.large_share import LargeShareTracker
from gateway.store.memory import MemoryKeyValue
from router_models.data import GENERAL_TEST_FILE, GENERAL_TRAIN_FILES, is_head_test, load_all, load_general
from router_models.evaluate import knn_scores, score_texts
from router_models.metrics import apgr, apgr_interval, cpt

RESAMPLES = 1000
SHARES = (0.2, 0.3, 0.5)


def emit(report: Any, out: str | None) -> None:
    """Print a report as JSON, and write it to ``out`` (a bench-results file) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of ``s`` for y=1 vs y=0 (ties count half)."""
    y = np.asarray(y, bool)
    r = _average_ranks(np.asarray(s, float))
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    _, inverse = np.unique(s, return_inverse=True)
    out: np.ndarray = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    return out


def _interval(stat: Callable[[np.ndarray], float], n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(RESAMPLES):
        try:
            values.append(stat(rng.integers(0, n, n)))
        except (ZeroDivisionError, FloatingPointError, ValueError):
            continue
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def auc_report(y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    def stat(i: np.ndarray) -> float:
        if y[i].min() == y[i].max():
            raise ValueError("one class")
        return auc(y[i], s[i])

    return {"auc": round(auc(y, s), 4), "ci95": _interval(stat, len(y))}


def apgr_report(s: np.ndarray, small: np.ndarray, large: np.ndarray) -> dict[str, Any]:
    return {
        "apgr": round(apgr(s, small, large), 4),
        "ci95": apgr_interval(s, small, large, RESAMPLES),
        "cpt50": round(cpt(s, small, large, 0.5), 4),
    }


def _share_stream(p: np.ndarray, target: float, configured: float, seed: int = 0) -> dict[str, float]:
    """Feed the scores to the gateway's tracker in a shuffled stream; the share routed large."""
    order = np.random.default_rng(seed).permutation(len(p))

    async def run() -> list[bool]:
        tracker = LargeShareTracker(MemoryKeyValue())
        sent: list[bool] = []
        for i in order:
            t = tracker.threshold("eval", "auto", target, configured)
            sent.append(bool(p[i] >= t))
            tracker.observe("eval", "auto", float(p[i]), target, configured)
            await asyncio.sleep(0)
        await tracker.aclose()
        return sent

    sent = np.array(asyncio.run(run()))
    half = len(sent) // 2
    return {"all": round(float(sent.mean()), 4), "second_half": round(float(sent[half:].mean()), 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--data", default=None)
    ap.add_argument("--final", action="store_true", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--general-file",
        default=GENERAL_TEST_FILE,
        help="the held-out general-traffic file under data/routing (general_test_b.jsonl: written after the head was frozen)",
    )
    args = ap.parse_args(argv)

    router = load_classifier(args.artifacts, prefer_gpu=False)
    graph = load_classifier(args.artifacts, prefer_gpu=False, use_head=False)
    if router is None or graph is None:
        raise SystemExit(f"no classifier in {args.artifacts}")
    rng = np.random.default_rng(0)

    # training rows: the kNN baseline's memory
    train_general = [
        r for rows in load_general(("general_dev.jsonl", *GENERAL_TRAIN_FILES), args.data).values() for r in rows
    ]
    bench, _ = load_all(args.data)
    test_mask = np.array([is_head_test(str(s), p) for s, p in zip(bench.source, bench.prompts, strict=True)])
    g_texts = [r["prompt"] for r in train_general]
    g_hard = np.array([r["label"] == "hard" for r in train_general], float)
    _, g_emb = score_texts(router, g_texts)
    b_train = bench.subset(~test_mask)
    _, b_emb = score_texts(router, b_train.prompts)
    shipped = router.config["thresholds"]["by_large_share"]
    thresholds = {s: float(shipped[f"{s:.1f}"]) for s in SHARES}

    report: dict[str, Any] = {
        "general_file": args.general_file,
        "shipped_thresholds": {str(s): round(t, 4) for s, t in thresholds.items()},
    }
    unseen_p: list[np.ndarray] = []

    # general traffic
    test = load_general((args.general_file,))[args.general_file]
    texts = [r["prompt"] for r in test]
    y = np.array([r["label"] == "hard" for r in test], float)
    cats = np.array([r["category"] for r in test])
    p, emb = score_texts(router, texts)
    p_prev, _ = score_texts(graph, texts)
    unseen_p.append(p)
    length = np.array([len(t) for t in texts], float)
    knn = knn_scores(g_emb, g_hard, emb, 20)
    general: dict[str, Any] = {
        "n": len(y),
        "router": auc_report(y, p),
        "previous_version": auc_report(y, p_prev),
        "prompt_length": auc_report(y, length),
        "knn20": auc_report(y, knn),
        "random": auc_report(y, rng.random(len(y))),
        "per_category": {
            c: {
                "n": int((cats == c).sum()),
                "router": round(auc(y[cats == c], p[cats == c]), 3),
                "knn20": round(auc(y[cats == c], knn[cats == c]), 3),
            }
            for c in sorted(set(cats))
        },
        "at_threshold": {
            str(s): {
                "hard_to_large": round(float((p[y == 1] >= t).mean()), 4),
                "easy_to_large": round(float((p[y == 0] >= t).mean()), 4),
            }
            for s, t in thresholds.items()
        },
    }
    report["general_traffic"] = general

    # benchmarks
    gain_train = b_train.large - b_train.small
    is_gsm8k = bench.source == "gsm8k"
    for family, kind in (("mmlu_unseen_subjects", ~is_gsm8k), ("gsm8k_unseen_questions", is_gsm8k)):
        mask = test_mask & kind
        part = bench.subset(mask)
        p, emb = score_texts(router, part.prompts)
        p_prev, _ = score_texts(graph, part.prompts)
        unseen_p.append(p)
        knn = knn_scores(b_emb, gain_train, emb, 50)
        length = np.array([len(t) for t in part.prompts], float)
        out: dict[str, Any] = {
            "n": len(part),
            "small_accuracy": round(float(part.small.mean()), 4),
            "large_accuracy": round(float(part.large.mean()), 4),
            "router": apgr_report(p, part.small, part.large),
            "previous_version": apgr_report(p_prev, part.small, part.large),
            "prompt_length": apgr_report(length, part.small, part.large),
            "knn50": apgr_report(knn, part.small, part.large),
            "random": apgr_report(rng.random(len(part)), part.small, part.large),
        }
        if family.startswith("mmlu"):
            out["per_subject"] = {}
            for subject in sorted(set(part.source)):
                k = part.source == subject
                out["per_subject"][str(subject)] = {
                    "n": int(k.sum()),
                    "gap": round(float(part.large[k].mean() - part.small[k].mean()), 3),
                    "router": round(apgr(p[k], part.small[k], part.large[k]), 3),
                    "previous_version": round(apgr(p_prev[k], part.small[k], part.large[k]), 3),
                    "mean_p_large": round(float(p[k].mean()), 3),
                }
        out["share_at_threshold"] = {str(s): round(float((p >= t).mean()), 4) for s, t in thresholds.items()}
        report[family] = out
    report["general_traffic"]["share_at_threshold"] = {
        str(s): round(float((unseen_p[0] >= t).mean()), 4) for s, t in thresholds.items()
    }

    # the share on unseen traffic with target_large_share: all unseen prompts, shuffled
    stream = np.concatenate(unseen_p)
    report["target_large_share_stream"] = {
        "n": len(stream),
        "note": "the gateway's LargeShareTracker (window 250, update every 50, steps of 5 points or half the gap) over the unseen prompts in random order, starting from the shipped threshold",
        **{str(s): _share_stream(stream, s, thresholds[s]) for s in SHARES},
        "fixed_threshold": {str(s): round(float((stream >= t).mean()), 4) for s, t in thresholds.items()},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
