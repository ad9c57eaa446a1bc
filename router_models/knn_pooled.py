"""Development check: does a kNN over every other subject's labels add to the graph, scored pooled?

    python -m router_models.knn_pooled --artifacts gateway/classifier/artifacts

Earlier kNN checks were means of per-subject APGRs; the outside MMLU figure is one APGR pooled
over its subjects, which also rewards ranking whole subjects by their gain, and a kNN over
labelled neighbours is a subject-level prior with labels. Scored on the graph's usable
development subjects only (held out by the graph, not the head's test subjects, labels not
broken), each against a bank of every other non-test subject's rows (leave one subject out),
with a paired bootstrap of the difference to the graph alone. Test subjects are never scored.
Results: router_models/README.md, "kNN prior, pooled".
"""

from __future__ import annotations

import argparse

import numpy as np

from gateway.classifier import load_classifier
from router_models.data import HEAD_TEST_SUBJECTS, HELDOUT_SUBJECTS, load_all
from router_models.evaluate import knn_scores, score_texts
from router_models.metrics import apgr
from router_models.subject_prior import BROKEN_LABELS

_KS = (20, 50, 100, 200, 500)
_WEIGHTS = (0.25, 0.5)
_RESAMPLES = 500


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r / len(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)

    rows, _ = load_all(args.data)
    unusable = {f"mmlu/{s}" for s in (*HEAD_TEST_SUBJECTS, *BROKEN_LABELS)}
    rows = rows.subset(np.array([s.startswith("mmlu/") and s not in unusable for s in rows.source]))
    dev = [f"mmlu/{s}" for s in HELDOUT_SUBJECTS if f"mmlu/{s}" not in unusable]
    graph = load_classifier(args.artifacts, prefer_gpu=False, use_head=False)
    if graph is None:
        raise SystemExit(f"no classifier in {args.artifacts}")
    p_graph, emb = score_texts(graph, rows.prompts)
    needed = ((rows.large == 1) & (rows.small == 0)).astype(np.float64)
    gain = (rows.large - rows.small).astype(np.float64)

    q = np.flatnonzero(np.isin(rows.source, dev))
    small, large, base = rows.small[q], rows.large[q], p_graph[q]
    scorers: dict[str, np.ndarray] = {"graph": base}
    for k in _KS:
        for name, target in (("gain", gain), ("needed", needed)):
            s = np.zeros(len(q))
            for subject in dev:
                mine = rows.source[q] == subject
                bank = rows.source != subject
                s[mine] = knn_scores(emb[bank], target[bank], emb[q[mine]], k)
            scorers[f"knn{k} {name}"] = s
            if name == "needed":
                for w in _WEIGHTS:
                    scorers[f"graph + knn{k} {name}, rank w {w}"] = (1 - w) * _rank(base) + w * _rank(s)

    rng = np.random.default_rng(0)
    boots = [rng.integers(0, len(q), len(q)) for _ in range(_RESAMPLES)]
    base_boot = [apgr(base[b], small[b], large[b]) for b in boots]
    print(
        f"{len(dev)} development subjects, {len(q)} rows, pooled APGR; difference to the graph, 95 % paired bootstrap"
    )
    for name, s in scorers.items():
        diff = np.array([apgr(s[b], small[b], large[b]) for b in boots]) - base_boot
        lo, hi = np.percentile(diff, [2.5, 97.5])
        print(f"{name:36s} {apgr(s, small, large):.3f}  {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
