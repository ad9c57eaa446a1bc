"""Coalescing on the memory store: one request calls upstream, the others get its answer."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.cache import exact
from gateway.cache.entries import CachedAnswer
from gateway.cache.exact import LEADER_LEFT, ExactCache, Lease
from gateway.cache.keys import exact_key
from gateway.core.model import Answer
from gateway.errors import UpstreamError, UpstreamStatusError
from gateway.protocols.openai_chat import read_chat_request
from gateway.store.memory import MemoryKeyValue

T = 1.0
Joined = tuple[CachedAnswer | UpstreamError | None, Lease | None]


def _answer(text: str) -> CachedAnswer:
    return CachedAnswer(answer=Answer(id="", model="m", text=text), model="m", provider="p", prompt_tokens=1, completion_tokens=1,
                        cost_usd=0.0, created_at=0.0)  # fmt: skip


async def test_waiters_in_another_process_get_the_leaders_answer() -> None:
    shared = MemoryKeyValue()
    here, there = ExactCache(shared), ExactCache(shared)  # two gateway processes, one store
    answer, lease = await here.join_or_lead("k", 2.0, T)
    assert answer is None and lease is not None and lease.held_in_store
    waiter = asyncio.create_task(there.join_or_lead("k", 2.0, T))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await here.put("k", _answer("the answer"), 60, T)
    await here.release(lease, _answer("the answer"), T)
    got, no_lease = await waiter
    assert isinstance(got, CachedAnswer) and got.answer.text == "the answer" and no_lease is None


async def test_a_leader_that_fails_lets_the_waiters_go_at_once() -> None:
    shared = MemoryKeyValue()
    here, there = ExactCache(shared), ExactCache(shared)
    _, lease = await here.join_or_lead("k", 5.0, T)
    assert lease is not None
    waiter = asyncio.create_task(there.join_or_lead("k", 5.0, T))
    await asyncio.sleep(0.05)
    await here.release(lease, None, T)
    got, _ = await asyncio.wait_for(waiter, 1.0)  # not the whole 5 s
    assert got is None


async def _until_dropped(store: MemoryKeyValue, key: str) -> None:
    """Until the store no longer holds ``key``'s lease (within 10 s, a third of the leases' 30 s): a
    fixed 0.7 s was 0.2 s past the drop's retry, which a stalled loop could reach with it still due."""
    deadline = asyncio.get_running_loop().time() + 10
    while (await store.peek(key, T))[1]:
        assert asyncio.get_running_loop().time() < deadline, "the lease was left to expire"
        await asyncio.sleep(0.02)


