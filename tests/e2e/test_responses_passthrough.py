"""Responses requests passed through to upstreams that speak the Responses API (``responses_api: true``).

What Codex sends (custom and hosted tools, reasoning items, ``include``, ``store: false``)
cannot be translated to chat without loss; to such an upstream it goes as it came, and
the answer comes back as the upstream wrote it, while auth, limits, routing, fallbacks,
pricing and the log still apply. The upstream keeps the responses, under one key shared
by every tenant: the gateway must keep tenants from reaching each other's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis
from openai.types.responses import ToolParam

from gateway.auth import hash_key
from gateway.protocols.tenant_ids import scoped
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from gateway.store import keyspace
from tests.conftest import PairGateway, closed_after_test, inject, upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway, stop_with_its_redis_back

MODELS = """
  gpt-a:
    base_url: {small}
    upstream_model: gpt-upstream-a
    responses_api: true
    price: {{input: 2, cached_input: 0.5, output: 8, server_tools: {{web_search: 10}}}}
    tier: small
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
  gpt-b:
    base_url: {large}
    responses_api: true
    price: {{input: 4, output: 16, server_tools: {{web_search: 10}}}}
    tier: large
    tenant_cache_salt: true
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
"""
ROUTES = """
  codex: {model: gpt-a, fallbacks: [gpt-b]}
  mixed: {model: gpt-a, fallbacks: [small]}"""
KEYS = """
auth:
  mode: keys
  keys:
    - {id: a1, tenant: acme, hash: "%(a1)s"}
    - {id: b1, tenant: globex, hash: "%(b1)s"}
    - {id: a3, tenant: acme, hash: "%(a3)s", models: [gpt-a]}
    - {id: a4, tenant: acme, hash: "%(a4)s", models: [fast]}
    - {id: a5, tenant: acme, hash: "%(a5)s", models: [mixed]}
    - {id: c1, tenant: initech, hash: "%(c1)s"}
tenants:
  initech: {stored_responses_mib: 0.01}
