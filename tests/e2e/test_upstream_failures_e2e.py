"""What clients see when upstreams fail: retries, fallbacks, breakers, timeouts, bad input."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def _error(response: httpx.Response) -> dict[str, object]:
    body: dict[str, Any] = response.json()
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _chat(gateway: GatewayProcess, **body: object) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", json={"messages": MESSAGES, **body}, timeout=15)


def test_spent_retries_tell_the_sdk_not_to_retry_again(
    gateway: GatewayProcess, claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    """The SDKs retry a 5xx themselves: after the gateway's own retries that multiplies the calls."""
    inject(small_upstream, *[{"status": 500}] * 5)
    response = _chat(gateway, model="small")
    assert response.status_code == 502 and response.headers["x-should-retry"] == "false"
    httpx.post(f"{small_upstream.root_url}/_control/reset").raise_for_status()  # the 500s left over
    inject(small_upstream, *[{"status": 503}] * 5)
    unavailable = _chat(gateway, model="small")  # unavailable, not broken (f222)
    assert unavailable.status_code == 503 and unavailable.headers["x-should-retry"] == "false"
    httpx.post(f"{small_upstream.root_url}/_control/reset").raise_for_status()  # the 503s left over
    inject(small_upstream, *[{"status": 529}] * 5)
    overloaded = _chat(gateway, model="small")  # OpenAI says 503 where Anthropic says 529
    assert overloaded.status_code == 503 and overloaded.json()["error"]["code"] == "upstream_overloaded", (
        overloaded.text
    )
    inject(small_upstream, *[{"status": 529}] * 5)
    with pytest.raises(anthropic.APIStatusError) as caught:  # its SDK has an error class for 529
        claude.messages.create(model="small", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
    assert caught.value.status_code == 529, caught.value.body


def test_5xx_is_retried_then_answered(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"status": 503})
    response = _chat(gateway, model="small")
    assert response.status_code == 200
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["retries"] == 1 and record["fallback_used"] is False
    assert upstream_stats(small_upstream)["chat_requests"] == 2


def test_connection_dropped_before_answer_is_retried(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"close": True})
    assert _chat(gateway, model="small").status_code == 200


def test_fallback_answers_when_primary_keeps_failing(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"status": 500}, {"status": 502})
    response = _chat(gateway, model="fast")
    assert response.status_code == 200
    assert response.headers["x-gateway-model"] == "large"
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["fallback_used"] is True and record["retries"] == 2 and record["model"] == "large"


def test_exhausted_upstream_gives_502_naming_it(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"status": 500}, {"status": 500})
    response = _chat(gateway, model="small")
    assert response.status_code == 502
    error = _error(response)
    assert "small" in str(error["message"]) and error["type"] == "upstream_error"
    assert gateway.wait_for_record(response.headers["x-request-id"])["error_type"] == "upstream_error"


def test_a_request_whose_models_all_failed_is_the_failure_of_the_last_one_tried(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t70: logged with model null and counted with model="-", a route's failures never showed in
    the dashboard's error rate filtered by model: a model that was down read 0 %."""
    inject(small_upstream, {"status": 500}, {"status": 500})
    inject(large_upstream, {"status": 500}, {"status": 500})
    response = _chat(gateway, model="fast")
    assert response.status_code == 502 and response.headers["x-gateway-model"] == "large"
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert (record["model"], record["provider"], record["fallback_used"]) == ("large", "openai", True)
    unknown = _chat(gateway, model="no-such-model")  # refused before any model was tried: none
    assert unknown.status_code == 404 and gateway.wait_for_record(unknown.headers["x-request-id"])["model"] is None
    failed = [
        line
        for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
        if line.startswith("gateway_requests_total{") and 'route="fast"' in line and 'status="502"' in line
    ]
    # the module's gateway counts other tests' failures too: this one is under large, and none under "-"
    assert any('model="large"' in line for line in failed) and not any('model="-"' in line for line in failed), failed


def test_upstream_timeout_gives_504(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"delay_ms": 2500}, {"delay_ms": 2500})  # first_byte timeout is 1 s
    response = _chat(gateway, model="small")
    assert response.status_code == 504
    error = _error(response)
    assert error["code"] == "upstream_timeout" and "small" in str(error["message"])


