"""The provider interface and the HTTP plumbing every provider shares."""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar, NamedTuple, Protocol
from urllib.parse import unquote_plus

import httpx
import msgspec

from gateway.config.schema import ModelConfig
from gateway.core import model as core
from gateway.errors import (
    GatewayError,
    UpstreamBusyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamTotalTimeoutError,
    upstream_error_fields,
)
from gateway.protocols import openai_chat
from gateway.protocols.upstream_json import decode_json
from gateway.upstreams.deadline import total_deadline
from gateway.upstreams.http11 import BodyFailed, Http11Transport
from gateway.upstreams.sending import note_sent
from gateway.upstreams.sse import SSEEvent, SSELineTooLong, iter_sse

__all__ = [
    "ChatStream",
    "Completion",
    "Provider",
    "RelayedStream",
    "SpeculationLog",
    "StreamTally",
    "UpstreamEvents",
    "UpstreamResponse",
    "Usage",
    "answered",
    "split_base_url",
    "usage_of",
]


class UpstreamResponse(Protocol):
    """An upstream's HTTP answer: :class:`~gateway.upstreams.http11.Http11Response`, or an
    ``httpx.Response`` when the policy's upstream goes through httpx (a proxy, the tests' mocks)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    async def aread(self) -> bytes: ...
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    """All prompt tokens, those read from or written to the upstream's prompt cache included."""
    completion_tokens: int
    """All completion tokens, reasoning tokens included."""
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0
    speed: str | None = None
    inference_geo: str | None = None
    service_tier: str | None = None
    server_tool_requests: dict[str, int] = field(default_factory=dict)
    """What the upstream says it ran with and at, that its price may depend on (t59)."""


def usage_of(usage: core.Usage | None) -> Usage | None:
    """The internal model's usage (a codec's reading of an upstream's) as a provider reports it."""
    if usage is None:
        return None
    return Usage(
        usage.input_tokens,
        usage.output_tokens,
        cached_prompt_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        audio_prompt_tokens=usage.audio_input_tokens,
        audio_completion_tokens=usage.audio_output_tokens,
        speed=usage.speed,
        inference_geo=usage.inference_geo,
        service_tier=usage.service_tier,
        server_tool_requests=usage.server_tool_requests,
    )


@dataclass(slots=True)
class Embeddings:
    """Vectors in the order of the inputs, and the prompt tokens the upstream billed (None: not said)."""

    vectors: list[list[float]]
    prompt_tokens: int | None
    usage_refused: str | None = None
    """Why the count the upstream said is not billed (``prompt_over_window``), when it says one."""


class SpeculationLog(Protocol):
    """What an answer of the speculative loop says of its work (:class:`gateway.speculative.stats.SpeculationStats`)."""

    def to_log(self) -> dict[str, Any]:
        """The fields of the request log's ``speculation``."""
        ...


@dataclass(slots=True)
class Completion:
    """A finished, non-streamed answer: ``body`` is in the protocol the upstream was asked in
    (a ``chat.completion``, or a passed-through Anthropic message or Responses object)."""

    body: bytes
    """The JSON returned to the client as is."""
    usage: Usage | None
    text: str
    """The assistant's text."""
    answer: core.Answer | None = None
    """The answer in the internal model, when the provider read it so (not from ``body``)."""
    said: str | None = None
    """Everything the model wrote (the text, its reasoning, its tool calls' names and arguments):
    what the gateway counts when ``usage`` is absent; None: the text alone."""
    finish_reason: str | None = None
    """Why the answer ended, in OpenAI chat's words (a passed-through answer's too, translated),
    for the log (None: the answer says no reason those words name)."""
    cut: bool = False
    """Ended at a stop string the gateway applies (t58): ``usage`` counts what the model wrote past it."""
    service_tier: str | None = None
    """The tier the answer says processed it (OpenAI's ``service_tier``), kept where it has no
    usage to carry it: the bill on the gateway's count uses it (t71)."""
    speculation: SpeculationLog | None = None
    """The speculative loop's work, when it answered (t77: was a subclass's field, read by getattr)."""
    server_tools: dict[str, int] = field(default_factory=dict)
    """The hosted tools' uses the answer shows, by name in ``price.server_tools``: billed on the
    gateway's count too, where ``usage`` is absent or refused, as a stream's are."""


