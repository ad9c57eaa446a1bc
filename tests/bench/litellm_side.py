"""LiteLLM's proxy measured beside the gateway in one run of ``gateway_bench --litellm BIN``.

The same simulated upstream, the same loadgen, the same request (its cache off: LiteLLM's
proxy has no cache unless configured, ours is off in the bench's policy), one worker
each. LiteLLM is not a dependency: install it in a separate environment
(``python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'``) and
pass its ``litellm`` executable. It runs offline (``LITELLM_LOCAL_MODEL_COST_MAP``,
telemetry off).
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from gateway.simulated import SimulatedUpstream
from tests.bench.loadgen import HttpTarget, build_post

__all__ = ["measure_litellm", "side_by_side"]

_MASTER_KEY = "sk-bench-litellm-master-key-0123456789"


def _config(upstream: SimulatedUpstream, route: str, upstream_model: str) -> str:
    return (
        "model_list:\n"
        f"  - model_name: {route}\n"
        "    litellm_params:\n"
        f"      model: openai/{upstream_model}\n"
        f"      api_base: {upstream.url}\n"
        "      api_key: sk-none\n"
        "litellm_settings:\n  telemetry: false\n"
        f"general_settings:\n  master_key: {_MASTER_KEY}\n"
    )


def start_litellm(
    binary: str, upstream: SimulatedUpstream, route: str, upstream_model: str, port: int, workdir: Path
) -> subprocess.Popen[bytes]:
    config = workdir / "litellm.yaml"
    config.write_text(_config(upstream, route, upstream_model))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR"}
    log = (workdir / "litellm.log").open("wb")
    process = subprocess.Popen(
        [binary, "--config", str(config), "--port", str(port), "--num_workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    body = {"model": route, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 4}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"litellm exited with {process.returncode}: {(workdir / 'litellm.log').read_text()[-2000:]}"
            )
        try:
            ready = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {_MASTER_KEY}"}, timeout=5,
            )  # fmt: skip
            if ready.status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("litellm did not become ready in 120 s")


def litellm_target(port: int, body: bytes) -> HttpTarget:
    headers = {"Authorization": f"Bearer {_MASTER_KEY}"}
    return HttpTarget("127.0.0.1", port, (build_post("127.0.0.1", port, "/v1/chat/completions", body, headers),))


def measure_litellm(
    bench: Any, binary: str, body: bytes, route: str, upstream_model: str, direct_target: HttpTarget, port: int,
    workdir: Path, cleanup: ExitStack,
) -> dict[str, Any]:  # fmt: skip
    """Direct upstream, then LiteLLM, each at 1 connection and at N (``bench.latency_and_throughput``)."""
    pids = {"loadgen": os.getpid(), "upstream": bench.upstream.process.pid}
    direct = bench.latency_and_throughput(lambda n: direct_target, pids)
    process = start_litellm(binary, bench.upstream, route, upstream_model, port, workdir)
    cleanup.callback(_stop, process)
    target = litellm_target(port, body)
    through = bench.latency_and_throughput(lambda n: target, {**pids, "litellm": process.pid})
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    _stop(process)
    return {"version": version, "direct": direct, "litellm": through}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def side_by_side(gateway_run: dict[str, Any], litellm: dict[str, Any]) -> dict[str, Any]:
    """The issue's three ratios (goals: >= 30, >= 30, >= 10), each side against its own direct baseline."""
    g, g_direct = gateway_run["gateway"]["proxy"], gateway_run["direct"]
    ll, ll_direct = litellm["litellm"], litellm["direct"]
    g_added = g["sequential"]["p50_ms"] - g_direct["sequential"]["p50_ms"]
    ll_added = ll["sequential"]["p50_ms"] - ll_direct["sequential"]["p50_ms"]
    return {
        "added_latency_p50_1conn_ms": {"gateway": round(g_added, 3), "litellm": round(ll_added, 3)},
        "added_latency_ratio": round(ll_added / g_added, 1) if g_added > 0 else None,
        "throughput_rps": {"gateway": g["concurrent"]["requests_per_s"], "litellm": ll["concurrent"]["requests_per_s"]},
        "throughput_ratio": round(g["concurrent"]["requests_per_s"] / ll["concurrent"]["requests_per_s"], 1)
        if ll["concurrent"]["requests_per_s"]
        else None,
        "p99_at_n_conn_ms": {"gateway": g["concurrent"]["p99_ms"], "litellm": ll["concurrent"]["p99_ms"]},
        "p99_ratio": round(ll["concurrent"]["p99_ms"] / g["concurrent"]["p99_ms"], 1)
        if g["concurrent"]["p99_ms"]
        else None,
        "goals": {"added_latency_ratio": 30, "throughput_ratio": 30, "p99_ratio": 10},
    }
