"""Rate limits and budgets: what the check costs, and what the budget downgrade buys.

1. The Lua check-and-reserve and the settlement, called in process against a real
   Redis 8: p50/p99 of each round trip.
2. Through the gateway (1 connection, route fast): the same request with a key that
   has limits and with a key that has none (no Redis call), p50/p99 and the difference.
3. The downgrade: two tenants with the same daily budget send the same prompts from
   ../shared/data/routing through a classifier route calibrated to send about 30% to the
   large model; one has downgrade_auto_at: 0.5. Reported:
   requests served before the budget stops them, spend, share sent to the large model.

Run: python tests/bench/limits_bench.py [--requests 2000] [--prompts 400]
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageFigures
from gateway.auth import Principal, hash_key
from gateway.config.loader import load_policy_text
from gateway.config.schema import Limits
from gateway.limits import Limiter
from gateway.services.redis_server import start_embedded_redis
from gateway.simulated import start_simulated_upstream
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect
from tests.gateway_process import policy_text, start_gateway

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 4), "p99_ms": round(_pct(ms, 0.99), 4), "n": len(ms)}


async def in_process(redis_url: str, count: int) -> dict[str, object]:
    policy = load_policy_text(
        "pair: {small: s, large: l}\nmodels:\n  s: {base_url: 'http://x', price: {input: 1, output: 1}, tier: small}\n"
        "  l: {base_url: 'http://x', price: {input: 1, output: 1}, tier: large}\nroutes:\n  fast: {model: s}\n"
        "tenants:\n  t: {limits: {rpm: 100000000, usd_per_day: 1000000}}\nlimits: {redis_timeout_ms: 1000}\n"
        "auth: {mode: none}\n",
        environ={},
    ).policy
    counters = RedisLimitCounters(SharedRedis(connect(redis_url), Metrics()))
    limiter = Limiter(counters, UsageLedger(counters))
    principal = Principal("k", "t", frozenset({"*"}), Limits(rpm=100_000_000, tpm=10**12))
    reserve_ms, settle_ms = [], []
    for _ in range(count):
        started = time.perf_counter()
        reservation = await limiter.reserve(policy, principal, 120, 0.0002)
        reserve_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        used = UsageFigures(
            requests=1, prompt_tokens=20, completion_tokens=30, cost_usd=0.0001, baseline_cost_usd=0.001
        )
        await limiter.settle(policy, reservation, used)
        settle_ms.append((time.perf_counter() - started) * 1000)
    return {"reserve": _summary(reserve_ms), "settle": _summary(settle_ms)}


def through_gateway(base_url: str, count: int) -> dict[str, object]:
    body = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}]}
    results: dict[str, object] = {}
    with httpx.Client(timeout=10) as client:
        for label, key in (("without_limits", "key-free"), ("with_limits", "key-limited")):
            headers = {"authorization": f"Bearer {key}", "cache-control": "no-cache, no-store"}
            for _ in range(200):
                client.post(f"{base_url}/chat/completions", json=body, headers=headers)
            ms = []
            for _ in range(count):
                started = time.perf_counter()
                response = client.post(f"{base_url}/chat/completions", json=body, headers=headers)
                ms.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
            results[label] = _summary(ms)
    a, b = results["with_limits"], results["without_limits"]
    results["added_p50_ms"] = round(a["p50_ms"] - b["p50_ms"], 4)  # type: ignore[index]
    results["added_p99_ms"] = round(a["p99_ms"] - b["p99_ms"], 4)  # type: ignore[index]
    return results


def downgrade(base_url: str, prompts: list[str]) -> dict[str, object]:
    results: dict[str, object] = {}
    with httpx.Client(timeout=10) as client:
        for label, key in (("no_downgrade", "key-plain"), ("downgrade_at_50pct", "key-saver")):
            served, models = 0, {"small": 0, "large": 0}
            for index, prompt in enumerate(prompts):
                response = client.post(
                    f"{base_url}/chat/completions",
                    json={"model": "auto30", "max_tokens": 64, "messages": [{"role": "user", "content": prompt}]},
                    headers={"authorization": f"Bearer {key}", "cache-control": "no-cache, no-store"},
                )
                if response.status_code == 429:
                    break
                served += 1
                models[response.headers["x-gateway-model"]] += 1
                if index % 20 == 0:
                    time.sleep(0.05)  # let settlement land, as real traffic spacing would
            time.sleep(0.5)
            usage = client.get(f"{base_url}/usage", headers={"authorization": f"Bearer {key}"}).json()["total"]
            results[label] = {"served": served, "stopped_by_budget": served < len(prompts), "large_share":
                              round(models["large"] / max(1, served), 3), "spent_usd": round(usage["cost_usd"], 6),
                              "budget_usd": BUDGET}  # fmt: skip
    return results


BUDGET = 0.01
AUTO30 = "  auto30: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.24}  # about 30% large"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="limits-bench-"))
    redis = start_embedded_redis(work / "redis")
    small, large = start_simulated_upstream("small"), start_simulated_upstream("large")
    keys = f"""auth:
  mode: keys
  keys:
    - {{id: free, tenant: free, hash: "{hash_key("key-free")}"}}
    - {{id: limited, tenant: limited, hash: "{hash_key("key-limited")}", limits: {{rpm: 100000000, tpm: 1000000000}}}}
    - {{id: plain, tenant: plain, hash: "{hash_key("key-plain")}", limits: {{usd_per_day: {BUDGET}}}}}
    - {{id: saver, tenant: saver, hash: "{hash_key("key-saver")}", limits: {{usd_per_day: {BUDGET}}}}}
tenants:
  saver: {{downgrade_auto_at: 0.5}}
"""
    gateway = None
    try:
        report: dict[str, object] = {"cores": os.cpu_count()}
        report["in_process"] = asyncio.run(in_process(redis.url, args.requests))
        policy = policy_text(
            small, large, auth=keys, routes=AUTO30, limits="max_body_bytes: 65536, redis_timeout_ms: 1000"
        )
        gateway = start_gateway(work / "gw", policy, env={"REDIS_URL": redis.url})
        report["through_gateway"] = through_gateway(gateway.base_url, args.requests)
        prompts = [json.loads(line)["prompt"] for line in (DATA / "mmlu_dev.jsonl").open()][: args.prompts // 2]
        prompts += [json.loads(line)["prompt"] for line in (DATA / "gsm8k_dev.jsonl").open()][: args.prompts // 2]
        report["downgrade"] = downgrade(gateway.base_url, prompts)
        print(json.dumps(report, indent=2))
        out = Path("bench-results")
        out.mkdir(exist_ok=True)
        (out / f"limits-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    finally:
        if gateway is not None:
            gateway.stop()
        small.stop()
        large.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
