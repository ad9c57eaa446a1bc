"""The deadline a model's ``timeouts.total`` sets for all of one request's attempts at it.

A retry on the same model gets only what is left of its total, and none is made once it has run
out (t95: each attempt had a total of its own, so with ``max_attempts: 2`` a body that stalled
took twice the total before its 504, and a client that gave up at the total saw neither). The
route's next model starts a total of its own. Every wait that ``total`` bounds (a whole answer, a
stream, the speculative loop) ends at :func:`total_deadline`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["model_deadline", "total_deadline"]

_DEADLINE: ContextVar[float | None] = ContextVar("gateway_model_deadline", default=None)


@contextmanager
def model_deadline(total_s: float) -> Iterator[float]:
    """The calls made from here on in this task end within ``total_s``, all together; yields
    that deadline (the event loop's time)."""
    deadline = asyncio.get_running_loop().time() + total_s
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def total_deadline(total_s: float) -> float:
    """When an answer asked for now must be whole (the event loop's time): ``total_s`` from now,
    or sooner where earlier attempts at its model spent part of it."""
    own = asyncio.get_running_loop().time() + total_s
    shared = _DEADLINE.get()
    return own if shared is None else min(own, shared)
