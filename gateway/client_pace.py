"""A client that stops reading a stream must not hold its upstream.

Upstream reads are bounded by the model's ``timeouts`` (``UpstreamEvents``), but while the
gateway waits for a client that takes no bytes (a full TCP window) no read happens, and the
upstream connection, and the model's slot, stayed taken until the client hung up: a tenant
could hold a model's whole connection pool that way. :class:`ClientPace` gives each event
handed to the client the model's ``idle`` timeout (at most what is left of ``total``); past
it, the upstream stream is closed, and the stream ends as :class:`ClientStalled`.
The pipeline calls :meth:`ClientPace.offer` before each ``yield`` and :meth:`ClientPace.taken`
after it.
"""

from __future__ import annotations

import asyncio
import time

from gateway.config.schema import Timeouts
from gateway.errors import GatewayError
from gateway.upstreams.base import ChatStream

__all__ = ["ClientPace", "ClientStalled"]


class ClientStalled(GatewayError):
    """The client took no event for the model's idle timeout: the upstream was let go."""

    status_code = 408
    error_type = "timeout_error"
    code = "client_stalled"


class ClientPace:
    """One timer per stream, re-armed only when it fires (a timer per event cost 5 us)."""

    def __init__(self, stream: ChatStream, timeouts: Timeouts, started: float) -> None:
        self._stream = stream
        self._idle_s = timeouts.idle
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ends = loop.time() + timeouts.total - (time.perf_counter() - started)
        self._since: float | None = None
        """When the event the client has not taken yet was handed over (None: none is out)."""
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None

    def offer(self) -> None:
        """Just before an event is handed to the client (a ``yield``)."""
        self._since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(min(since + self._idle_s, self._ends), self._check)

    def taken(self) -> None:
        """The client asked for the next event; raises :class:`ClientStalled` when it came too late."""
        self._since = None
        if self._closing is not None:
            raise ClientStalled(f"the client took no event for {self._idle_s:g}s; the upstream was released")

    async def aclose(self) -> None:
        """Stop watching; wait for the upstream's closing, when this let it go."""
        if self._timer is not None:
            self._timer.cancel()
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # the client is keeping up: the next handing over arms the timer again
        due = min(since + self._idle_s, self._ends)
        if self._loop.time() >= due:
            self._closing = self._loop.create_task(self._stream.aclose())
        else:
            self._timer = self._loop.call_at(due, self._check)
