"""A bug of ours (here: a scorer that raises what it should not) is a 500 with x-request-id,
logged with its real status, its type and where it was raised, and never its message (issue 11, defect 4)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
from structlog.testing import capture_logs

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.auth import Principal
from gateway.cache.exact import ExactCache
from gateway.cache.semantic import SemanticCache
from gateway.limits import Limiter
from gateway.pipeline import Answer, ChatPipeline
from gateway.runtime import RuntimeHolder
from gateway.store.memory import memory_store

_POLICY = """
pair: {small: small, large: large}
models:
  small: {base_url: "http://127.0.0.1:9/v1", price: {input: 1, output: 1}, tier: small}
  large: {base_url: "http://127.0.0.1:9/v1", price: {input: 1, output: 1}, tier: large}
routes:
  auto: {strategy: classifier, model: small, fallbacks: [large]}
auth: {mode: none}
cache: {enabled: false}
"""


class _BrokenScorer:
    async def score(self, text: str, tenant: str) -> Any:
        raise KeyError("the secret prompt text")


async def test_defect4_an_unexpected_exception_is_a_500_with_an_id_and_a_truthful_log_line(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(_POLICY)
    metrics = Metrics()
    holder = RuntimeHolder(path, metrics)
    holder.start()
    store = memory_store()
    limiter = Limiter(store.counters, UsageLedger(store.counters))
    pipeline = ChatPipeline(
        holder, metrics, ExactCache(store.kv), SemanticCache(store.vectors, None), limiter, _BrokenScorer()
    )
    body = msgspec.json.encode({"model": "auto", "messages": [{"role": "user", "content": "hello"}]})

    async def read_body(limit: int, timeout_s: float, principal: Principal) -> bytes:
        return body

    try:
        with capture_logs() as logs:
            answer = await pipeline.handle(read_body, None, None, "req-internal-1", time.perf_counter())
            await asyncio.sleep(0)  # the request is accounted for just after its answer
    finally:
        await holder.aclose()
    assert isinstance(answer, Answer) and answer.status == 500
    assert answer.headers["x-request-id"] == "req-internal-1"
    assert msgspec.json.decode(answer.body)["error"]["code"] == "internal_error"
    (request_line,) = [line for line in logs if line["event"] == "request"]
    assert request_line["status"] == 500 and request_line["error_type"] == "internal_error"
    (error_line,) = [line for line in logs if line["event"] == "internal_error"]
    assert error_line["request_id"] == "req-internal-1" and error_line["error"] == "KeyError"
    assert any("score" in frame for frame in error_line["where"])
    assert "secret prompt" not in repr(logs)
