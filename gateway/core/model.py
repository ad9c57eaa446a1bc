"""A request and its answer as the gateway understands them, whatever protocol carried them.

Protocol codecs (:mod:`gateway.protocols`) decode their wire format into these types and
encode these types back. Streams are told as a sequence of :data:`Delta` values.

Not every field is protocol-neutral. :attr:`Request.extra` holds OpenAI chat parameters as
the client wrote them, by their JSON names: the cache (its key and plan) and the pipeline
(``n``, ``service_tier``) among others read it, and OpenAI-compatible upstreams get it as it is. The
``thinking`` and ``cache_control`` fields hold Anthropic's JSON objects as the client wrote them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "Answer",
    "Delta",
    "FilePart",
    "Finish",
    "ImagePart",
    "Message",
    "Part",
    "RedactedThinking",
    "RedactedThinkingPart",
    "RefusalDelta",
    "Request",
    "TextDelta",
    "TextPart",
    "ThinkingDelta",
    "ThinkingPart",
    "ThinkingSignature",
    "Tool",
    "ToolArgumentsDelta",
    "ToolCall",
    "ToolCallStart",
    "ToolChoice",
    "Usage",
    "UsageReport",
]

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal[
    "stop", "length", "tool_calls", "content_filter", "stop_sequence", "pause_turn", "model_context_window_exceeded"
]
"""``pause_turn``: Anthropic paused a long turn of its server tools; the client sends the turn back to
go on. Elsewhere it reads as a stop, and it is never cached: the answer is not whole.
``model_context_window_exceeded``: Anthropic cut the answer at the model's context window; elsewhere
it reads as ``length``, and it is cached as a ``max_tokens`` cut is (the key holds the prompt)."""


class TextPart(msgspec.Struct, frozen=True, tag="text"):
    text: str
    cache_control: dict[str, Any] | None = None
    """The client marked this part as a prompt-cache breakpoint (Anthropic's ``cache_control``,
    e.g. ``{"type": "ephemeral"}``): kept for Anthropic upstreams, not sent to others."""


class ImagePart(msgspec.Struct, frozen=True, tag="image"):
    url: str
    """An ``https://`` URL or a ``data:<media type>;base64,...`` URL."""
    cache_control: dict[str, Any] | None = None
    """A prompt-cache breakpoint (Anthropic), as on :class:`TextPart`."""
    detail: str | None = None
    """OpenAI's ``low`` or ``high`` resolution (another detail can be another answer); None: ``auto``."""


class FilePart(msgspec.Struct, frozen=True, tag="file"):
    """A document (a PDF, a text file) given inline, by a URL, or by the id of a file uploaded to
    OpenAI's Files API: one of ``data``, ``url`` and ``file_id`` is set."""

    data: str | None = None
    """A ``data:<media type>;base64,...`` URL (OpenAI's ``file_data``)."""
    url: str | None = None
    """An ``https://`` URL the upstream fetches (Responses' ``file_url``)."""
    file_id: str | None = None
    """The id of a file in OpenAI's Files API (``file-...``): only an OpenAI upstream can read it."""
    filename: str | None = None
    cache_control: dict[str, Any] | None = None
    """A prompt-cache breakpoint (Anthropic), as on :class:`TextPart`."""

    @property
    def media_type(self) -> str | None:
        """The media type a data URL names (lower case), or None."""
        if self.data is None or not self.data.startswith("data:"):
            return None
        comma = self.data.find(",", 5, 261)
        media_type = self.data[5:comma].partition(";")[0].strip().lower() if comma > 0 else ""
        return media_type or None


class ThinkingPart(msgspec.Struct, frozen=True, tag="thinking"):
    """The model's reasoning in an earlier assistant turn (Anthropic's ``thinking`` block).

    Anthropic requires it back, signature intact, when a tool result follows it; other
    upstreams never see it. An empty signature marks reasoning that no Anthropic model
    signed (an OpenAI-compatible server's ``reasoning_content``)."""

    text: str
    signature: str = ""


