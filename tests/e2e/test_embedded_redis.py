"""The embedded Redis: private to its user, bounded in memory without touching limits, supervised,
and a hung server seen as what it is (issue 11, defects 6, 7 and 8)."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.auth import Principal
from gateway.config.loader import load_policy_text
from gateway.limits import Limiter
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(tmp_path / "redis", maxmemory="4mb")
    yield server
    server.stop()


def test_defect6_the_embedded_redis_admits_nobody_without_its_password(private_redis: EmbeddedRedis) -> None:
    data = private_redis.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert private_redis.port is None  # no TCP port at all: a unix socket inside the 0700 folder
    with pytest.raises(redis.AuthenticationError), redis.Redis(unix_socket_path=str(private_redis.socket_path)) as bare:
        bare.ping()
    client = closing_client(private_redis.url)
    client.set("k", "v")
    client.save()
    for name in ("dump.rdb", "redis.conf", "redis.log"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert private_redis.password not in " ".join(Path(f"/proc/{private_redis.pid}/cmdline").read_text().split("\0"))
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-ttl"


def test_a_crashed_embedded_redis_comes_back_with_usage_and_budgets(tmp_path: Path) -> None:
    """Append-only: a crash loses at most the last second (the snapshot alone lost up to 5 minutes)."""
    server = start_embedded_redis(tmp_path / "redis")
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("usage:spent", "20")
        # in the append-only file (written at once, fsync'ed every second: a process killed loses
        # nothing written), not a guessed 1.5 s, which Redis may write late while a fsync is slow
        deadline = time.monotonic() + 30
        while not any(b"usage:spent" in aof.read_bytes() for aof in (server.data_dir / "appendonlydir").glob("*.aof")):
            assert time.monotonic() < deadline, "never appended"
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
    finally:
        server.stop()
    again = start_embedded_redis(tmp_path / "redis")
    try:
        with redis.Redis.from_url(again.url) as client:
            assert client.get("usage:spent") == b"20"
    finally:
        again.stop()


def test_the_router_command_finds_the_private_redis_of_a_serve_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["router", "status", "--tenant", "t", "--data-dir", str(tmp_path)]) == 1
    assert "no private Redis of a serve in" in capsys.readouterr().err
    server = start_embedded_redis(tmp_path / "redis")  # where serve --data-dir keeps it
    try:
        assert main(["router", "status", "--tenant", "t", "--data-dir", str(tmp_path)]) == 0
    finally:
        server.stop()


async def test_defect6_a_full_redis_evicts_cache_entries_and_never_a_budget(private_redis: EmbeddedRedis) -> None:
    policy = load_policy_text(_LIMITED_POLICY, environ={}).policy
    shared = SharedRedis(connect(private_redis.url, timeout_s=2), Metrics())
    counters = RedisLimitCounters(shared)
    limiter = Limiter(counters, UsageLedger(counters))
    principal = Principal(key_id="app", tenant="team-a", allowed=frozenset({"*"}), limits=policy.auth.keys[0].limits)
    reservation = await limiter.reserve(policy, principal, tokens=100, cost_usd=0.25)
    await shared.aclose()
    assert reservation.scopes
    counter_keys = [key for scope in reservation.scopes for key in (scope.window, scope.spend)]
    client = closing_client(private_redis.url)
    for key in counter_keys:
        assert client.ttl(key) == -1  # no TTL: volatile-ttl can never pick it
    blob = b"x" * 20_000
    for i in range(2_000):  # 40 MB of cache-like entries into a 4 MB Redis
        client.set(f"gw:{{t}}:x:{i}", blob, ex=3600)
    assert int(client.info("stats")["evicted_keys"]) > 0
    for key in counter_keys:
        assert client.exists(key), key
    spend = client.hgetall(reservation.scopes[0].spend)
    assert float(spend[b"d"]) == pytest.approx(0.25)


def closing_client(url: str) -> redis.Redis:
    """A client closed when the test ends (a socket left to the collector fails a later test)."""
    client = redis.Redis.from_url(url)
    _clients.append(client)
    return client


_clients: list[redis.Redis] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


_LIMITED_POLICY = f"""
pair: {{small: s, large: l}}
models:
  s: {{base_url: "http://127.0.0.1:9", price: {{input: 1, output: 1}}, tier: small}}
  l: {{base_url: "http://127.0.0.1:9", price: {{input: 1, output: 1}}, tier: large}}
