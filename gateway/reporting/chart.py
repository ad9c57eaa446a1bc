"""``--png``: cost per day stacked by model, and savings per day split into routing and cache.

matplotlib is an optional dependency (the ``report`` extra), imported only here and
only when a chart is asked for. The figure is drawn on an Agg canvas without pyplot,
so no global backend or figure state is touched.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.reporting.aggregate import Aggregator

__all__ = ["ChartUnavailable", "render_png", "usd"]

_MAX_MODELS = 8
"""Models beyond the most expensive ``_MAX_MODELS - 1`` are drawn together as "other"."""


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def render_png(aggregator: Aggregator, path: str | os.PathLike[str]) -> None:
    """Write a three-panel PNG chart of ``aggregator``'s days to ``path``: spend by model, what
    routing and cache hits saved, and actual against baseline cost, each on its own axis."""
    figure_class, canvas_class = _matplotlib()
    days = [str(group[0]) for group, _ in aggregator.rows(("day",))]
    figure = figure_class(figsize=(max(12.0, 0.35 * len(days) + 6), 10), layout="constrained")
    canvas_class(figure)
    cost_axes, savings_axes, compare_axes = figure.subplots(3, 1, sharex=True)
    if not days:
        for axes in (cost_axes, savings_axes, compare_axes):
            axes.text(0.5, 0.5, "no requests in the period", ha="center", va="center", transform=axes.transAxes)
        figure.savefig(path, format="png")
        return
    _cost_panel(cost_axes, aggregator, days)
    _savings_panel(savings_axes, aggregator, days)
    _comparison_panel(compare_axes, aggregator, days)
    for axes in (cost_axes, savings_axes, compare_axes):
        axes.yaxis.set_major_formatter(_TickFormatter())
        axes.set_ylabel("USD")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        axes.set_xlim(-0.75, len(days) - 0.25)
    step = max(1, len(days) // 20)
    compare_axes.set_xticks(range(0, len(days), step), days[::step], rotation=45 if len(days) > 1 else 0, ha="right")
    figure.savefig(path, format="png", dpi=100)


def usd(value: float) -> str:
    """Amounts as people read them: cents above a dollar, three significant figures below it
    (a small deployment spends fractions of a cent a day: $0.0053 must not read 0.01)."""
    if value == 0:
        return "0 USD"
    if abs(value) >= 1:
        return f"{value:,.2f} USD"
    return f"{value:.3g} USD"


class _TickFormatter:
    """matplotlib calls it as ``formatter(value, position)``; significant figures, no unit."""

    def __call__(self, value: float, position: int | None = None) -> str:
        return usd(value).removesuffix(" USD")

    # What matplotlib's Axis asks of a formatter object besides being callable.
    def set_axis(self, axis: Any) -> None:
        pass

    def set_locs(self, locs: Any) -> None:
        pass

    def format_ticks(self, values: list[float]) -> list[str]:
        return [self(value) for value in values]

    def get_offset(self) -> str:
        return ""


def _cost_panel(axes: Any, aggregator: Aggregator, days: list[str]) -> None:
    position = {day: i for i, day in enumerate(days)}
    series: dict[str, list[float]] = {}
    for (day, model), totals in aggregator.rows(("day", "model")):
        if model is None or not totals.cost_usd:
            continue  # cache hits and refused requests cost nothing: they are in the savings panel
        series.setdefault(str(model), [0.0] * len(days))[position[str(day)]] += totals.cost_usd
    ranked = sorted(series, key=lambda name: -sum(series[name]))
    if len(ranked) > _MAX_MODELS:
        other = [sum(values) for values in zip(*(series.pop(name) for name in ranked[_MAX_MODELS - 1 :]), strict=False)]
        ranked = [*ranked[: _MAX_MODELS - 1], "other"]
        series["other"] = other
    bottom = [0.0] * len(days)
    for name in ranked:
        axes.bar(range(len(days)), series[name], bottom=bottom, label=name, width=0.8)
        bottom = [b + v for b, v in zip(bottom, series[name], strict=False)]
    total = aggregator.total()
    axes.set_title(f"Spend per day by model: {usd(total.cost_usd)} in {len(days)} day(s), {total.requests:,} requests")


def _savings_panel(axes: Any, aggregator: Aggregator, days: list[str]) -> None:
    rows = [totals for _, totals in aggregator.rows(("day",))]
    cache = [t.cache_saved_usd for t in rows]
    routing = [t.savings_usd - t.cache_saved_usd for t in rows]
    x = range(len(days))
    axes.bar(x, routing, label="saved by routing (a cheaper model answered)", color="tab:green", width=0.8)
    axes.bar(
        x,
        cache,
        bottom=[max(r, 0.0) for r in routing],
        label="saved by cache hits (no model called)",
        color="tab:olive",
        width=0.8,
    )
    axes.axhline(0, color="black", linewidth=0.6)
    total = aggregator.total()
    share = "" if total.savings_pct is None else f" ({total.savings_pct:.1f}% of the baseline)"
    hits = total.cache_exact + total.cache_semantic
    axes.set_title(
        f"Saved per day: {usd(total.savings_usd)}{share}\n"
        f"by routing {usd(total.savings_usd - total.cache_saved_usd)}, by {hits:,} cache hit(s) {usd(total.cache_saved_usd)}"
    )


def _comparison_panel(axes: Any, aggregator: Aggregator, days: list[str]) -> None:
    rows = [totals for _, totals in aggregator.rows(("day",))]
    x = range(len(days))
    axes.plot(
        x,
        [t.baseline_cost_usd for t in rows],
        color="tab:gray",
        marker="o",
        label="baseline (every request on the baseline model)",
    )
    axes.plot(x, [t.cost_usd for t in rows], color="tab:red", marker="o", label="actual spend")
    axes.set_ylim(bottom=0)
    total = aggregator.total()
    axes.set_title(f"Actual {usd(total.cost_usd)} against baseline {usd(total.baseline_cost_usd)}")


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartUnavailable("--png needs matplotlib: pip install 'llm-gateway[report]'") from None
    return Figure, FigureCanvasAgg
