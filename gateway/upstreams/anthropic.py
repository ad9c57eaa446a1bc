"""Anthropic's Messages API as an upstream, for clients of every protocol.

Request (``POST {base_url}/v1/messages``), from the internal model, which the client's codec
decoded (for a chat client, :func:`gateway.protocols.openai_chat.read_chat_request`), written
by :func:`gateway.protocols.anthropic_messages.encode_request`. For a chat client that means:

- ``system`` and ``developer`` messages, wherever they are, become the top-level
  ``system`` string (joined with a blank line), or its text blocks when a part carries
  ``cache_control`` (one after the conversation began is named ``system.position`` in
  ``x-gateway-dropped``); ``cache_control`` on content parts and on tools is passed on.
- ``user`` / ``assistant`` messages become ``messages``; content is a string or a list
  of parts: ``text`` → text block, ``image_url`` → image block (``data:`` URLs as a
  base64 source, http(s) URLs as a url source). Consecutive messages of one role are
  merged, since Anthropic requires user/assistant alternation; empty text is dropped
  (Anthropic rejects empty text blocks).
- Assistant ``tool_calls`` → ``tool_use`` blocks (arguments JSON-decoded to ``input``);
  ``tool`` messages → a user message of ``tool_result`` blocks. An id a conversation calls
  again (a chat server's ``call_0`` every turn) goes under one of its own in the call and its
  result, since Anthropic refuses ``tool_use`` ids that repeat.
- ``max_tokens`` / ``max_completion_tokens`` → ``max_tokens`` (4096 when absent, since
  Anthropic requires it); ``temperature`` (clamped to [0, 1]); ``top_p``; ``stop`` →
  ``stop_sequences``; ``user`` → ``metadata.user_id``; ``tools`` → ``tools``
  (``parameters`` → ``input_schema``); ``tool_choice`` ``auto`` / ``required`` /
  named function / ``none`` → ``auto`` / ``any`` / ``tool`` / ``none``; a tool's ``strict``;
  ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.
- ``thinking`` (the gateway's carrier for Anthropic's setting) is passed on, and so are
  assistant ``thinking`` / ``redacted_thinking`` parts (signed reasoning from earlier
  turns, which Anthropic needs back before a tool result); unsigned reasoning (another
  upstream's) is left out, since Anthropic would refuse it (an answer's ``reasoning_content``
  sent back so is named in ``x-gateway-dropped``).
- Dropped, having no Anthropic equivalent: ``n`` (``n > 1`` is refused with a 400),
  ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``seed``,
  ``response_format`` (a JSON schema aside), ``logprobs``, ``top_logprobs``, the
  deprecated ``functions`` / ``function_call`` and any other unknown field: each is named
  in ``x-gateway-dropped`` (:meth:`AnthropicProvider.not_carried`), as are an image's
  ``detail``, a temperature above 1 and a message's ``name`` (``messages.name``).

Response (Anthropic → OpenAI), through the internal model too: the Messages codec reads the
message (``decode_answer``) or the stream (``StreamDecoder``), the chat codec writes the
completion (``completion_from_answer``) or each chunk's delta (``ChunkDeltas``), so:
text blocks are joined into ``message.content``
(``null`` when there are none), ``tool_use`` blocks become ``message.tool_calls``,
``thinking`` blocks become ``message.reasoning_content`` (their text) and
``message.thinking_blocks`` (with signatures; redacted ones too); ``stop_reason`` maps to ``finish_reason``
(end_turn/stop_sequence/pause_turn → stop, max_tokens/model_context_window_exceeded → length,
tool_use → tool_calls, refusal → content_filter); ``prompt_tokens`` counts cached input tokens too.
Streams are re-encoded event by event as ``chat.completion.chunk`` payloads; usage
goes to the stream's tally, never into a chunk.

Error bodies (``{"type": "error", "error": {"type", "message"}}``) are read by
:func:`gateway.upstreams.base._error_detail` as is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from gateway.core import model as core
from gateway.core.model import Answer, Delta, Finish, ThinkingPart, UsageReport
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamProtocolError,
    UpstreamStatusError,
    upstream_error_fields,
)
from gateway.protocols import anthropic_messages as anthropic
from gateway.protocols import openai_chat
from gateway.protocols.anthropic_messages import encode_error, encode_request
from gateway.protocols.openai_chat import chunk_body
from gateway.upstreams.base import (
    ChatStream,
    Completion,
    Provider,
    RelayedStream,
    UpstreamEvents,
    UpstreamResponse,
    Usage,
    answered,
    decode_answer,
    decode_event,
    decode_json_object,
    usage_of,
)
from gateway.upstreams.stop_strings import StopWatch, applied_here, cut_blocks, cut_deltas

__all__ = ["AnthropicProvider", "joined_betas"]

_log = structlog.get_logger("gateway.upstreams")

ANTHROPIC_VERSION = "2023-06-01"
_MESSAGES_PATH = "v1/messages"


_MOST_TOKENS = 100_000_000
_COUNTED_FIELDS = frozenset(
    {"messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "context_management",
     "output_config", "output_format"}
)  # fmt: skip
"""The body fields Anthropic's ``count_tokens`` takes (besides ``model``); it refuses others."""
_NO_COUNT_TOKENS_S = 3600.0
"""How long an upstream that answered ``count_tokens`` with 404 is not asked again."""
"""More input tokens than any model reads: a count beyond it is the upstream's fault."""


