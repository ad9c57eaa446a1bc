"""``--png``: cost per day stacked by model, and savings per day split into routing and cache.

matplotlib is an optional dependency (the ``report`` extra), imported only here and
only when a chart is asked for. The figure is drawn on an Agg canvas without pyplot,
so no global backend or figure state is touched.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.reporting.aggregate import Aggregator

__all__ = ["ChartUnavailable", "render_png"]

_MAX_MODELS = 8
"""Models beyond the most expensive ``_MAX_MODELS - 1`` are drawn together as "other"."""


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def render_png(aggregator: Aggregator, path: str | os.PathLike[str]) -> None:
    """Write a two-panel PNG chart of ``aggregator``'s days to ``path``."""
    figure_class, canvas_class = _matplotlib()
    days = [str(group[0]) for group, _ in aggregator.rows(("day",))]
    figure = figure_class(figsize=(max(10.0, 0.4 * len(days) + 5), 8), layout="constrained")
    canvas_class(figure)
    cost_axes, savings_axes = figure.subplots(2, 1, sharex=True)
    if not days:
        for axes in (cost_axes, savings_axes):
            axes.text(0.5, 0.5, "no requests in the period", ha="center", va="center", transform=axes.transAxes)
        figure.savefig(path, format="png")
        return
    _cost_panel(cost_axes, aggregator, days)
    _savings_panel(savings_axes, aggregator, days)
    step = max(1, len(days) // 20)
    savings_axes.set_xticks(range(0, len(days), step), days[::step], rotation=45, ha="right")
    figure.savefig(path, format="png", dpi=100)


def _cost_panel(axes: Any, aggregator: Aggregator, days: list[str]) -> None:
    position = {day: i for i, day in enumerate(days)}
    series: dict[str, list[float]] = {}
    for (day, model), totals in aggregator.rows(("day", "model")):
        name = "(no model)" if model is None else str(model)
        series.setdefault(name, [0.0] * len(days))[position[str(day)]] += totals.cost_usd
    ranked = sorted(series, key=lambda name: -sum(series[name]))
    if len(ranked) > _MAX_MODELS:
        other = [sum(values) for values in zip(*(series.pop(name) for name in ranked[_MAX_MODELS - 1 :]))]
        ranked = [*ranked[: _MAX_MODELS - 1], "other"]
        series["other"] = other
    bottom = [0.0] * len(days)
    for name in ranked:
        axes.bar(range(len(days)), series[name], bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, series[name])]
    total = aggregator.total()
    axes.set_title(f"Cost per day by model (total {total.cost_usd:,.2f} USD)")
    axes.set_ylabel("USD")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes.grid(axis="y", alpha=0.3)


def _savings_panel(axes: Any, aggregator: Aggregator, days: list[str]) -> None:
    rows = [totals for _, totals in aggregator.rows(("day",))]
    cache = [t.cache_saved_usd for t in rows]
    routing = [t.savings_usd - t.cache_saved_usd for t in rows]
    x = range(len(days))
    axes.bar(x, routing, label="routing (cheaper model)", color="tab:green")
    axes.bar(x, cache, bottom=[max(r, 0.0) for r in routing], label="cache hits", color="tab:olive")
    axes.plot(x, [t.baseline_cost_usd for t in rows], color="tab:gray", marker=".", label="baseline cost")
    axes.plot(x, [t.cost_usd for t in rows], color="tab:red", marker=".", label="actual cost")
    total = aggregator.total()
    share = "" if total.savings_pct is None else f", {total.savings_pct:.1f}% of baseline"
    axes.set_title(
        f"Savings per day, baseline − actual: {total.savings_usd:,.2f} USD{share}\n"
        f"(of which cache hits {total.cache_saved_usd:,.2f} USD)"
    )
    axes.set_ylabel("USD")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes.grid(axis="y", alpha=0.3)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartUnavailable("--png needs matplotlib: pip install 'llm-gateway[report]'") from None
    return Figure, FigureCanvasAgg
