"""``GET /v1/usage``: a key's own usage for a period, or every key's for an admin key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.accounting.ledger import USAGE_FLUSH_S, USAGE_RETENTION_DAYS, usage_kept_since
from gateway.accounting.usage import UsageFigures
from gateway.api.credentials import authorization_of
from gateway.api.state import GatewayState
from gateway.errors import InvalidRequestError, UsageUnavailableError

__all__ = ["usage"]

_DRAIN_S = 3.0
"""How long a usage read waits for this worker's settlements (one may wait for Redis to come back)."""


@get("/v1/usage")
async def usage(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Query ``start`` and ``end`` (UTC dates, inclusive; default: this month so far).

    Usage is kept :data:`USAGE_RETENTION_DAYS` days, so a ``start`` before the first day kept
    (``kept_since`` in the body) is refused rather than summed short (t63).
    Every request this worker answered is counted; those answered by other workers or
    gateway processes are counted up to ``max_lag_s`` (in the body) after they ended.
    """
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(authorization_of(request))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = _date(request.query_params.get("start"), "start") or today.replace(day=1)
    end = _date(request.query_params.get("end"), "end") or today
    _check_period(start, end, usage_kept_since(today), end_given=bool(request.query_params.get("end")))
    # no usage is written after tomorrow (a clock a little ahead) yet: an end in the year 9999 reads none of those days
    read_end = min(end, today + timedelta(days=1))
    # This worker's own figures are made current; other workers write theirs every USAGE_FLUSH_S.
    await state.limiter.drain(timeout_s=_DRAIN_S)
    await state.limiter.ledger.flush()
    if principal.admin:  # the policy's keys, and those that had usage then and are gone from it since
        used = await state.limiter.ledger.indexed_keys(start, read_end)
        keys = list(dict.fromkeys([*((key.id, key.tenant) for key in runtime.policy.auth.keys), *(used or [])]))
    else:
        keys = [(principal.key_id, principal.tenant)]
    totals = await state.limiter.ledger.read(keys, start, read_end)
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
        "kept_since": usage_kept_since(today).date().isoformat(),
        "data": data,
        "total": _row(everyone),
        "max_lag_s": USAGE_FLUSH_S,
    }
    return Response(msgspec.json.encode(body), media_type="application/json")


def _check_period(start: datetime, end: datetime, kept_since: datetime, *, end_given: bool) -> None:
    """A period must lie within the days still kept: finance would read a total over days partly
    deleted (each key's own days go as that key writes) as the period's whole spend (t63). The
    request log keeps every request, so `gateway report` sums any period: said for a client, who
    cannot run it, as a thing to ask the operator for (t66)."""
    if start < kept_since:
        raise InvalidRequestError(
            f"usage is kept {USAGE_RETENTION_DAYS} days: start must be {kept_since.date().isoformat()} or later "
            f"(got {start.date().isoformat()}); for an older period, ask the gateway's operator, "
            "whose request log keeps every request (gateway report)",
            param="start",
        )
    if end < start:
        raise InvalidRequestError(
            f"the period must run forwards (start {start.date().isoformat()}, end {end.date().isoformat()}; "
            "end defaults to today)",
            param="end" if end_given else "start",  # one the client sent
        )


def _row(figures: UsageFigures, **identity: str) -> dict[str, Any]:
    return {**identity, **figures.as_reported()}


def _date(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequestError(f"'{param}' must be a date like 2026-11-01", param=param) from None
