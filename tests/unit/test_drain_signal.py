"""A Ctrl-C that lands after the worker's event loop has closed (a second one at the very end of
a drain) has nothing to drain, and must not end the worker with a traceback on stderr (f132's
note: "RuntimeError: Event loop is closed" in a drain test under load)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from gateway.drain import Drain


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("restored_handlers")
def test_a_signal_after_the_loop_closed_is_taken_quietly() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # what the handler passes the first signal on to: nothing
    loop = asyncio.new_event_loop()
    Drain(deadline_s=1.0).install_signal_handler(loop)
    loop.close()
    handler = signal.getsignal(signal.SIGINT)
    assert callable(handler)
    handler(signal.SIGINT, None)  # raised RuntimeError('Event loop is closed') before
    handler(signal.SIGINT, None)
