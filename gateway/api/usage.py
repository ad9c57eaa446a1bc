"""``GET /v1/usage``: a key's own usage for a period, or every key's for an admin key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.accounting.ledger import USAGE_FLUSH_S
from gateway.accounting.usage import UsageFigures
from gateway.api.credentials import authorization_of
from gateway.api.state import GatewayState
from gateway.errors import InvalidRequestError, UsageUnavailableError

__all__ = ["usage"]

_MAX_DAYS = 366
_DRAIN_S = 3.0
"""How long a usage read waits for this worker's settlements (one may wait for Redis to come back)."""


@get("/v1/usage")
async def usage(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Query ``start`` and ``end`` (UTC dates, inclusive; default: this month so far).

    Every request this worker answered is counted; those answered by other workers or
    gateway processes are counted up to ``max_lag_s`` (in the body) after they ended.
    """
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(authorization_of(request.headers))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = _date(request.query_params.get("start"), "start") or today.replace(day=1)
    end = _date(request.query_params.get("end"), "end") or today
    if end < start or (end - start).days >= _MAX_DAYS:
        given = "start" if request.query_params.get("start") else "end"  # name one the client sent
        raise InvalidRequestError(
            f"the period must run forwards and span at most {_MAX_DAYS} days "
            f"(start {start:%Y-%m-%d}, end {end:%Y-%m-%d}; start defaults to the 1st of this month, end to today)",
            param=given,
        )
    # This worker's own figures are made current; other workers write theirs every USAGE_FLUSH_S.
    await state.limiter.drain(timeout_s=_DRAIN_S)
    await state.limiter.ledger.flush()
    if principal.admin:  # the policy's keys, and those that had usage then and are gone from it since
        used = await state.limiter.ledger.indexed_keys(start, end)
        keys = list(dict.fromkeys([*((key.id, key.tenant) for key in runtime.policy.auth.keys), *(used or [])]))
    else:
        keys = [(principal.key_id, principal.tenant)]
    totals = await state.limiter.ledger.read(keys, start, end)
    if totals is None:
        raise UsageUnavailableError("usage cannot be read right now (Redis unavailable)")
    # one row per (key, tenant): a key moved to another tenant has a row in each, so rows summed
    # by tenant are each tenant's own spend
    data = [_row(figures, key_id=key_id, tenant=tenant) for (key_id, tenant), figures in totals.items()]
    everyone = UsageFigures()
    for figures in totals.values():
        everyone.add(figures)
    body = {
        "object": "usage",
        "start": start.date().isoformat(),
        "end": end.date().isoformat(),
        "data": data,
        "total": _row(everyone),
        "max_lag_s": USAGE_FLUSH_S,
    }
    return Response(msgspec.json.encode(body), media_type="application/json")


def _row(figures: UsageFigures, **identity: str) -> dict[str, Any]:
    return {**identity, **msgspec.structs.asdict(figures), "savings_usd": figures.savings_usd}


def _date(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequestError(f"'{param}' must be a date like 2026-11-01", param=param) from None
