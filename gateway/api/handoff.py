"""Handing a request to the pipeline: its id, its body read under limits, and the client leaving."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from litestar.exceptions import InternalServerException

from gateway.api.state import GatewayState
from gateway.core.model import Request
from gateway.errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError
from gateway.pipeline import Answer, BodyReader, PassThrough, StreamingAnswer, StreamingDeltas

__all__ = ["DisconnectWatch", "Incoming", "hand_to_pipeline"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class Incoming(Protocol):
    """What the hand-off reads of a request: Litestar's ``Request``, or the chat route's bare one."""

    @property
    def app(self) -> Any: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def stream(self) -> AsyncIterator[bytes]: ...
    @property
    def receive(self) -> Callable[..., Awaitable[Any]]: ...


async def hand_to_pipeline(
    request: Incoming,
    *,
    protocol: str = "openai.chat",
    authorization: str | None = None,
    translate: Callable[[bytes], Awaitable[Request]] | None = None,
    embeddings: bool = False,
    passthrough: PassThrough | None = None,
) -> tuple[str, Answer | StreamingAnswer | StreamingDeltas | None]:
    """The request id and the pipeline's answer; None when the client left before it.

    ``translate`` decodes another protocol's body into the internal model, and may wait (the
    Responses API loads earlier turns from the store); a GatewayError it raises for a
    bad body is answered by the pipeline like any other;
    ``embeddings``: the embeddings pipeline answers instead of the chat pipeline;
    ``passthrough``: how to send the request upstream as it came, should ``translate`` find
    that the route allows it (see :class:`~gateway.pipeline.PassThrough`).
    """
    started = time.perf_counter()
    state: GatewayState = request.app.state.gateway
    headers = request.headers
    incoming_id = headers.get("x-request-id")
    request_id = incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex
    task = asyncio.current_task()
    assert task is not None
    watch = DisconnectWatch(request, task)
    read_body: BodyReader = watch.read_body
    if translate is not None:
        convert = translate

        async def read_body(limit: int, timeout_s: float) -> bytes | Request:
            return await convert(await watch.read_body(limit, timeout_s))

    try:
        authorization = authorization if authorization is not None else headers.get("authorization")
        cache_control = headers.get("cache-control")
        answer: Answer | StreamingAnswer | StreamingDeltas
        if embeddings:
            answer = await state.embeddings.handle(
                watch.read_body, authorization, cache_control, request_id, started, protocol
            )
        else:
            answer = await state.pipeline.handle(
                read_body, authorization, cache_control, request_id, started, protocol, passthrough
            )
    except asyncio.CancelledError:
        if not watch.client_left:
            raise
        task.uncancel()  # our own cancellation: the client is gone, nothing more to do
        return request_id, None
    finally:
        watch.stop()
    return request_id, answer


class DisconnectWatch:
    """Reads the body, then cancels the request's task if the client hangs up before the answer.

    So a client that leaves while the upstream is still thinking cancels the upstream call.
    Streams are watched by Litestar's ``Stream`` itself once they start. The watcher is a
    task only from the end of the body on (receive() would otherwise steal body messages).
    """

    __slots__ = ("_request", "_task", "_watcher", "client_left")

    def __init__(self, request: Incoming, task: asyncio.Task[object]) -> None:
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
