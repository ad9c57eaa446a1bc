"""The end of a worker's life: streams still open at the drain deadline are ended in-band.

The server stops accepting on SIGTERM (or Ctrl-C) and waits for open requests, up to its kill
timeout; a stream whose upstream says nothing (or only ``: keep-alive``) would be cut
there with no error event and no log line. :class:`Drain` ends such streams a little
before that, through their own error path, so the client reads why and the request is
logged and charged like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

import structlog

__all__ = ["CONNECTION_RESET", "DEFAULT_DRAIN_S", "Drain", "redeliver_deadline"]

DEFAULT_DRAIN_S = 25.0
"""The server kills workers 5 s after this (``serve`` sets its kill timeout to drain + 5)."""

_LAST_WORDS_S = 2.0
"""After the deadline, what the streams it ended are waited for: their in-band error, log line and usage."""

_log = structlog.get_logger("gateway.drain")

CONNECTION_RESET: ContextVar[Callable[[], None] | None] = ContextVar("gateway_connection_reset", default=None)
"""In a request's task: resets the connection it is answered on (set by uvicorn's protocol,
:mod:`gateway.services.http_head`; None under granian, which has no such hook)."""

_TRACKED_BY: ContextVar[Drain | None] = ContextVar("gateway_tracked_by", default=None)
"""In a stream's task: the drain that tracks it (set by :meth:`Drain.track`)."""


def redeliver_deadline(task: asyncio.Task[Any]) -> bool:
    """An edge's send to a slow client was cancelled: when the drain's deadline did it, the
    cancellation is delivered again, at the stream's next wait, which ends it in-band as any
    stream the deadline finds waiting (t198: the stream, suspended at its ``yield``, never saw
    it: a chat client's was logged 499, another protocol's not at all); True then."""
    drain = _TRACKED_BY.get()
    if drain is None or not drain.expired or task not in drain._streams:
        return False
    task.uncancel()
    task.cancel()
    return True


def _wakes_no_loop() -> bool:
    """No event loop's wakeup fd is set: a signal that came now reached no loop (asyncio's own loop
    keeps its fd while it is not running, and acts on the signal once it runs). Only ever asked
    with the loop stopped, from a signal handler: both on the main thread."""
    fd = signal.set_wakeup_fd(-1)
    if fd == -1:
        return True
    signal.set_wakeup_fd(fd)
    return False


