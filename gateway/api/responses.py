"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``:
OpenAI's Responses API on the chat pipeline.

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

When every model the request can reach serves the Responses API itself
(``responses_api: true``), the request is passed through instead (:class:`PassThrough`):
the pipeline reads it in the internal model, the upstream gets the body as it came and the client
the upstream's answer. The upstream then keeps the response; the store keeps only which
tenant owns its id (and which model holds it), so reading, deleting and continuing it
stay within the tenant, and with the keys that may call that model. A turn the gateway keeps
cannot be continued upstream, nor one an upstream keeps on a translated route (a 400 that says
so; the 403 of a passed-through route for a key that may not call the model keeping it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote_plus

import msgspec
import structlog
from litestar import Request, Response, delete, get, post
from litestar.response import Stream

from gateway.api.answers import EventStream, StreamBroke, answer_of, delta_batches, dropped_header, streams
from gateway.api.credentials import authorization_of
from gateway.api.handoff import hand_to_pipeline
from gateway.api.state import GatewayState
from gateway.auth import Principal
from gateway.background import BackgroundTasks
from gateway.core.model import Answer as CoreAnswer
from gateway.core.model import Message, TextPart
from gateway.core.model import Request as CoreRequest
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    PermissionDeniedError,
    ResponseNotFoundError,
    ResponseStoreUnavailableError,
    UpstreamStatusError,
)
from gateway.pipeline import Answer, KeepAlive, PassThrough, StreamingAnswer, StreamingDeltas
from gateway.protocols import openai_chat
from gateway.protocols import openai_responses as codec
from gateway.protocols.body import decode_body, read_off_loop
from gateway.protocols.engine_fields import without_engine_fields
from gateway.protocols.shared_state import refuse_upstream_ids
from gateway.protocols.tenant_ids import told_back
from gateway.protocols.upstream_json import decode_json
from gateway.responses_store import ResponseStore, StoredResponse, kept_ids, stored_bytes_cap
from gateway.runtime import Runtime
from gateway.sparse_log import SparseLog
from gateway.store.base import StoreTimedOut, StoreUnavailable

__all__ = [
    "cancel_response",
    "create_response",
    "delete_response",
    "list_input_items",
    "retrieve_response",
]

_CLIENT_GONE = Response(content=b"", status_code=499)
_READ_QUERY = {
    "": frozenset({"include", "include[]", "include_obfuscation", "starting_after", "stream"}),
    "/input_items": frozenset({"after", "before", "include", "include[]", "limit", "order"}),
}
"""The query parameters OpenAI's API defines for each read of a passed-through response (and
``before``, Azure OpenAI's); the client's others are not sent upstream (t181)."""
_PROTOCOL = "openai.responses"
T = TypeVar("T")
_log = structlog.get_logger("gateway.responses")
_not_stored = SparseLog(_log, "response_not_stored")


class _GoneUpstream(ResponseNotFoundError):
    """A passed-through response its upstream no longer has: the gateway's record of it can go."""


@dataclass(slots=True)
class _Turn:
    """What the body reader learnt, for the answer: the request, its tenant, the earlier turns."""

    decoded: codec.ResponsesRequest | None = None
    tenant: str = ""
    history: list[Message] = field(default_factory=list)
    ancestors: list[str] = field(default_factory=list)
    """The ids of the turns before this one, for its record (t60: a turn keeps only what it adds)."""
    own_ids: dict[str, str] = field(default_factory=dict)
    """A passed-through request's identifiers as sent upstream, and as the client wrote them."""
    engine_fields: list[str] = field(default_factory=list)
    """The operator's engine fields a passed-through request came with: not sent (t177)."""


