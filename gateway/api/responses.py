"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: OpenAI's Responses API on the chat pipeline.

The request is decoded into the internal model and handed to the pipeline as a chat
request, so auth, limits, the cache, routing, fallbacks and the log apply unchanged;
the pipeline's answer (a completion, a stream of chunks, or an error) is encoded back
as a ``response`` object or Responses stream events. The pipeline's error bodies are
OpenAI's already and pass through as they are.

With ``store`` (the default) the turn is kept per tenant (:mod:`gateway.responses_store`)
before the client gets the answer, so a next request can name it at once as
``previous_response_id``: its conversation is put before the new input. A turn that
cannot be stored (the store is down) is still answered, and a warning logged.
Reading a stored turn needs the store: ``previous_response_id`` is then a 503.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog
from litestar import Request, Response, delete, get, post
from litestar.response import Stream

from gateway.api.handoff import hand_to_pipeline
from gateway.api.state import GatewayState
from gateway.core.model import Answer as CoreAnswer
from gateway.core.model import Message
from gateway.errors import GatewayError, ServiceUnavailableError
from gateway.pipeline import Answer, StreamingAnswer
from gateway.protocols import openai_chat
from gateway.protocols import openai_responses as codec
from gateway.responses_store import ResponseStore, StoredResponse
from gateway.runtime import Runtime
from gateway.store.base import StoreUnavailable

__all__ = [
    "ResponseNotFoundError",
    "ResponseStoreUnavailableError",
    "create_response",
    "delete_response",
    "retrieve_response",
]

_CLIENT_GONE = Response(content=b"", status_code=499)
_PROTOCOL = "openai.responses"
T = TypeVar("T")
_log = structlog.get_logger("gateway.responses")


class ResponseNotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class ResponseStoreUnavailableError(ServiceUnavailableError):
    code = "response_store_unavailable"


@dataclass(slots=True)
class _Turn:
    """What the body reader learnt, for the answer: the request, its tenant, the earlier turns."""

    decoded: codec.ResponsesRequest | None = None
    tenant: str = ""
    history: list[Message] = field(default_factory=list)