class AnthropicProvider(Provider):
    kind = "anthropic"

    def _headers(self, betas: str | None = None) -> dict[str, str]:
        """The headers of a call, with the client's ``betas`` added to any the model's ``headers``
        pin: a client's replaced the operator's (t177)."""
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION, **self.extra_headers}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        if joined := joined_betas(self.extra_headers.get("anthropic-beta", ""), betas or ""):
            headers["anthropic-beta"] = joined
        return headers

    def _relayed_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """A passed-through request's headers: the client's ``anthropic-beta`` added to the model's,
        as on every call; none of the client's replaces the gateway's own."""
        return {**headers, **self._headers(headers.get("anthropic-beta"))}

    def not_carried(self, request: core.Request) -> list[str]:
        return _not_carried(request, self.takes_one_sampler)

    takes_one_sampler = False
    """The upstream refused ``temperature`` with ``top_p`` (Claude's models since Sonnet 4.5 do):
    learned from its 400; from then on ``top_p`` is left out when both are set."""

    async def complete(self, request: core.Request, body: dict[str, Any] | None = None) -> Completion:
        stops = applied_here(anthropic.stops_applied_here(request), self.name)  # refused before it is sent
        response = await self._post_messages(request, stream=False)
        with answered(response):
            answer, usage, cut = self._read(response.content, stops)
        return Completion(
            body=openai_chat.completion_from_answer(answer, None if usage is None else answer.usage),
            usage=usage,
            text=answer.text or "",
            answer=answer,
            said="".join(
                [
                    *(part.text for part in answer.thinking if isinstance(part, ThinkingPart)),
                    *(c.name + c.arguments for c in answer.tool_calls),
                    answer.text or "",
                ]
            ),
            finish_reason=_logged_finish(answer),
            cut=cut,
        )

    async def open_stream(self, request: core.Request, body: dict[str, Any] | None = None) -> ChatStream:
        stops = applied_here(anthropic.stops_applied_here(request), self.name)  # refused before it is sent
        response = await self._post_messages(request, stream=True)
        return _AnthropicChatStream(self, response, stops)

    async def _post_messages(self, request: core.Request, *, stream: bool) -> UpstreamResponse:
        """The request as the upstream takes it: a client of OpenAI's API may set both samplers,
        which Claude's newer models refuse (t52), and its request failed or worked by the model
        it was routed to."""
        payload = _translate_request(self.name, self.upstream_model, request, stream=stream)
        headers = self._headers(request.betas)
        if self.takes_one_sampler:
            payload = _one_sampler(payload)
        try:
            return await self.post(_MESSAGES_PATH, payload, headers, stream=stream)
        except UpstreamStatusError as exc:
            # sent again whether or not another request in flight learned it first (f232)
            if _one_sampler(payload) is payload or not _refuses_both_samplers(exc, payload, headers):
                raise
            if not self.takes_one_sampler:
                self.takes_one_sampler = True
                _log.info("upstream_takes_one_sampler", model=self.name)
            return await self.post(_MESSAGES_PATH, _one_sampler(payload), headers, stream=stream)

    lacks_count_tokens_until = 0.0
    """Until when (monotonic seconds) the upstream is taken to have no ``count_tokens`` (it answered
    404: Anthropic-compatible proxies and shims often lack it): the gateway counts without asking (t61)."""

    async def count_tokens(self, body: dict[str, Any], betas: str | None) -> int | None:
        """The prompt's tokens as the model counts them (``count_tokens``): documents, PDFs and
        images included, which the gateway's own count cannot see; None when the upstream has no
        such endpoint. It is sent only the fields ``count_tokens`` takes (t59: a client's
        ``metadata.user_id`` went to it as the client wrote it, and Anthropic refuses
        ``max_tokens``, ``stream`` and ``metadata`` there)."""
        if time.monotonic() < self.lacks_count_tokens_until:
            return None
        payload = {name: value for name, value in body.items() if name in _COUNTED_FIELDS}
        payload["model"] = self.upstream_model
        try:
            response = await self.post(f"{_MESSAGES_PATH}/count_tokens", payload, self._headers(betas), stream=False)
        except UpstreamStatusError as exc:
            if exc.upstream_status not in (404, 405):
                raise
            self.lacks_count_tokens_until = time.monotonic() + _NO_COUNT_TOKENS_S
            _log.warning("count_tokens_unavailable", upstream=self.name, status=exc.upstream_status,
                         counted_by_gateway_for_s=_NO_COUNT_TOKENS_S)  # fmt: skip
            return None
        counted = decode_json_object(self.name, response.content).get("input_tokens")
        if not isinstance(counted, int) or isinstance(counted, bool):
            raise UpstreamProtocolError(self.name, "count_tokens answered no input_tokens")
        if (
            not 0 <= counted <= _MOST_TOKENS
        ):  # a PDF by file_id or an image by URL counts far beyond the request's bytes
            raise UpstreamProtocolError(self.name, f"count_tokens answered an implausible count ({counted})")
        return counted

    async def relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> Completion:
        response = await self.post(_MESSAGES_PATH, body, self._relayed_headers(headers), stream=False)
        with answered(response):
            _, content = decode_answer(self.name, response.content)  # mended where it must be (t80)
            answer, usage, _ = self._read(content, containers=anthropic.ContainerUses(body))
        return Completion(body=content, usage=usage, text=answer.text or "", finish_reason=_logged_finish(answer))

    def _read(
        self, content: bytes, stops: tuple[str, ...] = (), containers: anthropic.ContainerUses | None = None
    ) -> tuple[Answer, Usage | None, bool]:
        """The message, its usage as reported (None when the upstream reported none; with
        ``containers``, the code execution it ran added: f175), and whether it was cut: with
        ``stops``, ended where the first of them begins in its text (as a stream: t58)."""
        data = decode_json_object(self.name, content)
        matched = None
        if stops and isinstance(blocks := data.get("content"), list):
            blocks, matched = cut_blocks(blocks, stops)
            if matched is not None:
                data = {**data, "content": blocks, "stop_reason": "stop_sequence", "stop_sequence": matched}
        answer = anthropic.decode_answer(data)
        if answer is None:
            raise UpstreamProtocolError(self.name, "answer is not an Anthropic message")
        usage = usage_of(anthropic.usage_from_wire(data.get("usage")))
        if usage is not None and containers is not None:
            containers.add(data)
            usage.server_tool_requests = containers.uses(usage.server_tool_requests)
        return answer, usage, matched is not None

    async def open_relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> ChatStream:
        response = await self.post(_MESSAGES_PATH, body, self._relayed_headers(headers), stream=True)
        return _RelayedMessageStream(self, response, anthropic.ContainerUses(body))


