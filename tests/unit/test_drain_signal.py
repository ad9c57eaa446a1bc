"""A Ctrl-C that lands after the worker's event loop has closed (a second one at the very end of
a drain) has nothing to drain, and must not end the worker with a traceback on stderr (f132's
note: "RuntimeError: Event loop is closed" in a drain test under load)."""

from __future__ import annotations

import argparse
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


@pytest.mark.usefixtures("restored_handlers")
def test_a_ctrl_c_once_one_worker_has_served_does_not_break_off_its_close() -> None:
    """The CI of 31e849b: a Ctrl-C repeated while uvicorn's one worker closed its event loop raised
    KeyboardInterrupt in the loop's close, and a thread of the loop's printed a traceback."""
    import uvicorn

    from gateway.cli.serve import _announcing_server

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        raise AssertionError("no request comes")

    servers: list[uvicorn.Server] = []

    def listening(port: int) -> None:
        servers[0].should_exit = True  # stops at once, as after a drain

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    servers.append(_announcing_server()(config, listening))

    async def served_then_interrupted() -> None:
        await servers[0].serve()
        signal.raise_signal(signal.SIGINT)  # Ctrl-C from here on lands in what closes the loop
        await asyncio.sleep(0)

    asyncio.run(served_then_interrupted())  # raised KeyboardInterrupt before
    assert servers[0].started


@pytest.mark.usefixtures("restored_handlers")
@pytest.mark.parametrize("ends", ["stopped before serving", "served", "failed to start"])
def test_serve_leaves_its_stop_signals_ignored_as_it_returns(monkeypatch: pytest.MonkeyPatch, ends: str) -> None:
    """t195: serve returned 0 after a stop before serving with its own handler still in place, and
    Python's finalization put the default action back: a second SIGTERM (an orchestrator's and then
    `docker stop`'s, or Ctrl-C pressed twice) ended it by the signal, exit -15, where it had stopped
    cleanly."""
    from gateway.cli import serve

    def start_and_serve(args: object) -> int:
        if ends == "stopped before serving":
            raise serve._Stopped(signal.SIGTERM)
        return 0 if ends == "served" else 2

    monkeypatch.setattr(serve, "_start_and_serve", start_and_serve)
    monkeypatch.setattr(serve, "_START_STOPS", serve._StartStops())
    assert serve.run(argparse.Namespace()) in (0, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.usefixtures("restored_handlers")
@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_stop_between_two_runs_of_the_loop_is_acted_on_once_it_runs_once(kind: str) -> None:
    """f227 (t199's find): granian's worker runs its loop for the application's lifespan start, then
    again to serve. uvloop hears of a signal through its wakeup fd only while it runs: a SIGTERM in
    between was noted, and acted on only once another signal came (the worker served on until
    granian's kill timeout). Acted on once the loop runs, and once only: the server's handler run
    twice locked up granian's worker (t132); asyncio's loop, which keeps its wakeup fd, hears it
    itself."""
    import uvloop

    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        heard: list[str] = []
        loop.add_signal_handler(signal.SIGTERM, heard.append, "stop")  # the server's, as granian's worker's
        drain = Drain(deadline_s=60.0)

        async def start() -> None:  # the lifespan's start
            drain.install_signal_handler(loop)

        loop.run_until_complete(start())
        signal.raise_signal(signal.SIGTERM)  # with the loop stopped

        async def serve() -> None:
            while not heard or drain._timer is None:
                await asyncio.sleep(0.01)
            for _ in range(20):  # a second would have come by now: a turn to raise it, one to hear it
                await asyncio.sleep(0)

        loop.run_until_complete(asyncio.wait_for(serve(), 30))  # TimeoutError before: never heard
        assert heard == ["stop"]
    finally:
        loop.close()