@dataclass(slots=True)
class StreamTally:
    """What a stream said besides its chunks: identity, usage, finish, and the message its deltas
    amount to (text for counting; tool calls and reasoning too, so a stream can fill the cache)."""

    id: str | None = None
    created: int | None = None
    model: str | None = None
    usage: Usage | None = None
    usage_said: dict[str, Any] | None = None
    """The upstream's usage object that :attr:`usage` was read from (an OpenAI-compatible
    stream's): what else it says (prediction and audio tokens) the client's usage chunk says too."""
    service_tier: str | None = None
    """The tier the stream's chunks last said processed it (an OpenAI chat stream's ``service_tier``)."""
    said_of_serving: dict[str, str] = field(default_factory=dict)
    """``system_fingerprint`` and ``service_tier`` as the chunks last wrote them: OpenAI repeats
    both on its usage chunk, and the gateway, which writes that chunk itself, does too (t91: the
    SDK's final completion of a stream had no fingerprint)."""
    usage_exact: bool = False
    """``usage`` counts exactly what the stream has produced so far, at every step (the gateway's
    own speculative loop): a stream cut early is billed on it as it is (t49)."""
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    finish: core.FinishReason | None = None
    """Why the answer ended in the internal model's words, where the stream's upstream says more
    than :attr:`finish_reason` (chat's words) can: Anthropic's ``model_context_window_exceeded``
    is ``length`` there, and its replay to a Messages client says it as the miss did."""
    stop_sequence: str | None = None
    """The stop string that ended the answer, where the upstream said which."""
    server_tools: dict[str, int] = field(default_factory=dict)
    """The hosted tools' uses the stream showed so far (a Responses stream's output items, a Messages
    stream's web searches and fetches: f180): billed with the gateway's count where no usage came
    (f176: a stream cut before ``response.completed`` billed none)."""
    chunks: int = 0
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    reasoning_parts: list[str] = field(default_factory=list)
    refusal_parts: list[str] = field(default_factory=list)
    thinking_blocks: list[dict[str, Any]] = field(default_factory=list)
    _thought: int = 0
    """How much of ``reasoning_parts`` the thinking blocks so far cover."""
    replayable: bool = True
    """False when a delta was of a kind the tally does not rebuild (a legacy ``function_call``):
    the stream is then not stored in the cache."""
    failure: str | None = None
    """The upstream's own last event said the answer failed for the request's own fault (a
    Responses ``response.failed`` for an image it could not read): the client has that event
    as it came; the gateway counts the request as failed. The upstream's own failure raises."""
    failure_status: int = 502
    """The status the failure counts as (400: the request was at fault)."""
    _written: int = 0
    """Characters of the parts :meth:`written` has measured so far."""
    _measured: tuple[int, int, int] = (0, 0, 0)
    """How many text, reasoning and refusal parts :meth:`written` has measured."""

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def said(self) -> str:
        """Everything the stream wrote so far: what the gateway counts when the upstream's usage
        did not come (or came only at the start, as Anthropic's ``message_start`` placeholder).
        Joined once (t110: a long answer's text, joined first on its own, was held twice)."""
        calls = (f"{call['function']['name']}{call['function']['arguments']}" for call in self.tool_calls.values())
        return "".join(chain(self.reasoning_parts, self.text_parts, self.refusal_parts, calls))

    def written(self) -> int:
        """About how many characters the stream has written so far (what :attr:`said` holds): what
        bounds an upstream that writes on past the request's ``max_tokens``. Measures only the
        parts added since the last call (it is asked every so many chunks, never per chunk)."""
        lists = (self.text_parts, self.reasoning_parts, self.refusal_parts)
        for parts, measured in zip(lists, self._measured, strict=True):
            self._written += sum(map(len, parts[measured:]))
        self._measured = (len(lists[0]), len(lists[1]), len(lists[2]))
        calls = self.tool_calls.values()
        return self._written + sum(len(call["function"]["name"]) + len(call["function"]["arguments"]) for call in calls)

    def take_delta(self, delta: dict[str, Any]) -> None:
        """Add one chunk's delta (first choice) to the message."""
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.text_parts.append(content)
        reasoning = openai_chat.reasoning_of(delta)
        if reasoning:
            self.reasoning_parts.append(reasoning)
        for block in delta.get("thinking_blocks") or ():
            self._take_thinking(block)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:  # counted when no usage comes (t40: billed 0 output tokens)
            self.refusal_parts.append(refusal)
        for call in delta.get("tool_calls") or ():
            self._take_call(call)
        if openai_chat.beyond_the_answer(delta, "message"):  # a refusal, audio, a legacy function_call, ...
            self.replayable = False

    def answer(self) -> core.Answer:
        """The finished stream's answer in the internal model, as the cache stores it."""
        answer = openai_chat.answer_from_message(
            self.message(), self.finish_reason, model=self.model or "", stop_sequence=self.stop_sequence
        )
        return answer if self.finish is None else msgspec.structs.replace(answer, finish_reason=self.finish)

    def message(self) -> dict[str, Any]:
        """The assistant message of a finished stream, as a ``chat.completion`` carries it."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.text if self.text_parts or not self.tool_calls else None,
        }
        if self.reasoning_parts or self.thinking_blocks:
            message["reasoning_content"] = "".join(self.reasoning_parts)
            if self.thinking_blocks:
                message["thinking_blocks"] = self.thinking_blocks
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        return message

    def _take_thinking(self, block: Any) -> None:
        if not isinstance(block, dict):
            return
        if block.get("type") == "redacted_thinking":
            self.thinking_blocks.append(block)
        elif block.get("signature"):  # closes the thinking streamed since the last block
            text = "".join(self.reasoning_parts)
            self.thinking_blocks.append(
                {"type": "thinking", "thinking": text[self._thought :], "signature": block["signature"]}
            )
            self._thought = len(text)

    def _take_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index", 0)
        if not isinstance(index, int):  # not OpenAI's shape: pass it on, but do not store the stream
            self.replayable = False
            return
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        known = self.tool_calls.get(index)
        if known is None:
            known = self.tool_calls[index] = {"id": call.get("id"), "type": "function",
                                              "function": {"name": "", "arguments": ""}}  # fmt: skip
        elif call.get("id") and not known["id"]:
            known["id"] = call["id"]
        elif call.get("id") and call["id"] != known["id"]:
            # another call at a used index (some servers number every call 0): the chat client reads
            # the chunks as they came, and one merged call must not be stored for the rest (t47)
            self.replayable = False
        known["function"]["name"] = openai_chat.grown_name(known["function"]["name"], function.get("name"))
        fragment = openai_chat.arguments_text(function.get("arguments"))
        if fragment:
            known["function"]["arguments"] += fragment


class ChatStream(ABC):
    """An open streamed answer: yields OpenAI ``chat.completion.chunk`` JSON payloads (no SSE framing).

    Usage-only chunks are not yielded; they land in :attr:`tally`, and the pipeline
    emits one if the client asked for it. ``[DONE]`` is the pipeline's job too.
    A :attr:`framed` stream (a passed-through one) yields whole SSE events of its own
    protocol instead, which go to the client as they are, with nothing added.
    """

    framed: ClassVar[bool] = False
    speculation: SpeculationLog | None = None
    """The speculative loop's work, when it answers (read when the stream ends)."""

    def __init__(self) -> None:
        self.tally = StreamTally()
        self._reader: openai_chat.ChunkReader | None = None
        self.cut_short = False
        """The answer ended at a stop string the gateway applies while the upstream writes on: the
        stream has ended for the client, and :meth:`read_rest` reads the upstream to its end for
        its usage (t58: the client waited in silence for the rest of the generation)."""

    async def read_rest(self) -> None:
        """Read what the upstream writes past the cut into the tally (its usage), to the end of the
        stream, then close it; bounded by the model's timeouts. Failures raise :class:`UpstreamError`."""
        await self.aclose()

    async def next_deltas(self) -> list[core.Delta]:
        """The next chunk in the internal model, for a client of another protocol than chat
        (StopAsyncIteration at the end). A chat upstream's chunk is read into deltas; a stream
        that reads another protocol gives its deltas without writing a chunk first."""
        if self._reader is None:
            self._reader = openai_chat.ChunkReader()
        try:
            payload = await self.__anext__()
        except StopAsyncIteration:
            waiting = self._reader.flush()  # a stream that ended without a finish_reason
            if waiting:
                return waiting
            raise
        return self._reader.read(decode_json(payload))

    def error_event(self, error: GatewayError) -> bytes:
        """The event that tells the client the stream failed, in the stream's protocol."""
        return b"data: " + error.to_body() + b"\n\n"

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @abstractmethod
    async def __anext__(self) -> bytes: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class RelayedStream(ChatStream):
    """A stream passed through (:meth:`Provider.relay`): the upstream's own events, each
    re-framed as ``event: <type>`` and its data, nothing else changed. A subclass reads
    each event for the tally (and raises for an in-band error event); the stream ends
    after one of :attr:`end_events`, and ending before one is an upstream failure."""

    framed = True
    end_events: ClassVar[frozenset[str]]
    preamble_events: ClassVar[frozenset[str]] = frozenset()
    """Events an upstream sends before any model work (Anthropic's ``message_start``, a
    Responses ``response.created``): the first piece holds them together with the first event
    after them, so an error or a cut before any content is still retried and falls back, as
    a translated stream's is, and no client sees a start that came to nothing."""
    closing_event: ClassVar[bytes | None] = None
    """The last event, given to the client when the upstream left out only that one: once the
    subclass has read the answer whole (:attr:`finished`), as a chat stream that lost only its
    ``[DONE]`` is (t58)."""

    def __init__(self, provider: Provider, response: UpstreamResponse) -> None:
        super().__init__()
        self.tally.replayable = False
        self._provider = provider
        self._response = response
        self._events = UpstreamEvents(provider, response)
        self._ended = False
        self.content_began = False
        """An event past the preamble was read (and so reaches the client): a failure from now
        on can no longer be retried."""
        self.finished = False
        """The subclass read the model's finish: only the last event is due."""

    async def __anext__(self) -> bytes:
        held = [await self._next_event()]
        while not self.content_began and not self._ended:  # the preamble: held with what follows it
            held.append(await self._next_event())
        return held[0] if len(held) == 1 else b"".join(held)

    async def _next_event(self) -> bytes:
        name = self._provider.name
        while True:
            done = self._ended or (self.finished and self.closing_event is not None)
            event = await (self._events.after_end() if done else self._events.next())
            if event is None:
                await self.aclose()
                if self._ended:
                    raise StopAsyncIteration
                if self.closing_event is not None and self.finished:
                    self._ended = True  # the model had finished; only the last event was left out
                    return self.closing_event
                raise UpstreamProtocolError(name, f"stream ended before {' or '.join(sorted(self.end_events))}")
            if self._ended:
                continue  # nothing is due after the last event
            data = decode_event(name, event.data)
            kind = data.get("type")
            if not isinstance(kind, str):
                raise UpstreamProtocolError(name, "sent a stream event without a type")
            self.tally.chunks += 1
            self._take(kind, data)
            self._ended = kind in self.end_events
            self.content_began = self.content_began or kind not in self.preamble_events
            return b"event: " + kind.encode() + b"\ndata: " + event.data + b"\n\n"

    @abstractmethod
    def _take(self, kind: str, data: dict[str, Any]) -> None:
        """Read one event into the tally; raise :class:`UpstreamError` for an error event."""

    async def aclose(self) -> None:
        await self._response.aclose()