class RedactedThinkingPart(msgspec.Struct, frozen=True, tag="redacted_thinking"):
    data: str
    """Encrypted reasoning, returned to Anthropic as it came."""


Part = TextPart | ImagePart | FilePart | ThinkingPart | RedactedThinkingPart


class ToolCall(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    name: str
    """The name the upstream knows the function by."""
    arguments: str
    """The arguments as JSON text, as the model wrote them (it may not parse)."""
    namespace: str | None = None
    """The Responses API namespace the function is in (its client's name for it is ``name`` less
    the namespace's prefix: the upstream knows it by the joined name). Left out when None, so
    that cache keys and stored turns without one read as before."""


class Message(msgspec.Struct, frozen=True):
    role: Role
    parts: tuple[Part, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    """For ``tool`` messages: the call this is the result of."""
    is_error: bool = False
    """For ``tool`` messages: the tool failed."""
    cache_control: dict[str, Any] | None = None
    """For ``tool`` messages: the client's prompt-cache breakpoint on the result (Anthropic's
    ``tool_result.cache_control``, Claude Code's usual one), for an Anthropic upstream."""
    name: str | None = None
    """The participant's name (OpenAI's ``name``), for upstreams that take one."""

    @property
    def text(self) -> str:
        """The text parts, a line apart (as vLLM joins them): two blocks never fuse into one word."""
        return "\n".join(part.text for part in self.parts if isinstance(part, TextPart))


class Tool(msgspec.Struct, frozen=True):
    name: str
    parameters: dict[str, Any]
    """A JSON schema of the arguments."""
    description: str | None = None
    cache_control: dict[str, Any] | None = None
    """A prompt-cache breakpoint after the tool definitions (Anthropic)."""
    strict: bool | None = None
    """OpenAI's strict schema adherence for the arguments, when the client set it."""


class ToolChoice(msgspec.Struct, frozen=True):
    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None
    """With ``mode="tool"``: the one tool to call."""
    parallel: bool = True


class Request(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stream: bool = False
    tools: list[Tool] = msgspec.field(default_factory=list)
    tool_choice: ToolChoice | None = None
    user: str | None = None
    json_schema: dict[str, Any] | None = None
    """Structured output: the answer must validate against this schema."""
    thinking: dict[str, Any] | None = None
    """Anthropic's extended-thinking setting (``{"type": "enabled", "budget_tokens": N}``), passed to
    Anthropic upstreams only."""
    betas: str | None = None
    """An Anthropic client's ``anthropic-beta`` header (``context-1m-...``, ``interleaved-thinking-...``),
    sent on to Anthropic upstreams only."""
    fills_window: bool = False
    """``max_tokens`` is a ceiling the answer may stop short of where the model's context window
    ends first (t59): an Anthropic client's, for Anthropic's models write up to the window and stop
    there (``model_context_window_exceeded``) where a chat upstream refuses the request."""
    continues_last_turn: bool = False
    """The last message is the start of the answer, which the model continues (Anthropic's
    prefill: a request that ends on an assistant turn), rather than context before a new turn."""
    dropped: list[str] = msgspec.field(default_factory=list)
    """Fields of the incoming protocol that no upstream of this request can honour (said in a header)."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """OpenAI chat parameters this model has no field for (``seed``, ``n``, penalties, ``logprobs``,
    a ``json_object`` response format, ...), as the client wrote them: sent on to OpenAI-compatible
    upstreams, left out for others, and part of the cache key."""
    tenant: str | None = None
    """Whose request it is (set by the pipeline): what an upstream's prompt cache is salted with."""
    unreadable: str | None = None
    """Why part of the client's request has no place in this model (a content part, role or tool
    it has no type for). The request still goes, as it came, to an upstream of the client's own
    protocol; an upstream of another protocol refuses it with this reason, and it is not cached."""
    unsigned_reasoning: str | None = None
    """The field (``reasoning_content`` or ``reasoning``) in which a chat client sent an answer's
    reasoning back without Anthropic's signature. The model holds no such reasoning (a chat
    upstream gets the client's body, which has it); an Anthropic upstream, which refuses unsigned
    reasoning, is not sent it, and names it."""
    unreadable_param: str = "messages"
    """The field :attr:`unreadable` is about, the refusal's ``param`` (t128: a chat client's
    ``tool_choice`` or ``tools`` was refused naming ``messages``)."""


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    """All prompt tokens, cached ones included."""
    output_tokens: int = 0
    cached_input_tokens: int = 0
    """Of ``input_tokens``, those read from the upstream's prompt cache."""
    cache_write_tokens: int = 0
    """Of ``input_tokens``, those written to the upstream's prompt cache."""
    cache_write_1h_tokens: int = 0
    """Of ``cache_write_tokens``, those kept an hour (Anthropic's ``ttl: "1h"``, dearer)."""
    reasoning_tokens: int = 0
    """Of ``output_tokens``, those spent reasoning."""
    audio_input_tokens: int = 0
    """Of ``input_tokens``, those of audio (OpenAI's ``prompt_tokens_details.audio_tokens``)."""
    audio_output_tokens: int = 0
    """Of ``output_tokens``, those of audio (a spoken answer's, ``completion_tokens_details.audio_tokens``)."""
    speed: str | None = None
    """How fast the upstream says it ran (Anthropic's ``usage.speed``: ``fast`` is dearer, t59)."""
    inference_geo: str | None = None
    """Where the upstream says it ran (Anthropic's ``usage.inference_geo``: ``us`` is dearer, t59)."""
    service_tier: str | None = None
    """The tier the upstream says processed it (OpenAI's ``service_tier``: ``priority`` is dearer,
    ``flex`` cheaper)."""
    server_tool_requests: dict[str, int] = msgspec.field(default_factory=dict)
    """Uses of upstream-run tools, by name (Anthropic's ``server_tool_use.web_search_requests``
    as ``web_search``), each billed a fee (t59)."""


class Answer(msgspec.Struct, kw_only=True):
    id: str
    model: str
    thinking: list[ThinkingPart | RedactedThinkingPart] = msgspec.field(default_factory=list)
    """The reasoning the model showed before its answer, in order."""
    text: str | None = None
    refusal: str | None = None
    """The model declined, saying this (OpenAI's ``refusal``): a refusal where the client's
    protocol has one (Responses), else text with Anthropic's ``refusal`` stop reason."""
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    finish_reason: FinishReason | None = None
    other_finish: str | None = None
    """The upstream's finish reason where it is none of :data:`FinishReason` (vLLM's ``abort``), as
    it said it (``finish_reason`` is then None): a completions client is told it unchanged."""
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)


class TextDelta(msgspec.Struct, frozen=True):
    text: str


class RefusalDelta(msgspec.Struct, frozen=True):
    text: str


class ThinkingDelta(msgspec.Struct, frozen=True):
    text: str


class ThinkingSignature(msgspec.Struct, frozen=True):
    """Ends the thinking the deltas before it spelled out."""

    signature: str


class RedactedThinking(msgspec.Struct, frozen=True):
    data: str


class ToolCallStart(msgspec.Struct, frozen=True):
    index: int
    id: str
    name: str


class ToolArgumentsDelta(msgspec.Struct, frozen=True):
    index: int
    fragment: str


class Finish(msgspec.Struct, frozen=True):
    reason: FinishReason | None
    """None: the upstream's reason is none of these, and ``other`` says it."""
    stop_sequence: str | None = None
    """The stop string that ended the answer, where the upstream said which (reason ``stop_sequence``)."""
    other: str | None = None
    """As :attr:`Answer.other_finish`."""


class UsageReport(msgspec.Struct, frozen=True):
    usage: Usage


Delta = (
    TextDelta
    | RefusalDelta
    | ThinkingDelta
    | ThinkingSignature
    | RedactedThinking
    | ToolCallStart
    | ToolArgumentsDelta
    | Finish
    | UsageReport
)
