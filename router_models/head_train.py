"""Fit the routing head (gateway/classifier/head.py) on the shipped graph's outputs.

    python -m router_models.head_train --artifacts gateway/classifier/artifacts

Training rows: the hand-labelled general prompts (``general_dev.jsonl`` from the shared
data plus ``general_train_*.jsonl``; label hard/easy), and the MMLU/GSM8K rows that are not
the head's final test (``data.is_head_test``; for the gate, which tells the three kinds of
request apart, and for the novelty reference). ``general_test.jsonl`` and the test subjects
are never read here.

It prints development figures: the general head scored on each general file by a head
fitted without that file (leave one writer out), overall and per category. Those
out-of-file scores also give the shipped share -> threshold table (``thresholds`` in
``config.json``): quantiles of scores the head produced on prompts it had not seen.
Writes ``routing_head.npz`` into the artifacts and records it (file, sha256, how it was
fitted) in their ``config.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.classifier import load_classifier
from gateway.classifier.batch import threshold_for_share
from gateway.classifier.features import NAMES
from gateway.classifier.head import RoutingHead
from gateway.inference import sha256_file
from router_models.data import GENERAL_TRAIN_FILES, is_head_test, load_all, load_general
from router_models.evaluate import score_all

HEAD_FILE = "routing_head.npz"
FEATURE_SCALE = 0.2  # surface features (standardized) count for less than the embedding's 384 coordinates
GENERAL_C = (
    10.0  # leave-one-writer-out AUC 0.904 (C=1), 0.914 (3), 0.920 (10), 0.921 (30): chosen on the training files only
)
GATE_C = 1.0
BENCH_REFERENCE = 2000  # MMLU rows kept as novelty references (the general and GSM8K rows are all kept)
NOVELTY_PERCENTILES = (0.5, 5.0)  # of held-out-writer general prompts' nearest similarity: full lift, no lift
NOVELTY_LIFT = 0.5
LONG_WEIGHT = 3.0  # a long prompt's weight in the long head's fit (short ones: 1); leave-one-writer-out,
# mean AUC over the four long files: 0.73 (1), 0.74 (2), 0.75 (3), 0.76 (5), short files 0.930-0.928


@dataclass
class Rows:
    texts: list[str]
    embedding: np.ndarray
    p_graph: np.ndarray
    features: np.ndarray
    long: np.ndarray  # the text filled the encoder's window (read at both ends)
    kind: np.ndarray  # 0 general, 1 multiple-choice knowledge (MMLU), 2 math word problem (GSM8K)
    hard: np.ndarray  # general rows: 1 hard / 0 easy; benchmark rows: small wrong and large right
    group: np.ndarray  # general rows: the file they came from; benchmark rows: their source
    category: np.ndarray


def collect(artifacts: str, data_dir: str | None) -> Rows:
    clf = load_classifier(artifacts, prefer_gpu=False, use_head=False)
    if clf is None:
        raise SystemExit(f"no classifier in {artifacts}")
    clf.with_features = True  # of the text the window reads, as served (a long prompt's two ends)
    texts: list[str] = []
    kind: list[int] = []
    hard: list[float] = []
    group: list[str] = []
    category: list[str] = []
    for name, rows in load_general(("general_dev.jsonl", *GENERAL_TRAIN_FILES), data_dir).items():
        for r in rows:
            texts.append(r["prompt"])
            kind.append(0)
            hard.append(float(r["label"] == "hard"))
            group.append(name)
            category.append(r["category"])
    bench, _ = load_all(data_dir)
    for i, prompt in enumerate(bench.prompts):
        source = str(bench.source[i])
        if is_head_test(source, prompt):
            continue
        texts.append(prompt)
        kind.append(2 if source == "gsm8k" else 1)
        hard.append(float(bench.small[i] == 0 and bench.large[i] == 1))
        group.append(source)
        category.append("gsm8k" if source == "gsm8k" else "mmlu")
    scores = score_all(clf, texts)
    return Rows(
        texts=texts,
        embedding=np.stack([s.embedding for s in scores]).astype(np.float32),
        p_graph=np.array([s.p_large for s in scores], dtype=np.float32),
        features=np.stack([s.features for s in scores if s.features is not None]),
        long=np.array([s.truncated for s in scores]),
        kind=np.array(kind),
        hard=np.array(hard),
        group=np.array(group),
        category=np.array(category),
    )


def fit(rows: Rows, train: np.ndarray, seed: int = 0) -> RoutingHead:
    """A head fitted on the rows in ``train`` (a boolean mask)."""
    from sklearn.linear_model import LogisticRegression

    mean = rows.features[train].mean(0)
    std = np.maximum(rows.features[train].std(0), 1e-6)
    x = np.hstack([rows.embedding, FEATURE_SCALE * (rows.features - mean) / std]).astype(np.float32)
    # the gate: every kind weighs the same in total, whatever its row count
    counts = np.bincount(rows.kind[train], minlength=3).astype(float)
    weight = (len(rows.kind[train]) / (3 * np.maximum(counts, 1)))[rows.kind[train]]
    gate = LogisticRegression(C=GATE_C, max_iter=5000).fit(x[train], rows.kind[train], sample_weight=weight)
    general = train & (rows.kind == 0)
    short = general & ~rows.long
    head_lr = LogisticRegression(C=GENERAL_C, max_iter=5000).fit(x[short], rows.hard[short])
    long_lr = LogisticRegression(C=GENERAL_C, max_iter=5000).fit(
        x[general], rows.hard[general], sample_weight=np.where(rows.long[general], LONG_WEIGHT, 1.0)
    )

    rng = np.random.default_rng(seed)
    mmlu = np.flatnonzero(train & (rows.kind == 1))
    keep = np.concatenate(
        [np.flatnonzero(train & (rows.kind != 1)), rng.choice(mmlu, min(BENCH_REFERENCE, len(mmlu)), replace=False)]
    )
    reference = rows.embedding[np.sort(keep)]
    low, high = _novelty_bounds(rows, general, reference)
    return RoutingHead(
        feature_mean=mean.astype(np.float32),
        feature_std=std.astype(np.float32),
        feature_scale=FEATURE_SCALE,
        gate_weight=gate.coef_.astype(np.float32),
        gate_bias=gate.intercept_.astype(np.float32),
        general_weight=head_lr.coef_[0].astype(np.float32),
        general_bias=float(head_lr.intercept_[0]),
        reference=reference.astype(np.float32),
        novelty_low=low,
        novelty_high=high,
        novelty_lift=NOVELTY_LIFT,
        long_weight=long_lr.coef_[0].astype(np.float32),
        long_bias=float(long_lr.intercept_[0]),
    )


def _novelty_bounds(rows: Rows, general: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """How close a prompt by a writer the head never saw comes to the rest: each general
    file's prompts against the other files' (their own file left out of the reference)."""
    nearest: list[np.ndarray] = []
    for name in np.unique(rows.group[general]):
        own = general & (rows.group == name)
        others = rows.embedding[general & ~own]
        nearest.append((rows.embedding[own] @ others.T).max(1))
    sims = np.concatenate(nearest)
    low, high = np.percentile(sims, NOVELTY_PERCENTILES)
    return float(low), float(high)


def leave_one_writer_out(rows: Rows) -> tuple[dict[str, Any], np.ndarray]:
    """Development figures, and each general prompt's score by a head that never saw its file."""
    from sklearn.metrics import roc_auc_score

    general = rows.kind == 0
    score = np.zeros(len(rows.texts))
    for name in np.unique(rows.group[general]):
        own = rows.group == name
        head = fit(rows, ~own)
        score[own] = head.p_large(rows.embedding[own], rows.p_graph[own], rows.features[own], rows.long[own])
    y, s = rows.hard[general], score[general]
    out: dict[str, Any] = {"auc": round(float(roc_auc_score(y, s)), 4), "n": int(general.sum())}
    out["graph_auc"] = round(float(roc_auc_score(y, rows.p_graph[general])), 4)
    out["length_auc"] = round(float(roc_auc_score(y, rows.features[general, 0])), 4)
    out["per_file"] = {
        str(g): round(float(roc_auc_score(rows.hard[rows.group == g], score[rows.group == g])), 4)
        for g in np.unique(rows.group[general])
    }
    long = rows.long[general]
    out["long_prompts"] = {"n": int(long.sum()), "auc": round(float(roc_auc_score(y[long], s[long])), 4)}
    out["short_prompts"] = {"n": int((~long).sum()), "auc": round(float(roc_auc_score(y[~long], s[~long])), 4)}
    category = rows.category[general]
    out["per_category"] = {  # the categories with both labels (the long files name many domains)
        str(c): round(float(roc_auc_score(y[category == c], s[category == c])), 4)
        for c in np.unique(category)
        if len(np.unique(y[category == c])) == 2 and (category == c).sum() >= 10
    }
    return out, s


