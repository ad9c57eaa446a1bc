"""ChatPipeline in process: cache, coalescing, limits, fallbacks and streams, on the memory store."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway import client_pace
from gateway import pipeline as pipeline_module
from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestRecord, request_line
from gateway.cache.exact import ExactCache
from gateway.cache.semantic import SemanticCache
from gateway.drain import Drain
from gateway.pipeline import ChatPipeline, StreamingAnswer
from gateway.reporting.aggregate import Aggregator
from gateway.tokens import count_prompt, count_text
from tests.unit.conftest import POLICY, Harness, MakeHarness, answer_of


async def test_a_repeated_question_is_answered_from_the_exact_cache(harness: Harness) -> None:
    status, first, headers = answer_of(await harness.ask("What is the capital of France?"))
    assert status == 200 and headers["x-gateway-cache"] == "miss"
    assert first["choices"][0]["message"]["content"] == "small says: ?ecnarF fo latipac eht si tahW"
    status, second, headers = answer_of(await harness.ask("What is the capital of France?"))
    assert headers["x-gateway-cache"] == "exact"
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["id"] != first["id"]  # a hit is its own response
    assert harness.upstream.calls_to("small") == 1


@pytest.mark.parametrize(
    ("text", "finish", "stream"),
    [("", "content_filter", False), ("", "stop", False), ("half an answer", None, True), ("", "content_filter", True)],
)
async def test_an_answer_that_is_not_one_is_never_cached(
    harness: Harness, text: str, finish: str | None, stream: bool
) -> None:
    # What one call got (a filter's empty stop, a stream that never said why it ended), not the answer to the prompt.
    harness.upstream.ending = (text, finish)
    for _ in range(2):
        answer = await harness.ask("filtered or cut", stream=stream)
        if isinstance(answer, StreamingAnswer):
            assert answer.headers["x-gateway-cache"] == "miss"
            async for _ in answer.events:
                pass
        else:
            assert answer_of(answer)[2]["x-gateway-cache"] == "miss"
    assert harness.upstream.calls_to("small") == 2


@pytest.mark.parametrize(("finish", "whole"), [("stop", True), (None, False)])
async def test_a_stream_closed_without_done_is_whole_if_the_model_had_finished(
    harness: Harness, finish: str | None, whole: bool
) -> None:
    harness.upstream.omit_done = True
    harness.upstream.ending = ("all of it", finish)
    answer = await harness.ask("no done line", stream=True, stream_options={"include_usage": True})
    assert isinstance(answer, StreamingAnswer)
    events = [event async for event in answer.events]
    assert (events[-1] == b"data: [DONE]\n\n") is whole
    assert any(b'"error"' in event for event in events) is not whole
    if whole:
        usage = msgspec.json.decode(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 3  # the upstream's usage ("all of it": 3 words), not a recount


async def test_no_cache_reads_fresh_and_no_store_leaves_nothing(harness: Harness) -> None:
    answer_of(await harness.ask("hello", cache_control="no-store"))
    assert answer_of(await harness.ask("hello"))[2]["x-gateway-cache"] == "miss"
    assert (
        answer_of(await harness.ask("hello", cache_control="no-cache"))[2]["x-gateway-cache"] == "bypass"
    )  # not looked up
    assert harness.upstream.calls_to("small") == 3


async def test_one_tenants_answer_is_never_served_to_another(harness: Harness) -> None:
    answer_of(await harness.ask("the shared question", key="alice"))
    _, _, headers = answer_of(await harness.ask("the shared question", key="bob"))
    assert headers["x-gateway-cache"] == "miss"
    assert harness.upstream.calls_to("small") == 2


async def test_identical_requests_in_flight_call_the_upstream_once(harness: Harness) -> None:
    results = await asyncio.gather(*(harness.ask("a popular question") for _ in range(5)))
    caches = sorted(answer_of(result)[2]["x-gateway-cache"] for result in results)
    assert harness.upstream.calls_to("small") == 1
    assert caches.count("miss") == 1


async def test_identical_requests_waiting_on_one_that_fails_upstream_are_told_its_error(harness: Harness) -> None:
    harness.upstream.fail("small", 400, times=10)  # a request the upstream refuses: so it would again
    harness.upstream.delay_s = 0.05  # the others arrive while the first is still asking
    results = await asyncio.gather(*(harness.ask("refused for everyone") for _ in range(5)))
    assert [answer_of(result)[0] for result in results] == [400] * 5
    assert harness.upstream.calls_to("small") == 1  # not once per waiter


async def test_a_failing_model_falls_back_to_the_next(harness: Harness) -> None:
    harness.upstream.fail("small", 503, times=10)
    status, body, headers = answer_of(await harness.ask("anyone there?"))
    assert status == 200 and body["model"] == "large"
    assert headers["x-gateway-model"] == "large"


async def test_a_client_error_is_not_retried_on_another_model(harness: Harness) -> None:
    harness.upstream.fail("small", 400)
    status, body, _ = answer_of(await harness.ask("malformed for the upstream"))
    assert status == 400 and "failing" in body["error"]["message"]
    assert body["error"]["param"] == "messages"  # the upstream's, passed on
    assert harness.upstream.calls_to("large") == 0


async def test_a_rate_limit_refuses_with_429_and_retry_after(harness: Harness) -> None:
    for i in range(2):
        assert answer_of(await harness.ask(f"question {i}", key="capped"))[0] == 200
    status, body, headers = answer_of(await harness.ask("one too many", key="capped"))
    assert status == 429 and "key.rpm" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 120  # until the sliding window has room again


async def test_a_huge_max_tokens_is_estimated_at_the_context_window_not_refused_as_over_budget(
    harness: Harness,
) -> None:
    # 10**9 tokens at $15 per million "may cost up to $15,000" and was refused as an exhausted
    # budget (a 429 no retry could pass); no model writes past its window (8,192 here: $0.12).
    status, _, _ = answer_of(await harness.ask("a short question", key="roomy", max_tokens=10**9))
    assert status == 200


async def test_a_budget_refuses_before_the_upstream_is_called(harness: Harness) -> None:
    status, body, headers = answer_of(await harness.ask("word " * 200, key="frugal", max_tokens=500))
    assert status == 429 and "key.usd_per_day" in body["error"]["message"]
    # its estimate alone passes the whole budget: no retry can pass, none is invited (t200)
    assert body["error"]["code"] == "request_too_large_for_budget" and headers["x-should-retry"] == "false"
    assert harness.upstream.calls == []


async def test_a_budget_prices_a_request_at_the_dearest_model_it_may_end_at(make_harness: MakeHarness) -> None:
    # fast is small (0.5/1.5 per million) with large (5/15) behind it: with small down, a budget
    # priced at small's rate was overspent 4 times over by large's answers
    harness = await make_harness(POLICY.replace("usd_per_day: 0.00001", "usd_per_day: 0.001"))
    status, body, _ = answer_of(await harness.ask("hi", key="frugal", model="fast", max_tokens=100))
    assert status == 429 and "key.usd_per_day" in body["error"]["message"]  # 100 tokens of large: $0.0015
    assert harness.upstream.calls == []
    status, _, _ = answer_of(await harness.ask("hi", key="frugal", model="fast", max_tokens=10))
    assert status == 200


async def test_a_request_that_ends_past_midnight_is_on_its_first_day_in_usage_and_report(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t114 (f107): the budget and ``/v1/usage`` count a request on the UTC day it started, and its
    log line, written when its answer ended, was reported on the next: on January 31st, February's."""
    started = datetime(2026, 1, 31, 23, 59, 59, 500000, tzinfo=UTC)
    clock = [started.timestamp()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    harness.upstream.on_call = lambda: clock.__setitem__(0, clock[0] + 1.0)  # it answers after midnight
    with capture_logs() as logs:
        assert answer_of(await harness.ask("a slow answer", key="roomy"))[0] == 200
        await asyncio.sleep(0)  # the line and the settlement follow the answer
    await harness.limiter.drain()
    (event,) = [line for line in logs if line["event"] == "request"]
    record = msgspec.convert({name: event[name] for name in RequestRecord.__struct_fields__}, RequestRecord)
    line = msgspec.json.decode(request_line(record))  # as the writer writes it, now
    assert (line["ts"][:10], line["started_at"]) == ("2026-02-01", "2026-01-31T23:59:59.500000Z")
    await harness.limiter.ledger.flush()
    day = started.replace(hour=0, minute=0, second=0, microsecond=0)
    usage = await harness.limiter.ledger.read([("roomy", "team-e")], day, day)
    aggregator = Aggregator()
    aggregator.feed([msgspec.json.encode(line)])
    ((reported_day,), reported), *later = aggregator.rows(("day",))
    assert usage is not None and usage["roomy", "team-e"].requests == 1
    assert (reported_day, reported.requests, later) == ("2026-01-31", 1, [])
    assert reported.cost_usd == pytest.approx(usage["roomy", "team-e"].cost_usd) and reported.cost_usd > 0


async def test_a_store_outage_bypasses_the_cache_and_still_answers(harness: Harness) -> None:
    harness.store.kv.down = True  # type: ignore[attr-defined]
    harness.store.vectors.down = True  # type: ignore[attr-defined]
    status, _, headers = answer_of(await harness.ask("while the cache is down"))
    assert status == 200 and headers["x-gateway-cache"] == "bypass"


async def test_an_unknown_key_is_a_401_and_calls_nothing(harness: Harness) -> None:
    status, body, _ = answer_of(await harness.ask("hi", key="mallory"))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert harness.upstream.calls == []


async def test_a_stream_is_relayed_and_then_served_from_the_cache(harness: Harness) -> None:
    result = await harness.ask("stream me", stream=True, stream_options={"include_usage": True})
    assert isinstance(result, StreamingAnswer)
    events = [chunk async for chunk in result.events]
    data = b"".join(events).split(b"\n\n")
    payloads = [msgspec.json.decode(line[6:]) for line in data if line.startswith(b"data: {")]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert text.strip() == "small says: em maerts"
    assert payloads[-1]["usage"]["completion_tokens"] > 0
    assert data[-2] == b"data: [DONE]"
    await harness.limiter.drain()
    again = await harness.ask("stream me", stream=True)
    assert isinstance(again, StreamingAnswer) and again.headers["x-gateway-cache"] == "exact"
    assert harness.upstream.calls_to("small") == 1


@pytest.mark.parametrize("client", ["keeps_up", "slow", "cut"])
async def test_a_streams_state_is_freed_when_it_ends_not_at_the_next_full_collection(
    make_harness: MakeHarness, client: str
) -> None:
    """f205: the relay's stall callback and its pace held each other, as did the pace and the end
    it read ahead to, and the exchange and the error it failed on (their tracebacks' frames hold
    them), so a stream's exchange and its answer's text (14 MB for a long one) waited for the cycle
    collector's next full pass: a worker's RSS grew 28 MiB per such stream."""
    harness = await make_harness(POLICY.replace("tier: small}", "tier: small, timeouts: {idle: 0.05}}"))
    if client == "cut":  # past 64 Ki characters, all one max_tokens allows: cut as broken
        harness.upstream.ending = ("word " * 20_000, "stop")
    gc.collect()
    gc.disable()  # what outlives its stream now is held by a reference cycle, not yet collected
    try:
        result = await harness.ask(
            "stream me", stream=True, max_tokens=1, stream_options={"include_usage": True}, started=time.perf_counter()
        )
        assert isinstance(result, StreamingAnswer)
        events = aiter(result.events)
        await anext(events)
        if client == "slow":  # the rest is read ahead of it, to the upstream's end
            await asyncio.sleep(0.3)
        rest = b"".join([event async for event in events])
        assert (b"upstream_bad_response" in rest) is (client == "cut")
        await harness.limiter.drain()
        await asyncio.sleep(0)  # the request's accounting, scheduled as its stream ended
        del result, events
        held = [o for o in gc.get_objects() if isinstance(o, pipeline_module._Exchange)]
    finally:
        gc.enable()
    assert held == []


async def test_a_tenants_requests_in_flight_are_held_to_its_max_concurrent(make_harness: MakeHarness) -> None:
    """t26: one tenant's slow streams held every connection of the pool, and another's requests
    waited, then went to the fallback at its price. A cap keeps each tenant's share."""
    harness = await make_harness(POLICY.replace("  team-b: {}", "  team-b: {limits: {max_concurrent: 2}}"))
    first = await harness.ask("first long story", key="bob", stream=True)
    second = await harness.ask("second long story", key="bob", stream=True)
    assert isinstance(first, StreamingAnswer) and isinstance(second, StreamingAnswer)
    status, body, headers = answer_of(await harness.ask("a third at once", key="bob"))
    assert status == 429 and body["error"]["code"] == "concurrency_limit_exceeded" and headers["retry-after"] == "1"
    assert "tenant.max_concurrent" in body["error"]["message"]
    assert answer_of(await harness.ask("another tenant", key="alice"))[0] == 200  # team-a has no cap
    async for _ in first.events:  # the first answer is out: its place is free
        pass
    assert answer_of(await harness.ask("now there is room", key="bob"))[0] == 200
    del second  # its client left before a byte was read: the place comes back all the same
    gc.collect()
    third = await harness.ask("third long story", key="bob", stream=True)
    fourth = await harness.ask("fourth long story", key="bob", stream=True)
    assert isinstance(third, StreamingAnswer) and isinstance(fourth, StreamingAnswer)
    for stream in (third, fourth):
        async for _ in stream.events:
            pass


def _held_release(harness: Harness) -> tuple[asyncio.Event, asyncio.Event]:
    """The store's lease release waits for the test: (the release began, let it go on)."""
    began, go_on = asyncio.Event(), asyncio.Event()
    kv = harness.store.kv
    release = kv.release

    async def held(key: str, token: str, timeout_s: float) -> None:
        began.set()
        await go_on.wait()
        await release(key, token, timeout_s)

    kv.release = held  # type: ignore[method-assign]
    return began, go_on


async def _cancelled(task: asyncio.Task[Any], at: asyncio.Event, go_on: asyncio.Event) -> None:
    """Cancel ``task`` as the edge does when its client hangs up (``Task.cancel()``), once it waits
    at ``at``; then let it go on, and wait for its end and its accounting."""
    async with asyncio.timeout(5):
        await at.wait()
    task.cancel()
    await asyncio.sleep(0.01)  # the cancellation lands before the wait ends
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # each request is accounted for just after its answer


async def test_a_client_leaving_while_a_failed_requests_lease_is_released_gives_its_place_back(
    make_harness: MakeHarness,
) -> None:
    """t95: the client hung up while the failed request's coalescing lease was released (a Redis
    round trip); the cancellation cut that await short through its anyio shield, and the request
    was never logged nor gave back its place: under ``max_concurrent: 1`` the tenant got 429s until
    a restart."""
    harness = await make_harness(POLICY.replace("  team-b: {}", "  team-b: {limits: {max_concurrent: 1}}"))
    harness.upstream.fail("small", 400)
    began, go_on = _held_release(harness)
    with capture_logs() as logs:
        task = asyncio.create_task(harness.ask("refused, then left", key="bob"))
        await _cancelled(task, began, go_on)
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["error_type"], line["tenant"]) == (499, "client_disconnected", "team-b")
    harness.upstream.delay_s = 0.05
    started = asyncio.get_running_loop().time()
    status, _, headers = answer_of(await harness.ask("refused, then left", key="bob"))  # its twin was not kept waiting
    assert status == 200 and headers["x-gateway-cache"] == "miss"  # the place came back
    assert asyncio.get_running_loop().time() - started < 1  # the coalescing wait is 2 s
    assert harness.upstream.calls_to("small") == 2


