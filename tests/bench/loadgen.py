"""A small HTTP/1.1 load generator, cheap enough not to be the bottleneck on 2 cores.

Each connection is a raw keep-alive ``asyncio.open_connection`` (on uvloop when it is
importable). Requests are encoded once and written as bytes (a target may hold several
distinct requests, sent in turn, e.g. to miss a cache); responses are parsed as little
as possible: the status code, ``Content-Length`` (or chunked framing, or
read-until-close), ``Connection: close``, and optionally two headers: one collected as
a number (the gateway's ``x-gateway-overhead-ms``), one counted by value
(``x-gateway-cache``). One request is in flight per connection (no pipelining).
Latency is ``time.perf_counter_ns()`` from just before the write to the moment the
last body byte was read. Timeouts come from one watchdog per run rather than a timer
per request. On the 2-core development machine this costs roughly 35-50 us of CPU
per request: about 5 % of one core at 1,000 requests/s.

Two modes: :func:`run_sequential` (a fixed count on one connection, after a warm-up)
and :func:`run_closed_loop` (C connections, each sending its next request when the
previous answer is in, for a duration or until a total count).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "HttpTarget",
    "RunResult",
    "build_post",
    "event_loop_factory",
    "percentile",
    "run_closed_loop",
    "run_sequential",
]

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CONNECTION_CLOSE = b"\r\nconnection: close"
_MAX_CONSECUTIVE_ERRORS = 50
_RECONNECT_PAUSE_S = 0.05
_REQUEST_ERRORS = (OSError, TimeoutError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop if it is importable, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


@dataclass(frozen=True, slots=True)
class HttpTarget:
    host: str
    port: int
    payloads: tuple[bytes, ...]
    """Whole requests (head and body), encoded once, sent in turn."""
    number_header: bytes | None = None
    """Lower-case header name whose values are collected as floats, e.g. ``b"x-gateway-overhead-ms"``."""
    count_header: bytes | None = None
    """Lower-case header name whose values are counted, e.g. ``b"x-gateway-cache"``."""
    timeout_s: float = 30.0


def build_post(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A keep-alive ``POST`` with a JSON body, as bytes."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@dataclass(slots=True)
class RunResult:
    """What one measured run produced. Latencies are in nanoseconds."""

    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    header_numbers: list[float] = field(default_factory=list)
    header_counts: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    warmup_completed: int = 0
    aborted: str | None = None

    @property
    def completed(self) -> int:
        return len(self.latencies_ns)

    @property
    def non_200(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


def percentile(sorted_values: list[int] | list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


# ------------------------------------------------------------------ one connection


class _Response:
    __slots__ = ("counted", "number", "status")

    def __init__(self, status: int, number: bytes | None, counted: bytes | None) -> None:
        self.status = status
        self.number = number
        self.counted = counted


class _Connection:
    """One keep-alive connection with at most one request in flight.

    It reconnects lazily: after an error, or when the server answered
    ``Connection: close``, the next request opens a new socket.
    """

    __slots__ = ("_count_key", "_expired", "_number_key", "_reader", "_target", "_writer", "in_flight_since")

    def __init__(self, target: HttpTarget) -> None:
        self._target = target
        self._number_key = _header_key(target.number_header)
        self._count_key = _header_key(target.count_header)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.in_flight_since = 0.0  # perf_counter() of the request in flight, 0 when idle
        self._expired = False

    async def request(self, payload: bytes) -> _Response:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._target.host, self._target.port)
        reader, writer = self._reader, self._writer
        self.in_flight_since = time.perf_counter()
        try:
            writer.write(payload)
            response, keep_alive = await self._read_response(reader)
        except BaseException as exc:
            self.close(abort=True)
            if self._expired:
                self._expired = False
                raise TimeoutError(f"no complete response in {self._target.timeout_s} s") from exc
            raise
        finally:
            self.in_flight_since = 0.0
        if not keep_alive:
            self.close()
        return response

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[_Response, bool]:
        head = (await reader.readuntil(_HEAD_END)).lower()
        status = int(head[9:12])
        number = _header_value(head, self._number_key) if self._number_key else None
        counted = _header_value(head, self._count_key) if self._count_key else None
        keep_alive = _CONNECTION_CLOSE not in head
        length = _header_value(head, _CONTENT_LENGTH)
        if length is not None:
            if length != b"0":
                await reader.readexactly(int(length))
        elif b"chunked" in (_header_value(head, _TRANSFER_ENCODING) or b""):
            await _read_chunked(reader)
        elif status not in (204, 304) and status >= 200:
            await reader.read()  # no framing: the body ends when the server closes
            keep_alive = False
        return _Response(status, number, counted), keep_alive

    def expire_if_started_before(self, limit: float) -> None:
        """Abort the request in flight if it started before ``limit`` (see :func:`_watchdog`)."""
        if 0.0 < self.in_flight_since < limit and self._writer is not None:
            self._expired = True
            self._writer.transport.abort()

    def close(self, abort: bool = False) -> None:
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            if abort:
                writer.transport.abort()
            else:
                writer.close()


def _header_key(name: bytes | None) -> bytes:
    return b"\r\n" + name.lower() + b":" if name else b""


def _header_value(head: bytes, key: bytes) -> bytes | None:
    """The value of the header ``key`` (``b"\\r\\nname:"``) in a lower-cased head."""
    start = head.find(key)
    if start < 0:
        return None
    start += len(key)
    return head[start : head.index(b"\r\n", start)].strip()


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                pass
            return
        await reader.readexactly(size + 2)


async def _watchdog(pool: list[_Connection], timeout_s: float) -> None:
    """Times requests out about once a second; cheaper than a timer per request."""
    while True:
        await asyncio.sleep(min(1.0, timeout_s))
        limit = time.perf_counter() - timeout_s
        for connection in pool:
            connection.expire_if_started_before(limit)


@contextlib.asynccontextmanager
async def _watched(pool: list[_Connection], timeout_s: float) -> AsyncIterator[None]:
    task = asyncio.ensure_future(_watchdog(pool, timeout_s))
    try:
        yield
    finally:
        task.cancel()
        for connection in pool:
            connection.close()


# ------------------------------------------------------------------------ recording


@dataclass(slots=True)
class _Recorder:
    """Accumulates one run's figures; ``on_count`` is called every ``every`` completions."""

    result: RunResult
    every: int = 0
    on_count: Callable[[int], None] | None = None
    consecutive_errors: int = 0

    def ok(self, started_ns: int, response: _Response) -> None:
        result = self.result
        result.latencies_ns.append(time.perf_counter_ns() - started_ns)
        result.statuses[response.status] += 1
        self.consecutive_errors = 0
        if response.number is not None:
            result.header_numbers.append(float(response.number))
        if response.counted is not None:
            result.header_counts[response.counted.decode("latin-1")] += 1
        if self.on_count is not None and result.completed % self.every == 0:
            self.on_count(result.completed)

    def error(self, exc: BaseException) -> None:
        self.result.errors[type(exc).__name__] += 1
        self.consecutive_errors += 1
        if self.consecutive_errors >= _MAX_CONSECUTIVE_ERRORS and self.result.aborted is None:
            self.result.aborted = f"{self.consecutive_errors} consecutive errors, last: {type(exc).__name__}: {exc}"