""" % {name: hash_key(f"key-{name}") for name in ("a1", "b1", "a3", "a4", "a5", "c1")}

CODEX_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "shell",
        "description": "Run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}},
        "strict": False,
    },
    {"type": "custom", "name": "apply_patch", "description": "Apply a patch", "format": {"type": "text"}},
    {"type": "web_search"},
]


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    models = MODELS.format(small=small_upstream.url, large=large_upstream.url)
    with pair_gateway("passthrough", auth=KEYS, extra_models=models, routes=ROUTES, cache="{enabled: true}") as process:
        yield process


def _client(gateway: GatewayProcess, key: str = "a1") -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=10))


def _last_request(upstream: SimulatedUpstream) -> dict[str, Any]:
    last: dict[str, Any] = upstream_stats(upstream)["last_request"]
    return last


def test_a_codex_shaped_request_reaches_the_upstream_as_it_was_sent(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    ask: dict[str, Any] = {
        "model": "codex",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque-blob"},
        ],
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
    }
    raw = _client(gateway).responses.with_raw_response.create(**ask)
    response = raw.parse()
    assert response.id.startswith("resp_sim") and response.output_text  # the upstream's own answer
    assert "x-gateway-dropped" not in raw.headers  # nothing was dropped: the upstream read it all
    sent = _last_request(small_upstream)
    assert sent["path"] == "/v1/responses"
    # byte for byte but the model name, and the prompt-cache group is the tenant's own
    assert sent["body"] == {**ask, "model": "gpt-upstream-a", "prompt_cache_key": scoped("acme", "session-1")}
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["protocol"] == "openai.responses" and record["passthrough"] is True
    assert record["model"] == "gpt-a" and record["tokens_source"] == "upstream" and record["cache"] == "bypass"
    assert record["finish_reason"] == "stop"  # as the streamed one's (t25: null)
    assert record["prompt_tokens"] == response.usage.input_tokens
    assert record["cost_usd"] == pytest.approx(
        (response.usage.input_tokens * 2 + response.usage.output_tokens * 8) / 1e6
    )


def test_the_stream_is_the_upstreams_and_the_sdk_accumulates_it(gateway: GatewayProcess) -> None:
    with _client(gateway).responses.stream(
        model="codex", input="Describe the sea in a few words.", extra_headers={"x-request-id": "relayed-stream-1"}
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert final.id.startswith("resp_sim") and final.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    record = gateway.wait_for_record("relayed-stream-1")  # written once the stream has ended
    assert record["passthrough"] is True and record["stream"] is True
    assert record["completion_tokens"] == final.usage.output_tokens  # type: ignore[union-attr]
    assert record["finish_reason"] == "stop"


def test_a_continued_conversation_bills_the_upstreams_cached_tokens_at_their_price(
    gateway: GatewayProcess,
) -> None:
    client = _client(gateway)
    context = " ".join(f"line {n}: the build step {n} copies artefacts to the staging bucket." for n in range(120))
    first = client.responses.create(model="codex", input=f"Here is our build log:\n{context}\nSummarise it.")
    raw = client.responses.with_raw_response.create(
        model="codex", previous_response_id=first.id, input="Which step copies to staging?"
    )
    second = raw.parse()
    usage = second.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens >= 1024
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    cached = usage.input_tokens_details.cached_tokens
    assert record["cached_prompt_tokens"] == cached
    expected = ((usage.input_tokens - cached) * 2 + cached * 0.5 + usage.output_tokens * 8) / 1e6
    assert record["cost_usd"] == pytest.approx(expected, abs=1e-9)


def test_a_tenant_cannot_read_continue_or_delete_another_tenants_upstream_response(
    gateway: GatewayProcess,
) -> None:
    alice, bob = _client(gateway, "a1"), _client(gateway, "b1")
    mine = alice.responses.create(model="codex", input="The launch code is tulip.")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(mine.id)  # the upstream would have answered: its key is shared
    with pytest.raises(openai.BadRequestError) as continued:  # a 400, as OpenAI answers
        bob.responses.create(model="codex", previous_response_id=mine.id, input="What was the code?")
    assert continued.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(mine.id)
    assert alice.responses.retrieve(mine.id).output_text == mine.output_text  # asked of the upstream
    (asked,) = alice.responses.input_items.list(mine.id, limit=5).data  # asked of it too, with the query
    assert asked.type == "message" and asked.content[0].type == "input_text"
    assert asked.content[0].text == "The launch code is tulip."
    with pytest.raises(openai.BadRequestError, match="background"):
        alice.responses.cancel(mine.id)
    alice.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(mine.id)


def test_the_sdks_auto_paging_of_an_upstream_responses_input_items_ends(gateway: GatewayProcess) -> None:
    """t190: the simulated upstream read ``limit`` but not ``after``, so the openai SDK's auto-paging
    of ``input_items`` on a passed-through route got the first page back for ever."""
    alice = _client(gateway, "a1")
    said = [{"role": "user", "content": f"Line {n}."} for n in range(5)]
    made = alice.responses.create(model="codex", input=cast(Any, said))
    listed = [item for item in alice.responses.input_items.list(made.id, limit=2, order="asc")]
    texts = [
        part.text for item in listed if item.type == "message" for part in item.content if part.type == "input_text"
    ]
    assert texts == [f"Line {n}." for n in range(5)]
    assert len({item.id for item in listed}) == len(listed) == 5


def test_an_upstreams_refusal_to_read_or_delete_is_told_in_the_gateways_words_and_keeps_the_record(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t17: a 429 body naming the operator's organisation reached the tenant raw, and a DELETE the
    upstream refused dropped the gateway's record, leaving the response upstream for good."""
    alice = _client(gateway, "a1")
    mine = alice.responses.create(model="codex", input="Keep this one.")
    limited = '{"error": {"message": "Rate limit reached for org-op42 on requests per min", "type": "requests"}}'
    inject(small_upstream, {"status": 429, "body": limited})
    with pytest.raises(openai.RateLimitError) as read:
        alice.responses.retrieve(mine.id)
    assert "org-op42" not in str(read.value.body)
    inject(small_upstream, {"status": 429, "body": limited})
    with pytest.raises(openai.RateLimitError):
        alice.responses.delete(mine.id)
    assert alice.responses.retrieve(mine.id).id == mine.id  # still the tenant's to read and delete
    alice.responses.delete(mine.id)


