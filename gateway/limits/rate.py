"""Rate limits: requests and tokens per minute, over a sliding window.

A request counts this minute's requests and tokens plus the previous minute's,
weighted by how much of the previous minute still falls in the last 60 s.
"""

from __future__ import annotations

import math

from gateway.errors import RateLimitError

__all__ = ["RATE_CAPS", "rate_limit_error"]

RATE_CAPS = frozenset({"rpm", "tpm"})


def rate_limit_error(cap: str, owner: str, limit: int, now: float, *, name: str) -> RateLimitError:
    """``cap`` is ``"rpm"`` or ``"tpm"``, ``name`` the limit as policies.yaml has it (``key.rpm``);
    the client may retry when the minute turns."""
    unit = "requests" if cap == "rpm" else "tokens"
    return RateLimitError(
        f"rate limit exceeded: {owner} allows {limit} {unit} per minute ({name})",
        retry_after_s=max(1.0, math.ceil(60 - (now % 60))),
        code="rate_limit_exceeded",
    )