async def test_a_client_leaving_while_a_streams_lease_is_released_is_logged(make_harness: MakeHarness) -> None:
    """The same for a stream: its end (upstream let go, lease released, line logged) was cut short."""
    harness = await make_harness(POLICY.replace("  team-b: {}", "  team-b: {limits: {max_concurrent: 1}}"))
    harness.upstream.ending = ("", "content_filter")  # not stored: the lease is released at the stream's end
    began, go_on = _held_release(harness)

    async def read(answer: StreamingAnswer) -> None:
        async for _ in answer.events:
            pass

    with capture_logs() as logs:
        answer = await harness.ask("stream, then leave", key="bob", stream=True)
        assert isinstance(answer, StreamingAnswer)
        await _cancelled(asyncio.create_task(read(answer)), began, go_on)
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["stream"], line["tenant"]) == (200, True, "team-b")  # it had the whole answer
    assert answer_of(await harness.ask("next", key="bob"))[0] == 200


async def test_a_second_cancellation_while_a_left_requests_prompt_is_counted_still_bills_it(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompt of a request whose client left once it was sent is billed (t43), counted off the
    event loop when long: a second cancellation then (the drain's deadline after the client's
    leaving) cut the count short, and the request was logged as a 200 with no bill."""
    harness = await make_harness(POLICY + "limits: {long_prompt_chars: 10}\n")
    counting, go_on = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def held(request: Any, encoding: str, **kinds: Any) -> int:
        loop.call_soon_threadsafe(counting.set)
        go_on.wait(5)
        return count_prompt(request, encoding, **kinds)

    monkeypatch.setattr(pipeline_module, "count_prompt", held)
    harness.upstream.delay_s = 5
    with capture_logs() as logs:
        task = asyncio.create_task(harness.ask("a prompt longer than ten characters", cache_control="no-store"))
        while not harness.upstream.calls:  # sent: what the client leaves now is billed
            await asyncio.sleep(0.01)
        task.cancel()
        async with asyncio.timeout(5):
            await counting.wait()
        task.cancel()
        await asyncio.sleep(0.01)
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["error_type"]) == (499, "client_disconnected")
    assert line["prompt_tokens"] > 0 and line["cost_usd"] > 0


def _threads_counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads the pipeline counts answers' text in, as it counts them."""
    counted_in: list[str] = []

    def where(text: str, encoding: str) -> int:
        counted_in.append(threading.current_thread().name)
        return count_text(text, encoding)

    monkeypatch.setattr(pipeline_module, "count_text", where)
    return counted_in


@pytest.mark.parametrize("leaves", [False, True])
async def test_a_long_answer_the_gateway_counts_is_counted_off_the_event_loop(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch, leaves: bool
) -> None:
    """t110: a stream of 41M tokens, counted at its cut on the event loop, held every other request
    for 26 s. An answer longer than ``long_prompt_chars`` is counted in a thread, as a prompt is:
    one cut short by its upstream (no finish), and one whose client left."""
    harness = await make_harness(POLICY + "limits: {long_prompt_chars: 10}\n")
    harness.upstream.ending = ("an answer longer than ten characters, cut short", None)
    counted_in = _threads_counting(monkeypatch)
    with capture_logs() as logs:
        answer = await harness.ask("count me", stream=True, cache_control="no-store")
        assert isinstance(answer, StreamingAnswer)
        events = cast(AsyncGenerator[bytes, None], answer.events)
        if leaves:
            for _ in range(6):  # the role, then "an answer longer than ten"
                await anext(events)
            await events.aclose()  # the client hung up
        else:
            last = [event async for event in events][-1]  # no finish: the answer may be cut (t143)
            assert last.startswith(b'data: {"error"') and b"without a finish reason" in last
        await asyncio.sleep(0)  # logged just after the answer went out
    (line,) = [line for line in logs if line["event"] == "request"]
    assert line["status"] == (499 if leaves else 502)
    assert line["completion_tokens"] >= 5  # at least the gateway's count of what came
    assert counted_in and threading.current_thread().name not in counted_in


async def test_a_stalled_clients_long_answer_is_counted_off_the_event_loop(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t191: a client that stopped reading was settled at its cut from the pace's timer, so what
    it was sent was counted on the event loop (14 MB of a 1M-token model's answer held every
    tenant's requests for 0.5 s). It is counted in a thread, as any long answer is (t110), and
    the request is still logged once, as the 408 the client is told in-band."""
    policy = POLICY.replace("tier: small}", "tier: small, timeouts: {idle: 0.05}}")
    harness = await make_harness(policy + "limits: {long_prompt_chars: 10}\n")
    harness.upstream.ending = ("an answer longer than ten characters that the client never takes", "stop")
    monkeypatch.setattr(client_pace, "READ_AHEAD_BYTES", 1)  # a piece read ahead is the most: cut at the idle timeout
    counted_in = _threads_counting(monkeypatch)
    with capture_logs() as logs:
        answer = await harness.ask("count me", stream=True, cache_control="no-store")
        assert isinstance(answer, StreamingAnswer)
        events = cast(AsyncGenerator[bytes, None], answer.events)
        for _ in range(4):  # the role, then "an answer longer"
            await anext(events)
        async with asyncio.timeout(5):  # the client takes nothing more: cut at the idle timeout
            while not [line for line in logs if line["event"] == "request"]:
                await asyncio.sleep(0.01)
        rest = [event async for event in events]
        await asyncio.sleep(0)
    assert rest and b"client_stalled" in rest[-1]  # told in-band once it reads again
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["error_type"]) == (408, "client_stalled")
    assert line["completion_tokens"] >= 3 and line["cost_usd"] > 0
    assert counted_in and threading.current_thread().name not in counted_in


async def test_a_stalled_clients_count_is_waited_for_at_the_workers_end(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stalled request's count, in a thread (t191), is its bill and its log line: the worker's
    end waits for it, past the drain's deadline, and the client's hanging up meanwhile logs nothing more."""
    policy = POLICY.replace("tier: small}", "tier: small, timeouts: {idle: 0.05}}")
    harness = await make_harness(policy + "limits: {long_prompt_chars: 10}\n")
    harness.pipeline = ChatPipeline(
        harness.holder, Metrics(), ExactCache(harness.store.kv), SemanticCache(harness.store.vectors, None),
        harness.limiter, None, drain=Drain(0.01),
    )  # fmt: skip
    harness.upstream.ending = ("an answer longer than ten characters that the client never takes", "stop")
    monkeypatch.setattr(client_pace, "READ_AHEAD_BYTES", 1)
    counting, go_on = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def held(text: str, encoding: str) -> int:
        loop.call_soon_threadsafe(counting.set)
        go_on.wait(5)
        return count_text(text, encoding)

    monkeypatch.setattr(pipeline_module, "count_text", held)

    async def client() -> None:  # a task of its own, as a server's request is: done once it hangs up
        answer = await harness.ask("count me", stream=True, cache_control="no-store")
        assert isinstance(answer, StreamingAnswer)
        events = cast(AsyncGenerator[bytes, None], answer.events)
        for _ in range(4):
            await anext(events)
        async with asyncio.timeout(5):
            await counting.wait()
        await events.aclose()  # the client hangs up while it is counted

    with capture_logs() as logs:
        await asyncio.create_task(client())
        closing = asyncio.create_task(harness.pipeline.aclose())
        await asyncio.sleep(0.1)  # past the drain's deadline
        assert not closing.done() and not [line for line in logs if line["event"] == "request"]
        go_on.set()
        async with asyncio.timeout(5):
            await closing
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["error_type"]) == (408, "client_stalled")
    assert line["completion_tokens"] >= 3 and line["cost_usd"] > 0


@pytest.mark.parametrize(("authorization", "key", "tenant"), [("Bearer sk-bob", "bob", "team-b"), (None, "-", "-")])
async def test_a_405_is_logged_as_its_keys_refusal(
    harness: Harness, authorization: str | None, key: str, tenant: str
) -> None:
    """t191: a model endpoint's 405 wrote no request line; it writes one, its key's when it has a good one."""
    with capture_logs() as logs:
        harness.pipeline.refused_method(authorization, "req-405", "anthropic.messages", time.perf_counter())
        await asyncio.sleep(0)  # logged just after
    (line,) = [line for line in logs if line["event"] == "request"]
    assert (line["request_id"], line["status"], line["error_type"]) == ("req-405", 405, "invalid_request_error")
    assert (line["key_id"], line["tenant"], line["protocol"], line["cost_usd"]) == (
        key,
        tenant,
        "anthropic.messages",
        0,
    )
