"""``POST /v1/chat/completions``: moves bytes between the client and :class:`ChatPipeline`."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from litestar import Request, Response, post
from litestar.exceptions import InternalServerException
from litestar.response import Stream

from gateway.api.state import GatewayState
from gateway.errors import InvalidRequestError, PayloadTooLargeError
from gateway.pipeline import Answer

__all__ = ["chat_completions"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_CLIENT_GONE = Response(content=b"", status_code=499)


@post("/v1/chat/completions", request_max_body_size=None, status_code=200)
async def chat_completions(request: Request) -> Response[bytes] | Stream:
    started = time.perf_counter()
    state: GatewayState = request.app.state.gateway
    headers = request.headers
    incoming_id = headers.get("x-request-id")
    request_id = incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex
    disconnected = _DisconnectWatch(request)
    work = asyncio.ensure_future(
        state.pipeline.handle(
            disconnected.read_body, headers.get("authorization"), headers.get("cache-control"), request_id, started
        )
    )
    answer = await disconnected.run_until_gone(work)
    if answer is None:
        return _CLIENT_GONE
    if isinstance(answer, Answer):
        return Response(content=answer.body, status_code=answer.status, headers=answer.headers, media_type="application/json")
    return Stream(
        answer.events,
        media_type="text/event-stream",
        headers={**answer.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


class _DisconnectWatch:
    """Reads the body, then cancels the request's work if the client hangs up before the answer.

    Streams are watched by Litestar's ``Stream`` itself; this covers the wait for the
    upstream before the first byte, so a client that leaves cancels the upstream call.
    """

    __slots__ = ("_request", "_body_read")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._body_read = asyncio.Event()

    async def read_body(self, limit: int) -> bytes:
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
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
        except InternalServerException:
            raise asyncio.CancelledError from None  # the client left while sending
        self._body_read.set()
        return b"".join(chunks)

    async def run_until_gone(self, work: asyncio.Future[object]):  # noqa: ANN201 - Answer | StreamingAnswer | None
        watcher = asyncio.ensure_future(self._wait_for_disconnect())
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if work.done():
            return work.result()
        work.cancel()
        try:
            await work
        except asyncio.CancelledError:
            pass
        return None

    async def _wait_for_disconnect(self) -> None:
        await self._body_read.wait()
        while True:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                return
