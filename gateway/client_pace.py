"""A client that stops reading a stream must not hold its upstream.

Upstream reads are bounded by the model's ``timeouts`` (``UpstreamEvents``), but while the
gateway waits for a client that takes no bytes (a full TCP window) no read happens, and the
upstream connection, and the model's slot, stayed taken until the client hung up: a tenant
could hold a model's whole connection pool that way. :class:`ClientPace` gives each event
handed to the client the model's ``idle`` timeout (at most what is left of ``total``); past
it, the upstream stream is closed, and the stream ends as :class:`ClientStalled`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
    def __init__(self, stream: ChatStream, timeouts: Timeouts, started: float) -> None:
        self._stream = stream
        self._idle_s = timeouts.idle
        self._ends = started + timeouts.total  # time.perf_counter() clock, as ``started``
        self._closing: asyncio.Task[None] | None = None

    @contextmanager
    def handing_over(self) -> Iterator[None]:
        """Around a ``yield`` to the client: raises :class:`ClientStalled` when it came back too late."""
        wait_s = max(0.0, min(self._idle_s, self._ends - time.perf_counter()))
        timer = asyncio.get_running_loop().call_later(wait_s, self._let_go)
        try:
            yield
        except BaseException:  # the client left (the generator is being closed): nothing to add
            timer.cancel()
            raise
        timer.cancel()
        if self._closing is not None:
            raise ClientStalled(f"the client took no event for {wait_s:g}s; the upstream was released")

    async def aclose(self) -> None:
        """Wait for the upstream's closing, when this let it go."""
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    def _let_go(self) -> None:
        self._closing = asyncio.get_running_loop().create_task(self._stream.aclose())
