"""Start the gateway as a real process (``python -m gateway serve``) for end-to-end tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from gateway.services.redis_server import start_embedded_redis
from gateway.simulated import SimulatedUpstream

_PORTS_PER_WORKER = 3000
_handed: set[int] = set()


def free_port() -> int:
    """A port no other test process hands out: each xdist worker draws from a range of its own,
    below the kernel's ephemeral ports. A port bound at 0, closed and handed on, was taken in
    between by the other worker's gateway, which then answered this one's requests."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base = 20000 + worker % 4 * _PORTS_PER_WORKER
    for _ in range(500):
        port = base + random.randrange(_PORTS_PER_WORKER)
        if port in _handed:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise RuntimeError(f"no free port left in {base}-{base + _PORTS_PER_WORKER}")


def model_entry(name: str, base_url: str, upstream_model: str, price: str, tier: str = "", **more: str) -> str:
    """One entry of ``models`` for :func:`policy_text`'s ``extra_models``, on a loopback upstream
    (``price`` as YAML, ``{input: 1, output: 2}``; ``more`` as YAML values: ``provider="anthropic"``)."""
    lines = [f"base_url: {base_url}", f"upstream_model: {upstream_model}", f"price: {price}"]
    lines += [f"tier: {tier}"] if tier else []
    lines += [f"{key}: {value}" for key, value in more.items()]
    lines.append("timeouts: {connect: 2, first_byte: 5, total: 10}")
    return f"  {name}:\n" + "".join(f"    {line}\n" for line in lines)


def vllm_and_claude_models(vllm_url: str, claude_url: str) -> str:
    """``vllm`` (a vLLM-like upstream, small) and ``claude-up`` (an Anthropic-like one, large)."""
    return model_entry("vllm", f"{vllm_url}/v1", "qwen", "{input: 1, output: 2}", "small") + model_entry(
        "claude-up", claude_url, "claude-x", "{input: 3, output: 15}", "large", provider="anthropic"
    )