def test_a_response_gone_upstream_is_told_in_openais_code_and_forgotten(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """t60: a response the upstream no longer has (its retention ended first, it was deleted there,
    a Zero-Data-Retention organisation never kept it) was continued with ``upstream_rejected_request``,
    which Codex-style clients do not recognise: they recover from ``previous_response_not_found``
    by sending the whole conversation. A GET told 404 left the gateway's record claiming it."""
    alice = _client(gateway)
    gone = alice.responses.create(model="codex", input="Keep this upstream.")
    key = upstream_stats(small_upstream)["last_api_key"]  # the gateway's, under which the upstream keeps it
    upstream = httpx.delete(
        f"{small_upstream.url}/responses/{gone.id}", headers={"authorization": f"Bearer {key}"} if key else {}
    )
    assert upstream.status_code == 200  # deleted behind the gateway's back
    with pytest.raises(openai.BadRequestError) as continued:
        alice.responses.create(model="codex", previous_response_id=gone.id, input="Go on.")
    assert continued.value.code == "previous_response_not_found"
    assert continued.value.param == "previous_response_id"
    assert "previous_response_not_found" in continued.value.response.text  # what such clients look for
    record = keyspace.response("acme", gone.id)
    with redis.Redis.from_url(redis_server.url) as store:
        assert store.exists(record)
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(gone.id)
        assert not store.exists(record)  # forgotten: the upstream said it is gone


def test_a_tenants_passed_through_responses_count_in_its_own_cap_and_push_out_only_its_own(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """t160: the records of passed-through responses were outside the tenant's cap, so a tenant
    could fill Redis with them (~1.1 KB each, for a tiny upstream call) until a Redis evicting
    by TTL pushed out other tenants' stored turns. They count in the cap: its own oldest go."""
    carol, bob = _client(gateway, "c1"), _client(gateway, "b1")
    theirs = [
        bob.responses.create(model="codex", input="Globex keeps this upstream."),
        bob.responses.create(model="fast", input="Globex keeps this turn."),
    ]
    made = [  # each record keeps the three identifiers: ~1.4 KB of the ~10 KB cap
        carol.responses.create(
            model="codex", input=f"hi {n}", user="u" * 256, safety_identifier="s" * 256, prompt_cache_key="p" * 256
        )
        for n in range(16)
    ]
    assert all(_stored(response) is not False for response in made)
    with pytest.raises(openai.NotFoundError):
        carol.responses.retrieve(made[0].id)  # its oldest went to make room: no longer reachable here
    with pytest.raises(openai.BadRequestError) as continued:
        carol.responses.create(model="codex", previous_response_id=made[0].id, input="go on")
    assert continued.value.code == "previous_response_not_found"
    newest = carol.responses.retrieve(made[-1].id)
    assert newest.id == made[-1].id and newest.user == "u" * 256  # the record keeps the client's own ids
    with redis.Redis.from_url(redis_server.url) as store:
        kept = store.hget(f"{keyspace.stored_responses('initech')}:bytes", "#")
        assert kept is not None and 0 < int(kept) <= 0.01 * 1024 * 1024
        assert sum(store.exists(keyspace.response("initech", response.id)) for response in made) < len(made)
    for mine in theirs:  # another tenant's, passed through or translated, are all still there
        assert bob.responses.retrieve(mine.id).id == mine.id


def _stored(response: Any) -> Any:
    return getattr(response, "store", None)


def test_a_read_of_a_passed_through_response_takes_its_query_upstream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t60: ``include[]`` and ``stream`` were dropped on the way (``input_items`` kept its query)."""
    alice = _client(gateway)
    kept = alice.responses.create(model="codex", input="Think about it.")
    read = alice.responses.retrieve(kept.id, include=["reasoning.encrypted_content"])
    assert read.id == kept.id
    path = upstream_stats(small_upstream)["last_stored_path"]
    assert path == f"/v1/responses/{kept.id}?include%5B%5D=reasoning.encrypted_content"
    assert alice.responses.retrieve(kept.id).id == kept.id
    assert upstream_stats(small_upstream)["last_stored_path"] == f"/v1/responses/{kept.id}"


def test_a_background_response_is_refused_as_on_a_translated_route(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t38: passed through, the upstream answered "queued" with no usage and the answer came to a
    poll the gateway did not bill: $2.50 of essays billed $0.00005, past a $0.01 budget."""
    before = upstream_stats(small_upstream)["responses_requests"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="'background' is not supported") as refused:
            _client(gateway).responses.create(model="codex", input="Write an essay.", background=True, stream=stream)
        assert refused.value.body["param"] == "background"  # type: ignore[index]
    assert upstream_stats(small_upstream)["responses_requests"] == before


def test_a_tool_result_of_images_and_files_reaches_the_upstream_as_it_was_sent(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t38: a function_call_output of input_image / input_file parts was a 400 ("only text parts"),
    which OpenAI's API takes."""
    output = [{"type": "input_text", "text": "The chart:"},
              {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
              {"type": "input_file", "filename": "a.txt", "file_data": "data:text/plain;base64,aGk="}]  # fmt: skip
    items: list[Any] = [
        {"type": "message", "role": "user", "content": "Plot it."},
        {"type": "function_call", "call_id": "c1", "name": "plot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": output},
    ]
    response = _client(gateway).responses.create(model="codex", input=items)
    assert response.output_text
    assert _last_request(small_upstream)["body"]["input"][2]["output"] == output


def test_store_false_leaves_nothing_to_continue(gateway: GatewayProcess) -> None:
    client = _client(gateway)
    unstored = client.responses.create(model="codex", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_failing_upstream_falls_back_to_the_next_responses_model(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"status": 500}, {"status": 500})
    raw = _client(gateway).responses.with_raw_response.create(model="codex", input="Still there?")
    assert raw.parse().output_text and raw.headers["x-gateway-model"] == "gpt-b"
    assert _last_request(large_upstream)["body"]["model"] == "gpt-b"
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["fallback_used"] is True and record["retries"] == 2


def test_a_follow_up_goes_to_the_upstream_that_keeps_the_previous_response(gateway: GatewayProcess) -> None:
    """The route would pick gpt-a, whose server has never seen a response gpt-b's server keeps (404)."""
    client = _client(gateway)
    first = client.responses.create(model="gpt-b", input="Remember the number 7.")
    raw = client.responses.with_raw_response.create(model="codex", input="Which number?", previous_response_id=first.id)
    assert raw.parse().output_text and raw.headers["x-gateway-model"] == "gpt-b"
    assert raw.headers["x-gateway-decision"] == "previous_response"


def test_a_passed_through_request_carries_its_tenants_cache_salt(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """Not only translated requests: a tenant must not find another's prompt in the prefix cache
    of a Responses server it reaches as the client wrote it, nor send another tenant's salt."""
    salts = []
    for key in ("a1", "a1", "b1"):
        _client(gateway, key).responses.create(model="gpt-b", input="Our confidential prompt.", store=False)
        salts.append(_last_request(large_upstream)["body"]["cache_salt"])
    assert salts[0] == salts[1] != salts[2]
    _client(gateway, "a1").responses.create(
        model="gpt-b", input="Our confidential prompt.", store=False, extra_body={"cache_salt": salts[2]}
    )
    assert _last_request(large_upstream)["body"]["cache_salt"] not in salts


def test_a_response_id_does_not_reach_a_model_the_key_may_not_use(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """a3 may use gpt-a only: continuing a response gpt-b keeps must not be answered (and billed) by gpt-b."""
    kept = _client(gateway).responses.create(model="gpt-b", input="Remember the number 7.")
    before = upstream_stats(large_upstream)["requests"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _client(gateway, "a3").responses.create(model="gpt-a", input="Which number?", previous_response_id=kept.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert "gpt-b" not in refused.value.message  # t60: a model the key may not call is not named
    assert upstream_stats(large_upstream)["requests"] == before


def test_a_key_cannot_read_or_delete_a_response_kept_by_a_model_it_may_not_call(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t147: a3 may call gpt-a only, yet read and deleted at gpt-b's upstream what gpt-b keeps; it
    is refused as continuing it is. A key that may call the model, or a Responses model sharing its
    upstream (as a follow-up would go), reads it; a turn the gateway keeps reaches no model."""
    alice, a3 = _client(gateway, "a1"), _client(gateway, "a3")
    kept = alice.responses.create(model="gpt-b", input="Remember the number 7.")
    alice.responses.input_items.list(kept.id, limit=3)
    seen = upstream_stats(large_upstream)["last_stored_path"]
    refusals: list[Any] = [
        lambda: a3.responses.retrieve(kept.id),
        lambda: a3.responses.input_items.list(kept.id),
        lambda: a3.responses.cancel(kept.id),
        lambda: a3.responses.delete(kept.id),
    ]
    for refused_call in refusals:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            refused_call()
        assert refused.value.code == "model_not_allowed" and refused.value.param == "response_id"
        assert "gpt-b" not in refused.value.message  # t60: not named to a key that may not call it
    assert upstream_stats(large_upstream)["last_stored_path"] == seen  # nothing reached gpt-b's upstream
    assert alice.responses.retrieve(kept.id).id == kept.id  # not deleted
    with pytest.raises(openai.NotFoundError):  # another tenant's is still not found
        _client(gateway, "b1").responses.retrieve(kept.id)
    routed = alice.responses.create(model="gpt-a", input="Remember the number 8.")
    assert _client(gateway, "a5").responses.retrieve(routed.id).id == routed.id  # through its route 'mixed'
    shared = alice.responses.create(model="gpt", input="Remember the number 9.")  # gpt-a's server and key
    assert a3.responses.retrieve(shared.id).id == shared.id
    with pytest.raises(openai.PermissionDeniedError):  # 'fast' shares that server, but speaks chat to it
        _client(gateway, "a4").responses.retrieve(shared.id)
    translated = alice.responses.create(model="fast", input="Remember the number 10.")
    assert a3.responses.retrieve(translated.id).id == translated.id


def test_a_response_the_gateway_cannot_claim_says_so_and_is_not_left_upstream(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """Without Redis no tenant could reach the upstream's copy: the client is told store: false and
    the upstream is asked to delete it, streamed or not."""
    policy = policy_text(
        small_upstream,
        large_upstream,
        extra_models=MODELS.format(small=small_upstream.url, large=large_upstream.url),
        routes=ROUTES,
    )
    redis_url = f"redis://:pw-down@127.0.0.1:{free_port()}/0"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_url}, expect_ready=False)
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=10) as client:
            made = client.responses.create(model="gpt-a", input="Remember the number 7.")
            with client.responses.stream(model="gpt-a", input="Remember the number 8.") as stream:
                streamed = stream.get_final_response()
        assert made.output_text and getattr(made, "store", None) is False and getattr(streamed, "store", None) is False
        for response_id in (made.id, streamed.id):  # deleted in the background, after the answer
            deadline = time.monotonic() + 30
            while httpx.get(f"{small_upstream.url}/responses/{response_id}", timeout=5).status_code != 404:
                assert time.monotonic() < deadline, f"{response_id} is still kept upstream"
                time.sleep(0.05)
    finally:
        stop_with_its_redis_back(gateway, redis_url, tmp_path / "redis")


def test_a_response_failed_for_the_requests_own_fault_reaches_the_client_as_it_came(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """OpenAI fails a response whose image it cannot download with ``invalid_image_url``: that is
    the request's fault, so it is neither retried nor held against the upstream (ten of them
    opened the tenant's circuit), and the client reads OpenAI's own event."""
    for attempt in range(12):  # past the breaker's min_requests
        inject(small_upstream, {"failed_after_events": 1, "failed_code": "invalid_image_url"})
        calls = upstream_stats(small_upstream)["responses_requests"]
        with _client(gateway).responses.stream(
            model="gpt-a", input="What is in https://example.invalid/cat.png?",
            extra_headers={"x-request-id": f"bad-image-{attempt}"},
        ) as stream:  # fmt: skip
            events = list(stream)
        assert events[-1].type == "response.failed" and events[-1].response.error is not None
        assert events[-1].response.error.code == "invalid_image_url"
        assert upstream_stats(small_upstream)["responses_requests"] == calls + 1  # not retried
    record = gateway.wait_for_record("bad-image-11")
    assert record["status"] == 400 and record["error_type"] == "upstream_rejected_request"
    answered = _client(gateway).responses.create(model="gpt-a", input="And now a fine question.")
    assert answered.output_text  # no circuit was opened by the client's own faults


def test_a_200_that_is_no_response_is_the_upstreams_failure_and_retried(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """Some servers and routers answer an overload with 200 and an error body: it went to the
    client as a successful response (the SDK then failed on it) and was billed."""
    overloaded = '{"error": {"message": "Model is overloaded, try again", "type": "server_error", "code": 503}}'
    inject(small_upstream, {"status": 200, "body": overloaded})
    raw = _client(gateway).responses.with_raw_response.create(model="codex", input="Are you there?")
    assert raw.parse().output_text and upstream_stats(small_upstream)["responses_requests"] >= 2
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["status"] == 200 and record["retries"] == 1
    limited = '{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'
    inject(small_upstream, *[{"status": 200, "body": limited}] * 2)
    with pytest.raises(openai.RateLimitError):  # what the same code in a streamed response.failed means
        _client(gateway).responses.create(model="gpt-a", input="Are you there?")
    inject(small_upstream, *[{"status": 200, "body": '{"id": "chatcmpl-1", "choices": []}'}] * 2)
    with pytest.raises(openai.APIStatusError) as refused:
        _client(gateway).responses.create(model="gpt-a", input="Are you there?")
    assert refused.value.status_code == 502 and "not a Responses API response" in refused.value.message


def test_an_upstream_that_breaks_mid_stream_ends_it_with_an_error_event(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"cut_after_chunks": 4})
    body = {"model": "codex", "input": "Tell me a long story about the sea and the wind.", "stream": True}
    headers = {"authorization": "Bearer key-a1"}
    with httpx.stream("POST", f"{gateway.base_url}/responses", json=body, headers=headers, timeout=10) as answer:
        text = answer.read().decode()
    frames = [frame for frame in text.split("\n\n") if frame.strip()]
    assert frames[0].startswith("event: response.created")
    assert frames[-1].startswith("event: error\ndata: ") and '"code":"upstream_bad_response"' in frames[-1]


def test_an_error_before_any_output_is_retried_and_the_response_claimed_once(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """``response.created`` comes before any model work: an error right after it reaches the
    client as nothing at all, and the route's retry answers (as a 500 before the stream would)."""
    inject(small_upstream, {"overloaded_after_events": 1})
    with _client(gateway).responses.stream(
        model="codex", input="Still there?", extra_headers={"x-request-id": "relayed-retried-1"}
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events].count("response.created") == 1 and events[-1].type == "response.completed"
    record = gateway.wait_for_record("relayed-retried-1")
    assert record["retries"] == 1 and record["error_type"] is None and record["status"] == 200
    assert _client(gateway).responses.retrieve(final.id).id == final.id  # claimed for the caller


def test_a_response_failed_before_any_output_is_retried_and_after_it_counts_as_a_failure(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """``response.failed`` is the Responses API's own way to say the answer failed: before any
    output nothing has reached the client, so it is retried; after output (t138) the stream ends
    with the gateway's own ``error`` event, as after an upstream ``error`` event (a 5xx's text is
    the operator's), and the request counts as failed in the log, usage and metrics."""
    inject(small_upstream, {"failed_after_events": 1})
    with _client(gateway).responses.stream(
        model="codex", input="Still there?", extra_headers={"x-request-id": "relayed-failed-early"}
    ) as stream:
        events = list(stream)
    assert events[-1].type == "response.completed"
    early = gateway.wait_for_record("relayed-failed-early")
    assert early["retries"] == 1 and early["status"] == 200 and early["error_type"] is None
    inject(small_upstream, {"failed_after_events": 3})
    late_events = list(
        _client(gateway).responses.create(
            model="codex", input="Tell me a long story about the sea and the wind.", stream=True,
            extra_headers={"x-request-id": "relayed-failed-late"},
        )
    )  # fmt: skip
    kinds = [event.type for event in late_events]
    assert "response.output_text.delta" in kinds and "response.failed" not in kinds
    ended = late_events[-1]
    assert ended.type == "error" and ended.code == "upstream_error"
    # the error event's number follows the last event delivered, not the swallowed response.failed (t147)
    assert [event.sequence_number for event in late_events] == list(range(len(late_events)))
    assert "gpt-a" in ended.message and "failed to generate" not in ended.message  # the upstream's text is not told
    late = gateway.wait_for_record("relayed-failed-late")
    assert late["status"] == 502 and late["error_type"] == "upstream_error" and late["retries"] == 0
    assert late["completion_tokens"] > 0 and late["cost_usd"] > 0  # billed as the upstream worked


def test_an_upstream_rejection_is_the_callers_error(gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as rejected:
        _client(gateway).responses.create(model="codex", input=[{"type": "function_call_output", "output": "x"}])  # type: ignore[list-item]
    assert "call_id" in rejected.value.message


@pytest.mark.parametrize(
    ("code", "told"),
    [
        ("invalid_encrypted_content", "invalid_encrypted_content"),  # t60: clients act on these two
        ("previous_response_not_found", "previous_response_not_found"),
        ("invalid_value", "upstream_rejected_request"),
    ],
)
def test_an_upstreams_code_is_kept_where_clients_act_on_it(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, code: str, told: str
) -> None:
    body = f'{{"error": {{"message": "refused: {code}", "type": "invalid_request_error", "code": "{code}"}}}}'
    inject(small_upstream, {"status": 400, "body": body})
    with pytest.raises(openai.BadRequestError) as rejected:
        _client(gateway).responses.create(model="codex", input="Go on.")
    assert rejected.value.code == told and f"refused: {code}" in rejected.value.message


def test_an_upstream_held_response_cannot_be_continued_on_a_translated_route(gateway: GatewayProcess) -> None:
    client = _client(gateway)
    held = client.responses.create(model="codex", input="Remember the number 7.")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fast", previous_response_id=held.id, input="Which number?")
    assert "gpt-a" in refused.value.message and refused.value.param == "previous_response_id"
    # t147: a key that may not call the model keeping it is refused as on a passed-through route
    # (t60: not told that model's name)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        _client(gateway, "a4").responses.create(model="fast", previous_response_id=held.id, input="Which number?")
    assert denied.value.code == "model_not_allowed" and denied.value.param == "previous_response_id"
    assert "gpt-a" not in denied.value.message
    # a route that reaches it, translated for its chat fallback: the 400, naming the model it answers with
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway, "a5").responses.create(model="mixed", previous_response_id=held.id, input="Which number?")
    assert "gpt-a" in refused.value.message and refused.value.param == "previous_response_id"


@pytest.mark.parametrize(("key", "model"), [("a4", "nonexistent"), ("a4", "codex"), ("a3", "codex")])
def test_a_model_the_key_may_not_call_is_a_404_before_the_previous_response_is_read(
    gateway: GatewayProcess, key: str, model: str
) -> None:
    """f92: with a previous response an upstream keeps, an unknown model (or a route the key may
    not call) was a 400 about previous_response_id, not the 404 model_not_found it is without one."""
    held = _client(gateway).responses.create(model="codex", input="Remember the number 7.")
    for previous in (held.id, None):
        with pytest.raises(openai.NotFoundError) as unknown:
            _client(gateway, key).responses.create(model=model, previous_response_id=previous, input="Which number?")
        assert unknown.value.code == "model_not_found" and unknown.value.param == "model"


@pytest.mark.parametrize(
    "extra",
    [
        {"conversation": "conv_of_another_tenant"},
        {"prompt": {"id": "pmpt_of_the_operator", "version": "2"}},  # t169 #1: its tools are not priced
        {"input": [{"type": "item_reference", "id": "msg_of_another_tenant"}]},
        {"input": [{"id": "msg_of_another_tenant"}]},  # f234: an item reference's type is optional
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_of_another_tenant"}]}]},
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_of_another_tenant"]}]},
        {"tools": [{"type": "code_interpreter", "container": "cntr_of_another_tenant"}]},
    ],
)
def test_upstream_state_named_by_an_unchecked_id_is_refused(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, extra: dict[str, Any]
) -> None:
    body = {"model": "codex", "input": "Go on.", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway, "b1").responses.create(**body)
    assert "shared by every tenant" in refused.value.message
    assert upstream_stats(small_upstream)["responses_requests"] == 0  # nothing reached the upstream


def test_a_reasoning_item_a_translated_request_cannot_carry_is_named_as_dropped(gateway: GatewayProcess) -> None:
    """A route that can reach a model without ``responses_api`` translates the request to chat,
    which has no place for the model's own reasoning items (t138: dropped without a word, where
    the top-level ``reasoning`` and ``include`` are named)."""
    raw = _client(gateway).responses.with_raw_response.create(
        model="mixed",
        input=[
            {"role": "user", "content": "What is 2+2?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "enc:x"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        store=False,
    )
    assert raw.parse().output_text and raw.headers["x-gateway-dropped"] == "input.reasoning"


def test_a_custom_tool_on_a_translated_route_is_refused_saying_why(gateway: GatewayProcess) -> None:
    """t138: the 400 said this gateway takes only function tools, while it passes custom and
    hosted tools through on a route whose every model declares ``responses_api``."""
    tools: list[ToolParam] = [
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch", "format": {"type": "text"}},
        {"type": "web_search"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).responses.create(model="mixed", input="Patch the file.", tools=tools)
    said = refused.value.message
    assert refused.value.code == "unsupported_tool_type" and "custom, web_search" in said
    assert "model 'small'" in said and "translated" in said and "every model declares responses_api" in said
    with pytest.raises(openai.BadRequestError) as refused:  # t60: a key that may call only the route
        _client(gateway, "a5").responses.create(model="mixed", input="Patch the file.", tools=tools)
    assert "small" not in refused.value.message and "translated" in refused.value.message
    kept = _client(gateway).responses.create(model="mixed", input="Remember the number 7.")
    with pytest.raises(openai.BadRequestError) as refused:  # every model passes through, but the gateway keeps it
        _client(gateway).responses.create(
            model="codex", input="Patch the file.", tools=tools, previous_response_id=kept.id
        )
    assert "previous_response_id" in refused.value.message and "translated" in refused.value.message


def test_a_field_name_not_utf8_is_the_not_json_400_not_sent_on(gateway: GatewayProcess) -> None:
    """t197: the view's decoding skipped a field it does not read unchecked, and the whole body's
    read before it was passed through raised past the 400: a 500."""
    body = b'{"model": "codex", "input": "hi", "z\xff": 1}'
    response = httpx.post(f"{gateway.base_url}/responses", content=body, timeout=10,
                          headers={"authorization": "Bearer key-a1", "content-type": "application/json",
                                   "x-request-id": "passed-not-json"})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["message"]) == (
        "invalid_request_error", "the request body is not valid JSON: Invalid UTF-8 encoded string")  # fmt: skip
    assert gateway.wait_for_record("passed-not-json")["status"] == 400
