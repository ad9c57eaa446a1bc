"""uvicorn's own log lines as the ops log's: one JSON object a line on stderr, as the gateway's are.

uvicorn's default logging wrote them as plain text (``WARNING:  Invalid HTTP request received.``),
one for each malformed request: whoever could reach the port could add as many non-JSON lines to
the JSON ops log as they liked (t153). What a client can cause is said at most once a window per
worker, with how many there were.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.accounting.request_log import exception_frames, write_ops_line

__all__ = ["CLIENT_CAUSED_EVERY_S", "ServerLogHandler", "say_unsaid", "uvicorn_log_config"]

CLIENT_CAUSED_EVERY_S = 60.0
"""At most one line per event this often, per worker (``request_log_write_failed``'s pace)."""

_CLIENT_CAUSED = {
    "Invalid HTTP request received.": "http_invalid_request",  # answered 400 by uvicorn
    "Unsupported upgrade request.": "http_unsupported_upgrade",  # an Upgrade uvicorn ignores (h2c)
    "Request head too large.": "http_head_too_large",  # answered 431 (gateway.services.http_head)
    "Request head too slow.": "http_head_timeout",  # answered 408 (gateway.services.http_head)
}
"""uvicorn's texts (a record's ``msg``, before any argument) that any client can cause, by event name."""


@dataclass
class _Window:
    opened_at: float
    unsaid: int = 0
    timer: asyncio.TimerHandle | None = None


class ServerLogHandler(logging.Handler):
    """Writes each record as an ops line: a client-caused one as its event, with ``count`` (how many
    since the last such line); any other as ``server_log``, with uvicorn's ``message``. An exception
    is named with where it was raised, never its text, as ``internal_error`` lines have it."""

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[str, _Window] = {}

    def emit(self, record: logging.LogRecord) -> None:
        event = _CLIENT_CAUSED.get(record.msg) if isinstance(record.msg, str) else None
        if event is None:
            write_ops_line(_line(record))
            return
        now = time.monotonic()
        window = self._windows.get(event)
        if window is None or now - window.opened_at >= CLIENT_CAUSED_EVERY_S:
            # a window with no timer (no event loop to run one on) says its unsaid ones here
            self._say(event, 1 + (window.unsaid if window is not None else 0))
            self._windows[event] = _Window(now)
            return
        window.unsaid += 1
        if window.timer is None:
            try:
                loop = asyncio.get_running_loop()  # uvicorn's protocols log from the worker's event loop
            except RuntimeError:
                return
            delay = window.opened_at + CLIENT_CAUSED_EVERY_S - now
            window.timer = loop.call_later(delay, self._window_closed, event)

    def flush(self) -> None:
        """The ones not said yet: at exit (logging's own shutdown) and at a worker's end (:func:`say_unsaid`)."""
        self.acquire()
        try:
            for event, window in self._windows.items():
                if window.timer is not None:
                    window.timer.cancel()
                    window.timer = None
                if window.unsaid:
                    self._say(event, window.unsaid)
                    window.unsaid = 0
        finally:
            self.release()

    def _window_closed(self, event: str) -> None:
        self.acquire()
        try:
            window = self._windows.get(event)
            if window is not None and window.unsaid:
                self._say(event, window.unsaid)
                self._windows[event] = _Window(time.monotonic())
        finally:
            self.release()

    def _say(self, event: str, count: int) -> None:
        write_ops_line({"event": event, "level": "warning", "count": count})


def _line(record: logging.LogRecord) -> dict[str, Any]:
    line: dict[str, Any] = {"event": "server_log", "level": record.levelname.lower(), "logger": record.name}
    line["message"] = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        line |= {"error": type(exc).__name__, "where": exception_frames(exc)}
    return line


def say_unsaid() -> None:
    """Say the client-caused lines still counted, as a worker stops: a spawned uvicorn worker ends
    by the signal that stopped it, raised again, and runs no exit hook."""
    for handler in logging.getLogger("uvicorn").handlers:
        if isinstance(handler, ServerLogHandler):
            handler.flush()


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's ``log_config``: its loggers write through :class:`ServerLogHandler` (spawned
    workers apply it too). ``uvicorn.access`` gets no handler: access lines are the request log's."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"ops": {"class": f"{__name__}.ServerLogHandler"}},
        "loggers": {
            "uvicorn": {"handlers": ["ops"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": False},
        },
    }
