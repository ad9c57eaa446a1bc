"""The router learns from the traffic it routes, end to end: feedback (own requests only),
shadow judging within a budget that never touches the client's answer, learning with a
promotion rule, hot swap under load, rollback, and tenants kept apart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import httpx
import msgspec
import numpy as np
import pytest
import redis

from gateway.accounting.metrics import Metrics
from gateway.api.feedback import MAX_LABELS_PER_REQUEST
from gateway.learning.examples import LabelledExample, LearningStore, RoutingTrace
from gateway.learning.learned import fit_candidate, latest_labels, promote
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from gateway.store import keyspace
from gateway.store.base import BOUNDED_ENTRY_BYTES, KeyValue, StoreTimedOut, StoreUnavailable
from gateway.store.memory import MemoryKeyValue
from gateway.store.redis import RedisKeyValue, SharedRedis, connect
from tests.conftest import inject
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

KEYS = {name: f"sk-{name}-{uuid.uuid4().hex}" for name in ("alice", "alice2", "bob", "carol", "dave", "erin", "admin")}
TENANTS = {"bob": "b", "carol": "c", "dave": "d", "erin": "e"}
AUTH = "auth:\n  mode: keys\n  keys:\n" + "".join(
    f"    - {{id: {name}, tenant: {TENANTS.get(name, 'a')}, "
    f'hash: "sha256:{hashlib.sha256(secret.encode()).hexdigest()}"'
    f"{', admin: true' if name == 'admin' else ''}}}\n"
    for name, secret in KEYS.items()
)
# threshold 0.9999: every answer comes from the small model, the one that has a weakness
ROUTES = """  smart: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999,
           learning: {shadow_share: 1.0, usd_per_day: 100}}
  taught: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999, learning: {}}
  stingy: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999,
           learning: {shadow_share: 1.0, usd_per_day: 0.012}}
  thrifty: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999,
            learning: {traces_mib_per_tenant: 0.02}}
  tiny: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999,
         learning: {max_labels: 100, shadow_share: 1.0, usd_per_day: 100}}
  capped: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.9999,
           learning: {shadow_share: 1.0, usd_per_day: 0.02}}
  eager: {strategy: classifier, model: small, fallbacks: [large], threshold: 0.0, learning: {}}"""
PROMPTS = [
    json.loads(line)["prompt"]
    for line in (Path(__file__).parents[2] / "router_models/data/routing/general_train_a.jsonl")
    .read_text()
    .splitlines()
]


@pytest.fixture(scope="module")
def weak_small() -> Iterator[SimulatedUpstream]:
    with start_simulated_upstream("small", weak_on=("invoice", "customer")) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis, weak_small: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:  # fmt: skip
    policy = policy_text(weak_small, large_upstream, auth=AUTH, routes=ROUTES)
    process = start_gateway(Path(tmp_path_factory.mktemp("learning")), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def _ask(gateway: GatewayProcess, key: str, route: str, prompt: str) -> httpx.Response:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": route, "messages": [{"role": "user", "content": prompt}]},
        headers={"authorization": f"Bearer {KEYS[key]}"},
        timeout=15,
    )
    assert response.status_code == 200, response.text
    return response


def _feedback(gateway: GatewayProcess, key: str, body: object) -> httpx.Response:
    """Retried as a client would on 503 ``feedback_unavailable``: on a busy 2-core machine a Redis
    call can run past the learning store's 200 ms deadline (seen once in a fresh-clone run)."""
    for _ in range(3):
        response = httpx.post(f"{gateway.base_url}/feedback", json=body, headers={"x-api-key": KEYS[key]}, timeout=10)
        if response.status_code != 503:
            break
        time.sleep(0.5)
    return response


