"""The exact cache and request coalescing through real gateway processes and a real Redis 8."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test, inject, leave_once_upstream_has_it, upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway

CACHE_ON = "{enabled: true, semantic: {enabled: false}, coalesce: {wait_s: 5}, redis_timeout_ms: 1000}"
KEYS = """auth:
  mode: keys
  keys:
    - {id: a1, tenant: team-a, hash: "%s"}
    - {id: a2, tenant: team-a, hash: "%s"}
    - {id: b1, tenant: team-b, hash: "%s"}
""" % (hash_key("key-a1"), hash_key("key-a2"), hash_key("key-b1"))


@pytest.fixture(scope="module")
def cached_gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:  # fmt: skip
    policy = policy_text(small_upstream, large_upstream, cache=CACHE_ON, auth=KEYS)
    process = start_gateway(Path(tmp_path_factory.mktemp("cache")), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def _client(gateway: GatewayProcess, key: str = "key-a1") -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=15))


def _unique(label: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"{label} {time.monotonic_ns()}"}]


def _post(gateway: GatewayProcess, content: bytes, key: str = "key-a1", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions", content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers}, timeout=15,
    )  # fmt: skip


def test_repeat_is_an_exact_hit_with_cost_saved(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    client, messages = _client(cached_gateway), _unique("repeat")
    first = client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0)
    second = client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0)
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "exact"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    paid = cached_gateway.wait_for_record(first.headers["x-request-id"])
    hit = cached_gateway.wait_for_record(second.headers["x-request-id"])
    assert (
        hit["cache"] == "exact" and hit["cost_usd"] == 0 and hit["cache_saved_usd"] == pytest.approx(paid["cost_usd"])
    )
    assert (hit["prompt_tokens"], hit["completion_tokens"]) == (paid["prompt_tokens"], paid["completion_tokens"])
    assert hit["baseline_cost_usd"] == pytest.approx(paid["baseline_cost_usd"])
    assert float(second.headers["x-gateway-cost-usd"]) == 0


def test_a_cache_hit_says_no_threshold_as_it_says_no_p_large(cached_gateway: GatewayProcess) -> None:
    """t178: a hit is not routed: neither the classifier's score nor a threshold is in its answer."""
    client, messages = _client(cached_gateway), _unique("threshold")
    first = client.chat.completions.with_raw_response.create(model="auto", messages=messages, temperature=0)
    second = client.chat.completions.with_raw_response.create(model="auto", messages=messages, temperature=0)
    assert first.headers["x-gateway-cache"] == "miss" and first.headers["x-gateway-threshold"] == "0.5000"
    assert second.headers["x-gateway-cache"] == "exact" and second.headers["x-gateway-decision"] == "cache"
    assert "x-gateway-threshold" not in second.headers and "x-gateway-p-large" not in second.headers


