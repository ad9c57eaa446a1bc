"""Request-log report benchmark: how fast ``python -m gateway report`` reads a big log.

Run: ``python -m tests.bench.report_bench`` (``--help`` for the options; the default
run writes a 1,000,000-line log, about 0.75 GB, to a temporary directory and takes
about a minute on 2 cores, most of it spent writing the log).

Method
------
* Lines have the shape and field order the gateway writes (docs/request-log.md):
  14 days, 3 models, 4 routes, 40 keys in 6 tenants, ~20% cache hits, ~3% errors.
  About 1% are malformed (truncated, not JSON, a mistyped or missing field), 0.5%
  are other events and 0.2% blank, as if stdout and stderr had been merged.
* ``report``: the real CLI as a subprocess, ``--by day,model``, output discarded;
  wall time includes interpreter start-up. ``aggregate``: the same pass in this
  process, without start-up or rendering. ``png``: rendering the chart from that
  aggregate (matplotlib import included), then the CLI again with ``--png``.
* Wall and CPU seconds (user + system) are both printed: on a shared machine the
  CPU figure is the steadier one. One run each: compare figures taken side by side only.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from gateway.reporting.aggregate import aggregate_path
from gateway.reporting.chart import ChartUnavailable, render_png

_ROOT = Path(__file__).resolve().parents[2]

# (model, provider, input $/M, output $/M)
_MODELS = [("small", "openai", 0.15, 0.60), ("large", "anthropic", 3.0, 15.0), ("mini", "openai", 0.05, 0.40)]
_BASELINE = _MODELS[1]
_ROUTES = [("auto", "small"), ("fast", "fixed"), ("best", "fixed"), ("auto", "large")]
_TENANTS = ["acme", "globex", "initech", "umbrella", "hooli", "default"]
_KEYS = [(f"key-{i:02d}", _TENANTS[i % len(_TENANTS)]) for i in range(40)]


def _cost(price: tuple[str, str, float, float], prompt: int, completion: int) -> float:
    return (prompt * price[2] + completion * price[3]) / 1_000_000


def _body(rng: random.Random) -> dict[str, object]:
    """One request line's fields, except request_id, ts and the fields structlog adds."""
    route, decision = rng.choice(_ROUTES)
    model = _MODELS[1] if route == "best" or decision == "large" else rng.choice((_MODELS[0], _MODELS[2]))
    key_id, tenant = rng.choice(_KEYS)
    prompt, completion = rng.randint(5, 4000), rng.randint(1, 800)
    stream = rng.random() < 0.4
    roll = rng.random()
    cache = "exact" if roll < 0.12 else "semantic" if roll < 0.2 else "miss" if roll < 0.7 else "bypass"
    status, error_type = 200, None
    if rng.random() < 0.03:
        errors = [(400, "invalid_request_error"), (504, "upstream_timeout"), (499, "client_disconnected")]
        status, error_type = rng.choice(errors)
    hit = cache in ("exact", "semantic") and status == 200
    cost = 0.0 if hit or status >= 400 else _cost(model, prompt, completion)
    latency = rng.uniform(1, 10) if hit else rng.uniform(80, 4000)
    return {
        "key_id": key_id, "tenant": tenant, "route": route, "decision": decision, "model": model[0],
        "provider": model[1], "cache": cache, "stream": stream, "status": status,
        "prompt_tokens": prompt, "completion_tokens": completion, "tokens_source": "cache" if hit else "upstream",
        "cost_usd": cost, "baseline_model": _BASELINE[0],
        "baseline_cost_usd": 0.0 if status >= 400 else _cost(_BASELINE, prompt, completion),
        "latency_ms": round(latency, 3), "ttft_ms": round(latency / 3, 3) if stream else None,
        "overhead_ms": round(rng.uniform(0.2, 2.0), 3), "upstream_status": None if hit else status,
        "retries": int(rng.random() < 0.02), "fallback_used": False, "error_type": error_type,
        "finish_reason": "stop" if stream else None, "policy_version": "c7ccc9d9f68c",
        "cache_saved_usd": _cost(model, prompt, completion) if hit else None,
        "cache_similarity": round(rng.uniform(0.92, 0.99), 4) if hit and cache == "semantic" else None,
        "coalesced": None, "semantic_guard_refusals": None, "schema_version": 1,
        "event": "request", "level": "info",
    }  # fmt: skip


