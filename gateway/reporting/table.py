"""Report output: an aligned plain-text table with a totals row, JSON, or CSV."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from datetime import datetime

import msgspec

from gateway.reporting.aggregate import Aggregator, Totals

__all__ = ["FORMATS", "render", "render_csv", "render_json", "render_table", "summary_line"]

FORMATS = ("table", "json", "csv")

# (machine name, table header): the figures of every row, in order.
_COLUMNS = (
    ("requests", "requests"),
    ("errors", "errors"),
    ("prompt_tokens", "prompt_tok"),
    ("completion_tokens", "compl_tok"),
    ("cost_usd", "cost_usd"),
    ("baseline_cost_usd", "baseline_usd"),
    ("savings_usd", "savings_usd"),
    ("savings_pct", "savings_%"),
    ("cache_exact", "hits_exact"),
    ("cache_semantic", "hits_sem"),
    ("cache_hits", "hits"),
    ("cache_saved_usd", "cache_saved_usd"),
)
_USD_DIGITS = 9  # JSON and CSV: to the nano-dollar, which hides float summation noise


def render(aggregator: Aggregator, by: Sequence[str], fmt: str) -> str:
    if fmt == "table":
        return render_table(aggregator, by)
    if fmt == "json":
        return render_json(aggregator, by)
    if fmt == "csv":
        return render_csv(aggregator, by)
    raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")


def render_table(aggregator: Aggregator, by: Sequence[str]) -> str:
    """Groups left-aligned, figures right-aligned, a rule, a totals row, then the line counts."""
    header = [*by, *(title for _, title in _COLUMNS)]
    rows = aggregator.rows(by) if by else []  # without a grouping the totals row is the only row
    body = [[*(_label(v) for v in group), *_table_figures(totals)] for group, totals in rows]
    total = _table_figures(aggregator.total())
    if by:
        total = ["TOTAL", *([""] * (len(by) - 1)), *total]
    widths = [max(len(row[i]) for row in (header, *body, total)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < len(by) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(row) for row in body)]
    if body:
        out.append(rule)
    out.append(line(total))
    out.append("")
    out.append(summary_line(aggregator))
    return "\n".join(out) + "\n"


def render_json(aggregator: Aggregator, by: Sequence[str]) -> str:
    """``{"by", "since", "until", "rows": [{group..., figures...}], "total": {...}, "lines": {...}}``."""
    rows = [{**dict(zip(by, group, strict=False)), **_json_figures(totals)} for group, totals in aggregator.rows(by)]
    document = {
        "by": list(by),
        "since": _iso(aggregator.since),
        "until": _iso(aggregator.until),
        "rows": rows,
        "total": _json_figures(aggregator.total()),
        "lines": aggregator.counters(),
    }
    return msgspec.json.format(msgspec.json.encode(document), indent=2).decode() + "\n"


def render_csv(aggregator: Aggregator, by: Sequence[str]) -> str:
    """One header line and one line per group; no totals row, so the file sums cleanly. A missing
    model or route is ``-``, as in the table (t166); a figure there is none of is empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*by, *(name for name, _ in _COLUMNS)])
    for group, totals in aggregator.rows(by):
        figures = _json_figures(totals)
        values = [figures[name] for name, _ in _COLUMNS]
        writer.writerow([*(_label(v) for v in group), *("" if v is None else v for v in values)])
    return buffer.getvalue()


def summary_line(aggregator: Aggregator) -> str:
    c = aggregator.counters()
    period = ""
    if aggregator.since or aggregator.until:
        period = f" in [{_iso(aggregator.since) or '-'}, {_iso(aggregator.until) or '-'})"
    return (
        f"{c['lines']:,} lines: {c['requests']:,} requests counted{period}, {c['out_of_period']:,} outside the period, "
        f"{c['ignored']:,} other events, {c['blank']:,} blank, {c['malformed']:,} malformed (skipped)"
    )


def _table_figures(totals: Totals) -> list[str]:
    figures = totals.as_dict()
    out = []
    for name, _ in _COLUMNS:
        value = figures[name]
        if value is None:
            out.append("-")
        elif name == "savings_pct":
            out.append(f"{value:.1f}")
        elif isinstance(value, float):
            out.append(_usd_cell(value))
        else:
            out.append(f"{value:,}")
    return out


def _usd_cell(value: float) -> str:
    """4 decimals, and under a cent 3 significant figures, down to the nano-dollar of JSON and CSV:
    an embeddings route's cost or a cache saving of tens of micro-dollars read 0.0000 (t70)."""
    size = abs(value)
    if size >= 0.01 or size < 0.5 * 10**-_USD_DIGITS:
        return f"{value:,.4f}"
    decimals = min(_USD_DIGITS, 2 - math.floor(math.log10(size)))
    return f"{value:.{decimals}f}"


def _json_figures(totals: Totals) -> dict[str, int | float | None]:
    figures = totals.as_dict()
    for name, value in figures.items():
        if isinstance(value, float):
            figures[name] = round(value, 2 if name == "savings_pct" else _USD_DIGITS)
    return {name: figures[name] for name, _ in _COLUMNS}


def _label(value: str | None) -> str:
    return "-" if value is None else value


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")
