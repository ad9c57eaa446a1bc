"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API on the chat pipeline.

The request is decoded into the internal model and handed to the pipeline as a chat
request, so auth, limits, the cache, routing, fallbacks and the log apply unchanged;
the pipeline's answer (a completion, a stream of chunks, or an error) is encoded back
in Anthropic's shapes. ``x-api-key`` is accepted as well as ``Authorization: Bearer``;
``anthropic-version`` and ``anthropic-beta`` are accepted and need nothing from us.

When every model the request can reach is Anthropic's and the internal model cannot hold
all of the request (documents, server tools, ``top_k``, ``container``, a ``system`` message in
``messages``, ...), it is passed through (:class:`~gateway.pipeline.PassThrough`): the
pipeline reads the internal model's view of it, the upstream gets the body as it came (with
the client's ``anthropic-beta``),
and the client the upstream's message or events. What the internal model holds is
translated as before, and so can be served from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.response import Stream

from gateway.api.answers import EventStream, StreamBroke, answer_of, delta_batches, dropped_header, streams
from gateway.api.bodies import read_body
from gateway.api.credentials import authorization_of
from gateway.api.handoff import hand_to_pipeline, request_id_of
from gateway.api.state import GatewayState
from gateway.auth import Principal
from gateway.core.model import Request as CoreRequest
from gateway.core.model import UsageReport
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ThreadNotFoundError,
    ThreadStoreUnavailableError,
    UpstreamError,
)
from gateway.pipeline import Answer, KeepAlive, PassThrough, StreamingAnswer, StreamingDeltas
from gateway.protocols import anthropic_messages as anthropic
from gateway.protocols import openai_chat
from gateway.protocols.anthropic_threads import continued_message
from gateway.protocols.body import decode_body, named_model, read_off_loop
from gateway.protocols.shared_state import refuse_upstream_ids
from gateway.responses_store import stored_bytes_cap
from gateway.store.base import StoreUnavailable
from gateway.thread_store import ThreadStore
from gateway.tokens import count_prompt, prompt_chars
from gateway.upstreams.anthropic import AnthropicProvider, joined_betas

__all__ = ["count_message_tokens", "create_message"]

_CLIENT_GONE = Response(content=b"", status_code=499)
_PROTOCOL = "anthropic.messages"
_log = structlog.get_logger("gateway.messages")


