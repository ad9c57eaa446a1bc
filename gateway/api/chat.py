"""``POST /v1/chat/completions``: moves bytes between the client and :class:`ChatPipeline`."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from litestar import Request, Response, post
from litestar.exceptions import InternalServerException
from litestar.response import Stream

from gateway.api.state import GatewayState
from gateway.errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError
from gateway.pipeline import Answer

__all__ = ["chat_completions"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_CLIENT_GONE = Response(content=b"", status_code=499)


@post("/v1/chat/completions", request_max_body_size=None, status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    started = time.perf_counter()
    state: GatewayState = request.app.state.gateway
    headers = request.headers
    incoming_id = headers.get("x-request-id")
    request_id = incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex
    task = asyncio.current_task()
    assert task is not None
    watch = _DisconnectWatch(request, task)
    try:
        answer = await state.pipeline.handle(
            watch.read_body, headers.get("authorization"), headers.get("cache-control"), request_id, started
        )
    except asyncio.CancelledError:
        if not watch.client_left:
            raise
        task.uncancel()  # our own cancellation: the client is gone, nothing more to do
        return _CLIENT_GONE
    finally:
        watch.stop()
    if isinstance(answer, Answer):
        return Response(
            content=answer.body, status_code=answer.status, headers=answer.headers, media_type="application/json"
        )
    return Stream(
        answer.events,
        media_type="text/event-stream",
        headers={**answer.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


class _DisconnectWatch:
    """Reads the body, then cancels the request's task if the client hangs up before the answer.

    So a client that leaves while the upstream is still thinking cancels the upstream call.
    Streams are watched by Litestar's ``Stream`` itself once they start. The watcher is a
    task only from the end of the body on (receive() would otherwise steal body messages).
    """

    __slots__ = ("_request", "_task", "_watcher", "client_left")

    def __init__(self, request: Request[Any, Any, Any], task: asyncio.Task[object]) -> None:
        self._request = request
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self.client_left = False

    async def read_body(self, limit: int, timeout_s: float) -> bytes:
        request = self._request
        announced = request.headers.get("content-length")
        if announced is not None:
            if not announced.isdigit():
                raise InvalidRequestError("invalid Content-Length header")
            if int(announced) > limit:
                raise PayloadTooLargeError(f"request body of {announced} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body was not received within {timeout_s:g}s", headers={"connection": "close"}
            ) from None
        except InternalServerException:
            self.client_left = True  # the client left while sending
            raise asyncio.CancelledError from None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return b"".join(chunks)

    async def _watch(self) -> None:
        while True:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
                self._task.cancel()
                return

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
