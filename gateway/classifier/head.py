"""The routing head: turns the encoder's outputs into the ``p_large`` a route acts on.

The ONNX graph's own ``p_large`` was trained on two benchmarks only (MMLU and GSM8K) and
ranks general application traffic no better than chance. The head, fitted by
``router_models.head_train`` and shipped as ``routing_head.npz`` beside the graph, reads
the graph's embedding, the graph's score and a few surface features of the text:

* a **gate** (multinomial logistic regression) says which kind of request this is:
  general application traffic, a multiple-choice knowledge question, a math word problem;
* a **general head** (logistic regression) gives P(hard) for general traffic, learnt from
  hand-labelled prompts of ten task categories; a prompt longer than the encoder's window (read
  at both ends: pasted material and a request) has a **long head** of its own, fitted on all
  the general prompts with the long ones weighing more (where the file has one);
* the graph's score stays the opinion for the two benchmark kinds it was trained on;
* ``p = w_general * p_general + (1 - w_general) * p_graph``;
* **novelty**: a prompt far from everything the head learnt from (its best cosine to a
  stored reference sample below ``novelty_high``) leans large, fully so at ``novelty_low``:
  ``p += lift * u * (1 - p)``. A router should not send what it cannot place to the small model.

No learnt weight changes the embedding, so the semantic cache is untouched by the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.classifier.features import NAMES


class HeadError(ValueError):
    """The head file is malformed: the classifier refuses to load rather than route on it."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True, slots=True)
class RoutingHead:
    feature_mean: np.ndarray  # (f,)
    feature_std: np.ndarray  # (f,)
    feature_scale: float
    gate_weight: np.ndarray  # (k, d + f), row 0 = general traffic
    gate_bias: np.ndarray  # (k,)
    general_weight: np.ndarray  # (d + f,)
    general_bias: float
    reference: np.ndarray  # (n, d) float32, L2-normalized embeddings of training prompts
    novelty_low: float
    novelty_high: float
    novelty_lift: float
    long_weight: np.ndarray | None = None  # (d + f,)
    long_bias: float = 0.0

    def inputs(self, embedding: np.ndarray, features: np.ndarray) -> np.ndarray:
        scaled = self.feature_scale * (features - self.feature_mean) / self.feature_std
        return np.hstack([embedding.astype(np.float32), scaled.astype(np.float32)])

    def parts(
        self, embedding: np.ndarray, p_graph: np.ndarray, features: np.ndarray, long: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Every intermediate (for evaluation); :meth:`p_large` is the part that serves.
        ``features``: :func:`~gateway.classifier.features.surface_features` of each text, stacked;
        ``long``: which texts filled the window (read at both ends)."""
        x = self.inputs(embedding, features)
        w_general = _softmax(x @ self.gate_weight.T + self.gate_bias)[:, 0]
        p_general = _sigmoid(x @ self.general_weight + self.general_bias)
        if self.long_weight is not None and long is not None and long.any():
            p_general = np.where(long, _sigmoid(x @ self.long_weight + self.long_bias), p_general)
        mixed = w_general * p_general + (1.0 - w_general) * p_graph
        nearest = (embedding @ self.reference.T).max(axis=1) if len(self.reference) else np.ones(len(embedding))
        span = max(self.novelty_high - self.novelty_low, 1e-6)
        unfamiliar = np.clip((self.novelty_high - nearest) / span, 0.0, 1.0)
        p = mixed + self.novelty_lift * unfamiliar * (1.0 - mixed)
        return {
            "w_general": w_general,
            "p_general": p_general,
            "mixed": mixed,
            "nearest": nearest,
            "unfamiliar": unfamiliar,
            "p_large": np.clip(p, 0.0, 1.0).astype(np.float32),
        }

    def p_large(
        self, embedding: np.ndarray, p_graph: np.ndarray, features: np.ndarray, long: np.ndarray | None = None
    ) -> np.ndarray:
        return self.parts(embedding, p_graph, features, long)["p_large"]

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "feature_names": np.array(NAMES),
            "feature_mean": self.feature_mean,
            "feature_std": self.feature_std,
            "feature_scale": np.array(self.feature_scale, dtype=np.float32),
            "gate_weight": self.gate_weight,
            "gate_bias": self.gate_bias,
            "general_weight": self.general_weight,
            "general_bias": np.array(self.general_bias, dtype=np.float32),
            "reference": self.reference.astype(np.float16),
            "novelty": np.array([self.novelty_low, self.novelty_high, self.novelty_lift], dtype=np.float32),
        }
        if self.long_weight is not None:
            arrays["long_weight"] = self.long_weight
            arrays["long_bias"] = np.array(self.long_bias, dtype=np.float32)
        np.savez(path, **arrays)  # type: ignore[arg-type]


def load_head(path: str | Path, embedding_dim: int) -> RoutingHead:
    """Read ``routing_head.npz``; raises :class:`HeadError` when it does not fit this classifier."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = tuple(str(n) for n in z["feature_names"])
            if names != NAMES:
                raise HeadError(f"head was fitted on features {names}, this gateway computes {NAMES}")
            low, high, lift = (float(v) for v in z["novelty"])
            head = RoutingHead(
                feature_mean=z["feature_mean"].astype(np.float32),
                feature_std=np.maximum(z["feature_std"].astype(np.float32), 1e-6),
                feature_scale=float(z["feature_scale"]),
                gate_weight=z["gate_weight"].astype(np.float32),
                gate_bias=z["gate_bias"].astype(np.float32),
                general_weight=z["general_weight"].astype(np.float32),
                general_bias=float(z["general_bias"]),
                reference=z["reference"].astype(np.float32),
                novelty_low=low,
                novelty_high=high,
                novelty_lift=lift,
                long_weight=z["long_weight"].astype(np.float32) if "long_weight" in z.files else None,
                long_bias=float(z["long_bias"]) if "long_bias" in z.files else 0.0,
            )
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, HeadError):
            raise
        raise HeadError(f"unreadable routing head {path}: {exc!r}") from None
    width = embedding_dim + len(NAMES)
    if head.gate_weight.ndim != 2 or head.gate_weight.shape[1] != width or head.general_weight.shape != (width,):
        raise HeadError(f"routing head expects inputs of width {width}")
    if head.long_weight is not None and head.long_weight.shape != (width,):
        raise HeadError(f"routing head's long head expects inputs of width {width}")
    if head.reference.ndim != 2 or (len(head.reference) and head.reference.shape[1] != embedding_dim):
        raise HeadError(f"routing head reference embeddings are not of dimension {embedding_dim}")
    return head
