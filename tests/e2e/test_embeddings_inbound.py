"""POST /v1/embeddings through the gateway with the openai SDK: routing, fallbacks, the per-input cache, limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gateway.auth import hash_key
from gateway.protocols.tenant_ids import scoped
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, leave_once_upstream_has_it, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_AUTH = f"""auth:
  mode: keys
  keys:
    - {{id: a, tenant: team-a, hash: "{hash_key("key-a")}"}}
    - {{id: b, tenant: team-b, hash: "{hash_key("key-b")}"}}
    - {{id: tiny, tenant: team-t, hash: "{hash_key("key-tiny")}", limits: {{tpm: 40}}}}
    - {{id: thrifty, tenant: team-th, hash: "{hash_key("key-thrifty")}", limits: {{usd_per_day: 0.000005}}}}
"""


@pytest.fixture(scope="module")
def gateway_with_cache(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(
        small_upstream,
        large_upstream,
        auth=_AUTH,
        cache="{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}",
    )
    process = start_gateway(tmp_path_factory.mktemp("embeddings"), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def _client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=10)


def _usage_of_key_b(gateway: GatewayProcess) -> dict[str, int]:
    body = httpx.get(f"{gateway.base_url}/usage", headers={"authorization": "Bearer key-b"}, timeout=10)
    total: dict[str, int] = body.json()["total"]
    return total


def test_vectors_come_back_in_order_in_both_encodings(gateway: GatewayProcess) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue rose by 4%."]
    with _client(gateway, "x") as client:
        as_base64 = client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64
        as_floats = client.embeddings.create(model="embed", input=texts, encoding_format="float")
        single = client.embeddings.create(model="embed", input=texts[2])
    vectors = np.array([item.embedding for item in as_base64.data])
    assert vectors.shape == (3, 384) and [item.index for item in as_base64.data] == [0, 1, 2]
    assert np.allclose(vectors, np.array([item.embedding for item in as_floats.data]), atol=1e-6)
    assert np.allclose(vectors[2], single.data[0].embedding, atol=1e-6)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # similar texts are closer
    assert as_base64.usage.prompt_tokens > 0 and as_base64.model == "embed"


def test_a_failing_embedding_model_falls_back(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    inject(small_upstream, {"status": 503}, {"status": 503})
    with _client(gateway, "x") as client:
        raw = client.embeddings.with_raw_response.create(model="vectors", input=["hello"])
    assert raw.headers["x-gateway-model"] == "embed-large"
    assert raw.parse().model == "embed-large"  # t161: the body said "vectors", another model's space unnamed
    assert float(raw.headers["x-gateway-overhead-ms"]) >= 0  # as on every other endpoint
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["protocol"] == "openai.embeddings" and record["fallback_used"] is True


def test_an_embedding_whose_models_all_failed_names_the_last_one_tried(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t70: as for chat, the failure counts under a model, not model="-"."""
    inject(small_upstream, {"status": 503}, {"status": 503})
    inject(large_upstream, {"status": 503}, {"status": 503})
    with _client(gateway, "x") as client, pytest.raises(openai.APIStatusError) as failed:
        client.embeddings.create(model="vectors", input=["hello"])
    assert failed.value.status_code == 503 and failed.value.response.headers["x-gateway-model"] == "embed-large"
    record = gateway.wait_for_record(failed.value.response.headers["x-request-id"])
    assert (record["model"], record["provider"]) == ("embed-large", "openai")