def joined_betas(*lists: str) -> str | None:
    """``anthropic-beta`` lists (header lines, comma-separated) as one line: each beta once, in
    the order first given, the whitespace around it trimmed; None when they name none. Names are
    compared as written, case and all, as Anthropic reads them: it takes only the exact names it
    documents and refuses others ("Unexpected value(s) `...` for the `anthropic-beta` header"), so
    folding case would send on, or cache apart, a beta the client did not name (f222)."""
    betas = dict.fromkeys(beta for line in lists for part in line.split(",") if (beta := part.strip()))
    return ",".join(betas) or None


# -- request translation ------------------------------------------------------

_HONOURED_EXTRA = frozenset({"n", "stream_options", "gateway_cache"})
"""Chat fields Anthropic is not sent that the gateway honours itself (``n > 1`` is refused)."""


def _one_sampler(payload: dict[str, Any]) -> dict[str, Any]:
    if "temperature" not in payload or "top_p" not in payload:
        return payload
    return {name: value for name, value in payload.items() if name != "top_p"}


_BOTH_SAMPLERS = b"temperature and top_p cannot both be specified"


def _refuses_both_samplers(error: UpstreamStatusError, sent: dict[str, Any], headers: dict[str, str]) -> bool:
    """Anthropic's 400: "`temperature` and `top_p` cannot both be specified for this model.
    Please use only one." It names no ``param``, so it is read from the error's message, and only
    when the request sent, body and headers, does not hold that text: a 400 can quote what a
    client sent (a stop sequence, an ``anthropic-beta`` value: t144), and what is learned here
    holds for every tenant's requests (t135 follow-up)."""
    if error.upstream_status != 400:
        return False
    message = upstream_error_fields(error.upstream_body).get("message")
    return (
        isinstance(message, str)
        and _BOTH_SAMPLERS in message.encode().replace(b"`", b"")
        and _BOTH_SAMPLERS not in msgspec.json.encode([sent, headers]).replace(b"`", b"")
    )


