"""``python -m gateway report``: totals from a synthetic request log whose figures are known.

The log mixes valid request lines with every kind of line the aggregator must skip
(malformed, blank, other events, a truncated last line); expected totals come from a
plain dict-based reference computed here, plus a small log with hand-written figures.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import random
import subprocess
import sys
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.cli import main as cli_main
from gateway.cli import report
from gateway.reporting.aggregate import (
    DIMENSIONS,
    Aggregator,
    Totals,
    aggregate_path,
    parse_dimensions,
    parse_until,
    parse_when,
)
from gateway.reporting.table import render_json, render_table

_ROOT = Path(__file__).resolve().parents[2]

_KEYS = [("key-a", "acme"), ("key-b", "acme"), ("key-c", "globex"), ("key-d", "globex"), ("key-e", "initech")]
_MODELS = [("small", "openai"), ("large", "anthropic"), ("mini", "openai")]
_ROUTES = ["auto", "fast", "best"]
_DAYS = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]


# --- the synthetic log --------------------------------------------------------------------


def _request(rng: random.Random, i: int) -> dict[str, Any]:
    """One request line with every field the gateway writes, varied on every axis."""
    key_id, tenant = rng.choice(_KEYS)
    model, provider = rng.choice(_MODELS)
    route = rng.choice(_ROUTES)
    day = _DAYS[i % len(_DAYS)]
    ts = f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(10**6):06d}Z"
    if i % 17 == 0:
        ts = ts.replace("Z", "+00:00")
    prompt, completion = rng.randint(1, 3000), rng.randint(0, 900)
    baseline = round(prompt * 3e-6 + completion * 15e-6, 12)
    roll = rng.random()
    cache = "exact" if roll < 0.15 else "semantic" if roll < 0.25 else "miss" if roll < 0.7 else "bypass"
    errors = [(400, "invalid_request_error"), (502, "upstream_bad_response"), (499, "client_disconnected")]
    status, error = (200, None) if rng.random() > 0.1 else rng.choice(errors)
    hit = cache in ("exact", "semantic") and status == 200
    cost = 0.0 if hit else round(prompt * rng.choice([0.15e-6, 3e-6]) + completion * 0.6e-6, 12)
    return {
        "request_id": f"req-{i}", "key_id": key_id, "tenant": tenant, "route": route, "decision": "fixed",
        "model": model, "provider": provider, "cache": cache, "stream": bool(i % 2), "status": status,
        "prompt_tokens": prompt, "completion_tokens": completion, "tokens_source": "upstream",
        "cost_usd": cost, "baseline_model": "large", "baseline_cost_usd": baseline,
        "latency_ms": 12.5, "ttft_ms": None, "overhead_ms": 0.4, "upstream_status": status, "retries": 0,
        "fallback_used": False, "error_type": error, "finish_reason": None, "policy_version": "abc123",
        "cache_saved_usd": round(cost + baseline / 4, 12) if hit else None, "cache_similarity": None,
        "schema_version": 1, "event": "request", "level": "info", "ts": ts,
    } | (_V2_FIELDS if i % 2 else {})  # fmt: skip


# Half the synthetic lines are schema 2: the report reads a log that spans the upgrade.
_V2_FIELDS = {"schema_version": 2, "cached_prompt_tokens": 3, "cache_write_tokens": 0, "reasoning_tokens": 1,
              "protocol": "anthropic.messages"}  # fmt: skip


def _unrouted(i: int) -> dict[str, Any]:
    """A request refused before routing: no route, no model, no tokens."""
    return {
        "request_id": f"req-{i}", "key_id": "-", "tenant": "-", "route": None, "decision": None, "model": None,
        "provider": None, "cache": "bypass", "stream": False, "status": 401, "prompt_tokens": 0,
        "completion_tokens": 0, "cost_usd": 0, "baseline_model": None, "baseline_cost_usd": 0,
        "latency_ms": 0.3, "overhead_ms": 0.3, "error_type": "invalid_api_key", "schema_version": 1,
        "event": "request", "level": "info", "ts": "2026-03-02T10:00:00Z",
    }  # fmt: skip


_MALFORMED = [
    b"[gateway] REDIS_URL is unset: started a private Redis 8\n",  # not JSON
    b"Traceback (most recent call last):\n",
    b"[1, 2, 3]\n",  # JSON, not an object
    b"42\n",
    b'"request"\n',
    b'{"event":"request","ts":"2026-03-01T00:00:00Z","key_id":"k"}\n',  # fields missing
    b'{"event":"request","ts":"2026-03-01T00:00:00Z","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":"200","prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":1}\n',  # status is a string
    b'{"event":"request","ts":"2026-03-01T00:00:00","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":1}\n',  # ts without zone
    b'{"event":"request","ts":"yesterday","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":1}\n',
    b'{"event":"request","ts":"2026-03-01T00:00:00Z","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":200,"prompt_tokens":1.5,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":1}\n',
    b'{"event":"request","ts":"2026-03-01T00:00:00Z","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":"free","baseline_cost_usd":1}\n',
    b'{"event":"request", "key_id": \n',  # broken JSON
]
_OTHER_EVENTS = [
    b'{"event":"policy_loaded","version":"abc123","level":"info","ts":"2026-03-01T00:00:00Z"}\n',
    b'{"event":"redis_unavailable","error":"refused","level":"warning","ts":"2026-03-02T00:00:00Z"}\n',
    b'{"event": "tokenizer_fallback", "model": "small", "ts": "2026-03-03T00:00:00Z"}\n',
    b'{"level":"info","msg":"no event field at all"}\n',
    # every request field present, but another event: must not be counted
    b'{"event":"request_replayed","ts":"2026-03-01T00:00:00Z","key_id":"k","tenant":"t","route":"auto","model":"small",'
    b'"cache":"miss","status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":1}\n',
]
_BLANK = [b"\n", b"   \n", b"\r\n"]


class SyntheticLog:
    def __init__(self, requests: int = 600, seed: int = 20260301) -> None:
        rng = random.Random(seed)
        self.records = [_request(rng, i) for i in range(requests)]
        self.records += [_unrouted(requests), _unrouted(requests + 1)]
        lines = [msgspec.json.encode(r) + b"\n" for r in self.records]
        lines[3] = json.dumps(self.records[3], indent=None).encode() + b"\r\n"  # spaced JSON, CRLF: still valid
        noise = [*_MALFORMED, *_OTHER_EVENTS, *_BLANK]
        for position, extra in zip(rng.sample(range(len(lines)), len(noise)), noise, strict=False):
            lines.insert(position, extra)
        truncated = msgspec.json.encode(_request(rng, 99_999))[:150]  # the writer was killed mid-line
        self.data = b"".join(lines) + truncated
        self.lines = len(lines) + 1
        self.malformed = len(_MALFORMED) + 1
        self.ignored = len(_OTHER_EVENTS)
        self.blank = len(_BLANK)


def _day(record: dict[str, Any]) -> str:
    return datetime.fromisoformat(record["ts"]).astimezone(UTC).date().isoformat()


_FIELD = {"key": "key_id", "tenant": "tenant", "model": "model", "route": "route"}


def _reference(records: Iterable[dict[str, Any]], by: Sequence[str]) -> dict[tuple[Any, ...], dict[str, float]]:
    """The expected totals, computed the obvious way."""
    groups: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        group = tuple(_day(r) if name == "day" else r[_FIELD[name]] for name in by)
        g = groups[group]
        g["requests"] += 1
        g["errors"] += r["status"] >= 400
        g["prompt_tokens"] += r["prompt_tokens"]
        g["completion_tokens"] += r["completion_tokens"]
        g["cost_usd"] += r["cost_usd"]
        g["baseline_cost_usd"] += r["baseline_cost_usd"]
        g["savings_usd"] += r["baseline_cost_usd"] - r["cost_usd"]
        g["cache_exact"] += r["cache"] == "exact"
        g["cache_semantic"] += r["cache"] == "semantic"
        g["cache_hits"] += r["cache"] in ("exact", "semantic")
        g["cache_saved_usd"] += r.get("cache_saved_usd") or 0.0
    return {group: dict(figures) for group, figures in groups.items()}


def _assert_matches(
    actual: dict[tuple[Any, ...], dict[str, Any]], expected: dict[tuple[Any, ...], dict[str, float]]
) -> None:
    assert set(actual) == set(expected)
    for group, figures in expected.items():
        got = actual[group]
        for name, value in figures.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (group, name)
        if figures["baseline_cost_usd"]:
            pct = 100 * figures["savings_usd"] / figures["baseline_cost_usd"]
            assert got["savings_pct"] == pytest.approx(pct, abs=0.01), group


def _rows(aggregator: Aggregator, by: Sequence[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {group: totals.as_dict() for group, totals in aggregator.rows(by)}


@pytest.fixture(scope="module")
def synthetic() -> SyntheticLog:
    return SyntheticLog()


@pytest.fixture(scope="module")
def log_file(synthetic: SyntheticLog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "requests.log"
    path.write_bytes(synthetic.data)
    return path


@pytest.fixture(scope="module")
def aggregated(log_file: Path) -> Aggregator:
    return aggregate_path(str(log_file))


# --- totals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "by",
    [(), ("day",), ("key",), ("tenant",), ("model",), ("route",), ("day", "model"), ("model", "day"),
     ("tenant", "key", "route"), DIMENSIONS],
)  # fmt: skip
def test_totals_match_the_reference_for_every_grouping(
    synthetic: SyntheticLog, aggregated: Aggregator, by: tuple[str, ...]
) -> None:
    _assert_matches(_rows(aggregated, by), _reference(synthetic.records, by))


def test_groups_come_in_the_order_asked_and_sorted(aggregated: Aggregator) -> None:
    groups = [group for group, _ in aggregated.rows(("model", "day"))]
    assert groups == sorted(groups, key=lambda g: tuple("" if v is None else v for v in g))
    assert groups[0] == (None, "2026-03-02")  # the unrouted requests have no model
    assert {g[1] for g in groups} == set(_DAYS)


def test_skipped_lines_are_classified_and_counted(synthetic: SyntheticLog, aggregated: Aggregator) -> None:
    assert aggregated.counters() == {
        "lines": synthetic.lines,
        "requests": len(synthetic.records),
        "out_of_period": 0,
        "ignored": synthetic.ignored,
        "blank": synthetic.blank,
        "malformed": synthetic.malformed,
    }


def test_hand_computed_figures() -> None:
    """Three requests on two days; every figure worked out by hand."""
    lines = [
        {"ts": "2026-05-01T08:00:00Z", "key_id": "k1", "tenant": "t1", "route": "auto", "model": "small",
         "cache": "miss", "status": 200, "prompt_tokens": 100, "completion_tokens": 50,
         "cost_usd": 0.25, "baseline_cost_usd": 1.0},
        {"ts": "2026-05-01T09:00:00Z", "key_id": "k1", "tenant": "t1", "route": "auto", "model": "small",
         "cache": "exact", "status": 200, "prompt_tokens": 100, "completion_tokens": 50,
         "cost_usd": 0.0, "baseline_cost_usd": 1.0, "cache_saved_usd": 0.25},
        {"ts": "2026-05-02T23:59:59.999999Z", "key_id": "k2", "tenant": "t2", "route": "best", "model": "large",
         "cache": "bypass", "status": 502, "prompt_tokens": 10, "completion_tokens": 0,
         "cost_usd": 0.5, "baseline_cost_usd": 0.5},
    ]  # fmt: skip
    aggregator = Aggregator()
    aggregator.feed(msgspec.json.encode({**line, "event": "request"}) for line in lines)
    total = aggregator.total()
    assert (total.requests, total.errors, total.prompt_tokens, total.completion_tokens) == (3, 1, 210, 100)
    assert (total.cost_usd, total.baseline_cost_usd, total.savings_usd) == (0.75, 2.5, 1.75)
    assert (total.cache_exact, total.cache_semantic, total.cache_hits, total.cache_saved_usd) == (1, 0, 1, 0.25)
    assert total.savings_pct == pytest.approx(70.0)
    days = dict(aggregator.rows(("day",)))
    assert days[("2026-05-01",)].savings_usd == 1.75 and days[("2026-05-01",)].savings_pct == 87.5
    assert days[("2026-05-02",)].savings_usd == 0.0 and days[("2026-05-02",)].errors == 1
    assert Totals().savings_pct is None


# --- the period -----------------------------------------------------------------------------


def test_since_and_until_keep_a_half_open_period(synthetic: SyntheticLog, log_file: Path) -> None:
    since, until = parse_when("2026-03-02"), parse_when("2026-03-03T12:00:00+02:00")  # 10:00 UTC
    aggregator = aggregate_path(str(log_file), since, until)
    kept = [r for r in synthetic.records if since <= datetime.fromisoformat(r["ts"]) < until]
    assert 0 < len(kept) < len(synthetic.records)
    _assert_matches(_rows(aggregator, ("day", "tenant")), _reference(kept, ("day", "tenant")))
    assert aggregator.out_of_period == len(synthetic.records) - len(kept)
    assert aggregator.malformed == synthetic.malformed


def test_a_record_exactly_at_since_is_in_and_at_until_is_out() -> None:
    line = b'{"event":"request","ts":"%s","key_id":"k","tenant":"t","route":"auto","model":"m","cache":"miss",' \
           b'"status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":2}'  # fmt: skip
    aggregator = Aggregator(parse_when("2026-01-01"), parse_when("2026-01-02"))
    aggregator.feed(
        [line % b"2026-01-01T00:00:00Z", line % b"2026-01-02T00:00:00Z", line % b"2026-01-02T01:00:00+02:00"]
    )
    assert aggregator.total().requests == 2  # the last one is 23:00 UTC on the 1st
    assert aggregator.rows(("day",))[0][0] == ("2026-01-01",)
    assert aggregator.out_of_period == 1


def test_parse_when_forms() -> None:
    now = datetime(2026, 3, 10, 12, 30, 15, 123456, tzinfo=UTC)
    assert parse_when("7d", now=now) == datetime(2026, 3, 3, 12, 30, 15, tzinfo=UTC)
    assert parse_when("24h", now=now) == datetime(2026, 3, 9, 12, 30, 15, tzinfo=UTC)
    assert parse_when("30m", now=now) == datetime(2026, 3, 10, 12, 0, 15, tzinfo=UTC)
    assert parse_when("2w", now=now) == datetime(2026, 2, 24, 12, 30, 15, tzinfo=UTC)
    assert parse_when("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_when("2026-03-01T06:00") == datetime(2026, 3, 1, 6, tzinfo=UTC)
    assert parse_when("2026-03-01T06:00:00Z") == datetime(2026, 3, 1, 6, tzinfo=UTC)
    assert parse_when("2026-03-01T06:00:00-05:00") == datetime(2026, 3, 1, 11, tzinfo=UTC)
    for bad in ("yesterday", "7y", "", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_when(bad)


def test_until_a_date_is_through_that_day_and_a_datetime_is_exact() -> None:
    """t63: a date --until counts its whole day, as /v1/usage's end; times stay the first left out."""
    now = datetime(2026, 3, 10, 12, 30, 15, tzinfo=UTC)
    assert parse_until("2026-03-01") == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_until("2026-03-01T00:00Z") == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_until("2026-03-01T06:00:00-05:00") == datetime(2026, 3, 1, 11, tzinfo=UTC)
    assert parse_until("1d", now=now) == datetime(2026, 3, 9, 12, 30, 15, tzinfo=UTC)
    assert parse_until("9999-12-31") == datetime.max.replace(tzinfo=UTC)


