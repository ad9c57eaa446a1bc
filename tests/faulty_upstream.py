"""An OpenAI-compatible upstream that misbehaves the way real servers and proxies do.

The behaviour is the model name the gateway sends (``upstream_model`` in the test
policy), so one server serves every fault:

- ``comments``: a streamed answer of SSE comments (``: keep-alive``) only, for ever;
- ``trickle``: one content chunk, then comments for ever (an upstream that stalls mid-answer);
- ``endless-line``: ``data: `` and then bytes without a newline, up to 40 MB;
- ``no-choices``: ``{"choices": []}``, or a stream of ``data: [DONE]`` alone;
- ``fail-marked``: 500 when the prompt contains ``FAULT``, a normal answer otherwise;
- anything else: a normal answer, streamed or not.

It runs on loopback in a thread of its own, like the servers it stands in for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["FaultyUpstream", "start_faulty_upstream"]


@dataclass
class FaultyUpstream:
    url: str
    calls: dict[str, int] = field(default_factory=dict)


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-faulty", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }  # fmt: skip


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-faulty", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _handle(request: web.Request, upstream: FaultyUpstream) -> web.StreamResponse:
    body = await request.json()
    model = str(body.get("model"))
    upstream.calls[model] = upstream.calls.get(model, 0) + 1
    stream = bool(body.get("stream"))
    if model == "fail-marked" and "FAULT" in msgspec.json.encode(body.get("messages")).decode():
        return web.json_response({"error": {"message": "simulated failure", "type": "server_error"}}, status=500)
    if model == "no-choices" and not stream:
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": []})
    if not stream:
        return web.json_response(_completion(model, "a fine answer"))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    if model == "no-choices":
        await response.write(b"data: [DONE]\n\n")
    elif model in ("comments", "trickle"):
        if model == "trickle":
            await response.write(_chunk(model, {"role": "assistant", "content": "a fine"}))
        while True:
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(0.05)
    elif model == "endless-line":
        await response.write(b"data: ")
        piece = b"x" * 65536
        for _ in range(40 * 16):
            await response.write(piece)
            await asyncio.sleep(0)
    else:
        await response.write(_chunk(model, {"role": "assistant", "content": "a fine"}))
        await response.write(_chunk(model, {"content": " answer"}, "stop"))
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@contextmanager
def start_faulty_upstream() -> Iterator[FaultyUpstream]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        app = web.Application()
        upstream = FaultyUpstream(url="")

        async def handle(request: web.Request) -> web.StreamResponse:
            return await _handle(request, upstream)

        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        upstream.url = f"http://127.0.0.1:{port}/v1"
        holder["upstream"], holder["runner"] = upstream, runner
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True, name="faulty-upstream")
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    if not ready.wait(10):
        raise RuntimeError("the faulty upstream did not start")
    try:
        yield holder["upstream"]
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