def _not_carried(request: core.Request, one_sampler: bool = False) -> list[str]:
    lost = [name for name, value in request.extra.items() if value is not None and name not in _HONOURED_EXTRA]
    if "safety_identifier" in lost and not request.user and anthropic.end_user(request):
        lost.remove("safety_identifier")  # the end user there (metadata.user_id)
    if one_sampler and request.temperature is not None and request.top_p is not None:
        lost.append("top_p")  # the upstream takes one of the two
    if request.json_schema is not None and "response_format" in lost:
        lost.remove("response_format")  # a JSON schema is output_config.format there
    if request.temperature is not None and request.temperature > 1:
        lost.append("temperature")  # clamped to Anthropic's 1
    if any(isinstance(part, core.ImagePart) and part.detail for m in request.messages for part in m.parts):
        lost.append("image_url.detail")
    if any(message.name for message in request.messages):
        lost.append("messages.name")  # Anthropic's turns have no speaker's name (t78)
    if request.unsigned_reasoning is not None:
        lost.append(request.unsigned_reasoning)  # Anthropic refuses reasoning it did not sign
    elif anthropic.holds_unsigned_thinking(request):
        lost.append("thinking")  # an unsigned block sent back, such as a small model's reasoning (t171)
    if _system_after_turns(request.messages):
        lost.append("system.position")  # in the top-level system: Anthropic's turns hold none (t128)
    return lost


def _system_after_turns(messages: list[core.Message]) -> bool:
    began = False
    for message in messages:
        if message.role != "system":
            began = True
        elif began:
            return True
    return False


def _translate_request(upstream: str, model: str, request: core.Request, *, stream: bool) -> dict[str, Any]:
    """The internal request written by the Messages codec; refused when the client's request
    held what the internal model could not (:attr:`core.Request.unreadable`)."""
    if request.unreadable is not None:
        raise InvalidRequestError(request.unreadable, param=request.unreadable_param)
    n = request.extra.get("n")
    if isinstance(n, int) and n > 1:
        raise InvalidRequestError(f"n > 1 is not supported by anthropic upstream '{upstream}'", param="n")
    return encode_request(request, model, stream=stream)