async def _one_leads_and_the_rest_wait(waiters: list[asyncio.Task[Joined]]) -> tuple[Lease, set[asyncio.Task[Joined]]]:
    """The one waiter that leads once its leader went, and the others, still waiting 0.6 s on: the
    first is awaited, not expected within a fixed 0.5-0.6 s that a stalled loop could outrun."""
    done, pending = await asyncio.wait(waiters, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    more, pending = await asyncio.wait(pending, timeout=0.6)  # no other leads meanwhile
    leads = [lease for task in done | more if (lease := task.result()[1]) is not None]
    assert len(leads) == 1 and len(pending) == len(waiters) - 1, (done, more)
    return leads[0], pending


async def _leader_and_waiters(cache: ExactCache, count: int) -> tuple[Lease, list[asyncio.Task[Joined]]]:
    """One request leading on key ``k``, and ``count`` identical ones waiting on it in this process."""
    _, lease = await cache.join_or_lead("k", 2.0, T)
    assert lease is not None
    waiters = [asyncio.create_task(cache.join_or_lead("k", 2.0, T)) for _ in range(count)]
    await asyncio.sleep(0)
    return lease, waiters


async def _three_waiters_told(outcome: CachedAnswer | UpstreamStatusError) -> list[object]:
    """What three requests waiting in this process on one leader get, when it ends with ``outcome``."""
    cache = ExactCache(MemoryKeyValue())
    lease, waiters = await _leader_and_waiters(cache, 3)
    await cache.release(lease, outcome, T)
    return [(await waiter)[0] for waiter in waiters]


async def test_waiters_in_the_same_process_share_one_future() -> None:
    shared = _answer("shared")
    assert await _three_waiters_told(shared) == [shared] * 3


async def test_waiters_in_the_same_process_are_told_the_leaders_upstream_error() -> None:
    # Else each waiter calls the failing upstream itself, all at once: 32 calls for 16
    # identical requests, each waiting twice as long (an outside tester).
    failure = UpstreamStatusError("small", 503, "overloaded")
    assert await _three_waiters_told(failure) == [failure] * 3


async def test_without_a_store_the_request_answers_alone() -> None:
    store = MemoryKeyValue()
    store.down = True
    cache = ExactCache(store)
    answer, lease = await cache.join_or_lead("k", 2.0, T)
    assert answer is None and lease is not None and not lease.held_in_store
    await cache.put("k", _answer("x"), 60, T)  # no error: a cache that cannot store is a later miss
    await cache.release(lease, None, T)


def test_one_request_written_two_ways_has_one_key() -> None:
    text = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}
    parts = {
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0.0, "max_completion_tokens": 8, "stream": True,
    }  # fmt: skip
    assert _key("t", text) == _key("t", parts)
    assert _key("t", text) != _key("t", {**text, "temperature": 0.5})
    cached = {**parts, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]}
    assert _key("t", text) != _key("t", cached)  # a part with more than text is kept as written
    assert _key("t", text) != _key("u", text)
    assert _key("t", text) != _key("t", {**text, "logit_bias": {"1": 5}})  # a field the model has no name for
    defaults = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0, "logprobs": False}
    assert _key("t", text) == _key("t", {**text, **defaults})  # the API's defaults, sent or not
    assert _key("t", text) != _key("t", {**text, "presence_penalty": 0.5})
    assert _key("t", text) != _key("t", {**text, "logprobs": True})


def test_end_user_and_prompt_cache_ids_are_not_part_of_the_key() -> None:
    """They change no answer, as ``user`` does not; a Responses client's are carried as a chat
    client's now (t48), which must not split its cache by end user."""
    text: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ids = {"user": "u-1", "safety_identifier": "u-1", "prompt_cache_key": "session-1"}
    assert _key("t", text) == _key("t", {**text, **ids})


def test_anthropic_betas_are_part_of_the_key() -> None:
    """A beta changes what the model may do: a request sent with one is not the one sent without."""
    request = read_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    with_beta = msgspec.structs.replace(request, betas="context-1m-2025-08-07")
    two = msgspec.structs.replace(request, betas="interleaved-thinking-2025-05-14, context-1m-2025-08-07")
    same_two = msgspec.structs.replace(request, betas="context-1m-2025-08-07,interleaved-thinking-2025-05-14")
    keys = {exact_key("t", "r", r) for r in (request, with_beta, two)}
    assert len(keys) == 3 and exact_key("t", "r", two) == exact_key("t", "r", same_two)


def _key(tenant: str, body: dict[str, object]) -> str:
    return exact_key(tenant, "r", read_chat_request(body))


async def test_when_the_leaders_client_leaves_one_waiter_leads_and_the_others_wait_on_it() -> None:
    """Not every waiter calling upstream at once (a herd of identical calls)."""
    cache = ExactCache(MemoryKeyValue())
    lease, waiters = await _leader_and_waiters(cache, 5)
    await cache.release(lease, LEADER_LEFT, T)
    await asyncio.sleep(0.05)
    leaders = [waiter for waiter in waiters if waiter.done()]
    assert len(leaders) == 1
    answer, new_lease = leaders[0].result()
    assert answer is None and new_lease is not None and new_lease.held_in_store
    assert new_lease.waited and not lease.waited  # its wait is upstream time, not overhead (t70)
    await cache.release(new_lease, _answer("the answer"), T)
    rest = [await waiter for waiter in waiters if waiter is not leaders[0]]
    assert [(a.answer.text if isinstance(a, CachedAnswer) else a, lease) for a, lease in rest] == [
        ("the answer", None)
    ] * 4


