"""RouteLLM-style routing metrics: PGR curve, APGR, CPT(x%).

For a score (higher = route to the large model) the prompts are sent to the large
model in score order; with a share ``s`` of large calls the quality is the mean of
``large_correct`` over the routed prompts and ``small_correct`` over the rest.
PGR(s) = (quality(s) - quality_small) / (quality_large - quality_small).
APGR = the area under PGR(s) for s in [0, 1] (random routing: 0.5).
CPT(x) = the smallest share of large calls at which PGR reaches x (random: x).
Tied scores are treated as routed in random order (the curve is linear across a tie).
"""

from __future__ import annotations

import numpy as np


def pgr_curve(score: np.ndarray, small: np.ndarray, large: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of large calls, PGR) at every tie-group boundary, from (0, 0) to (1, 1)."""
    score = np.asarray(score, dtype=np.float64)
    small = np.asarray(small, dtype=np.float64)
    large = np.asarray(large, dtype=np.float64)
    n = len(score)
    order = np.argsort(-score, kind="stable")
    s_sorted = score[order]
    gain = (large - small)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    # keep only boundaries between distinct scores
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(s_sorted) != 0) + 1, [n]])
    share = boundaries / n
    q_small, q_large = small.mean(), large.mean()
    quality = (small.sum() + cum[boundaries]) / n
    gap = q_large - q_small
    pgr = (quality - q_small) / gap if gap != 0 else np.zeros_like(quality)
    return share, pgr


def apgr(score: np.ndarray, small: np.ndarray, large: np.ndarray) -> float:
    share, pgr = pgr_curve(score, small, large)
    return float(np.trapezoid(pgr, share))


def cpt(score: np.ndarray, small: np.ndarray, large: np.ndarray, target: float) -> float:
    """Smallest share of large calls reaching PGR >= target (linear interpolation)."""
    share, pgr = pgr_curve(score, small, large)
    idx = np.flatnonzero(pgr >= target)
    if len(idx) == 0:
        return 1.0
    i = idx[0]
    if i == 0:
        return float(share[0])
    x0, x1, y0, y1 = share[i - 1], share[i], pgr[i - 1], pgr[i]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x1)


def summary(score: np.ndarray, small: np.ndarray, large: np.ndarray) -> dict[str, float]:
    return {
        "apgr": round(apgr(score, small, large), 4),
        "cpt50": round(cpt(score, small, large, 0.5), 4),
        "cpt80": round(cpt(score, small, large, 0.8), 4),
        "n": len(score),
    }


def apgr_interval(
    score: np.ndarray, small: np.ndarray, large: np.ndarray, resamples: int = 1000, seed: int = 0
) -> list[float]:
    """95% bootstrap interval of APGR over the rows (how much a small held-out set can say)."""
    rng = np.random.default_rng(seed)
    score, small, large = (np.asarray(a, float) for a in (score, small, large))
    n = len(score)
    values: list[float] = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        if large[i].mean() != small[i].mean():
            values.append(apgr(score[i], small[i], large[i]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def random_summary(small: np.ndarray, large: np.ndarray, seeds: int = 200) -> dict[str, float]:
    """Random routing: expected APGR 0.5; CPT averaged over random orders."""
    rng = np.random.default_rng(0)
    res = [summary(rng.random(len(small)), small, large) for _ in range(seeds)]
    return {k: round(float(np.mean([r[k] for r in res])), 4) for k in ("apgr", "cpt50", "cpt80")} | {"n": len(small)}


def oracle_summary(small: np.ndarray, large: np.ndarray) -> dict[str, float]:
    return summary(np.asarray(large, float) - np.asarray(small, float), small, large)