@post("/v1/messages", request_max_body_size=None, status_code=200)
async def create_message(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    asked: list[CoreRequest] = []
    passthrough = PassThrough()
    thread = _Thread()

    async def translate(raw: bytes, principal: Principal) -> CoreRequest:
        decoded = await read_off_loop(raw, lambda: read(raw, principal))
        if thread.asked:
            thread.tenant = principal.tenant
            if thread.continues is not None:
                await _own_thread(_threads(request), principal.tenant, thread.continues)
        return decoded

    def read(raw: bytes, principal: Principal) -> CoreRequest:
        body = _json_object(raw)
        betas = _betas(request)
        if _only_anthropic_upstreams(request, body, principal.allowed):
            decoded = _translatable(raw, body)
            if decoded is None:  # the translation would lose something: the body goes as it came
                thread.asked = body.get("thread") is not None
                thread.continues = continued_message(body)  # own-checked in translate
                decoded = anthropic.decode_request(raw, passed_through=True, continued=thread.continues is not None)
                passthrough.body = _without_shared_state(body, raw)
                if anthropic.thinking_left_out(decoded):  # a loop another model opened (t21), on a
                    # route of Anthropic's models now: it goes without thinking
                    passthrough.body = {name: value for name, value in passthrough.body.items() if name != "thinking"}
                passthrough.asked = anthropic.priced_options(passthrough.body)  # only so they reach Anthropic (t59)
                if betas:
                    passthrough.headers["anthropic-beta"] = betas
        else:
            hints = _refuse_unread(body)
            decoded = anthropic.decode_request(raw)
            # no upstream of the route but Anthropic's can honour these
            lost = ["thinking"] if decoded.thinking is not None else []
            lost += openai_chat.lost_on_chat_upstreams(decoded)
            lost += anthropic.nested_fields_not_carried(body)
            lost += hints
            decoded.dropped.extend(name for name in dict.fromkeys(lost) if name not in decoded.dropped)
        decoded.betas = betas  # a translated request's too
        decoded.fills_window = True  # as Anthropic's models do: max_tokens is a ceiling, not a demand (t59)
        asked.append(decoded)
        return decoded

    request_id, answer = await hand_to_pipeline(
        request,
        protocol=_PROTOCOL,
        authorization=authorization_of(request),
        translate=translate,
        passthrough=passthrough,
    )
    if answer is None:
        return _CLIENT_GONE
    model = asked[0].model if asked else ""
    headers = {**answer.headers, "request-id": f"req_{request_id}"}
    answered_by = headers.get("x-gateway-model")
    dropped = dropped_header(
        _dropped(request, asked[0], answered_by, translated=passthrough.body is None) if asked else []
    )
    if dropped:
        headers["x-gateway-dropped"] = dropped
    if isinstance(answer, Answer) and answer.status != 200:
        return _error(answer.status, _message_of(answer.body, asked[0].max_tokens if asked else None), headers)
    if not streams(answer):
        assert isinstance(answer, Answer)
        if passthrough.body is not None:  # the upstream's own message
            if thread.asked:
                await _claim_answer(_threads(request), thread.tenant, answer.body)
            return Response(content=answer.body, status_code=200, headers=headers, media_type="application/json")
        body = anthropic.encode_answer(answer_of(answer), f"msg_{request_id}", model)
        return Response(content=body, status_code=200, headers=headers, media_type="application/json")
    assert not isinstance(answer, Answer)
    if isinstance(answer, StreamingAnswer):  # passed through: the upstream's own events
        events = _claimed_events(answer.events, _threads(request), thread.tenant) if thread.asked else answer.events
    else:
        events = _events(answer, f"msg_{request_id}", model)
    return EventStream(
        events,
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@dataclass(slots=True)
class _Thread:
    """A passed-through request's ``thread`` (Anthropic's message-threads beta)."""

    asked: bool = False
    """Whether it has one: the message answered is then claimed for the tenant."""
    continues: str | None = None
    """The message a ``continue`` names, which must be the tenant's."""
    tenant: str = ""


def _threads(request: Request[Any, Any, Any]) -> ThreadStore:
    state: GatewayState = request.app.state.gateway
    return ThreadStore(state.kv, lambda tenant: stored_bytes_cap(state.holder.current.policy, tenant))


async def _own_thread(threads: ThreadStore, tenant: str, message_id: str) -> None:
    """Refuses a ``continue`` of a message the gateway did not answer for ``tenant`` in a thread:
    the upstream keeps every tenant's threads under one key (t202). Told as a thread unknown
    upstream is, a 404, so another tenant's is not told from one that never was."""
    try:
        owned = await threads.owns(tenant, message_id)
    except StoreUnavailable:
        raise ThreadStoreUnavailableError(
            "thread: the gateway cannot tell whose thread this is right now (its store is unavailable); retry later",
            param="thread.previous_message_id",
        ) from None
    if not owned:
        raise ThreadNotFoundError(
            f"thread.previous_message_id: no thread message '{message_id}' was found (unknown or expired)",
            param="thread.previous_message_id",
        )


async def _claim_answer(threads: ThreadStore, tenant: str, body: bytes) -> None:
    """Claims the message an upstream answered to a request with a ``thread`` for ``tenant``."""
    try:
        message = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return
    message_id = message.get("id") if isinstance(message, dict) else None
    if isinstance(message_id, str) and message_id and not await threads.claim(tenant, message_id):
        _log.warning("thread_message_unclaimed")  # it cannot be continued through the gateway


_LOOKED_AT = 65536
"""The bytes of a stream looked through for its ``message_start`` (Anthropic's first event)."""


async def _claimed_events(events: AsyncIterator[bytes], threads: ThreadStore, tenant: str) -> AsyncIterator[bytes]:
    """The upstream's events, its message claimed for ``tenant`` before the client sees its id."""
    seen = b""
    looking = True
    try:
        async for piece in events:
            if looking:
                seen += piece
                for line in seen.split(b"\n")[:-1]:
                    if line.startswith(b"data:") and b"message_start" in line:
                        looking = False
                        with contextlib.suppress(msgspec.DecodeError):
                            started = msgspec.json.decode(line[5:])
                            message = started.get("message") if isinstance(started, dict) else None
                            if isinstance(message, dict):
                                await _claim_answer(threads, tenant, msgspec.json.encode(message))
                        break
                looking = looking and len(seen) < _LOOKED_AT
            yield piece
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _betas(request: Request[Any, Any, Any]) -> str | None:
    """The client's ``anthropic-beta``: every line of it, as one list (RFC 9110; ``get`` reads the first alone)."""
    return joined_betas(*request.headers.getall("anthropic-beta", []))


def _without_shared_state(body: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """The body, refused if it names upstream state by an id (a container, a file: the operator's
    key holds every tenant's; :mod:`gateway.protocols.shared_state`)."""
    refuse_upstream_ids(body, raw, dotted=True)
    return body


@post("/v1/messages/count_tokens", request_max_body_size=None, status_code=200)
async def count_message_tokens(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prompt tokens for the route's first model: counted by it when it is Anthropic's (its
    ``count_tokens`` sees documents, PDFs and images), else by the gateway (tiktoken), which is
    also the answer when the upstream cannot count. Counting is free: only the key's and the
    tenant's ``rpm`` apply, in a window of its own (:meth:`~gateway.limits.Limiter.admit_count`)."""
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    request_id = request_id_of(request.headers)
    ids = {"x-request-id": request_id, "request-id": f"req_{request_id}"}
    try:
        principal = runtime.auth.authenticate(authorization_of(request))
        await state.limiter.admit_count(runtime.policy, principal)  # before the body is read
        limits = runtime.policy.limits  # the same as for the message it counts
        raw = await read_body(request, limits.max_body_bytes, limits.body_read_timeout_s)

        def read() -> tuple[dict[str, Any], CoreRequest, str | None, bool, list[str]]:
            body = _json_object(raw)
            # counted upstream, an id would tell whether a file exists, and its size (t33)
            refuse_upstream_ids(body, raw, dotted=True)
            lenient = _only_anthropic_upstreams(request, body, principal.allowed)  # blocks only Anthropic reads
            # as /v1/messages refuses them on this route (f200), and leaves out its hints: the count is of
            # the request it sends (Anthropic's count applies context_management's edits)
            hints = [] if lenient else _refuse_unread(body)
            continues = continued_message(body) if lenient else None  # own-checked below, as /v1/messages does
            counted = anthropic.decode_request(
                raw, counting=True, passed_through=lenient, continued=continues is not None
            )
            kept = {name: value for name, value in body.items() if name not in hints}
            return kept, counted, continues, lenient, hints

        try:
            body, decoded, continues, lenient, hints = await read_off_loop(raw, read)  # t55: off the event loop
            if continues is not None:
                await _own_thread(_threads(request), principal.tenant, continues)
        except InvalidRequestError:  # an unknown model is named first, whatever else is wrong
            runtime.router.refuse_unknown(await read_off_loop(raw, lambda: named_model(raw)), principal.allowed)
            raise
        plan = runtime.router.chat_plan(decoded.model, principal.allowed)  # what /v1/messages refuses, too
        first = runtime.providers[plan.candidates[0]]
        tokens = None
        if isinstance(first, AnthropicProvider):
            # translated, /v1/messages sends Claude a system message in the top-level system (t206)
            counted_body = body if lenient else anthropic.with_system_hoisted(body)
            try:
                tokens = await first.count_tokens(counted_body, _betas(request))
            except UpstreamError as exc:
                if exc.error_type == "invalid_request_error":  # the request's own fault: told as the upstream says
                    raise
                _log.warning("count_tokens_upstream_failed", upstream=first.name, error=exc.code)
        if tokens is None:
            model = runtime.policy.models[plan.candidates[0]]
            encoding, kind = model.encoding, model.provider
            if prompt_chars(decoded) > limits.long_prompt_chars:  # seconds of CPU: not on the event loop
                tokens = await asyncio.to_thread(count_prompt, decoded, encoding, provider=kind)
            else:
                tokens = count_prompt(decoded, encoding, provider=kind)
    except GatewayError as exc:
        return _error(exc.status_code, exc.message, {**exc.headers, **ids})
    if left_out := dropped_header(hints):
        ids["x-gateway-dropped"] = left_out
    return Response(content=msgspec.json.encode({"input_tokens": tokens}), headers=ids, media_type="application/json")


def _dropped(
    request: Request[Any, Any, Any], asked: CoreRequest, answered_by: str | None, *, translated: bool
) -> list[str]:
    """What did not reach the model that answered: what a chat upstream cannot take is named only
    when one answered (an Anthropic model takes ``thinking`` and a tool result's images), and so
    is a prefill one did not continue, and the place of a ``system`` message a translation moved
    into Claude's top-level ``system``; nothing where no model was called (t206: a 404 for an
    unknown model named what it would have left out)."""
    if not answered_by:
        return []
    runtime = request.app.state.gateway.holder.current
    answerer = runtime.policy.models.get(answered_by)
    if answerer is not None and answerer.provider == "anthropic":  # what no translation carries
        kept = [name for name in asked.dropped if name not in openai_chat.CHAT_UPSTREAM_LOSSES]
        provider = runtime.providers.get(answered_by)
        lost = provider.not_carried(asked) if provider is not None else []
        if "top_p" in lost:  # a model that takes one sampler (t53)
            kept.append("top_p")
        if translated and "system.position" in lost:  # passed through, it reached Claude in its place (t206)
            kept.append("system.position")
        lost_thinking = anthropic.thinking_left_out(asked) or anthropic.holds_unsigned_thinking(asked)
        return [*kept, "thinking"] if lost_thinking else kept
    if asked.continues_last_turn and answerer is not None and not answerer.continue_final_message:
        return [*asked.dropped, "prefill"]  # answered as a new turn, not continued
    return asked.dropped


def _only_anthropic_upstreams(request: Request[Any, Any, Any], body: dict[str, Any], allowed: frozenset[str]) -> bool:
    """Whether every model the body's ``model`` can reach is Anthropic's (what decides how it is
    decoded); a name the key may not call is as unknown as one that is not there."""
    model = body.get("model")
    runtime = request.app.state.gateway.holder.current
    try:
        names = runtime.router.reachable(model if isinstance(model, str) else "", allowed)
    except GatewayError:
        return False  # the translating decoder and the pipeline answer a missing or unknown model
    return all(runtime.policy.models[name].provider == "anthropic" for name in names)


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body, read once, whole: the 400 of every edge when it is not a JSON object. The typed
    decoding skips a field it does not read unchecked (t197: a name not UTF-8 went to Anthropic,
    or was dropped unnamed)."""
    return decode_body(raw, dict[str, Any])


_HINTS = frozenset({"cache_control", "service_tier", "context_management"})
"""Top-level fields that steer only Anthropic's serving, left out where a route may reach another
upstream: its automatic prompt caching (the SDK's ``cache_control`` argument, as block-level
breakpoints are), its ``service_tier`` (t47) and its context editing (``context_management``:
pruning of the context Anthropic keeps, which Claude Code sends with thinking on; a chat upstream
is sent the whole conversation the client sent, without the thinking those edits clear, and a
translated request reaching Claude has no place for it, nor its answer for the edits applied, t206)."""


def _refuse_unread(body: dict[str, Any]) -> list[str]:
    """Refuses, naming them, the fields a translation does not read, Anthropic's own (``thread``,
    ``container``, ...) that no translation holds; returns the :data:`_HINTS` among them,
    which it leaves out and names (t40)."""
    unread = anthropic.fields_not_read(body)
    refused = [name for name in unread if name not in _HINTS]
    if refused:
        raise InvalidRequestError(
            f"{', '.join(refused)}: not supported on a route that may reach a model other than "
            "Anthropic's (use a route whose models are all Anthropic's)",
            param=refused[0],
        )
    return [name for name in unread if name in _HINTS]


def _translatable(raw: bytes, body: dict[str, Any]) -> CoreRequest | None:
    """The request, when the internal model holds all of it (then it is translated, and can be
    served from the cache); None when it has blocks, tools or fields only Anthropic reads (a
    ``system`` message in ``messages``, which only Claude reads in place), or
    when its answer may interleave thinking with tool calls: the internal answer holds thinking,
    text and calls apart, and the agent sends the turn back, which Anthropic wants as it wrote it
    (t40: reordered, and for Claude Code a rebuilt thinking turn)."""
    try:
        decoded = anthropic.decode_request(raw)
    except GatewayError:
        return None
    if decoded.dropped or anthropic.fields_not_read(body) or anthropic.nested_fields_not_carried(body):
        return None
    if anthropic.holds_documents(body):  # translated, a text document would reach Claude as text
        return None
    if anthropic.holds_system_messages(body):  # translated, it would reach Claude in the top-level system (t206)
        return None
    if decoded.thinking is not None and decoded.tools:
        return None
    return decoded


def _message_of(body: bytes, max_tokens: int | None) -> str:
    """The error's message; a prompt too long for the window in Anthropic's words (t59)."""
    try:
        error = msgspec.json.decode(body).get("error") or {}
    except (msgspec.DecodeError, AttributeError):
        return "error"
    message = str(error.get("message") or "error")
    if error.get("code") == "context_length_exceeded":
        return anthropic.context_overflow_message(message, max_tokens)
    return message


def _error(status: int, message: str, headers: dict[str, str]) -> Response[bytes]:
    return Response(
        content=anthropic.encode_error(status, message),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


async def _events(answer: StreamingDeltas, message_id: str, model: str) -> AsyncIterator[bytes]:
    """The pipeline's answer as Anthropic events."""
    # Anthropic's message_start says the prompt's tokens; the output's come in message_delta
    # (a whole answer replayed, a cache hit's, knows its usage: cache reads apart, as Anthropic counts)
    known = answer.usage
    encoder = anthropic.StreamEncoder(message_id, model, answer.prompt_tokens)
    starting = True
    async with contextlib.aclosing(delta_batches(answer)) as batches:
        async for batch in batches:
            if starting:  # the first batch is at hand already: an Anthropic upstream's usage leads it
                starting = False
                first = batch if isinstance(batch, list) else []
                if first and isinstance(first[0], UsageReport):
                    yield encoder.start(first[0].usage)
                else:
                    yield encoder.start(None if known is None else msgspec.structs.replace(known, output_tokens=0))
            if batch is None:
                yield encoder.finish()
            elif isinstance(batch, KeepAlive):
                yield _PING  # the SDKs skip it, as Anthropic's own
            elif isinstance(batch, StreamBroke):
                error = batch.error
                yield encoder.error(_status_of(error), str(error.get("message") or "upstream error"))
            else:
                out = encoder.feed(batch)
                if out:
                    yield out


_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
"""Anthropic's keep-alive event, which its SDKs read past."""


def _status_of(error: dict[str, Any]) -> int:
    """The status whose Anthropic error type names an in-stream failure (``overloaded_error``
    for an Anthropic upstream's own, which its clients handle apart)."""
    code = str(error.get("code") or error.get("type") or "")
    if "timeout" in code:
        return 504
    if code in ("shutting_down", "upstream_unavailable"):
        return 503
    return _STATUS_OF_CODE.get(code, 502)


_STATUS_OF_CODE = {"internal_error": 500, "upstream_overloaded": 529, "upstream_rate_limited": 429}
