"""Budgets: USD per UTC day and per UTC month, charged the estimate first and the actual cost after."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from gateway.errors import BudgetExceededError, GatewayError, LimiterUnavailableError, RateLimitError
from gateway.store.base import BUDGET_ROUNDING, past_budget

__all__ = ["BUDGET_CAPS", "budget_error", "too_large_for_budget_error", "unchecked_budget_error"]

BUDGET_CAPS = frozenset({"usd_per_day", "usd_per_month"})


def budget_error(
    cap: str,
    owner: str,
    limit: float,
    spent_usd: float,
    cost_usd: float,
    now: float,
    *,
    name: str,
    held_usd: float = 0.0,
) -> GatewayError:
    """``cap`` is ``"usd_per_day"`` or ``"usd_per_month"``, ``name`` the limit as policies.yaml has it
    (``tenant.usd_per_day``); ``held_usd`` is the part of ``spent_usd`` that requests in flight hold
    (their estimates, until they settle). A budget spent ("exhausted"), or one with less left than the
    request's estimate ("would exceed", which a smaller request may fit), waits for the next period (its
    ``retry-after``, which the message names); one the request would fit but for what is held is a short wait (t157: held for 3.5 s, told as
    spent until midnight, with ``x-should-retry: false``)."""
    period = "daily" if cap == "usd_per_day" else "monthly"
    held = min(max(held_usd, 0.0), spent_usd)
    spent = spent_usd - held
    if held > 0 and not past_budget(spent, cost_usd, limit):
        return RateLimitError(
            f"{period} budget held by requests in flight: {owner} may spend ${_usd(limit)}, ${spent:.4f} is "
            f"spent and ${held:.4f} is reserved for requests still running, and this request may cost up to "
            f"${_cost(cost_usd)} ({name}); retry in a few seconds, as they finish",
            retry_after_s=_HELD_RETRY_S,
            code="rate_limit_exceeded",
        )
    in_flight = f" (and ${held:.4f} reserved for requests still running)" if held > 0 else ""
    renewal = _next_period(now, cap)
    renews = f"it renews at {renewal:%Y-%m-%d %H:%M} UTC"
    if limit <= 0:
        message = f"{period} budget exhausted: {owner} may spend nothing ({name} is 0)"
    elif spent >= limit * (1 - BUDGET_ROUNDING):
        message = (
            f"{period} budget exhausted: {owner} may spend ${_usd(limit)}, ${spent:.4f} is spent{in_flight} "
            f"and this request may cost up to ${_cost(cost_usd)} ({name}); {renews}"
        )
    else:  # room is left, less than this request's estimate (t200: told as "exhausted" with $0.0000 spent)
        left = max(limit - spent_usd, 0.0)
        message = (
            f"this request would exceed the {period} budget: {owner} may spend ${_usd(limit)}, ${spent:.4f} is "
            f"spent{in_flight}, ${_cost(left)} is left and this request may cost up to ${_cost(cost_usd)} ({name}); "
            f"a smaller request (a lower max_tokens) may fit what is left, or {renews}"
        )
    error = BudgetExceededError(message)
    error.headers["retry-after"] = str(max(1, math.ceil(renewal.timestamp() - now)))
    return error


def too_large_for_budget_error(
    cap: str, owner: str, limit: float, cost_usd: float, *, name: str, default_completion_tokens: int, inputs: bool
) -> RateLimitError:
    """A request whose estimate alone passes a whole budget: no retry can pass, so none is invited
    (``x-should-retry: false``), as a request too large for its ``tpm`` (t200: a fresh key with
    $0.001 a day was told its budget was "exhausted", $0.0000 spent, back at midnight).
    ``inputs``: an embeddings batch, which has input tokens and no max_tokens."""
    per = "a day" if cap == "usd_per_day" else "a month"
    counted, fix = (
        ("its inputs", "send fewer or shorter inputs")
        if inputs
        else (
            "its prompt and max_tokens at the dearest model its route may use",
            f"set a lower max_tokens (a request without one is counted at {default_completion_tokens} completion "
            "tokens) or ask for a cheaper model or route",
        )
    )
    error = RateLimitError(
        f"request too large for the budget: it may cost up to ${_cost(cost_usd)} ({counted}) and {owner} may spend "
        f"${_usd(limit)} {per} ({name}), so no retry can pass; {fix}",
        code="request_too_large_for_budget",
    )
    error.headers["x-should-retry"] = "false"
    return error


_HELD_RETRY_S = 5
"""A refusal only for what requests in flight hold: their settlements give back what they did not
spend as they end, within seconds for most; the SDKs retry a 429 after a ``retry-after`` this short
(twice by default: 10 s in all)."""

_UNCHECKED_RETRY_S = 5
"""A refusal only for want of Redis's word: a restarted Redis answers within seconds, and the
SDKs retry a 503 after its ``retry-after``."""


def unchecked_budget_error(
    cap: str, owner: str, limit: float, allowance: float, let_through: float, cost_usd: float, *, name: str
) -> LimiterUnavailableError:
    """A budget Redis cannot be asked about, whose ``allowance`` in this worker meanwhile (the share of
    ``limit`` it lets through unchecked) ``cost_usd`` would pass: a 503 to retry shortly, as ``closed``
    answers, not ``insufficient_quota``, for nothing says the budget itself is spent."""
    period = "daily" if cap == "usd_per_day" else "monthly"
    error = LimiterUnavailableError(
        f"{period} budget cannot be checked while Redis is unreachable: this worker's allowance for {owner} "
        f"meanwhile is ${_usd(allowance)} of its ${_usd(limit)}, ${let_through:.4f} was let through and this "
        f"request may cost up to ${cost_usd:.4f} ({name}); retry shortly",
    )
    error.headers["retry-after"] = str(_UNCHECKED_RETRY_S)
    return error


def _usd(amount: float) -> str:
    """Cents when that is exact, else every digit the limit has ($0.0005 is not $0.00)."""
    return f"{amount:.2f}" if round(amount, 2) == amount else f"{amount:.6g}"


def _cost(amount: float) -> str:
    """Four decimals, or two significant digits where that would read $0.0000 (an embedding's cost)."""
    if amount <= 0 or amount >= 0.0001:
        return f"{amount:.4f}"
    return f"{amount:.{1 - math.floor(math.log10(amount))}f}"


def _next_period(now: float, cap: str) -> datetime:
    stamp = datetime.fromtimestamp(now, UTC)
    if cap == "usd_per_day":
        return (stamp + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    year, month = (stamp.year + 1, 1) if stamp.month == 12 else (stamp.year, stamp.month + 1)
    return stamp.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)