def test_a_200_that_is_no_answer_says_what_came_and_not_what_it_held(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """An HTML page with 200 read as 'stream ended before [DONE]' / 'JSON that is not JSON' (t13)."""
    page = "<html><body>proxy at internal-host-7 says hello</body></html>"
    inject(small_upstream, *[{"status": 200, "body": page}] * 4)
    streamed = _chat(gateway, model="small", stream=True)
    assert streamed.status_code == 502 and "answered a stream request with no events" in streamed.text
    whole = _chat(gateway, model="small")
    message = str(_error(whole)["message"])
    assert whole.status_code == 502 and "not JSON (HTML, 61 bytes)" in message
    assert "internal-host-7" not in streamed.text + message
    for answer in (streamed, whole):  # t69: null, as if no upstream had answered
        assert gateway.wait_for_record(answer.headers["x-request-id"])["upstream_status"] == 200


def test_a_200_without_choices_logs_the_status_it_came_with(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t69: the log said upstream_status null, which docs/request-log.md keeps for "no upstream
    answered" (a connection error), for an upstream that answered 200 with ``choices: []``."""
    empty = '{"id": "x", "object": "chat.completion", "created": 0, "model": "small", "choices": []}'
    inject(small_upstream, *[{"status": 200, "body": empty}] * 2)
    inject(large_upstream, *[{"status": 200, "body": '{"type": "message"}'}] * 2)  # Anthropic's API
    for model, why in (("small", "answer has no choices"), ("claude", "answer is not an Anthropic message")):
        response = _chat(gateway, model=model)
        assert response.status_code == 502 and why in str(_error(response)["message"])
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert record["error_type"] == "upstream_bad_response" and record["upstream_status"] == 200


def test_upstream_429_passes_through_with_retry_after(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    # Retry-After beyond max_retry_after_s (2 s): not waited for; no fallback on the direct model.
    inject(small_upstream, {"status": 429, "retry_after": 30})
    response = _chat(gateway, model="small")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert _error(response)["type"] == "rate_limit_error"
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert response.headers["x-should-retry"] == "false"  # too long for the route: too long for the SDK


def test_a_wait_too_long_for_the_route_is_not_waited_out_by_the_anthropic_sdk(
    claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    """t100: the Anthropic SDK sleeps whatever Retry-After says (an OpenAI limit's reset of
    8 h20m became 30000 s: 16 h over its two retries). The route did not wait that long, so the
    SDK is told not to; the client still learns when the limit resets."""
    inject(small_upstream, {"status": 429, "retry_after": 30})
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude.with_options(max_retries=1).messages.create(
            model="small", max_tokens=20, messages=[{"role": "user", "content": "hello"}]
        )
    assert caught.value.response.headers["retry-after"] == "30"
    assert upstream_stats(small_upstream)["chat_requests"] == 1


def test_embeddings_tell_the_sdk_not_to_retry_as_chat_does(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t102: /v1/embeddings never said x-should-retry: the openai SDK's retries multiplied the
    gateway's (6 upstream calls for one request), and a long Retry-After was waited out."""
    inject(small_upstream, {"status": 429, "retry_after": 30})
    response = httpx.post(f"{gateway.base_url}/embeddings", json={"model": "embed", "input": "hi"}, timeout=15)
    assert response.status_code == 429 and response.headers["x-should-retry"] == "false"
    assert response.headers["retry-after"] == "30"
    inject(small_upstream, *[{"status": 503}] * 2)
    spent = httpx.post(f"{gateway.base_url}/embeddings", json={"model": "embed", "input": "hi"}, timeout=15)
    assert spent.status_code == 503 and spent.headers["x-should-retry"] == "false"  # unavailable: f222


def test_an_openai_429_without_retry_after_is_told_when_its_limit_resets(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """OpenAI often sends only its ``x-ratelimit-reset-*`` headers: the client got a 429 with no
    Retry-After (t52). The reset of the limit the upstream says is spent is the wait."""
    spent_tokens = {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}  # fmt: skip
    inject(small_upstream, {"status": 429, "headers": spent_tokens})
    response = _chat(gateway, model="small")
    assert response.status_code == 429 and response.headers["retry-after"] == "360"
    assert upstream_stats(small_upstream)["chat_requests"] == 1  # beyond max_retry_after_s: not waited for


def test_short_retry_after_is_honoured(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"status": 429, "retry_after": 1})
    started = time.monotonic()
    response = _chat(gateway, model="small")
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.9


def test_upstream_4xx_is_passed_through_not_retried(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"status": 400})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fast", messages=MESSAGES)
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert upstream_stats(large_upstream)["chat_requests"] == 0  # the request itself is wrong: no fallback


def test_stream_failing_before_first_chunk_is_retried(client: openai.OpenAI, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"status": 503})
    chunks = list(client.chat.completions.create(model="small", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "[simulated small] hello"


def test_an_in_band_error_after_the_role_chunk_is_retried_and_falls_back(
    client: openai.OpenAI, claude: anthropic.Anthropic, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """vLLM opens every stream with a role-only chunk and writes ``{"error"}`` in band when
    generation then fails: nothing has reached the client, so the route's fallback answers."""
    inject(small_upstream, *[{"error_after_chunks": 1}] * 2)
    with client.chat.completions.with_streaming_response.create(model="fast", messages=MESSAGES, stream=True) as resp:
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        request_id = resp.headers["x-request-id"]
    assert text == "[simulated large] hello"
    record = gateway.wait_for_record(request_id)
    assert record["status"] == 200 and record["fallback_used"] is True and record["model"] == "large"
    inject(small_upstream, *[{"error_after_chunks": 1}] * 2)
    with claude.messages.stream(model="fast", max_tokens=64, messages=[{"role": "user", "content": "hello"}]) as stream:
        answer = stream.get_final_message().content[0]
    assert answer.type == "text" and answer.text == "[simulated large] hello"


def test_events_whose_data_spans_several_lines_reach_the_sdks_whole(
    client: openai.OpenAI,
    claude: anthropic.Anthropic,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> None:
    """SSE lets one event's data run over several ``data:`` lines; passed through, such an event
    was sent on with its later lines bare, and both SDKs failed to decode it."""
    inject(small_upstream, {"multiline_data": True})
    chat = client.chat.completions.create(model="small", messages=MESSAGES, stream=True)  # the raw pass-through
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == "[simulated small] hello"
    inject(small_upstream, {"multiline_data": True})
    with client.responses.stream(model="gpt", input="hello") as responses:  # a Responses upstream's own events
        assert responses.get_final_response().output_text
    inject(large_upstream, {"multiline_data": True})
    ask: Any = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    with claude.messages.stream(**ask, extra_body={"top_k": 5}) as messages:  # top_k: passed through as it came
        assert messages.get_final_message().content


def test_stream_cut_midway_is_reported_in_band_and_not_retried(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"cut_after_chunks": 3})
    received = []
    with pytest.raises(openai.APIError):
        with client.chat.completions.with_streaming_response.create(
            model="fast", messages=MESSAGES, stream=True
        ) as resp:
            request_id = resp.headers["x-request-id"]
            for chunk in resp.parse():
                received.append(chunk)
    assert len(received) >= 1
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    record = gateway.wait_for_record(request_id)
    assert record["error_type"] == "upstream_bad_response" and record["stream"] is True
    # 200 went out with the headers, but the request failed: counted as the 502 it ended with
    assert record["status"] == 502 and record["upstream_status"] == 200
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
    assert any(line.startswith("gateway_requests_total{") and 'status="502"' in line for line in metrics)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fast", "messages": MESSAGES, "temperature": 5}, "temperature"),
        ({"model": "fast", "messages": []}, "messages"),
        ({"model": "fast"}, None),
        ({"model": "fast", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "fast", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "fast", "messages": MESSAGES, "stream": "yes"}, "stream"),
    ],
)
def test_invalid_parameters_give_400_naming_them(
    gateway: GatewayProcess, body: dict[str, object], param: str | None
) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body)
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param and param in str(error["message"])
    else:
        assert "messages" in str(error["message"])


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies_give_400(gateway: GatewayProcess, raw: bytes) -> None:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"


def test_unknown_model_gives_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert "gpt-nope" in str(caught.value)


def test_oversized_body_gives_413(gateway: GatewayProcess) -> None:
    big = [{"role": "user", "content": "x" * 70_000}]  # the test policy's limit is 65,536 bytes
    response = httpx.post(f"{gateway.base_url}/chat/completions", json={"model": "fast", "messages": big})
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds on the bytes received
        yield b'{"model": "fast", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 5000
        yield b'"}]}'

    response = httpx.post(f"{gateway.base_url}/chat/completions", content=chunked())
    assert response.status_code == 413


def test_unknown_path_and_method_use_openai_error_body(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.base_url}/nope").status_code == 404
    response = httpx.get(f"{gateway.base_url}/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


@pytest.fixture(scope="module")
def breaker_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    # reset_after_s: the two requests and /readyz below fit in it on a loaded machine (1 s did not always)
    policy = policy_text(small_upstream, large_upstream, breaker="{min_requests: 1, reset_after_s: 5}")
    process = start_gateway(Path(tmp_path_factory.mktemp("breaker")), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def test_circuit_breaker_skips_dead_upstream_then_probes_again(
    breaker_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, *[{"status": 500}] * 2)
    first = _chat(breaker_gateway, model="fast")  # two failures open small's circuit; large answers
    assert first.headers["x-gateway-model"] == "large"
    calls_before = upstream_stats(small_upstream)["chat_requests"]
    second = _chat(breaker_gateway, model="fast")  # small is skipped without a call
    assert second.headers["x-gateway-model"] == "large"
    assert upstream_stats(small_upstream)["chat_requests"] == calls_before
    assert httpx.get(f"{breaker_gateway.url}/readyz").json()["upstreams"]["small"] == "open"
    deadline = time.monotonic() + 30  # until reset_after_s has passed: the next request probes
    while httpx.get(f"{breaker_gateway.url}/readyz").json()["upstreams"]["small"] != "half_open":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    third = _chat(breaker_gateway, model="fast")  # one probe goes through, succeeds, closes the circuit
    assert third.headers["x-gateway-model"] == "small"
    assert httpx.get(f"{breaker_gateway.url}/readyz").json()["upstreams"]["small"] == "closed"


def test_a_fallback_skipped_for_its_open_circuit_is_not_the_model_that_failed(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t72: small answered 500 twice, then large was skipped (its circuit open): the request was
    logged, counted and headed as large's failure, with ``upstream_status`` null, and the client
    was told "circuit open", not the 500. A skip calls no model: it is never the model tried."""
    policy = policy_text(small_upstream, large_upstream, breaker="{min_requests: 1, reset_after_s: 60}")
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:
        inject(large_upstream, {"status": 500}, {"status": 500})
        assert _chat(gateway, model="best").status_code == 502  # large alone failed: its circuit opens
        inject(small_upstream, {"status": 500}, {"status": 500})
        response = _chat(gateway, model="fast")  # small fails twice; large is skipped, not called
        assert response.status_code == 502 and response.headers["x-gateway-model"] == "small"
        assert "'small'" in str(_error(response)["message"]) and "HTTP 500" in str(_error(response)["message"])
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert (record["model"], record["upstream_status"], record["fallback_used"]) == ("small", 500, False)
        assert upstream_stats(large_upstream)["chat_requests"] == 2  # best's two: fast's none
        failed = [
            line
            for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
            if line.startswith("gateway_requests_total{") and 'route="fast"' in line and 'status="502"' in line
        ]
        assert failed and all('model="small"' in line for line in failed), failed
        skipped = _chat(gateway, model="fast")  # both circuits open now: no model is called at all
        assert skipped.status_code == 502 and _error(skipped)["code"] == "upstream_unavailable"
        assert "x-gateway-model" not in skipped.headers
        record = gateway.wait_for_record(skipped.headers["x-request-id"])
        assert (record["model"], record["upstream_status"], record["retries"]) == (None, None, 0)
    finally:
        gateway.stop()


def test_the_sdks_do_not_retry_a_model_skipped_for_its_open_circuit(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t166: the 502 ``upstream_unavailable`` of a route whose every model was skipped (its circuit
    open) said nothing of retrying, so both SDKs asked twice more, only to find the circuit open again."""
    policy = policy_text(small_upstream, large_upstream, breaker="{min_requests: 1, reset_after_s: 60}")
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    gpt = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=2, timeout=10)
    claude = anthropic.Anthropic(base_url=gateway.url, api_key="sk-unused", max_retries=2, timeout=10)
    said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    asked: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    asks: list[Callable[[], object]] = [
        lambda: gpt.chat.completions.create(model="small", messages=said),
        lambda: gpt.chat.completions.create(model="small", messages=said, stream=True),
        lambda: claude.messages.create(model="small", max_tokens=20, messages=asked),
        lambda: claude.messages.create(model="small", max_tokens=20, messages=asked, stream=True),
    ]
    try:
        inject(small_upstream, {"status": 500}, {"status": 500})
        assert _chat(gateway, model="small").status_code == 502  # small alone failed: its circuit opens
        called = upstream_stats(small_upstream)["chat_requests"]
        for asked_so_far, ask in enumerate(asks, start=1):
            with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as caught:
                ask()
            skipped = caught.value
            assert isinstance(skipped, openai.APIStatusError | anthropic.APIStatusError)
            assert skipped.status_code == 502 and skipped.response.headers.get("x-should-retry") == "false"
            gateway.wait_for_record(skipped.response.headers["x-request-id"])  # lines are written in order
            answered = [r for r in gateway.log_records() if r.get("error_type") == "upstream_unavailable"]
            assert len(answered) == asked_so_far  # no retry of the SDK's
        assert upstream_stats(small_upstream)["chat_requests"] == called  # skipped, never called
    finally:
        gpt.close()
        claude.close()
        gateway.stop()


@pytest.mark.parametrize(
    "fault",
    [
        {
            "status": 401,
            "body": '{"error": {"message": "Incorrect API key provided: sk-proj-****Xy9Q", "code": "invalid_api_key"}}',
        },
        {"status": 403, "body": '{"error": {"message": "Project does not have access", "code": null}}'},
        {
            "status": 404,
            "body": '{"error": {"message": "The model `gpt-x` does not exist", "code": "model_not_found"}}',
        },
    ],
)
def test_an_upstream_refusing_the_gateways_own_request_is_a_502_and_the_fallback_answers(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, fault: dict[str, Any]
) -> None:
    """The client's key never goes upstream: an upstream's 401/403 (or 404 for the model) is the
    gateway's configuration, not the client's key or request; its text may quote the operator's key."""
    inject(small_upstream, fault)
    answered = _chat(gateway, model="fast")  # small, then its fallback large
    assert answered.status_code == 200 and answered.headers["x-gateway-model"] == "large"
    assert upstream_stats(small_upstream)["chat_requests"] == 1  # not retried where it cannot help
    inject(small_upstream, fault)
    refused = _chat(gateway, model="small")  # no fallback
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "upstream_misconfigured" and "operator" in error["message"]
    assert "Xy9Q" not in refused.text and "access" not in refused.text and "gpt-x" not in refused.text


_OUT_OF_QUOTA = {
    "status": 429,
    "body": '{"error": {"message": "You exceeded your current quota, please check your plan and billing details. '
    "For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
    '", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}',
    "headers": {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "2000000",
        "x-ratelimit-remaining-tokens": "1999990",
        "x-ratelimit-reset-tokens": "0s",
    },
}
"""OpenAI's 429 for an account whose quota or billing is spent, as it comes."""


def test_an_upstream_out_of_quota_is_the_operators_account_not_a_rate_limit(
    gateway: GatewayProcess, client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """t174: OpenAI's 429 ``insufficient_quota`` was read as a passing rate limit: retried on every
    request, never counted by the circuit, and told the client to come back in a second."""
    httpx.post(f"{small_upstream.root_url}/_control/reset").raise_for_status()
    inject(small_upstream, _OUT_OF_QUOTA, _OUT_OF_QUOTA)  # a retry would meet it again
    answered = _chat(gateway, model="fast")  # small, then its fallback large
    assert answered.status_code == 200 and answered.headers["x-gateway-model"] == "large", answered.text
    assert upstream_stats(small_upstream)["chat_requests"] == 1  # not retried: waiting does not refill a quota
    record = gateway.wait_for_record(answered.headers["x-request-id"])
    assert record["fallback_used"] is True and record["retries"] == 1  # small's one attempt, then large's
    httpx.post(f"{small_upstream.root_url}/_control/reset").raise_for_status()
    inject(small_upstream, _OUT_OF_QUOTA, _OUT_OF_QUOTA, _OUT_OF_QUOTA)
    with pytest.raises(openai.APIStatusError) as caught:  # no fallback; the SDK's two retries of its own
        client.with_options(max_retries=2).chat.completions.create(model="small", messages=MESSAGES)
    refused = caught.value
    assert refused.status_code == 502 and upstream_stats(small_upstream)["chat_requests"] == 1, refused.body
    assert refused.response.headers["x-should-retry"] == "false" and "retry-after" not in refused.response.headers
    error = refused.response.json()["error"]
    assert error["code"] == "upstream_misconfigured" and "operator" in error["message"]
    assert "current quota" not in refused.response.text
    httpx.post(f"{small_upstream.root_url}/_control/reset").raise_for_status()  # the faults left over


def _asks(client: openai.OpenAI, claude: anthropic.Anthropic) -> dict[str, Callable[[], object]]:
    """One request per protocol, each by its official SDK with its default retries (two)."""
    gpt, claude = client.with_options(max_retries=2), claude.with_options(max_retries=2)
    said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    asked: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    return {
        "chat": lambda: gpt.chat.completions.create(model="small", messages=said),
        "chat stream": lambda: gpt.chat.completions.create(model="small", messages=said, stream=True),
        "completions": lambda: gpt.completions.create(model="small", prompt="hi"),
        "embeddings": lambda: gpt.embeddings.create(model="embed", input="hi"),
        "messages": lambda: claude.messages.create(model="small", max_tokens=20, messages=asked),
        "messages stream": lambda: claude.messages.create(model="small", max_tokens=20, messages=asked, stream=True),
        "responses": lambda: gpt.responses.create(model="gpt", input="hi"),
        "responses stream": lambda: gpt.responses.create(model="gpt", input="hi", stream=True),
    }


@pytest.mark.parametrize("protocol", ["chat", "chat stream", "completions", "embeddings", "messages",
                                      "messages stream", "responses", "responses stream"])  # fmt: skip
def test_the_sdks_do_not_retry_an_upstream_refusing_the_gateways_own_key(
    client: openai.OpenAI, claude: anthropic.Anthropic, small_upstream: SimulatedUpstream, protocol: str
) -> None:
    """t148: on a one-model route the 502 said nothing of retrying, so both SDKs sent the
    gateway's refused key upstream three times (twice more, ~1.2 s, for nothing)."""
    before = sum(upstream_stats(small_upstream)[f"{kind}_requests"] for kind in ("chat", "embeddings", "responses"))
    inject(small_upstream, {"status": 401, "body": '{"error": {"message": "Incorrect API key provided"}}'})
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as caught:
        _asks(client, claude)[protocol]()
    refused = caught.value
    assert isinstance(refused, openai.APIStatusError | anthropic.APIStatusError)
    assert refused.status_code == 502 and refused.response.headers["x-should-retry"] == "false", refused.body
    after = sum(upstream_stats(small_upstream)[f"{kind}_requests"] for kind in ("chat", "embeddings", "responses"))
    assert after - before == 1  # the gateway's one call; no retry of the SDK's


def test_one_tenants_failures_open_its_own_circuit_only(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """Prompts that break a model server, sent by one tenant, must not switch another tenant
    to the fallback (or off a model without one): circuits are per tenant."""
    auth = (
        "auth:\n  mode: keys\n  keys:\n"
        f'    - {{id: a, tenant: tenant-a, hash: "{hash_key("sk-a")}"}}\n'
        f'    - {{id: b, tenant: tenant-b, hash: "{hash_key("sk-b")}"}}\n'
        f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    )
    policy = policy_text(small_upstream, large_upstream, breaker="{min_requests: 1, reset_after_s: 30}", auth=auth)
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:

        def ask(key: str) -> httpx.Response:
            return httpx.post(
                f"{gateway.base_url}/chat/completions",
                json={"model": "fast", "messages": MESSAGES},
                headers={"authorization": f"Bearer {key}"},
                timeout=15,
            )

        inject(small_upstream, *[{"status": 500}] * 2)
        assert ask("sk-b").headers["x-gateway-model"] == "large"  # b's request broke small: b's circuit opens
        assert ask("sk-b").headers["x-gateway-model"] == "large"  # ... and b skips small now
        assert ask("sk-a").headers["x-gateway-model"] == "small"  # a was never affected
        assert httpx.get(f"{gateway.url}/readyz").json()["upstreams"] is None  # t46: no model names without a key
        readyz = httpx.get(f"{gateway.url}/readyz", headers={"authorization": "Bearer sk-ops"}).json()
        assert readyz["upstreams"]["small"] == "open"  # open for someone
    finally:
        gateway.stop()


def test_a_route_retry_policy_overrides_the_policy_wide_one(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """routes.<name>.retry was accepted and ignored; now it decides the attempts on that route."""
    routes = "  once: {model: small, fallbacks: [large], retry: {max_attempts: 1}}\n"
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream, routes=routes),
                            env={"REDIS_URL": redis_server.url})  # fmt: skip
    try:
        inject(small_upstream, {"status": 500})
        response = _chat(gateway, model="once")
        assert response.status_code == 200 and response.headers["x-gateway-model"] == "large"
        assert upstream_stats(small_upstream)["chat_requests"] == 1  # one attempt, not the policy's two
        inject(small_upstream, {"status": 500})
        assert _chat(gateway, model="fast").headers["x-gateway-model"] == "small"  # the policy's retry: 2 attempts
    finally:
        gateway.stop()


def test_an_upstream_400_that_quotes_the_gateways_key_reaches_the_client_without_it(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t46: a 4xx's words reach the client as the upstream wrote them, the operator's key too."""
    said = '{"error": {"message": "Incorrect API key provided: sk-large-secret-123 for this model", "type": "x"}}'
    inject(large_upstream, {"status": 400, "body": said})
    answered = httpx.post(f"{gateway.base_url}/chat/completions", timeout=15,
                          json={"model": "best", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert answered.status_code == 400 and "Incorrect API key provided" in answered.text
    assert "sk-large-secret-123" not in answered.text


_HASTY = """  hasty:
    base_url: {url}
    price: {{input: 0.5, output: 1.5}}
    tier: small
    simulated: true
    timeouts: {{connect: 1, first_byte: 1.5, total: 2}}
  measured:
    base_url: {url}
    price: {{input: 0.5, output: 1.5}}
    tier: small
    simulated: true
    timeouts: {{connect: 1, first_byte: 8, total: 8}}
"""


@pytest.fixture(scope="module")
def hasty_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    """Model ``hasty`` on the small upstream with a total of 2 s, alone and before ``large``; model
    ``measured`` with a total of 8 s, alone with 3 attempts."""
    routes = (
        "  hasty-then-large: {model: hasty, fallbacks: [large]}\n"
        "  measured-thrice: {model: measured, retry: {max_attempts: 3, backoff_initial_ms: 10, backoff_max_ms: 50}}\n"
    )
    policy = policy_text(
        small_upstream, large_upstream, extra_models=_HASTY.format(url=small_upstream.url), routes=routes
    )
    process = start_gateway(Path(tmp_path_factory.mktemp("hasty")), policy,
                            env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"})  # fmt: skip
    yield process
    process.stop()


def test_a_body_that_stalls_ends_at_its_models_total_not_once_per_attempt(
    hasty_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t95: headers and half the body, then silence. Each attempt had a total of its own, so the
    504 came after ``max_attempts`` totals (40 s for a total of 20 s), and a client that gave up at
    the total never saw it. The total is the model's, retries included: one attempt, then the 504."""
    inject(small_upstream, *[{"stall_mid_body_ms": 6000}] * 2)
    response = _chat(hasty_gateway, model="hasty")
    assert response.status_code == 504
    error = _error(response)
    assert error["code"] == "upstream_total_timeout", error
    assert "'hasty'" in str(error["message"]) and "total timeout of 2s (retries included)" in str(error["message"])
    record = hasty_gateway.wait_for_record(response.headers["x-request-id"])
    assert (record["error_type"], record["retries"], record["model"]) == ("upstream_total_timeout", 0, "hasty")
    assert upstream_stats(small_upstream)["chat_requests"] == 1  # not asked again once its total ran out


def test_a_model_whose_total_ran_out_falls_back_to_one_with_its_own(
    hasty_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, *[{"stall_mid_body_ms": 6000}] * 2)
    response = _chat(hasty_gateway, model="hasty-then-large")
    assert response.status_code == 200 and response.headers["x-gateway-model"] == "large"
    record = hasty_gateway.wait_for_record(response.headers["x-request-id"])
    assert (record["retries"], record["fallback_used"]) == (1, True)  # hasty once, then large
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert upstream_stats(large_upstream)["chat_requests"] == 1


def test_a_retry_after_an_early_failure_gets_what_is_left_of_the_total(
    hasty_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """Each attempt answers 503 after 5 s, of a total of 8 s: the second is cut when the total runs
    out (at 8 s, not 10 s), and no third is made, though the route allows three. Seconds apart on
    both sides (the first 503 is 3 s inside the total, the second would be 2 s past it): a loaded
    machine's lateness moves neither across."""
    inject(small_upstream, *[{"status": 503, "delay_ms": 5000}] * 3)
    response = _chat(hasty_gateway, model="measured-thrice")
    assert response.status_code == 504 and _error(response)["code"] == "upstream_total_timeout", response.text
    record = hasty_gateway.wait_for_record(response.headers["x-request-id"])
    assert (record["error_type"], record["retries"]) == ("upstream_total_timeout", 1)
    assert upstream_stats(small_upstream)["chat_requests"] == 2
