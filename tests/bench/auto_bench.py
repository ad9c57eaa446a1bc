"""The gateway's overhead on an `auto` request (the classifier on the request path).

The same prompts (from ../shared/data/routing, cache off) go through route `fast` (no
classifier) and route `auto` (classifier, then the model it picks) on one connection;
overhead = gateway latency - the same request sent straight to the upstream. Also
prompts/s through `auto` at 16 connections, where micro-batching helps.

Run: python tests/bench/auto_bench.py [--requests 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.services.redis_server import start_embedded_redis
from gateway.simulated import start_simulated_upstream
from tests.bench.loadgen import HttpTarget, build_post, run_closed_loop, run_sequential
from tests.gateway_process import policy_text, start_gateway

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing"


def _prompts(count: int) -> list[str]:
    lines = (DATA / "mmlu_dev.jsonl").read_text().splitlines()[: count // 2]
    lines += (DATA / "gsm8k_dev.jsonl").read_text().splitlines()[: count - len(lines)]
    return [json.loads(line)["prompt"] for line in lines]


def _target(port: int, path: str, model: str, prompts: list[str]) -> HttpTarget:
    payloads = tuple(
        build_post(
            "127.0.0.1",
            port,
            path,
            msgspec.json.encode({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": p}]}),
        )
        for p in prompts
    )
    return HttpTarget("127.0.0.1", port, payloads, number_header=b"x-gateway-overhead-ms")


def _ms(result: object) -> dict[str, float]:
    lat = sorted(result.latencies_ns)  # type: ignore[attr-defined]
    return {"p50_ms": round(statistics.median(lat) / 1e6, 3), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] / 1e6, 3)}


async def main_async(requests: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="auto-bench-"))
    redis = start_embedded_redis(work / "redis")
    small, large = start_simulated_upstream("small"), start_simulated_upstream("large")
    gateway = start_gateway(work / "gw", policy_text(small, large), env={"REDIS_URL": redis.url})
    try:
        prompts = _prompts(requests)
        report: dict[str, object] = {"cores": os.cpu_count(), "requests": requests}
        direct = await run_sequential(
            _target(small.port, "/v1/chat/completions", "small", prompts), requests, warmup=50
        )
        fast = await run_sequential(_target(gateway.port, "/v1/chat/completions", "fast", prompts), requests, warmup=50)
        auto = await run_sequential(_target(gateway.port, "/v1/chat/completions", "auto", prompts), requests, warmup=50)
        d, f, a = _ms(direct), _ms(fast), _ms(auto)
        report["direct"], report["fast"], report["auto"] = d, f, a
        report["overhead_fast"] = {k: round(f[k] - d[k], 3) for k in d}
        report["overhead_auto"] = {k: round(a[k] - d[k], 3) for k in d}
        loaded = await run_closed_loop(
            _target(gateway.port, "/v1/chat/completions", "auto", prompts), 16, duration_s=8, warmup_s=1
        )
        report["auto_16_connections_rps"] = round(loaded.requests_per_s, 1)
        return report
    finally:
        gateway.stop()
        small.stop()
        large.stop()
        redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600)
    report = asyncio.run(main_async(parser.parse_args().requests))
    print(json.dumps(report, indent=2))
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / f"auto-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