def policy_text(
    small: SimulatedUpstream,
    large: SimulatedUpstream,
    *,
    auth: str = "auth: {mode: none}",
    extra_models: str = "",
    routes: str = "",
    limits: str = "max_body_bytes: 65536, redis_timeout_ms: 2000",
    breaker: str = "{min_requests: 50, reset_after_s: 1}",
    cache: str = "{enabled: false}",
) -> str:
    """A policy over the two simulated upstreams, with short timeouts and fast retries for tests."""
    return f"""
version: 1
pair: {{small: small, large: large}}
models:
  small:
    base_url: {small.url}
    price: {{input: 0.5, output: 1.5}}
    tier: small
    simulated: true
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
  large:
    base_url: {large.url}
    price: {{input: 5, output: 15}}
    tier: large
    simulated: true
    api_key_env: TEST_LARGE_KEY
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
  gpt:
    base_url: {small.url}
    responses_api: true
    price: {{input: 1.25, cached_input: 0.125, output: 10}}
    tier: small
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
  claude:
    provider: anthropic
    base_url: {large.root_url}
    upstream_model: claude-sim
    api_key_env: TEST_ANTHROPIC_KEY
    price: {{input: 3, output: 15, server_tools: {{web_search: 10}}}}
    tier: large
  embed:
    kind: embedding
    base_url: {small.url}
    price: {{input: 0.02, output: 0}}
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
  embed-large:
    kind: embedding
    base_url: {large.url}
    price: {{input: 0.13, output: 0}}
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
{extra_models}
routes:
  fast: {{model: small, fallbacks: [large]}}
  best: {{model: large}}
  auto: {{strategy: classifier, model: small, fallbacks: [large]}}
  auto-share: {{strategy: classifier, model: small, fallbacks: [large], target_large_share: 0.3}}
  vectors: {{model: embed, fallbacks: [embed-large]}}
{routes}
retry: {{max_attempts: 2, backoff_initial_ms: 10, backoff_max_ms: 50, max_retry_after_s: 2}}
circuit_breaker: {breaker}
{auth}
limits: {{{limits}}}
cache: {cache}
"""  # generous Redis deadlines: CI machines are small and busy; the outage tests use refused connections


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    policy_path: Path
    log_path: Path
    err_path: Path
    _log_offset: int = field(default=0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_records(self, event: str = "request") -> list[dict[str, Any]]:
        """Request log lines (stdout) with this ``event``."""
        return _records(self.log_path.read_bytes(), event)

    def ops_records(self, event: str) -> list[dict[str, Any]]:
        """JSON ops log lines (stderr) with this ``event``."""
        return _records(self.err_path.read_bytes(), event)

    def wait_for_record(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The log line of one request (lines are written by a background thread, so poll; the
        deadline is generous, as a busy CI machine may run that thread late, and costs nothing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for record in self.log_records():
                if record["request_id"] == request_id:
                    return record
            time.sleep(0.02)
        raise AssertionError(f"no log line for request {request_id}")

    def wait_for_ops(self, event: str, count: int = 1, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """At least ``count`` ops log lines with ``event`` (stderr's lines reach the file when the
        worker's log writer gets to them: a test that reads at once can find none yet)."""
        deadline = time.monotonic() + timeout_s
        while len(found := self.ops_records(event)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return found

    def stderr_text(self) -> str:
        return self.err_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        for pid in _worker_pids(self.process.pid):
            os.kill(pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _records(lines: bytes, event: str) -> list[dict[str, Any]]:
    records = []
    for line in lines.splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            record = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            records.append(record)
    return records


def _worker_pids(pid: int) -> list[int]:
    """The server's worker processes (granian forks them, uvicorn spawns them when there are
    several), or the process itself; not the other children (multiprocessing's resource
    tracker, an embedded Redis)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(p) for p in task.read_text().split()]
    workers = [child for child in children if not _is_helper(child)]
    return workers or [pid]


def _is_helper(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"resource_tracker" in command or b"redis-server" in command


def start_gateway(
    workdir: Path,
    policy: str,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,  # returns once ready; two workers importing on a loaded CI box took over 30 s
    expect_ready: bool = True,
    workers: int = 1,
    policy_path: Path | None = None,
    command: list[str] | None = None,
    cwd: Path | None = None,
    server: str | None = None,
    serve_args: tuple[str, ...] = (),
    own_group: bool = False,
) -> GatewayProcess:
    """``policy_path``: serve an existing policy file (shared with another gateway) instead of writing ``policy``.
    ``command``: what runs the gateway (default: this interpreter's ``python -m gateway``), in ``cwd``;
    ``server``: ``serve --server`` (default: serve's own default); ``serve_args``: more of serve's options;
    ``own_group``: in a process group of its own, as a terminal runs it (Ctrl-C there is ``os.killpg``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if policy_path is None:
        policy_path = workdir / "policies.yaml"
        policy_path.write_text(policy)
    port = free_port()
    log_path, err_path = workdir / "gateway.log", workdir / "gateway.err"
    child_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as stdout, err_path.open("wb") as stderr:  # the child keeps its own copies
        process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "gateway"]), "serve", "--policies", str(policy_path), "--port",
             str(port), "--data-dir", str(workdir / "data"), "--workers", str(workers),
             *(["--server", server] if server else []), *serve_args],
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=child_env, cwd=cwd, start_new_session=own_group,
        )  # fmt: skip
    gateway = GatewayProcess(process, port, policy_path, log_path, err_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.stderr_text()}")
        try:
            response = httpx.get(f"{gateway.url}/healthz", timeout=0.5)
            ready = not expect_ready or httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200
            if response.status_code == 200 and ready:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"gateway did not become ready:\n{gateway.stderr_text()}")


def stop_with_its_redis_back(gateway: GatewayProcess, redis_url: str, data_dir: Path) -> None:
    """Stop a gateway whose Redis was down, once a Redis answers at its address: at shutdown a
    gateway tries to write the usage it holds for up to 10 s, so a stop with Redis still down took
    those 10 s; one that is back takes it at once. ``redis_url`` names a password: the Redis
    started there requires one."""
    address = urllib.parse.urlsplit(redis_url)
    if not address.password:
        raise ValueError(f"{redis_url} names no password, which the Redis started there requires")
    server = start_embedded_redis(data_dir, port=address.port, password=address.password)
    try:
        gateway.stop()
    finally:
        server.stop()


@contextmanager
def running_gateway(workdir: Path, policy: str, **options: Any) -> Iterator[GatewayProcess]:
    """:func:`start_gateway` for the length of a block (a module's fixture), stopped after it."""
    gateway = start_gateway(workdir, policy, **options)
    try:
        yield gateway
    finally:
        gateway.stop()
