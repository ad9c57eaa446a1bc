"""The body of a future ``GET /v1/usage``: one period's figures for one key or for all keys.

Pure: no HTTP, no Redis. The figures come either from request log lines / records, or
from an ``Aggregator`` already filled (by ``feed`` or by ``add_totals`` from counters
kept elsewhere). An aggregator only knows UTC days, so with one ``since``/``until``
must fall on midnight UTC.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time
from typing import Any

import msgspec

from gateway.reporting.aggregate import Aggregator, LogLine, Totals

__all__ = ["usage_summary"]

_USD_DIGITS = 9

Record = bytes | str | Mapping[str, Any] | LogLine


def usage_summary(
    source: Iterable[Record] | Aggregator,
    key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Totals in ``[since, until)`` for ``key_id`` (``None``: every key), overall, per model and per day.

    ``source``: log lines (bytes or str), decoded log objects (mappings with the log's
    field names, or ``LogLine``), or an ``Aggregator``. Lines and records that are not
    valid request lines are skipped.
    """
    if isinstance(source, Aggregator):
        aggregator = _restricted(source, since, until)
    else:
        aggregator = Aggregator(since, until)
        _feed(aggregator, source)
    total = aggregator.total(key_id=key_id)
    return {
        "object": "usage",
        "key_id": key_id,
        "since": _iso(since if since is not None else aggregator.since),
        "until": _iso(until if until is not None else aggregator.until),
        **_figures(total),
        "cache": {
            "exact": total.cache_exact,
            "semantic": total.cache_semantic,
            "hits": total.cache_hits,
            "saved_usd": round(total.cache_saved_usd, _USD_DIGITS),
        },
        "by_model": [{"model": m, **_figures(t)} for (m,), t in aggregator.rows(("model",), key_id=key_id)],
        "by_day": [{"day": d, **_figures(t)} for (d,), t in aggregator.rows(("day",), key_id=key_id)],
    }


def _figures(totals: Totals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "errors": totals.errors,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.total_tokens,
        "cost_usd": round(totals.cost_usd, _USD_DIGITS),
        "baseline_cost_usd": round(totals.baseline_cost_usd, _USD_DIGITS),
        "savings_usd": round(totals.savings_usd, _USD_DIGITS),
        "savings_pct": None if totals.savings_pct is None else round(totals.savings_pct, 2),
    }


def _feed(aggregator: Aggregator, records: Iterable[Record]) -> None:
    """Lines go through the fast path in runs; other records are converted one by one."""
    for is_line, run in itertools.groupby(records, key=lambda r: isinstance(r, (bytes, str))):
        if is_line:
            aggregator.feed(r.encode() if isinstance(r, str) else r for r in run if isinstance(r, (bytes, str)))
            continue
        for record in run:
            try:
                line = record if isinstance(record, LogLine) else msgspec.convert(record, LogLine)
            except msgspec.ValidationError:
                event = record.get("event") if isinstance(record, Mapping) else None
                if event == "request" or not isinstance(record, Mapping):
                    aggregator.malformed += 1
                else:
                    aggregator.ignored += 1
                continue
            aggregator.add_record(line)


def _restricted(source: Aggregator, since: datetime | None, until: datetime | None) -> Aggregator:
    """``source``'s cells whose day lies in ``[since, until)``; the bounds must be midnight UTC."""
    if since is None and until is None:
        return source
    for name, bound in (("since", since), ("until", until)):
        if bound is not None and (bound.tzinfo is None or bound.astimezone(UTC).timetz() != time(tzinfo=UTC)):
            raise ValueError(f"{name} must be midnight UTC when summing per-day totals, got {bound!r}")
    first = since.astimezone(UTC).date() if since is not None else None
    stop = until.astimezone(UTC).date() if until is not None else None
    restricted = Aggregator(since, until)
    for cell, totals in source.cells():
        day = cell[0]
        if (first is None or day >= first) and (stop is None or day < stop):
            restricted.add_totals(*cell, totals)
    return restricted


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")