class _AnthropicChatStream(ChatStream):
    """Anthropic's stream events read as deltas (the Messages codec's :class:`StreamDecoder`),
    written as OpenAI chunks (:class:`openai_chat.ChunkDeltas`) for a chat client, or given as
    they are (:meth:`next_deltas`) to a client of another protocol; usage goes to the tally.

    Nothing is given before the first content or finish: Anthropic says "overloaded" as an
    ``error`` event right after ``message_start``, and until then the stream has not begun for
    the client, so that error is retried and falls back like a 529."""

    def __init__(self, provider: AnthropicProvider, response: UpstreamResponse, stops: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._stops = StopWatch(stops) if stops else None
        """Stop strings the gateway applies (Anthropic refuses them: whitespace alone)."""
        self._provider = provider
        self._response = response
        self._events = UpstreamEvents(provider, response)
        # with stops, the line that starts text resumed after a call is added past the watch (t58)
        self._decoder = anthropic.StreamDecoder(joined=not stops)
        self._joiner = anthropic.TextJoiner()
        self._chunk_deltas = openai_chat.ChunkDeltas()
        self._pending: deque[bytes] = deque()
        self._started = False
        self._said = False
        """Whether content (or the finish) came: until then what came is held back."""
        self._opened = False
        """Whether the role chunk is queued: it waits for the first chunk, which says its content."""
        self._stopped = False
        """``message_delta`` gave the stop reason: the model has finished, only ``message_stop`` is due."""
        self._done = False

    async def __anext__(self) -> bytes:
        try:
            while (not self._pending or not self._said) and not self._done and not self.cut_short:
                self._handle(await self._next_event(), chunks=True)
        except Exception:
            await self.aclose()
            raise
        if self._pending:
            self.tally.chunks += 1
            return self._pending.popleft()
        if not self.cut_short:  # else the rest is read for its usage alone (read_rest)
            await self.aclose()
        raise StopAsyncIteration

    async def next_deltas(self) -> list[Delta]:
        held: list[Delta] = []
        try:
            while not self._done and not self.cut_short:
                held += self._handle(await self._next_event(), chunks=False)
                if held and self._said:
                    self.tally.chunks += 1
                    return held
        except Exception:
            await self.aclose()
            raise
        if held:  # a stream that ended with nothing said
            return held
        if not self.cut_short:
            await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._response.aclose()

    async def read_rest(self) -> None:
        try:
            while not self._done:
                self._handle(await self._next_event(), chunks=False)  # past the cut: the usage alone
        finally:
            await self.aclose()

    async def _next_event(self) -> dict[str, Any]:
        name = self._provider.name
        event = await (self._events.after_end() if self._stopped else self._events.next())
        if event is None:
            if self._stopped:  # the model had finished; only the message_stop event was left out (t58)
                return _MESSAGE_STOP
            raise UpstreamProtocolError(name, "stream ended before message_stop")
        return decode_event(name, event.data)

    def _handle(self, event: dict[str, Any], *, chunks: bool) -> list[Delta]:
        """The deltas one event becomes, with the tally updated (and with ``chunks``, the chat
        chunks they make queued)."""
        kind = event.get("type")
        if kind == "error":
            raise _stream_error(self._provider.name, event)
        self._stopped = self._stopped or _gives_stop_reason(event)
        if kind == "message_stop":
            self._done = True
            if not self._stopped and not self.cut_short:
                # No message_delta: whether the answer is whole is unknown, on every edge alike (t93)
                raise UpstreamProtocolError(self._provider.name, "message_stop came without a stop reason")
        if not self._started and kind not in ("message_start", "ping"):
            raise UpstreamProtocolError(self._provider.name, f"stream event {kind!r} came before message_start")
        deltas = self._decoder.feed(event)
        if self._stops is not None:
            deltas = self._joiner.join(cut_deltas(self._stops, deltas))
            self.cut_short = self._stops.matched is not None  # the upstream writes on past it (t58)
        tally = self.tally
        if kind == "message_start":
            self._started = True
            tally.id, tally.created = self._decoder.id, int(time.time())
            tally.model = self._decoder.model or self._provider.upstream_model
        for delta in deltas:
            if not isinstance(delta, UsageReport):
                self._said = True
            if isinstance(delta, UsageReport):
                tally.usage = usage_of(delta.usage)
            elif isinstance(delta, Finish):
                tally.finish_reason, tally.finish = openai_chat.chat_finish_reason(delta.reason), delta.reason
                tally.stop_sequence = delta.stop_sequence
                tally.replayable = tally.replayable and delta.reason != "pause_turn"  # not a whole answer
                if chunks:
                    self._chunk({}, tally.finish_reason, tally.stop_sequence)
            elif (chunk := self._chunk_deltas.delta(delta)) is not None:
                tally.take_delta(chunk)
                if chunks:
                    self._chunk(chunk)
        return deltas

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, stop: str | None = None) -> None:
        tally = self.tally
        if not self._opened:
            # The role opens the stream once its first content is known: OpenAI opens a tool call or
            # a refusal with content null, as the cache's replay does (f93: "" live, None on a hit)
            self._opened = True
            textless = "tool_calls" in delta or "refusal" in delta
            role = {"role": "assistant", "content": None if textless else ""}
            self._pending.append(chunk_body(tally.id, tally.created, tally.model, role))
        self._pending.append(chunk_body(tally.id, tally.created, tally.model, delta, finish_reason, stop_reason=stop))