def test_relative_since_through_the_cli(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Everything in the log is years before "now - 1d": nothing is counted, nothing breaks."""
    assert cli_main(["report", str(log_file), "--since", "1d", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"]["requests"] == 0 and document["rows"] == []
    assert document["lines"]["out_of_period"] > 0


def test_a_request_is_reported_on_the_day_it_started_as_usage_counts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t114: a request begun on January 31st and answered after midnight is January's in
    ``/v1/usage`` and the budgets; the report filed it by ``ts`` (its end), in February. A line
    from before ``started_at`` was logged still goes by ``ts``."""
    line = {"event": "request", "key_id": "k", "tenant": "t", "route": "auto", "model": "m", "cache": "miss",
            "status": 200, "prompt_tokens": 1, "completion_tokens": 1, "baseline_cost_usd": 2}  # fmt: skip
    log = tmp_path / "requests.log"
    log.write_text(
        json.dumps(line | {"cost_usd": 1, "started_at": "2026-01-31T23:59:59.500000Z", "ts": "2026-02-01T00:00:01Z"})
        + "\n"
        + json.dumps(line | {"cost_usd": 4, "ts": "2026-02-01T00:00:02Z"})  # an older line: no started_at
        + "\n"
    )
    assert cli_main(["report", str(log), "--by", "day", "--format", "json"]) == 0
    rows = {row["day"]: row["cost_usd"] for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows == {"2026-01-31": 1, "2026-02-01": 4}
    assert cli_main(["report", str(log), "--since", "2026-02-01", "--until", "2026-02-28", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["total"]["cost_usd"], document["lines"]["out_of_period"]) == (4, 1)


# --- the command line -------------------------------------------------------------------------


def test_cli_subprocess_reads_stdin_and_writes_json(synthetic: SyntheticLog) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "report", "-", "--by", "tenant,model", "--format", "json"],
        input=synthetic.data, capture_output=True, cwd=_ROOT, timeout=60, check=True,
    )  # fmt: skip
    document = json.loads(done.stdout)
    assert document["by"] == ["tenant", "model"]
    assert document["lines"]["malformed"] == synthetic.malformed
    rows = {(row["tenant"], row["model"]): row for row in document["rows"]}
    _assert_matches(rows, _reference(synthetic.records, ("tenant", "model")))
    total = _reference(synthetic.records, ())[()]
    assert document["total"]["cost_usd"] == pytest.approx(total["cost_usd"], abs=1e-8)
    assert b"malformed" in done.stderr


def test_cli_csv(synthetic: SyntheticLog, log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(log_file), "--by", "day,route", "--format", "csv"]) == 0
    out = capsys.readouterr()
    table = list(csv.DictReader(io.StringIO(out.out)))
    assert list(table[0])[:4] == ["day", "route", "requests", "errors"]
    assert all(row["route"] for row in table)  # t166: a missing route is "-", as the table prints it
    rows = {
        (row["day"], None if row["route"] == "-" else row["route"]): {
            k: float(v) for k, v in row.items() if k not in ("day", "route") and v
        }
        for row in table
    }  # fmt: skip
    assert any(route is None for _, route in rows)
    expected = _reference(synthetic.records, ("day", "route"))
    assert set(rows) == set(expected)
    for group, figures in expected.items():
        for name, value in figures.items():
            assert rows[group][name] == pytest.approx(value, abs=1e-8), (group, name)
    assert f"{synthetic.malformed} malformed" in out.err


