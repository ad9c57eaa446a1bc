"""Rate limits and budgets held across two gateway processes sharing one Redis."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis as redis_sync

from gateway.accounting.ledger import USAGE_RETENTION_DAYS
from gateway.accounting.usage import UsageFigures
from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream
from gateway.store import keyspace
from tests.conftest import closed_after_test, inject, upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway, stop_with_its_redis_back

_KEY_NAMES = "rpm tpm budget s1 s2 saver admin counter ledger inflight twins once late"
# small costs $0.5/M input and $1.5/M output in the test policy.
KEYS = """auth:
  mode: keys
  key_file: keys.yaml
  keys:
    - {id: rpm, tenant: solo-rpm, hash: "%(rpm)s", limits: {rpm: 10}}
    - {id: tpm, tenant: solo-tpm, hash: "%(tpm)s", limits: {tpm: 300}}
    - {id: budget, tenant: solo-budget, hash: "%(budget)s", limits: {usd_per_day: 0.0005}}
    - {id: shared-1, tenant: shared, hash: "%(s1)s"}
    - {id: shared-2, tenant: shared, hash: "%(s2)s"}
    - {id: saver, tenant: saver, hash: "%(saver)s", limits: {usd_per_day: 0.001}}
    - {id: admin, tenant: ops, hash: "%(admin)s", admin: true}
    - {id: counter, tenant: solo-count, hash: "%(counter)s", limits: {rpm: 3, usd_per_day: 0.0}}
    - {id: ledger, tenant: ledger, hash: "%(ledger)s"}
    - {id: inflight, tenant: solo-inflight, hash: "%(inflight)s", limits: {usd_per_day: 0.0005}}
    - {id: twins, tenant: solo-twins, hash: "%(twins)s", limits: {usd_per_day: 0.0005}}
    - {id: once, tenant: solo-once, hash: "%(once)s", limits: {rpm: 2}}
    - {id: late, tenant: solo-late, hash: "%(late)s", limits: {usd_per_month: 0.001}}
tenants:
  shared: {limits: {rpm: 6}}
  saver: {downgrade_auto_at: 0.3}
""" % {name: hash_key(f"key-{name}") for name in _KEY_NAMES.split()}
ROUTES = """  costly: {strategy: classifier, model: large, fallbacks: [small], threshold: 0.0}
  cheap: {model: small}"""  # costly: always large
UNHURRIED = """  unhurried:
    base_url: %s
    price: {input: 0.5, output: 1.5}
    tier: small
    simulated: true
    timeouts: {connect: 1, first_byte: 1, total: 30}
"""  # small's price and a total that a stream of seconds stays well within


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:  # fmt: skip
    """Two gateway processes behind an imaginary load balancer, one Redis."""
    policy = policy_text(
        small_upstream, large_upstream, auth=KEYS, routes=ROUTES, extra_models=UNHURRIED % small_upstream.url,
        cache="{semantic: {enabled: false}, redis_timeout_ms: 2000}",
    )  # fmt: skip
    redis_server_url = redis_server.url
    with redis_sync.Redis.from_url(redis_server_url) as client:  # closed: not left to the collector
        client.flushdb()  # fresh counters for this module
    root = Path(tmp_path_factory.mktemp("limits"))
    first = start_gateway(root / "a", policy, env={"REDIS_URL": redis_server_url})
    second = start_gateway(root / "b", policy, env={"REDIS_URL": redis_server_url})
    yield first, second
    first.stop()
    second.stop()


def _chat(
    gateway: GatewayProcess, key: str, model: str = "fast", content: str = "hi", **extra: object
) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
        headers={"authorization": f"Bearer key-{key}"},
        timeout=15,
    )


def _spend_budget(gateway: GatewayProcess, key: str, **extra: Any) -> None:
    """Requests until ``key``'s budget is refused as spent in Redis. A 429 for what requests in flight
    hold (the last one's settlement, sent after its answer, not yet landed) is no such word: once it
    lands the budget has room again (f208: a full Redis then refused its reservation, 503)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = _chat(gateway, key, **extra)
        if response.status_code == 429 and response.json()["error"]["code"] == "insufficient_quota":
            return
    raise AssertionError(f"{key}'s budget was not spent in 30 s")


def _burst(pair: tuple[GatewayProcess, GatewayProcess], key: str, count: int, **extra: Any) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(lambda i: _chat(pair[i % 2], key, content=f"req {i} {time.monotonic_ns()}", **extra), range(count))
        )


