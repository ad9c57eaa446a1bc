"""Budgets: USD per UTC day and per UTC month, charged the estimate first and the actual cost after."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from gateway.errors import BudgetExceededError, LimiterUnavailableError

__all__ = ["BUDGET_CAPS", "budget_error", "unchecked_budget_error"]

BUDGET_CAPS = frozenset({"usd_per_day", "usd_per_month"})


def budget_error(
    cap: str, owner: str, limit: float, spent_usd: float, cost_usd: float, now: float, *, name: str
) -> BudgetExceededError:
    """``cap`` is ``"usd_per_day"`` or ``"usd_per_month"``, ``name`` the limit as policies.yaml has it
    (``tenant.usd_per_day``); ``retry-after`` is the start of the next period."""
    period = "daily" if cap == "usd_per_day" else "monthly"
    error = BudgetExceededError(
        f"{period} budget exhausted: {owner} may spend ${_usd(limit)}, ${spent_usd:.4f} is spent "
        f"and this request may cost up to ${cost_usd:.4f} ({name})",
    )
    error.headers["retry-after"] = str(_seconds_to_next_period(now, cap))
    return error


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


def _seconds_to_next_period(now: float, cap: str) -> int:
    stamp = datetime.fromtimestamp(now, UTC)
    if cap == "usd_per_day":
        boundary = (stamp + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        year, month = (stamp.year + 1, 1) if stamp.month == 12 else (stamp.year, stamp.month + 1)
        boundary = stamp.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil(boundary.timestamp() - now))
