"""Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama, SGLang, ..."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np
import structlog

from gateway.core import model as core
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    context_overflow,
    upstream_error_fields,
)
from gateway.pricing import tier_name
from gateway.protocols import openai_chat
from gateway.protocols import openai_responses as responses
from gateway.protocols.call_ids import distinct_call_id
from gateway.upstreams.base import (
    ChatStream,
    Completion,
    Embeddings,
    Provider,
    RelayedStream,
    StreamTally,
    UpstreamEvents,
    UpstreamResponse,
    Usage,
    answered,
    decode_answer,
    decode_event,
    decode_json_object,
    usage_of,
)
from gateway.upstreams.sse import SSEEvent
from gateway.upstreams.stop_strings import StopWatch, applied_here, cut_choices, stops_of

__all__ = ["OpenAIProvider", "chat_payload", "for_openai_upstream", "not_for_openai_upstream"]

_log = structlog.get_logger("gateway.upstreams")


class OpenAIProvider(Provider):
    kind = "openai"

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", **self.extra_headers}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    takes_max_completion_tokens = False
    """The upstream refused ``max_tokens`` for ``max_completion_tokens`` (OpenAI's reasoning models
    do): learned from its 400, and the limit is sent under that name from then on."""
    refuses_stop = False
    """The upstream refused ``stop`` (OpenAI's reasoning models do): learned from its 400; from then
    on the gateway applies the stop strings itself (:mod:`gateway.upstreams.stop_strings`)."""

    async def complete(self, request: core.Request, body: dict[str, Any] | None = None) -> Completion:
        payload = self._payload(request, body)
        response, stops = await self._post_chat(payload, stream=False, fills_window=request.fills_window)
        with answered(response):
            data, content = decode_answer(self.name, response.content)
            cut = bool(stops) and cut_choices(data, stops)
            trimmed = _usage_for_the_client(data)
            if cut or (b'"tool_calls"' in content and _calls_as_openai_gives(data)) or trimmed:
                content = msgspec.json.encode(data)
            usage = usage_of(openai_chat.read_usage(data.get("usage"), service_tier=data.get("service_tier")))
            text = _message_text(self.name, data)
        said, finish, tier = _said(data, text), _finish(data), tier_name(data.get("service_tier"))
        return Completion(
            body=content, usage=usage, text=text, said=said, finish_reason=finish, cut=cut, service_tier=tier
        )

    def not_carried(self, request: core.Request) -> list[str]:
        return not_for_openai_upstream(request)

    def _payload(self, request: core.Request, body: dict[str, Any] | None) -> dict[str, Any]:
        payload = chat_payload(request, body, self.upstream_model, continues=self.config.continue_final_message)
        return self.salted(payload, request.tenant)

    async def _post_chat(
        self, payload: dict[str, Any], *, stream: bool, fills_window: bool = False
    ) -> tuple[UpstreamResponse, tuple[str, ...]]:
        """A chat request as the upstream takes it, and the stop strings left for the gateway to
        apply. A client of another API never wrote ``max_tokens`` (t38: every Messages request to
        an o-series model was a 400 naming it), and the same request with ``stop`` worked or not
        by the model it was routed to. ``fills_window``: a ``max_tokens`` the prompt leaves no room
        for is lowered to the room the upstream says is left, once (t59)."""
        while True:
            sent = self._as_taken(payload)
            stops = () if "stop" in sent else applied_here(stops_of(payload.get("stop")), self.name)
            try:
                response = await self.post("chat/completions", sent, self._headers(), stream=stream)
            except UpstreamStatusError as exc:
                room = _room_left(exc, payload) if fills_window else None
                if room is not None:
                    _log.info("max_tokens_lowered_to_window", model=self.name, max_tokens=room)
                    payload, fills_window = {**payload, "max_tokens": room}, False
                    continue
                if not self._learned_from(exc, sent):
                    raise
                continue  # what was refused is left out of what is sent next: at most two more tries
            return response, stops

    def _as_taken(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.takes_max_completion_tokens:
            payload = _limit_renamed(payload)
        if self.refuses_stop and "stop" in payload:
            payload = {name: value for name, value in payload.items() if name != "stop"}
        return payload

    def _learned_from(self, error: UpstreamStatusError, sent: dict[str, Any]) -> bool:
        """Whether the 400 refuses a field this request was sent with, which it is sent without
        from now on. Whether another request taught it first does not matter: those in flight
        when the first refusal came back got it too, and only the first was sent again (f232)."""
        if _wants_max_completion_tokens(error, sent):
            if not self.takes_max_completion_tokens:
                self.takes_max_completion_tokens = True
                _log.info("upstream_takes_max_completion_tokens", model=self.name)
            return True
        if sent.get("stop") is not None and _refuses(error, "stop"):
            if not self.refuses_stop:
                self.refuses_stop = True
                _log.info("upstream_refuses_stop", model=self.name)
            return True
        return False

    def salted(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        if not self.config.tenant_cache_salt or tenant is None:
            return body
        own = body.get("cache_salt")
        secret = self.api_key or os.environ.get("GATEWAY_CACHE_SALT_KEY") or self.name
        return {**body, "cache_salt": _salt(secret, tenant, own if isinstance(own, str) else "")}

    async def embed(
        self, inputs: list[str] | list[list[int]], dimensions: int | None, extra: Mapping[str, Any] | None = None
    ) -> Embeddings:
        payload: dict[str, Any] = {**(extra or {}), "model": self.upstream_model, "input": inputs}
        payload["encoding_format"] = "float"
        if dimensions is not None:
            payload["dimensions"] = dimensions
        try:
            response = await self.post("embeddings", payload, self._headers(), stream=False)
        except UpstreamStatusError as exc:
            if exc.code == "context_length_exceeded":
                exc.param = "input"  # the embeddings API's field ("messages", as for chat, names none of it)
            raise
        with answered(response):
            return self._embeddings(inputs, decode_json_object(self.name, response.content), dimensions)

    def _embeddings(
        self, inputs: list[str] | list[list[int]], data: dict[str, Any], dimensions: int | None = None
    ) -> Embeddings:
        rows = data.get("data")
        if not isinstance(rows, list) or len(rows) != len(inputs):
            raise UpstreamProtocolError(self.name, f"answered {_count(rows)} embeddings for {len(inputs)} inputs")
        vectors: list[list[float]] = [[] for _ in inputs]
        for position, row in enumerate(rows):
            index = row.get("index", position) if isinstance(row, dict) else None
            vector = row.get("embedding") if isinstance(row, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(inputs) or not isinstance(vector, list) or not vector:
                raise UpstreamProtocolError(self.name, "answered an embedding that is not a list of numbers")
            if vectors[index]:
                raise UpstreamProtocolError(self.name, f"answered two embeddings for input {index}")
            vectors[index] = vector
        _check_vectors(self.name, vectors, dimensions)  # a wrong vector would be served and cached as a 200
        usage = data.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt <= 0:
            return Embeddings(vectors, None)
        return _held_to_inputs(vectors, prompt, inputs, self.config.context_window)

    async def relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> Completion:
        response = await self.post("responses", body, {**self._headers(), **headers}, stream=False)
        with answered(response):
            data, content = decode_answer(self.name, response.content)
            if data.get("object") != "response" or not isinstance(data.get("output"), list):
                # Some servers and routers answer a failure with 200 and an error body: it is theirs, retried.
                error = data.get("error")
                if isinstance(error, dict) and error:  # as a streamed response.failed with that code reads
                    status = _failure_status(error)
                    raise UpstreamStatusError(self.name, status, _in_stream_error(error), body=response.content)
                raise UpstreamProtocolError(self.name, "answer is not a Responses API response")
        usage = usage_of(responses.usage_from_wire(data.get("usage"), data.get("service_tier")))
        tools = responses.HostedToolUses()
        if tools.add_output(data["output"]):
            _bill_tools(usage, tools)
        return Completion(
            body=content,
            usage=usage,
            text=responses.response_text(data),
            finish_reason=responses.finish_reason_of(data),  # logged as a streamed one's is (t25)
            service_tier=tier_name(data.get("service_tier")),
            server_tools=tools.uses(),
        )

    async def open_relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> ChatStream:
        response = await self.post("responses", body, {**self._headers(), **headers}, stream=True)
        return _ResponsesEventStream(self, response)

    async def forward(self, method: str, path: str) -> UpstreamResponse:
        return await self.post(path, None, self._headers(), stream=False, method=method, names_an_object=True)

    async def open_stream(self, request: core.Request, body: dict[str, Any] | None = None) -> ChatStream:
        body = self._payload(request, body)
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            # Ask for usage even when the client did not: it is the authoritative count.
            body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        response, stops = await self._post_chat(body, stream=True, fills_window=request.fills_window)
        # vLLM's usage on every chunk is for a client that asked for usage at all (t49: it came without)
        continuous = (
            isinstance(options, dict)
            and options.get("continuous_usage_stats") is True
            and bool(options.get("include_usage"))
        )
        n = body.get("n")
        answers = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return _OpenAIChatStream(self, response, continuous, stops, answers)


class _OpenAIChatStream(ChatStream):
    """A chat upstream's chunks. Those that say nothing yet (vLLM and OpenAI open with a
    role-only chunk) are held until the first that does, so that an error right after them
    (vLLM's in-band ``{"error"}`` when generation fails) reaches the pipeline before anything
    has reached the client: it is retried and falls back, as Anthropic's failures after
    ``message_start`` are."""

    def __init__(
        self,
        provider: OpenAIProvider,
        response: UpstreamResponse,
        continuous_usage: bool = False,
        stops: tuple[str, ...] = (),
        answers: int = 1,
    ) -> None:
        super().__init__()
        self._stops = stops
        """Stop strings the gateway applies (the upstream refused them)."""
        self._watches: dict[Any, StopWatch] = {}
        self._calls: dict[Any, openai_chat.CallRelay] = {}
        """Each choice's tool calls so far."""
        self._answers = answers
        """The choices asked for (``n``): the stream ends at the cut once each has ended."""
        self._ended: set[Any] = set()
        """Choices that have ended (at a stop string or their own finish)."""
        self._provider = provider
        self._response = response
        self._continuous_usage = continuous_usage
        """The client asked for usage on every chunk (vLLM's ``continuous_usage_stats``)."""
        self._events = UpstreamEvents(provider, response)
        self._done = False
        self._choices_seen = False
        self._said_something = False
        self._unfinished: set[Any] = set()
        """Choices begun and not finished (``n`` > 1: the first to finish is not the end)."""
        self._due: deque[bytes] = deque()
        """Held chunks, and the one that ended the hold: given out before any other."""

    async def __anext__(self) -> bytes:
        if self._due:
            return self._due.popleft()
        if self.cut_short:  # the rest is read for its usage alone (read_rest)
            raise StopAsyncIteration
        tally = self.tally
        name = self._provider.name
        while not self._done:
            try:
                if tally.usage is not None and tally.finish_reason is not None and not self._unfinished:
                    # only [DONE] is due (vLLM's continuous_usage_stats puts usage in every chunk)
                    event = await self._events.after_end()
                else:
                    event = await self._events.next()
            except UpstreamError:
                if tally.finish_reason is None or self._unfinished:
                    raise
                event = None  # the model had finished: a connection lost before [DONE] takes nothing away
            if event is None:
                if tally.chunks == 0 and not self._said_something:
                    kind = self._response.headers.get("content-type", "no content-type")
                    raise UpstreamProtocolError(name, f"answered a stream request with no events ({kind[:60]})")
                if tally.finish_reason is None or self._unfinished:
                    raise UpstreamProtocolError(name, "stream ended before [DONE]")
                break  # the model had finished; only the [DONE] line was left out (some servers do)
            if event.data == b"[DONE]":
                self._done = True
                break
            chunk = decode_event(name, event.data)
            error = _in_band_error(chunk)
            if error is not None:
                status = _status_said(error) or 500
                raise UpstreamStatusError(name, status, _in_stream_error(error), body=event.data)
            rewritten = False
            if self._stops:
                if not self._stopped_at_stops(chunk):  # past every choice's stop string: read on for the usage
                    _take_usage(tally, chunk)
                    continue
                rewritten = True
            if (self._calls or b'"tool_calls"' in event.data) and self._calls_as_openai_sends(chunk):
                rewritten = True
            if rewritten:
                event = SSEEvent(event.event, msgspec.json.encode(chunk))
            _tally_chunk(tally, chunk)
            choices = chunk.get("choices")
            if not choices:
                continue  # the usage chunk: kept in the tally, re-emitted by the gateway if asked for
            self._choices_seen = True
            if (said := chunk.get("usage")) and not self._continuous_usage:
                # TGI and llama.cpp put it on the finish chunk: the gateway's usage chunk tells it,
                # once (a client that adds up its chunks' usage counted the request twice: t27)
                event = SSEEvent(event.event, msgspec.json.encode({**chunk, "usage": None}))
            elif isinstance(said, dict) and (kept := openai_chat.client_usage(said)) != said:
                event = SSEEvent(event.event, msgspec.json.encode({**chunk, "usage": kept}))  # asked on every chunk
            for choice in choices:
                if isinstance(choice, dict):
                    if choice.get("finish_reason") is None:
                        self._unfinished.add(choice.get("index", 0))
                    else:
                        self._unfinished.discard(choice.get("index", 0))
            if not self._said_something:
                self._due.append(event.data)
                if _says_nothing_yet(choices):
                    continue
                self._said_something = True
                return self._due.popleft()
            return event.data
        if self._due:  # a stream of role chunks only, then its end
            return self._due.popleft()
        await self.aclose()
        if not self._choices_seen:
            raise UpstreamProtocolError(name, "stream ended without a choice")
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._response.aclose()

    async def read_rest(self) -> None:
        try:
            while (event := await self._events.next()) is not None and event.data != b"[DONE]":
                _take_usage(self.tally, decode_event(self._provider.name, event.data))
        finally:
            await self.aclose()

    def _calls_as_openai_sends(self, chunk: dict[str, Any]) -> bool:
        """Tool calls as OpenAI's clients read them (:class:`openai_chat.CallRelay`: t48, t58); a
        finish after calls that had no arguments gives them ``"{}"``; whether anything changed."""
        changed = False
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            relay = self._calls.get(position := choice.get("index", 0))
            if isinstance(calls, list):
                relay = relay or self._calls.setdefault(position, openai_chat.CallRelay())
                for call in calls:
                    if isinstance(call, dict) and relay.rewrite(call):
                        changed = True
            if relay is not None and choice.get("finish_reason") is not None and (missing := relay.unargued()):
                delta = choice["delta"] = dict(delta) if isinstance(delta, dict) else {}
                delta["tool_calls"] = [*(calls if isinstance(calls, list) else ()), *missing]
                changed = True
        return changed

    def _stopped_at_stops(self, chunk: dict[str, Any]) -> bool:
        """The chunk with each choice's text given out only up to its first stop string, ended
        there; whether anything is left of it to send (choices already stopped are dropped)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return True  # the usage chunk
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            watch = self._watches.get(index := choice.get("index", 0))
            if watch is None:
                watch = self._watches[index] = StopWatch(self._stops)
            if watch.matched is not None:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            text = watch.take(content) if isinstance(content, str) else None
            if watch.matched is not None:
                choice = {**choice, "finish_reason": "stop", "stop_reason": watch.matched}
            elif choice.get("finish_reason") is not None:
                text = (text or "") + watch.flush()
            if text is not None or content is not None:
                choice = {**choice, "delta": {**(delta or {}), "content": text or ""}}
            if choice.get("finish_reason") is not None:
                self._ended.add(index)
            kept.append(choice)
        chunk["choices"] = kept
        # Every choice has ended, one at least at a stop string: the upstream writes on past it, and
        # the client is not kept waiting for that (t58)
        if len(self._ended) >= self._answers and any(w.matched is not None for w in self._watches.values()):
            self.cut_short = True
        return bool(kept)


class _ResponsesEventStream(RelayedStream):
    """A Responses API stream passed through. The tally reads the response id, the text
    deltas and the final usage; an ``error`` event raises, and the gateway answers it, as
    does the upstream's own ``response.failed`` (a 5xx or 429): retried and falls back before
    any content, else the stream ends with the gateway's ``error`` event (t138). One for the
    request's own fault reaches the client as it came."""

    end_events = frozenset({"response.completed", "response.incomplete", "response.failed"})
    preamble_events = frozenset({"response.created", "response.in_progress"})

    def __init__(self, provider: OpenAIProvider, response: UpstreamResponse) -> None:
        super().__init__(provider, response)
        self._sequence = -1
        self._tools = responses.HostedToolUses()

    def _take(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "error":
            raise UpstreamStatusError(self._provider.name, 500, _in_stream_error(data))
        tally = self.tally
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            tally.text_parts.append(data["delta"])
        elif kind == "response.output_item.done":
            if self._tools.add(data.get("item"), data.get("output_index")):
                self._bill_tools()
        elif kind.startswith("response.") and isinstance(response := data.get("response"), dict):
            if tally.id is None and isinstance(response.get("id"), str):
                tally.id, tally.model = response["id"], response.get("model")
            usage = usage_of(responses.usage_from_wire(response.get("usage"), response.get("service_tier")))
            if usage is not None:
                tally.usage = usage
            tier = tier_name(response.get("service_tier"))
            if tier is not None:  # billed on the gateway's count where no usage comes (t71)
                tally.service_tier = tier
            if kind in ("response.completed", "response.incomplete"):
                tally.finish_reason = responses.finish_reason_of(response)
            if self._tools.add_output(response.get("output")) or usage is not None:
                self._bill_tools()
        if kind == "response.failed":
            failed = self._failure(data)
            if failed.retryable:  # retried before any content, else the gateway's own event ends the stream (t138)
                raise failed
            # the request's own fault (an image it could not read): the client reads the event as it came
            tally.failure, tally.failure_status = failed.message, 400
        # only an event the client is given: the gateway's error event follows on from it (t147)
        if isinstance(sequence := data.get("sequence_number"), int):
            self._sequence = sequence

    def _bill_tools(self) -> None:
        self.tally.server_tools = self._tools.uses()
        _bill_tools(self.tally.usage, self._tools)

    def _failure(self, data: dict[str, Any]) -> UpstreamStatusError:
        """A ``response.failed`` as the upstream failure it is; retryable where it is the upstream's
        (a 5xx or 429), not the request's."""
        response = data.get("response")
        error = response.get("error") if isinstance(response, dict) else None
        failure = _in_stream_error(error) if error else "the upstream's response failed"
        status = _failure_status(error if isinstance(error, dict) else {})
        failed = UpstreamStatusError(self._provider.name, status, failure)
        failed.retryable = status >= 500 or status == 429
        return failed

    def error_event(self, error: GatewayError) -> bytes:
        self._sequence += 1
        data = {"type": "error", "code": error.code or error.error_type, "message": error.message,
                "param": error.param, "sequence_number": self._sequence}  # fmt: skip
        return b"event: error\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _bill_tools(usage: Usage | None, tools: responses.HostedToolUses) -> None:
    """The hosted tools' uses an answer's output shows onto its usage, which does not count them
    (t159: billed at the text prices)."""
    uses = tools.uses()
    if usage is not None and uses:
        usage.server_tool_requests = {**usage.server_tool_requests, **uses}


def chat_payload(
    request: core.Request, body: dict[str, Any] | None, model: str, *, continues: bool = False
) -> dict[str, Any]:
    """What an OpenAI-compatible upstream is sent: a chat client's own body (``body``, as it
    came), or the request written by the chat codec; ``continues``: the upstream continues a
    final assistant message when asked (vLLM), so a prefill is sent as one."""
    if body is not None:
        return for_openai_upstream(body)
    payload = {**openai_chat.to_chat_body(request), "model": model}
    if continues and request.continues_last_turn:
        payload |= _CONTINUE_FINAL_MESSAGE
    return for_openai_upstream(payload)


_CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}


def for_openai_upstream(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without what only Anthropic upstreams read (OpenAI-compatible servers do not
    define it; some refuse it): ``cache_control`` on content parts and tools, a top-level
    ``thinking`` setting, and assistant ``thinking`` / ``redacted_thinking`` parts and
    ``thinking_blocks`` (an answer's, sent back). The same object when there is none, the common
    case: plain string contents are not looked into. :func:`not_for_openai_upstream` names what
    it takes out."""
    messages = body.get("messages")
    tools = body.get("tools")
    thinking = isinstance(body.get("thinking"), dict)
    marked_tools = isinstance(tools, list) and any(isinstance(t, dict) and "cache_control" in t for t in tools)
    marked_messages = isinstance(messages, list) and any(_anthropic_only(m) for m in messages)
    if not (marked_tools or marked_messages or thinking):
        return body
    out = {k: v for k, v in body.items() if k != "thinking"} if thinking else dict(body)
    if marked_tools:
        out["tools"] = [_unmarked(t) for t in tools]  # type: ignore[union-attr]
    if marked_messages:
        out["messages"] = [_openai_message(m) for m in messages]  # type: ignore[union-attr]
    return out


def _anthropic_only(message: Any) -> bool:
    """Whether a message holds what :func:`for_openai_upstream` takes out of it."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    return "thinking_blocks" in message or (isinstance(content, list) and any(_marked(p) for p in content))


def _openai_message(message: Any) -> Any:
    if not isinstance(message, dict) or not ("thinking_blocks" in message or isinstance(message.get("content"), list)):
        return message
    out = {k: v for k, v in message.items() if k != "thinking_blocks"}
    if isinstance(out.get("content"), list):
        out["content"] = _openai_content(out["content"])
    return out


_ANTHROPIC_ONLY_PARTS = ("thinking", "redacted_thinking")


def not_for_openai_upstream(request: core.Request) -> list[str]:
    """What :func:`for_openai_upstream` takes out of a chat client's request, for
    ``x-gateway-dropped``: its ``thinking`` setting and signed reasoning, and its prompt-cache
    breakpoints (t78: a chat client's ``thinking`` went nowhere without a word, where a
    Messages client is told)."""
    lost: list[str] = []
    parts = [part for message in request.messages for part in message.parts]
    if request.thinking is not None or any(isinstance(p, core.ThinkingPart | core.RedactedThinkingPart) for p in parts):
        lost.append("thinking")
    marked = any(getattr(part, "cache_control", None) is not None for part in parts)
    if marked or any(tool.cache_control is not None for tool in request.tools):
        lost.append("cache_control")
    return lost


def _marked(part: Any) -> bool:
    return isinstance(part, dict) and ("cache_control" in part or part.get("type") in _ANTHROPIC_ONLY_PARTS)


def _openai_content(parts: list[Any]) -> list[Any] | str | None:
    kept = [_unmarked(p) for p in parts if not (isinstance(p, dict) and p.get("type") in _ANTHROPIC_ONLY_PARTS)]
    return kept if kept else None


def _unmarked(item: Any) -> Any:
    if isinstance(item, dict) and "cache_control" in item:
        return {k: v for k, v in item.items() if k != "cache_control"}
    return item


_FAILED_STATUS: dict[Any, int] = {
    None: 500,  # no code said: the upstream's
    "server_error": 500,
    "vector_store_timeout": 500,
    "rate_limit_exceeded": 429,
}
"""A failed response's ``error.code`` (OpenAI's ``ResponseError``) as the status of the failure it
is; every other code (``invalid_prompt``, ``invalid_image_url``, ``image_too_large``, ...) is the
request's own, 400: not retried, and no sign of an unhealthy upstream."""


def _failure_status(error: dict[str, Any]) -> int:
    """The status a Responses error object stands for: an HTTP status where a router wrote one as
    its code, the server's own type, else :data:`_FAILED_STATUS`."""
    status = _status_said(error)
    if status is not None:
        return status
    code = error.get("code")
    if error.get("type") == "server_error" and code not in _FAILED_STATUS:
        return 500
    return _FAILED_STATUS.get(code, 400)


def _status_said(error: Any) -> int | None:
    """The HTTP status an in-band error object writes as its ``code`` (vLLM's 400 for a request it
    cannot serve: t143, a made-up 500 was retried on every model and its message lost); None."""
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return None


_OPENING_FIELDS = frozenset({"role", "content", "refusal"})


def _says_nothing_yet(choices: Any) -> bool:
    """Whether a chunk's choices only open the answer (a role, empty content): no text,
    reasoning, tool call or finish that a client would miss if it came later."""
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("logprobs"):
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict) or not _OPENING_FIELDS.issuperset(delta):
            return False
        if delta.get("content") or delta.get("refusal"):
            return False
    return True


def _tally_chunk(tally: StreamTally, chunk: dict[str, Any]) -> None:
    tally.chunks += 1
    if tally.id is None:
        tally.id = chunk.get("id")
        tally.created = chunk.get("created")
        tally.model = chunk.get("model")
    _take_usage(tally, chunk)
    if openai_chat.beyond_the_answer(chunk, "completion"):  # Perplexity's citations, ...: a replay would drop them
        tally.replayable = False
    choices = chunk.get("choices")
    if choices and isinstance(choices, list):
        choice = choices[0]
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                tally.take_delta(delta)
            if openai_chat.beyond_the_answer(choice, "choice"):  # logprobs, ...
                tally.replayable = False
            if choice.get("finish_reason"):
                tally.finish_reason = choice["finish_reason"]
                matched = choice.get("stop_reason")  # vLLM's: the stop string it matched
                tally.stop_sequence = matched if isinstance(matched, str) and matched else None


def _take_usage(tally: StreamTally, chunk: dict[str, Any]) -> None:
    """The usage a chunk says, with the tier the stream said processed it on any chunk, the last
    to say one winning (t68: OpenAI repeats it on the usage chunk, and a compatible server that
    said it on the answer's chunks alone was billed at the base price)."""
    tier = tier_name(chunk.get("service_tier"))
    if tier is not None:
        tally.service_tier = tier
        tally.said_of_serving["service_tier"] = chunk["service_tier"]
    fingerprint = chunk.get("system_fingerprint")
    if isinstance(fingerprint, str):
        tally.said_of_serving["system_fingerprint"] = fingerprint
    said = chunk.get("usage")
    usage = usage_of(openai_chat.read_usage(said, service_tier=tally.service_tier))
    if usage is not None:
        tally.usage, tally.usage_said = usage, said
    elif tier is not None and tally.usage is not None:
        tally.usage.service_tier = tier


def _usage_for_the_client(data: dict[str, Any]) -> bool:
    """The answer's usage with OpenAI's fields alone (:func:`openai_chat.client_usage`); whether
    it had others."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return False
    kept = openai_chat.client_usage(usage)
    if kept == usage:
        return False
    data["usage"] = kept
    return True


def _calls_as_openai_gives(data: dict[str, Any]) -> bool:
    """Each tool call's arguments as the JSON text OpenAI sends, where a compatible server sent the
    object (t48: a chat client's SDK could not parse them), or none (t58: ``"{}"``, as a stream's
    are), and each call of an answer under an id of its own, as a stream gives them
    (:class:`openai_chat.CallRelay`: vLLM may give parallel calls one ``call_0``, f230); whether any
    was changed."""
    changed = False
    for choice in data.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        given: set[str] = set()
        for call in calls if isinstance(calls, list) else ():
            call_id = call.get("id") if isinstance(call, dict) else None
            if isinstance(call_id, str) and call_id and (unique := distinct_call_id(call_id, given)) != call_id:
                call["id"], changed = unique, True
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            arguments = function.get("arguments")
            if not (isinstance(arguments, str) and arguments):
                function["arguments"], changed = openai_chat.whole_arguments(arguments), True
    return changed


def _message_text(upstream: str, data: dict[str, Any]) -> str:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UpstreamProtocolError(upstream, "answer has no choices")
    parts = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


def _said(data: dict[str, Any], text: str) -> str:
    """The text, with the first choice's reasoning and tool calls (which cost output tokens too)."""
    message = (data.get("choices") or [{}])[0].get("message") if isinstance(data.get("choices"), list) else None
    if not isinstance(message, dict):
        return text
    pieces = [value for name in ("reasoning_content", "reasoning") if isinstance(value := message.get(name), str)]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            pieces += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    return "".join([*pieces, text])


def _in_band_error(chunk: dict[str, Any]) -> Any:
    """A chunk's error: vLLM's ``{"error": {...}}``, or its flat error object (``{"object":
    "error", "message": ...}``: a guided-decoding failure), which has no choices and was passed
    over as a usage chunk (t143); None for a chunk of the answer."""
    if "error" in chunk:
        return chunk["error"]
    return chunk if chunk.get("object") == "error" else None


def _in_stream_error(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message", "error in stream"))[:500]
    return str(error)[:500]


def _count(rows: object) -> int:
    return len(rows) if isinstance(rows, list) else 0


def _finish(data: dict[str, Any]) -> str | None:
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


@functools.lru_cache(maxsize=4096)
def _salt(secret: str, tenant: str, own: str) -> str:
    """A tenant's prefix-cache salt (and, within it, the client's own ``cache_salt``): keyed with
    the upstream's key, so that it is neither chosen by a client nor computed by someone who
    can reach the server without that key. 256 bits, as vLLM asks."""
    message = f"{tenant}\0{own}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _held_to_inputs(
    vectors: list[list[float]], prompt: int, inputs: list[str] | list[list[int]], window: int
) -> Embeddings:
    """The count an upstream said for ``inputs``, unless no inputs could hold it (then counted by
    the gateway): each input is no more tokens than its bytes and the special tokens a model adds
    to it, nor than the model's context ``window`` (t136: a byte a token billed 30,000 tokens for
    one input on a window of 8,192). Past the window, the log says so (``prompt_over_window``)."""
    sizes = [
        (len(item.encode()) if isinstance(item, str) else len(item)) + _SPECIAL_TOKENS_PER_INPUT for item in inputs
    ]
    if prompt <= sum(min(size, window) for size in sizes):
        return Embeddings(vectors, prompt)
    past_window = prompt <= sum(sizes) or prompt > window * len(inputs)  # not the bytes alone
    return Embeddings(vectors, None, "prompt_over_window" if past_window else None)


_SPECIAL_TOKENS_PER_INPUT = 4
"""Tokens an embedding model may add to each input besides its text's: BERT's ``[CLS]`` and
``[SEP]`` (XLM-R's ``<s>`` and ``</s>``, a decoder's BOS and EOS) are 2, so ``"a"`` is billed 3;
twice that leaves room for a model that adds a separator or an end-of-text besides, while an
absurd count (thousands for a word) is still refused."""


def _check_vectors(upstream: str, vectors: list[list[float]], dimensions: int | None = None) -> None:
    """Every vector finite numbers, all of one length (the upstream's embeddings of one model), the
    ``dimensions`` asked for where the request said (llama.cpp's server ignores it: its full-size
    vectors would be cached under the smaller size's key)."""
    try:
        matrix = np.asarray(vectors)  # numbers only: a None, a string or a bool gives another dtype
    except ValueError:  # rows of different lengths
        matrix = None
    if (
        matrix is None
        or matrix.ndim != 2
        or matrix.dtype.kind not in "fi"
        or not np.isfinite(matrix).all()
        or (matrix.size and np.abs(matrix).max() > _FLOAT32_MAX)  # served as float32: 1e39 would be inf
    ):
        raise UpstreamProtocolError(
            upstream, "answered embeddings that are not vectors of finite numbers of one length"
        )
    if dimensions is not None and len(vectors[0]) != dimensions:
        raise UpstreamProtocolError(
            upstream, f"answered vectors of {len(vectors[0])} dimensions where {dimensions} were asked for"
        )


def _room_left(error: UpstreamStatusError, payload: dict[str, Any]) -> int | None:
    """The completion tokens the model's window leaves after the prompt, where the upstream's
    context-overflow error says both sizes and the ``max_tokens`` asked for is more; else None."""
    if error.code != "context_length_exceeded":
        return None
    said = context_overflow(error.message)
    asked = payload.get("max_tokens")
    if not said.prompt_fits or not isinstance(asked, int):
        return None
    assert said.window is not None and said.prompt is not None
    room = said.window - said.prompt
    return room if room < asked else None


def _limit_renamed(payload: dict[str, Any]) -> dict[str, Any]:
    if "max_tokens" not in payload:
        return payload
    renamed = {name: value for name, value in payload.items() if name != "max_tokens"}
    renamed.setdefault("max_completion_tokens", payload["max_tokens"])
    return renamed


def _refuses(error: UpstreamStatusError, param: str) -> bool:
    """OpenAI's 400 for a field a model does not take: "Unsupported parameter: 'stop' is not
    supported with this model." (``param``: ``stop``, ``code``: ``unsupported_parameter``). Read
    from those fields, never from the text: a 400 can quote what the client sent (vLLM's do), and
    what is learned here holds for every tenant's requests (t135)."""
    fields = upstream_error_fields(error.upstream_body) if error.upstream_status == 400 else {}
    return fields.get("param") == param and fields.get("code") == "unsupported_parameter"


def _wants_max_completion_tokens(error: UpstreamStatusError, payload: dict[str, Any]) -> bool:
    """OpenAI's 400 for a reasoning model: "Unsupported parameter: 'max_tokens' is not supported
    with this model. Use 'max_completion_tokens' instead." (``param``: ``max_tokens``)."""
    return "max_tokens" in payload and _refuses(error, "max_tokens")