def test_requests_per_minute_hold_across_processes(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    responses = _burst(pair, "rpm", 24)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 14
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert (
        error["type"] == "rate_limit_error"
        and "key.rpm" in error["message"]
        and "10 requests per minute" in error["message"]
    )


def test_token_counts_are_free_but_bounded_by_their_own_requests_per_minute(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    """An outside tester kept counting 4 MB prompts with a key over every limit. Counting costs
    nothing (a zero budget does not stop it) but is work, so the key's rpm bounds it, in a
    window apart from messages as Anthropic's own count_tokens has."""
    clients = [
        closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="key-counter", max_retries=0))
        for gateway in pair
    ]  # closed: a socket left to the collector fails a later test with a ResourceWarning
    ask: dict[str, Any] = {"model": "fast", "messages": [{"role": "user", "content": "count me"}]}
    for index in range(3):
        assert clients[index % 2].messages.count_tokens(**ask).input_tokens > 0
    with pytest.raises(anthropic.RateLimitError) as refused:
        clients[1].messages.count_tokens(**ask)
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "key.rpm" in refused.value.message and int(refused.value.response.headers["retry-after"]) >= 1
    chat = _chat(pair[0], "counter")  # messages have their own window; this one meets the zero budget
    assert chat.status_code == 429 and "usd_per_day" in chat.json()["error"]["message"]
    other = closed_after_test(anthropic.Anthropic(base_url=pair[0].url, api_key="key-rpm", max_retries=0))
    assert other.messages.count_tokens(**ask).input_tokens > 0


def test_tokens_per_minute_reserve_the_estimate_while_in_flight(
    pair: tuple[GatewayProcess, GatewayProcess], small_upstream: SimulatedUpstream
) -> None:
    # In flight, each request holds prompt tokens + max_tokens (8 + 90): three fit in 300, the fourth does not.
    # Their answers' headers come at once and their bodies 3 s on: a 1.5 s delay raced small's 1 s
    # first-byte timeout, and the three were in flight for a timeout and a retry, not for the upstream.
    inject(small_upstream, *[{"stall_mid_body_ms": 3000}] * 3)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, pair[i % 2], "tpm", content=f"t{i}", max_tokens=90) for i in range(3)]
        # All three reserved and upstream, not a guessed 0.3 s: on a busy machine the fourth came
        # before the third (which was then refused), or after the first had settled (and fitted).
        deadline = time.monotonic() + 30
        while upstream_stats(small_upstream)["chat_requests"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        fourth = _chat(pair[1], "tpm", content="t3", max_tokens=90)
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    assert fourth.status_code == 429 and "key.tpm" in fourth.json()["error"]["message"]
    # After the answers, the reservation is replaced by the tokens really used, which leaves room again:
    # settlement runs in the background after each answer, so it is waited for (a refusal books nothing).
    deadline = time.monotonic() + 30
    while (again := _chat(pair[0], "tpm", content="t4", max_tokens=90)).status_code == 429:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.1)
    assert again.status_code == 200