def test_an_answer_no_upstream_gave_this_request_logs_no_prompt_cache_read_or_write(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t158 #1: an exact hit and a coalesced follower repeated the upstream's prompt-cache read and
    write of the answer they were served, so the log's cache writes summed above the upstream's."""
    client, messages = _client(cached_gateway), _unique("prompt cache")
    # claude's first-byte timeout is the default minute: 3 s for the second request to join the first
    inject(
        large_upstream, {"delay_ms": 3000, "usage": {"cache_read_input_tokens": 4, "cache_creation_input_tokens": 6}}
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(
            lambda _: client.chat.completions.with_raw_response.create(model="claude", messages=messages, temperature=0),
            range(2),
        ))  # fmt: skip
    later = client.chat.completions.with_raw_response.create(model="claude", messages=messages, temperature=0)
    records = [cached_gateway.wait_for_record(r.headers["x-request-id"]) for r in (*together, later)]
    paid = next(r for r in records if r["tokens_source"] == "upstream")
    served = [r for r in records if r is not paid]
    assert (paid["cached_prompt_tokens"], paid["cache_write_tokens"]) == (4, 6)
    assert sorted(r["coalesced"] is True for r in served) == [False, True]
    for record in served:
        assert (record["cache"], record["tokens_source"], record["cost_usd"]) == ("exact", "cache", 0)
        assert (record["cached_prompt_tokens"], record["cache_write_tokens"], record["cache_write_1h_tokens"]) == (
            0, 0, 0,
        )  # fmt: skip
        assert (record["prompt_tokens"], record["completion_tokens"]) == (
            paid["prompt_tokens"],
            paid["completion_tokens"],
        )
        assert record["reasoning_tokens"] == paid["reasoning_tokens"] and record["service_tier"] is None
        assert record["baseline_cost_usd"] == pytest.approx(paid["baseline_cost_usd"])  # priced on the miss's split
        assert record["cache_saved_usd"] == pytest.approx(paid["cost_usd"])
        # t158 #2: the cache's share of the hit's savings; the rest is routing's, as on the miss
        routing = record["baseline_cost_usd"] - record["cost_usd"] - record["cache_saved_usd"]
        assert routing == pytest.approx(paid["baseline_cost_usd"] - paid["cost_usd"])


def test_the_retry_of_a_client_that_timed_out_is_served_the_answer_it_left(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """A client whose timeout ended its wait: the upstream's answer is still billed and stored, so
    its retry is a hit rather than a second bill."""
    # its headers at once (small's 1 s first-byte timeout is not in play), the rest of it 1.5 s on
    inject(small_upstream, {"stall_mid_body_ms": 1500})
    body = {"model": "fast", "messages": _unique("timed out"), "temperature": 0}
    request_id = f"timed-out-{time.monotonic_ns()}"
    leave_once_upstream_has_it(f"{cached_gateway.base_url}/chat/completions", body, small_upstream, request_id,
                               headers={"authorization": "Bearer key-a1"})  # fmt: skip
    assert cached_gateway.wait_for_record(request_id)["status"] == 499  # the answer came, billed (and stored)
    again = _post(cached_gateway, json.dumps(body).encode())
    assert again.status_code == 200 and again.headers["x-gateway-cache"] == "exact"
    assert upstream_stats(small_upstream)["chat_requests"] == 1


def test_a_twin_of_a_request_whose_client_left_is_still_retried_for(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t43: the leader's client left, so its failed first try was not retried, and the twin still
    waiting on it got the 502 one retry would have spared it."""
    inject(small_upstream, {"delay_ms": 500, "status": 500})
    content = json.dumps({"model": "fast", "messages": _unique("twin"), "temperature": 0}).encode()
    headers = {"authorization": "Bearer key-a1", "content-type": "application/json"}
    url = f"{cached_gateway.base_url}/chat/completions"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        leader = pool.submit(httpx.post, url, content=content, headers=headers, timeout=0.25)
        time.sleep(0.1)
        twin = pool.submit(httpx.post, url, content=content, headers=headers, timeout=15)
        with pytest.raises(httpx.ReadTimeout):
            leader.result()
        answered = twin.result()
    assert answered.status_code == 200, answered.text
    assert upstream_stats(small_upstream)["chat_requests"] == 2  # the failed try, and its retry


def test_a_request_whose_client_left_is_not_retried_or_fallen_back_with_no_twin_waiting(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t123: holding a coalescing lease (the default) was taken for a twin waiting on it: the
    failed try of a client that left was retried and billed for no one."""
    # the client leaves while its try waits on the 500 (or, on a loaded machine, on the 1 s first-byte
    # timeout, as retryable a failure)
    inject(small_upstream, {"delay_ms": 900, "status": 500}, {"status": 500})  # a retry would fall back too
    request_id = f"gone-{time.monotonic_ns()}"
    body = {"model": "fast", "messages": _unique("gone"), "temperature": 0}
    leave_once_upstream_has_it(f"{cached_gateway.base_url}/chat/completions", body, small_upstream, request_id,
                               headers={"authorization": "Bearer key-a1"})  # fmt: skip
    record = cached_gateway.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert (record["retries"], record["fallback_used"], record["cost_usd"]) == (0, False, 0)
    time.sleep(0.3)
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert upstream_stats(large_upstream)["chat_requests"] == 0


def test_a_twin_that_came_after_the_leaders_client_left_is_still_retried_for(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """Whether the failed try is retried is decided when it fails, by the twins waiting then."""
    inject(small_upstream, {"delay_ms": 800, "status": 500})
    messages = _unique("late twin")
    leaver = closed_after_test(openai.OpenAI(base_url=cached_gateway.base_url, api_key="key-a1", max_retries=0,
                                             timeout=0.2))  # fmt: skip
    with pytest.raises(openai.APITimeoutError):
        leaver.chat.completions.create(model="fast", messages=messages, temperature=0)
    time.sleep(0.1)  # the leader's client is gone; its upstream answers its 500 in ~0.5 s
    raw = _client(cached_gateway).chat.completions.with_raw_response.create(
        model="fast", messages=messages, temperature=0
    )
    assert raw.http_response.status_code == 200
    assert upstream_stats(small_upstream)["chat_requests"] == 2  # the failed try, and its retry


def test_key_ignores_field_order_and_whitespace(cached_gateway: GatewayProcess) -> None:
    marker = f"order {time.monotonic_ns()}"
    compact = b'{"model":"fast","temperature":0,"messages":[{"role":"user","content":"%s"}]}' % marker.encode()
    spaced = (
        b'{ "messages" : [ { "content" : "%s", "role" : "user" } ],\n  "temperature": 0, "model": "fast" }'
        % marker.encode()
    )
    assert _post(cached_gateway, compact).headers["x-gateway-cache"] == "miss"
    assert _post(cached_gateway, spaced).headers["x-gateway-cache"] == "exact"


@pytest.mark.parametrize(
    "change", [{"temperature": 0.5}, {"max_tokens": 3}, {"seed": 7}, {"stop": ["x"]}, {"vendor_flag": 1}]
)
def test_parameters_that_change_the_answer_change_the_key(
    cached_gateway: GatewayProcess, change: dict[str, object]
) -> None:
    client, messages = _client(cached_gateway), _unique("params")
    client.chat.completions.create(model="fast", messages=messages, temperature=0)
    other: dict[str, Any] = {"temperature": 0, **change}
    extra: dict[str, Any] = {"extra_body": {"vendor_flag": 1}} if "vendor_flag" in change else {}
    other.pop("vendor_flag", None)
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=messages, **other, **extra)
    assert raw.headers["x-gateway-cache"] == "miss"


def test_route_is_part_of_the_key(cached_gateway: GatewayProcess) -> None:
    client, messages = _client(cached_gateway), _unique("route")
    client.chat.completions.create(model="fast", messages=messages, temperature=0)
    assert (
        client.chat.completions.with_raw_response.create(model="best", messages=messages, temperature=0).headers[
            "x-gateway-cache"
        ]
        == "miss"
    )


@pytest.mark.parametrize("stream_first", [False, True])
def test_streamed_and_plain_requests_share_entries(cached_gateway: GatewayProcess, stream_first: bool) -> None:
    client, messages = _client(cached_gateway), _unique("stream")

    def streamed() -> tuple[str, str, list[ChatCompletionChunk]]:
        with client.chat.completions.with_streaming_response.create(
            model="fast", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
        ) as response:
            chunks = list(response.parse())
            cache = response.headers["x-gateway-cache"]
        return cache, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

    def plain() -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0)
        return raw.headers["x-gateway-cache"], raw.parse().choices[0].message.content or ""

    if stream_first:
        (c1, t1, _), (c2, t2) = streamed(), plain()
    else:
        (c1, t1), (c2, t2, chunks) = plain(), streamed()
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert all("usage" in c.model_fields_set for c in chunks), "a live stream says usage: null on each chunk"
        replayed_plain = client.chat.completions.create(model="fast", messages=messages, temperature=0)
        assert replayed_plain.usage is not None
        assert chunks[-1].usage.prompt_tokens_details == replayed_plain.usage.prompt_tokens_details
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
    assert (c1, c2) == ("miss", "exact") and t1 == t2 and t1.startswith("[simulated small]")


@pytest.mark.parametrize("stream_first", [False, True])
def test_a_hit_says_the_system_fingerprint_its_miss_said(cached_gateway: GatewayProcess, stream_first: bool) -> None:
    """t116: a hit, streamed or not, said no ``system_fingerprint`` where the miss it replays said
    the upstream's; an Anthropic client's hit of the same entry grows no OpenAI field."""
    client, messages = _client(cached_gateway), _unique("fingerprint")

    def streamed() -> tuple[str, set[str | None]]:
        with client.chat.completions.with_streaming_response.create(
            model="fast", messages=messages, temperature=0, max_tokens=64, stream=True,
            stream_options={"include_usage": True},
        ) as response:  # fmt: skip
            chunks = list(response.parse())
            return response.headers["x-gateway-cache"], {c.system_fingerprint for c in chunks}

    def plain() -> tuple[str, set[str | None]]:
        raw = client.chat.completions.with_raw_response.create(
            model="fast", messages=messages, temperature=0, max_tokens=64
        )
        return raw.headers["x-gateway-cache"], {raw.parse().system_fingerprint}

    asked = [streamed, plain, streamed] if stream_first else [plain, streamed, plain]
    assert [ask() for ask in asked] == [("miss", {"simulated"}), ("exact", {"simulated"}), ("exact", {"simulated"})]
    message = httpx.post(
        f"{cached_gateway.url}/v1/messages", headers={"x-api-key": "key-a1"}, timeout=15,
        json={"model": "fast", "max_tokens": 64, "temperature": 0, "messages": messages},
    )  # fmt: skip
    assert message.headers["x-gateway-cache"] == "exact" and "system_fingerprint" not in message.text


@pytest.mark.parametrize("stream_first", [False, True])
def test_a_stop_sequence_answer_is_stored_and_replayed_with_its_stop(
    cached_gateway: GatewayProcess, stream_first: bool
) -> None:
    """An answer a stop string ended is complete: stored, and replayed saying which string
    ended it (Anthropic's ``stop_sequence``); a chat client reads a plain ``stop``."""
    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    ask: dict[str, Any] = {
        "model": "fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"alpha beta gamma {time.monotonic_ns()}"}],
        "stop_sequences": ["beta"],
        "extra_body": {"temperature": 0},  # the SDK has no such parameter any more; the API takes it
    }

    def streamed() -> tuple[str, anthropic.types.Message]:
        with claude.messages.stream(**ask) as stream:
            return stream.response.headers["x-gateway-cache"], stream.get_final_message()

    def plain() -> tuple[str, anthropic.types.Message]:
        raw = claude.messages.with_raw_response.create(**ask)
        return raw.headers["x-gateway-cache"], raw.parse()

    (c1, m1), (c2, m2) = (streamed(), plain()) if stream_first else (plain(), streamed())
    assert (c1, c2) == ("miss", "exact")
    for message in (m1, m2):
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == "beta"
    chat = _client(cached_gateway).chat.completions.create(
        model="fast", messages=ask["messages"], stop=["beta"], temperature=0, max_tokens=64
    )
    assert chat.choices[0].finish_reason == "stop"


def test_what_the_key_cannot_hold_is_never_served_from_another_requests_answer(cached_gateway: GatewayProcess) -> None:
    """A tool_choice shape, an image's detail and a message field the gateway does not read
    each make another question: none may be answered with the plain request's cached answer."""
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

    def ask(**body: Any) -> str:
        response = _post(cached_gateway, msgspec.json.encode({"model": "fast", "temperature": 0, **body}))
        assert response.status_code == 200, response.text
        return response.headers["x-gateway-cache"]

    question = [{"role": "user", "content": f"What time is it? {time.monotonic_ns()}"}]
    assert ask(messages=question, tools=[tool]) == "miss"
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
    }
    assert ask(messages=question, tools=[tool], tool_choice=allowed) != "exact"

    def looking(detail: str) -> list[dict[str, Any]]:
        part = {"type": "image_url", "image_url": {"url": image, "detail": detail}}
        return [
            {"role": "user", "content": [{"type": "text", "text": f"What is this? {question[0]['content']}"}, part]}
        ]

    assert ask(messages=looking("low")) == "miss"
    assert ask(messages=looking("high")) == "miss"
    assert ask(messages=looking("auto")) == "miss" and ask(messages=looking("auto")) == "exact"

    turns = [*question, {"role": "assistant", "content": "It is"}]
    assert ask(messages=turns) == "miss"
    assert ask(messages=[*question, {"role": "assistant", "content": "It is", "prefix": True}]) != "exact"
    echoed: dict[str, Any] = {
        "role": "assistant",
        "content": "It is",
        "refusal": None,
        "annotations": [],
        "audio": None,
    }
    assert ask(messages=[*question, echoed]) == "exact"  # what the SDK echoes back of an answer changes nothing


def test_errors_are_never_cached(cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    client, messages = _client(cached_gateway), _unique("error")
    inject(small_upstream, {"status": 500}, {"status": 500})
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="small", messages=messages, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model="small", messages=messages, temperature=0)
    assert raw.headers["x-gateway-cache"] == "miss" and upstream_stats(small_upstream)["chat_requests"] == 3


def test_a_cut_stream_is_never_cached(cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    client, messages = _client(cached_gateway), _unique("cut")
    inject(small_upstream, {"cut_after_chunks": 2})
    cut_id = f"cut-{time.time_ns()}"
    with pytest.raises(openai.APIError):
        list(
            client.chat.completions.create(
                model="small", messages=messages, temperature=0, stream=True, extra_headers={"x-request-id": cut_id}
            )
        )
    # Until the cut stream is over (logged), an identical request coalesces on it and is told its
    # failure: a CI run under load sent the next one that early and got the cut's 502.
    cached_gateway.wait_for_record(cut_id, timeout_s=30)
    raw = client.chat.completions.with_raw_response.create(model="small", messages=messages, temperature=0)
    assert raw.headers["x-gateway-cache"] == "miss"


def test_cache_control_no_cache_and_no_store(cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    client, messages = _client(cached_gateway), _unique("directives")
    client.chat.completions.create(model="fast", messages=messages, temperature=0)
    fresh = client.chat.completions.with_raw_response.create(
        model="fast", messages=messages, temperature=0, extra_headers={"Cache-Control": "no-cache"}
    )
    # not looked up: a bypass, not a miss (t22: it lowered the dashboards' hit ratio)
    assert fresh.headers["x-gateway-cache"] == "bypass" and upstream_stats(small_upstream)["chat_requests"] == 2

    other = _unique("no-store")
    client.chat.completions.create(
        model="fast", messages=other, temperature=0, extra_headers={"Cache-Control": "no-store"}
    )
    assert (
        client.chat.completions.with_raw_response.create(model="fast", messages=other, temperature=0).headers[
            "x-gateway-cache"
        ]
        == "miss"
    )
    # the body field does the same, and is not forwarded upstream
    third = _unique("field")
    client.chat.completions.create(
        model="fast", messages=third, temperature=0, extra_body={"gateway_cache": "no-store"}
    )
    assert "gateway_cache" not in upstream_stats(small_upstream)["last_request"]["body"]
    assert (
        client.chat.completions.with_raw_response.create(model="fast", messages=third, temperature=0).headers[
            "x-gateway-cache"
        ]
        == "miss"
    )
    # two Cache-Control lines are one list, as HTTP reads them (t163: the second was ignored: a hit)
    lines = httpx.post(
        f"{cached_gateway.base_url}/chat/completions",
        json={"model": "fast", "messages": messages, "temperature": 0},
        headers=[("authorization", "Bearer key-a1"), ("cache-control", "max-age=10"), ("cache-control", "no-cache")],
        timeout=15,
    )
    assert lines.status_code == 200 and lines.headers["x-gateway-cache"] == "bypass"
    # max-age=0 asks for a fresh answer, and so does Pragma: no-cache without a Cache-Control (t169: hits)
    for fresh_asked in ({"cache-control": "max-age=0"}, {"pragma": "no-cache"}):
        raw = client.chat.completions.with_raw_response.create(
            model="fast", messages=messages, temperature=0, extra_headers=fresh_asked
        )
        assert raw.headers["x-gateway-cache"] == "bypass", fresh_asked
    # a directive the gateway does not know is refused, not ignored (t64: "no_cache" read the cache)
    for given in ("no_cache", ["no-store", "nocache"], {"read": "no"}, 3):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="fast", messages=third, extra_body={"gateway_cache": given})
        assert refused.value.body is not None and "gateway_cache" in str(refused.value.body)
    for taken in ("no-cache, no-store", ["no-store"], {"read": False, "write": True}):
        client.chat.completions.create(model="fast", messages=third, temperature=0, extra_body={"gateway_cache": taken})
    # as they are checked, so they are read: with spaces, both skip the cache (t67: stored, and hit)
    for both in ("no-cache,no-store", " no-store , no-cache", ["no-cache ", " no-store"]):
        fourth = _unique("both")
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="fast", messages=fourth, temperature=0, extra_body={"gateway_cache": both}
            )
            assert raw.headers["x-gateway-cache"] == "bypass", both


def test_tenants_never_see_each_others_cached_answers(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    messages = _unique("tenant")
    inject(small_upstream, {"text": "team-a's confidential answer"})
    a = _client(cached_gateway, "key-a1").chat.completions.create(model="fast", messages=messages, temperature=0)
    assert a.choices[0].message.content == "team-a's confidential answer"
    raw = _client(cached_gateway, "key-b1").chat.completions.with_raw_response.create(
        model="fast", messages=messages, temperature=0
    )
    assert raw.headers["x-gateway-cache"] == "miss"
    assert "confidential" not in (raw.parse().choices[0].message.content or "")
    # another key of the same tenant shares the tenant's cache
    same_tenant = _client(cached_gateway, "key-a2").chat.completions.with_raw_response.create(
        model="fast", messages=messages, temperature=0
    )
    assert same_tenant.headers["x-gateway-cache"] == "exact"


def _at_once(client: openai.OpenAI, messages: Any, n: int) -> list[Any]:
    """``n`` identical requests sent together: raw responses, in order."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(
            lambda _: client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0),
            range(n),
        ))  # fmt: skip


def test_identical_concurrent_requests_are_coalesced(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    messages = _unique("coalesce")
    # its headers at once, the rest 2.5 s on: all eight join it, within small's 1 s first-byte timeout
    inject(small_upstream, {"stall_mid_body_ms": 2500})
    client = _client(cached_gateway)
    results = _at_once(client, messages, 8)
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert len({r.parse().choices[0].message.content for r in results}) == 1
    records = [cached_gateway.wait_for_record(r.headers["x-request-id"]) for r in results]
    assert sum(1 for r in records if r.get("coalesced")) == 7


def test_a_coalesced_wait_is_upstream_time_not_gateway_overhead(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t70: a follower's wait for its leader's upstream call was logged (and counted in
    gateway_overhead_seconds, and sent as x-gateway-overhead-ms) as the gateway's own work."""
    messages = _unique("coalesce overhead")
    inject(small_upstream, {"stall_mid_body_ms": 2500})  # the answer's headers come within the first-byte timeout
    client = _client(cached_gateway)
    results = _at_once(client, messages, 4)
    records = {r.headers["x-request-id"]: cached_gateway.wait_for_record(r.headers["x-request-id"]) for r in results}
    followers = [r for r in results if records[r.headers["x-request-id"]].get("coalesced")]
    assert len(followers) == 3
    for raw in followers:  # waiting is nearly all the follower did: its overhead is a small part of its latency
        record = records[raw.headers["x-request-id"]]
        assert record["overhead_ms"] < record["latency_ms"] / 2, record
        assert float(raw.headers["x-gateway-overhead-ms"]) < record["latency_ms"] / 2, record


def test_requests_waiting_on_a_stream_that_fails_part_way_are_told_its_error(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t116: the leader's upstream closed the connection mid-stream (its client got an in-band
    error), and every identical request waiting on it was sent upstream on its own at once: 4
    failing calls, all billed. They are told its error, as for a failure before the stream began."""
    messages = _unique("cut while others wait")
    inject(small_upstream, *[{"cut_after_chunks": 2, "chunk_delay_ms": 300}] * 4)  # a stampede takes them all
    client = _client(cached_gateway)

    def ask(stream: bool) -> Any:
        if stream:
            return list(client.chat.completions.create(model="fast", messages=messages, temperature=0, stream=True))
        return client.chat.completions.create(model="fast", messages=messages, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        leader = pool.submit(ask, True)
        while not upstream_stats(small_upstream)["chat_requests"]:  # the others come while it is under way
            time.sleep(0.02)
        waiters = [pool.submit(ask, stream) for stream in (True, False, False)]
        with pytest.raises(openai.APIError):  # in-band, after its 200
            leader.result()
        for waiter in waiters:
            with pytest.raises(openai.APIStatusError) as told:
                waiter.result()
            assert told.value.status_code == 502
    assert upstream_stats(small_upstream)["chat_requests"] == 1


def test_coalescing_and_cache_work_across_gateway_processes(
    tmp_path: Path, cached_gateway: GatewayProcess, redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> None:  # fmt: skip
    policy = policy_text(small_upstream, large_upstream, cache=CACHE_ON, auth=KEYS)
    second = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:
        messages = _unique("cross-process")
        # the leader's call is under way 2 s, within small's 1 s first-byte timeout (no retry to count)
        inject(small_upstream, {"stall_mid_body_ms": 2000})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            leader = pool.submit(
                _client(cached_gateway).chat.completions.create, model="fast", messages=messages, temperature=0
            )
            # it leads: after a guessed 0.3 s, a loaded machine could let the follower come first, and lead
            while not upstream_stats(small_upstream)["chat_requests"]:
                time.sleep(0.02)
            follower = pool.submit(
                _client(second).chat.completions.with_raw_response.create,
                model="fast",
                messages=messages,
                temperature=0,
            )
            led, followed = leader.result(), follower.result()
        assert followed.headers["x-gateway-cache"] == "exact"
        assert followed.parse().choices[0].message.content == led.choices[0].message.content
        assert upstream_stats(small_upstream)["chat_requests"] == 1
        # and an answer cached through one process is served by the other
        later = _unique("shared")
        _client(second).chat.completions.create(model="fast", messages=later, temperature=0)
        assert (
            _client(cached_gateway)
            .chat.completions.with_raw_response.create(model="fast", messages=later, temperature=0)
            .headers["x-gateway-cache"]
            == "exact"
        )
    finally:
        second.stop()


def test_gateway_serves_without_redis_and_uses_it_again_when_back(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    port = free_port()
    policy = policy_text(small_upstream, large_upstream, cache=CACHE_ON)
    gateway = start_gateway(tmp_path / "gw", policy, env={"REDIS_URL": f"redis://:pw-1@127.0.0.1:{port}/0"},
                            expect_ready=False)  # fmt: skip
    redis: EmbeddedRedis | None = None
    try:
        client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=10))
        messages = _unique("outage")
        for _ in range(3):  # no request fails because of the cache, and none claims to have looked in it
            raw = client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0)
            assert raw.headers["x-gateway-cache"] == "bypass"
        assert len(gateway.wait_for_ops("redis_unavailable")) == 1  # once per incident
        redis = start_embedded_redis(tmp_path / "redis", port=port, password="pw-1")
        deadline = time.monotonic() + 30
        cache = "bypass"
        while cache != "exact" and time.monotonic() < deadline:
            time.sleep(0.3)
            cache = client.chat.completions.with_raw_response.create(
                model="fast", messages=messages, temperature=0
            ).headers["x-gateway-cache"]
        assert cache == "exact"
        assert gateway.wait_for_ops("redis_recovered")
    finally:
        gateway.stop()
        if redis is not None:
            redis.stop()


def test_one_question_through_four_apis_shares_one_entry_per_tenant(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """The entry holds the answer, not a wire format: Anthropic Messages, Responses and legacy
    completions asking what a chat request asked are served from its entry, in their own shapes."""
    question = f"Which planet is largest? {time.monotonic_ns()}"
    headers = {"authorization": "Bearer key-a1"}
    chat = _client(cached_gateway).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0
    )
    assert chat.headers["x-gateway-cache"] == "miss"
    answer = chat.parse().choices[0].message.content
    calls = upstream_stats(small_upstream)["requests"]
    message = httpx.post(
        f"{cached_gateway.url}/v1/messages", headers={"x-api-key": "key-a1"}, timeout=15,
        json={"model": "fast", "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": question}]},
    )  # fmt: skip
    assert message.status_code == 200 and message.headers["x-gateway-cache"] == "exact", message.text
    assert message.json()["content"] == [{"type": "text", "text": answer}]
    response = httpx.post(
        f"{cached_gateway.base_url}/responses", headers=headers, timeout=15,
        json={"model": "fast", "input": question, "max_output_tokens": 64, "temperature": 0, "store": False},
    )  # fmt: skip
    assert response.status_code == 200 and response.headers["x-gateway-cache"] == "exact", response.text
    texts = [part["text"] for item in response.json()["output"] for part in item.get("content", [])]
    assert texts == [answer]
    legacy = httpx.post(
        f"{cached_gateway.base_url}/completions", headers=headers, timeout=15,
        json={"model": "fast", "prompt": question, "max_tokens": 64, "temperature": 0},
    )  # fmt: skip
    assert legacy.status_code == 200 and legacy.headers["x-gateway-cache"] == "exact", legacy.text
    assert legacy.json()["choices"][0]["text"] == answer
    assert upstream_stats(small_upstream)["requests"] == calls  # none of the three reached the upstream
    other = httpx.post(
        f"{cached_gateway.url}/v1/messages", headers={"x-api-key": "key-b1"}, timeout=15,
        json={"model": "fast", "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": question}]},
    )  # fmt: skip
    assert other.headers["x-gateway-cache"] == "miss"  # another tenant: never another tenant's entry


def test_a_cache_hit_streams_in_the_asking_protocol(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """An entry a chat request filled, asked for as a stream through Responses and legacy completions:
    each client's own stream events, rendered from the stored answer, upstream untouched."""
    question = f"Name the largest ocean. {time.monotonic_ns()}"
    client = _client(cached_gateway)
    chat = client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0
    )
    answer = chat.choices[0].message.content
    calls = upstream_stats(small_upstream)["requests"]
    stream = client.responses.create(
        model="fast", input=question, max_output_tokens=64, temperature=0, store=False, stream=True
    )
    events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = [e for e in events if e.type == "response.completed"]
    assert deltas == answer and len(completed) == 1
    assert completed[0].response.output_text == answer and completed[0].response.usage is not None
    legacy = client.completions.create(model="fast", prompt=question, max_tokens=64, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in legacy if c.choices) == answer
    assert upstream_stats(small_upstream)["requests"] == calls


def test_what_an_entry_cannot_hold_is_neither_served_nor_stored(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """An entry holds the internal answer, which has no token logprobs: a request for them
    always reaches the upstream and gets them, streamed or not, and leaves nothing behind."""
    client = _client(cached_gateway)
    messages: Any = [{"role": "user", "content": f"Say hello. {time.monotonic_ns()}"}]
    calls = upstream_stats(small_upstream)["requests"]
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="fast", messages=messages, temperature=0, logprobs=True, top_logprobs=2
        )
        assert raw.headers["x-gateway-cache"] == "bypass"
        logprobs = raw.parse().choices[0].logprobs
        assert logprobs is not None and logprobs.content
        chunks = list(
            client.chat.completions.create(model="fast", messages=messages, temperature=0, logprobs=True, stream=True)
        )
        assert any(c.choices and c.choices[0].logprobs for c in chunks)
    assert upstream_stats(small_upstream)["requests"] == calls + 4
    plain = client.chat.completions.with_raw_response.create(model="fast", messages=messages, temperature=0)
    assert plain.headers["x-gateway-cache"] == "miss"  # nothing was stored by the requests above


_WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_a_streamed_tool_call_fills_the_cache_and_replays_whole(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    client = _client(cached_gateway)
    messages: Any = [{"role": "user", "content": f"What's the weather in Oslo? {time.monotonic_ns()}"}]
    first = client.chat.completions.create(
        model="fast", messages=messages, tools=[_WEATHER_TOOL], temperature=0, stream=True
    )
    streamed = _stream_calls(first)
    assert streamed and streamed[0]["name"] == "get_weather"
    calls = upstream_stats(small_upstream)["requests"]
    again = client.chat.completions.with_raw_response.create(
        model="fast", messages=messages, tools=[_WEATHER_TOOL], temperature=0, stream=True
    )
    assert again.headers["x-gateway-cache"] == "exact"
    replayed_stream = _stream_calls(again.parse())
    assert [(c["name"], c["arguments"]) for c in replayed_stream] == [(c["name"], c["arguments"]) for c in streamed]
    whole = client.chat.completions.create(model="fast", messages=messages, tools=[_WEATHER_TOOL], temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    replayed = [c for c in choice.message.tool_calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert [(c.function.name, c.function.arguments) for c in replayed] == [
        (c["name"], c["arguments"]) for c in streamed
    ]
    # t83, t87: each answer's calls have ids of their own, as the upstream's would (two users of a
    # tenant got one id, which an app that keeps results by call id mixes up), spelled as it spells them
    ids = [streamed[0]["id"], replayed_stream[0]["id"], replayed[0].id]
    assert len(set(ids)) == 3 and all(i.startswith("call_") for i in ids), ids
    assert upstream_stats(small_upstream)["requests"] == calls


def test_a_claude_tool_call_streams_content_null_live_and_from_the_cache(cached_gateway: GatewayProcess) -> None:
    """f93: a chat stream from Anthropic opened with content "" whatever came, so the openai SDK's
    stream helper assembled a tool call's message with content "" live and None on a hit (whose
    replay opens with null, as OpenAI's streams do). A text answer still opens with ""."""
    client = _client(cached_gateway)
    forced: Any = {"type": "function", "function": {"name": "get_weather"}}
    tool_ask: Any = {"messages": _unique("weather in Oslo"), "tools": [_WEATHER_TOOL], "tool_choice": forced}

    def streamed(label: str, **ask: Any) -> tuple[Any, Any, str]:
        request_id = f"{label}-{time.monotonic_ns()}"
        with client.chat.completions.stream(model="claude", extra_headers={"x-request-id": request_id}, **ask) as s:
            chunks = [event.chunk for event in s if event.type == "chunk"]
            message = s.get_final_completion().choices[0].message
        return chunks[0].choices[0].delta, message, cached_gateway.wait_for_record(request_id)["cache"]

    opening, live, cache = streamed("tool-live", **tool_ask)
    assert (opening.role, opening.content, cache) == ("assistant", None, "miss")
    assert live.content is None and live.tool_calls and live.tool_calls[0].function.name == "get_weather"
    opening, hit, cache = streamed("tool-hit", **tool_ask)
    assert (opening.role, opening.content, cache) == ("assistant", None, "exact")
    assert hit.content is None and hit.tool_calls and hit.tool_calls[0].function.name == "get_weather"

    opening, text, _ = streamed("text", messages=_unique("hello"))
    assert (opening.role, opening.content) == ("assistant", "") and text.content


def test_an_agents_next_turn_is_a_hit_whatever_ids_its_calls_were_given(cached_gateway: GatewayProcess) -> None:
    """A replayed call has an id of its own (above), so the turn that sends its result back names
    another id than the first user's did: the key reads each call by its place, not its id."""
    question: Any = [{"role": "user", "content": f"What's the weather in Lima? {time.monotonic_ns()}"}]

    def turn(key: str) -> tuple[str, str]:
        asked = _client(cached_gateway, key).chat.completions.with_raw_response.create(
            model="fast", messages=question, tools=[_WEATHER_TOOL], temperature=0
        )
        call = asked.parse().choices[0].message.tool_calls[0]  # type: ignore[index]
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        result: Any = [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": "14 C, drizzle"},
        ]
        answered = _client(cached_gateway, key).chat.completions.with_raw_response.create(
            model="fast", messages=[*question, *result], tools=[_WEATHER_TOOL], temperature=0
        )
        return asked.headers["x-gateway-cache"] + "/" + answered.headers["x-gateway-cache"], call.id

    first, first_id = turn("key-a1")
    second, second_id = turn("key-a2")  # another key of the tenant: another user of the app
    assert (first, second) == ("miss/miss", "exact/exact") and first_id != second_id


def _stream_calls(stream: Any) -> list[dict[str, str]]:
    """The tool calls a chat stream spelled out, joined by index."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                known = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                known["id"] = call.id or known["id"]
                if call.function is not None:
                    known["name"] = call.function.name or known["name"]
                    known["arguments"] += call.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_a_streamed_answer_with_signed_thinking_replays_its_blocks(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    import anthropic

    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    ask: Any = {
        "model": "claude", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": f"Why is the sky blue? {time.monotonic_ns()}"}],
    }  # fmt: skip
    with claude.messages.stream(**ask) as stream:
        first = stream.get_final_message()
    assert first.content[0].type == "thinking" and first.content[0].signature
    calls = upstream_stats(large_upstream)["requests"]
    raw = claude.messages.with_raw_response.create(**ask)
    assert raw.headers["x-gateway-cache"] == "exact"
    assert _blocks(raw.parse().content) == _blocks(first.content)  # thinking, signature and text, as streamed
    with claude.messages.stream(**ask) as stream:
        assert _blocks(stream.get_final_message().content) == _blocks(first.content)
    assert upstream_stats(large_upstream)["requests"] == calls


def _blocks(content: Any) -> list[tuple[str, str | None, str | None, str | None]]:
    return [
        (b.type, getattr(b, "thinking", None), getattr(b, "signature", None), getattr(b, "text", None)) for b in content
    ]


def test_a_claude_stream_that_ends_after_message_delta_is_answered_and_cached(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """Only message_stop was left out (message_delta gave the stop reason and the usage): chat and
    Responses clients get the whole answer with no error after it, and it is cached (t58: an
    in-band error, a 502 in the log, nothing cached)."""
    client = _client(cached_gateway)
    ask = _unique("no message_stop")
    inject(large_upstream, {"omit_message_stop": True})
    with client.chat.completions.stream(model="claude", messages=ask, extra_headers={"x-request-id": "no-stop"}) as s:
        streamed = s.get_final_completion().choices[0]
    assert streamed.finish_reason == "stop" and streamed.message.content
    record = cached_gateway.wait_for_record("no-stop")
    assert (record["status"], record["finish_reason"], record["error_type"]) == (200, "stop", None)
    again = client.chat.completions.with_raw_response.create(model="claude", messages=ask)
    assert again.headers["x-gateway-cache"] == "exact"
    assert again.parse().choices[0].message.content == streamed.message.content
    inject(large_upstream, {"omit_message_stop": True})
    with client.responses.stream(model="claude", input=f"no message_stop {time.monotonic_ns()}") as responses:
        answer = responses.get_final_response()
    assert answer.status == "completed" and answer.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_a_paused_turn_reaches_the_client_as_paused_and_is_not_stored(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t83: Anthropic's ``pause_turn`` (a server tool's long turn, paused: the client sends it back
    to go on) read as ``end_turn`` once translated, so the agent loop stopped; and it was stored,
    so the same request asked again got the unfinished turn from the cache, as whole."""
    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"Look it up, then sum it up {time.monotonic_ns()}"}],
        "extra_body": {"temperature": 0},
    }
    for _ in range(2):
        inject(large_upstream, {"stop_reason": "pause_turn"})
        if stream:
            with claude.messages.stream(**ask) as events:
                cache, message = events.response.headers["x-gateway-cache"], events.get_final_message()
        else:
            raw = claude.messages.with_raw_response.create(**ask)
            cache, message = raw.headers["x-gateway-cache"], raw.parse()
        assert (cache, message.stop_reason) == ("miss", "pause_turn")
    inject(large_upstream, {"stop_reason": "pause_turn"})
    chat = _client(cached_gateway).chat.completions.create(model="claude", messages=ask["messages"], temperature=0)
    assert chat.choices[0].finish_reason == "stop"  # chat has no word for it


def _ask_claude(claude: anthropic.Anthropic, ask: dict[str, Any], stream: bool, request_id: str) -> tuple[str, Any]:
    """The cache's word and the message, streamed or not."""
    headers = {"x-request-id": request_id}
    if stream:
        with claude.messages.stream(**ask, extra_headers=headers) as events:
            return events.response.headers["x-gateway-cache"], events.get_final_message()
    raw = claude.messages.with_raw_response.create(**ask, extra_headers=headers)
    return raw.headers["x-gateway-cache"], raw.parse()


@pytest.mark.parametrize("stream", [False, True])
def test_a_claude_answer_cut_at_its_context_window_says_so_to_messages_clients_and_its_replay(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t115 (B): Anthropic's ``model_context_window_exceeded`` reached a Messages client of a translated
    route as ``max_tokens`` (a passed-through one got it as it is). It is a cut, stored and replayed
    as a ``max_tokens`` cut is (the key holds the prompt and ``max_tokens``), and keeps its word there
    too; chat clients read it as ``length``, and the log says ``length``, streamed or not."""
    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"Read all of it {time.monotonic_ns()}"}],
        "extra_body": {"temperature": 0},
    }
    inject(large_upstream, {"stop_reason": "model_context_window_exceeded"})
    cache, message = _ask_claude(claude, ask, stream, f"window-{stream}-miss")
    assert (cache, message.stop_reason) == ("miss", "model_context_window_exceeded") and message.content
    assert cached_gateway.wait_for_record(f"window-{stream}-miss")["finish_reason"] == "length"
    cache, again = _ask_claude(claude, ask, stream, f"window-{stream}-hit")
    assert (cache, again.stop_reason) == ("exact", "model_context_window_exceeded")
    assert again.content == message.content and upstream_stats(large_upstream)["messages_requests"] == 1
    chat, asked = _client(cached_gateway), _unique("window")
    inject(large_upstream, {"stop_reason": "model_context_window_exceeded"})
    if stream:  # the SDK's stream helper raises on a length cut: the chunks as they come
        chunks = chat.chat.completions.create(model="claude", messages=asked, max_tokens=64, stream=True)
        finish = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    else:
        finish = [chat.chat.completions.create(model="claude", messages=asked, max_tokens=64).choices[0].finish_reason]
    assert finish == ["length"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_log_says_a_paused_turn_is_a_stop_streamed_or_not(
    cached_gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t115 (A): a translated ``pause_turn`` was logged ``stop`` when streamed and ``pause_turn``
    when not, a value docs/request-log.md does not list; the log keeps to OpenAI's words."""
    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"Look it up {time.monotonic_ns()}"}],
    }
    inject(large_upstream, {"stop_reason": "pause_turn"})
    _, message = _ask_claude(claude, ask, stream, f"paused-{stream}")
    assert message.stop_reason == "pause_turn"
    assert cached_gateway.wait_for_record(f"paused-{stream}")["finish_reason"] == "stop"


