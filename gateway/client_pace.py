"""A slow client must not hold its upstream, and a stalled one must not hold it at all.

Upstream reads are bounded by the model's ``timeouts`` (``UpstreamEvents``), but while the
gateway waits for a client that takes no bytes (a full TCP window) no read happens, and the
upstream connection, and the model's slot, stay taken: a tenant could hold a model's whole
connection pool that way. The time one event takes to go out says little about the client,
though: the kernel's send buffer (megabytes) lets the writer go only once much of it drained,
so a client reading steadily over a slow link can leave one event waiting for a minute.

So :class:`ClientPace` reads ahead of a client that is slow to take an event: the upstream
goes on into memory (up to :data:`READ_AHEAD_BYTES`) and is released when the answer ends,
however slowly the client reads it. Only a client this far behind that takes nothing for the
model's ``idle`` timeout holds the upstream; then the upstream is let go (as it is past
``total``), the request is settled and logged at once (``on_stall``), and the stream ends as
:class:`ClientStalled`. A client that takes nothing for ``total`` after the answer ended is
settled the same way: it holds only memory by then.

The pipeline reads the upstream through :meth:`ClientPace.next` and calls
:meth:`ClientPace.offer` before each ``yield`` and :meth:`ClientPace.taken` after it
(:meth:`ClientPace.hand_last` before the events after the answer's end): what the yields took
is :meth:`ClientPace.client_wait`, not the gateway's overhead (t151).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

from gateway.config.schema import Timeouts
from gateway.errors import ClientStalled
from gateway.upstreams.base import ChatStream

__all__ = ["READ_AHEAD_BYTES", "ClientPace"]

READ_AHEAD_BYTES = 8 << 20
"""What one stream may read ahead of its client, at most."""

Piece = TypeVar("Piece")
Event = TypeVar("Event")


def _closed() -> None:
    """What a closed pace holds in place of its ``on_stall``."""


class ClientPace(Generic[Piece]):
    """One timer per stream, re-armed only when it fires (a timer per event cost 5 us)."""

    def __init__(
        self,
        stream: ChatStream,
        read: Callable[[], Awaitable[Piece]],
        size: Callable[[Piece], int],
        timeouts: Timeouts,
        started: float,
        on_stall: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._read = read
        self._size = size
        self._on_stall = on_stall
        self._idle_s = timeouts.idle
        self._total_s = timeouts.total
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ends = loop.time() + timeouts.total - (time.perf_counter() - started)
        self._since: float | None = None
        """When the event the client has not taken yet was handed over (None: none is out)."""
        self._waited = 0.0
        """Seconds the events taken were out, from their handing over to the client's asking for more."""
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._ahead: deque[Piece] = deque()
        self._ahead_bytes = 0
        self._reader: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._ended: BaseException | None = None
        """How the upstream ended once read ahead to its end: StopAsyncIteration, or its error."""

    async def next(self) -> Piece:
        """The upstream's next piece: read ahead already, or read now (StopAsyncIteration at the end)."""
        while True:
            if self._ahead:
                piece = self._ahead.popleft()
                self._ahead_bytes -= self._size(piece)
                # From memory, and with a send() that returns at once once the client has left, the
                # relay would never pause: let the client's leaving (its cancellation) land.
                await asyncio.sleep(0)
                return piece
            if self._ended is not None:
                raise self._ended
            if self._reader is None:
                return await self._read()
            self._arrived.clear()
            await self._arrived.wait()

    def offer(self) -> None:
        """Just before an event is handed to the client (a ``yield``)."""
        self._since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(min(since + self._idle_s, self._ends), self._check)

    def hand_last(self) -> None:
        """Just before an event after the answer's end (its usage, ``[DONE]``) is handed over:
        timed, no longer watched (:meth:`taken` after it)."""
        self.stop()
        self._since = self._loop.time()

    def hand_over_last(self, events: Iterable[Event]) -> Iterator[Event]:
        """The events after the answer's end, each timed as :meth:`hand_last` and :meth:`taken` time it."""
        for event in events:
            self.hand_last()
            yield event
            self.taken()

    def taken(self) -> None:
        """The client asked for the next event; raises :class:`ClientStalled` when it came too late."""
        since = self._since
        if since is not None:
            self._waited += self._loop.time() - since
            self._since = None
        if self._closing is not None:
            raise ClientStalled(f"the client took nothing for {self._idle_s:g}s; the upstream was released")

    def client_wait(self) -> float:
        """Seconds the stream waited on its client: from each event's handing over to the server
        until it asked for the next (the write, and any wait for a client slow to take the
        bytes), the event out now included."""
        since = self._since
        return self._waited if since is None else self._waited + self._loop.time() - since

    def stop(self) -> None:
        """Stop watching: the client is gone (a stall found while its request is settled would
        settle it again, as a 408)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self) -> None:
        """Stop watching and reading ahead; wait for the upstream's closing, when this let it go."""
        self.stop()
        # Nothing stalls or is read now. The caller's on_stall closes over what holds this pace, and
        # the end read ahead to holds, in its traceback's frames, this pace and the caller's: cycles
        # that kept a stream's answer in memory until the collector's next full pass (f205).
        self._on_stall = _closed
        try:
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)
        finally:
            self._ended = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None or self._closing is not None:
            return  # the client is keeping up: the next handing over arms the timer again
        now = self._loop.time()
        if self._ended is not None:  # the whole answer is read: the client holds memory, not the upstream
            due = since + self._total_s
        elif self._ahead_bytes < READ_AHEAD_BYTES and now < self._ends:
            if self._reader is None:  # slow: the upstream goes on into memory
                self._reader = self._loop.create_task(self._read_ahead())
            self._timer = self._loop.call_at(min(now + self._idle_s, self._ends), self._check)
            return
        else:
            due = min(since + self._idle_s, self._ends)
        if now < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._closing = self._loop.create_task(self._stream.aclose())
        self._on_stall()

    async def _read_ahead(self) -> None:
        try:
            while self._ahead_bytes < READ_AHEAD_BYTES:
                piece = await self._read()
                self._ahead.append(piece)
                self._ahead_bytes += self._size(piece)
                self._arrived.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the end, or the upstream's error: each comes after what was read
            self._ended = exc
        finally:
            self._reader = None
            self._arrived.set()