def test_asking_for_n_answers_reserves_n_completions(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    """n answers write n completions: one request of n=4 x 90 tokens is over a tpm of 300 (an
    outside tester spent 50x a daily budget in one request with n=128)."""
    refused = _chat(pair[0], "tpm", content=f"n {time.monotonic_ns()}", max_tokens=90, n=4)
    assert refused.status_code == 429 and "key.tpm" in refused.json()["error"]["message"]
    time.sleep(0.2)
    assert _chat(pair[0], "tpm", content=f"n {time.monotonic_ns()}", max_tokens=90, n=2).status_code == 200


def test_daily_budget_is_never_overspent_under_concurrent_load(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    responses = _burst(pair, "budget", 40, max_tokens=20)
    refused = [r for r in responses if r.status_code == 429]
    spent = [r for r in refused if r.json()["error"]["type"] == r.json()["error"]["code"] == "insufficient_quota"]
    held = [r for r in refused if "held by requests in flight" in r.json()["error"]["message"]]
    assert refused and len(spent) + len(held) == len(refused)
    # spent: its retry-after is the next day, which SDKs would wait out: they are told not to retry
    assert all(r.headers["x-should-retry"] == "false" and int(r.headers["retry-after"]) > 0 for r in spent)
    # held by the estimates of requests in flight (t157): a short wait, retried
    assert all("x-should-retry" not in r.headers and r.headers["retry-after"] == "5" for r in held)
    assert all("key.usd_per_day" in r.json()["error"]["message"] for r in refused)
    # Settlement runs after each answer, and each worker's usage reaches Redis in its next batch
    # (max_lag_s): waited for, rather than a fixed 0.5 s that a loaded machine could outrun.
    usage = httpx.get(f"{pair[0].base_url}/usage", headers={"authorization": "Bearer key-budget"}).json()
    deadline = time.monotonic() + 30
    while usage["total"]["requests"] < len(responses) and time.monotonic() < deadline:
        time.sleep(0.2)
        usage = httpx.get(f"{pair[0].base_url}/usage", headers={"authorization": "Bearer key-budget"}).json()
    assert (usage["total"]["requests"], usage["total"]["errors"]) == (len(responses), len(refused))  # as the log says
    spent = usage["total"]["cost_usd"]
    assert 0 < spent <= 0.0005  # reservations are upper bounds (max_tokens), so the actual spend stays under
    assert usage["data"][0]["key_id"] == "budget"


def _held_until(redis: redis_sync.Redis, key: str, done: Callable[[float], bool], timeout_s: float = 30) -> float:
    """The key's budget held by requests in flight, once ``done`` says so (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = float(redis.hget(key, "hd") or 0)
        if done(held) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def test_a_budget_held_by_requests_in_flight_is_told_apart_from_one_spent(
    pair: tuple[GatewayProcess, GatewayProcess], small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """t157: the estimates slow requests reserve were told as spent: "$0.0197 is spent" of $0.02
    with ``x-should-retry: false`` and a Retry-After at midnight, while $0.0005 was, and the same
    request passed 3.5 s later. Held for requests in flight, a budget is a short wait the SDKs
    retry after; only a budget spent keeps the answer that waits for the next day."""
    # In flight, each request holds its estimate (8 prompt + 100 completion tokens, ~$0.000154):
    # three of them hold ~$0.00046 of $0.0005, and a fourth does not fit beside them. Slow bodies, not
    # slow headers: a 3 s delay is past small's 1 s first-byte timeout, and each request's retry then
    # took another's delay (timed out twice: a 504) or none (answered at once, its estimate released).
    inject(small_upstream, *[{"stall_mid_body_ms": 3000}] * 3)
    ask: dict[str, Any] = {"model": "cheap", "max_tokens": 100}
    redis = closed_after_test(redis_sync.Redis.from_url(redis_server.url))
    spend = keyspace.limit_counters("solo-inflight", "inflight")[1]
    client = closed_after_test(openai.OpenAI(base_url=pair[0].base_url, api_key="key-inflight", timeout=15))
    messages = closed_after_test(anthropic.Anthropic(base_url=pair[1].url, api_key="key-inflight", max_retries=0))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(_chat, pair[i % 2], "inflight", content=f"slow {i}", **ask) for i in range(3)]
        _held_until(redis, spend, lambda held: held > 0.0004)  # all three have reserved
        held = _chat(pair[1], "inflight", content="held", **ask)
        with pytest.raises(anthropic.RateLimitError) as told:  # in the caller's protocol
            messages.messages.create(messages=[{"role": "user", "content": "held"}], **ask)
        # the SDK retries after Retry-After (its default max_retries), by when the three have settled
        retried = pool.submit(
            lambda: client.chat.completions.create(messages=[{"role": "user", "content": "sdk"}], **ask)
        )
        assert [f.result().status_code for f in slow] == [200, 200, 200], [f.result().text for f in slow]
        assert retried.result().choices[0].message.content
    assert held.status_code == 429, held.text
    assert held.headers["retry-after"] == "5" and "x-should-retry" not in held.headers
    error = held.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "held by requests in flight" in error["message"] and "key.usd_per_day" in error["message"]
    assert "$0.0000 is spent" in error["message"]  # none of the three had settled yet
    assert told.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "held by requests in flight" in told.value.message
    assert told.value.response.headers["retry-after"] == "5" and "x-should-retry" not in told.value.response.headers
    # Spent (each answer reports its 100 completion tokens): nothing is in flight, and the refusal
    # waits for the next day, which the SDKs are told not to wait out.
    inject(small_upstream, *[{"usage": {"completion_tokens": 100}}] * 2)
    for index in range(2):
        assert _chat(pair[index], "inflight", content=f"spend {index}", **ask).status_code == 200
        _held_until(redis, spend, lambda held: held < 1e-9)  # settlement runs after each answer
    spent = _chat(pair[0], "inflight", content="spent", **ask)
    assert spent.status_code == 429, spent.text
    assert spent.json()["error"]["type"] == spent.json()["error"]["code"] == "insufficient_quota"
    assert spent.headers["x-should-retry"] == "false" and "in flight" not in spent.json()["error"]["message"]
    today_ends = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    assert abs(int(spent.headers["retry-after"]) - (today_ends - datetime.now(UTC)).total_seconds()) < 5


def test_requests_coalesced_on_one_in_flight_give_back_what_they_reserved(
    pair: tuple[GatewayProcess, GatewayProcess], small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """t162: identical requests waiting on one in flight each held a whole estimate until their
    end, though they were answered from its answer at $0; four held four estimates, and a fifth
    identical one was refused as held by requests in flight. Waiting, they hold nothing."""
    # each holds ~$0.000158 (a few prompt tokens, 100 completion ones) of $0.0005: three fit at once
    # its stream lasts ~8 s, past the twins' arrivals, and within its model's total (small's 5 s cut it)
    inject(small_upstream, {"chunk_delay_ms": 600})
    ask: dict[str, Any] = {"model": "unhurried", "max_tokens": 100}
    content = f"twins {time.monotonic_ns()}"
    window, spend = keyspace.limit_counters("solo-twins", "twins")[:2]
    client = closed_after_test(redis_sync.Redis.from_url(redis_server.url))

    def reserved() -> int:  # requests the key's rpm counted (the module starts on a flushed Redis)
        return sum(int(client.hget(window, field) or 0) for field in ("r", "rp"))

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        first = pool.submit(_chat, pair[0], "twins", content=content, stream=True, **ask)
        # it is upstream, not a guessed 0.5 s: the others wait on it, in its process and in the other one,
        # and its stream's seconds run from there, so the held estimate is read while it streams
        deadline = time.monotonic() + 30
        while upstream_stats(small_upstream)["chat_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        twins = []
        for index in range(4):
            # one at a time, each once the one before reserved and gave its estimate back, not every
            # 0.3 s: on a loaded machine two twins' estimates beside the leader's (three fit) and
            # a third one's were held together, and it was refused
            twins.append(pool.submit(_chat, pair[index % 2], "twins", content=content, **ask))
            deadline = time.monotonic() + 30
            while reserved() < index + 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            held = _held_until(client, spend, lambda held: held < 0.0002)  # while the leader streams
        responses = [first.result(), *(twin.result() for twin in twins)]
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert 0.0001 < held < 0.0002  # the leader's estimate alone
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in responses[1:])
    deadline = time.monotonic() + 30  # the usage batch of the requests that reserved nothing lands a while later
    while True:  # (a loaded CI machine once answered one look without a "total": each look must be whole)
        usage = httpx.get(f"{pair[0].base_url}/usage", headers={"authorization": "Bearer key-twins"}, timeout=30).json()
        if usage.get("total", {}).get("requests") == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert usage["total"]["requests"] == 5 and usage["total"]["cache_hits"] == 4, usage
    # nothing is held once they are answered, and one upstream call is what the key spent
    assert float(client.hget(spend, "hd") or 0) == 0.0
    assert 0 < float(client.hget(spend, "d") or 0) < 0.0002


def test_a_request_that_waited_on_a_twin_and_then_asks_upstream_itself_counts_once_in_rpm(
    pair: tuple[GatewayProcess, GatewayProcess], small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """f173: a request waiting on an identical one in flight gives its reservation back (t162);
    when the leader's client left and it called upstream itself, it reserved again and counted
    twice in its key's and tenant's rpm: of a key's 2 a minute, the second of two was refused."""
    inject(small_upstream, {"chunk_delay_ms": 300})  # the leader's stream lasts a few seconds
    content = f"once {time.monotonic_ns()}"
    body = {"model": "cheap", "max_tokens": 100, "messages": [{"role": "user", "content": content}], "stream": True}
    calls = upstream_stats(small_upstream)["chat_requests"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=15) as client:
        url, headers = f"{pair[0].base_url}/chat/completions", {"authorization": "Bearer key-once"}
        with client.stream("POST", url, json=body, headers=headers) as leader:
            assert leader.status_code == 200
            chunks = leader.iter_bytes()  # kept: a dropped iterator closes the response
            next(chunks)  # it is upstream, holding the lease
            twin = pool.submit(_chat, pair[0], "once", "cheap", content, max_tokens=100)
            time.sleep(0.5)  # the twin waits on it; then the leader's client leaves
        answered = twin.result()
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-gateway-cache"] == "miss"  # it asked upstream itself
    assert upstream_stats(small_upstream)["chat_requests"] == calls + 2
    redis = closed_after_test(redis_sync.Redis.from_url(redis_server.url))
    window, _, tenant_window, _ = keyspace.limit_counters("solo-once", "once")
    for counted in (window, tenant_window):
        requests = [int(redis.hget(counted, field) or 0) for field in ("r", "rp")]
        assert sum(requests) == 2, (counted, requests)  # this minute's and the last one's: one each


def test_a_request_begun_before_its_counter_moved_on_counts_in_its_own_month(
    pair: tuple[GatewayProcess, GatewayProcess], redis_server: EmbeddedRedis
) -> None:
    """f203: a request begun at 23:59:50 on December 31 that reserved after midnight wrote December
    over January's counter, and January's budget let 3.5 times itself through. Here the counter is
    a month ahead of the request (another worker's request begun after midnight reserved first):
    the request counts in its own month, kept beside the newer one, which is left as it was."""
    today = datetime.now(UTC).date()
    ahead = (today.replace(day=1) + timedelta(days=32)).replace(day=1)  # the next month's first day
    if (datetime.now(UTC) + timedelta(seconds=10)).date() != today:
        pytest.skip("too near midnight UTC: the request could begin in the next day")
    spend = keyspace.limit_counters("solo-late", "late")[1]
    redis = closed_after_test(redis_sync.Redis.from_url(redis_server.url))
    day, month = ahead.strftime("%Y%m%d").encode(), ahead.strftime("%Y%m").encode()
    redis.hset(spend, mapping={"day": day, "d": "0.0009", "month": month, "mo": "0.0009", "hd": "0", "hm": "0"})
    response = _chat(pair[0], "late", model="cheap", content=f"late {time.monotonic_ns()}", max_tokens=20)
    assert response.status_code == 200, response.text  # this month's budget is its own: nothing spent yet
    cost = float(response.headers["x-gateway-cost-usd"])
    deadline = time.monotonic() + 15  # settled after the answer
    while float(redis.hget(spend, "pd") or 0) != pytest.approx(cost) and time.monotonic() < deadline:
        time.sleep(0.05)
    counter = redis.hgetall(spend)
    assert [counter[name] for name in (b"day", b"d", b"month", b"mo")] == [
        day,
        b"0.0009",
        month,
        b"0.0009",
    ]  # untouched
    assert (counter[b"pday"], counter[b"pmonth"]) == (
        today.strftime("%Y%m%d").encode(),
        today.strftime("%Y%m").encode(),
    )
    assert cost > 0 and float(counter[b"pd"]) == float(counter[b"pmo"]) == pytest.approx(cost)
    assert float(counter[b"phd"]) == float(counter[b"phm"]) == 0.0  # settled: nothing held
    usage = httpx.get(f"{pair[1].base_url}/usage", headers={"authorization": "Bearer key-late"}).json()
    assert usage["total"]["cost_usd"] == pytest.approx(cost)  # filed on the day the counter counts it in


def test_tenant_limit_spans_its_keys(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    statuses = [_chat(pair[i % 2], "s1" if i % 3 else "s2", content=f"s{i}").status_code for i in range(9)]
    assert statuses.count(200) == 6
    last = _chat(pair[0], "s2", content="again")
    assert (
        last.status_code == 429
        and "tenant.rpm" in last.json()["error"]["message"]
        and "shared" in last.json()["error"]["message"]
    )


def test_nearly_spent_budget_downgrades_auto_to_the_small_model(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    models, again = [], None
    for i in range(12):
        response = _chat(pair[i % 2], "saver", model="costly", content=f"d{i}", max_tokens=10)
        if response.status_code != 200:
            break
        models.append(response.headers["x-gateway-model"])
        if again is None and models[-1] == "small":
            again = _chat(pair[i % 2], "saver", model="costly", content=f"d{i}", max_tokens=10)
        time.sleep(0.05)  # let settlement land
    # t61: the downgrade's answer is not the route's: cached, it was served for the cache's whole
    # ttl_s in place of the large model's, budget reset or not
    assert again is not None and again.headers["x-gateway-cache"] == "miss"
    assert models[0] == "large" and "small" in models  # large until 30% of the budget is spent, then small
    first_small = models.index("small")
    assert set(models[first_small:]) == {"small"}
    downgraded = [r for gw in pair for r in gw.log_records() if r["key_id"] == "saver" and r["model"] == "small"]
    assert downgraded and all(r["decision"] == "budget_downgrade" for r in downgraded)


def test_usage_is_per_key_unless_admin(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    own = httpx.get(f"{pair[1].base_url}/usage", headers={"authorization": "Bearer key-rpm"}).json()
    assert [row["key_id"] for row in own["data"]] == ["rpm"] and own["total"]["requests"] >= 10
    everyone = httpx.get(f"{pair[1].base_url}/usage", headers={"authorization": "Bearer key-admin"}).json()
    assert {"rpm", "tpm", "budget", "shared-1"} <= {row["key_id"] for row in everyone["data"]}
    assert (
        httpx.get(
            f"{pair[1].base_url}/usage?start=2026-13-01", headers={"authorization": "Bearer key-admin"}
        ).status_code
        == 400
    )
    assert httpx.get(f"{pair[1].base_url}/usage").status_code == 401


def _usage(gateway: GatewayProcess, key: str, start: date, end: date) -> httpx.Response:
    return httpx.get(
        f"{gateway.base_url}/usage",
        params={"start": start.isoformat(), "end": end.isoformat()},
        headers={"authorization": f"Bearer key-{key}"},
        timeout=15,
    )


def test_usage_refuses_days_no_longer_kept_and_counts_kept_ones_whole(
    pair: tuple[GatewayProcess, GatewayProcess], redis_server: EmbeddedRedis
) -> None:
    """t63: /v1/usage summed periods of up to 366 days over sums kept 92, each key deleting its own
    day -92 as it wrote: a 100-day total lost a day's spend after one new request, and said nothing.
    A start before the first day kept (`kept_since`) is refused, naming `gateway report`; the kept
    days are whole, and a write deletes its key's day only a day after that day left them."""
    import redis as redis_sync

    today = datetime.now(UTC).date()
    kept_since = today - timedelta(days=USAGE_RETENTION_DAYS - 1)
    seeded = dict(UsageFigures(requests=3, cost_usd=0.25).increments())
    days = {ago: kept_since - timedelta(days=ago) for ago in (0, 1, 2)}  # kept, left today, left yesterday
    names = {ago: keyspace.usage("ledger", "ledger", day.strftime("%Y%m%d")) for ago, day in days.items()}
    with redis_sync.Redis.from_url(redis_server.url) as client:
        for pair_names in names.values():
            for name in pair_names:
                client.hset(name, mapping=seeded)
        refused = _usage(pair[0], "ledger", days[1], today)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "start"
        assert f"start must be {kept_since.isoformat()} or later" in error["message"]
        assert "ask the gateway's operator" in error["message"]  # t66: not a command a client cannot run
        assert _chat(pair[0], "ledger").status_code == 200  # writes today: deletes the key's day that left yesterday
        answer = _usage(pair[0], "ledger", kept_since, today)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["kept_since"] == kept_since.isoformat()
        assert (body["total"]["requests"], body["total"]["cost_usd"]) == (4, pytest.approx(0.25, abs=0.01))
        # the reading worker wrote its figures first: the day that left today is still there, so a
        # read begun before midnight and summed after it (or on a slower clock) counts it whole
        assert client.exists(*names[1]) == 2 and client.exists(*names[2]) == 0
    # an end far ahead is today's figures, and the date a client sends is echoed as sent
    ahead = _usage(pair[0], "ledger", today, date(9999, 12, 31)).json()
    assert (ahead["end"], ahead["total"]["requests"]) == ("9999-12-31", 1)
    ancient = _usage(pair[0], "ledger", date(1, 1, 1), today).json()["error"]["message"]
    assert "(got 0001-01-01)" in ancient


def _logged(pair: tuple[GatewayProcess, GatewayProcess], key_id: str) -> int:
    return sum(1 for gateway in pair for record in gateway.log_records() if record["key_id"] == key_id)


def test_report_until_a_date_counts_that_day_as_usage_end_does(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    """t63: `gateway report --until 2026-12-03` left out the 3rd, which /v1/usage?end=2026-12-03
    counts: finance reconciling the two with the same dates got different numbers."""
    gateway = pair[1]
    assert _chat(gateway, "ledger").status_code == 200
    today = datetime.now(UTC).date()
    usage = _usage(gateway, "ledger", today, today).json()["total"]["requests"]
    deadline = time.monotonic() + 30  # the log's lines are written by a background thread
    while _logged(pair, "ledger") < usage and time.monotonic() < deadline:
        time.sleep(0.05)
    day = today.isoformat()
    report = subprocess.run(
        [sys.executable, "-m", "gateway", "report", *(str(g.log_path) for g in pair), "--since", day, "--until", day,
         "--by", "key", "--format", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {row["key"]: row for row in json.loads(report.stdout)["rows"]}
    assert usage >= 1 and rows["ledger"]["requests"] == usage
    assert f"[{day}T00:00:00Z, {today + timedelta(days=1)}T00:00:00Z)" in report.stderr


def test_new_key_is_created_once_and_picked_up_without_restart(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    gateway = pair[0]
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "new", "--tenant", "newcomer", "--models", "fast", "--rpm", "5",
         "--policies", str(gateway.policy_path), "--data-dir", str(gateway.policy_path.parent / "data")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    secret = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("secret:"))
    stored = (gateway.policy_path.parent / "keys.yaml").read_text()
    assert secret not in stored and hash_key(secret) in stored
    deadline = time.monotonic() + 30
    status = 401
    while status == 401 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = httpx.post(
            f"{gateway.base_url}/chat/completions", json={"model": "fast", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {secret}"},
        ).status_code  # fmt: skip
    assert status == 200
    assert secret not in gateway.log_path.read_text() and secret not in gateway.stderr_text()


@pytest.mark.parametrize(("mode", "expected"), [("open", 200), ("closed", 503)])
def test_redis_down_fails_open_or_closed_by_policy(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream, mode: str, expected: int
) -> None:
    policy = policy_text(
        small_upstream,
        large_upstream,
        auth=KEYS,
        limits=f"max_body_bytes: 65536, on_redis_error: {mode}, redis_timeout_ms: 2000",
    )
    redis_url = f"redis://:pw-down@127.0.0.1:{free_port()}/0"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_url}, expect_ready=False)
    try:
        response = _chat(gateway, "rpm")
        assert response.status_code == expected
        if expected == 503:
            assert response.json()["error"]["code"] == "limiter_unavailable"
        assert _chat(gateway, "admin").status_code == 200  # no limits on this key or its tenant: nothing to check
    finally:
        stop_with_its_redis_back(gateway, redis_url, tmp_path / "redis")


@pytest.mark.parametrize(("mode", "expected"), [("open", 200), ("closed", 503)])
def test_a_full_redis_fails_open_or_closed_by_policy_and_never_past_a_spent_budget(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream, mode: str, expected: int
) -> None:
    """t116: a Redis whose memory is full is no longer down (its cache hits are served), but a
    reservation it cannot write is counted nowhere: ``on_redis_error`` decides, as with Redis down,
    and a budget Redis holds as spent is still refused."""
    server = start_embedded_redis(tmp_path / "redis")
    policy = policy_text(
        small_upstream,
        large_upstream,
        auth=KEYS,
        limits=f"max_body_bytes: 65536, on_redis_error: {mode}, redis_timeout_ms: 2000",
    )
    gateway = start_gateway(tmp_path / "gw", policy, env={"REDIS_URL": server.url})
    try:
        _spend_budget(gateway, "budget", max_tokens=20)
        with redis_sync.Redis.from_url(server.url) as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
        response = _chat(gateway, "rpm")
        assert response.status_code == expected, response.text
        if expected == 503:
            assert response.json()["error"]["code"] == "limiter_unavailable"
        assert _chat(gateway, "budget", max_tokens=20).status_code == 429
        assert _chat(gateway, "admin").status_code == 200  # no limits on this key or its tenant: nothing to check
        assert httpx.get(f"{gateway.url}/readyz", timeout=5).json()["redis"] == "full"
    finally:
        with redis_sync.Redis.from_url(server.url) as admin:
            admin.config_set("maxmemory", 0)  # the usage the gateway holds is written at its stop, not tried for 10 s
        gateway.stop()
        server.stop()


def test_with_redis_paused_a_keys_used_up_allowance_is_told_as_unchecked_and_retryable(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t127: a key this worker had no word on gets a tenth of its budget while Redis is away; once
    used, the refusal read "$0.4912 is spent" of $0.50 (the other nine tenths, never spent) with
    ``x-should-retry: false`` and a Retry-After at midnight, and those nine tenths downgraded it."""
    server = start_embedded_redis(tmp_path / "redis")
    auth = """auth:
  mode: keys
  key_file: keys.yaml
  keys:
    - {id: blind, tenant: blind, hash: "%s", limits: {usd_per_day: 0.005}}
tenants:
  blind: {downgrade_auto_at: 0.5}
""" % hash_key("key-blind")
    policy = policy_text(small_upstream, large_upstream, auth=auth, routes=ROUTES,
                         limits="max_body_bytes: 65536, on_redis_error: open, redis_timeout_ms: 200")  # fmt: skip
    gateway = start_gateway(tmp_path / "gw", policy, env={"REDIS_URL": server.url})
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-blind", max_retries=0, timeout=15))
    ask = client.chat.completions.with_raw_response.create
    os.kill(server.pid, signal.SIGSTOP)
    try:
        models: list[str] = []
        with pytest.raises(openai.APIStatusError) as refused:
            for i in range(40):  # a tenth of $0.005: a few requests of about $0.0002
                answer = ask(model="costly", messages=[{"role": "user", "content": f"b{i}"}], max_tokens=10)
                models.append(answer.headers["x-gateway-model"])
        assert 1 <= len(models) < 10 and set(models) == {"large"}  # nothing spent: no downgrade
        error = refused.value
        assert error.status_code == 503, error.response.text
        assert error.response.json()["error"]["code"] == "limiter_unavailable"
        assert "Redis" in error.message and "is spent" not in error.message
        assert "x-should-retry" not in error.response.headers
        assert 1 <= int(error.response.headers["retry-after"]) <= 10
        messages = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="key-blind", max_retries=0))
        with pytest.raises(anthropic.APIStatusError) as told:  # in the caller's protocol
            messages.messages.create(model="costly", max_tokens=10, messages=[{"role": "user", "content": "m"}])
        assert told.value.status_code == 503 and "Redis" in told.value.message
        assert "x-should-retry" not in told.value.response.headers and told.value.response.headers["retry-after"]
        threading.Timer(1.0, os.kill, (server.pid, signal.SIGCONT)).start()
        retrying = client.with_options(max_retries=2)  # the SDK waits out Retry-After, and Redis is back
        answer = retrying.chat.completions.with_raw_response.create(
            model="costly", messages=[{"role": "user", "content": "after"}], max_tokens=10
        )
        assert answer.http_response.status_code == 200
    finally:
        os.kill(server.pid, signal.SIGCONT)
        gateway.stop()
        server.stop()
