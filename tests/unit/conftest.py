"""In-process fixtures: the pipeline on the memory store and a MockTransport upstream, no processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.auth import Principal, hash_key
from gateway.cache.exact import ExactCache
from gateway.cache.semantic import SemanticCache
from gateway.limits import Limiter
from gateway.pipeline import Answer, ChatPipeline, StreamingAnswer, StreamingDeltas
from gateway.runtime import RuntimeHolder
from gateway.store.base import Store
from gateway.store.memory import memory_store
from tests.unit.fake_upstream import FakeUpstream

POLICY = """
pair: {small: small, large: large}
models:
  small: {base_url: "http://small.test/v1", price: {input: 0.5, output: 1.5}, tier: small}
  large: {base_url: "http://large.test/v1", price: {input: 5, output: 15}, tier: large}
routes:
  fast: {model: small, fallbacks: [large]}
  smart: {model: large}
auth:
  mode: keys
  keys:
    - {id: alice, tenant: team-a, hash: "%(alice)s"}
    - {id: bob, tenant: team-b, hash: "%(bob)s"}
    - {id: capped, tenant: team-c, hash: "%(capped)s", limits: {rpm: 2}}
    - {id: frugal, tenant: team-d, hash: "%(frugal)s", limits: {usd_per_day: 0.00001}}
    - {id: roomy, tenant: team-e, hash: "%(roomy)s", limits: {usd_per_day: 1.0}}
tenants:
  team-a: {}
  team-b: {}
  team-c: {}
  team-d: {}
  team-e: {}
cache: {enabled: true, coalesce: {enabled: true, wait_s: 2}}
""" % {name: hash_key(f"sk-{name}") for name in ("alice", "bob", "capped", "frugal", "roomy")}


@dataclass
class Harness:
    pipeline: ChatPipeline
    upstream: FakeUpstream
    store: Store
    holder: RuntimeHolder
    limiter: Limiter

    async def ask(
        self,
        content: str,
        *,
        key: str = "alice",
        model: str = "fast",
        cache_control: str | None = None,
        started: float = 0.0,
        **extra: Any,
    ) -> Answer | StreamingAnswer | StreamingDeltas:
        body = msgspec.json.encode({"model": model, "messages": [{"role": "user", "content": content}], **extra})

        async def read_body(limit: int, timeout_s: float, principal: Principal) -> bytes:
            return body

        return await self.pipeline.handle(read_body, f"Bearer sk-{key}", cache_control, "req-1", started)


def answer_of(result: Answer | StreamingAnswer | StreamingDeltas) -> tuple[int, dict[str, Any], dict[str, str]]:
    assert isinstance(result, Answer), result
    return result.status, msgspec.json.decode(result.body), result.headers


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(policy: str = POLICY) -> Harness:
        path = tmp_path / f"policies-{len(made)}.yaml"
        path.write_text(policy)
        upstream = FakeUpstream()
        metrics = Metrics()
        holder = RuntimeHolder(path, metrics, transport=upstream.transport)
        holder.start()
        store = memory_store()
        limiter = Limiter(store.counters, UsageLedger(store.counters))
        pipeline = ChatPipeline(
            holder, metrics, ExactCache(store.kv), SemanticCache(store.vectors, None), limiter, None
        )
        made.append(Harness(pipeline, upstream, store, holder, limiter))
        return made[-1]

    yield make
    for harness in made:
        await harness.limiter.drain()
        await harness.holder.aclose()


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()