def test_a_failed_embedding_logs_the_status_its_upstream_answered(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t69: an embeddings error logged upstream_status null, as if no upstream had answered."""
    inject(small_upstream, *[{"status": 200, "body": '{"object": "list", "data": []}'}] * 2)
    with _client(gateway, "x") as client:
        with pytest.raises(openai.APIStatusError) as empty:
            client.embeddings.create(model="embed", input=["hello"])
        inject(small_upstream, {"status": 400, "body": '{"error": {"message": "no", "type": "invalid_request_error"}}'})
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="embed", input=["hello"])
    bad = gateway.wait_for_record(empty.value.response.headers["x-request-id"])
    assert empty.value.status_code == 502 and (bad["error_type"], bad["upstream_status"]) == (
        "upstream_bad_response",
        200,
    )
    assert gateway.wait_for_record(refused.value.response.headers["x-request-id"])["upstream_status"] == 400


def test_chat_and_embedding_models_do_not_mix(gateway: GatewayProcess) -> None:
    with _client(gateway, "x") as client:
        with pytest.raises(openai.BadRequestError) as chat_model:
            client.embeddings.create(model="fast", input="hi")
        with pytest.raises(openai.BadRequestError) as embedding_model:
            client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="embed", input=[])
    assert "kind 'embedding'" in chat_model.value.message
    assert "/v1/embeddings" in embedding_model.value.message


def test_each_input_is_cached_apart_per_tenant(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    texts = ["alpha cached text", "beta cached text"]
    with _client(gateway_with_cache, "key-a") as a, _client(gateway_with_cache, "key-b") as b:
        first = a.embeddings.with_raw_response.create(model="embed", input=texts)
        before = upstream_stats(small_upstream)["embeddings_requests"]
        again = a.embeddings.with_raw_response.create(model="embed", input=[texts[1], texts[0]])
        mixed = a.embeddings.with_raw_response.create(model="embed", input=[texts[0], "gamma new text"])
        other_tenant = b.embeddings.with_raw_response.create(model="embed", input=texts)
    assert first.headers["x-gateway-cache"] == "miss"
    assert again.headers["x-gateway-cache"] == "exact" and float(again.headers["x-gateway-cost-usd"]) == 0
    assert upstream_stats(small_upstream)["embeddings_requests"] == before + 2  # mixed: only "gamma"; tenant b: both
    first_vectors = [item.embedding for item in first.parse().data]
    again_vectors = [item.embedding for item in again.parse().data]
    assert np.allclose(again_vectors[0], first_vectors[1]) and np.allclose(again_vectors[1], first_vectors[0])
    assert mixed.headers["x-gateway-cache"] == "miss"
    assert other_tenant.headers["x-gateway-cache"] == "miss"  # another tenant's cache is never read
    record = gateway_with_cache.wait_for_record(mixed.headers["x-request-id"])
    assert record["cache_saved_usd"] > 0 and record["cost_usd"] > 0
    # (t70) as docs/request-log.md says: prompt_tokens counts both inputs, cost_usd the one sent upstream
    assert record["cost_usd"] + record["cache_saved_usd"] == pytest.approx(record["prompt_tokens"] * 0.02 / 1e6)
    assert record["cost_usd"] == pytest.approx(record["baseline_cost_usd"] - record["cache_saved_usd"])


def test_an_embedding_answered_wholly_from_the_cache_logs_decision_cache(gateway_with_cache: GatewayProcess) -> None:
    """t119: a whole hit logged the route's decision ("fixed"), where every other endpoint's hit
    logs "cache" (nothing was routed); a partial hit was routed, and says so. t121 #2: the answer
    says the decision in ``x-gateway-decision``, as a chat answer does (it had no such header)."""
    text = f"decided by the cache {time.monotonic_ns()}"
    with _client(gateway_with_cache, "key-a") as a:
        miss = a.embeddings.with_raw_response.create(model="embed", input=[text])
        hit = a.embeddings.with_raw_response.create(model="embed", input=[text])
        partial = a.embeddings.with_raw_response.create(model="embed", input=[text, f"{text} and more"])
    decisions = [gateway_with_cache.wait_for_record(raw.headers["x-request-id"]) for raw in (miss, hit, partial)]
    assert [(line["cache"], line["decision"]) for line in decisions] == [
        ("miss", "direct"),
        ("exact", "cache"),
        ("miss", "direct"),
    ]
    assert [raw.headers.get("x-gateway-decision") for raw in (miss, hit, partial)] == ["direct", "cache", "direct"]


def test_a_hit_says_the_tokens_the_upstream_billed_for_its_input(gateway_with_cache: GatewayProcess) -> None:
    """The simulated server counts as BERT-style models do (start and end tokens added): a hit
    said the gateway's own tiktoken count (6 where the miss had said 8: t50), and its savings
    were priced on it."""
    texts = [f"{word} and a second sentence {time.monotonic_ns()}" for word in ("first", "second", "third")]
    with _client(gateway_with_cache, "key-a") as a:
        alone = [a.embeddings.create(model="embed", input=text).usage.prompt_tokens for text in texts[:2]]
        together = a.embeddings.create(model="embed", input=texts).usage.prompt_tokens  # two hits, one miss
        hits = [a.embeddings.with_raw_response.create(model="embed", input=text) for text in texts]
    assert [hit.headers["x-gateway-cache"] for hit in hits] == ["exact"] * 3
    counted = [hit.parse().usage.prompt_tokens for hit in hits]
    assert counted[:2] == alone  # a lone input's hit: exactly what embedding it was billed
    assert together == sum(counted)
    record = gateway_with_cache.wait_for_record(hits[0].headers["x-request-id"])
    assert record["prompt_tokens"] == alone[0] and record["tokens_source"] == "cache"


def test_fields_the_gateway_does_not_read_reach_the_upstream_and_shape_the_key(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """vLLM's ``truncate_prompt_tokens`` goes on as the client wrote it, ``user`` as the tenant's own
    (another tenant's "end-user-7" is another end user upstream); a truncation is another vector,
    so not served from the untruncated one's cache."""
    text = f"a text to truncate {time.monotonic_ns()}"
    with _client(gateway_with_cache, "key-a") as a:
        plain = a.embeddings.with_raw_response.create(model="embed", input=text, user="end-user-7")
        sent = upstream_stats(small_upstream)["last_request"]["body"]
        truncated = a.embeddings.with_raw_response.create(
            model="embed", input=text, user="end-user-8", extra_body={"truncate_prompt_tokens": 3}
        )
        sent_truncated = upstream_stats(small_upstream)["last_request"]["body"]
        again = a.embeddings.with_raw_response.create(model="embed", input=text, user="end-user-9")
    with _client(gateway_with_cache, "key-b") as b:
        b.embeddings.create(model="embed", input=text, user="end-user-7")
        sent_by_b = upstream_stats(small_upstream)["last_request"]["body"]
    assert sent["user"] == scoped("team-a", "end-user-7") != sent_by_b["user"] == scoped("team-b", "end-user-7")
    assert "truncate_prompt_tokens" not in sent
    assert sent_truncated["truncate_prompt_tokens"] == 3
    assert (plain.headers["x-gateway-cache"], truncated.headers["x-gateway-cache"]) == ("miss", "miss")
    assert again.headers["x-gateway-cache"] == "exact"  # the end user does not change a vector


def test_a_large_batch_is_cached_like_a_small_one(gateway_with_cache: GatewayProcess) -> None:
    # One GET per input at once ran out of pooled connections past ~100 inputs: never cached,
    # and each batch marked Redis down for every request (an outside tester).
    batch = [f"large batch item {i}" for i in range(300)]
    with _client(gateway_with_cache, "key-a") as client:
        first = client.embeddings.with_raw_response.create(model="embed", input=batch)
        again = client.embeddings.with_raw_response.create(model="embed", input=batch)
    assert (first.headers["x-gateway-cache"], again.headers["x-gateway-cache"]) == ("miss", "exact")
    assert [d.embedding for d in again.parse().data] == [d.embedding for d in first.parse().data]
    assert '"redis_unavailable"' not in gateway_with_cache.stderr_text()


def test_tokens_per_minute_apply_to_embeddings(gateway_with_cache: GatewayProcess, tmp_path: Path) -> None:
    with _client(gateway_with_cache, "key-tiny") as client:
        client.embeddings.create(model="embed", input="a short one", extra_headers={"cache-control": "no-cache"})
        with pytest.raises(openai.RateLimitError) as refused:
            client.embeddings.create(model="embed", input="word " * 60)
    assert "key.tpm" in refused.value.message


def test_a_budget_prices_embeddings_at_the_dearest_fallback(gateway_with_cache: GatewayProcess) -> None:
    # 101 tokens: $0.000002 on embed, $0.000013 on embed-large, vectors' fallback
    with _client(gateway_with_cache, "key-thrifty") as client:
        with pytest.raises(openai.RateLimitError) as refused:
            client.embeddings.create(model="vectors", input="word " * 100)
        assert "key.usd_per_day" in refused.value.message
        assert len(client.embeddings.create(model="embed", input="word " * 100).data) == 1


def test_embeddings_of_a_key_without_limits_count_in_its_usage(gateway_with_cache: GatewayProcess) -> None:
    before = _usage_of_key_b(gateway_with_cache)
    with _client(gateway_with_cache, "key-b") as client:
        answer = client.embeddings.create(
            model="embed", input="counted text", extra_headers={"cache-control": "no-cache"}
        )
    after = _usage_of_key_b(gateway_with_cache)
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] == before["prompt_tokens"] + answer.usage.prompt_tokens
    assert after["savings_usd"] == pytest.approx(before["savings_usd"])  # a miss saves nothing, loses nothing
    with _client(gateway_with_cache, "key-b") as client:
        client.embeddings.create(model="embed", input="counted text")  # now an exact hit
    hit = _usage_of_key_b(gateway_with_cache)
    assert hit["savings_usd"] > after["savings_usd"]  # what the cache saved is savings


def test_refused_requests_count_in_usage_as_the_request_log_counts_them(gateway_with_cache: GatewayProcess) -> None:
    before = _usage_of_key_b(gateway_with_cache)
    with _client(gateway_with_cache, "key-b") as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="fast", input="a chat model")
    after = _usage_of_key_b(gateway_with_cache)
    assert (after["requests"], after["errors"]) == (before["requests"] + 2, before["errors"] + 2)


