"""deploy/grafana/gateway-dashboard.json: parses, every panel queries something, metric names exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

_DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "gateway-dashboard.json"

# What gateway/accounting/metrics.py exports (counters get `_total`, histograms `_bucket`).
_PROMETHEUS_METRICS = {
    "gateway_requests_total",
    "gateway_request_duration_seconds_bucket",
    "gateway_overhead_seconds_bucket",
    "gateway_tokens_total",
    "gateway_cost_usd_total",
    "gateway_baseline_cost_usd_total",
    "gateway_upstream_errors_total",
    "gateway_redis_up",
    "gateway_router_shadow_cost_usd_total",
    "gateway_semantic_cache_audit_cost_usd_total",
}
_DATASOURCES = {"loki": "${loki}", "prometheus": "${prometheus}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == 2
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for r in rows for p in r.get("panels", [])]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name, kind in (("loki", "loki"), ("prometheus", "prometheus")):
        assert variables[name]["type"] == "datasource" and variables[name]["query"] == kind
    assert {"tenant", "model"} <= set(variables)
    assert variables["model"]["datasource"]["uid"] == "${prometheus}"
    # (t70) "-" (no model was tried) matches nothing in the Loki panels, where such lines have null
    listed = re.compile(variables["model"]["regex"].strip("/"))
    assert not listed.search("-") and listed.search("large") and listed.search("gpt-4o")


def test_every_panel_has_a_datasource_and_a_query(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    assert len(panels) >= 14
    for panel in panels:
        source = panel["datasource"]
        assert _DATASOURCES[source["type"]] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", source) == source, panel["title"]
    kinds = {panel["datasource"]["type"] for panel in panels}
    assert kinds == {"loki", "prometheus"}


def test_loki_queries_read_request_lines_of_the_gateway(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        if panel["datasource"]["type"] != "loki":
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            assert '{app="llm-gateway"}' in expr and "| json" in expr and 'event="request"' in expr, expr
            assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), expr
            for unwrapped in re.findall(r"\| unwrap (\w+)", expr):
                assert unwrapped in {"cost_usd", "baseline_cost_usd", "cache_saved_usd", "prompt_tokens",
                                     "completion_tokens", "latency_ms", "overhead_ms", "large"}, expr  # fmt: skip
    titles = " ".join(p["title"].lower() for p in _panels(dashboard) if p["datasource"]["type"] == "loki")
    for topic in ("model", "tenant", "cache", "savings", "tokens", "p95"):
        assert topic in titles


def test_the_large_share_panel_counts_the_routers_documented_decisions(dashboard: dict[str, Any]) -> None:
    """Ops compare this panel with a route's target_large_share (issue 15): it must count the
    `decision` values the request log documents for the classifier's two outcomes."""
    (panel,) = [p for p in _panels(dashboard) if "sent to large" in p["title"]]
    expr = panel["targets"][0]["expr"]
    # the classifier's two picks only; "unreadable" (an image, a file: large, outside the share) is not one (t72)
    assert re.findall(r'decision=~"([\w|]+)"', expr) == ["small|large"]
    assert '{{ if eq .decision "large" }}1{{ else }}0{{ end }}' in expr and "| unwrap large" in expr
    assert expr.startswith("avg_over_time(") and expr.endswith("by (route)")  # a mean: 0, not a gap, with no large
    documented = (Path(__file__).resolve().parents[2] / "docs" / "request-log.md").read_text(encoding="utf-8")
    (row,) = [line for line in documented.splitlines() if line.startswith("| `decision` |")]
    assert "`small`/`large` (the classifier)" in row and "`unreadable`" in row


def test_prometheus_queries_use_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in _panels(dashboard):
        if panel["datasource"]["type"] != "prometheus":
            continue
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bgateway_[a-z0-9_]+\b", expr))
            assert names, expr
            assert names <= _PROMETHEUS_METRICS, names - _PROMETHEUS_METRICS
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            used |= names
    assert used == _PROMETHEUS_METRICS  # and every one of them is on the dashboard


def test_the_gateway_exports_those_metrics() -> None:
    from gateway.accounting.metrics import Metrics
    from gateway.accounting.request_log import RequestRecord

    metrics = Metrics()
    metrics.observe(RequestRecord(request_id="r", key_id="k", tenant="t", route="auto", model="small",
                                  prompt_tokens=1, completion_tokens=1, cost_usd=1.0, baseline_cost_usd=2.0))  # fmt: skip
    metrics.upstream_error("small", "timeout")
    metrics.redis_up.set(1)
    metrics.shadow_judgement("auto", "small_enough", 0.001)
    metrics.semantic_audit_cost("auto", 0.001)
    exported = set(re.findall(r"^(gateway_[a-z0-9_]+)", metrics.render().decode(), flags=re.MULTILINE))
    assert exported >= _PROMETHEUS_METRICS