def _events(gateway: GatewayProcess, event: str, count: int, timeout_s: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(found := gateway.ops_records(event)) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {event} events:\n{gateway.stderr_text()[-3000:]}")


def _event_of(gateway: GatewayProcess, event: str, request_id: str, timeout_s: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := [e for e in gateway.ops_records(event) if e.get("request_id") == request_id]:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event} event of {request_id}:\n{gateway.stderr_text()[-3000:]}")


def _labels(redis_server: EmbeddedRedis, tenant: str) -> list[LabelledExample]:
    async def read() -> list[LabelledExample]:
        redis = SharedRedis(connect(redis_server.url, timeout_s=2.0), Metrics())
        try:
            return list(await LearningStore(RedisKeyValue(redis)).labels(tenant))
        finally:
            await redis.aclose()

    return asyncio.run(read())


def test_feedback_is_taken_only_from_the_key_that_made_the_request(gateway: GatewayProcess) -> None:
    request_id = _ask(gateway, "alice", "taught", "Say hello to my grandmother for me.").headers["x-request-id"]
    for other in ("bob", "alice2"):  # another tenant's key, and another key of the same tenant
        started = time.monotonic()
        refused = _feedback(gateway, other, {"request_id": request_id, "label": "needed_large"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
        # t46: waited for as an id no one used (a 404 at once told that another key had used it)
        assert time.monotonic() - started >= 1.5  # the wait for a trace not written yet: 1.55 s in all
    accepted = _feedback(gateway, "alice", {"request_id": request_id, "thumbs": "down"})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {
        "object": "feedback", "request_id": request_id, "answered_by": "small", "label": "needed_large",
    }  # fmt: skip
    by_admin = _feedback(gateway, "admin", {"request_id": request_id, "score": 0.9})
    assert by_admin.status_code == 200 and by_admin.json()["label"] == "small_was_enough"
    # a request on a route that does not learn left nothing to label
    fixed = _ask(gateway, "alice", "fast", "Say hello.").headers["x-request-id"]
    assert _feedback(gateway, "alice", {"request_id": fixed, "score": 1.0}).status_code == 404


def test_an_answer_that_is_a_tool_call_can_be_labelled(gateway: GatewayProcess) -> None:
    """An agent's turn is often a tool call and no text: it was never kept (feedback said 404)."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "taught", "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
              "tools": [tool], "tool_choice": "required"},
        headers={"authorization": f"Bearer {KEYS['alice']}"},
        timeout=15,
    )  # fmt: skip
    message = response.json()["choices"][0]["message"]
    assert message["tool_calls"] and not message.get("content")
    labelled = _feedback(gateway, "alice", {"request_id": response.headers["x-request-id"], "thumbs": "up"})
    assert labelled.status_code == 200, labelled.text


def test_the_request_id_anthropics_sdk_gives_can_be_labelled(gateway: GatewayProcess) -> None:
    """t88: Anthropic's SDK gives its caller ``message._request_id``, the ``request-id`` header
    (``req_`` and the gateway's id): feedback on it was a 404, so apps on that SDK taught nothing."""
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEYS["alice"], max_retries=0, timeout=15) as claude:
        message = claude.messages.create(
            model="taught", max_tokens=64, messages=[{"role": "user", "content": "Name three colours of autumn."}]
        )
    assert message._request_id is not None and message._request_id.startswith("req_")
    labelled = _feedback(gateway, "alice", {"request_id": message._request_id, "thumbs": "down"})
    assert labelled.status_code == 200, labelled.text
    assert labelled.json()["request_id"] == message._request_id and labelled.json()["label"] == "needed_large"
    again = _feedback(gateway, "alice", {"request_id": message._request_id[4:], "thumbs": "up"})  # one request
    assert again.status_code == 200 and again.json()["label"] == "small_was_enough"


def test_a_reused_request_id_stays_with_the_key_that_used_it_first(gateway: GatewayProcess) -> None:
    """Clients may choose ``x-request-id``: another key of the tenant reusing one does not take
    over the first request's feedback; and one request takes a bounded number of labels."""
    chosen = f"client-chosen-{time.monotonic_ns()}"
    for key in ("alice", "alice2"):
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "taught", "messages": [{"role": "user", "content": "Say hello to my cat for me."}]},
            headers={"authorization": f"Bearer {KEYS[key]}", "x-request-id": chosen},
            timeout=15,
        )
        assert response.status_code == 200 and response.headers["x-request-id"] == chosen
    assert _feedback(gateway, "alice2", {"request_id": chosen, "thumbs": "up"}).status_code == 404
    for thumbs in ("up", "down", "up"):
        assert _feedback(gateway, "alice", {"request_id": chosen, "thumbs": thumbs}).status_code == 200
    flooded = _feedback(gateway, "alice", {"request_id": chosen, "thumbs": "down"})
    assert flooded.status_code == 409 and flooded.json()["error"]["param"] == "request_id"
    assert flooded.headers["x-should-retry"] == "false"  # the SDKs retry a 409; no retry takes another label (t148)


def test_a_reused_request_id_takes_no_shadow_label_over(gateway: GatewayProcess, redis_server: EmbeddedRedis) -> None:
    """t125: the second request under an id (another key's) was judged too, and its verdict,
    the newer, was the label of the first request's trace: learn trained one prompt on
    another's verdict."""
    chosen = f"shadow-reused-{time.monotonic_ns()}"
    for key, prompt in (
        ("alice", "Suggest a name for a grey kitten with white paws."),
        ("alice2", "Please double-check the total on this invoice: 3 x 19.99 plus 7% VAT."),
    ):
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "smart", "messages": [{"role": "user", "content": prompt}]},
            headers={"authorization": f"Bearer {KEYS[key]}", "x-request-id": chosen},
            timeout=15,
        )
        assert response.status_code == 200 and response.headers["x-request-id"] == chosen
        if key == "alice":
            assert _event_of(gateway, "shadow_judgement", chosen)["outcome"] == "small_enough"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the second request's job: skipped, or (t125) judged
        judged = [e for e in gateway.ops_records("shadow_judgement") if e.get("request_id") == chosen]
        skipped = [e for e in gateway.ops_records("shadow_skipped") if e.get("request_id") == chosen]
        if skipped or len(judged) > 1:
            break
        time.sleep(0.05)
    labels = [e for e in _labels(redis_server, "a") if e.request_id == chosen]
    assert len(judged) == len(labels) == 1 and labels[0].needed_large is False
    assert [e["reason"] for e in skipped] == ["trace not kept"]


