"""Acceptance rules: greedy agreement (exact) and speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

Speculative sampling accepts draft token x with probability min(1, p(x)/q(x)) and, on
rejection, samples from norm(max(0, p - q)); the output then follows p exactly. The
servers only return the top-n logprobs per position (vLLM caps n at ``--max-logprobs``,
20 by default), which makes two things approximate here:

1. ``p(x)``/``q(x)`` themselves are exact at temperature 1 (the returned logprobs are
   the raw log-softmax and always include x). At another temperature T the scaled
   probabilities need the normaliser over the whole vocabulary; only the top-n are
   known, so they are renormalised over the returned tokens (the tail is dropped).
   A server that returns logprobs already scaled (vLLM's V0 engine, or V1 with
   ``--logprobs-mode processed_logprobs``) gives them exactly: ``scaled_by_server``.
2. The residual is built from the target's top-n only: tokens outside it are never
   resampled (their residual mass is lost), and a target top-n token absent from the
   draft's top-n is taken as q = 0 (its residual slightly overstated).

Both vanish when n covers every token with non-negligible mass (the tests' toy vocabulary).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from gateway.speculative.token_api import Distribution

__all__ = ["scaled", "verify_greedy", "verify_sampled"]


def verify_greedy(draft: Sequence[int], best: Sequence[int | None]) -> tuple[int, int | None]:
    """Accepted count and the large model's token at the first disagreement (None: all accepted)."""
    for i, token in enumerate(draft):
        if best[i] != token:
            return i, best[i]
    return len(draft), None


def scaled(dist: Distribution, temperature: float) -> dict[int, float]:
    """Probabilities at ``temperature`` from raw logprobs (exact at T = 1, renormalised over the top-n otherwise)."""
    if temperature == 1.0:
        return {token: math.exp(lp) for token, lp in dist.items()}
    top = max(dist.values())
    weights = {token: math.exp((lp - top) / temperature) for token, lp in dist.items()}
    total = sum(weights.values())
    return {token: w / total for token, w in weights.items()}


def verify_sampled(
    draft: Sequence[int],
    draft_dists: Sequence[Distribution] | None,
    target_dists: Sequence[Distribution | None],
    temperature: float,
    rng: random.Random,
    *,
    scaled_by_server: tuple[bool, bool] = (False, False),
) -> tuple[int, int | None]:
    """Accepted count and, on a rejection, the token resampled from the residual.

    ``scaled_by_server``: (target, draft) return logprobs at the request's temperature already.
    """
    target_t = 1.0 if scaled_by_server[0] else temperature
    draft_t = 1.0 if scaled_by_server[1] else temperature
    for i, token in enumerate(draft):
        target = target_dists[i]
        if target is None:
            return i, None
        p = scaled(target, target_t)
        q = scaled(draft_dists[i], draft_t) if draft_dists is not None else {token: 1.0}
        p_x, q_x = p.get(token, 0.0), q.get(token, 0.0)
        if q_x > 0.0 and rng.random() < min(1.0, p_x / q_x):
            continue
        return i, _sample_residual(p, q, rng)
    return len(draft), None


def _sample_residual(p: dict[int, float], q: dict[int, float], rng: random.Random) -> int:
    residual = {token: max(0.0, prob - q.get(token, 0.0)) for token, prob in p.items()}
    total = sum(residual.values())
    if total <= 0.0:  # p ≤ q on every known token: only possible through the top-n truncation
        residual, total = p, sum(p.values())
    point = rng.random() * total
    for token, weight in residual.items():
        point -= weight
        if point <= 0.0:
            return token
    return max(residual, key=residual.__getitem__)
