"""``POST /v1/embeddings`` for the simulator: deterministic hashed-feature vectors.

A text's vector is the signed feature-hashing sum of its lower-cased words (weight
1; common function words 0.25), its word bigrams (0.5) and the character trigrams of
each word (0.3), L2-normalised. Texts that share words or word pieces therefore get
a high cosine similarity, unrelated texts one near zero. Token-id inputs are decoded
with the simulator's tokenizer first. 384 dimensions unless ``dimensions`` says
otherwise.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.simulated.tokenizer import count, encoding

__all__ = ["DEFAULT_DIMENSIONS", "EmbeddingInputError", "embed", "embeddings_response"]

DEFAULT_DIMENSIONS = 384
_MAX_DIMENSIONS = 8192
_MAX_INPUTS = 2048
_WORD = re.compile(r"\w+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "by",
        "from",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "as",
        "what",
        "which",
        "who",
        "how",
        "do",
        "does",
        "did",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "my",
        "your",
    ]
)


class EmbeddingInputError(ValueError):
    """A request the real API rejects with HTTP 400; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@functools.lru_cache(maxsize=65536)
def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    """(index, sign) of a feature in a vector of ``dimensions``."""
    value = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return value % dimensions, 1.0 if value >> 63 else -1.0


def _features(text: str) -> list[tuple[str, float]]:
    words = _WORD.findall(text.lower())
    if not words:
        return [("t:" + text, 1.0)]
    features: list[tuple[str, float]] = []
    for word in words:
        features.append(("w:" + word, 0.25 if word in _STOP else 1.0))
        padded = f"<{word}>"
        features += [("c:" + padded[i : i + 3], 0.3) for i in range(len(padded) - 2)]
    features += [(f"b:{a} {b}", 0.5) for a, b in itertools.pairwise(words)]
    return features


def embed(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> npt.NDArray[np.float32]:
    """The unit-length vector of ``text``."""
    vector = np.zeros(dimensions, dtype=np.float64)
    for feature, weight in _features(text):
        index, sign = _slot(feature, dimensions)
        vector[index] += sign * weight
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:  # features cancelled out: still a unit vector, still deterministic
        index, sign = _slot("t:" + text, dimensions)
        vector[index] = sign
        norm = 1.0
    return (vector / norm).astype(np.float32)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts(raw: Any) -> tuple[list[str], int]:
    """(texts, prompt tokens) of an ``input``; raises EmbeddingInputError."""
    if isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list) or not raw:
        raise EmbeddingInputError("'input' must be a non-empty string, array of strings or array of tokens", "input")
    elif all(_is_int(t) for t in raw):
        raw = [raw]
    if len(raw) > _MAX_INPUTS:
        raise EmbeddingInputError(f"'input' must have at most {_MAX_INPUTS} items", "input")
    texts: list[str] = []
    tokens = 0
    vocab = encoding().n_vocab
    strings = all(isinstance(item, str) for item in raw)
    for item in raw:
        if strings:
            if not item:
                raise EmbeddingInputError("'input' cannot contain an empty string", "input")
            texts.append(item)
            tokens += count(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            if any(t < 0 or t >= vocab for t in item):
                raise EmbeddingInputError("'input' contains a token id outside the vocabulary", "input")
            try:
                texts.append(encoding().decode(item))
            except KeyError:
                raise EmbeddingInputError("'input' contains an unknown token id", "input") from None
            tokens += len(item)
        else:
            raise EmbeddingInputError(
                "'input' must be a string, an array of strings, an array of tokens or an array of token arrays",
                "input",
            )
    return texts, tokens


def embeddings_response(body: Any) -> dict[str, Any]:
    """The response body for a request body; raises EmbeddingInputError for a bad one."""
    if not isinstance(body, dict):
        raise EmbeddingInputError("request body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise EmbeddingInputError("'model' is required and must be a string", "model")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise EmbeddingInputError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = DEFAULT_DIMENSIONS
    elif not _is_int(dimensions) or not 1 <= dimensions <= _MAX_DIMENSIONS:
        raise EmbeddingInputError(f"'dimensions' must be an integer from 1 to {_MAX_DIMENSIONS}", "dimensions")
    if "input" not in body:
        raise EmbeddingInputError("'input' is required", "input")
    texts, tokens = _texts(body["input"])
    tokens += 2 * len(texts)  # as a BERT-style embedding model counts: [CLS] and [SEP] around each input
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = embed(text, dimensions)
        value: Any
        value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