def test_generated_request_ids_do_not_give_the_next_one_away(gateway: GatewayProcess) -> None:
    ids = [_ask(gateway, "alice", "fast", "Say hi.").headers["x-request-id"] for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    assert len({i[:16] for i in ids}) == 3  # no shared prefix and counter to count on


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "x"},
        {"request_id": "x", "label": "needed_large", "score": 1.0},
        {"request_id": "x", "score": 1.5},
        {"request_id": "x", "label": "great"},
        {"request_id": "x", "thumbs": "up", "comment": "nice"},
        [1, 2],
    ],
)
def test_bad_feedback_gets_a_400_in_openais_shape(gateway: GatewayProcess, body: object) -> None:
    response = _feedback(gateway, "alice", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_bad_feedback_value_names_its_parameter(gateway: GatewayProcess) -> None:
    error = _feedback(gateway, "alice", {"request_id": "x", "label": "great"}).json()["error"]
    assert error["param"] == "label"
    unknown = _feedback(gateway, "alice", {"request_id": "x", "thumbs": "up", "comment": "nice"}).json()["error"]
    assert unknown["param"] == "comment" and "unknown parameter 'comment'" in unknown["message"]


def test_a_label_it_does_not_take_is_told_the_labels_it_does(gateway: GatewayProcess) -> None:
    """t200: the metric's label is ``small_enough``, the API's ``small_was_enough``: the 400 said
    "Invalid enum value 'small_enough'" without the values taken (thumbs' too)."""
    error = _feedback(gateway, "alice", {"request_id": "x", "label": "small_enough"}).json()["error"]
    assert error["param"] == "label"
    assert error["message"].endswith("'small_enough'; expected one of 'needed_large', 'small_was_enough'"), error
    error = _feedback(gateway, "alice", {"request_id": "x", "thumbs": "yes"}).json()["error"]
    assert error["param"] == "thumbs" and error["message"].endswith("expected one of 'down', 'up'"), error


def test_feedback_sent_as_the_stream_ends_finds_its_request(gateway: GatewayProcess) -> None:
    """The routing trace is written just after the answer goes out; thumbs on a streamed chat
    are sent the moment the last event arrives."""
    for n in range(5):
        body = {"model": "taught", "stream": True, "messages": [{"role": "user", "content": f"Say hi #{n}."}]}
        headers = {"authorization": f"Bearer {KEYS['alice']}"}
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=15) as r:
            request_id = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    break
        answered = _feedback(gateway, "alice", {"request_id": request_id, "thumbs": "up"})
        assert answered.status_code == 200, answered.text


@pytest.fixture(params=["memory", "redis"])
async def trace_kv(request: pytest.FixtureRequest) -> AsyncIterator[KeyValue]:
    if request.param == "memory":
        yield MemoryKeyValue()
        return
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    shared = SharedRedis(connect(server.url, timeout_s=2), Metrics())
    yield RedisKeyValue(shared)
    await shared.aclose()


async def test_a_tenants_traces_past_its_cap_lose_their_oldest_never_another_tenants(trace_kv: KeyValue) -> None:
    """t101: every routed request left a trace for 72 h, unbounded; under ``volatile-ttl`` a full Redis
    evicted every tenant's cached answers before any of them (one tenant's traffic took another's
    hit rate from 197/200 to 18/200)."""
    store, one, other = LearningStore(trace_kv), f"traces-{uuid.uuid4().hex}", f"traces-{uuid.uuid4().hex}"
    trace = RoutingTrace.of("k", "taught", "small", 0.2, np.ones(384), np.ones(12))
    cap = 10 * (len(msgspec.msgpack.encode(trace)) + BOUNDED_ENTRY_BYTES)
    assert await store.keep_trace(other, "r0", trace, 1, cap)
    elsewhere = msgspec.structs.replace(trace, route="smart")  # another route's traces: a ledger of their own
    assert await store.keep_trace(one, "smart-0", elsewhere, 1, cap)
    for i in range(25):
        assert await store.keep_trace(one, f"r{i}", trace, 1, cap)
        await asyncio.sleep(0.002)  # distinct times stored
    assert [i for i in range(25) if await store.trace(one, f"r{i}") is not None] == list(range(15, 25))
    assert await store.trace(other, "r0") == trace and await store.trace(one, "smart-0") == elsewhere
    # the first request under an id keeps it, however often the id is used again
    reused = msgspec.structs.replace(trace, key_id="another")
    assert not await store.keep_trace(one, "r24", reused, 1, cap)
    assert await store.trace(one, "r24") == trace
    assert await store.keep_trace(one, "r25", trace, 1, cap)  # and it took no room: one more goes, not two
    assert [i for i in range(26) if await store.trace(one, f"r{i}") is not None] == list(range(16, 26))


