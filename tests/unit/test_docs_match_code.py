"""What docs/request-log.md and the README name is what the code writes: finance dashboards and
alerts are built from the docs, so a code or metric left out of them is one nobody counts (t119)."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.errors import _CODES_CLIENTS_ACT_ON

_ROOT = Path(__file__).resolve().parents[2]
_NO_LOG_LINE = {
    "not_found": "/v1/feedback (an unknown request id), an unknown path",
    "conflict": "/v1/feedback (a route that no longer learns)",
    "feedback_unavailable": "/v1/feedback",
    "usage_unavailable": "/v1/usage",
    "service_unavailable": "the base class of the 503s, never raised as it is",
    "body_unreadable": "answered for a body the server says its client left half-sent, logged client_disconnected",
}
"""Codes only endpoints that write no request-log line answer with."""


def _codes_in_the_code() -> set[str]:
    """Every error code the gateway can tell a client or log: a ``code`` set in the code, OpenAI's
    codes passed on as the upstream wrote them, what ``record.error_type`` is set to outright, and
    ``invalid_request_error`` (a 400 with no code logs its type)."""
    codes = set(_CODES_CLIENTS_ACT_ON) | {"invalid_request_error"}
    for path in (_ROOT / "gateway").rglob("*.py"):
        if "simulated" in path.parts:  # the test upstreams' own errors
            continue
        text = path.read_text(encoding="utf-8")
        codes |= set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', text))
        for line in text.splitlines():
            if "record.error_type" in line and "=" in line:
                codes |= set(re.findall(r'"([a-z_]+)"', line.split("#")[0]))
    return codes


def _documented_error_types() -> set[str]:
    text = (_ROOT / "docs" / "request-log.md").read_text(encoding="utf-8")
    section = text.split("## `error_type`", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_every_error_type_the_gateway_can_log_is_documented() -> None:
    logged = _codes_in_the_code() - set(_NO_LOG_LINE)
    documented = _documented_error_types()
    assert logged - documented == set(), "error types the request log can carry but its doc does not list"
    assert documented - logged == set(), "error types the doc lists but no code writes"


def _families_in_the_code() -> dict[str, set[str]]:
    """Every family ``/metrics`` exports, as a scrape names it, with its labels."""
    from prometheus_client.metrics import MetricWrapperBase

    from gateway.accounting.metrics import Metrics

    metrics = Metrics()
    metrics.set_policy_version("v")
    labels = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    families: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = labels.get(family.name, set())
    families["gateway_policy_info"] = {"version"}  # a collector of its own, not a wrapper
    return families


def _families_in_the_readme() -> dict[str, set[str]]:
    text = (_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(gateway_\w+)` \| \w+ \|([^|]*)\|", section, flags=re.MULTILINE)
    return {name: set(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


def test_every_metric_family_is_named_in_the_readme_with_its_labels() -> None:
    assert _families_in_the_readme() == _families_in_the_code()


def test_a_scrape_has_no_series_the_readme_does_not_list() -> None:
    """t166: a single worker's scrape also had prometheus_client's ``_created`` series
    (``gateway_requests_created``, ...), which the README's table of every family does not list."""
    from gateway.accounting.metrics import Metrics

    metrics = Metrics()
    metrics.set_policy_version("v")
    metrics.upstream_error("small", "timeout")
    metrics.latency.labels("fast").observe(0.1)
    listed = set(_families_in_the_readme())
    scraped = {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    unlisted = {
        name for name in scraped if re.sub(r"_(bucket|sum|count)$", "", name) not in listed and name not in listed
    }
    assert unlisted == set()
