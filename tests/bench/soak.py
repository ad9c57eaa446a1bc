"""Soak: the gateway under steady load with a share of faulty requests, on loopback only.

``python -m tests.bench.soak [--duration 600] [--connections 16] [--fault-share 0.1]``
(``make soak``). Both models sit on one misbehaving upstream (tests/faulty_upstream.py):
healthy prompts get normal answers, streamed or not; a faulty prompt carries a marker
that makes the upstream answer 500, garbage, no choices, half an answer, nothing at all,
or SSE comments for ever. The gateway runs as ``python -m gateway serve`` with the cache
on, retries and fallbacks, a real Redis 8, and the default circuit breaker.

Reported (and written as JSON under bench-results/): requests by kind and status, the
healthy requests' success rate (200 and, streamed, a clean ``[DONE]``), how often a
breaker was seen open, worker RSS and open descriptors, Redis memory and key count at
the start, after a warm-up (a tenth of the run) and at the end. Every loop is bounded by the
duration; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.services.redis_server import start_embedded_redis
from tests.faulty_upstream import FAULTS, start_faulty_upstream
from tests.gateway_process import GatewayProcess, start_gateway

_TOPICS = ["tides", "compilers", "bread", "volcanoes", "jazz", "tax law", "sorting", "glaciers", "chess", "vaccines"]


def _policy(upstream_url: str) -> str:
    model = (
        "    base_url: {url}\n    upstream_model: marked\n    price: {{input: {price}, output: {price}}}\n"
        "    tier: {tier}\n    timeouts: {{connect: 1, first_byte: 1, total: 2, idle: 1}}\n"
    )
    return (
        "pair: {small: small, large: large}\nmodels:\n"
        f"  small:\n{model.format(url=upstream_url, price=0.2, tier='small')}"
        f"  large:\n{model.format(url=upstream_url, price=2.5, tier='large')}"
        "routes:\n  fast: {model: small, fallbacks: [large]}\n"
        "retry: {max_attempts: 2, backoff_initial_ms: 20, backoff_max_ms: 100}\n"
        "auth: {mode: none}\n"
        "limits: {redis_timeout_ms: 200}\n"
        "cache: {enabled: true, redis_timeout_ms: 200, semantic: {enabled: false}}\n"
    )


def _worker_pids(gateway: GatewayProcess) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{gateway.process.pid}/task").glob("*/children"):
        children += [int(p) for p in task.read_text().split()]
    workers = [pid for pid in children if b"redis" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return workers or [gateway.process.pid]


def _process_sample(pids: list[int]) -> dict[str, Any]:
    rss, fds = 0.0, 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
        fds += len(os.listdir(f"/proc/{pid}/fd"))
    return {"worker_rss_mib": round(rss, 1), "worker_open_fds": fds}


def _redis_sample(client: redis.Redis) -> dict[str, Any]:
    memory = client.info("memory")
    return {"redis_used_memory_mib": round(int(memory["used_memory"]) / 2**20, 2), "redis_keys": int(client.dbsize())}


class _Load:
    def __init__(self, base_url: str, fault_share: float, seed: int) -> None:
        self.base_url = base_url
        self.fault_share = fault_share
        self.rng = random.Random(seed)
        self.statuses: Counter[str] = Counter()
        self.healthy = 0
        self.healthy_ok = 0
        self.failures: Counter[str] = Counter()

    def _request(self) -> tuple[dict[str, Any], str | None]:
        rng = self.rng
        fault = rng.choice(FAULTS) if rng.random() < self.fault_share else None
        topic = rng.choice(_TOPICS)
        unique = rng.random() < 0.5  # the other half repeat: exact-cache hits
        text = f"Explain {topic} in two sentences, variant {rng.randrange(10**9) if unique else rng.randrange(20)}."
        if fault is not None:
            text = f"{fault} {text} {rng.randrange(10**9)}"
        body = {"model": "fast", "messages": [{"role": "user", "content": text}], "stream": rng.random() < 0.5,
                "temperature": rng.choice([0, 0, 0.7])}  # fmt: skip
        return body, fault

    async def run(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            body, fault = self._request()
            ok, status = await _send(client, body)
            kind = "faulty" if fault else "healthy"
            self.statuses[f"{kind} {status}"] += 1
            if fault is None:
                self.healthy += 1
                self.healthy_ok += ok
                if not ok:
                    self.failures[status] += 1


async def _send(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[bool, str]:
    try:
        if not body["stream"]:
            response = await client.post("/chat/completions", json=body)
            return response.status_code == 200, str(response.status_code)
        async with client.stream("POST", "/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        if response.status_code != 200:
            return False, str(response.status_code)
        clean = bool(lines) and lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        return clean, "200" if clean else "200+in-band error"
    except httpx.HTTPError as exc:
        return False, type(exc).__name__


async def _watch_breakers(base_url: str, until: float, seen: Counter[str]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < until:
            try:
                states = (await client.get(f"{base_url}/readyz")).json()["upstreams"]
                for name, state in states.items():
                    seen[f"{name} {state}"] += 1
            except (httpx.HTTPError, ValueError, KeyError):
                seen["readyz unreadable"] += 1
            await asyncio.sleep(1.0)


async def _drive(
    gateway: GatewayProcess, args: argparse.Namespace, sample: Callable[[], dict[str, Any]]
) -> tuple[_Load, Counter[str], dict[str, Any]]:
    load = _Load(gateway.base_url, args.fault_share, args.seed)
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    breakers: Counter[str] = Counter()
    until = time.monotonic() + args.duration
    warm: dict[str, Any] = {}

    async def after_warmup() -> None:
        await asyncio.sleep(args.duration * 0.1)
        warm.update(sample())

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(
            *(load.run(client, until) for _ in range(args.connections)), _watch_breakers(gateway.url, until, breakers),
            after_warmup(),
        )  # fmt: skip
    return load, breakers, warm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--fault-share", type=float, default=0.1, help="share of requests that carry a fault")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--results-dir", default="bench-results")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        server = start_embedded_redis(work / "redis", maxmemory="64mb")
        stack.callback(server.stop)
        upstream = stack.enter_context(start_faulty_upstream())
        gateway = start_gateway(work / "gw", _policy(upstream.url), env={"REDIS_URL": server.url}, workers=args.workers)
        stack.callback(gateway.stop)
        store = redis.Redis.from_url(server.url)
        pids = _worker_pids(gateway)

        def sample() -> dict[str, Any]:
            return {**_process_sample(pids), **_redis_sample(store)}

        started = sample()
        began = time.monotonic()
        load, breakers, warm = asyncio.run(_drive(gateway, args, sample))
        elapsed = time.monotonic() - began
        time.sleep(1.0)  # let the drain of background settlements and log writes finish
        ended = sample()
        log_statuses = Counter(str(r.get("status")) for r in gateway.log_records())

    total = sum(load.statuses.values())
    report = {
        "machine": {"cores": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": vars(args),
        "elapsed_s": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "by_kind_and_status": dict(sorted(load.statuses.items())),
        "healthy": load.healthy,
        "healthy_succeeded": load.healthy_ok,
        "healthy_success_rate": round(load.healthy_ok / load.healthy, 5) if load.healthy else None,
        "healthy_failures": dict(load.failures),
        "breaker_samples": dict(sorted(breakers.items())),
        "request_log_statuses": dict(sorted(log_statuses.items())),
        "start": started,
        "after_warmup (10 % of the run)": warm,
        "end": ended,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"JSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