_MESSAGE_STOP: dict[str, Any] = {"type": "message_stop"}
_COUNTED_CALLS = frozenset({"web_search", "web_fetch"})
"""The server tools Anthropic's usage counts (``server_tool_use.<name>_requests``), in the final
``message_delta`` alone: a stream counts their ``server_tool_use`` blocks until it comes (f180)."""


def _gives_stop_reason(event: dict[str, Any]) -> bool:
    """Whether the event is the ``message_delta`` that says why the model stopped (with the usage):
    the answer is whole, though ``message_stop`` has not come yet (t58)."""
    delta = event.get("delta")
    return (
        event.get("type") == "message_delta" and isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str)
    )


class _RelayedMessageStream(RelayedStream):
    """A Messages stream passed through. The tally reads (through the codec's
    :class:`StreamDecoder`) the message id, usage and stop reason, and what the model wrote
    (thinking, text, tool input) as a translated stream's does, for the count of a stream cut
    short and the bound on what it may write (t142), and the web searches and fetches it ran,
    billed where it ends before the usage that counts them (f180); an ``error`` event raises and
    the gateway answers it in Anthropic's shape."""

    end_events = frozenset({"message_stop"})
    preamble_events = frozenset({"message_start", "ping"})
    closing_event = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

    def __init__(
        self, provider: AnthropicProvider, response: UpstreamResponse, containers: anthropic.ContainerUses
    ) -> None:
        super().__init__(provider, response)
        self._decoder = anthropic.StreamDecoder()
        self._chunk_deltas = openai_chat.ChunkDeltas()
        self._containers = containers
        self._calls: dict[str, int] = {}

    def _take(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "error":
            raise _stream_error(self._provider.name, data)
        self.finished = self.finished or _gives_stop_reason(data)
        tally = self.tally
        for delta in self._decoder.feed(data):
            if isinstance(delta, UsageReport):
                tally.usage = usage_of(delta.usage)
            elif isinstance(delta, Finish):
                tally.finish_reason = openai_chat.chat_finish_reason(delta.reason)
                tally.stop_sequence = delta.stop_sequence
            elif (chunk := self._chunk_deltas.delta(delta)) is not None:
                tally.take_delta(chunk)
        if kind == "message_start":
            tally.id, tally.model = self._decoder.id, self._decoder.model
            self._containers.add(data.get("message"))
        elif kind == "message_delta":
            self._containers.add(data.get("delta"))
            if isinstance(data.get("usage"), dict) and self._decoder.usage is not None:
                self._calls = {}  # its count of them wins: a failed search is not billed
        elif kind == "content_block_start":
            block = data.get("content_block")
            self._containers.add_block(block)
            if (
                isinstance(block, dict)
                and block.get("type") == "server_tool_use"
                and block.get("name") in _COUNTED_CALLS
            ):
                self._calls[block["name"]] = self._calls.get(block["name"], 0) + 1
        else:
            return
        counted = self._decoder.usage  # the usage's own count, which the tally's below adds to (f175)
        tally.server_tools = {**self._calls, **(counted.server_tool_requests if counted is not None else {})}
        if tally.usage is not None and counted is not None:
            tally.usage.server_tool_requests = self._containers.uses(tally.server_tools)

    def error_event(self, error: GatewayError) -> bytes:
        return b"event: error\ndata: " + encode_error(error.status_code, error.message) + b"\n\n"


def _stream_error(upstream: str, event: dict[str, Any]) -> UpstreamStatusError:
    """An in-band ``error`` event: an overloaded upstream as the 529 Anthropic would have sent."""
    error = event.get("error")
    error = error if isinstance(error, dict) else {}
    status = 529 if error.get("type") == "overloaded_error" else 500
    return UpstreamStatusError(upstream, status, str(error.get("message", "error in stream"))[:500])


def _logged_finish(answer: Answer) -> str | None:
    """The chat finish reason the log records, as a stream's (t115: ``pause_turn`` was logged as
    itself, which the log's finish reasons do not name)."""
    return openai_chat.chat_finish_reason(answer.finish_reason)