def test_cli_table(synthetic: SyntheticLog, log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(log_file), "--by", "model"]) == 0
    out = capsys.readouterr().out.splitlines()
    header, rule = out[0], out[1]
    assert header.split()[:3] == ["model", "requests", "errors"]
    total_row = next(line for line in out if line.startswith("TOTAL"))
    expected = _reference(synthetic.records, ())[()]
    assert total_row.split()[1] == f"{int(expected['requests']):,}"
    assert f"{expected['cost_usd']:,.4f}" in total_row
    # columns line up: every figure ends where its header ends
    ends = [i + 1 for i, c in enumerate(rule) if c == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    for line in [*out[2:5], total_row]:
        for end in ends[1:]:
            assert line[end - 1] != " ", line
    assert f"{synthetic.malformed} malformed" in out[-1]


def test_the_table_shows_sub_cent_amounts_not_zeros() -> None:
    """t70: an embeddings route's cost and its cache savings read 0.0000 beside a savings_% of 50."""
    aggregator = Aggregator()
    aggregator.feed([msgspec.json.encode({
        "event": "request", "ts": "2026-05-01T08:00:00Z", "key_id": "k", "tenant": "t", "route": "vectors",
        "model": "embed", "cache": "miss", "status": 200, "prompt_tokens": 8, "completion_tokens": 0,
        "cost_usd": 8e-08, "baseline_cost_usd": 1.6e-07, "cache_saved_usd": 8e-08,
    })])  # fmt: skip
    total_row = render_table(aggregator, ("model",)).splitlines()[4].split()
    assert total_row[5:9] == ["0.000000080", "0.000000160", "0.000000080", "50.0"], total_row
    assert total_row[-1] == "0.000000080"
    figures = json.loads(render_json(aggregator, ("model",)))["total"]  # JSON keeps its 9 digits
    assert (figures["cost_usd"], figures["cache_saved_usd"]) == (8e-08, 8e-08)


def test_gzipped_log_gives_the_same_totals(synthetic: SyntheticLog, tmp_path: Path, aggregated: Aggregator) -> None:
    path = tmp_path / "requests.log.gz"
    path.write_bytes(gzip.compress(synthetic.data))
    zipped = aggregate_path(str(path))
    assert _rows(zipped, DIMENSIONS) == _rows(aggregated, DIMENSIONS)
    assert zipped.counters() == aggregated.counters()


def _gzip_cut_at(data: bytes, at: int) -> bytes:
    """``data`` gzipped and cut short where its first ``at`` bytes end: all of them inflate, nothing after."""
    packer = zlib.compressobj(wbits=31)
    return packer.compress(data[:at]) + packer.flush(zlib.Z_SYNC_FLUSH)


def _whole_lines_before(data: bytes, at: int) -> bytes:
    return data[: data.rindex(b"\n", 0, at) + 1]


def test_a_cut_gzip_is_counted_to_its_last_whole_line_and_exits_3(synthetic: SyntheticLog, tmp_path: Path) -> None:
    """t109: a gzipped log cut short (the first 3000 bytes of one) lost up to 64 KiB of its lines
    before the cut, and the report exited 0: a cron job could not tell."""
    at = synthetic.data.index(b"\n", len(synthetic.data) * 2 // 3) - 100  # the cut falls inside a line
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(_gzip_cut_at(synthetic.data, at))
    whole = tmp_path / "whole-lines.log"
    whole.write_bytes(_whole_lines_before(synthetic.data, at))
    expected = aggregate_path(str(whole))
    assert 0 < expected.requests < len(synthetic.records)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "report", str(cut), "--by", "day,model", "--format", "json"],
        capture_output=True, cwd=_ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == report.DAMAGED_LOG == 3, done.stderr
    assert json.loads(done.stdout) == json.loads(render_json(expected, ("day", "model")))
    assert f"report: {cut} ends early: {expected.lines:,} whole lines read before that" in done.stderr.decode()


def test_several_logs_are_summed_and_a_cut_gzip_is_read_up_to_the_cut(
    synthetic: SyntheticLog, log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = len(synthetic.data) - 200
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(_gzip_cut_at(synthetic.data, at))
    whole = tmp_path / "whole-lines.log"
    whole.write_bytes(_whole_lines_before(synthetic.data, at))
    by = ["report", "--by", "tenant", "--format", "json"]
    assert cli_main([*by, str(log_file), str(cut), str(log_file)]) == report.DAMAGED_LOG
    out = capsys.readouterr()
    assert "ends early" in out.err
    assert cli_main([*by, str(log_file), str(whole), str(log_file)]) == 0
    assert json.loads(out.out) == json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("members", [1, 2, 3])
def test_concatenated_gzip_members_are_one_log_and_exit_0(
    synthetic: SyntheticLog, log_file: Path, tmp_path: Path, members: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cat a.gz b.gz`` is one gzip file, as zcat reads it; members may part mid-line, and zeros may pad the end."""
    data = synthetic.data
    cuts = [0, *(len(data) * i // members + 37 for i in range(1, members)), len(data)]
    packed = tmp_path / "members.log.gz"
    packed.write_bytes(b"".join(gzip.compress(data[a:b]) for a, b in itertools.pairwise(cuts)) + b"\0" * 600)
    assert cli_main(["report", str(packed), "--by", "day,key", "--format", "json"]) == 0
    out = capsys.readouterr()
    assert cli_main(["report", str(log_file), "--by", "day,key", "--format", "json"]) == 0
    assert json.loads(out.out) == json.loads(capsys.readouterr().out)
    assert "report:" not in out.err


def test_bad_arguments(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["report", str(log_file), "--by", "day,colour"])
    with pytest.raises(SystemExit):
        cli_main(["report", str(log_file), "--since", "last tuesday"])
    # t146: 1 is for a log that cannot be read; arguments it cannot use are 2, as argparse's
    assert cli_main(["report", str(log_file), "--since", "2026-03-02", "--until", "2026-03-01"]) == 2
    assert "--since must be before --until" in capsys.readouterr().err
    assert cli_main(["report", str(log_file.parent / "missing.log")]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(ValueError):
        parse_dimensions("day,day")


def test_a_file_that_is_no_request_log_exits_1(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t166: a YAML file, or a serve's stderr, gave a table of zeros and exit 0."""
    stderr = tmp_path / "serve.err"
    stderr.write_text(
        "[gateway] policy policies.yaml version 3e38e763051f; auth OFF\n"
        + json.dumps({"event": "event_loop", "level": "info", "ts": "2026-03-01T00:00:00Z"})
        + "\n"
    )
    policy = tmp_path / "policies.yaml"
    policy.write_text("pair: {small: s, large: l}\nmodels: {}\n")
    for path in (stderr, policy):
        for fmt in ("table", "json"):
            assert cli_main(["report", str(path), "--format", fmt]) == 1
            out = capsys.readouterr()
            assert out.out == "", out.out
            assert f"report: {path}: not a request log: no line of it reads as a request line" in out.err, out.err
    # an empty log, and a log with no request in the period, are no such mistake
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["report", str(empty)]) == 0
    assert cli_main(["report", str(log_file), "--since", "2030-01-01"]) == 0
    assert "not a request log" not in capsys.readouterr().err


def test_a_line_nested_too_deep_to_read_is_counted_malformed_and_the_rest_is_reported(tmp_path: Path) -> None:
    """t201: one line nested 50,000 deep raised RecursionError out of the decoder: a traceback, no table."""
    line = b'{"event":"request","ts":"2026-01-01T00:00:00Z","key_id":"k","tenant":"t","route":"auto","model":"m",' \
           b'"cache":"miss","status":200,"prompt_tokens":1,"completion_tokens":1,"cost_usd":1,"baseline_cost_usd":2}\n'  # fmt: skip
    deep = b'{"event":"request","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"
    log = tmp_path / "requests.jsonl"
    log.write_bytes(line + deep + line)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "report", str(log), "--format", "json"],
        capture_output=True, cwd=_ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    document = json.loads(done.stdout)
    assert (document["total"]["requests"], document["lines"]["malformed"]) == (2, 1)


def test_the_report_command_registers_like_every_command() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add = parser.add_subparsers(dest="command", required=True)
    report.register(add)
    args = parser.parse_args(["report", "x.log", "--by", "tenant,key", "--since", "2026-03-01"])
    assert args.run is report.run
    assert args.by == ("tenant", "key") and args.since == datetime(2026, 3, 1, tzinfo=UTC)


# --- the chart -----------------------------------------------------------------------------------


def test_png_is_written(log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "report.png"
    assert cli_main(["report", str(log_file), "--by", "day", "--png", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert "chart written" in capsys.readouterr().err


def test_png_without_matplotlib_says_how_to_install(
    log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes importing it fail, even once imported
    assert cli_main(["report", str(log_file), "--png", str(tmp_path / "r.png")]) == 1
    assert "pip install 'llm-gateway[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_chart_amounts_keep_significant_figures_below_a_dollar() -> None:
    from gateway.reporting.chart import usd

    assert usd(0.0053) == "0.0053 USD"  # a small deployment's day, not "0.01"
    assert usd(0.000123456) == "0.000123 USD"
    assert usd(0) == "0 USD"
    assert usd(1234.567) == "1,234.57 USD"


def test_a_corrupt_gzip_is_counted_up_to_the_damage_and_exits_3(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = log_file.read_bytes()
    at = len(data) - 3000
    packer = zlib.compressobj(wbits=31)
    head = packer.compress(data[:at]) + packer.flush(zlib.Z_SYNC_FLUSH)  # all of data[:at] inflates from head
    packed = bytearray(head + packer.compress(data[at:]) + packer.flush())
    damage = slice(len(head) + 20, len(head) + 70)
    packed[damage] = bytes(b ^ 0xFF for b in packed[damage])  # corrupt data: zlib.error, not an OSError
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(bytes(packed))
    assert cli_main(["report", str(corrupt), "--by", "", "--format", "json"]) == report.DAMAGED_LOG
    out = capsys.readouterr()
    assert f"report: {corrupt} holds corrupt data" in out.err
    # every line before the damage is in, those inflated in the same call as the damage too
    assert json.loads(out.out)["lines"]["lines"] >= _whole_lines_before(data, at).count(b"\n")


def test_an_unwritable_chart_and_a_date_out_of_range_are_one_line_each(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["report", str(log_file), "--png", str(tmp_path / "no" / "such" / "dir.png")]) == 1
    assert "report: cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_main(["report", str(log_file), "--since", "99999999d"])
    assert exited.value.code == 2 and "out of the range of dates" in capsys.readouterr().err