def test_a_long_cache_hit_streams_in_few_events_in_every_protocol(
    cached_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """f211 (t193): a hit was replayed in 24-character pieces, each in a whole event: a 50 KB answer
    took ~9 times its bytes on the wire, in thousands of events. It comes whole, in few events,
    its characters unsplit (accents, CJK, an emoji: one code point beyond the BMP)."""
    text = "Fjörd naïve café 海洋 😀 the quick brown fox jumps over the lazy dog. " * 700
    question = f"Write it all out. {time.monotonic_ns()}"
    client = _client(cached_gateway)
    inject(small_upstream, {"text": text})
    filled = client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": question}], max_tokens=30_000, temperature=0
    )
    assert filled.choices[0].message.content == text
    size, most_events = len(text.encode()), len(text) // 1000 + 20

    with client.chat.completions.with_streaming_response.create(
        model="fast", messages=[{"role": "user", "content": question}], max_tokens=30_000, temperature=0, stream=True
    ) as raw:
        chunks = list(raw.parse())
        wire = raw.http_response.num_bytes_downloaded
    assert raw.headers["x-gateway-cache"] == "exact"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len(chunks) <= most_events and wire < 1.5 * size

    claude = closed_after_test(anthropic.Anthropic(base_url=cached_gateway.url, api_key="key-a1", max_retries=0))
    with claude.messages.with_streaming_response.create(
        model="fast", max_tokens=30_000, messages=[{"role": "user", "content": question}], stream=True,
        extra_body={"temperature": 0},
    ) as told:  # fmt: skip
        events = list(told.parse())
        wire = told.http_response.num_bytes_downloaded
    assert told.headers["x-gateway-cache"] == "exact"
    assert (
        "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
        == text
    )
    assert len(events) <= most_events and wire < 1.5 * size

    with client.responses.with_streaming_response.create(
        model="fast", input=question, max_output_tokens=30_000, temperature=0, store=False, stream=True
    ) as response:
        said = list(response.parse())
        wire = response.http_response.num_bytes_downloaded
    assert response.headers["x-gateway-cache"] == "exact"
    assert "".join(e.delta for e in said if e.type == "response.output_text.delta") == text
    # the text, then again whole in output_text.done, content_part.done, output_item.done and completed
    assert len(said) <= most_events and wire < 5.5 * size


@pytest.mark.parametrize(("model", "live_streams"), [("fast", True), ("claude", True), ("claude", False)])
def test_a_hits_chat_usage_has_the_details_its_live_answer_had(
    cached_gateway: GatewayProcess, model: str, live_streams: bool
) -> None:
    """t195: a hit's usage, streamed or not, had no ``completion_tokens_details`` where the live answer
    said ``reasoning_tokens: 0``. (A live whole answer of an OpenAI-compatible upstream carries the
    usage that upstream wrote, whose details no hit knows.)"""
    client, messages = _client(cached_gateway), _unique(f"usage details {model} {live_streams}")

    def usage(stream: bool) -> tuple[Any, str]:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model=model, messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
            ) as response:
                return list(response.parse())[-1].usage, response.headers["x-gateway-cache"]
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0)
        return raw.parse().usage, raw.headers["x-gateway-cache"]

    live, cache = usage(live_streams)
    assert cache == "miss" and live.completion_tokens_details is not None
    for stream in (True, False):
        hit, cache = usage(stream)
        assert cache == "exact" and hit.model_dump() == live.model_dump(), stream