def test_a_fallback_embeds_the_whole_batch_and_is_not_cached_as_the_primary(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """Vectors of two models are not comparable: a response never mixes them, the cache never confuses them."""
    known, new = "delta vector space text", "epsilon vector space text"
    with _client(gateway_with_cache, "key-a") as client:
        client.embeddings.create(model="vectors", input=[known])  # cached for the primary (embed)
        inject(small_upstream, {"status": 503}, {"status": 503})
        before = upstream_stats(large_upstream)["embeddings_requests"]
        fallback = client.embeddings.with_raw_response.create(model="vectors", input=[known, new])
        assert fallback.headers["x-gateway-model"] == "embed-large" and fallback.parse().model == "embed-large"
        assert upstream_stats(large_upstream)["embeddings_requests"] == before + 1  # both inputs, one call
        record = gateway_with_cache.wait_for_record(fallback.headers["x-request-id"])
        assert not record["cache_saved_usd"]
        again = client.embeddings.with_raw_response.create(model="vectors", input=[new])
    assert again.headers["x-gateway-cache"] == "miss"  # the fallback's vector was not stored as the primary's


def test_cached_vectors_of_another_size_than_the_servers_are_never_mixed_in(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """A server that now serves another model under the same name: a partly cached batch came back
    with vectors of two sizes (found by an outside tester)."""
    import json

    known, new = "zeta vector space text", "eta vector space text"
    other_model = {"object": "list", "model": "embed", "usage": {"prompt_tokens": 4, "total_tokens": 4},
                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5] * 8}]}  # fmt: skip
    with _client(gateway_with_cache, "key-a") as client:
        client.embeddings.create(model="embed", input=[known])  # cached: 384 dimensions
        inject(small_upstream, {"status": 200, "body": json.dumps(other_model)})
        mixed = client.embeddings.create(model="embed", input=[known, new], encoding_format="float")
    assert len({len(item.embedding) for item in mixed.data}) == 1  # one space: the batch embedded again whole


