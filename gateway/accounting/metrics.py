"""Prometheus metrics: requests, latency, tokens, cost by model and route, upstream errors."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.accounting.request_log import RequestRecord

__all__ = ["Metrics"]

# A scrape has the README's families alone, with one worker as with several: prometheus_client's
# ``_created`` series, which its multiprocess mode never writes, are off (t166).
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    """The gateway's metrics.

    With several worker processes (``multiprocess_dir`` set, as ``serve --workers N``
    does), values live in prometheus_client's per-process files and every scrape
    adds them up, so any worker answers ``/metrics`` with the whole gateway's figures.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Finished requests", ["route", "model", "status", "cache"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds", "Whole request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("gateway_tokens", "Tokens", ["model", "route", "kind"], registry=r)
        self.cost = Counter("gateway_cost_usd", "Cost in USD", ["model", "route"], registry=r)
        self.baseline_cost = Counter(
            "gateway_baseline_cost_usd",
            "Cost the same requests would have had on the baseline model",
            ["route"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Failed upstream attempts", ["upstream", "code"], registry=r
        )
        self._policy_versions = _PolicyVersions(multiprocess_dir)
        r.register(self._policy_versions)
        self.redis_up = Gauge(
            "gateway_redis_up",
            "1 when Redis answered the last call (every live worker)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.redis_timeouts = Counter(
            "gateway_redis_timeouts",
            "Redis calls abandoned at their deadline (the request went on without them)",
            registry=r,
        )
        self.redis_writes_refused = Counter(
            "gateway_redis_writes_refused",
            "Redis calls refused because its memory is full (maxmemory): skipped, the request went on; "
            "readiness probes' writes included",
            registry=r,
        )
        self.semantic_timeouts = Counter(
            "gateway_semantic_cache_timeouts",
            "Semantic lookups that gave up at a deadline and so were misses, by stage: the vector "
            "search (the Redis timeout) or the verifier's verdicts (verify_timeout_ms)",
            ["stage"],
            registry=r,
        )
        self.semantic_audits = Counter(
            "gateway_semantic_cache_audits",
            "Semantic hits also asked upstream; agree: true, false or undecided",
            ["route", "agree"],
            registry=r,
        )
        self.semantic_audit_costs = Counter(
            "gateway_semantic_cache_audit_cost_usd", "What the audits' upstream calls cost", ["route"], registry=r
        )
        self.shadow_judgements = Counter(
            "gateway_router_shadow_judgements",
            "Answers also asked of the other model and judged; outcome: small_enough, needed_large, "
            "undecided, failed, over_budget, skipped (backlog)",
            ["route", "outcome"],
            registry=r,
        )
        self.shadow_costs = Counter(
            "gateway_router_shadow_cost_usd",
            "What shadow answers and judgements cost (the operator's)",
            ["route"],
            registry=r,
        )
        self.feedback = Counter(
            "gateway_router_feedback",
            "Feedback received; label: needed_large, small_enough, none",
            ["label"],
            registry=r,
        )
        self.semantic_false_hits_ratio = Gauge(
            "gateway_semantic_cache_false_hits_ratio",
            "Estimated share of semantic hits whose answer was wrong (decided audits since the last tightening)",
            ["tenant", "route"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.semantic_verify_threshold = Gauge(
            "gateway_semantic_cache_verify_threshold",
            "The verifier threshold after self-tightening (0: semantic hits stopped)",
            ["tenant", "route"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._request_log_lines_lost = Counter(
            "gateway_request_log_lines_lost",
            "Request log lines a sink could not take (a full disk, a closed pipe); also said on stderr",
            registry=r,
        )
        self._children: dict[tuple[str, str, int, str], tuple] = {}  # type: ignore[type-arg]
        self._workers = None if multiprocess_dir is None else _Workers(multiprocess_dir, r, self._policy_versions)

    def observe(self, record: RequestRecord) -> None:
        route = record.route or "-"
        model = record.model or "-"
        key = (route, model, record.status, record.cache)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the updates: resolve each combination once
            children = self._children[key] = (
                self.requests.labels(route, model, str(record.status), record.cache),
                self.latency.labels(route),
                self.overhead.labels(route),
                self.tokens.labels(model, route, "prompt"),
                self.tokens.labels(model, route, "completion"),
                self.cost.labels(model, route),
                self.baseline_cost.labels(route),
            )
        requests, latency, overhead, prompt, completion, cost, baseline = children
        requests.inc()
        latency.observe(record.latency_ms / 1000)
        overhead.observe(record.overhead_ms / 1000)
        if record.prompt_tokens or record.completion_tokens:
            prompt.inc(record.prompt_tokens)
            completion.inc(record.completion_tokens)
        if record.cost_usd:
            cost.inc(record.cost_usd)
        if record.baseline_cost_usd:
            baseline.inc(record.baseline_cost_usd)

    def upstream_error(self, upstream: str, code: str | None) -> None:
        self.upstream_errors.labels(upstream, code or "unknown").inc()

    def request_log_lines_lost(self, lines: int) -> None:
        self._request_log_lines_lost.inc(lines)

    def semantic_timeout(self, stage: str) -> None:
        self.semantic_timeouts.labels(stage).inc()

    def semantic_audit(self, route: str, agree: str) -> None:
        self.semantic_audits.labels(route, agree).inc()

    def semantic_audit_cost(self, route: str, cost_usd: float) -> None:
        if cost_usd:
            self.semantic_audit_costs.labels(route).inc(cost_usd)

    def shadow_judgement(self, route: str, outcome: str, cost_usd: float) -> None:
        self.shadow_judgements.labels(route, outcome).inc()
        if cost_usd:
            self.shadow_costs.labels(route).inc(cost_usd)

    def feedback_received(self, label: str) -> None:
        self.feedback.labels(label).inc()

    def semantic_false_hits(self, tenant: str, route: str, ratio: float) -> None:
        self.semantic_false_hits_ratio.labels(tenant, route).set(ratio)

    def semantic_threshold(self, tenant: str, route: str, threshold: float | None) -> None:
        self.semantic_verify_threshold.labels(tenant, route).set(threshold or 0.0)

    def set_policy_version(self, version: str) -> None:
        self._policy_versions.put(version)

    def render(self) -> bytes:
        return generate_latest(self.registry if self._workers is None else self._workers)


class _Workers(Collector):
    """Every worker's figures added up from prometheus_client's multiprocess files, family by family
    as one worker's registry has them. Those files have no family that no worker has a sample of
    yet (a labelled one nothing counted): a scrape has it as a worker starts with it, HELP and TYPE
    and a label-less one's 0, so that absent() alerts and dashboards do not go by the worker count (t175)."""

    def __init__(self, directory: str, registry: CollectorRegistry, policy_versions: _PolicyVersions) -> None:
        self._directory = directory
        self._files = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        self._policy_versions = policy_versions
        self._as_started = [_as_started(family) for family in registry.collect()]

    def collect(self) -> Iterator[Metric]:
        _forget_dead_workers(self._directory)
        merged: dict[str, Metric] = {family.name: family for family in self._files.collect()}  # type: ignore[no-untyped-call]
        merged.update((family.name, family) for family in self._policy_versions.collect())
        for family in self._as_started:
            yield merged.pop(family.name, family)
        yield from merged.values()


def _as_started(family: Metric) -> Metric:
    """``family`` before anything is counted: no labelled series, and its label-less one at 0."""
    started = Metric(family.name, family.documentation, family.type, family.unit)
    started.samples = [sample._replace(value=0.0) for sample in family.samples if not sample.labels]
    return started


class _PolicyVersions(Collector):
    """``gateway_policy_info``: 1 for each policy version a live worker has in force, and no series
    for any other. A labelled gauge kept one series per version ever in force (t63: 10 after as
    many reloads, 9 at 0), and every edit or `keys new` makes a version. prometheus_client cannot
    remove a label in multiprocess mode (a worker's values stay in its file), so each worker
    writes its version to a file of its own, which a scrape reads while that worker lives."""

    _HELP = "Policy version in force (1 while any live worker uses it)"

    def __init__(self, directory: str | None) -> None:
        self._directory = directory
        self._version: str | None = None

    def put(self, version: str) -> None:
        self._version = version
        if self._directory is None:
            return
        path = os.path.join(self._directory, f"policy_version_{os.getpid()}")
        with open(f"{path}.tmp", "w", encoding="utf-8") as file:
            file.write(version)
        os.replace(f"{path}.tmp", path)  # a scrape reads the old version or the new, never half of one

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("gateway_policy_info", self._HELP, labels=["version"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("gateway_policy_info", self._HELP, labels=["version"])
        for version in sorted(self._versions()):
            family.add_metric([version], 1)
        yield family

    def _versions(self) -> set[str]:
        if self._directory is None:
            return set() if self._version is None else {self._version}
        versions: set[str] = set()
        for name in os.listdir(self._directory):
            found = _POLICY_VERSION_FILE.fullmatch(name)
            if found is None:
                continue
            path = os.path.join(self._directory, name)
            if not _alive(int(found.group(1))):  # replaced by the server: its version is not the gateway's
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            with contextlib.suppress(FileNotFoundError):  # removed by another worker's scrape
                with open(path, encoding="utf-8") as file:
                    versions.add(file.read())
        return versions


_POLICY_VERSION_FILE = re.compile(r"policy_version_(\d+)")


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def _forget_dead_workers(directory: str) -> None:
    """Drop the live-gauge files of workers that are gone (the server replaced them): their last
    ``redis_up`` is not the gateway's. Counters keep every worker's counts."""
    for name in os.listdir(directory):
        found = _LIVE_GAUGE_FILE.fullmatch(name)
        if found is None:
            continue
        pid = int(found.group(1))
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
