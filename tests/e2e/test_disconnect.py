"""A client that hangs up: a stream is cut upstream, a whole answer is waited for and billed; both are logged as 499."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

T = TypeVar("T")


def _poll(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float, step_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(step_s)
        value = probe()
    return value


def _record_with_id(gateway: GatewayProcess, request_id: str, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """The log line of a request we only know by the x-request-id we sent, among all of them."""
    found = _poll(lambda: [r for r in gateway.log_records() if r["request_id"] == request_id], bool, timeout_s)
    assert len(found) <= 1, found
    return found[0] if found else None


def _read_then_leave(url: str, body: dict[str, object], marker: str, lines: int = 2) -> tuple[str, list[str]]:
    """Start a stream, read its first ``lines`` lines that start with ``marker``, and hang up:
    the request's id and those lines."""
    read: list[str] = []
    with httpx.Client(timeout=5) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith(marker):
                read.append(line)
            if len(read) == lines:
                break
    return request_id, read


def _body(content: str, **extra: object) -> dict[str, object]:
    return {"model": "fast", "messages": [{"role": "user", "content": content}], **extra}


def _leave_after(gateway: GatewayProcess, body: dict[str, object], wait_s: float = 0.3) -> str:
    request_id = f"disconnect-{uuid.uuid4().hex}"
    with httpx.Client(timeout=wait_s) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/chat/completions", json=body, headers={"x-request-id": request_id})
    return request_id


def test_a_client_that_leaves_a_whole_answer_is_billed_the_answer_the_upstream_writes(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """An upstream bills the whole answer it was asked for (OpenAI's and Anthropic's go on after a
    hang-up): hanging up just before it came cost the prompt alone, and never tripped a budget (t39)."""
    inject(small_upstream, {"delay_ms": 700})  # within the model's 1 s first-byte timeout
    request_id = _leave_after(gateway, _body("please wait for me"))
    record = _record_with_id(gateway, request_id)
    assert record is not None, "no log line for the abandoned request"
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert record["route"] == "fast" and record["stream"] is False and record["model"] == "small"
    assert record["latency_ms"] >= 700  # logged when the answer came, with its bill
    assert record["tokens_source"] == "upstream" and record["completion_tokens"] > 0
    assert record["cost_usd"] > 0
    stats = upstream_stats(small_upstream)
    assert (stats["cancelled"], stats["chat_requests"]) == (0, 1)


def test_no_retry_or_fallback_is_made_for_a_client_that_left(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"delay_ms": 3000})  # past the 1 s first-byte timeout: a retryable failure
    request_id = _leave_after(gateway, _body("please wait for me"))
    record = _record_with_id(gateway, request_id, timeout_s=5.0)
    assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert record["latency_ms"] < 2500  # the one attempt's timeout, no more
    assert record["cost_usd"] == 0  # the upstream answered nothing: an error costs nothing
    time.sleep(0.3)
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert upstream_stats(large_upstream)["chat_requests"] == 0


def test_a_client_that_leaves_in_a_retrys_backoff_is_the_failure_of_the_model_tried(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t72: small answered 500 and the client left while the gateway waited to retry: logged with
    model null (counted under model="-"), as if no model had been tried."""
    routes = "  patient: {model: small, fallbacks: [large], retry: {max_attempts: 2, backoff_initial_ms: 20000}}\n"
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream, routes=routes),
                            env={"REDIS_URL": redis_server.url})  # fmt: skip
    try:
        for stream in (False, True):
            inject(small_upstream, {"status": 500})  # answered at once; the retry waits 10 s or more
            request_id = _leave_after(gateway, {**_body(f"retry me later {stream}"), "model": "patient",
                                                "stream": stream}, wait_s=1.0)  # fmt: skip
            record = _record_with_id(gateway, request_id)
            assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")
            assert (record["model"], record["provider"], record["upstream_status"]) == ("small", "openai", 500)
            assert record["cost_usd"] == 0 and record["fallback_used"] is False
        calls = upstream_stats(small_upstream)["chat_requests"], upstream_stats(large_upstream)["chat_requests"]
        assert calls == (2, 0)  # no retry and no fallback for a client that is gone
        left = [
            line
            for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
            if line.startswith("gateway_requests_total{") and 'route="patient"' in line
        ]
        assert left and all('model="small"' in line for line in left), left
    finally:
        gateway.stop()


def test_streamed_disconnect_cancels_the_upstream_stream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"chunk_delay_ms": 200})
    words = " ".join(f"word{i}" for i in range(12))
    request_id, events = _read_then_leave(f"{gateway.base_url}/chat/completions", _body(words, stream=True), "data: ")
    assert len(events) == 2 and "[DONE]" not in events[-1]

    stats = _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 1, timeout_s=3.0)
    assert stats["cancelled"] >= 1, f"the upstream stream was not cancelled: {stats}"
    assert stats["in_flight"] == 0

    record = gateway.wait_for_record(request_id)
    assert record["error_type"] == "client_disconnected"
    assert record["status"] == 499
    assert record["stream"] is True
    assert record["model"] == "small"
    # 12 words at 200 ms a token would take over 2 s: the stream was cut well before.
    assert record["latency_ms"] < 2000
    assert upstream_stats(large_upstream)["chat_requests"] == 0


def test_gateway_serves_normally_after_disconnects(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    # Leave twice more (one of each kind), then ask normally.
    inject(small_upstream, {"delay_ms": 2000}, {"chunk_delay_ms": 300})
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/chat/completions", json=_body("again"))
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", f"{gateway.base_url}/chat/completions", json=_body("a b c d e", stream=True)) as r:
            next(r.iter_lines())
    _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 2 and s["in_flight"] == 0, timeout_s=3)

    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{gateway.base_url}/chat/completions", json=_body("one two three"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "[simulated small] three two one"
        assert answer.headers["x-gateway-model"] == "small"
        assert gateway.wait_for_record(answer.headers["x-request-id"])["status"] == 200

        with client.stream("POST", f"{gateway.base_url}/chat/completions", json=_body("x y", stream=True)) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert (record["status"], record["error_type"]) == (200, None)

    assert httpx.get(f"{gateway.url}/readyz", timeout=5).json()["upstreams"]["small"] == "closed"


def test_a_messages_client_leaving_mid_stream_cancels_the_upstream_stream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """The same for a stream that leaves the pipeline as deltas (an Anthropic client's)."""
    inject(small_upstream, {"chunk_delay_ms": 200})
    words = " ".join(f"word{i}" for i in range(12))
    body = {"model": "fast", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": words}]}
    request_id, frames = _read_then_leave(f"{gateway.url}/v1/messages", body, "event: content_block_delta")
    assert len(frames) == 2
    stats = _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 1, timeout_s=3.0)
    assert stats["cancelled"] >= 1, f"the upstream stream was not cancelled: {stats}"
    record = gateway.wait_for_record(request_id)
    assert record["status"] == 499 and record["error_type"] == "client_disconnected"
    assert record["protocol"] == "anthropic.messages" and record["latency_ms"] < 2000


def test_an_embeddings_client_leaving_is_logged_as_499(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """It was logged and counted as a 200 (an outside tester)."""
    inject(small_upstream, {"delay_ms": 3000})
    request_id = f"disconnect-{uuid.uuid4().hex}"
    with httpx.Client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/embeddings", json={"model": "embed", "input": ["please wait"]},
                    headers={"x-request-id": request_id})  # fmt: skip
    record = _record_with_id(gateway, request_id)
    assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")