def test_a_fallback_of_another_size_is_asked_once(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """The size check compared a fallback's vectors with the primary's cached ones and embedded
    the batch again: called and billed twice (t19)."""
    import json

    known, new = "theta vector space text", "iota vector space text"
    two = {"object": "list", "model": "embed-large", "usage": {"prompt_tokens": 9, "total_tokens": 9},
           "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 8} for i in range(2)]}  # fmt: skip
    with _client(gateway_with_cache, "key-a") as client:
        client.embeddings.create(model="vectors", input=[known])  # cached for the primary
        inject(small_upstream, {"status": 503}, {"status": 503})
        inject(large_upstream, {"status": 200, "body": json.dumps(two)})
        before = upstream_stats(large_upstream)["embeddings_requests"]
        raw = client.embeddings.with_raw_response.create(model="vectors", input=[known, new], encoding_format="float")
    assert upstream_stats(large_upstream)["embeddings_requests"] == before + 1
    assert [len(item.embedding) for item in raw.parse().data] == [8, 8]
    assert gateway_with_cache.wait_for_record(raw.headers["x-request-id"])["prompt_tokens"] == 9


def test_a_batchs_hits_report_what_the_batch_was_billed(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t108: each input's share of the bill was its own count plus an even part of the difference,
    raised to 1: a batch billed 4 that the gateway counts as 26 + 1 said 16 tokens on a hit, and
    saved four times what it had cost."""
    batch = [f"Pneumonoultramicroscopicsilicovolcanoconiosis-XYZZYqwrtplkj-v{time.monotonic_ns()}", "r"]
    with _client(gateway_with_cache, "key-a") as client:
        inject(small_upstream, {"usage": {"prompt_tokens": 4, "total_tokens": 4}})
        miss = client.embeddings.with_raw_response.create(model="embed", input=batch)
        hit = client.embeddings.with_raw_response.create(model="embed", input=batch[::-1])
    assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "exact")
    assert miss.parse().usage.prompt_tokens == hit.parse().usage.prompt_tokens == 4
    billed = gateway_with_cache.wait_for_record(miss.headers["x-request-id"])
    saved = gateway_with_cache.wait_for_record(hit.headers["x-request-id"])
    assert saved["prompt_tokens"] == 4 and saved["cache_saved_usd"] == pytest.approx(billed["cost_usd"])


def test_the_special_tokens_of_a_bert_type_model_are_billed(gateway: GatewayProcess) -> None:
    """t108: the simulated server bills "a" as [CLS] a [SEP], 3 tokens; more than its byte + 1, the
    count was refused and the gateway's own 1 billed."""
    with _client(gateway, "x") as client:
        raw = client.embeddings.with_raw_response.create(model="embed", input="a")
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert raw.parse().usage.prompt_tokens == record["prompt_tokens"] == 3 and record["tokens_source"] == "upstream"


def test_an_input_too_long_for_the_embedding_model_is_named(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t108: the 400 said ``param: "messages"``, a field the embeddings API does not have."""
    import json

    said = "This model's maximum context length is 64 tokens, however you requested 101 tokens (101 in your prompt)."
    inject(
        small_upstream,
        {"status": 400, "body": json.dumps({"error": {"message": said, "type": "invalid_request_error"}})},
    )
    with _client(gateway, "x") as client, pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="embed", input="word " * 100)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"


def test_an_input_too_long_for_the_primary_embedding_model_does_not_fall_back(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t161: the fallback embedded the whole batch in its own vector space and answered 200; each
    embedding model is its own space, so the client is told its input is too long instead."""
    import json

    said = "This model's maximum context length is 64 tokens, however you requested 101 tokens (101 in your prompt)."
    inject(
        small_upstream,
        {"status": 400, "body": json.dumps({"error": {"message": said, "type": "invalid_request_error"}})},
    )
    before = upstream_stats(large_upstream)["embeddings_requests"]
    with _client(gateway, "x") as client, pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="vectors", input=["short", "word " * 100])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "input"
    assert refused.value.response.headers["x-gateway-model"] == "embed"
    assert upstream_stats(large_upstream)["embeddings_requests"] == before


def test_a_batch_too_large_for_the_tokens_per_minute_is_told_in_embeddings_words(
    gateway_with_cache: GatewayProcess,
) -> None:
    """t161: the 429 spoke of a prompt and max_tokens, which an embeddings request does not have."""
    with _client(gateway_with_cache, "key-tiny") as client, pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="embed", input=["word " * 30, "word " * 30])
    assert refused.value.code == "request_too_large_for_limit"
    assert "input tokens" in refused.value.message and "max_tokens" not in refused.value.message


def test_vectors_of_another_size_than_the_dimensions_asked_are_refused_and_never_cached(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t108: a server that ignores ``dimensions`` (llama.cpp's) answered full-size vectors: served
    with a 200 and cached under the asked size's key. The route's fallback answers instead."""
    import json

    text = f"kappa dimensions text {time.monotonic_ns()}"
    full = {"object": "list", "model": "embed", "usage": {"prompt_tokens": 4, "total_tokens": 4},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5] * 16}]}  # fmt: skip
    ignored = {"status": 200, "body": json.dumps(full)}
    with _client(gateway_with_cache, "key-a") as client:
        inject(small_upstream, ignored, ignored)  # the first try and its retry
        with pytest.raises(openai.APIStatusError) as refused:
            client.embeddings.create(model="embed", input=text, dimensions=4, encoding_format="float")
        again = client.embeddings.with_raw_response.create(model="embed", input=text, dimensions=4)
        inject(small_upstream, ignored, ignored)
        fallback = client.embeddings.with_raw_response.create(
            model="vectors", input=f"{text} fallback", dimensions=4, encoding_format="float"
        )
    assert refused.value.status_code == 502 and refused.value.code == "upstream_bad_response"
    assert again.headers["x-gateway-cache"] == "miss" and len(again.parse().data[0].embedding) == 4
    assert fallback.headers["x-gateway-model"] == "embed-large" and len(fallback.parse().data[0].embedding) == 4


def _hang_up(gateway: GatewayProcess, upstream: SimulatedUpstream, model: str, batch: list[str]) -> str:
    """Ask for ``batch`` and hang up once ``upstream`` has it, before the answer comes: the request's
    id. Not at a 0.3 s client timeout, which a loaded gateway could reach before sending it on."""
    request_id = f"hang-up-{time.monotonic_ns()}"
    leave_once_upstream_has_it(f"{gateway.base_url}/embeddings", {"model": model, "input": batch}, upstream,
                               request_id, counter="embeddings_requests", headers={"authorization": "Bearer key-a"})  # fmt: skip
    return request_id


def test_a_client_that_hangs_up_on_an_embedding_is_billed_the_batch_the_upstream_embeds(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t136: the upstream embedded and billed the batch, the gateway logged a 499 of 0 tokens and
    $0 and cached nothing, and the client's retry was a miss billed again. As for chat, the
    answer is waited for, billed, cached, and logged as a 499 with its tokens and cost."""
    batch = [f"hung up on input {i} {time.monotonic_ns()}" for i in range(20)]
    before = upstream_stats(small_upstream)["embeddings_requests"]
    # the answer's headers at once and its body 1.5 s on: a 700 ms delay raced the 1 s first-byte timeout
    inject(small_upstream, {"stall_mid_body_ms": 1500})
    request_id = _hang_up(gateway_with_cache, small_upstream, "embed", batch)
    record = gateway_with_cache.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert (record["model"], record["tokens_source"], record["upstream_status"]) == ("embed", "upstream", 200)
    assert record["prompt_tokens"] > 0 and record["cost_usd"] == pytest.approx(record["prompt_tokens"] * 0.02 / 1e6)
    assert record["latency_ms"] >= 1400  # logged when the answer came, with its bill
    with _client(gateway_with_cache, "key-a") as client:
        retry = client.embeddings.with_raw_response.create(model="embed", input=batch)
    assert retry.headers["x-gateway-cache"] == "exact" and retry.parse().usage.prompt_tokens == record["prompt_tokens"]
    assert upstream_stats(small_upstream)["embeddings_requests"] == before + 1


def test_no_retry_or_fallback_is_made_for_an_embeddings_client_that_left(
    gateway_with_cache: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t136: the attempt at work when the client left is the last (nothing waits on its answer)."""
    before = (
        upstream_stats(small_upstream)["embeddings_requests"],
        upstream_stats(large_upstream)["embeddings_requests"],
    )
    inject(small_upstream, {"delay_ms": 3000})  # past the 1 s first-byte timeout: a retryable failure
    request_id = _hang_up(gateway_with_cache, small_upstream, "vectors", [f"left for good {time.monotonic_ns()}"])
    record = gateway_with_cache.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert (record["model"], record["cost_usd"], record["fallback_used"]) == ("embed", 0, False)
    time.sleep(1.5)  # past the first-byte timeout (1 s from the call) and a retry's backoff: none may come
    after = upstream_stats(small_upstream)["embeddings_requests"], upstream_stats(large_upstream)["embeddings_requests"]
    assert after == (before[0] + 1, before[1])


def test_an_embeddings_client_that_leaves_while_queued_for_a_connection_is_billed_nothing(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t136: a batch never sent is never billed upstream, so its hang-up costs nothing and is not sent later."""
    one_connection = f"""  embed-one:
    kind: embedding
    base_url: {small_upstream.url}
    price: {{input: 0.02, output: 0}}
    max_connections: 1
    timeouts: {{connect: 5, first_byte: 5, total: 30}}
"""
    policy = policy_text(small_upstream, large_upstream, extra_models=one_connection)
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:
        before = upstream_stats(small_upstream)["embeddings_requests"]
        # The holder's headers at once and its body 6 s on: the one connection is held well past the
        # queued client's 2 s, a time the gateway surely has its request by (a 0.3 s client timeout
        # could end before a loaded gateway read the request, and the holder's 1.5 s delay before it
        # was queued).
        inject(small_upstream, {"stall_mid_body_ms": 6000})
        with _client(gateway, "x") as client, ThreadPoolExecutor(1) as pool:
            holder = pool.submit(
                client.with_options(timeout=30).embeddings.create, model="embed-one", input=["holds the connection"]
            )
            # the holder upstream, not a guessed 0.3 s: on a busy machine the other one took the connection first
            deadline = time.monotonic() + 30
            while upstream_stats(small_upstream)["embeddings_requests"] == before and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=2).embeddings.create(
                    model="embed-one", input=["queued behind it"], extra_headers={"x-request-id": "queued-embedding"}
                )
            holder.result()
        record = gateway.wait_for_record("queued-embedding")
        assert (record["status"], record["cost_usd"], record["prompt_tokens"]) == (499, 0, 0)
        time.sleep(0.3)
        assert upstream_stats(small_upstream)["embeddings_requests"] == before + 1
    finally:
        gateway.stop()


def test_an_encoding_format_of_null_is_float(gateway: GatewayProcess) -> None:
    """t136: the openai SDK sends ``"encoding_format": null`` for ``encoding_format=None``, which was
    refused 400 (``Expected str, got null``); null is no format asked, as ``dimensions: null`` is."""
    with _client(gateway, "x") as client:
        null: Any = None  # typed out of the SDK's signature, which it still sends as null
        unset = client.embeddings.create(model="embed", input=["null format"], encoding_format=null)
        floats = client.embeddings.create(model="embed", input=["null format"], encoding_format="float")
    assert unset.data[0].embedding == floats.data[0].embedding and len(unset.data[0].embedding) == 384
