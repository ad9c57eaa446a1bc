"""The semantic cache measures its own error in production, end to end: sampled hits are
asked upstream again, the answers compared, the estimate exported, an entry whose hit was
wrong retired at once, and past the error budget the route stops serving semantic hits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from gateway.store.keyspace import tenant_prefix
from tests.conftest import closed_after_test, inject
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

# every hit audited; two decided audits are enough; no step left to raise: a breach stops the route;
# the audits are under test, not the bar: a close rewording is served at the base threshold
CACHE = (
    "{enabled: true, coalesce: {enabled: false}, redis_timeout_ms: 1000, semantic: {enabled: true, "
    "verify_threshold_close: 0.98, audit: "
    "{sample_rate: 1.0, max_per_minute: 100, min_audits: 2, max_false_hit_rate: 0.01, tighten_step: 0}}}"
)
MCQ = "Which gas do plants absorb for photosynthesis?\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium"
MCQ_REWORDED = "For photosynthesis, plants absorb which gas?\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium"


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:  # fmt: skip
    policy = policy_text(small_upstream, large_upstream, cache=CACHE)
    process = start_gateway(Path(tmp_path_factory.mktemp("audit")), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def _ask(gateway: GatewayProcess, content: str) -> tuple[str, str]:
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=15))
    raw = client.chat.completions.with_raw_response.create(
        model="fast", temperature=0, messages=[{"role": "user", "content": content}]
    )
    return raw.headers["x-gateway-cache"], raw.parse().choices[0].message.content or ""


def _wait_for(gateway: GatewayProcess, event: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(found := gateway.ops_records(event)) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {event} events:\n{gateway.stderr_text()[-2000:]}")


def _metric(gateway: GatewayProcess, name: str, **labels: str) -> float | None:
    wanted = [f'{k}="{v}"' for k, v in {"route": "fast", **labels}.items()]
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return None


def _stored_prompts(client: redis.Redis) -> int:
    """Elements in the vector sets of the tenant this gateway serves (auth off: "default")."""
    sets = [k for k in client.scan_iter(f"{tenant_prefix('default')}:v:*") if client.type(k) == b"vectorset"]
    total = 0
    for key in sets:  # redis-py leaves execute_command unannotated (the gateway's vectors.py says the same)
        total += int(client.execute_command("VCARD", key))  # type: ignore[no-untyped-call]
    return total


def test_wrong_semantic_hits_are_found_counted_and_stop_the_route(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    before = _stored_prompts(client)  # other modules' gateways may share the tenant
    inject(small_upstream, {"text": "6 x 7 = 42. The answer is 42."})
    assert _ask(gateway, "What is six times seven?") == ("miss", "6 x 7 = 42. The answer is 42.")
    assert _stored_prompts(client) == before + 1
    inject(small_upstream, {"text": "The answer is 41."})  # what the audit will hear: a disagreement
    cache, text = _ask(gateway, "Compute six times seven.")
    assert (cache, text) == ("semantic", "6 x 7 = 42. The answer is 42.")  # served before the audit answered
    first = _wait_for(gateway, "semantic_audit", 1)[0]
    assert first["agree"] is False and first["method"] == "number" and first["false_hit_estimate"] == 1.0
    # no prompt or answer text in the ops log: its only strings are these
    assert {k for k, v in first.items() if isinstance(v, str)} <= {
        "event",
        "level",
        "ts",
        "logger",
        "tenant",
        "route",
        "method",
    }

    # the entry that served the wrong hit serves no more (the route still does: 1 audit < min_audits)
    (retired,) = _wait_for(gateway, "semantic_cache_entry_retired", 1)
    assert retired["route"] == "fast" and retired["method"] == "number"
    assert _stored_prompts(client) == before
    assert _ask(gateway, "What is six times seven?")[0] == "exact"  # its exact answer stays

    inject(small_upstream, {"text": "The answer is B."})
    assert _ask(gateway, MCQ)[0] == "miss"
    inject(small_upstream, {"text": "Answer: C"})
    assert _ask(gateway, MCQ_REWORDED)[0] == "semantic"
    second = _wait_for(gateway, "semantic_audit", 2)[1]
    assert second["agree"] is False and second["method"] == "choice"

    (tightened,) = _wait_for(gateway, "semantic_cache_tightened", 1)
    assert tightened["route"] == "fast" and tightened["verify_threshold_after"] is None
    assert tightened["action"] == "stopped serving semantic hits" and tightened["audits"] == 2
    assert _metric(gateway, "gateway_semantic_cache_false_hits_ratio") == 1.0
    assert _metric(gateway, "gateway_semantic_cache_verify_threshold") == 0.0
    assert _metric(gateway, "gateway_semantic_cache_audits_total", agree="false") == 2.0
    # the route's semantic hits have stopped; exact hits go on
    assert _ask(gateway, "Calculate 6 times 7.")[0] == "miss"
    assert _ask(gateway, "What is six times seven?")[0] == "exact"
