"""Rate limits: requests and tokens per minute, over an approximation of a sliding window.

A request counts this minute's requests and tokens plus the previous minute's,
weighted by how much of the previous minute still falls in the last 60 s. Each clock
minute keeps to the limit; 60 s straddling two can hold up to twice it, less one request
(README, t127).
"""

from __future__ import annotations

import math

from gateway.errors import RateLimitError

__all__ = ["RATE_CAPS", "rate_limit_error", "too_large_error"]

RATE_CAPS = frozenset({"rpm", "tpm"})


def rate_limit_error(
    cap: str, owner: str, limit: int, now: float, *, name: str, need: float, counted: tuple[float, float]
) -> RateLimitError:
    """``cap`` is ``"rpm"`` or ``"tpm"``, ``name`` the limit as policies.yaml has it (``key.rpm``),
    ``need`` what this request adds (1 request, or its tokens), ``counted`` the window's counts
    (this minute, the previous one); retry-after is when the window would let it pass."""
    unit = "requests" if cap == "rpm" else "tokens"
    return RateLimitError(
        f"rate limit exceeded: {owner} allows {limit} {unit} per minute ({name})",
        retry_after_s=_seconds_until_room(now, limit, need, *counted),
        code="rate_limit_exceeded",
    )


def too_large_error(owner: str, limit: int, tokens: int, *, name: str, inputs: bool = False) -> RateLimitError:
    """A request that alone counts more tokens than a minute allows: no retry can pass, so
    none is invited (``x-should-retry: false``, which the OpenAI and Anthropic SDKs obey).
    ``inputs``: an embeddings batch, which has input tokens and no max_tokens."""
    counted, fix = (
        ("input tokens", "send fewer or shorter inputs")
        if inputs
        else ("tokens (prompt and max_tokens)", "send a shorter prompt or a lower max_tokens")
    )
    error = RateLimitError(
        f"request too large: it counts {tokens} {counted} and {owner} allows {limit} tokens per minute ({name}); {fix}",
        code="request_too_large_for_limit",
    )
    error.headers["x-should-retry"] = "false"
    return error


def _seconds_until_room(now: float, limit: float, need: float, current: float, previous: float) -> float:
    """When ``current + previous * (1 - fraction) + need <= limit`` first holds, if nothing else arrives."""
    fraction = (now % 60) / 60
    room = limit - need - current
    if room >= 0 and previous > 0:  # later this minute, as the previous minute's weight fades
        return _whole_seconds((1 - room / previous - fraction) * 60)
    # next minute: this minute's count becomes the previous one, fading from its start
    later = max(0.0, 1 - (limit - need) / current) if current > 0 else 0.0
    return _whole_seconds((1 - fraction + later) * 60)


def _whole_seconds(seconds: float) -> float:
    """Rounded up, and past a boundary that lands on a whole second (where rounding of the
    window's weights could still refuse)."""
    return max(1.0, float(math.ceil(seconds + 1e-6)))