async def test_a_lease_the_store_could_not_be_told_to_drop_is_dropped_once_it_answers() -> None:
    """Left to expire, every identical request in every process would wait out its ~30 s."""
    shared = MemoryKeyValue()
    cache = ExactCache(shared)
    _, lease = await cache.join_or_lead("k", 30.0, T)
    assert lease is not None
    shared.down = True
    await cache.put("k", _answer("an answer"), 60, T, lease)
    shared.down = False
    assert (await shared.peek("k", T))[1]  # still held in the store
    await _until_dropped(shared, "k")


class _SlowLocks(MemoryKeyValue):
    async def acquire(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        await asyncio.sleep(0.2)
        return await super().acquire(key, token, ttl_ms, timeout_s)


async def test_a_request_cancelled_while_it_takes_the_lead_leaves_no_flight_behind() -> None:
    """t33: its client left while it asked the store for the lease; the flight stayed, and every
    later identical request waited its whole wait_s (30 s) before it went upstream alone."""
    shared = _SlowLocks()
    cache, other_process = ExactCache(shared), ExactCache(shared)
    leaving = asyncio.create_task(cache.join_or_lead("k", 30.0, T))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(cache.join_or_lead("k", 30.0, T))  # came while the first took the lead
    await asyncio.sleep(0.05)
    leaving.cancel()
    answer, lease = await asyncio.wait_for(waiting, 5)  # leads in turn, at once
    assert answer is None and lease is not None
    await cache.release(lease, None, T)
    await _until_dropped(shared, "k")  # the lease the store may have granted the one that left is dropped too
    answer, lease = await asyncio.wait_for(other_process.join_or_lead("k", 30.0, T), 5)
    assert answer is None and lease is not None and lease.held_in_store
    await other_process.release(lease, None, T)


class _LateReplies(MemoryKeyValue):
    """Grants a lease at once, and answers late: a client that leaves meanwhile holds a lease it never hears of."""

    async def acquire(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        granted = await super().acquire(key, token, ttl_ms, timeout_s)
        await asyncio.sleep(0.2)
        return granted


async def test_a_leader_that_left_after_the_store_granted_its_lease_hands_over_to_one_waiter() -> None:
    """t34: the waiter taking over found the lease still held, and told every other waiter to go
    upstream on its own: 8 waiters made 8 upstream calls instead of 1."""
    cache = ExactCache(_LateReplies())
    leaving = asyncio.create_task(cache.join_or_lead("k", 5.0, T))
    await asyncio.sleep(0.05)
    waiters = [asyncio.create_task(cache.join_or_lead("k", 5.0, T)) for _ in range(8)]
    await asyncio.sleep(0.05)
    leaving.cancel()
    lead, pending = await _one_leads_and_the_rest_wait(waiters)  # the others wait on the one that leads now
    await cache.release(lead, _answer("the one answer"), T)
    answers = [(await task)[0] for task in pending]
    assert all(isinstance(a, CachedAnswer) and a.answer.text == "the one answer" for a in answers)


async def test_when_another_process_leader_goes_without_an_answer_one_waiter_here_leads() -> None:
    """t35: its lease freed with no answer in the cache, every waiter in the other process was
    told to call upstream on its own: 12 calls for one burst instead of 2."""
    shared = MemoryKeyValue()
    here, there = ExactCache(shared), ExactCache(shared)
    _, leaders_lease = await there.join_or_lead("k", 5.0, T)
    assert leaders_lease is not None and leaders_lease.held_in_store
    waiters = [asyncio.create_task(here.join_or_lead("k", 5.0, T)) for _ in range(8)]
    await asyncio.sleep(0.05)
    await there.release(leaders_lease, LEADER_LEFT, T)  # its client left: no answer
    lead, pending = await _one_leads_and_the_rest_wait(waiters)
    assert lead.waited and not leaders_lease.waited  # its wait is upstream time, not overhead (t70)
    await here.release(lead, _answer("one call"), T)
    answers = [(await task)[0] for task in pending]
    assert all(isinstance(answer, CachedAnswer) for answer in answers)


class _Watched(MemoryKeyValue):
    """Says when a process first looks for another's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.peeked = asyncio.Event()

    async def peek(self, key: str, timeout_s: float) -> tuple[bytes | None, bool]:
        self.peeked.set()
        return await super().peek(key, timeout_s)


async def test_when_the_store_fails_while_waiting_on_another_process_one_waiter_here_leads() -> None:
    """t74: Redis gone while 8 identical requests here waited on another process's lease, each was
    told to call upstream on its own: 7 upstream calls for 8 requests instead of 1."""
    shared = _Watched()
    here, there = ExactCache(shared), ExactCache(shared)
    _, leaders_lease = await there.join_or_lead("k", 30.0, T)
    assert leaders_lease is not None and leaders_lease.held_in_store
    waiters = [asyncio.create_task(here.join_or_lead("k", 30.0, T)) for _ in range(8)]
    await shared.peeked.wait()  # waiting on the other process's answer
    shared.down = True  # Redis killed mid-wait
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    leads = [lease for task in done if (lease := task.result()[1]) is not None]
    assert len(leads) == 1 and not leads[0].held_in_store and leads[0].waited
    await here.release(leads[0], _answer("one call"), T)
    answers = [(await task)[0] for task in waiters if task not in done]
    assert len(answers) == 7 and all(isinstance(a, CachedAnswer) and a.answer.text == "one call" for a in answers)


class _Renewals(MemoryKeyValue):
    """Counts the renewals of each key's lease."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals: dict[str, int] = {}

    async def renew(self, key: str, token: str, ttl_ms: int, timeout_s: float) -> bool:
        self.renewals[key] = self.renewals.get(key, 0) + 1
        return await super().renew(key, token, ttl_ms, timeout_s)


async def test_a_leader_renews_its_lease_only_while_its_request_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead leader's lease lapses for want of renewals; a live one's must not, and a request
    answered before the first renewal is due costs the store nothing more than before."""
    monkeypatch.setattr(exact, "_RENEW_S", 0.05)
    store = _Renewals()
    cache = ExactCache(store)
    _, quick = await cache.join_or_lead("quick", 30.0, T)
    assert quick is not None
    await cache.put("quick", _answer("at once"), 60, T, quick)
    _, slow = await cache.join_or_lead("slow", 30.0, T)
    _, failed = await cache.join_or_lead("failed", 30.0, T)
    assert slow is not None and failed is not None
    await asyncio.sleep(0.3)
    await cache.put("slow", _answer("slowly"), 60, T, slow)
    await cache.release(failed, None, T)
    renewed = dict(store.renewals)
    await asyncio.sleep(0.2)
    assert store.renewals == renewed and "quick" not in renewed  # none before it was due, none after
    assert renewed["slow"] >= 2 and renewed["failed"] >= 2
    assert (quick.renewal, slow.renewal, failed.renewal) == (None, None, None)


class _SlowReleases(MemoryKeyValue):
    async def release(self, key: str, token: str, timeout_s: float) -> None:
        await asyncio.sleep(0.2)
        await super().release(key, token, timeout_s)


async def test_the_waiters_are_told_even_when_the_leaders_release_is_cut_short() -> None:
    """A release cancelled in its round trip (t95) left the flight behind: every later identical
    request waited its whole wait_s on it."""
    cache = ExactCache(_SlowReleases())
    lease, waiters = await _leader_and_waiters(cache, 2)
    releasing = asyncio.create_task(cache.release(lease, LEADER_LEFT, T))
    await asyncio.sleep(0.05)
    releasing.cancel()
    done, _ = await asyncio.wait(waiters, timeout=1, return_when=asyncio.FIRST_COMPLETED)  # not the whole 2 s
    (leading,) = done
    answer, taken = leading.result()
    assert answer is None and taken is not None and taken.held_in_store  # the store's lease was dropped too
    await cache.release(taken, _answer("its answer"), T)
    (other,) = set(waiters) - done
    got, _ = await asyncio.wait_for(other, 1)  # the other waited on the new leader
    assert isinstance(got, CachedAnswer) and got.answer.text == "its answer"
