"""Evaluate the exported router on the held-out split, RouteLLM style, against random
routing and a kNN baseline on the same embeddings; draw the figure; store metrics and
share->threshold calibration in ``artifacts/config.json``.

    python -m router_models.evaluate --artifacts gateway/classifier/artifacts

Runs the ONNX artifact through the serving code (gateway.classifier), so the figures are
for exactly what is shipped.  Needs numpy, onnxruntime, tokenizers; matplotlib for the figure;
torch + transformers only for ``--teacher`` (embedding fidelity against the base model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from gateway.classifier import Classifier, RouterScore, load_classifier, select_text
from gateway.classifier.batch import threshold_for_share
from router_models.data import HELDOUT_SUBJECTS, Split, load_splits
from router_models.metrics import apgr_interval, oracle_summary, pgr_curve, summary

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Message = dict[str, str]  # {"role": ..., "content": ...}
CurveLines = dict[str, tuple[np.ndarray, np.ndarray, float]]  # name -> (share of large calls, accuracy, APGR)
Curve = tuple[CurveLines, float, float]  # (lines, accuracy of the small model, of the large model)


def score_all(clf: Classifier, texts: list[str], batch: int = 32) -> list[RouterScore]:
    # sort by length so batches pad little; restore order after
    order = np.argsort([len(t) for t in texts])
    out: list[RouterScore | None] = [None] * len(texts)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        for j, score in zip(idx, clf.score_batch_sync([texts[j] for j in idx]), strict=True):
            out[j] = score
    return [score for score in out if score is not None]


def score_texts(clf: Classifier, texts: list[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    scores = score_all(clf, texts, batch)
    if not scores:
        return np.zeros(0), np.zeros((0, int(clf.config.get("embedding_dim", 384))), dtype=np.float32)
    p = np.array([s.p_large for s in scores], dtype=np.float64)
    emb = np.stack([s.embedding for s in scores]).astype(np.float32)
    return p, emb


def knn_scores(train_emb: np.ndarray, train_gain: np.ndarray, query_emb: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(len(query_emb))
    for i in range(0, len(query_emb), 512):
        sims = query_emb[i : i + 512] @ train_emb.T
        idx = np.argpartition(-sims, k, axis=1)[:, :k]
        out[i : i + 512] = train_gain[idx].mean(1)
    return out


def constant(n: int) -> np.ndarray:
    return np.zeros(n)  # all tied: the expected curve of random routing


def conversations(prompts: list[str], seed: int = 0) -> list[list[Message]]:
    """Synthetic multi-turn conversations whose LAST user turn is the labelled prompt."""
    rng = random.Random(seed)
    system = (
        "You are a helpful, careful assistant. Answer accurately and concisely. "
        "If the question is multiple choice, reply with the letter of the answer."
    )
    convs: list[list[Message]] = []
    for p in prompts:
        prev = [rng.choice(prompts) for _ in range(2)]
        convs.append(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": prev[0]},
                {"role": "assistant", "content": "The answer is B. It follows from the definitions given."},
                {"role": "user", "content": prev[1]},
                {"role": "assistant", "content": "Sure. The answer is C."},
                {"role": "user", "content": p},
            ]
        )
    return convs


def text_selection_experiment(clf: Classifier, val: Split, n: int = 1200) -> dict[str, float]:
    rng = np.random.default_rng(0)
    idx = rng.choice(len(val), size=min(n, len(val)), replace=False)
    prompts = [val.prompts[i] for i in idx]
    s, l = val.small[idx], val.large[idx]  # noqa: E741 - small/large, as in the papers' notation
    convs = conversations(prompts)

    def join(ms: list[Message]) -> str:
        return "\n".join(m["content"] for m in ms)

    variants = {
        "last_user_turn (select_text)": [select_text(c) for c in convs],
        "system + last user turn": [c[0]["content"] + "\n" + c[-1]["content"] for c in convs],
        "whole conversation, head": [join(c) for c in convs],
        "whole conversation, tail (last 1500 chars)": [join(c)[-1500:] for c in convs],
        "all user turns": [join([m for m in c if m["role"] == "user"]) for c in convs],
    }
    res: dict[str, float] = {}
    for name, texts in variants.items():
        p, _ = score_texts(clf, texts)
        res[name] = summary(p, s, l)["apgr"]
    return res


def teacher_fidelity(val_prompts: list[str], emb: np.ndarray) -> dict[str, float]:
    """Cosine to the unmodified all-MiniLM-L6-v2 embedding (128 tokens) and kNN agreement."""
    import torch

    from router_models.model import RouterNet
    from router_models.train import embed_all, encode, make_tokenizer

    torch.set_num_threads(2)
    t = embed_all(RouterNet(layers=6, families=1), encode(make_tokenizer(128), val_prompts))
    cos = (t * emb).sum(1)
    k = 10
    st = t @ t.T
    se = emb @ emb.T
    np.fill_diagonal(st, -2)
    np.fill_diagonal(se, -2)
    nt = np.argpartition(-st, k, axis=1)[:, :k]
    ne = np.argpartition(-se, k, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(nt, ne, strict=False)])
    return {
        "cosine_to_base_mean": round(float(cos.mean()), 4),
        "cosine_to_base_p5": round(float(np.percentile(cos, 5)), 4),
        "top10_neighbour_overlap": round(float(overlap), 4),
    }


def plot(curves: dict[str, Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (title, (lines, q_small, q_large)) in zip(np.atleast_1d(axes), curves.items(), strict=False):
        for name, (x, y, apgr) in lines.items():
            ax.plot(x * 100, y * 100, label=f"{name} (APGR {apgr:.3f})", lw=1.6 if name == "router" else 1.1)
        ax.axhline(q_small * 100, color="grey", ls=":", lw=1)
        ax.axhline(q_large * 100, color="grey", ls="--", lw=1)
        ax.text(1, q_small * 100 + 0.3, "small only", color="grey", fontsize=8)
        ax.text(1, q_large * 100 + 0.3, "large only", color="grey", fontsize=8)
        ax.set_xlabel("share of calls sent to the large model (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="gateway/classifier/artifacts")
    ap.add_argument("--data", default=None)
    ap.add_argument("--variant", default=None, help="model file key (default: the CPU variant)")
    ap.add_argument("--knn-k", type=int, default=50)
    ap.add_argument("--figure", default="router_models/apgr.png")
    ap.add_argument("--teacher", action="store_true", help="also measure embedding fidelity vs the base model (torch)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update config.json")
    ap.add_argument("--text-selection", action="store_true", help="also run the text-selection experiment")
    args = ap.parse_args(argv)

    art = Path(args.artifacts)
    clf = load_classifier(art, prefer_gpu=False, variant=args.variant)
    if clf is None:
        raise SystemExit(f"could not load the classifier from {art}")
    train, val = load_splits(args.data)
    t0 = time.time()
    p_val, e_val = score_texts(clf, val.prompts)
    p_tr, e_tr = score_texts(clf, train.prompts)
    print(f"scored {len(val) + len(train)} prompts in {time.time() - t0:.0f}s ({clf.model_file})", flush=True)
    knn = knn_scores(e_tr, train.large - train.small, e_val, args.knn_k)

    metrics: dict[str, Any] = {"split": {"heldout_mmlu_subjects": list(HELDOUT_SUBJECTS), "gsm8k_val_fraction": 0.3}}
    curves: dict[str, Curve] = {}
    for name, m in (("mmlu_heldout", ~val.is_gsm8k), ("gsm8k_heldout", val.is_gsm8k)):
        s, l = val.small[m], val.large[m]  # noqa: E741 - small/large, as in the papers' notation
        lengths = np.array([len(val.prompts[i]) for i in np.flatnonzero(m)], dtype=float)
        res = {
            "router": summary(p_val[m], s, l) | {"apgr_ci95": apgr_interval(p_val[m], s, l)},
            "knn": summary(knn[m], s, l) | {"apgr_ci95": apgr_interval(knn[m], s, l)},
            "prompt_length": summary(lengths, s, l),  # longer = harder: the simplest baseline
            "random": summary(constant(int(m.sum())), s, l),
            "oracle": oracle_summary(s, l),
            "rows": int(m.sum()),
            "acc_small": round(float(s.mean()), 4),
            "acc_large": round(float(l.mean()), 4),
        }
        metrics[name] = res
        lines: CurveLines = {}
        for key, sc in (("router", p_val[m]), (f"kNN (k={args.knn_k})", knn[m]), ("random", constant(int(m.sum())))):
            x, pgr = pgr_curve(sc, s, l)
            acc = s.mean() + pgr * (l.mean() - s.mean())
            lines[key] = (x, acc, float(np.trapezoid(pgr, x)))
        title = (
            f"held-out MMLU ({len(HELDOUT_SUBJECTS)} unseen subjects, n={int(m.sum())})"
            if name == "mmlu_heldout"
            else f"held-out GSM8K (n={int(m.sum())})"
        )
        curves[title] = (lines, float(s.mean()), float(l.mean()))
    # per held-out subject (router vs kNN): how uneven it is
    per = {}
    for subj in HELDOUT_SUBJECTS:
        m = val.source == f"mmlu/{subj}"
        per[subj] = {
            "router": summary(p_val[m], val.small[m], val.large[m])["apgr"],
            "knn": summary(knn[m], val.small[m], val.large[m])["apgr"],
            "n": int(m.sum()),
        }
    metrics["per_subject_apgr"] = per
    all_p = np.concatenate([p_tr, p_val])
    thresholds = {f"{s:.1f}": round(threshold_for_share(all_p, s), 6) for s in SHARES}
    if args.text_selection:
        metrics["text_selection_apgr"] = text_selection_experiment(clf, val)
    if args.teacher:
        metrics["embedding_fidelity"] = teacher_fidelity(val.prompts, e_val)
    metrics["variant"] = clf.model_file
    print(json.dumps({k: v for k, v in metrics.items() if k != "split"}, indent=2))
    if args.figure:
        plot(curves, Path(args.figure))
        print(f"figure: {args.figure}")
    if not args.no_write:
        cfg_path = art / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["metrics"] = metrics
        cfg["thresholds"] = {"by_large_share": thresholds, "sample": f"all {len(all_p)} training+validation prompts"}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"updated {cfg_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
