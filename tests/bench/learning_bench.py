"""The router learning a deployment's weakness from its own traffic, end to end.

Run: ``python -m tests.bench.learning_bench [--out FILE]`` (a few minutes on 2 cores).

Set-up: a real Redis 8, a gateway process, two simulated upstreams. The small one has a
hidden weakness (``--weak-on``, gateway/simulated/quality.py): it answers badly whenever
the prompt mentions one of :data:`WEAK_ON` (workplace mail and money matters, 19 % of the fresh
prompts below, mostly ones the shipped router calls easy). The router is not told.
Route ``smart`` learns by shadow judging every answer (``shadow_share: 1``; the simulated
judge sees the weakness in the small model's answer), route ``probe`` only reads scores.

Traffic: hand-written prompts of the project's routing data. Training traffic:
``general_dev`` (shared) and ``general_train_a`` to ``_e``; fresh traffic, never sent to
``smart``: ``general_train_f`` and ``_g`` (300 prompts). After every step of labelled
traffic, ``gateway router learn --promote`` runs; then the fresh prompts go through
``probe`` and their ``x-gateway-p-large`` gives APGR on fresh traffic (small right unless
the hidden rule says otherwise, large always right), with a bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from gateway.learning.learned import apgr
from gateway.services.redis_server import start_embedded_redis
from gateway.simulated import start_simulated_upstream
from tests.gateway_process import policy_text, start_gateway

ROOT = Path(__file__).parents[2]
SHARED = ROOT.parent / "shared" / "data" / "routing"
DATA = ROOT / "router_models" / "data" / "routing"
WEAK_ON = (
    "email",
    "customer",
    "client",
    "team",
    "manager",
    "meeting",
    "price",
    "cost",
    "tax",
    "invoice",
    "budget",
    "salary",
)
ROUTES = """  smart: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.5,
           learning: {shadow_share: 1.0, usd_per_day: 100}}
  probe: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.5, learning: {shadow_share: 0.0}}"""


def _prompts(*paths: Path) -> list[str]:
    return [json.loads(line)["prompt"] for path in paths for line in path.read_text().splitlines() if line.strip()]


def _weak(text: str) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(t)}", lowered) for t in WEAK_ON)


def _ask(client: httpx.Client, route: str, prompt: str) -> httpx.Response:
    response = client.post(
        "/chat/completions", json={"model": route, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32}
    )
    response.raise_for_status()
    return response


def _metric(client: httpx.Client, root: str, name: str) -> float:
    total = 0.0
    for line in client.get(f"{root}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _fresh_apgr(client: httpx.Client, fresh: list[str], needed: np.ndarray) -> dict[str, Any]:
    scores, versions = [], set()
    for prompt in fresh:
        response = _ask(client, "probe", prompt)
        scores.append(float(response.headers["x-gateway-p-large"]))
        versions.add(response.headers["x-gateway-router-version"])
    s = np.array(scores)
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(1000):
        i = rng.integers(0, len(s), len(s))
        boot.append(apgr(s[i], needed[i]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "apgr": round(apgr(s, needed), 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "router_versions": sorted(versions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,200,400,800", help="labelled requests after which to learn")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]

    train = _prompts(SHARED / "general_dev.jsonl", *(DATA / f"general_train_{c}.jsonl" for c in "abcde"))
    random.Random(0).shuffle(train)
    fresh = _prompts(DATA / "general_train_f.jsonl", DATA / "general_train_g.jsonl")
    needed = np.array([_weak(p) for p in fresh], dtype=float)
    report: dict[str, Any] = {
        "cores": os.cpu_count(),
        "weak_on": list(WEAK_ON),
        "fresh_prompts": len(fresh),
        "fresh_share_needing_large": round(float(needed.mean()), 4),
        "training_prompts_available": len(train),
        "steps": [],
    }
    work = Path(tempfile.mkdtemp(prefix="learning-bench-"))
    redis = start_embedded_redis(work / "redis")
    with start_simulated_upstream("small", weak_on=WEAK_ON) as small, start_simulated_upstream("large") as large:
        gateway = start_gateway(work / "gw", policy_text(small, large, routes=ROUTES), env={"REDIS_URL": redis.url})
        try:
            with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
                report["shipped"] = _fresh_apgr(client, fresh, needed)
                print(json.dumps({"shipped": report["shipped"]}), flush=True)
                sent = 0
                for target in steps:
                    while sent < min(target, len(train)):
                        _ask(client, "smart", train[sent])
                        sent += 1
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        judged = _metric(client, gateway.url, "gateway_router_shadow_judgements_total")
                        if judged >= sent:
                            break
                        time.sleep(0.2)
                    learned = subprocess.run(
                        [sys.executable, "-m", "gateway", "router", "learn", "--tenant", "default", "--promote",
                         "--redis", redis.url],
                        capture_output=True, text=True, check=False,
                    )  # fmt: skip
                    outcome = (
                        json.loads(learned.stdout)
                        if learned.stdout.strip().startswith("{")
                        else {"error": learned.stderr[-500:]}
                    )
                    time.sleep(6)  # gateways re-read the version in force every 5 s
                    step = {
                        "labelled_requests": sent,
                        "learn": outcome,
                        "fresh": _fresh_apgr(client, fresh, needed),
                        "shadow_cost_usd": round(
                            _metric(client, gateway.url, "gateway_router_shadow_cost_usd_total"), 6
                        ),
                    }
                    report["steps"].append(step)
                    print(json.dumps(step), flush=True)
        finally:
            gateway.stop()
            redis.stop()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
