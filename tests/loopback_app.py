"""A test upstream's aiohttp application, served on loopback from a thread of its own.

Test upstreams that behave like real servers (vLLM, OpenAI, Anthropic) run their handlers on
that thread's event loop, so a test's own client and the gateway process never share a loop
with them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ServedApp:
    url: str
    """``http://127.0.0.1:PORT``, without a path."""
    loop: asyncio.AbstractEventLoop
    """The loop the handlers run on: a test that steers them (an event to set) goes through it."""


@contextmanager
def serve_app(routes: Mapping[str, Handler], *, name: str) -> Iterator[ServedApp]:
    """Serve ``routes`` (POST path -> handler; ``"GET /path"`` for another method) until the block
    ends; then close the listener and end the handlers still running (a held stream, a hanging answer)."""
    loop = asyncio.new_event_loop()

    async def serve() -> tuple[web.AppRunner, int]:
        app = web.Application()
        for route, handler in routes.items():
            method, _, path = route.rpartition(" ")
            app.router.add_route(method or "POST", path, _bound(handler))
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, runner.addresses[0][1]

    thread = threading.Thread(target=loop.run_forever, daemon=True, name=name)
    thread.start()
    try:
        runner, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        raise
    try:
        yield ServedApp(url=f"http://127.0.0.1:{port}", loop=loop)
    finally:
        asyncio.run_coroutine_threadsafe(_shutdown(runner), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@dataclass
class RecordingUpstream:
    """A test upstream's address and the request bodies it was sent, in order."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    """Each request's method, raw path and query as received (``POST /v1/x?a=b``), in order."""


RecordingHandler = Callable[[web.Request, RecordingUpstream], Awaitable[web.StreamResponse]]


@contextmanager
def serve_recording(routes: Mapping[str, RecordingHandler], *, name: str) -> Iterator[RecordingUpstream]:
    """:func:`serve_app` for handlers that are handed the upstream they answer for (to record the
    bodies they were sent); the block gets that upstream, its ``url`` set."""
    upstream = RecordingUpstream()
    with serve_app({path: _handing(handler, upstream) for path, handler in routes.items()}, name=name) as served:
        upstream.url = served.url
        yield upstream


def _handing(handler: RecordingHandler, upstream: RecordingUpstream) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        upstream.targets.append(f"{request.method} {request.raw_path}")
        return await handler(request, upstream)

    return handle


async def write_sse(response: web.StreamResponse, data: Any, event: str | None = None) -> None:
    """One server-sent event: ``data`` as JSON (bytes as they are, e.g. ``b"[DONE]"``), under ``event``
    when it is named, as Anthropic's stream names each."""
    head = f"event: {event}\n".encode() if event else b""
    await response.write(head + b"data: " + (data if isinstance(data, bytes) else msgspec.json.encode(data)) + b"\n\n")


def _bound(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:  # aiohttp wants a coroutine function
        return await handler(request)

    return handle


async def _shutdown(runner: web.AppRunner) -> None:
    """Close the listener, then end the handlers still hanging or streaming."""
    await runner.cleanup()
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def claude_text(
    request: web.Request, body: dict[str, Any], text: str, usage: Mapping[str, int]
) -> web.StreamResponse:
    """Anthropic's answer of ``text`` to the Messages request ``body``: the message, or its event
    stream when ``body`` asks for one."""
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                               "stop_sequence": None}  # fmt: skip
    if not body.get("stream"):
        content = [{"type": "text", "text": text}]
        return web.json_response({**message, "content": content, "stop_reason": "end_turn", "usage": usage})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": usage},
        {"type": "message_stop"},
    ]
    for event in events:
        await write_sse(response, event, event["type"])
    return response
