"""Several worker processes on one host behave as one gateway: metrics add up across workers."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import _worker_pids, policy_text, start_gateway


def _requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^gateway_requests_total\{[^}]*route="fast"[^}]*\} (\S+)$', text, re.M))


def test_metrics_are_whole_across_two_workers(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env={"REDIS_URL": redis_server.url}, workers=2)
    try:
        assert len(_worker_pids(gateway.process.pid)) == 2
        for i in range(30):  # a new connection each time, so both workers take requests
            body = {"model": "fast", "messages": [{"role": "user", "content": f"m{i}"}]}
            httpx.post(f"{gateway.base_url}/chat/completions", json=body).raise_for_status()
        # both workers took requests: each keeps its own counter file
        assert len(list((tmp_path / "data" / "metrics").glob("counter_*.db"))) == 2
        # every scrape, whichever worker answers it, sees all 30 requests
        totals = {_requests_total(httpx.get(f"{gateway.url}/metrics").text) for _ in range(6)}
        assert totals == {30.0}
        assert "gateway_redis_up 1.0" in httpx.get(f"{gateway.url}/metrics").text
    finally:
        gateway.stop()