routes: {{fast: {{model: s}}}}
auth:
  mode: keys
  keys: [{{id: app, tenant: team-a, hash: "sha256:{"0" * 64}", limits: {{usd_per_day: 100, rpm: 1000}}}}]
tenants: {{team-a: {{limits: {{usd_per_month: 1000}}}}}}
limits: {{redis_timeout_ms: 2000}}
"""  # a generous deadline: the first script call loads the script, slow on a busy machine


def test_defect7_a_killed_embedded_redis_is_restarted_and_readiness_returns(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    env = {"REDIS_URL": ""}  # unset: the gateway starts its own
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env=env)
    try:
        pid_file = tmp_path / "data" / "redis" / "redis.pid"
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        ready, deadline = False, time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200 and _pid(pid_file) not in (None, first):
                ready = True
                break
        assert ready, gateway.stderr_text()[-2000:]
        said_by = time.monotonic() + 30  # the supervisor says so once its ping answers, maybe after readiness
        while "embedded Redis restarted" not in gateway.stderr_text() and time.monotonic() < said_by:
            time.sleep(0.05)
        assert "embedded Redis restarted" in gateway.stderr_text()
        assert "password" not in gateway.stderr_text().lower().replace("password protected", "")
    finally:
        gateway.stop()


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def test_defect8_a_hung_redis_is_reported_degraded_and_the_cache_says_bypass(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    port = free_port()
    server = start_embedded_redis(tmp_path / "redis", port=port, password="pw-8")
    policy = policy_text(small_upstream, large_upstream, cache="{enabled: true, redis_timeout_ms: 100}",
                         limits="redis_timeout_ms: 100")  # fmt: skip
    gateway: GatewayProcess | None = None
    try:
        gateway = start_gateway(tmp_path / "gw", policy, env={"REDIS_URL": f"redis://:pw-8@127.0.0.1:{port}/0"})
        client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=10))
        ask = client.chat.completions.with_raw_response.create
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"hung redis {time.time_ns()}"}]
        # asked again while a lookup runs past its 100 ms (a loaded machine's Redis call can), not bypassed once and failed
        deadline, cache = time.monotonic() + 30, "bypass"
        while cache == "bypass" and time.monotonic() < deadline:
            cache = ask(model="fast", messages=messages, temperature=0).headers["x-gateway-cache"]
        assert cache in ("miss", "exact")  # the cache answers while Redis does
        os.kill(server.pid, signal.SIGSTOP)
        try:
            caches = [ask(model="fast", messages=messages, temperature=0).headers["x-gateway-cache"] for _ in range(5)]
            assert set(caches) == {"bypass"}  # the cache could not be asked: never "miss"
            deadline, metrics = time.monotonic() + 30, ""
            while "gateway_redis_up 0.0" not in metrics and time.monotonic() < deadline:  # degraded after 1 s
                ask(model="fast", messages=messages, temperature=0)
                metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
            assert "gateway_redis_up 0.0" in metrics.splitlines()
            logged_by = time.monotonic() + 30  # the ops log is written by a background thread
            while '"redis_degraded"' not in gateway.stderr_text() and time.monotonic() < logged_by:
                time.sleep(0.05)
            assert '"redis_degraded"' in gateway.stderr_text()
        finally:
            os.kill(server.pid, signal.SIGCONT)
        deadline, cache = time.monotonic() + 30, "bypass"
        while cache != "exact" and time.monotonic() < deadline:
            time.sleep(0.3)
            cache = ask(model="fast", messages=messages, temperature=0).headers["x-gateway-cache"]
        assert cache == "exact"
        assert "gateway_redis_up 1.0" in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