class Drain:
    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.expired = False
        """True once the deadline passed: a stream cancelled now was ended by the drain."""
        self.ended_streams = 0
        self._streams: set[asyncio.Task[Any]] = set()
        self._work: set[asyncio.Task[Any]] = set()
        self._open: set[asyncio.Task[Any]] = set()
        """The tracked streams' tasks until they are done: their bookkeeping comes after :meth:`untrack`."""
        self._timer: asyncio.TimerHandle | None = None
        self._ends_at = 0.0
        self._resets: dict[asyncio.Task[Any], tuple[Callable[[], None], asyncio.TimerHandle]] = {}
        """The streams cut for a stalled client, still writing to it: their connections' resets."""

    def track(self) -> asyncio.Task[Any] | None:
        """Register the running stream's task; pass it to :meth:`untrack` when the stream ends."""
        task = asyncio.current_task()
        if task is not None:
            _TRACKED_BY.set(self)
            self._streams.add(task)
            if task not in self._open:
                self._open.add(task)
                task.add_done_callback(self._open.discard)
            if self.expired:  # started after the deadline: it ends at its first wait, like the others
                task.get_loop().call_soon(task.cancel)
        return task

    def untrack(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._streams.discard(task)

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run work the gateway owns past its client (t58: a stream's upstream read to its end for
        the usage, once the client has the answer): ended at the deadline as a stream is, and
        waited for at the worker's end (:meth:`finish_work`)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        for tasks in (self._work, self._streams):
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if self.expired:
            task.get_loop().call_soon(task.cancel)
        return task

    def keep(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a request's bookkeeping that ends on its own (its bill counted in a thread, then its
        log line): waited for at the worker's end, never ended at the deadline (a task cancelled
        before its first step would skip it all)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    def reset_later(self, task: asyncio.Task[Any], reset: Callable[[], None], after_s: float) -> None:
        """A stream cut for a stalled client (settled and logged) whose in-band error waits behind
        the client's full buffers: its connection is reset ``after_s`` from now, or at the drain's
        start (the stream is done for its bill and log), unless its task ends first (t193: the
        connection was held as long as the client held on, and the worker's exit to the server's
        kill timeout, then cancelled with a traceback)."""
        if self._timer is not None:
            after_s = 0.0
        timer = task.get_loop().call_later(after_s, self._reset, task)
        self._resets[task] = (reset, timer)
        task.add_done_callback(self._forget_reset)

    def _reset(self, task: asyncio.Task[Any]) -> None:
        entry = self._resets.pop(task, None)
        if entry is not None:
            entry[1].cancel()
            entry[0]()

    def _forget_reset(self, task: asyncio.Task[Any]) -> None:
        entry = self._resets.pop(task, None)
        if entry is not None:
            entry[1].cancel()

    async def finish_work(self) -> None:
        """At the worker's end, before the bill and the log are closed: wait for the work
        :meth:`spawn` started, and for the streams still open, up to the deadline (which starts
        now if no signal started it) and a moment for those it ends to say so.

        Under uvicorn no stream is open by then. Granian shuts the app down once the last
        connection is closed, which a client does as soon as it has read ``[DONE]``: the stream's
        task may still be storing its answer in the cache, its log line and usage to come
        after (t132: the request log was closed first, and the request went unlogged, unbilled)."""
        if self._work or self._open:
            self.begin()
            await asyncio.gather(*self._work, return_exceptions=True)
            if self._open:
                left_s = self._ends_at - asyncio.get_running_loop().time()
                await asyncio.wait(set(self._open), timeout=max(left_s, 0.0) + _LAST_WORDS_S)
            if self._work:  # started by the streams meanwhile (a stalled client's bill counted in a thread)
                await asyncio.gather(*self._work, return_exceptions=True)
            await asyncio.sleep(0)  # their accounting is called soon after them

    def ended_by_deadline(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether the cancellation ``task`` is handling came from the deadline; if so it is taken back
        (the stream goes on to tell its client why it ends) and counted."""
        if not self.expired or task is None:
            return False
        task.uncancel()
        self.ended_streams += 1
        return True

    def begin(self) -> None:
        """Start the countdown (idempotent)."""
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._ends_at = loop.time() + self.deadline_s
            self._timer = loop.call_later(self.deadline_s, self._end_streams)
            _log.info("drain_started", open_streams=len(self._streams), deadline_s=self.deadline_s)
            for task in list(self._resets):
                self._reset(task)

    def install_signal_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin on SIGTERM or SIGINT, passing the first of them on to whatever the server installed.

        Ctrl-C is a stop like SIGTERM (t96: with one worker uvicorn took it alone, and streams
        open then were cut at its kill timeout, with no error event and no log line). A later
        one is the drain's: uvicorn takes a second SIGINT as "force quit", which skips the
        application's shutdown, and with it the log lines and usage still to be written.
        The server's own asyncio handler keeps working: the event loop learns of the
        signal through its wakeup fd, whichever Python-level handler is set.
        """
        stopping = False

        def on_stop(signum: int, frame: Any, previous: Any) -> None:
            nonlocal stopping
            # A signal after the worker's loop has closed (a Ctrl-C at the very end) has nothing
            # left to drain; asking the closed loop would print a traceback on the way out.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.begin)
            first, stopping = not stopping, True
            if first and callable(previous):
                previous(signum, frame)
                if not loop.is_running() and _wakes_no_loop():
                    # uvloop hears of a signal through its wakeup fd only while it runs: granian's worker
                    # runs it for the lifespan's start, then again to serve, and a stop in between was
                    # noted (previous) and acted on only when another signal came: the worker served on
                    # until granian's kill timeout (t199). Raised again once the loop runs, it wakes it,
                    # which acts on it once; here it is not the first, and passed on to no one.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(signal.raise_signal, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, functools.partial(on_stop, previous=signal.getsignal(sig)))
            except ValueError:  # not the main thread (an embedding server): no drain deadline
                return

    async def aclose(self) -> None:
        """At the worker's end: stop the countdown and say what the drain did."""
        if self._timer is not None:
            self._timer.cancel()
        if self.ended_streams or self._timer is not None:
            _log.info("drain_finished", ended_in_band=self.ended_streams, still_open=len(self._streams))

    def _end_streams(self) -> None:
        self.expired = True
        for task in list(self._streams):
            task.cancel()
