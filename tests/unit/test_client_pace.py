"""ClientPace: a slow client is read ahead of; only one far behind that takes nothing is cut."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections import deque
from collections.abc import Callable

import pytest

from gateway import client_pace
from gateway.client_pace import ClientPace
from gateway.config.schema import Timeouts
from gateway.core import model as core
from gateway.errors import ClientStalled
from gateway.pipeline import _piece_size
from gateway.upstreams.base import ChatStream


class _Upstream(ChatStream):
    """``count`` pieces of 100 bytes (None: for ever), each after a pause."""

    def __init__(self, count: int | None) -> None:
        super().__init__()
        self.left = count
        self.read = 0
        self.closed = False

    async def __anext__(self) -> bytes:
        await asyncio.sleep(0.001)
        if self.closed or self.left == 0:
            raise StopAsyncIteration
        if self.left is not None:
            self.left -= 1
        self.read += 1
        return b"%099d" % self.read

    async def aclose(self) -> None:
        self.closed = True


def _pace(upstream: _Upstream, stalls: deque[float], *, idle: float = 0.05, total: float = 30) -> ClientPace[bytes]:
    timeouts = Timeouts(idle=idle, total=total)
    return ClientPace(upstream, upstream.__anext__, len, timeouts, time.perf_counter(), lambda: stalls.append(1))


async def _until(done: Callable[[], bool]) -> None:
    """Until ``done`` says so (10 s at most): the upstream's pieces come each after a 1 ms sleep,
    whose wake-ups a loaded machine delays, so a fixed 0.5 s could end before fifty of them."""
    deadline = asyncio.get_running_loop().time() + 10
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "not within 10 s"
        await asyncio.sleep(0.01)


async def _rest(pace: ClientPace[bytes]) -> list[bytes]:
    pieces = []
    while True:
        try:
            pieces.append(await pace.next())
        except StopAsyncIteration:
            return pieces


async def test_a_slow_client_is_read_ahead_of_and_gets_every_piece_in_order() -> None:
    upstream, stalls = _Upstream(50), deque[float]()
    pace = _pace(upstream, stalls)
    first = await pace.next()
    pace.offer()
    await asyncio.sleep(0.5)  # the client takes nothing for ten idle timeouts: a slow link
    await _until(lambda: upstream.left == 0 or bool(stalls))
    assert upstream.left == 0 and not upstream.closed and not stalls  # the upstream was read to its end meanwhile
    pace.taken()
    assert [first, *await _rest(pace)] == [b"%099d" % n for n in range(1, 51)]
    assert not stalls
    await pace.aclose()


async def test_a_client_far_behind_that_takes_nothing_lets_the_upstream_go_and_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_pace, "READ_AHEAD_BYTES", 1000)  # ten pieces
    upstream, stalls = _Upstream(None), deque[float]()
    pace = _pace(upstream, stalls)
    await pace.next()
    pace.offer()
    await _until(lambda: upstream.closed)
    assert 10 <= upstream.read <= 12  # read ahead to the cap, then let go
    assert list(stalls) == [1]  # settled and logged without waiting for the client
    with pytest.raises(ClientStalled):
        pace.taken()
    await pace.aclose()


async def test_a_client_that_takes_nothing_after_the_end_is_settled_at_the_total_timeout() -> None:
    upstream, stalls = _Upstream(5), deque[float]()
    pace = _pace(upstream, stalls, total=1.0)  # 0.3 s was 0.15 s from the look below
    await pace.next()
    pace.offer()
    await asyncio.sleep(0.3)
    assert upstream.left == 0 and not stalls  # all read; the client holds memory only, for now
    await _until(lambda: bool(stalls))
    assert list(stalls) == [1]
    await pace.aclose()


async def test_a_client_that_keeps_up_reads_the_upstream_itself() -> None:
    upstream, stalls = _Upstream(20), deque[float]()
    pace = _pace(upstream, stalls)
    pieces = []
    while True:
        try:
            piece = await pace.next()
        except StopAsyncIteration:
            break
        pace.offer()
        pieces.append(piece)
        pace.taken()
    assert len(pieces) == 20 and not stalls and pace._reader is None  # no task was needed
    await pace.aclose()


async def test_the_time_events_wait_on_the_client_is_timed_and_the_upstreams_is_not() -> None:
    """t151: what the stream waited on its client counted as the gateway's own overhead."""
    upstream, stalls = _Upstream(3), deque[float]()
    pace = _pace(upstream, stalls)
    await pace.next()
    pace.offer()
    await asyncio.sleep(0.2)
    assert pace.client_wait() >= 0.19  # the event out now counts (a client that stalls or leaves)
    pace.taken()
    waited = pace.client_wait()
    await asyncio.sleep(0.1)
    assert pace.client_wait() == waited  # no event is out: not the client's time
    await _rest(pace)
    pace.hand_last()  # the usage or [DONE]: timed, not watched
    await asyncio.sleep(0.2)
    pace.taken()
    assert pace.client_wait() >= waited + 0.19 and not stalls
    await pace.aclose()


@pytest.mark.parametrize("kind", ["text", "tool", "bytes"])
def test_read_ahead_bound_counts_what_pieces_really_hold(kind: str) -> None:
    """The bound is in bytes of memory: short deltas (a token each) hold far more than their text."""

    def piece(i: int) -> bytes | list[core.Delta]:
        if kind == "bytes":
            return b"data: " + b"%d" % i * 20 + b"\n\n"
        if kind == "tool":
            return [core.ToolArgumentsDelta(index=0, fragment=f'"k{i}"')]
        return [core.TextDelta(f" w{i % 997}")]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = deque(piece(i) for i in range(20_000))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = sum(_piece_size(p) for p in held)
    assert 0.8 < counted / used < 1.25, (counted, used)