async def test_a_requests_labels_past_its_bound_are_neither_counted_nor_kept(trace_kv: KeyValue) -> None:
    store, tenant = LearningStore(trace_kv), f"counted-{uuid.uuid4().hex}"
    trace = RoutingTrace.of("k", "taught", "small", 0.2, np.ones(384), np.ones(12))
    example = LabelledExample.of("r", trace, True, "feedback", False)
    assert [await store.add_counted_label(tenant, example, 100, 1, at_most=2) for _ in range(3)] == [True, True, False]
    assert len(await store.labels(tenant)) == 2


async def test_another_request_under_an_id_whose_trace_is_gone_has_a_label_count_of_its_own(
    trace_kv: KeyValue,
) -> None:
    """t196: the count of the first request under an id outlived its trace (evicted by the
    tenant's trace cap, or expired), so the next request under that id took no label at all."""
    store, tenant = LearningStore(trace_kv), f"reused-{uuid.uuid4().hex}"
    first = RoutingTrace.of("k", "taught", "small", 0.2, np.ones(384), np.ones(12))
    later = msgspec.structs.replace(first, p_large=0.7, at=first.at + 3600)  # the id's next request
    for trace in (first, later):
        example = LabelledExample.of("conversation-1", trace, True, "feedback", False)
        assert [await store.add_counted_label(tenant, example, 100, 1, at_most=2) for _ in range(3)] == [
            True, True, False,
        ]  # fmt: skip
    assert len(await store.labels(tenant)) == 4


