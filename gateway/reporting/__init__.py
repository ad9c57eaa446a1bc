"""Cost and savings reports over the request log (``python -m gateway report``)."""

from gateway.reporting.aggregate import DIMENSIONS, Aggregator, Totals, aggregate_path, parse_when

__all__ = ["DIMENSIONS", "Aggregator", "Totals", "aggregate_path", "parse_when"]