def _bad_line(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return good[: rng.randrange(10, len(good) - 5)] + b"\n"  # truncated
    if kind == 1:
        return b"[gateway] Traceback (most recent call last): something went wrong\n"
    if kind == 2:
        return good.replace(b'"status":', b'"status":"', 1).replace(b',"prompt_tokens"', b'","prompt_tokens"', 1)
    return good.replace(b'"tenant":', b'"tenant_":', 1)  # missing field


def write_log(path: Path, lines: int, seed: int = 7) -> None:
    """``lines`` log lines spread evenly over 14 days ending at a fixed date."""
    rng = random.Random(seed)
    encode = msgspec.json.encode
    pool = [encode(_body(rng))[1:-1] for _ in range(5000)]  # the fields without the braces
    ops = [
        b'{"event":"policy_reloaded","version":"c7ccc9d9f68c","level":"info","ts":"%s"}\n',
        b'{"event":"redis_unavailable","error":"connection refused","level":"warning","ts":"%s"}\n',
    ]
    start = datetime(2026, 11, 8, tzinfo=UTC)
    step = timedelta(days=14) / lines
    with open(path, "wb", buffering=1 << 20) as out:
        for i in range(lines):
            ts = (start + step * i).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
            request_id = uuid.UUID(int=rng.getrandbits(128)).hex.encode()
            line = b'{"request_id":"%s",%s,"ts":"%s"}\n' % (request_id, rng.choice(pool), ts)
            roll = rng.random()
            if roll < 0.01:
                line = _bad_line(rng, line)
            elif roll < 0.015:
                line = rng.choice(ops) % ts
            elif roll < 0.017:
                line = b"\n"
            out.write(line)


def _cli(*args: str) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one CLI run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "report", *args],
        cwd=_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def _show(what: str, seconds: float, cpu: float, lines: int | None = None) -> None:
    rate = f", {lines / seconds:,.0f} lines/s ({lines / cpu:,.0f} per CPU second)" if lines else ""
    print(f"{what}: {seconds:.2f} s wall, {cpu:.2f} s CPU{rate}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--gzip", action="store_true", help="also time a gzipped copy of the log")
    parser.add_argument("--keep", metavar="DIR", help="write the log here and keep it (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "requests.log"
        started = time.perf_counter()
        write_log(log, args.lines)
        size_mb = log.stat().st_size / 1e6
        print(f"wrote {args.lines:,} lines ({size_mb:.0f} MB) in {time.perf_counter() - started:.1f} s to {log}")

        seconds, cpu, table = _cli(str(log), "--by", "day,model")
        _show("report --by day,model (CLI, subprocess)", seconds, cpu, args.lines)
        print("  " + table.strip().splitlines()[-1])

        started, cpu_started = time.perf_counter(), time.process_time()
        aggregator = aggregate_path(str(log))
        _show("aggregate (in process)", time.perf_counter() - started, time.process_time() - cpu_started, args.lines)

        try:
            started, cpu_started = time.perf_counter(), time.process_time()
            render_png(aggregator, folder / "report.png")
            _show(
                "png render (in process, matplotlib import included)",
                time.perf_counter() - started,
                time.process_time() - cpu_started,
            )
            seconds, cpu, _ = _cli(str(log), "--by", "day,model", "--png", str(folder / "report-cli.png"))
            _show("report --by day,model --png (CLI, subprocess)", seconds, cpu)
        except ChartUnavailable as exc:
            print(f"png: skipped ({exc})")

        if args.gzip:
            zipped = folder / "requests.log.gz"
            subprocess.run(["gzip", "-1", "-k", "-f", str(log)], check=True)
            seconds, cpu, _ = _cli(str(zipped), "--by", "day,model")
            _show("report --by day,model on .gz (CLI, subprocess)", seconds, cpu, args.lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
