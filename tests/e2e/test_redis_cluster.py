"""The gateway on a Redis Cluster of three masters (cluster mode on loopback, the same Redis 8 binary)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.accounting.metrics import Metrics
from gateway.auth import hash_key
from gateway.simulated import SimulatedUpstream
from gateway.store import keyspace
from gateway.store.base import BOUNDED_ENTRY_BYTES
from gateway.store.redis import SharedRedis, connect, redis_store
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway
from tests.redis_cluster import LocalCluster, start_local_cluster

KEYS = """auth:
  mode: keys
  keys:
%s
""" % "\n".join(
    f'    - {{id: k{i}, tenant: tenant-{i}, hash: "{hash_key(f"key-{i}")}", limits: {{rpm: 3}}}}' for i in range(6)
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = start_local_cluster(Path(tmp_path_factory.mktemp("cluster")))
    yield local
    local.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, cluster: LocalCluster,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:  # fmt: skip
    cache = "{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 1000}"
    policy = policy_text(small_upstream, large_upstream, auth=KEYS, cache=cache)
    process = start_gateway(Path(tmp_path_factory.mktemp("gw")), policy, env={"REDIS_URL": cluster.url})
    yield process
    process.stop()


def _chat(gateway: GatewayProcess, key: int, content: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "fast", "temperature": 0, "messages": [{"role": "user", "content": content}]},
        headers={"authorization": f"Bearer key-{key}"},
    )


def test_ready_on_a_cluster(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/readyz").json()["redis"] == "ok"


def test_cache_and_limits_work_for_tenants_on_every_slot(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    # six tenants hash to slots spread over the three masters
    for key in range(6):
        assert _chat(gateway, key, f"cluster question {key}").headers["x-gateway-cache"] == "miss"
        assert _chat(gateway, key, f"cluster question {key}").headers["x-gateway-cache"] == "exact"
        assert _chat(gateway, key, f"third {key}").status_code == 200
        refused = _chat(gateway, key, f"fourth {key}")
        assert refused.status_code == 429 and "key.rpm" in refused.json()["error"]["message"]
    usage = httpx.get(f"{gateway.base_url}/usage", headers={"authorization": "Bearer key-0"}).json()
    total = usage["total"]
    assert (total["requests"], total["errors"], total["cache_hits"]) == (4, 1, 1)  # the refused one counts, as logged


async def test_a_tenants_bounded_collection_evicts_on_its_own_slot(cluster: LocalCluster) -> None:
    shared = SharedRedis(connect(cluster.url, timeout_s=2), Metrics())
    kv = redis_store(shared).kv
    try:
        for n in range(6):  # tenants on slots of every master
            tenant = f"bounded-{n}"
            ledger = keyspace.stored_responses(tenant)
            keys = [keyspace.response(tenant, f"r{i}") for i in range(3)]
            for key in keys:
                await kv.put_bounded(key, b"x" * 100, 60, ledger, 2 * (100 + BOUNDED_ENTRY_BYTES), 2.0)
            assert await kv.get_many(keys, 2.0) == [None, b"x" * 100, b"x" * 100]
            assert await kv.get_bounded(keys, ledger, 60, 2.0) == [None, b"x" * 100, b"x" * 100]  # t60
            assert await kv.delete_bounded(keys[2], ledger, 2.0) is True
    finally:
        await shared.aclose()


async def test_a_usage_batch_over_tenants_on_every_slot_counts_once(cluster: LocalCluster) -> None:
    from gateway.accounting.usage import UsageFigures

    shared = SharedRedis(connect(cluster.url, timeout_s=2), Metrics())
    counters = redis_store(shared).counters
    try:
        sums = {keyspace.usage(f"batch-{n}", "k", "20261202")[0]: UsageFigures(requests=1) for n in range(6)}
        for _ in range(2):  # sent again after a lost answer: each tenant's part once
            await counters.add_usage(sums, [], {}, 2.0, batch="cluster-b1")
        assert [figures.requests for figures in await counters.read_usage(list(sums), 2.0)] == [1] * 6
    finally:
        await shared.aclose()


async def test_a_cluster_no_node_of_which_answers_is_a_redis_that_is_down() -> None:
    """t134: the cluster client's "no node answers" is no RedisError and escaped the shared Redis:
    a serve on a cluster that was down failed to start (on a plain Redis down it serves without the
    cache and limits), and `gateway router status` printed redis-py's 84-line traceback."""
    url = f"redis+cluster://:pw@127.0.0.1:{free_port()}"
    shared = SharedRedis(connect(url), Metrics())
    try:
        assert await shared.check() is False and not shared.up
    finally:
        await shared.aclose()
    said = subprocess.run(
        [sys.executable, "-m", "gateway", "router", "status", "--tenant", "team-a", "--redis", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert said.returncode == 1 and said.stderr.endswith("Redis did not answer\n"), said.stderr
    assert "Traceback" not in said.stderr and ":pw@" not in said.stderr