def _ask_as(gateway: GatewayProcess, key: str, route: str, prompt: str, request_id: str | None = None) -> str:
    """The request's id: not cached (each one leaves a trace), under ``request_id`` if given."""
    headers = {"authorization": f"Bearer {KEYS[key]}", "cache-control": "no-store"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": route, "messages": [{"role": "user", "content": prompt}]},
        headers=headers,
        timeout=15,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def test_a_request_reusing_an_id_whose_trace_was_evicted_takes_labels_of_its_own(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """t196, end to end: a client reusing its own id (a conversation's) once the tenant's trace cap
    evicted the trace of the first request under it got a 409 on the next request's first label;
    and learn would have kept one of the two requests' labels."""
    chosen = f"conversation-{time.monotonic_ns()}"
    assert _ask_as(gateway, "dave", "thrifty", "Name a river that flows through Lisbon.", chosen) == chosen
    for thumbs in ("up", "down", "up"):
        assert _feedback(gateway, "dave", {"request_id": chosen, "thumbs": thumbs}).status_code == 200
    assert _feedback(gateway, "dave", {"request_id": chosen, "thumbs": "up"}).status_code == 409
    newest = ""
    for i in range(30):  # about 16 fit in the route's cap: the first request's trace goes
        newest = _ask_as(gateway, "dave", "thrifty", f"Write a short poem about the number {i}.")
    with redis.Redis.from_url(redis_server.url) as kept_in:
        deadline = time.monotonic() + 30
        while not kept_in.exists(keyspace.routing_trace("d", newest)) and time.monotonic() < deadline:
            time.sleep(0.05)  # written in the background, after the answer
        assert not kept_in.exists(keyspace.routing_trace("d", chosen))
    assert _ask_as(gateway, "dave", "thrifty", "Derive the quadratic formula step by step.", chosen) == chosen
    for thumbs in ("down", "up", "down"):
        labelled = _feedback(gateway, "dave", {"request_id": chosen, "thumbs": thumbs})
        assert labelled.status_code == 200, labelled.text
    assert _feedback(gateway, "dave", {"request_id": chosen, "thumbs": "up"}).status_code == 409
    labels = [e for e in _labels(redis_server, "d") if e.request_id == chosen]
    assert [e.needed_large for e in labels] == [False, True, False, True, False, True]
    assert [e.needed_large for e in latest_labels(labels)] == [False, True]  # two requests, each its last label


def test_a_tenants_traces_stay_within_its_cap_and_feedback_on_one_gone_is_a_404(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """t101, end to end: a tenant's requests on a route with ``traces_mib_per_tenant`` keep its
    newest traces within the cap; its oldest go, never another tenant's."""
    alices = _ask(gateway, "alice", "thrifty", "Name a river that flows through Lisbon.").headers["x-request-id"]
    bobs: list[str] = []
    with httpx.Client(timeout=15) as client:
        for i in range(60):  # no-store: nothing cached, a trace each all the same
            prompt = f"Write a short poem about the number {i}."
            response = client.post(
                f"{gateway.base_url}/chat/completions",
                json={"model": "thrifty", "messages": [{"role": "user", "content": prompt}]},
                headers={"authorization": f"Bearer {KEYS['bob']}", "cache-control": "no-store"},
            )
            assert response.status_code == 200, response.text
            bobs.append(response.headers["x-request-id"])
    cap = int(0.02 * 1024 * 1024)
    with redis.Redis.from_url(redis_server.url) as kept_in:
        deadline = time.monotonic() + 30
        while not kept_in.exists(keyspace.routing_trace("b", bobs[-1])) and time.monotonic() < deadline:
            time.sleep(0.05)  # written in the background, after the answer
        sizes = [int(kept_in.strlen(keyspace.routing_trace("b", request_id))) for request_id in bobs]
        counted = int(kept_in.hget(keyspace.routing_traces("b", "thrifty") + ":bytes", "#") or 0)
    kept = [i for i, size in enumerate(sizes) if size]
    assert sum(sizes[i] + BOUNDED_ENTRY_BYTES for i in kept) <= counted <= cap
    assert 8 <= len(kept) < 20 and kept[-1] == len(bobs) - 1 and kept[0] > 40, kept  # the newest, about 16
    labelled = _feedback(gateway, "bob", {"request_id": bobs[-1], "thumbs": "down"})
    assert labelled.status_code == 200 and labelled.json()["label"] == "needed_large", labelled.text
    gone = _feedback(gateway, "bob", {"request_id": bobs[0], "thumbs": "down"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found", gone.text
    assert _feedback(gateway, "alice", {"request_id": alices, "thumbs": "up"}).status_code == 200


def test_a_label_redis_refuses_to_keep_is_not_counted(gateway: GatewayProcess, redis_server: EmbeddedRedis) -> None:
    """t165: the label was counted, then stored in a second call; one that failed (timed out,
    refused) was a 503 all the same counted, so a client retrying it three times got a 409 with no
    label kept. Here Redis refuses the write for real: the tenant's labels key holds no list."""
    request_id = _ask(gateway, "erin", "taught", "Say hello to my neighbour for me.").headers["x-request-id"]
    body = {"request_id": request_id, "thumbs": "down"}
    with redis.Redis.from_url(redis_server.url) as direct:
        direct.set(keyspace.routing_labels("e"), b"not a list")
        try:
            for _ in range(MAX_LABELS_PER_REQUEST):
                refused = httpx.post(f"{gateway.base_url}/feedback", json=body, headers={"x-api-key": KEYS["erin"]})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "feedback_unavailable"
                assert refused.headers["retry-after"] == "5"  # as limiter_unavailable's: the SDKs retry after it
        finally:
            direct.delete(keyspace.routing_labels("e"))
    for thumbs in ("down", "up", "down"):
        labelled = _feedback(gateway, "erin", {**body, "thumbs": thumbs})
        assert labelled.status_code == 200, labelled.text
    assert _feedback(gateway, "erin", body).status_code == 409
    assert [e.needed_large for e in _labels(redis_server, "e")] == [True, False, True]


async def test_a_label_whose_write_timed_out_is_counted_and_kept_together(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """t165: Redis paused (SIGSTOP) while a label is written: the write times out and Redis runs
    it when it goes on. Counted in one call and kept in another, the count ran and the label did
    not: the request's three labels were counted with two kept. Now each label counted is kept."""
    server = start_embedded_redis(tmp_path_factory.mktemp("paused-redis"))
    shared = SharedRedis(connect(server.url, timeout_s=2), Metrics())
    store = LearningStore(RedisKeyValue(shared))
    trace = RoutingTrace.of("k", "taught", "small", 0.2, np.ones(384), np.ones(12))
    try:
        # another request's label first: connected, and the script loaded (a write Redis runs late)
        assert await store.add_counted_label("t", LabelledExample.of("r0", trace, True, "feedback", False), 100, 1, 3)
        example = LabelledExample.of("r1", trace, True, "feedback", False)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreTimedOut):
                await store.add_counted_label("t", example, 100, 1, at_most=3)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        for _ in range(6):  # as a client retries its 503, until the 409
            try:
                if not await store.add_counted_label("t", example, 100, 1, at_most=3):
                    break
            except StoreUnavailable:  # Redis taken for down a moment after the timeout
                await asyncio.sleep(0.5)
        with redis.Redis.from_url(server.url) as direct:
            counted = float(direct.get(keyspace.routing_label_count("t", "r1", trace.at)) or 0)
        assert counted == len([e for e in await store.labels("t") if e.request_id == "r1"]) == 3
    finally:
        await shared.aclose()
        server.stop()


def _feedback_counts(gateway: GatewayProcess) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_router_feedback_total{"):
            counts[line.split('label="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def test_feedback_is_counted_under_the_labels_readme_names(gateway: GatewayProcess) -> None:
    """t152: ``gateway_router_feedback_total`` counted ``small_was_enough``, which README's
    table (and the shadow counter) call ``small_enough``."""
    small = [_ask(gateway, "alice", "taught", f"Say hello to {name}.") for name in ("Ann", "Bo")]
    large = _ask(gateway, "alice", "eager", "Say hello to Cy.")
    assert large.headers["x-gateway-model"] == "large"
    before = _feedback_counts(gateway)
    for response, body in (
        (small[0], {"label": "small_was_enough"}),
        (small[1], {"thumbs": "down"}),
        (large, {"score": 1.0}),  # on the large model's answer: teaches nothing
    ):
        given = _feedback(gateway, "alice", {"request_id": response.headers["x-request-id"], **body})
        assert given.status_code == 200, given.text
    after = _feedback_counts(gateway)
    assert {label: after[label] - before.get(label, 0) for label in after} == {
        "small_enough": 1, "needed_large": 1, "none": 1,
    }  # fmt: skip


def test_feedback_without_a_valid_key_is_401(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.base_url}/feedback", json={"request_id": "x", "score": 1}, timeout=10)
    assert response.status_code == 401


def test_shadow_judging_labels_what_the_small_model_gets_wrong_and_logs_no_text(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    before = len(gateway.ops_records("shadow_judgement"))
    weak = _ask(gateway, "bob", "smart", "Please double-check the total on this invoice: 3 x 19.99 plus 7% VAT.")
    fine = _ask(gateway, "bob", "smart", "Suggest a name for a grey kitten with white paws.")
    assert weak.headers["x-gateway-model"] == "small" and weak.headers["x-gateway-router-version"] == "shipped"
    judged = _events(gateway, "shadow_judgement", before + 2)[before:]
    outcomes = {str(e["request_id"]): e["outcome"] for e in judged}
    assert outcomes == {weak.headers["x-request-id"]: "needed_large", fine.headers["x-request-id"]: "small_enough"}
    assert all(float(e["cost_usd"]) > 0 for e in judged)  # type: ignore[arg-type]
    assert "kitten" not in gateway.stderr_text() and "invoice" not in gateway.stderr_text()
    assert "kitten" not in gateway.log_path.read_text()
    labels = _labels(redis_server, "b")
    assert len(labels) >= 2 and _labels(redis_server, "nobody") == []


@pytest.mark.parametrize("usage", [True, False])
def test_shadow_spend_stops_at_the_daily_budget(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, usage: bool
) -> None:
    """Also when the upstream reports no usage: it was spent at $0, and the cap never bound (t32).
    The $0.012 takes one job as estimated (~$0.0115, most of it the 512 tokens the large model
    may write), not that one's cost (~$0.0013) and another's estimate."""
    if not usage:
        inject(large_upstream, *([{"omit_usage": True}] * 12))
    before_skipped = len(gateway.ops_records("shadow_skipped"))
    before_judged = len(gateway.ops_records("shadow_judgement"))
    for prompt in ("What is 2+2?", "Name a primary colour.", "Spell 'cat' backwards."):
        _ask(gateway, "alice" if usage else "bob", "stingy", prompt)  # each its own tenant's daily budget
        time.sleep(0.3)  # one at a time: the first one's cost is booked before the next starts
    skipped = _events(gateway, "shadow_skipped", before_skipped + 2)[before_skipped:]
    assert all(e["reason"] == "daily budget spent" for e in skipped)
    judged = _events(gateway, "shadow_judgement", before_judged + 1)[before_judged:]
    assert judged and all(float(e["cost_usd"]) > 0 for e in judged)  # type: ignore[arg-type]


def test_a_shadow_job_that_would_overrun_the_days_cap_is_not_started(gateway: GatewayProcess) -> None:
    """t152: the spend was checked before a job, never against what the job would cost: one
    request with a 60,000-word prompt made one job spend $0.91 of a $0.06 cap."""
    long = _ask(gateway, "dave", "capped", "Summarise this. " + "word " * 10_000)  # ~$0.05 to the large model
    skipped = _event_of(gateway, "shadow_skipped", long.headers["x-request-id"])
    assert skipped["reason"] == "daily budget spent" and skipped["spent_usd"] == 0
    assert float(skipped["estimate_usd"]) > 0.02  # type: ignore[arg-type]
    short = _ask(gateway, "dave", "capped", "What is 2+2?")  # its job fits in the $0.02: judged
    judged = _event_of(gateway, "shadow_judgement", short.headers["x-request-id"])
    assert 0 < float(judged["spent_today_usd"]) <= 0.02  # type: ignore[arg-type]


def test_a_failing_shadow_call_never_touches_the_clients_answer(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    before = len(gateway.ops_records("shadow_failed"))
    inject(large_upstream, *([{"status": 500, "body": "boom"}] * 4))
    response = _ask(gateway, "alice", "smart", "Describe the smell of rain in one sentence.")
    assert response.headers["x-gateway-model"] == "small" and response.json()["choices"][0]["message"]["content"]
    failed = _events(gateway, "shadow_failed", before + 1)[before]
    assert failed["route"] == "smart"


def _learn(redis_server: EmbeddedRedis, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "router", *args, "--redis", redis_server.url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_learning_over_an_unreadable_router_in_force_compares_with_the_shipped_one(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """Gateways serve the shipped router when the one in force cannot be read; learn used to stop there."""

    async def spoil() -> None:
        redis = SharedRedis(connect(redis_server.url, timeout_s=2.0), Metrics())
        try:
            await RedisKeyValue(redis).put(keyspace.learned_router("spoilt", "active"), b"\xff\xfe", 60, 2.0)
        finally:
            await redis.aclose()

    asyncio.run(spoil())
    learned = _learn(redis_server, "learn", "--tenant", "spoilt")
    assert "comparing with the shipped router" in learned.stderr
    assert "labelled requests" in learned.stderr  # it went on to the labels (none here)


def test_learn_and_status_count_a_relabelled_request_once(redis_server: EmbeddedRedis) -> None:
    """t69: learn reported 62 labels where status said 60: learn counted each relabel."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(60):
        trace = _random_trace(rng)
        examples.append(LabelledExample.of(f"r{i}", trace, i % 3 == 0, "shadow", False))
    relabelled = [msgspec.structs.replace(e, needed_large=not e.needed_large, source="feedback") for e in examples[:2]]
    assert _labels_learnt_and_counted(redis_server, "relabelled-t69", examples + relabelled) == (60, 60)


def test_learn_and_status_count_each_request_that_reused_an_id(redis_server: EmbeddedRedis) -> None:
    """t196: labels are kept 180 days and traces 72 h, so a client's stable id (a session's) names
    several requests over time; learn and status counted the id once, learn training on its last
    labelled prompt alone. A request labelled twice still counts once."""
    rng = np.random.default_rng(2)
    examples = []
    for i in range(60):
        trace = _random_trace(rng)
        examples.append(LabelledExample.of(f"session-{i % 30}", trace, i % 3 == 0, "feedback", False))
        time.sleep(0.001)  # as requests days apart: each trace its own time
    relabelled = [msgspec.structs.replace(e, needed_large=not e.needed_large) for e in examples[:2]]
    assert _labels_learnt_and_counted(redis_server, "reused-t196", examples + relabelled) == (60, 60)


def _random_trace(rng: np.random.Generator) -> RoutingTrace:
    """A trace of a request routed small, at a random unit embedding."""
    embedding = rng.normal(size=384)
    return RoutingTrace.of("k", "taught", "small", 0.2, embedding / np.linalg.norm(embedding), rng.normal(size=12))


def _labels_learnt_and_counted(
    redis_server: EmbeddedRedis, tenant: str, examples: list[LabelledExample]
) -> tuple[int, int]:
    """Keep ``examples`` as ``tenant``'s labels, then the labels ``router learn`` trained on and
    those ``router status`` counts."""

    async def keep() -> None:
        redis = SharedRedis(connect(redis_server.url, timeout_s=2.0), Metrics())
        try:
            for example in examples:
                await LearningStore(RedisKeyValue(redis)).add_label(tenant, example, 1000)
        finally:
            await redis.aclose()

    asyncio.run(keep())
    learned = _learn(redis_server, "learn", "--tenant", tenant)
    status = _learn(redis_server, "status", "--tenant", tenant)
    assert learned.returncode == 0, learned.stderr
    return json.loads(learned.stdout)["labels"], json.loads(status.stdout)["labels"]


def test_a_routes_max_labels_does_not_cut_the_labels_of_the_tenants_other_routes(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    """t125: every route's labels of a tenant share one list, which a label on a route with
    ``max_labels: 100`` cut to its newest 100, silently."""
    rng = np.random.default_rng(1)
    earlier = []
    for i in range(150):  # labelled on a route that keeps the default 50,000
        embedding = rng.normal(size=384)
        trace = RoutingTrace.of("carol", "taught", "small", 0.2, embedding / np.linalg.norm(embedding), np.zeros(12))
        earlier.append(LabelledExample.of(f"taught-{i}", trace, i % 3 == 0, "feedback", False))

    async def keep() -> None:
        redis = SharedRedis(connect(redis_server.url, timeout_s=2.0), Metrics())
        try:
            for example in earlier:
                await LearningStore(RedisKeyValue(redis)).add_label("c", example, 50_000)
        finally:
            await redis.aclose()

    asyncio.run(keep())
    request_id = _ask(gateway, "carol", "tiny", "Suggest a name for a grey kitten.").headers["x-request-id"]
    assert _feedback(gateway, "carol", {"request_id": request_id, "thumbs": "up"}).status_code == 200
    _event_of(gateway, "shadow_judgement", request_id)
    assert len(_labels(redis_server, "c")) == 152  # the feedback's label and the shadow's
    status = _learn(redis_server, "status", "--tenant", "c")
    assert json.loads(status.stdout)["labels"] == 151


def test_a_rollback_with_nothing_to_roll_back_says_so(redis_server: EmbeddedRedis) -> None:
    """t69: it exited 0 with the status, as if a router had been put back."""
    for args in (("--tenant", "never-taught-t69"), ("--global",)):
        rolled = _learn(redis_server, "rollback", *args)
        assert rolled.returncode == 1 and "nothing to roll back" in rolled.stderr
        assert json.loads(rolled.stdout)["active"] is None


def test_status_and_rollback_refuse_a_policy_file_they_cannot_read(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """t166: ``status --policies nope.yaml`` said the file was not read, then answered, exit 0,
    where route, calibrate and keys exit 1 on a --policies they cannot read."""
    missing = tmp_path / "nope.yaml"
    for command in ("status", "rollback"):
        refused = _learn(redis_server, command, "--tenant", "a", "--policies", str(missing))
        assert refused.returncode == 1, refused.stderr
        assert refused.stdout == "" and "nothing to roll back" not in refused.stderr
        assert f"{missing}: invalid\n  - cannot read the file: No such file or directory\n" in refused.stderr


def test_learning_refuses_a_candidate_that_is_not_better(gateway: GatewayProcess, redis_server: EmbeddedRedis) -> None:
    # labels by feedback that carry no pattern: every third one says "needed large"
    for i, prompt in enumerate(PROMPTS[:48]):
        request_id = _ask(gateway, "alice2", "taught", prompt).headers["x-request-id"]
        label = "needed_large" if i % 3 == 0 else "small_was_enough"
        assert _feedback(gateway, "alice2", {"request_id": request_id, "label": label}).status_code == 200
    result = _learn(redis_server, "learn", "--tenant", "a", "--promote")
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert report["promoted"] is False and report["held_out"] >= 20
    status = _learn(redis_server, "status", "--tenant", "a")
    assert json.loads(status.stdout)["active"] is None and json.loads(status.stdout)["labels"] >= 40
    assert "is the name right" not in status.stderr
    typo = _learn(redis_server, "status", "--tenant", "A-typo")  # t32: it read as a tenant on the shipped router
    assert json.loads(typo.stdout)["labels"] == 0 and "is the name right?" in typo.stderr


def test_a_promoted_router_swaps_in_under_load_and_rolls_back_and_stays_with_its_tenant(
    gateway: GatewayProcess, redis_server: EmbeddedRedis
) -> None:
    for prompt in PROMPTS[48:100]:
        _ask(gateway, "alice", "smart", prompt)
    labels_needed = 40

    async def promote_one() -> str:
        redis = SharedRedis(connect(redis_server.url, timeout_s=2.0), Metrics())
        try:
            store, kv = LearningStore(RedisKeyValue(redis)), RedisKeyValue(redis)
            deadline = time.monotonic() + 30
            while len(examples := await store.labels("a")) < labels_needed and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            candidate, _ = fit_candidate(examples, None)
            await promote(kv, "a", candidate)  # as `router learn --promote` does once a candidate wins
            return candidate.version
        finally:
            await redis.aclose()

    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                response = client.post(
                    f"{gateway.base_url}/chat/completions",
                    json={"model": "taught", "messages": [{"role": "user", "content": "Summarise: the sky is blue."}]},
                    headers={"authorization": f"Bearer {KEYS['alice']}"},
                )
                statuses.append(response.status_code)
                versions.append(response.headers.get("x-gateway-router-version", ""))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 30  # answered by the shipped router first, not a guessed 0.5 s of it
        while not versions and time.monotonic() < deadline:
            time.sleep(0.05)
        version = asyncio.run(promote_one())
        deadline = time.monotonic() + 30
        while version not in versions[-4:] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert statuses and set(statuses) == {200}, "a request was lost or failed during the swap"
    assert "shipped" in versions and version in versions
    # and it stays: a request after the load, not the load's last to end (one routed by the shipped
    # router before the swap, and slow on a loaded machine, ended after the new one was seen)
    swapped = _ask(gateway, "alice", "taught", "Summarise: the sky is blue.")
    assert swapped.headers["x-gateway-router-version"] == version
    # another tenant's requests never use tenant a's router
    assert (
        _ask(gateway, "bob", "taught", "Summarise: the sky is blue.").headers["x-gateway-router-version"] == "shipped"
    )
    # rollback: nothing before it, so the shipped router again
    rolled = _learn(redis_server, "rollback", "--tenant", "a")
    assert rolled.returncode == 0 and json.loads(rolled.stdout)["active"] is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _ask(gateway, "alice", "taught", "Hi").headers["x-gateway-router-version"] == "shipped":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the rollback did not reach the gateway")
    record = gateway.wait_for_record(_ask(gateway, "alice", "taught", "Hi again").headers["x-request-id"])
    assert record["router_version"] is None and record["p_large"] is not None


def test_labels_of_a_tenant_scoped_route_are_never_pooled(gateway: GatewayProcess, redis_server: EmbeddedRedis) -> None:
    for prompt in PROMPTS[100:145]:  # tenant b, on a route whose learning scope is the tenant (the default)
        _ask(gateway, "bob", "smart", prompt)
    deadline = time.monotonic() + 30
    while len(_labels(redis_server, "b")) < 45 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_labels(redis_server, "b")) >= 45
    pooled = _learn(redis_server, "learn", "--global", "--tenant", "b")
    assert pooled.returncode == 1 and "0 labelled requests" in pooled.stderr
    assert "learning scope 'tenant', so they are not pooled" in pooled.stderr  # t79: and why
    own = _learn(redis_server, "learn", "--tenant", "b")  # the tenant's own router may use them
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["labels"] >= 45
