"""Log events that come with every request while something is down, at most once in a while."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SparseLog"]


class SparseLog:
    """One event, said at most once per ``every_s`` with the number left unsaid since: an
    outage that touches every request is a line every few seconds, not one per request."""

    __slots__ = ("_event", "_every_s", "_level", "_logger", "_said_at", "_unsaid")

    def __init__(self, logger: Any, event: str, *, level: str = "warning", every_s: float = 10.0) -> None:
        self._logger = logger
        self._event = event
        self._level = level
        self._every_s = every_s
        self._said_at = float("-inf")
        self._unsaid = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._said_at < self._every_s:
            self._unsaid += 1
            return
        self._said_at = now
        if self._unsaid:
            fields["also_since_last"] = self._unsaid
            self._unsaid = 0
        getattr(self._logger, self._level)(self._event, **fields)