def record(
    artifacts: Path, head: RoutingHead, rows: Rows, train: np.ndarray, cv: dict[str, Any], unseen: np.ndarray
) -> None:
    path = artifacts / HEAD_FILE
    head.save(path)
    config_path = artifacts / "config.json"
    config = json.loads(config_path.read_text())
    config["files"]["head"] = HEAD_FILE
    config["sha256"][HEAD_FILE] = sha256_file(path)
    config["score"] = (
        "p_large from the routing head (gateway/classifier/head.py): gate over general traffic / "
        "multiple-choice knowledge / math word problems; general traffic scored by a logistic head on "
        "embedding + surface features, the others by the graph's own p_large; lifted toward large for "
        "prompts far from the head's training data"
    )
    config["head"] = {
        "features": list(NAMES),
        "feature_scale": FEATURE_SCALE,
        "general_c": GENERAL_C,
        "long_head": {
            "weight_of_long_prompts": LONG_WEIGHT,
            "long_prompts": int((train & (rows.kind == 0) & rows.long).sum()),
        },
        "gate_c": GATE_C,
        "novelty": {
            "low": head.novelty_low,
            "high": head.novelty_high,
            "lift": head.novelty_lift,
            "references": len(head.reference),
        },
        "train_rows": {
            "general": int((train & (rows.kind == 0)).sum()),
            "mmlu": int((train & (rows.kind == 1)).sum()),
            "gsm8k": int((train & (rows.kind == 2)).sum()),
        },
        "general_files": sorted({str(g) for g in rows.group[rows.kind == 0]}),
        "train_command": "python -m router_models.head_train --artifacts gateway/classifier/artifacts",
    }
    config["head"]["development_leave_one_writer_out"] = cv
    config["thresholds"] = {
        "by_large_share": {
            f"{share:.1f}": round(threshold_for_share(unseen, share), 6) for share in np.arange(0.1, 0.95, 0.1)
        },
        "sample": f"{len(unseen)} hand-labelled general prompts, each scored by a head fitted without its file",
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--data", default=None, help="the shared routing data folder (default ../shared/data/routing)")
    args = ap.parse_args(argv)
    rows = collect(args.artifacts, args.data)
    cv, unseen = leave_one_writer_out(rows)
    print(json.dumps(cv, indent=2))
    train = np.ones(len(rows.texts), dtype=bool)
    record(Path(args.artifacts), fit(rows, train), rows, train, cv, unseen)
    print(f"wrote {Path(args.artifacts) / HEAD_FILE}")


if __name__ == "__main__":
    main()