@post("/v1/responses", request_max_body_size=None, status_code=200)
async def create_response(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    state: GatewayState = request.app.state.gateway
    store = _store(state)
    turn = _Turn()
    created_at = int(time.time())

    async def translate(raw: bytes) -> bytes:
        runtime = state.holder.current
        # The pipeline has authenticated the caller already; this is only to learn the tenant.
        turn.tenant = runtime.auth.authenticate(request.headers.get("authorization")).tenant
        decoded = codec.decode_request(raw, json_object_ok=lambda model: _json_object_ok(runtime, model))
        turn.decoded = decoded
        if decoded.previous_response_id is not None:
            turn.history = await _history(store, turn.tenant, decoded.previous_response_id)
        return msgspec.json.encode(codec.to_chat_body(decoded, turn.history))

    _, answer = await hand_to_pipeline(request, protocol=_PROTOCOL, translate=translate)
    if answer is None:
        return _CLIENT_GONE
    headers = dict(answer.headers)
    decoded = turn.decoded
    if decoded is not None and decoded.request.dropped:
        headers["x-gateway-dropped"] = ",".join(decoded.request.dropped)
    if decoded is None or (isinstance(answer, Answer) and answer.status != 200):
        assert isinstance(answer, Answer)  # nothing decoded: the pipeline answered with an error
        return Response(content=answer.body, status_code=answer.status, headers=headers, media_type="application/json")
    response_id = codec.new_id("resp")
    if isinstance(answer, Answer):
        completion = openai_chat.answer_from_completion(msgspec.json.decode(answer.body))
        response = codec.response_object(
            decoded,
            response_id,
            created_at,
            output=codec.output_items(completion),
            usage=completion.usage,
            finish_reason=completion.finish_reason,
        )
        await _keep(store, turn, response, completion)
        return Response(
            content=msgspec.json.encode(response), status_code=200, headers=headers, media_type="application/json"
        )
    encoder = codec.StreamEncoder(decoded, response_id, created_at)
    return Stream(
        _events(answer, encoder, store, turn),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@get("/v1/responses/{response_id:str}")
async def retrieve_response(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    """A stored response of the caller's tenant, as it was answered."""
    record = await _on_stored(request, lambda store, tenant: store.load(tenant, response_id))
    if record is None:
        raise _not_found(response_id)
    return Response(content=msgspec.json.encode(record.response), media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    if not await _on_stored(request, lambda store, tenant: store.delete(tenant, response_id)):
        raise _not_found(response_id)
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(content=msgspec.json.encode(body), media_type="application/json")


async def _on_stored(request: Request[Any, Any, Any], operation: Callable[[ResponseStore, str], Awaitable[T]]) -> T:
    """``operation`` on the caller's tenant's stored responses; a 503 when the store cannot answer."""
    state: GatewayState = request.app.state.gateway
    tenant = state.holder.current.auth.authenticate(request.headers.get("authorization")).tenant
    try:
        return await operation(_store(state), tenant)
    except StoreUnavailable:
        raise _unavailable(None) from None


# -- helpers ----------------------------------------------------------------------


def _store(state: GatewayState) -> ResponseStore:
    return ResponseStore(state.kv)


def _not_found(response_id: str, param: str | None = None, code: str | None = None) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"Response with id '{response_id}' not found.", param=param, code=code)


def _unavailable(param: str | None) -> ResponseStoreUnavailableError:
    return ResponseStoreUnavailableError(
        "stored responses cannot be read right now (the store is unavailable); retry later", param=param
    )


async def _history(store: ResponseStore, tenant: str, response_id: str) -> list[Message]:
    try:
        record = await store.load(tenant, response_id)
    except StoreUnavailable:
        raise _unavailable("previous_response_id") from None
    if record is None:
        raise _not_found(response_id, "previous_response_id", "previous_response_not_found")
    return record.messages


def _json_object_ok(runtime: Runtime, model: str) -> bool:
    """JSON mode reaches the answer only if every model the request may go to honours it."""
    try:
        plan = runtime.router.plan(model)
    except GatewayError:
        return True  # the pipeline answers the unknown model with its own error
    return all(runtime.policy.models[name].provider != "anthropic" for name in plan.candidates)


async def _keep(store: ResponseStore, turn: _Turn, response: dict[str, Any], answer: CoreAnswer) -> None:
    decoded = turn.decoded
    if decoded is None or not decoded.store:
        return
    messages = [*turn.history, *decoded.request.messages, codec.assistant_message(answer)]
    try:
        await store.save(turn.tenant, response["id"], StoredResponse(response=response, messages=messages))
    except StoreUnavailable:
        _log.warning("response_not_stored", response_id=response["id"], reason="store unavailable")


async def _events(
    answer: StreamingAnswer, encoder: codec.StreamEncoder, store: ResponseStore, turn: _Turn
) -> AsyncIterator[bytes]:
    """The pipeline's chat chunks (``data: {...}`` frames, ``data: [DONE]`` last) as Responses events.

    The turn is stored before its last event, so the client can continue from it at once.
    The pipeline's stream is read to its end: after ``[DONE]`` it still fills the cache and logs.
    """
    reader = openai_chat.ChunkReader()
    yield encoder.start()
    ended = False
    try:
        async for chunk in openai_chat.chat_stream_chunks(answer.events):
            if chunk is None:
                ended = True
                last = encoder.finish()
                assert encoder.response is not None
                await _keep(store, turn, encoder.response, encoder.answer())
                yield last
            elif "error" in chunk:
                ended = True
                error = chunk["error"] or {}
                yield encoder.fail(str(error.get("message") or "upstream error"))
            else:
                out = encoder.feed(reader.read(chunk))
                if out:
                    yield out
        if not ended:
            yield encoder.fail("the answer ended before it was complete")
    finally:
        close = getattr(answer.events, "aclose", None)
        if close is not None:
            await close()
