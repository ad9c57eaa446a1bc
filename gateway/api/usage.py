"""``GET /v1/usage``: a key's own usage for a period, or every key's for an admin key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.api.state import GatewayState
from gateway.errors import InvalidRequestError, UsageUnavailableError
from gateway.limits import USAGE_FLUSH_S

__all__ = ["usage"]

_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "baseline_cost_usd", "cache_hits",
           "cache_saved_usd", "errors")  # fmt: skip
_MAX_DAYS = 366


@get("/v1/usage")
async def usage(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Query ``start`` and ``end`` (UTC dates, inclusive; default: this month so far).

    Every request this worker answered is counted; those answered by other workers or
    gateway processes are counted up to ``max_lag_s`` (in the body) after they ended.
    """
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(request.headers.get("authorization"))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = _date(request.query_params.get("start"), "start") or today.replace(day=1)
    end = _date(request.query_params.get("end"), "end") or today
    if end < start or (end - start).days >= _MAX_DAYS:
        raise InvalidRequestError(f"the period must run forwards and span at most {_MAX_DAYS} days", param="start")
    if principal.admin:
        keys = [(key.id, key.tenant) for key in runtime.policy.auth.keys]
    else:
        keys = [(principal.key_id, principal.tenant)]
    # This worker's own figures are made current; other workers write theirs every USAGE_FLUSH_S.
    await state.pipeline.drain()
    await state.limiter.flush_usage()
    totals = await state.limiter.usage(keys, start, end)
    if totals is None:
        raise UsageUnavailableError("usage cannot be read right now (Redis unavailable)")
    tenants = dict(keys)
    data = [_row(key_id, tenants[key_id], figures) for key_id, figures in totals.items()]
    total = {field: sum(row[field] for row in data) for field in (*_FIELDS, "savings_usd")}
    body = {
        "object": "usage",
        "start": start.date().isoformat(),
        "end": end.date().isoformat(),
        "data": data,
        "total": total,
        "max_lag_s": USAGE_FLUSH_S,
    }
    return Response(msgspec.json.encode(body), media_type="application/json")


def _row(key_id: str, tenant: str, figures: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"key_id": key_id, "tenant": tenant}
    for field in _FIELDS:
        value = figures.get(field, 0.0)
        row[field] = (
            int(value) if field in ("requests", "prompt_tokens", "completion_tokens", "cache_hits", "errors") else value
        )
    row["savings_usd"] = float(row["baseline_cost_usd"]) - float(row["cost_usd"])
    return row


def _date(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequestError(f"'{param}' must be a date like 2026-11-01", param=param) from None
