"""Choose k, the number of tokens drafted per round, from the measured acceptance rate and call costs.

A round that drafts k tokens at per-token acceptance α yields (1 - α^(k+1)) / (1 - α)
tokens on average and costs one verification plus a draft call of a + b·k seconds
(a: the call's fixed cost, b: one draft step; a least-squares fit over recent rounds,
all of it put on b until k has varied); k is the one in [k_min, k_max] with the most
expected tokens per second. α is the maximum-likelihood
estimate for a truncated geometric (accepted / (accepted + rejections)), decayed so
that it follows the text; costs are exponential moving averages of the measured calls.

The same figures say when drafting does not pay at all (t49): the large model alone gives
one token per verify-sized call, 1/verify_s tokens per second; when even the best k is
expected to give fewer, the draft is too slow (an overloaded small-model server that still
answers inside its deadline) and the answer is better finished plainly.
"""

from __future__ import annotations

__all__ = ["AdaptiveK", "expected_tokens"]


def expected_tokens(alpha: float, k: int) -> float:
    """Textbook expectation of tokens per round (accepted drafts plus the large model's own token)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveK:
    def __init__(self, k_initial: int, k_min: int, k_max: int, *, prior_alpha: float = 0.7, decay: float = 0.9) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.k = max(k_min, min(k_max, k_initial))
        self._decay = decay
        self._accepted = 2.0 * prior_alpha  # pseudo-counts: a weak prior
        self._rejected = 2.0 * (1.0 - prior_alpha)
        self._verify_s: float | None = None
        self._fit = [0.0, 0.0, 0.0, 0.0, 0.0]  # decayed sums: n, k, k², draft_s, k·draft_s
        self.drafted_rounds = 0

    @property
    def alpha(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def observe(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> int:
        """Record a round; returns the k for the next one."""
        if drafted:
            self.drafted_rounds += 1
            self._accepted = self._decay * self._accepted + accepted
            self._rejected = self._decay * self._rejected + (1 if accepted < drafted else 0)
            self._fit = [
                self._decay * old + new
                for old, new in zip(
                    self._fit, (1.0, drafted, drafted * drafted, draft_s, drafted * draft_s), strict=False
                )
            ]
        self._verify_s = _ema(self._verify_s, verify_s)
        if self.k_min != self.k_max and self._verify_s is not None and self._fit[0] > 0:
            self.k = max(range(self.k_min, self.k_max + 1), key=self._rate)
        return self.k

    def speedup(self) -> float | None:
        """Expected tokens per second drafting at the current k over plain decoding's (1/verify_s);
        None before a drafted round has been measured. Below 1: drafting loses."""
        if self._verify_s is None or self._fit[0] <= 0:
            return None
        return self._rate(self.k) * self._verify_s

    def _rate(self, k: int) -> float:
        """Expected tokens per second drafting ``k`` per round."""
        assert self._verify_s is not None
        fixed, per_token = self._draft_cost()
        return expected_tokens(self.alpha, k) / (self._verify_s + fixed + k * per_token)

    def _draft_cost(self) -> tuple[float, float]:
        n, sk, skk, sd, skd = self._fit
        spread = n * skk - sk * sk
        if spread > 1e-9 * max(1.0, n * skk):
            per_token = (n * skd - sk * sd) / spread
            fixed = (sd - per_token * sk) / n
            if per_token > 0 and fixed >= 0:
                return fixed, per_token
        return 0.0, sd / sk


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new