async def _one(connection: _Connection, recorder: _Recorder, payload: bytes) -> None:
    started = time.perf_counter_ns()
    try:
        response = await connection.request(payload)
    except _REQUEST_ERRORS as exc:
        recorder.error(exc)
        await asyncio.sleep(_RECONNECT_PAUSE_S)
        return
    recorder.ok(started, response)


def _finish(recorder: _Recorder, warm: _Recorder, cpu0: float, t0: float) -> RunResult:
    result = recorder.result
    result.elapsed_s = time.perf_counter() - t0
    result.loadgen_cpu_s = time.process_time() - cpu0
    result.warmup_completed = warm.result.completed
    return result


def _aborted_in_warmup(warm: RunResult) -> RunResult:
    result = RunResult(statuses=warm.statuses, errors=warm.errors)
    result.aborted = f"during warm-up: {warm.aborted}"
    return result


# ----------------------------------------------------------------------------- modes


async def run_sequential(target: HttpTarget, count: int, warmup: int = 0) -> RunResult:
    """``warmup`` unrecorded requests, then ``count`` recorded ones, one at a time on one connection."""
    connection = _Connection(target)
    payloads = itertools.cycle(target.payloads)
    async with _watched([connection], target.timeout_s):
        warm = _Recorder(RunResult())
        for _ in range(warmup):
            await _one(connection, warm, next(payloads))
            if warm.result.aborted:
                return _aborted_in_warmup(warm.result)
        recorder = _Recorder(RunResult())
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            await _one(connection, recorder, next(payloads))
            if recorder.result.aborted:
                break
        return _finish(recorder, warm, cpu0, t0)


async def run_closed_loop(
    target: HttpTarget,
    connections: int,
    *,
    duration_s: float | None = None,
    total: int | None = None,
    warmup_s: float = 0.0,
    progress_every: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> RunResult:
    """``connections`` closed loops until ``duration_s`` has passed or ``total`` requests were sent.

    A warm-up of ``warmup_s`` on the same connections comes first, unrecorded.
    ``on_progress(completed)`` is called synchronously every ``progress_every`` completions.
    """
    if (duration_s is None) == (total is None):
        raise ValueError("give exactly one of duration_s and total")
    pool = [_Connection(target) for _ in range(connections)]
    payloads = itertools.cycle(target.payloads)
    async with _watched(pool, target.timeout_s):
        warm = _Recorder(RunResult())
        if warmup_s > 0:
            await _drive(pool, warm, payloads, time.perf_counter() + warmup_s, None)
            if warm.result.aborted:
                return _aborted_in_warmup(warm.result)
        recorder = _Recorder(RunResult(), progress_every or 1, on_progress if progress_every else None)
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + duration_s if duration_s is not None else None
        await _drive(pool, recorder, payloads, deadline, total)
        return _finish(recorder, warm, cpu0, t0)


async def _drive(
    pool: list[_Connection], recorder: _Recorder, payloads: Iterator[bytes], deadline: float | None, total: int | None
) -> None:
    started = [0]  # requests started so far, shared by the loops (one thread: no lock needed)

    async def loop(connection: _Connection) -> None:
        result = recorder.result
        while result.aborted is None:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if total is not None:
                if started[0] >= total:
                    return
                started[0] += 1
            await _one(connection, recorder, next(payloads))

    await asyncio.gather(*(loop(connection) for connection in pool))