@post("/v1/responses", request_max_body_size=None, status_code=200)
async def create_response(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    state: GatewayState = request.app.state.gateway
    store = _store(state)
    turn = _Turn()
    created_at = int(time.time())
    passthrough = PassThrough()

    async def translate(raw: bytes, principal: Principal) -> CoreRequest:
        runtime = state.holder.current
        turn.tenant = principal.tenant
        decoded = await read_off_loop(raw, lambda: codec.decode_request(raw, passed_through=True))
        # f92: an unknown model, or one the key may not call, is its 404 before what the body names is read
        reachable = runtime.router.ends(runtime.router.chat_plan(decoded.request.model, principal.allowed))
        previous = None
        if decoded.previous_response_id is not None:
            previous = await _load(store, turn.tenant, decoded.previous_response_id, "previous_response_id", use=True)
        if _served_by_responses_upstreams(runtime, reachable) and (previous is None or previous.held_by is not None):
            turn.decoded = decoded
            body = _without_shared_state(decode_body(raw, dict[str, Any]), raw)  # read whole: what the view skips too
            passthrough.body, turn.engine_fields = without_engine_fields(body, principal.engine_fields)
            passthrough.asked = codec.priced_options(passthrough.body)  # hosted tools and audio (t159)
            turn.own_ids = told_back(passthrough.body, turn.tenant)
            passthrough.held_by = previous.held_by if previous is not None else None
            return _readable(decoded)
        if previous is not None and previous.held_by is not None:
            runtime.router.refuse_hidden_holder(previous.held_by, reachable, principal.allowed)
            raise InvalidRequestError(  # the key may call it: named (t60)
                f"previous_response_id: response '{decoded.previous_response_id}' is kept by the upstream of "
                f"model '{previous.held_by}'; continue it with a model whose upstream serves the Responses API",
                param="previous_response_id",
            )
        referenced = await _referenced(store, turn.tenant, await read_off_loop(raw, lambda: codec.item_references(raw)))
        decoded = await read_off_loop(
            raw,
            lambda: codec.decode_request(
                raw,
                json_object_ok=lambda model: _json_object_ok(runtime, reachable),
                translated_because=_why_translated(runtime, reachable, principal.allowed),
                referenced=referenced,
            ),
        )
        turn.decoded = decoded
        if previous is not None and decoded.previous_response_id is not None:
            turn.history = await _history(store, turn.tenant, decoded.previous_response_id, previous)
            turn.ancestors = previous.then(decoded.previous_response_id)
        return codec.to_request(decoded, turn.history)

    _, answer = await hand_to_pipeline(request, protocol=_PROTOCOL, translate=translate, passthrough=passthrough)
    if answer is None:
        return _CLIENT_GONE
    headers = dict(answer.headers)
    decoded = turn.decoded
    if decoded is not None and passthrough.body is None:
        names = _dropped(state, decoded, headers)
        if dropped := dropped_header(names):
            headers["x-gateway-dropped"] = dropped
        if "top_p" in names:  # left out for a model that takes one sampler: not echoed as if honoured (t55)
            decoded.echo["top_p"] = None
        if "reasoning" in names:
            decoded.echo["reasoning"] = {"effort": None, "summary": None}
    elif "x-gateway-model" in headers and (dropped := dropped_header(turn.engine_fields)):
        headers["x-gateway-dropped"] = dropped  # passed through: the upstream reads all else itself
    if decoded is None or (isinstance(answer, Answer) and answer.status != 200):
        assert isinstance(answer, Answer)  # nothing decoded: the pipeline answered with an error
        body = _in_responses_terms(answer.body)
        return Response(content=body, status_code=answer.status, headers=headers, media_type="application/json")
    if passthrough.body is not None:
        assert not isinstance(answer, StreamingDeltas)  # the upstream's own body or events
        return await _passed_through(answer, headers, state, turn)
    response_id = codec.new_id("resp")
    if not streams(answer):
        assert isinstance(answer, Answer)
        completion = codec.with_namespaces(answer_of(answer), decoded)
        response = codec.response_object(
            decoded,
            response_id,
            created_at,
            output=codec.output_items(completion, codec.output_ids(response_id)),
            usage=completion.usage,
            finish_reason=completion.finish_reason,
        )
        await _keep(store, turn, response, completion, state.background)
        return Response(
            content=msgspec.json.encode(response), status_code=200, headers=headers, media_type="application/json"
        )
    assert isinstance(answer, StreamingDeltas)  # only a passed-through stream is the upstream's own
    encoder = codec.StreamEncoder(decoded, response_id, created_at, codec.output_ids(response_id))
    return EventStream(
        _events(answer, encoder, store, turn, state.background),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


_CHAT_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


def _in_responses_terms(body: bytes) -> bytes:
    """An error that names a chat request's field (an upstream's refusal of the prompt, ``messages``,
    or of the answer's length, ``max_tokens``) in the Responses API's: the client sent ``input`` and
    ``max_output_tokens`` (t200: ``param: "messages"``, a field it has not)."""
    if b'"param":"m' not in body:
        return body
    error = msgspec.json.decode(body)
    param = error["error"]["param"]
    said = _CHAT_PARAMS.get(param) or ("input" if param.split(".")[0].split("[")[0] == "messages" else None)
    if said is None:
        return body
    error["error"]["param"] = said
    return msgspec.json.encode(error)


@get("/v1/responses/{response_id:str}")
async def retrieve_response(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    """A stored response of the caller's tenant, as it was answered (asked of its upstream if it keeps it)."""
    record = await _record(request, response_id)
    if record.held_by is not None:  # include[], stream, starting_after: the upstream's to read (t60)
        return await _read_upstream(request, record.held_by, response_id, "", record.own_ids)
    if request.query_params.get("stream", "").lower() in ("true", "1"):  # t86: the SDK read the object as no events
        raise InvalidRequestError(
            "stream: a retrieved response streams only while it runs in the background, which this "
            "gateway does not do; retrieve it without stream",
            param="stream",
        )
    return Response(content=msgspec.json.encode(record.response), media_type="application/json")


@get("/v1/responses/{response_id:str}/input_items")
async def list_input_items(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    """The items a stored response of the caller's tenant answered, a page at a time
    (``limit`` 1-100, default 20; ``order`` ``desc``, the default, or ``asc``; ``after`` an item id).
    With an earlier turn gone (deleted, expired or evicted), the conversation after it."""
    record = await _record(request, response_id)
    limit, order, after = _page_query(request)
    if record.held_by is not None:
        return await _read_upstream(request, record.held_by, response_id, "/input_items", record.own_ids)
    turns, _ = await _on_stored(request, lambda store, tenant: store.turns(tenant, record))
    items = _input_items(turns)
    if order == "desc":
        items.reverse()
    if after is not None:
        place = next((index for index, item in enumerate(items) if item["id"] == after), None)
        if place is None:
            raise InvalidRequestError(f"no input item with id {after!r} in this response", param="after")
        items = items[place + 1 :]
    page = items[:limit]
    body = {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
    return Response(content=msgspec.json.encode(body), media_type="application/json")


@post("/v1/responses/{response_id:str}/cancel", status_code=200)
async def cancel_response(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    """Only a background response can be cancelled: one the upstream keeps is asked to; the
    gateway's own are never background (it refuses ``background``), so that is a 400, as OpenAI's."""
    state: GatewayState = request.app.state.gateway
    record = await _record(request, response_id)
    if record.held_by is not None:
        return await _ask_upstream(state, record.held_by, "POST", response_id, "/cancel", own_ids=record.own_ids)
    raise InvalidRequestError("Only responses created with background=true can be cancelled.", param="response_id")


def _input_items(turns: list[StoredResponse]) -> list[dict[str, Any]]:
    """The items the turns' conversation lists, each with the id its turn keeps for it (f76), but
    the last turn's answer: it is the response's own output, not its input."""
    messages: list[Message] = []
    ids: list[str | None] = []
    counts: list[tuple[str, int]] = []
    for turn in turns:
        count = codec.item_count(turn.own)
        ids += turn.item_ids if len(turn.item_ids) == count else [None] * count  # none: a record from before
        messages += turn.own
        counts.append((turn.response["id"], count))
    return codec.input_items(messages[:-1], counts, ids)


def _page_query(request: Request[Any, Any, Any]) -> tuple[int, str, str | None]:
    query = request.query_params
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequestError(f"limit: an integer from 1 to 100 is required, got {raw_limit!r}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order: expected 'asc' or 'desc', got {order!r}", param="order")
    return limit, order, query.get("after") or None


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(request: Request[Any, Any, Any], response_id: str) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    record = await _record(request, response_id)
    answer = None
    if record.held_by is not None:
        try:  # an upstream that did not delete it keeps the record: the tenant can try again
            answer = await _ask_upstream(state, record.held_by, "DELETE", response_id)
        except ResponseNotFoundError:
            await _on_stored(request, lambda store, tenant: store.delete(tenant, response_id))
            raise  # gone upstream already: forgotten here too
    if not await _on_stored(request, lambda store, tenant: store.delete(tenant, response_id)):
        raise _not_found(response_id)
    if answer is not None:
        return answer
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(content=msgspec.json.encode(body), media_type="application/json")


async def _record(request: Request[Any, Any, Any], response_id: str) -> StoredResponse:
    """The caller's tenant's record of ``response_id`` (else a 404); one an upstream keeps is a 403 for
    a key that may not reach its model, as continuing it is (t147: read and deleted at its upstream)."""
    record = await _on_stored(request, lambda store, tenant: store.load(tenant, response_id))
    if record is None:
        raise _not_found(response_id)
    if record.held_by is not None:
        state: GatewayState = request.app.state.gateway
        runtime = state.holder.current
        allowed = runtime.auth.authenticate(authorization_of(request)).allowed
        if not runtime.router.reaches_held(record.held_by, allowed):
            raise PermissionDeniedError(
                "the response is kept by a model this key may not use",  # not named (t60)
                param="response_id",
            )
    return record


async def _on_stored(request: Request[Any, Any, Any], operation: Callable[[ResponseStore, str], Awaitable[T]]) -> T:
    """``operation`` on the caller's tenant's stored responses; a 503 when the store cannot answer."""
    state: GatewayState = request.app.state.gateway
    tenant = state.holder.current.auth.authenticate(authorization_of(request)).tenant
    try:
        return await operation(_store(state), tenant)
    except StoreUnavailable:
        raise _unavailable(None) from None


async def _read_upstream(
    request: Request[Any, Any, Any], held_by: str, response_id: str, part: str, own_ids: Mapping[str, str | None]
) -> Response[bytes]:
    """``GET`` a passed-through response (``part`` of it) at its upstream, with the parameters of the
    client's query that OpenAI defines for it; one gone there (expired, deleted there, never kept by a
    Zero-Data-Retention organisation) is forgotten here too: its record would otherwise claim it for
    30 days (t60)."""
    state: GatewayState = request.app.state.gateway
    query = _forwarded_query(request.url.query, _READ_QUERY[part])
    try:
        return await _ask_upstream(
            state, held_by, "GET", response_id, part + (f"?{query}" if query else ""), own_ids=own_ids
        )
    except _GoneUpstream:
        await _on_stored(request, lambda store, tenant: store.delete(tenant, response_id))
        raise


# -- helpers ----------------------------------------------------------------------


def _forwarded_query(query: str, names: frozenset[str]) -> str:
    """The parameters of the client's ``query`` named in ``names``, each as the client encoded it; no
    other is the client's to send (t181: a repeated ``api-version`` or proxy token after the base URL's)."""
    return "&".join(pair for pair in query.split("&") if unquote_plus(pair.partition("=")[0]) in names)


def _store(state: GatewayState) -> ResponseStore:
    return ResponseStore(state.kv, lambda tenant: stored_bytes_cap(state.holder.current.policy, tenant))


def _not_found(response_id: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"Response with id '{response_id}' not found.")


def _unavailable(param: str | None) -> ResponseStoreUnavailableError:
    return ResponseStoreUnavailableError(
        "stored responses cannot be read right now (the store is unavailable); retry later", param=param
    )


async def _load(
    store: ResponseStore, tenant: str, response_id: str, param: str, *, use: bool = False
) -> StoredResponse:
    try:
        record = await store.load(tenant, response_id, use=use)
    except StoreUnavailable:
        raise _unavailable(param) from None
    if record is None:
        raise _previous_not_found(response_id, param)
    return record


async def _referenced(store: ResponseStore, tenant: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The output items of the tenant's own translated responses that ``item_ids`` name, by id
    (each response read as used, as continuing it is); an id not found is left out, for the
    decoding to refuse as OpenAI does. A passed-through response's items are its upstream's."""
    if not item_ids:
        return {}
    wanted = {item_id: codec.response_of_item(item_id) for item_id in item_ids}
    response_ids = list(dict.fromkeys(response_id for response_id in wanted.values() if response_id is not None))
    if not response_ids:
        return {}
    try:
        records = await store.load_many(tenant, response_ids, use=True)
    except StoreUnavailable:
        raise _unavailable("input") from None
    output = {
        item["id"]: item
        for record in records
        if record is not None and record.held_by is None
        for item in record.response.get("output", ())
        if isinstance(item, dict) and isinstance(item.get("id"), str)
    }
    return {item_id: output[item_id] for item_id in item_ids if item_id in output}


async def _history(store: ResponseStore, tenant: str, response_id: str, record: StoredResponse) -> list[Message]:
    """The conversation a new turn continues (read as used: a conversation in use keeps its turns
    from the tenant's cap longer than idle ones); one with an earlier turn gone cannot be
    continued, as the response itself gone cannot (t60)."""
    try:
        messages, gone = await store.conversation(tenant, record, use=True)
    except StoreUnavailable:
        raise _unavailable("previous_response_id") from None
    if gone is not None:
        raise _previous_not_found(response_id, "previous_response_id", gone)
    return messages


def _previous_not_found(response_id: str, param: str, gone: str | None = None) -> InvalidRequestError:
    """OpenAI's answer, which clients such as Codex act on (a 400, not a 404): they send the whole
    conversation again. ``gone``: an earlier turn of the conversation, which the message names
    (f92: it said the response was not found, which ``GET`` still returned)."""
    said = f"Previous response with id '{response_id}' not found."
    if gone is not None:
        said = (
            f"Previous response with id '{response_id}' continues response '{gone}', which was not found "
            "(deleted or expired)."
        )
    return InvalidRequestError(said, param=param, code="previous_response_not_found")


def _json_object_ok(runtime: Runtime, names: tuple[str, ...]) -> bool:
    """JSON mode reaches the answer only if every model the request may go to (``names``) honours it."""
    return all(runtime.policy.models[name].provider != "anthropic" for name in names)


# -- passed through -------------------------------------------------------------------


def _served_by_responses_upstreams(runtime: Runtime, names: tuple[str, ...]) -> bool:
    """Whether every model the request may reach (``names``) serves the Responses API."""
    return all(runtime.policy.models[name].responses_api for name in names)


def _why_translated(runtime: Runtime, names: tuple[str, ...], allowed: frozenset[str]) -> str:
    """Why a request that may reach ``names`` is translated to chat rather than passed through;
    the model that makes it so is named only to a key that may call it (t60)."""
    chat = next((name for name in names if not runtime.policy.models[name].responses_api), None)
    if chat is None:
        return "previous_response_id names a response the gateway keeps, so the request is translated to chat"
    named = f"model '{chat}'" if "*" in allowed or chat in allowed else "a model"
    return f"the route can reach {named} without responses_api: true, so the request is translated to chat"


def _without_shared_state(body: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """The body, refused if it names upstream state by an id the gateway does not own-check.

    The upstream keeps conversations, items, files, vector stores and containers for every
    tenant under one key: a ``conversation`` id, an ``item_reference``, a ``file_id``, a
    file search's ``vector_store_ids`` or a code interpreter's ``container`` id would reach
    whatever another tenant made (t26). A stored ``prompt`` is the operator's, shared by every
    tenant too, and the hosted tools it offers would run unpriced: only the body's are (t169).
    A reasoning item is sent on by its id: agents replay their own (the Agents SDK's default),
    and an id cannot be guessed.
    (``previous_response_id`` is checked against the tenant's own responses before this.)
    """
    if body.get("conversation") is not None:
        raise InvalidRequestError(
            "'conversation' is not supported by this gateway (an upstream conversation is shared by every "
            "tenant); continue with previous_response_id",
            param="conversation",
        )
    if body.get("prompt") is not None:
        raise InvalidRequestError(
            "'prompt' is not supported by this gateway (an upstream stored prompt is shared by every tenant, "
            "and its tools are not priced); send its instructions and tools in the request",
            param="prompt",
        )
    items = body.get("input")
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if codec.reference_id(item) is not None:
            raise InvalidRequestError(
                f"input[{index}]: item references are not supported by this gateway (upstream items are shared "
                "by every tenant); send the item itself",
                param=f"input[{index}]",
            )
    refuse_upstream_ids(body, raw)
    return body


def _readable(decoded: codec.ResponsesRequest) -> CoreRequest:
    """What the pipeline reads of a passed-through request (its text, for counting and routing).

    Input that only the upstream can read (a custom tool's output, an item reference) may
    leave no message at all: the pipeline then reads one empty user turn."""
    if decoded.request.messages or decoded.instructions:
        return codec.to_request(decoded, upstream_keeps=True)
    return msgspec.structs.replace(decoded.request, messages=[Message("user", (TextPart(""),))])


def _dropped(state: GatewayState, decoded: codec.ResponsesRequest, headers: Mapping[str, str]) -> list[str]:
    """What did not reach the model that answered: what its upstream is not sent, as for a chat
    client (an Anthropic upstream's: ``prompt_cache_key``, ``safety_identifier`` beside ``user``;
    t48: dropped without a word), and a tool result's images where a chat upstream answered
    (its tool message is text; t43); nothing where no model was called (t206)."""
    runtime = state.holder.current
    model = headers.get("x-gateway-model", "")
    if not model:
        return []
    answerer, provider = runtime.policy.models.get(model), runtime.providers.get(model)
    if answerer is None:
        return decoded.request.dropped
    lost = provider.not_carried(decoded.request) if provider is not None else []
    # the client sent reasoning.effort: an upstream not sent it is named by the client's name
    lost = ["reasoning" if name == "reasoning_effort" else name for name in lost]
    if answerer.provider != "anthropic":
        lost += openai_chat.lost_on_chat_upstreams(decoded.request)
    return [*decoded.request.dropped, *lost]  # dropped_header names each once


async def _passed_through(
    answer: Answer | StreamingAnswer, headers: dict[str, str], state: GatewayState, turn: _Turn
) -> Response[bytes] | Stream:
    """The upstream's answer as it came; a response it keeps is claimed for the caller's tenant.

    One that cannot be claimed (Redis down) would be kept upstream where no tenant can reach it:
    the client is told ``store: false`` and the upstream is asked to delete it, in the background."""
    held_by = headers.get("x-gateway-model", "")
    keep = turn.decoded is not None and turn.decoded.store
    own_ids = _as_json(turn.own_ids)
    record = StoredResponse.held(held_by, kept_ids(turn.own_ids))
    if isinstance(answer, Answer):
        body = _own_ids(answer.body, own_ids)
        if keep:
            response = msgspec.json.decode(body)
            response_id = response.get("id") if isinstance(response, dict) else None
            if isinstance(response_id, str) and not await _claim(_store(state), turn.tenant, response_id, record):
                response["store"] = False
                body = msgspec.json.encode(response)
                state.background.spawn(_forget(state, held_by, response_id), "forget-unclaimed-response")
        return Response(content=body, status_code=200, headers=headers, media_type="application/json")
    events = _with_own_ids(answer.events, own_ids) if own_ids else answer.events
    return EventStream(
        _claimed_events(events, state, turn.tenant, record) if keep else events,
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _as_json(own_ids: Mapping[str, str | None]) -> dict[bytes, bytes]:
    """Each digest as a JSON string, with the client's value as JSON (``null`` where it was not kept)."""
    return {msgspec.json.encode(sent): msgspec.json.encode(written) for sent, written in own_ids.items()}


def _own_ids(data: bytes, own_ids: dict[bytes, bytes]) -> bytes:
    """``data`` with the client's own identifiers where it echoes the digests the upstream was sent."""
    for sent, written in own_ids.items():
        data = data.replace(sent, written)
    return data


async def _with_own_ids(events: AsyncIterator[bytes], own_ids: dict[bytes, bytes]) -> AsyncIterator[bytes]:
    """The upstream's events with the client's own identifiers where they echo the request."""
    try:
        async for piece in events:
            yield _own_ids(piece, own_ids)
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


async def _claimed_events(
    events: AsyncIterator[bytes], state: GatewayState, tenant: str, record: StoredResponse
) -> AsyncIterator[bytes]:
    """The events, the response's id claimed as soon as ``response.created`` names it (a piece
    may hold several events: the relay holds the created event back until model work shows)."""
    claimed = False
    unclaimed: str | None = None
    marker = b"event: response.created\ndata: "
    try:
        async for piece in events:
            at = -1 if claimed else piece.find(marker)
            if at >= 0:
                claimed = True
                start = at + len(marker)
                end = piece.find(b"\n\n", start)
                data = _event_json(piece[start : end if end >= 0 else len(piece)])
                response = data.get("response") if isinstance(data, dict) else None
                response_id = response.get("id") if isinstance(response, dict) else None
                if isinstance(response_id, str) and not await _claim(_store(state), tenant, response_id, record):
                    unclaimed = response_id
            yield piece if unclaimed is None else _not_stored_events(piece)
    finally:
        if unclaimed is not None:  # after the answer (or the client's leaving): a slow DELETE holds no client
            held_by = record.held_by or ""
            state.background.spawn(_forget(state, held_by, unclaimed), "forget-unclaimed-response")
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _event_json(data: bytes) -> Any:
    """A passed-through event's JSON, read as the SDKs read it (a lone surrogate escape: U+FFFD), or
    None when it is none: the event goes on to the client as it came either way (t80: the stream
    was cut, with no ``response.failed``, on half an emoji)."""
    try:
        return decode_json(data)
    except msgspec.DecodeError:
        return None


def _not_stored_events(piece: bytes) -> bytes:
    """The piece's events with every response object in them saying ``store: false``."""
    events = piece.split(b"\n\n")
    for index, event in enumerate(events):
        at = event.find(b"data: ")
        if at < 0 or b'"store"' not in event:
            continue
        data = _event_json(event[at + 6 :])
        response = data.get("response") if isinstance(data, dict) else None
        if isinstance(response, dict) and "store" in response:
            response["store"] = False
            events[index] = event[: at + 6] + msgspec.json.encode(data)
    return b"\n\n".join(events)


async def _claim(store: ResponseStore, tenant: str, response_id: str, record: StoredResponse) -> bool:
    """Keep ``record`` (a passed-through response's: its model, and the client's own identifiers)."""
    try:
        if await store.save(tenant, response_id, record):
            return True
        _not_stored(reason="larger than the tenant's cap on stored responses")
    except StoreUnavailable:
        _not_stored(reason="store unavailable")
    return False


class _Slots:
    """At most ``limit`` background jobs of one kind at once in this process."""

    def __init__(self, limit: int) -> None:
        self._limit, self._taken = limit, 0

    @contextlib.contextmanager
    def one(self) -> Iterator[bool]:
        """Whether a slot was free (and is held until the block ends)."""
        if self._taken >= self._limit:
            yield False
            return
        self._taken += 1
        try:
            yield True
        finally:
            self._taken -= 1


_forgetting = _Slots(2)
"""Deletes of unclaimed responses in flight per process: they share the model's connection pool
with live traffic, which a Redis outage must not let them starve."""
_FORGET_TIMEOUT_S = 5.0


async def _forget(state: GatewayState, held_by: str, response_id: str) -> None:
    """Ask the upstream to delete a response no tenant can reach (best effort: one that is not
    deleted is logged with its id, for ops to delete)."""
    with _forgetting.one() as free:
        if not free:
            _log.warning(
                "unclaimed_response_kept_upstream", model=held_by, response_id=response_id, error="deletes busy"
            )
            return
        try:
            async with asyncio.timeout(_FORGET_TIMEOUT_S):
                await _ask_upstream(state, held_by, "DELETE", response_id)
        except ResponseNotFoundError:
            pass  # gone already
        except (GatewayError, TimeoutError) as exc:
            error = str(exc)[:200] or "no answer within 5 s"
            _log.warning("unclaimed_response_kept_upstream", model=held_by, response_id=response_id, error=error)
        except asyncio.CancelledError:  # shutting down
            _log.warning("unclaimed_response_kept_upstream", model=held_by, response_id=response_id, error="shutdown")
            raise


async def _ask_upstream(
    state: GatewayState,
    model: str,
    method: str,
    response_id: str,
    rest: str = "",
    *,
    own_ids: Mapping[str, str | None] | None = None,
) -> Response[bytes]:
    """Read or delete a response (``rest``: a part of it, with its query) at the upstream that
    keeps it; its own answer, errors included, with the client's own identifiers where it echoes
    the digests it was sent (``own_ids``, from the response's record: t48)."""
    provider = state.holder.current.providers.get(model)
    if provider is None:
        raise _not_found(response_id)  # its model is gone from the policy: nothing can reach it
    try:
        answer = await provider.forward(method, f"responses/{response_id}{rest}")
    except UpstreamStatusError as exc:
        if exc.upstream_status == 404:  # gone upstream (expired, or deleted there)
            raise _GoneUpstream(f"Response with id '{response_id}' not found.") from None
        raise  # in the gateway's words: the upstream's body can name its organisation (a 429's)
    content = _own_ids(answer.content, _as_json(own_ids)) if own_ids else answer.content
    media_type = answer.headers.get("content-type") or "application/json"  # a GET with ?stream=true: events
    return Response(content=content, status_code=answer.status_code, media_type=media_type)


async def _keep(
    store: ResponseStore, turn: _Turn, response: dict[str, Any], answer: CoreAnswer, background: BackgroundTasks
) -> None:
    """Store the turn; when the store cannot take it, the response says ``store: false`` (a
    client told true would later be told 404 for a response it was promised). A write that timed
    out may land all the same: it is withdrawn in the background, so ``false`` holds (t130)."""
    decoded = turn.decoded
    if decoded is None or not decoded.store:
        return
    said = codec.assistant_message(answer)
    added = [*decoded.request.messages, said]  # not the history: t60
    item_ids = codec.turn_item_ids(decoded, said, response["output"])
    try:
        if await store.save(
            turn.tenant, response["id"], StoredResponse.turn(response, added, turn.ancestors, item_ids)
        ):
            return
        _not_stored(reason="larger than the tenant's cap on stored responses")
    except StoreTimedOut:
        _not_stored(reason="store timed out")
        background.spawn(_withdraw(store, turn.tenant, response["id"]), "withdraw-response")
    except StoreUnavailable:
        _not_stored(reason="store unavailable")
    response["store"] = False


_withdrawing = _Slots(1000)
"""Withdrawals waiting for Redis per process: each is a timed-out write of a request, so an outage
that began mid-write makes a second's worth; Redis slow for long must not gather them unbounded."""
_WITHDRAW_EVERY_S = 2.0
_WITHDRAW_FOR_S = 600.0


async def _withdraw(store: ResponseStore, tenant: str, response_id: str) -> None:
    """Withdraw a turn whose write timed out (:meth:`ResponseStore.withdraw`), tried again until
    Redis answers; one not withdrawn is logged with its id, for ops to delete."""
    with _withdrawing.one() as free:
        if not free:
            _log.warning("response_maybe_stored", tenant=tenant, response_id=response_id, error="withdrawals busy")
            return
        try:
            deadline = time.monotonic() + _WITHDRAW_FOR_S
            while True:
                try:
                    await store.withdraw(tenant, response_id)
                    return
                except StoreUnavailable:
                    if time.monotonic() >= deadline:
                        break
                await asyncio.sleep(_WITHDRAW_EVERY_S)
            _log.warning("response_maybe_stored", tenant=tenant, response_id=response_id, error="no answer in 10 min")
        except asyncio.CancelledError:  # shutting down
            _log.warning("response_maybe_stored", tenant=tenant, response_id=response_id, error="shutdown")
            raise


async def _events(
    answer: StreamingDeltas,
    encoder: codec.StreamEncoder,
    store: ResponseStore,
    turn: _Turn,
    background: BackgroundTasks,
) -> AsyncIterator[bytes]:
    """The pipeline's answer as Responses events; the turn is stored before its last event,
    so the client can continue from it at once."""
    yield encoder.start()
    ended = False
    # Closed here, in this task, however the stream ends, as on the other edges: left to the collector,
    # the batches of a stream closed mid-way were closed on a task of their own, while the pipeline's
    # stream was still closing ("aclose(): asynchronous generator is already running", f227).
    async with contextlib.aclosing(delta_batches(answer)) as batches:
        async for batch in batches:
            if batch is None:
                ended = True
                closing = encoder.close_items()
                assert encoder.response is not None
                await _keep(store, turn, encoder.response, encoder.answer(), background)
                yield closing + encoder.completed()
            elif isinstance(batch, KeepAlive):
                yield b": keep-alive\n\n"  # an SSE comment: the SDKs skip it
            elif isinstance(batch, StreamBroke):
                ended = True
                yield encoder.fail(str(batch.error.get("message") or "upstream error"))
            else:
                out = encoder.feed(batch)
                if out:
                    yield out
        if not ended:
            yield encoder.fail("the answer ended before it was complete")