class Provider(ABC):
    """One upstream model. Subclasses translate the internal model to what the server speaks, and its answers back."""

    kind: ClassVar[str]

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        client: httpx.AsyncClient,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        """``transport``: the pool ``client`` was made with, which requests go to straight (not
        through the client: :meth:`_via_httpx`); passed in, for httpx keeps it private (t77)."""
        self.name = name
        self.config = config
        self.client = client
        self.api_key = api_key
        self.extra_headers = {header.lower(): value for header, value in config.headers.items()}
        """The policy's ``headers``, named as the gateway names its own (``Anthropic-Version`` then
        replaces the default rather than going out beside it)."""
        self.upstream_model = config.upstream_model or name
        self.base_url, self._base_query = split_base_url(config.base_url)
        """The base URL, its path ending in ``/`` and without its query, which every call keeps (t177)."""
        self._urls: dict[str, httpx.URL] = {}
        self.transport = transport
        self._http11 = transport if isinstance(transport, Http11Transport) else None
        self._timeout = httpx.Timeout(
            connect=config.timeouts.connect,
            read=config.timeouts.first_byte,
            write=config.timeouts.first_byte,
            pool=config.timeouts.connect,
        )
        self._extensions = {"timeout": self._timeout.as_dict()}

    @abstractmethod
    async def complete(self, request: core.Request, body: dict[str, Any] | None = None) -> Completion:
        """Answer a non-streamed request, encoded for the upstream from ``request``. ``body``: a chat
        client's own body, the model name already replaced, which an OpenAI-compatible upstream is
        sent as it is (the raw pass-through); other providers encode ``request`` all the same."""

    @abstractmethod
    async def open_stream(self, request: core.Request, body: dict[str, Any] | None = None) -> ChatStream:
        """Start a streamed answer; returns once the upstream accepted it (HTTP errors raise here)."""

    def not_carried(self, request: core.Request) -> list[str]:
        """What of a chat client's request this upstream is not sent (for ``x-gateway-dropped``)."""
        return []

    async def embed(
        self, inputs: list[str] | list[list[int]], dimensions: int | None, extra: Mapping[str, Any] | None = None
    ) -> Embeddings:
        """Embed ``inputs`` (texts or token ids), one vector each, in order; ``extra``: the client's
        other fields (``user``, vLLM's ``truncate_prompt_tokens``, ...), sent on as they are."""
        raise UpstreamProtocolError(self.name, f"provider {self.kind!r} serves no embeddings")

    def salted(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        """``body`` as this upstream is sent it for ``tenant``: with its prompt-cache salt where the
        model salts per tenant (``tenant_cache_salt``), else as it is."""
        return body

    async def relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> Completion:
        """Pass a request of the upstream's own protocol through as it is, with
        the client's ``headers`` that shape it (an ``anthropic-beta``); the body is the answer."""
        raise UpstreamProtocolError(self.name, f"provider {self.kind!r} passes nothing through")

    async def open_relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> ChatStream:
        """The same, streamed: a :attr:`ChatStream.framed` stream of the upstream's own events."""
        raise UpstreamProtocolError(self.name, f"provider {self.kind!r} passes nothing through")

    async def forward(self, method: str, path: str) -> UpstreamResponse:
        """A bodiless request to the upstream (reading or deleting what it keeps), its answer read."""
        raise UpstreamProtocolError(self.name, f"provider {self.kind!r} keeps nothing to {method} at {path}")

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- shared HTTP plumbing -------------------------------------------------

    async def post(
        self,
        path: str,
        payload: dict[str, Any] | None,
        headers: dict[str, str],
        *,
        stream: bool,
        method: str = "POST",
        names_an_object: bool = False,
    ) -> UpstreamResponse:
        """POST JSON (``method`` another verb, without a body when ``payload`` is None); map
        transport failures and HTTP errors to :class:`UpstreamError`. ``names_an_object``: the path
        holds an id (``responses/{id}/cancel``), so its parsed URL is not kept (t101: one kept per
        cancelled response, never freed).

        With ``stream=True`` the caller owns the open response and must close it. Public: the
        speculative loop's token calls (:class:`~gateway.speculative.token_api.TokenAPI`) go through
        it too (t77).
        """
        content = None if payload is None else msgspec.json.encode(payload)
        url = self._url(path, keep=not names_an_object)
        timeouts = self.config.timeouts
        loop = asyncio.get_running_loop()
        deadline = total_deadline(timeouts.total)  # what is left of it, on a retry
        response: UpstreamResponse
        try:
            if self._http11 is not None:
                response = await self._http11.send(
                    method.encode(),
                    url,
                    headers.items(),
                    content,
                    connect_timeout_s=timeouts.connect,
                    first_byte_timeout_s=timeouts.first_byte,
                    stream=stream,
                    total_timeout_s=deadline - loop.time(),
                )
            else:
                note_sent()  # httpx does not say when it has written: taken as sent
                async with asyncio.timeout_at(deadline):
                    response = await self._via_httpx(method, url, content, headers, stream=stream)
            if response.status_code >= 300:
                try:
                    async with asyncio.timeout_at(deadline):  # an error's body, streamed or not, is bounded too
                        await response.aread()
                finally:
                    await response.aclose()
                raise self._status_error(response)
        except UpstreamError:
            raise
        except TimeoutError:
            raise UpstreamTotalTimeoutError(self.name, timeouts.total) from None
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from None
        return response

    async def _via_httpx(
        self, method: str, url: httpx.URL, content: bytes | None, headers: dict[str, str], *, stream: bool
    ) -> httpx.Response:
        # Straight to the client's pooled transport: the client's auth, redirect and
        # cookie layers cost ~0.3 ms a request, and a cookie jar shared by every
        # tenant's requests is something a gateway must not keep anyway.
        request = httpx.Request(method, url, content=content, headers=headers, extensions=self._extensions)
        response = await self.transport.handle_async_request(request)
        if not stream and response.status_code < 400:
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                raise BodyFailed(response.status_code, exc) from exc
            finally:
                await response.aclose()
        return response

    def _url(self, path: str, *, keep: bool = True) -> httpx.URL:
        """The absolute URL for ``path`` (a query after it is the client's), parsed once (httpx would
        parse a relative path on every request); ``keep=False`` for paths that name one object (an
        id), which are not kept. The base URL's query (Azure OpenAI's ``api-version``) comes first, and
        a parameter it sets is not the client's to set again."""
        url = self._urls.get(path)
        if url is None:
            if "://" in path:  # already absolute (e.g. a server-root endpoint)
                url = httpx.URL(path)
            else:
                url = self.base_url.copy_with(raw_path=self.base_url.raw_path + path.lstrip("/").encode())
            if self._base_query:
                url = url.copy_with(query=_after_base_query(self._base_query, url.query))
            if keep:
                self._urls[path] = url
        return url

    def transport_error(self, exc: Exception) -> UpstreamError:
        """Classify a transport failure by its root cause (some transports relabel disconnects as timeouts)."""
        if isinstance(exc, BodyFailed) and isinstance(exc.__cause__, Exception):
            error = self.transport_error(exc.__cause__)
            if isinstance(error, UpstreamProtocolError):  # it answered: the status it came with (t70)
                error.upstream_status = exc.status_code
            return error
        root = exc.__cause__ or exc
        cause = type(root).__name__
        kinds = _kinds()
        if isinstance(exc, httpx.ConnectError) or isinstance(root, kinds.refused):
            return UpstreamConnectError(self.name, f"cannot connect ({cause})")
        if isinstance(root, kinds.disconnects):
            return UpstreamProtocolError(self.name, f"connection closed before the answer was complete ({cause})")
        if isinstance(exc, httpx.PoolTimeout) or isinstance(root, kinds.busy):
            return UpstreamBusyError(self.name, str(exc) or "no free connection")
        if isinstance(exc, httpx.TimeoutException) or isinstance(root, kinds.timeouts):
            return UpstreamTimeoutError(self.name, f"timed out ({cause})")
        if isinstance(exc, httpx.DecodingError):  # it answered, in a coding the gateway cannot read
            return UpstreamProtocolError(self.name, str(exc) or "cannot decode the answer")
        return UpstreamConnectError(self.name, f"transport error ({cause})")

    def _status_error(self, response: UpstreamResponse) -> UpstreamStatusError:
        location = response.headers.get("location") if response.status_code < 400 else None
        content = response.content
        if self.api_key and self.api_key.encode() in content:  # a 4xx's words reach the client (t46)
            content = content.replace(self.api_key.encode(), b"[the gateway's upstream key]")
        return UpstreamStatusError(
            self.name,
            response.status_code,
            f"redirected to {location[:200]}" if location else _error_detail(content),
            retry_after_s=_come_back_in(response.headers, response.status_code),
            body=content,
        )


def split_base_url(base_url: str) -> tuple[httpx.URL, bytes]:
    """A model's ``base_url`` as calls are made from it: the URL, its path ending in ``/`` and with
    no query, and the query (as written), which goes on every call. A call's path goes after the
    base's path, not after its query (t177: ``...dep1?api-version=1/chat/completions``)."""
    url = httpx.URL(base_url)
    path, _, query = url.raw_path.partition(b"?")
    return url.copy_with(raw_path=path.rstrip(b"/") + b"/", fragment=None), query


def _after_base_query(base: bytes, query: bytes) -> bytes:
    """The base URL's query, then the call's (the client's) parameters that it does not set: a repeated
    ``api-version`` or token is the client's to a server that reads the last one, or refused (t181)."""
    if not query:
        return base
    taken = {_query_name(pair) for pair in base.split(b"&")}
    return b"&".join([base, *(pair for pair in query.split(b"&") if pair and _query_name(pair) not in taken)])


def _query_name(pair: bytes) -> str:
    """A query parameter's name as a server may read it: decoded, its case folded (ASP.NET's, as
    Azure's, ignores case)."""
    return unquote_plus(pair.partition(b"=")[0].decode("latin-1")).casefold()


class _Kinds(NamedTuple):
    """Transport failures by type (t77: not by class name, which a rename or subclass escapes)."""

    refused: tuple[type[BaseException], ...]
    disconnects: tuple[type[BaseException], ...]
    """The upstream closed the connection before the answer was complete."""
    busy: tuple[type[BaseException], ...]
    timeouts: tuple[type[BaseException], ...]


def _kinds() -> _Kinds:
    """The failures of every transport library loaded. httpx loads httpcore with its own transport
    and aiohttp only with its transport (0.2 s of imports a worker does not pay otherwise): none of
    their errors exist before. httpx's transport raises httpx's errors from httpcore's, the cause
    being what is classified. A server killed mid-answer is aiohttp's ``ClientOSError`` (connection
    reset), which httpx-aiohttp hands on as a read timeout: a 502, not a 504; aiohttp's
    ``ClientConnectorError`` is a ``ClientOSError`` too, so refusals are told first. aiohttp's
    ``ServerTimeoutError`` is a :class:`TimeoutError`."""
    kinds = _Kinds(
        (ConnectionRefusedError,),
        (httpx.RemoteProtocolError, httpx.ReadError, ConnectionResetError, BrokenPipeError),
        (httpx.PoolTimeout,),
        (httpx.TimeoutException, TimeoutError),
    )
    if "httpcore" in sys.modules:
        import httpcore

        kinds = _Kinds(
            kinds.refused,
            (*kinds.disconnects, httpcore.RemoteProtocolError, httpcore.ReadError),
            (*kinds.busy, httpcore.PoolTimeout),
            (*kinds.timeouts, httpcore.TimeoutException),
        )
    if "aiohttp" in sys.modules:
        import aiohttp

        kinds = _Kinds(
            (*kinds.refused, aiohttp.ClientConnectorError),
            (*kinds.disconnects, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError),
            kinds.busy,
            kinds.timeouts,
        )
    return kinds


_AFTER_END_S = 2.0
"""How long a finished answer's trailers may take before the stream is ended without them."""


class UpstreamEvents:
    """The SSE events of an open streamed response, each wait bounded twice over.

    The socket's read timer restarts on every byte, so an upstream that sends only
    comments (``: keep-alive``) or a line without end would otherwise hold the stream
    open for ever: every wait here ends at the stream's ``total`` deadline (what is left of
    its model's total, on a retry), and at ``idle`` seconds without a whole event.
    """

    __slots__ = ("_deadline", "_events", "_idle_s", "_provider")

    def __init__(self, provider: Provider, response: UpstreamResponse) -> None:
        config = provider.config
        self._provider = provider
        self._deadline = total_deadline(config.timeouts.total)
        self._idle_s = config.timeouts.idle
        self._events = iter_sse(response.aiter_bytes(), config.max_stream_line_bytes)

    async def next(self) -> SSEEvent | None:
        """The next event; None at the end of the stream. Failures raise :class:`UpstreamError`."""
        name = self._provider.name
        now = asyncio.get_running_loop().time()
        idle_ends = now + self._idle_s
        try:
            async with asyncio.timeout_at(min(self._deadline, idle_ends)):
                return await self._events.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if idle_ends < self._deadline:
                raise UpstreamTimeoutError(name, f"stream sent no event for {self._idle_s:g}s") from None
            raise UpstreamTotalTimeoutError(name, self._provider.config.timeouts.total, "stream not finished") from None
        except SSELineTooLong as exc:
            raise UpstreamProtocolError(name, f"stream {exc}") from None
        except httpx.HTTPError as exc:
            raise self._provider.transport_error(exc) from None

    async def after_end(self) -> SSEEvent | None:
        """The next event once the answer is whole (only trailers are due: usage, ``[DONE]``);
        None at the end, and for a dropped connection or silence past a short wait: the client
        has the whole answer, and it stands."""
        try:
            async with asyncio.timeout(_AFTER_END_S):
                return await self._events.__anext__()
        except (StopAsyncIteration, TimeoutError, SSELineTooLong, httpx.HTTPError):
            return None


def _error_detail(content: bytes) -> str:
    message = upstream_error_fields(content).get("message")
    if isinstance(message, str):
        return message[:500]
    try:
        error = msgspec.json.decode(content).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    if isinstance(error, str):
        return error[:500]
    return content[:200].decode("utf-8", "replace") or "no detail"


def _come_back_in(headers: Mapping[str, str], status: int) -> float | None:
    """Seconds the upstream asks to be left alone, read as the openai SDK reads them: ``retry-after-ms``
    first (Azure OpenAI sends only it; t174: a 429 was retried 45 ms later), then ``Retry-After``,
    then, for a 429, OpenAI's ``x-ratelimit-reset-*``."""
    seconds = _retry_after_ms(headers.get("retry-after-ms"))
    if seconds is None:
        seconds = _retry_after(headers.get("retry-after"))
    if seconds is None and status == 429:
        seconds = _rate_limit_reset(headers)
    return seconds


def _retry_after_ms(value: str | None) -> float | None:
    """Seconds from a ``retry-after-ms`` header (milliseconds, perhaps with a fraction); None for no
    time, as the openai SDK reads it (t181: ``0`` beside ``retry-after: 30`` retried at once)."""
    if not value:
        return None
    try:
        milliseconds = float(value)
    except ValueError:
        return None
    return milliseconds / 1000 if math.isfinite(milliseconds) and milliseconds > 0 else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "inf" and "nan" parse, and no wait or header can be made of them
        return max(0.0, seconds) if math.isfinite(seconds) else None
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    """When an OpenAI 429 without ``Retry-After`` may be tried again: the reset (``x-ratelimit-reset-
    requests: 1s``, ``-tokens: 6m0s``) of the limit it names as spent, else the sooner one (t52:
    the client got a 429 with no Retry-After, which the README promises)."""
    resets: list[float] = []
    for kind in ("requests", "tokens"):
        reset = _duration(headers.get(f"x-ratelimit-reset-{kind}"))
        if reset is None:
            continue
        if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0":
            return reset
        resets.append(reset)
    return min(resets) if resets else None


def _duration(value: str | None) -> float | None:
    """Seconds in a Go-style duration (``6m0s``, ``1.5s``, ``20ms``), as OpenAI writes its resets."""
    if not value:
        return None
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


@contextmanager
def answered(response: UpstreamResponse) -> Iterator[None]:
    """Reading the body of an answer that came with a 2xx: a protocol error raised here carries
    its status, so the log's ``upstream_status`` says the upstream answered (t69: a 200 with no
    choices logged null, which reads as a connection error)."""
    try:
        yield
    except UpstreamProtocolError as exc:
        exc.upstream_status = response.status_code
        raise


def decode_event(upstream: str, data: bytes) -> dict[str, Any]:
    """One stream event's data, a JSON object; :class:`UpstreamProtocolError` when it is not one."""
    return decode_json_object(upstream, data, "sent a stream event that is")


def decode_json_object(upstream: str, content: bytes, said: str = "answered with a body that is") -> dict[str, Any]:
    try:
        data = decode_json(content)
    except msgspec.DecodeError:
        raise UpstreamProtocolError(upstream, f"{said} not JSON ({_opening(content)})") from None
    if not isinstance(data, dict):
        raise UpstreamProtocolError(upstream, f"{said} not a JSON object")
    return data


def decode_answer(upstream: str, content: bytes) -> tuple[dict[str, Any], bytes]:
    """A whole answer's JSON object, and its bytes as the gateway passes them on: written again
    when they had to be mended (:func:`decode_json`), so that whatever reads them later may."""
    try:
        data = msgspec.json.decode(content)
    except msgspec.DecodeError:
        mended = decode_json_object(upstream, content)
        return mended, msgspec.json.encode(mended)
    if not isinstance(data, dict):
        raise UpstreamProtocolError(upstream, "answered with a body that is not a JSON object")
    return data, content


def _opening(content: bytes) -> str:
    """What a body that is not JSON looks like, for whoever debugs the upstream: its size and
    kind, never its text (an error page can name hosts; an echo, the prompt)."""
    head = content[:64].lstrip().lower()
    kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else "empty" if not content else "text"
    return f"{kind}, {len(content)} bytes"
