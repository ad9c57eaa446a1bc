"""Handing a request to the pipeline: its id, its body read under limits, and the client leaving."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from gateway.api.bodies import BodyUnreadableError, inflated_body, received_body
from gateway.api.credentials import authorization_of
from gateway.api.state import GatewayState
from gateway.auth import Credentials, Principal
from gateway.pipeline import Answer, PassThrough, StreamingAnswer, StreamingDeltas, Translate

__all__ = ["DisconnectWatch", "Incoming", "hand_to_pipeline", "log_refused_method"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _RequestIds:
    """32 hex digits: a counter hashed with this process's random key. Unique and unguessable,
    as a uuid4 would be, without a getrandom call per request (an id that could be predicted
    could be claimed first by another key of the tenant, for its feedback); a forked worker
    draws its own key."""

    def __init__(self) -> None:
        self._fresh()
        os.register_at_fork(after_in_child=self._fresh)

    def _fresh(self) -> None:
        self._key = os.urandom(16)
        self._counter = itertools.count()

    def next(self) -> str:
        count = next(self._counter).to_bytes(8, "little")
        return hashlib.blake2b(count, key=self._key, digest_size=16).hexdigest()


_request_ids = _RequestIds()


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` when it is a usable one, else a fresh id."""
    incoming_id = headers.get("x-request-id")
    return incoming_id if incoming_id and _REQUEST_ID.fullmatch(incoming_id) else _request_ids.next()


class Incoming(Protocol):
    """What the hand-off reads of a request: Litestar's ``Request``, or the chat route's bare one."""

    @property
    def app(self) -> Any: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def scope(self) -> Mapping[str, Any]: ...
    def stream(self) -> AsyncIterator[bytes]: ...
    @property
    def receive(self) -> Callable[..., Awaitable[Any]]: ...


async def hand_to_pipeline(
    request: Incoming,
    *,
    protocol: str = "openai.chat",
    authorization: Credentials = None,
    translate: Translate | None = None,
    embeddings: bool = False,
    passthrough: PassThrough | None = None,
    state: GatewayState | None = None,
) -> tuple[str, Answer | StreamingAnswer | StreamingDeltas | None]:
    """The request id and the pipeline's answer; None when the client left before it (a 400 when
    the server said it left before its body was whole: :meth:`DisconnectWatch.left_answer`).

    ``translate`` decodes another protocol's body into the internal model for the authenticated
    caller, and may wait (the
    Responses API loads earlier turns from the store); a GatewayError it raises for a
    bad body is answered by the pipeline like any other;
    ``embeddings``: the embeddings pipeline answers instead of the chat pipeline;
    ``passthrough``: how to send the request upstream as it came, should ``translate`` find
    that the route allows it (see :class:`~gateway.pipeline.PassThrough`); ``state``: the
    worker's, when the caller holds it (else read from the app, a lookup that shows in profiles).
    """
    started = time.perf_counter()
    if state is None:
        state = request.app.state.gateway
    headers = request.headers
    request_id = request_id_of(headers)
    task = asyncio.current_task()
    assert task is not None
    watch = DisconnectWatch(request, task, (state.embeddings if embeddings else state.pipeline).client_left)
    try:
        authorization = authorization if authorization is not None else authorization_of(request)
        cache_control = _cache_control(request.scope)
        answer: Answer | StreamingAnswer | StreamingDeltas
        if embeddings:
            answer = await state.embeddings.handle(
                watch.read_body, authorization, cache_control, request_id, started, protocol, watch.body_wait
            )
        else:
            answer = await state.pipeline.handle(
                watch.read_chat_body,
                authorization,
                cache_control,
                request_id,
                started,
                protocol,
                passthrough,
                watch.body_wait,
                translate,
            )
    except asyncio.CancelledError:
        if not watch.client_left:
            raise
        task.uncancel()  # our own cancellation: the client is gone, nothing more to do
        return request_id, watch.left_answer(request_id)
    finally:
        watch.stop()
    return request_id, watch.left_answer(request_id) if watch.client_left else answer


def log_refused_method(request: Incoming, state: GatewayState, protocol: str) -> str:
    """A model endpoint's 405, logged as the pipeline logs any refusal; the id it is logged under."""
    request_id = request_id_of(request.headers)
    state.pipeline.refused_method(authorization_of(request), request_id, protocol, time.perf_counter())
    return request_id


def _cache_control(scope: Mapping[str, Any]) -> str | None:
    """Every ``Cache-Control`` line, read as HTTP reads several: one comma-separated list (t163:
    a second line's ``no-cache`` was ignored); without one, ``Pragma: no-cache`` is ``no-cache``
    (RFC 9111, 5.4). ASGI servers give header names in lower case."""
    lines, pragma = [], False
    for name, value in scope["headers"]:
        if name == b"cache-control":
            lines.append(value.decode("latin-1"))
        elif name == b"pragma":
            pragma = pragma or b"no-cache" in value.lower()
    if lines:
        return ", ".join(lines)
    return "no-cache" if pragma else None


class DisconnectWatch:
    """Reads the body, then cancels the request's task if the client hangs up before the answer.

    So a client that leaves while the upstream is still thinking is seen: the request is
    cancelled, unless the pipeline waits for a whole answer the upstream writes on (and bills).
    Streams are watched by the route itself once they start. The watcher is a task only
    from the end of the body on (receive() would otherwise steal body messages), and only
    for a request still unanswered ``WATCH_AFTER_S`` later: a task per request cost ~5 % of
    the proxy path's CPU in a profile, and a disconnect is still seen, that much later.
    """

    WATCH_AFTER_S = 0.01

    __slots__ = ("_body_s", "_on_leave", "_request", "_task", "_timer", "_unread", "_watcher", "client_left")

    def __init__(
        self, request: Incoming, task: asyncio.Task[object], on_leave: Callable[[asyncio.Task[Any]], bool] | None = None
    ) -> None:
        """``on_leave(task)``, asked when the client hangs up: True when the request goes on
        (its upstream writes a whole answer, which is billed), else the task is cancelled."""
        self._request = request
        self._task = task
        self._on_leave = on_leave
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._unread: BodyUnreadableError | None = None
        self._body_s = 0.0
        self.client_left = False

    def read_chat_body(self, limit: int, timeout_s: float, principal: Principal) -> Awaitable[bytes]:
        """:meth:`read_body` as the pipeline asks for a body (a body is read whoever calls)."""
        return self.read_body(limit, timeout_s)

    async def read_body(self, limit: int, timeout_s: float) -> bytes:
        began = time.perf_counter()
        try:
            body = await received_body(self._request, limit, timeout_s)
        except BodyUnreadableError as exc:
            self.client_left, self._unread = True, exc  # the client left while sending (so the server says)
            raise asyncio.CancelledError from None
        finally:
            self._body_s = time.perf_counter() - began
        body = await inflated_body(self._request, body, limit)
        self._timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER_S, self._start_watching)
        return body

    def body_wait(self) -> float:
        """Seconds spent waiting for the client to send its body (inflating it not included)."""
        return self._body_s

    def left_answer(self, request_id: str) -> Answer | None:
        """The answer for a client that left: none, or the 400 for a body the server said it left
        half-sent, in case it did not (each route renders it in its own protocol)."""
        unread = self._unread
        if unread is None:
            return None
        return Answer(unread.status_code, unread.to_body(), {"x-request-id": request_id})

    def _start_watching(self) -> None:
        self._timer = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
                if self._on_leave is None or not self._on_leave(self._task):
                    self._task.cancel()
                return

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
