"""Coalescing across processes on a real Redis 8 when the leading request's process dies or its
upstream is slow: the lease of a dead leader lapses within seconds, a live one's is kept."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.accounting.metrics import Metrics
from gateway.cache import exact
from gateway.cache.entries import CachedAnswer
from gateway.cache.exact import ExactCache, Lease
from gateway.core.model import Answer
from gateway.errors import UpstreamError
from gateway.services.redis_server import EmbeddedRedis
from gateway.store import keyspace
from gateway.store.redis import SharedRedis, connect, redis_store

T = 1.0
Joined = tuple[CachedAnswer | UpstreamError | None, Lease | None]
_ROOT = Path(__file__).parents[2]
_LEAD_AND_HANG = """
import asyncio, sys
from gateway.accounting.metrics import Metrics
from gateway.cache.exact import ExactCache
from gateway.store.redis import SharedRedis, connect, redis_store

async def main() -> None:
    cache = ExactCache(redis_store(SharedRedis(connect(sys.argv[1], timeout_s=2), Metrics())).kv)
    _, lease = await cache.join_or_lead(sys.argv[2], 30.0, 1.0)
    print("led" if lease is not None and lease.held_in_store else "did not lead", flush=True)
    await asyncio.sleep(3600)  # its upstream call, until the process is killed

asyncio.run(main())
"""


@pytest.fixture
async def processes(redis_server: EmbeddedRedis) -> AsyncIterator[Callable[[], ExactCache]]:
    """Gateway processes' exact caches: each its own connections to the one Redis."""
    opened: list[SharedRedis] = []

    def process() -> ExactCache:
        opened.append(SharedRedis(connect(redis_server.url, timeout_s=2), Metrics()))
        return ExactCache(redis_store(opened[-1]).kv)

    yield process
    for shared in opened:
        await shared.aclose()


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[Joined]]]:
    """Requests' tasks, cancelled at the end should a test fail while they wait."""
    started: list[asyncio.Task[Joined]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


def _key(label: str) -> str:
    return keyspace.exact(f"leases-{uuid.uuid4().hex[:8]}", label)


def _answer(text: str) -> CachedAnswer:
    return CachedAnswer(answer=Answer(id="", model="m", text=text), model="m", provider="p", prompt_tokens=1,
                        completion_tokens=1, cost_usd=0.0, created_at=0.0)  # fmt: skip


async def test_when_the_leaders_process_is_killed_one_waiter_leads_within_seconds(
    redis_server: EmbeddedRedis, processes: Callable[[], ExactCache], tasks: list[asyncio.Task[Joined]]
) -> None:
    """t97: the lease lasted the whole wait (31 s) whether or not its holder lived, so after a
    worker was killed every identical request, on every worker (the client's own retry of the
    request that died included), waited 20-33 s for an answer that would never come."""
    key = _key("dead")
    leader = subprocess.Popen([sys.executable, "-c", _LEAD_AND_HANG, redis_server.url, key],
                              cwd=_ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "led"
    finally:
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        if leader.stdout is not None:
            leader.stdout.close()
    here, there = processes(), processes()
    waiters = [asyncio.create_task(cache.join_or_lead(key, 30.0, T)) for cache in (here, there)]
    tasks.extend(waiters)
    done, pending = await asyncio.wait(waiters, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    leads = [lease for task in done if (lease := task.result()[1]) is not None]
    assert len(leads) == 1 and leads[0].held_in_store and leads[0].waited, done  # one calls upstream, not both
    assert len(pending) == 1  # the other waits on it
    leading = here if waiters[0] in done else there
    await leading.put(key, _answer("one call"), 60, T, leads[0])
    answer, no_lease = await asyncio.wait_for(pending.pop(), 5)
    assert isinstance(answer, CachedAnswer) and answer.answer.text == "one call" and no_lease is None


async def test_a_live_leader_slower_than_its_lease_keeps_it_and_its_waiters(
    processes: Callable[[], ExactCache], tasks: list[asyncio.Task[Joined]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is short, so it is renewed while its request waits on its upstream: else a
    waiter elsewhere would see it lapse and call upstream again for the same answer."""
    # renewed 0.9 s before it would lapse: a loaded machine that ran the renewal 200 ms late (of a
    # 300 ms lease renewed every 0.1 s) let it lapse, and a waiter led
    monkeypatch.setattr(exact, "_LEASE_MS", 1000)
    monkeypatch.setattr(exact, "_RENEW_S", 0.1)
    key = _key("slow")
    leader, elsewhere = processes(), processes()
    _, lease = await leader.join_or_lead(key, 30.0, T)
    assert lease is not None and lease.held_in_store
    waiters = [asyncio.create_task(elsewhere.join_or_lead(key, 30.0, T)) for _ in range(3)]
    tasks.extend(waiters)
    await asyncio.sleep(3)  # its upstream call: three times the lease
    led: list[Lease] = [lease for task in waiters if task.done() and (lease := task.result()[1]) is not None]
    assert led == [] and not any(task.done() for task in waiters)
    await leader.put(key, _answer("the slow answer"), 60, T, lease)
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert [(a.answer.text if isinstance(a, CachedAnswer) else a, got) for a, got in answers] == [
        ("the slow answer", None)
    ] * 3
    assert lease.renewal is None  # no renewal left behind
