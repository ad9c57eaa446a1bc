"""Anthropic Messages (``POST /v1/messages``): requests in, messages, stream events and errors out.

Decoding follows the API's rules where they differ from OpenAI's: ``max_tokens`` is
required; ``system`` is a string or text blocks, and so is a ``system`` message in
``messages`` (a system message in its place, placed as Anthropic places it); a user
turn's ``tool_result`` blocks become tool messages placed before the rest of the turn
(OpenAI wants them right after the assistant's calls); ``input_tokens`` in the usage
excludes cache reads and writes, which are reported in their own fields.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from gateway.core.model import (
    Answer,
    Delta,
    FilePart,
    Finish,
    FinishReason,
    ImagePart,
    Message,
    Part,
    RedactedThinking,
    RedactedThinkingPart,
    RefusalDelta,
    Request,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ThinkingSignature,
    Tool,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    ToolChoice,
    Usage,
    UsageReport,
)
from gateway.errors import InvalidRequestError, context_overflow
from gateway.pricing import PricedOptions, option_name
from gateway.protocols.body import decode_body, refuse_choice_without_tools
from gateway.protocols.call_ids import distinct_call_id
from gateway.protocols.upstream_json import mended, token_count

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ContainerUses",
    "StreamDecoder",
    "StreamEncoder",
    "TextJoiner",
    "decode_answer",
    "decode_request",
    "encode_answer",
    "encode_error",
    "encode_request",
    "end_user",
    "error_type_for",
    "fields_not_read",
    "holds_documents",
    "holds_system_messages",
    "holds_unsigned_thinking",
    "nested_fields_not_carried",
    "priced_options",
    "thinking_left_out",
    "usage_body",
    "usage_from_wire",
    "with_system_hoisted",
]


class _Wire(msgspec.Struct, forbid_unknown_fields=False):
    pass


class _Source(_Wire):
    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class _Block(_Wire):
    type: str
    text: str | None = None
    source: _Source | str | None = None
    """An image's or document's source; a ``search_result``'s is its URL, a string."""
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[_Block] | dict[str, Any] | None = None
    """A tool result's; a server tool's result (code execution, web fetch, a failed web search) is an object."""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    title: str | None = None
    """A ``document``'s, as are ``context`` and ``citations`` (a text block's are a list)."""
    context: str | None = None
    citations: Any = None


class _Turn(_Wire):
    role: Literal["user", "assistant", "system"]
    """``system``: a mid-conversation system message (Claude Opus 4.8 reads it in place)."""
    content: str | list[_Block]


class _Tool(_Wire):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class _Metadata(msgspec.Struct, forbid_unknown_fields=True):
    """Anthropic's ``metadata``: a ``user_id`` of at most 256 characters and nothing else, as Anthropic
    refuses the rest (t147: a chat route took them)."""

    user_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class _MessagesRequest(_Wire):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[_Turn]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    system: str | list[_Block] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: int | None = None
    stream: bool | None = False  # null: not streamed, as Anthropic reads a null optional field
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    metadata: _Metadata | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


_READ_FIELDS = frozenset(field.encode_name for field in msgspec.structs.fields(_MessagesRequest))


def fields_not_read(body: dict[str, Any]) -> list[str]:
    """Top-level fields of a request body that :func:`decode_request` does not read (a
    translation would lose them: ``container``, ``mcp_servers``, ``context_management``, ...);
    one set to null asks for nothing (t67: ``speed: null`` was refused on a mixed route)."""
    return [name for name, value in body.items() if name not in _READ_FIELDS and value is not None]


_CARRIED: dict[str, frozenset[str]] = {
    "text": frozenset({"type", "text", "cache_control"}),
    "image": frozenset({"type", "source", "cache_control"}),
    "tool_use": frozenset({"type", "id", "name", "input"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
"""What the internal model keeps of each block a translation carries (a text block's
``citations``, ... it has no place for)."""
_TOOL_CARRIED = frozenset({"name", "input_schema", "description", "type", "cache_control", "strict"})


def _blocks(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The content blocks of a request body: its system prompt's, its turns', its tool results'."""
    system = body.get("system")
    blocks: list[Any] = list(system) if isinstance(system, list) else []
    for turn in body.get("messages") or ():
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            blocks.extend(content)
    while blocks:
        block = blocks.pop()
        if isinstance(block, dict):
            yield block
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                blocks.extend(block["content"])


def holds_documents(body: dict[str, Any]) -> bool:
    """Whether a request body holds a ``document`` block: a route of Anthropic's models alone passes
    it through, as Anthropic reads it (a text document as a document, not as text)."""
    return any(block.get("type") == "document" for block in _blocks(body))


def holds_system_messages(body: dict[str, Any]) -> bool:
    """Whether ``messages`` holds a ``system`` message: only Anthropic reads one in place (a
    translation to Claude moves it into the top-level ``system``), so a route of Anthropic's
    models alone passes it through."""
    return any(_is_system_turn(turn) for turn in body.get("messages") or ())


def _is_system_turn(turn: Any) -> bool:
    return isinstance(turn, dict) and turn.get("role") == "system"


def with_system_hoisted(body: dict[str, Any]) -> dict[str, Any]:
    """The body with its ``system`` messages moved to the end of the top-level ``system``, as a
    translation sends it to Claude (``system.position``): what ``count_tokens`` asks a Claude of a
    route that may reach another upstream to count, as the models other than Opus 4.8 refuse them
    in place."""
    turns = body.get("messages")
    if not isinstance(turns, list) or not any(_is_system_turn(turn) for turn in turns):
        return body
    system = body.get("system")
    blocks: list[Any] = [{"type": "text", "text": system}] if isinstance(system, str) and system else []
    blocks += system if isinstance(system, list) else []
    for turn in filter(_is_system_turn, turns):
        content = turn.get("content")
        blocks += [{"type": "text", "text": content}] if isinstance(content, str) else list(content or ())
    kept = [turn for turn in turns if not _is_system_turn(turn)]
    return {**body, "system": blocks, "messages": kept}


def nested_fields_not_carried(body: dict[str, Any]) -> list[str]:
    """Fields of blocks and tools a translation would lose, as ``<block type>.<field>``
    (``text.citations``, ...)."""
    lost: dict[str, None] = {}
    for block in _blocks(body):
        kind = block.get("type")
        carried = _CARRIED.get(kind) if isinstance(kind, str) else None
        if carried is None:
            continue  # a block the decoder refuses or names itself
        lost.update((f"{kind}.{name}", None) for name in block if name not in carried)
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            lost.update((f"tools.{name}", None) for name in tool if name not in _TOOL_CARRIED)
    return sorted(lost)


def decode_request(
    raw: bytes, *, counting: bool = False, passed_through: bool = False, continued: bool = False
) -> Request:
    """A Messages request; ``counting``: for ``count_tokens``, where ``max_tokens`` is not required.

    ``passed_through``: the request goes to an Anthropic upstream as it is, and this decoding
    only gives the gateway its view (text for counting, routing and the log): blocks and
    server tools the internal model has no place for (documents, search results, web search,
    ...) are left out of the view instead of refused, since the upstream reads them itself.
    ``continued``: the request continues a thread the upstream keeps (the tenant's own, checked by
    the caller), whose last turn may hold the ``tool_use`` blocks the first results answer.
    """
    wire = decode_body(raw, _MessagesRequest)
    if wire.max_tokens is None and not counting:
        raise InvalidRequestError("max_tokens: Field required", param="max_tokens")
    if not wire.messages:  # counting too: a count for a request /v1/messages refuses tells nothing
        raise InvalidRequestError("messages: at least one message is required", param="messages")
    _check_tool_names(wire.tools)
    _check_limits(wire)
    _check_system_turns(wire.messages)
    if _refuse_empty_content(wire.messages):
        _check_tool_pairing(wire.messages, continued=continued)
    refuse_choice_without_tools(  # as Anthropic answers it; dropped, it was answered with text on a chat route
        wire.tool_choice.type if wire.tool_choice else None,
        wire.tools,
        "tool_choice may only be specified while providing tools",
    )
    messages: list[Message] = []
    if wire.system:
        _refuse_empty_system(wire.system)
        messages.append(Message("system", _parts(wire.system, "system", passed_through, documents=False)))
    for index, turn in enumerate(wire.messages):
        messages += _turn(turn, f"messages.{index}", passed_through)
    request = Request(
        model=wire.model,
        messages=messages,
        max_tokens=wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=list(wire.stop_sequences or []),
        stream=bool(wire.stream),
        tools=[
            _tool(tool, f"tools.{i}")
            for i, tool in enumerate(wire.tools or [])
            if tool.input_schema is not None or not passed_through
        ],
        tool_choice=_choice(wire.tool_choice),
        user=wire.metadata.user_id if wire.metadata else None,
        json_schema=_output_schema(wire.output_config),
    )
    if wire.output_config and not passed_through:  # a hint, as ``thinking`` is: left out, and named (t40)
        request.dropped += [f"output_config.{name}" for name in sorted(wire.output_config) if name != "format"]
    request.continues_last_turn = bool(wire.messages) and wire.messages[-1].role == "assistant"
    if wire.thinking is not None and wire.thinking.get("type") != "disabled":
        request.thinking = wire.thinking  # the route decides whether an upstream can honour it
    if wire.top_k is not None and not passed_through:  # passed through, it reaches Anthropic
        request.dropped.append("top_k")
    if passed_through:
        request.unreadable = _unread_in_last_turn(wire.messages)
    return request


def _refuse_empty_content(turns: list[_Turn]) -> bool:
    """Anthropic's 400s for a turn with no content (``""`` or ``[]``) but a final assistant one (a
    prefill), for a text block with no text (t178: such a user turn was answered, the router
    reading no text as a long prompt), for a turn of whitespace alone and a prefill ending in
    whitespace (t180: a route to Claude left them out, joining the turns around them); refused on
    every route, passed through too, before any upstream is called. Returns whether a turn holds a
    ``tool_use`` or ``tool_result`` block."""
    tooled = False
    for index, turn in enumerate(turns):
        prefill = turn.role == "assistant" and index == len(turns) - 1
        if not turn.content and not prefill:
            raise InvalidRequestError(
                f"messages.{index}: all messages must have non-empty content except for the optional final "
                "assistant message",
                param=f"messages.{index}.content",
            )
        blocks = turn.content if isinstance(turn.content, list) else [_Block("text", text=turn.content)]
        for position, block in enumerate(blocks if turn.content else ()):
            if block.type == "text" and block.text == "":
                where = f"messages.{index}.content.{position}.text"
                raise InvalidRequestError(f"{where}: text content blocks must be non-empty", param=where)
            tooled = tooled or block.type in _TOOL_BLOCKS
        last = blocks[-1] if blocks else None
        if prefill and last is not None and last.type == "text" and last.text and last.text[-1].isspace():
            raise InvalidRequestError(
                f"messages.{index}: final assistant content cannot end with trailing whitespace",
                param=f"messages.{index}.content",
            )
        if not prefill and all(block.type == "text" and (block.text or "").isspace() for block in blocks):
            raise InvalidRequestError(
                f"messages.{index}: text content blocks must contain non-whitespace text",
                param=f"messages.{index}.content",
            )
    return tooled


def _refuse_empty_system(system: str | list[_Block]) -> None:
    """Anthropic's 400s for a system text block with no text (t180: a route to Claude left it out,
    and the request went without a system prompt) or of whitespace alone, beside others too
    (Anthropic: ``system: text content blocks must contain non-whitespace text``; a chat route sent
    it on, f222)."""
    for position, block in enumerate(system if isinstance(system, list) else ()):
        if block.type == "text" and block.text == "":
            where = f"system.{position}.text"
            raise InvalidRequestError(f"{where}: text content blocks must be non-empty", param=where)
        if block.type == "text" and (block.text or "").isspace():
            where = f"system.{position}.text"
            raise InvalidRequestError(f"{where}: text content blocks must contain non-whitespace text", param=where)


def _check_system_turns(turns: list[_Turn]) -> None:
    """Anthropic's placement of a ``system`` message in ``messages`` (its mid-conversation system
    messages): not the first; right after a user turn, or an assistant turn ending in server tool
    use (a paused turn); last, or followed by an assistant turn; text alone. Refused on every
    route, passed through too, as a chat upstream would take one anywhere (t206)."""
    for index, turn in enumerate(turns):
        if turn.role != "system":
            continue
        if not index:
            raise InvalidRequestError(
                'messages.0: Unexpected role "system" for the first message. The Messages API accepts a top-level '
                '`system` parameter for the system prompt; a "system" message may only follow a user message.',
                param="messages.0.role",
            )
        before = turns[index - 1]
        last = before.content[-1] if isinstance(before.content, list) and before.content else None
        paused = before.role == "assistant" and last is not None and last.type == "server_tool_use"
        if before.role != "user" and not paused:
            raise InvalidRequestError(
                f"messages.{index}: a system message must immediately follow a user message (or an assistant "
                "message that ends in server tool use)",
                param=f"messages.{index}",
            )
        if index + 1 < len(turns) and turns[index + 1].role != "assistant":
            raise InvalidRequestError(
                f"messages.{index}: a system message must be the last message or be followed by an assistant message",
                param=f"messages.{index}",
            )
        for position, block in enumerate(turn.content if isinstance(turn.content, list) else ()):
            if block.type != "text":
                where = f"messages.{index}.content.{position}.type"
                raise InvalidRequestError(
                    f"{where}: Input should be 'text': a system message holds text blocks alone", param=where
                )


_MIN_THINKING_BUDGET = 1024
_BUDGET_PAST_MAX = (
    "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
)
_MOST_CACHE_MARKS = 4


def _check_limits(wire: _MessagesRequest) -> None:
    """Anthropic's 400s for a thinking budget under 1024 or not under ``max_tokens`` (but with
    tools, where interleaved thinking spends it over the turn), more than 4 blocks with
    ``cache_control`` (system blocks, tools and the turns' blocks) and an empty stop string (f200:
    a chat route answered them), or one of whitespace alone (f222: a chat route sent it on, vLLM
    stopping at it, and the gateway applied it for Claude, where a passed-through request was
    Anthropic's 400; a chat client's ``stop: ["\\n"]`` is still applied for Claude: t52)."""
    thinking = wire.thinking or {}
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and isinstance(budget, int) and not isinstance(budget, bool):
        if budget < _MIN_THINKING_BUDGET:
            where = "thinking.enabled.budget_tokens"
            raise InvalidRequestError(
                f"{where}: Input should be greater than or equal to {_MIN_THINKING_BUDGET}", param=where
            )
        if wire.max_tokens is not None and budget >= wire.max_tokens and not wire.tools:
            raise InvalidRequestError(_BUDGET_PAST_MAX, param="max_tokens")
    marks = sum(tool.cache_control is not None for tool in wire.tools or ())
    if isinstance(wire.system, list):
        marks += sum(block.cache_control is not None for block in wire.system)
    for turn in wire.messages:
        if isinstance(turn.content, list):
            marks += sum(block.cache_control is not None for block in turn.content)
    if marks > _MOST_CACHE_MARKS:
        raise InvalidRequestError(
            f"A maximum of {_MOST_CACHE_MARKS} blocks with cache_control may be provided. Found {marks}."
        )
    if wire.stop_sequences and "" in wire.stop_sequences:
        raise InvalidRequestError("stop_sequences: each stop sequence must be non-empty", param="stop_sequences")
    if wire.stop_sequences and any(stop.isspace() for stop in wire.stop_sequences):
        raise InvalidRequestError(
            "stop_sequences: each stop sequence must contain non-whitespace", param="stop_sequences"
        )


_TOOL_BLOCKS = frozenset({"tool_use", "tool_result"})
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")


def _check_tool_names(tools: list[_Tool] | None) -> None:
    """A custom tool's name as Anthropic checks it (a server tool's is fixed), and each name once
    (f196: a chat route took them, an Anthropic one refused them)."""
    for i, tool in enumerate(tools or ()):
        if tool.type in (None, "custom") and not _TOOL_NAME.fullmatch(tool.name):
            where = f"tools.{i}.custom.name"
            raise InvalidRequestError(f"{where}: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'", param=where)
    if tools and len({tool.name for tool in tools}) < len(tools):
        raise InvalidRequestError("tools: Tool names must be unique.", param="tools")


def _check_tool_pairing(turns: list[_Turn], *, continued: bool = False) -> None:
    """Each ``tool_result`` answers a ``tool_use`` of the assistant turn just before, each
    ``tool_use`` is answered by the next turn, which begins with its results, and no turn repeats
    an id, as Anthropic refuses it otherwise, after merging consecutive turns of a role, as it
    does (f196: a chat route answered an agent whose history trimming split a call from its
    answer, and billed it). A final assistant turn's calls (a prefill) are not checked, nor
    (``continued``) the results before the first assistant turn: their calls are in the thread.
    A ``system`` message between turns is no turn here: results before it answer the calls of the
    assistant turn before them, and assistant turns around it are one."""
    calls: dict[str, int] = {}  # the tool_use ids of the assistant turn before, each with its turn's index
    answered: set[str] = set()
    opened = seen = leading = 0  # the user turn's (first) index, its blocks, the tool_result ones it begins with
    in_thread = continued  # the turns before the first assistant one answer the thread's calls
    previous: str | None = None  # the role of the turn before, system messages aside
    for index, turn in enumerate(turns):
        if turn.role == "system":
            continue
        in_thread = in_thread and turn.role != "assistant"
        if previous is not None and turn.role != previous:
            if turn.role == "assistant":
                _check_answers(calls, answered, opened, leading)
                calls = {}
            else:
                answered, opened, seen, leading = set(), index, 0, 0
        previous = turn.role
        blocks = turn.content if isinstance(turn.content, list) else ()
        if turn.role == "assistant":
            for position, block in enumerate(blocks):
                if block.type == "tool_use" and block.id is not None:
                    if block.id in calls:
                        where = f"messages.{index}.content.{position}"
                        raise InvalidRequestError(f"{where}: `tool_use` ids must be unique", param=where)
                    calls[block.id] = index
            continue
        unexpected: list[tuple[int, str]] = []
        for position, block in enumerate(blocks):
            if block.type == "tool_result" and block.tool_use_id is not None:
                if block.tool_use_id not in calls and not in_thread:
                    unexpected.append((position, block.tool_use_id))
                answered.add(block.tool_use_id)
                leading += seen == leading
            seen += 1
        if isinstance(turn.content, str):  # a text block
            seen += 1
        if unexpected:
            where = f"messages.{index}.content.{unexpected[0][0]}"
            raise InvalidRequestError(
                f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(tool_id for _, tool_id in unexpected)}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message.",
                param=where,
            )
    if previous == "user":
        _check_answers(calls, answered, opened, leading)


def _check_answers(calls: dict[str, int], answered: set[str], opened: int, leading: int) -> None:
    """Whether the user turn at ``opened`` answers every call of the assistant turn before it, first."""
    unanswered = [tool_id for tool_id in calls if tool_id not in answered]
    if unanswered:
        where = f"messages.{calls[unanswered[0]]}"
        raise InvalidRequestError(
            f"{where}: `tool_use` ids were found without `tool_result` blocks immediately after: "
            f"{', '.join(unanswered)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
            "next message.",
            param=where,
        )
    if leading < len(calls):
        raise InvalidRequestError(
            f"messages.{opened}: Did not find {len(calls)} `tool_result` block(s) at the beginning of this message. "
            "Messages following `tool_use` blocks must begin with a matching number of `tool_result` blocks.",
            param=f"messages.{opened}",
        )


_READ_BLOCKS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})


def _unread_in_last_turn(turns: list[_Turn]) -> str | None:
    """What the last user turn holds that the view of a passed-through request leaves out (a PDF
    ``document``, search results, an image by file id): the router cannot see what it asks (t64)."""
    last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i].role == "user"), None)
    content = None if last is None else turns[last].content
    if not isinstance(content, list):
        return None
    for index, block in enumerate(content):
        unread = block.type not in _READ_BLOCKS or (
            block.type == "image" and isinstance(block.source, _Source) and block.source.type == "file"
        )
        if unread:
            return f"messages.{last}.content.{index}: a '{block.type}' block the gateway does not read"
    return None


def _output_schema(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Structured output (``output_config.format``, what the SDK's ``messages.parse()`` sends) as
    the internal model's JSON schema; any other output setting (``effort``) only Anthropic reads."""
    if not config:
        return None
    fmt = config.get("format")
    if fmt is None:
        return None
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
        raise InvalidRequestError(
            "output_config.format: expected {'type': 'json_schema', 'schema': {...}}", param="output_config.format"
        )
    schema: dict[str, Any] = fmt["schema"]
    return schema


def _parts(
    content: str | list[_Block] | dict[str, Any],
    where: str,
    lenient: bool = False,
    positions: Sequence[int] | None = None,
    *,
    documents: bool = True,
) -> tuple[Part, ...]:
    """``positions``: each block's index in the list the client sent (others of it were taken
    apart), for the field an error names; ``documents``: whether ``document`` blocks may be there
    (not in a system prompt, as Anthropic has it)."""
    if isinstance(content, str):
        return (TextPart(content),)
    if isinstance(content, dict):  # a server tool's result: only Anthropic reads it
        if not lenient:
            raise InvalidRequestError(f"{where}: a server tool's result can only go to an Anthropic model")
        return ()
    parts: list[Part] = []
    for index, block in zip(positions if positions is not None else range(len(content)), content, strict=True):
        if block.type == "text":
            if block.text is None:
                raise InvalidRequestError(f"{where}.{index}.text: Field required")
            parts.append(TextPart(block.text, cache_control=block.cache_control))
        elif block.type == "image" and not (
            lenient and isinstance(block.source, _Source) and block.source.type == "file"
        ):
            parts.append(ImagePart(_image_url(block, f"{where}.{index}"), cache_control=block.cache_control))
        elif block.type == "document" and documents and not lenient:  # passed through, Anthropic reads it
            parts.append(_document_part(block, f"{where}.{index}"))
        elif block.type == "thinking":
            parts.append(ThinkingPart(block.thinking or "", block.signature or ""))
        elif block.type == "redacted_thinking":
            parts.append(RedactedThinkingPart(block.data or ""))
        elif not lenient:
            raise InvalidRequestError(f"{where}.{index}.type: '{block.type}' is not supported here")
    return tuple(parts)


def _image_url(block: _Block, where: str) -> str:
    source = block.source
    if not isinstance(source, _Source):
        raise InvalidRequestError(f"{where}.source: an object is required")
    if source.type == "base64" and source.data and source.media_type:
        return f"data:{source.media_type};base64,{source.data}"
    if source.type == "url" and source.url:
        return source.url
    raise InvalidRequestError(f"{where}.source: an image needs base64 data with a media_type, or a url")


def _document_part(block: _Block, where: str) -> Part:
    """A ``document`` block as the internal model holds it, for a model the route translates to: a
    PDF (base64) as a file in a data URL, one by URL as a file by URL (which a chat upstream
    refuses), a plain text document as its text under its title, which is how a chat model reads a
    document best (a chat ``file`` part is for PDFs, and vLLM takes none). What only Anthropic
    reads (citations, a context, a document of content blocks or from its Files API) is refused."""
    only_anthropic = "can only be read by an Anthropic model (use a route whose models are all Anthropic's)"
    if block.citations is not None and not (isinstance(block.citations, dict) and not block.citations.get("enabled")):
        raise InvalidRequestError(f"{where}.citations: citations {only_anthropic}", param=f"{where}.citations")
    if block.context is not None:
        raise InvalidRequestError(f"{where}.context: a document's context {only_anthropic}", param=f"{where}.context")
    source = block.source
    if not isinstance(source, _Source):
        raise InvalidRequestError(f"{where}.source: an object is required", param=f"{where}.source")
    title = block.title or None
    if source.type == "base64" and source.data and source.media_type:
        data = f"data:{source.media_type};base64,{source.data}"
        return FilePart(data=data, filename=title, cache_control=block.cache_control)
    if source.type == "url" and source.url:
        return FilePart(url=source.url, filename=title, cache_control=block.cache_control)
    if source.type == "text" and source.data:
        text = f"# {title}\n\n{source.data}" if title else source.data
        return TextPart(text, cache_control=block.cache_control)
    if source.type in ("base64", "url", "text"):
        raise InvalidRequestError(
            f"{where}.source: a {source.type} document needs {'a url' if source.type == 'url' else 'data'}"
            + (" with a media_type" if source.type == "base64" else ""),
            param=f"{where}.source",
        )
    raise InvalidRequestError(
        f"{where}.source: a document of type {source.type!r} {only_anthropic}", param=f"{where}.source"
    )


def _turn(turn: _Turn, where: str, lenient: bool = False) -> list[Message]:
    if turn.role == "system":  # in its place: a chat upstream reads it there, Claude in the top-level system
        return [Message("system", _parts(turn.content, f"{where}.content", lenient, documents=False))]
    if isinstance(turn.content, str):
        return [Message(turn.role, (TextPart(turn.content),))]
    if turn.role == "assistant":
        calls = tuple(
            ToolCall(
                block.id or f"toolu_{index}",
                block.name or "",
                json.dumps(block.input if block.input is not None else {}),
            )
            for index, block in enumerate(turn.content)
            if block.type == "tool_use"
        )
        text = [(i, block) for i, block in enumerate(turn.content) if block.type != "tool_use"]
        return [Message("assistant", _parts_at(text, f"{where}.content", lenient), calls)]
    messages = [
        Message(
            "tool",
            _parts(block.content if block.content is not None else "", f"{where}.content.{i}.content", lenient),
            tool_call_id=block.tool_use_id,
            is_error=block.is_error,
            cache_control=block.cache_control,
        )
        for i, block in enumerate(turn.content)
        if block.type == "tool_result"
    ]
    rest = [(i, block) for i, block in enumerate(turn.content) if block.type != "tool_result"]
    if rest or not messages:
        messages.append(Message("user", _parts_at(rest, f"{where}.content", lenient)))
    return messages


def _parts_at(blocks: list[tuple[int, _Block]], where: str, lenient: bool) -> tuple[Part, ...]:
    return _parts([block for _, block in blocks], where, lenient, [i for i, _ in blocks])


def _tool(tool: _Tool, where: str) -> Tool:
    if tool.input_schema is None:
        raise InvalidRequestError(
            f"{where}: server tools ({tool.type or 'no input_schema'}) are not supported; give an input_schema"
        )
    return Tool(tool.name, tool.input_schema, tool.description, tool.cache_control, tool.strict)


def _choice(choice: _ToolChoice | None) -> ToolChoice | None:
    if choice is None:
        return None
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequestError("tool_choice.name: Field required when type is 'tool'")
        return ToolChoice("tool", choice.name, parallel)
    return ToolChoice({"auto": "auto", "any": "required", "none": "none"}[choice.type], None, parallel)  # type: ignore[arg-type]


# -- requests to an Anthropic upstream ---------------------------------------------

DEFAULT_MAX_TOKENS = 4096
"""Anthropic requires ``max_tokens``; a request that set none gets this."""

Block = dict[str, Any]


def end_user(request: Request) -> str | None:
    """Anthropic's ``metadata.user_id`` for ``request``: its end user, else an OpenAI client's
    ``safety_identifier``, which names the same (an end user, for abuse detection)."""
    if request.user:
        return request.user
    safety_identifier = request.extra.get("safety_identifier")
    return safety_identifier if isinstance(safety_identifier, str) and safety_identifier else None


def encode_request(request: Request, model: str, *, stream: bool) -> dict[str, Any]:
    """The internal request as Anthropic's Messages API takes it.

    System messages, wherever they are, become the top-level ``system`` string (joined with
    a blank line), or its text blocks when a part carries ``cache_control``; the other
    messages alternate user/assistant as Anthropic requires (consecutive ones of a role
    merged, tool results opening a user turn); assistant reasoning Anthropic did not sign
    is left out, since it would refuse it. Temperature is clamped to Anthropic's [0, 1];
    ``tool_choice`` ``none`` is Anthropic's own ``none`` (the tools stay: a conversation that
    holds tool calls needs them, and they open the prompt cache's prefix). Structured output (``json_schema``) is
    ``output_config.format``.
    """
    system, turns = _turns(request.messages)
    payload: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
    }
    if system:
        payload["system"] = system
    if request.temperature is not None:
        payload["temperature"] = min(1.0, max(0.0, request.temperature))
    if request.top_p is not None:
        payload["top_p"] = request.top_p
    stops = [stop for stop in request.stop if _visible(stop)]  # the others: see stops_applied_here
    if stops:
        payload["stop_sequences"] = stops
    user_id = end_user(request)
    if user_id:
        payload["metadata"] = {"user_id": user_id}
    if request.thinking is not None and _thinking_can_go_on(turns):
        payload["thinking"] = request.thinking
    if request.json_schema is not None:
        payload["output_config"] = {"format": {"type": "json_schema", "schema": request.json_schema}}
    choice = request.tool_choice
    if request.tools:
        payload["tools"] = [_tool_entry(tool) for tool in request.tools]
        if choice is not None:
            wire: dict[str, Any] = {"type": "tool", "name": choice.name}
            if choice.mode != "tool":
                wire = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice.mode]}
            if not choice.parallel and choice.mode != "none":  # Anthropic's none takes no other field
                wire = {**wire, "disable_parallel_tool_use": True}
            payload["tool_choice"] = wire
    if stream:
        payload["stream"] = True
    return payload


def stops_applied_here(request: Request) -> tuple[str, ...]:
    """Stop strings of whitespace alone, which Anthropic refuses ("each stop sequence must contain
    non-whitespace"): a chat client's ``stop: ["\\n"]`` was a 400 on a Claude route (t52). They are
    left out of the request, and the gateway applies them itself."""
    return tuple(stop for stop in request.stop if stop and not _visible(stop))


def _visible(text: str) -> bool:
    return bool(text) and not text.isspace()


def _thinking_can_go_on(turns: list[dict[str, Any]]) -> bool:
    """Whether Anthropic takes ``thinking`` for these turns. With it on, a tool loop (assistant
    turns and the user turns of their tool results, since the last question) is one assistant
    turn to Anthropic, which must open with its signed thinking; Claude thinks again between the
    loop's calls only with interleaved thinking (t24: a loop whose later calls came without
    thinking lost it here mid-turn). A loop another model of the route opened (a fallback to a
    chat server) has none Anthropic signed, and every later turn of it was refused with a 400,
    no fallback tried (t21). Such a request goes without ``thinking``, as Anthropic's error
    advises; once the loop ends (a new question) thinking goes again."""
    if len(turns) < 2 or not _tool_results(turns[-1]):
        return True
    opening = None
    index = len(turns) - 1
    while index >= 1 and _tool_results(turns[index]) and turns[index - 1]["role"] == "assistant":
        opening = turns[index - 1]["content"]
        index -= 2
    if opening is None:
        return True
    return (
        not isinstance(opening, str) and bool(opening) and opening[0].get("type") in ("thinking", "redacted_thinking")
    )


def thinking_left_out(request: Request) -> bool:
    """Whether an Anthropic upstream is sent this request without its ``thinking`` (a tool loop
    another model opened: :func:`_thinking_can_go_on`), for the edge to say so."""
    return request.thinking is not None and not _thinking_can_go_on(_turns(request.messages)[1])


def holds_unsigned_thinking(request: Request) -> bool:
    """Whether the conversation holds a thinking block no Anthropic model signed (another model's
    reasoning sent back), which an Anthropic upstream is not sent (it refuses it), for the edge to
    say so (t171)."""
    return any(isinstance(part, ThinkingPart) and not part.signature for m in request.messages for part in m.parts)


def _tool_results(turn: dict[str, Any]) -> bool:
    """A user turn that carries tool results (a step of a tool loop, not a new question)."""
    content = turn["content"]
    return (
        turn["role"] == "user"
        and not isinstance(content, str)
        and any(block.get("type") == "tool_result" for block in content)
    )


def _turns(messages: list[Message]) -> tuple[str | list[Block], list[dict[str, Any]]]:
    system_texts: list[str] = []
    system_blocks: list[Block] = []
    turns: list[tuple[str, list[Block]]] = []
    ids = _ToolIds()
    last = max((i for i, m in enumerate(messages) if m.role != "system"), default=-1)
    for i, message in enumerate(messages):
        if message.role == "system":
            for part in message.parts:
                if isinstance(part, TextPart) and _visible(part.text):
                    system_texts.append(part.text)
                    system_blocks.append(_marked({"type": "text", "text": part.text}, part.cache_control))
            continue
        if message.role == "tool":
            role, blocks = "user", [_tool_result(message, ids)]
        else:
            role, blocks = message.role, [b for part in message.parts if (b := _block(part, i)) is not None]
            blocks += [_tool_use(call, i, ids) for call in message.tool_calls]
        if not blocks:
            # Left out, the turns around it would be joined, or the last user turn's answer be
            # continued (t53, t180); but a final assistant one is a prefill of nothing, and a turn
            # of unsigned reasoning alone is named dropped (``thinking``)
            if not (role == "assistant" and i == last) and not any(isinstance(p, ThinkingPart) for p in message.parts):
                raise InvalidRequestError(
                    f"messages[{i}]: the message has no content but whitespace, which Anthropic's models refuse",
                    param=f"messages[{i}]",
                )
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    system: str | list[Block] = "\n\n".join(system_texts)
    if any("cache_control" in block for block in system_blocks):
        system = system_blocks
    return system, [{"role": role, "content": _compact(blocks)} for role, blocks in turns]


def _block(part: Part, i: int) -> Block | None:
    if isinstance(part, TextPart):
        # Anthropic refuses text blocks of whitespace alone, as it does empty ones (t52)
        return _marked({"type": "text", "text": part.text}, part.cache_control) if _visible(part.text) else None
    if isinstance(part, ImagePart):
        return _marked({"type": "image", "source": _image_source(part.url, i)}, part.cache_control)
    if isinstance(part, FilePart):
        return _marked(_document(part, i), part.cache_control)
    if isinstance(part, ThinkingPart):
        if not part.signature:
            return None  # reasoning no Anthropic model signed
        return {"type": "thinking", "thinking": part.text, "signature": part.signature}
    return {"type": "redacted_thinking", "data": part.data}


def _marked(block: Block, cache_control: dict[str, Any] | None) -> Block:
    if cache_control is not None:
        block["cache_control"] = cache_control
    return block


def _compact(blocks: list[Block]) -> str | list[Block]:
    """A lone plain text block is sent as a string, as a client would write it."""
    if len(blocks) == 1 and blocks[0].keys() == {"type", "text"}:
        text: str = blocks[0]["text"]
        return text
    return blocks


def _image_source(url: str, i: int) -> dict[str, str]:
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type:
            raise InvalidRequestError(
                f"messages[{i}]: image data URLs must be data:<media type>;base64,<data>", param="messages"
            )
        return {"type": "base64", "media_type": media_type, "data": data}
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    raise InvalidRequestError(f"messages[{i}]: image URLs must be data: or http(s) URLs", param="messages")


def _document(part: FilePart, i: int) -> Block:
    """A file as Anthropic's ``document`` block: a PDF as base64 (or by its URL), a text file as
    plain text (Anthropic's text source is ``text/plain`` alone; CSV, Markdown and others are text
    to it as to OpenAI, which extracts their text). Anthropic reads no other kind of file."""
    where = f"messages[{i}]"
    if part.file_id is not None:
        raise InvalidRequestError(
            f"{where}: a file uploaded to OpenAI's Files API (file_id) cannot be read by an Anthropic model; "
            "send the file's content as file_data (a data URL)",
            param="messages",
        )
    block: Block = {"type": "document"}
    if part.url is not None:
        block["source"] = {"type": "url", "url": part.url}  # Anthropic fetches PDFs by URL
    else:
        media_type = part.media_type
        data = (part.data or "").partition(",")[2]
        if media_type == "application/pdf":
            block["source"] = {"type": "base64", "media_type": media_type, "data": data}
        elif media_type is not None and media_type.startswith("text/"):
            block["source"] = {"type": "text", "media_type": "text/plain", "data": _text_of(data, where)}
        else:
            raise InvalidRequestError(
                f"{where}: a file of type {media_type!r} cannot be sent to an Anthropic model, which reads "
                "application/pdf and text/plain documents",
                param="messages",
            )
    if part.filename:
        block["title"] = part.filename
    return block


def _text_of(data: str, where: str) -> str:
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidRequestError(f"{where}: a text file must be UTF-8 text in base64", param="messages") from None


def _tool_use(call: ToolCall, i: int, ids: _ToolIds) -> Block:
    try:
        tool_input = msgspec.json.decode(call.arguments or "{}")
    except msgspec.DecodeError:
        raise InvalidRequestError(f"messages[{i}]: tool call arguments are not valid JSON", param="messages") from None
    if not isinstance(tool_input, dict):
        raise InvalidRequestError(f"messages[{i}]: tool call arguments must be a JSON object", param="messages")
    return {"type": "tool_use", "id": ids.call(call.id), "name": call.name, "input": tool_input}


def _tool_id(call_id: str | None) -> str | None:
    """An id as Anthropic takes it (``[a-zA-Z0-9_-]+``): one another model wrote (Kimi K2's
    ``functions.get_weather:0``) was refused with a 400, no fallback tried (t21). The call and its
    result are mapped alike, so they stay paired."""
    if call_id is None or _ANTHROPIC_ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:8]  # two ids that map alike stay apart (t23)
    return f"{_NOT_IN_AN_ID.sub('_', call_id)}_{digest}"


_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_IN_AN_ID = re.compile(r"[^a-zA-Z0-9_-]")


class _ToolIds:
    """Each ``tool_use`` id once in the conversation, as Anthropic refuses one twice ("`tool_use` ids
    must be unique"), while chat servers that number their calls per answer (vLLM's and Qwen's
    ``call_0``) reuse them, and a Responses or chat conversation may call an id again once it is
    answered (f230: such a conversation was refused in words its client never wrote). A call under
    an id used before goes under a fresh one (:func:`distinct_call_id`), and so does the result
    that answers it: a result answers the first call of its id still waiting, as the edges pair
    them. The same conversation gets the same ids every turn (Anthropic's prompt cache holds), and
    the client never sees them: Anthropic's answer names its own calls."""

    __slots__ = ("_used", "_waiting")

    def __init__(self) -> None:
        self._used: set[str] = set()
        self._waiting: dict[str, list[str]] = {}
        """Per id the client gave, the ids sent for its calls not answered yet, in order."""

    def call(self, call_id: str) -> str:
        sent = distinct_call_id(_tool_id(call_id) or "", self._used)
        self._waiting.setdefault(call_id, []).append(sent)
        return sent

    def result(self, call_id: str | None) -> str | None:
        waiting = self._waiting.get(call_id) if call_id is not None else None
        return waiting.pop(0) if waiting else _tool_id(call_id)


def _tool_result(message: Message, ids: _ToolIds) -> Block:
    block: Block = {"type": "tool_result", "tool_use_id": ids.result(message.tool_call_id)}
    parts = message.parts
    if len(parts) == 1 and isinstance(parts[0], TextPart) and parts[0].cache_control is None:
        block["content"] = parts[0].text
    elif parts:
        block["content"] = [b for part in parts if (b := _block(part, 0)) is not None]
    if message.is_error:
        block["is_error"] = True
    return _marked(block, message.cache_control)


def _tool_entry(tool: Tool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        entry["description"] = tool.description
    entry["input_schema"] = tool.parameters
    if tool.strict is not None:
        entry["strict"] = tool.strict
    return _marked(entry, tool.cache_control)


# -- answers from an Anthropic upstream ---------------------------------------------

_FINISH_OF: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "model_context_window_exceeded": "model_context_window_exceeded",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "pause_turn",
}


def _finish_of(stop_reason: Any) -> FinishReason | None:
    """A stop reason added after this was written reads as a plain stop."""
    return _FINISH_OF.get(stop_reason, "stop") if isinstance(stop_reason, str) else None


def _count(value: Any) -> int:
    """A token count as reported (``22.0`` included); anything else (a negative, a boolean) as none."""
    return token_count(value) or 0


def _given(raw: dict[str, Any], name: str, default: int) -> int:
    """A count the event gives (null or absent: ``default``, the one known)."""
    value = raw.get(name)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return _count(value) if whole and not isinstance(value, bool) else default


def usage_from_wire(raw: Any) -> Usage | None:
    """Anthropic's usage as the internal model counts it (``input_tokens`` with the cache's reads
    and writes in it, as every other API counts a prompt); None when it reports none."""
    if not isinstance(raw, dict) or token_count(raw.get("input_tokens")) is None:
        return None
    read, write = _count(raw.get("cache_read_input_tokens")), _count(raw.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=_count(raw["input_tokens"]) + read + write,
        output_tokens=_count(raw.get("output_tokens")),
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write, _hour_long(raw, 0)),
        **_priced_options(raw, None),
    )


def _priced_options(raw: dict[str, Any], known: Usage | None) -> dict[str, Any]:
    """What the answer ran with that its price depends on (t59: billed at the base price):
    ``speed``, ``inference_geo`` and ``server_tool_use``'s ``<tool>_requests`` counts, each one
    the event does not give keeping what is ``known`` (a stream's ``message_start``)."""
    speed, geo = option_name(raw.get("speed")), option_name(raw.get("inference_geo"))
    tools = dict(known.server_tool_requests) if known is not None else {}
    used = raw.get("server_tool_use")
    for name, count in used.items() if isinstance(used, dict) else ():
        tool = (
            option_name(name.removesuffix("_requests"))
            if isinstance(name, str) and name.endswith("_requests")
            else None
        )
        if tool is not None and _count(count):
            tools[tool] = _count(count)
    return {
        "speed": speed if speed is not None else known.speed if known is not None else None,
        "inference_geo": geo if geo is not None else known.inference_geo if known is not None else None,
        "server_tool_requests": tools,
    }


_PRICED_SERVER_TOOL = re.compile(r"(web_search|web_fetch|code_execution)_(\d{8})")
"""Server tools Anthropic bills above the token prices (web fetch at $0, which the policy says
explicitly), by version-dated type; the name is the one ``server_tool_use`` counts them under
(code execution: :class:`ContainerUses` where it does not)."""
_CODE_RUNNING_SEARCH = "20260209"
"""The version of the web search and fetch tools from which they run code themselves (dynamic
filtering): Anthropic charges no code execution in a request offering one."""


def priced_options(body: dict[str, Any]) -> PricedOptions:
    """What a request sent as it is asks for that Anthropic bills above the token prices (t59):
    ``speed``, ``inference_geo``, and the per-use server tools with their ``max_uses`` (1 when
    unset, for the budget estimate)."""
    speed, geo, tools = body.get("speed"), body.get("inference_geo"), body.get("tools")
    server_tools: dict[str, int] = {}
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        matched = _PRICED_SERVER_TOOL.fullmatch(kind) if isinstance(kind, str) else None
        if matched is not None:
            uses = _count(tool.get("max_uses")) or 1
            server_tools[matched[1]] = server_tools.get(matched[1], 0) + uses
    if "code_execution" in server_tools and _code_execution_free(tools):
        del server_tools["code_execution"]
    return PricedOptions(
        speed=speed if isinstance(speed, str) else None,
        inference_geo=geo if isinstance(geo, str) else None,
        server_tools=server_tools,
    )


def _code_execution_free(tools: Any) -> bool:
    """Whether ``tools`` offers a web search or fetch tool that runs code itself, with which
    Anthropic charges no code execution."""
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        matched = _PRICED_SERVER_TOOL.fullmatch(kind) if isinstance(kind, str) else None
        if matched is not None and matched[1] != "code_execution" and matched[2] >= _CODE_RUNNING_SEARCH:
            return True
    return False


_CODE_EXECUTION_CALLS = frozenset({"code_execution", "bash_code_execution", "text_editor_code_execution"})


class ContainerUses:
    """The code execution an answer to ``body`` ran, as the gateway bills it (f175): Anthropic
    bills the container's time, which its usage does not count, so each container the answer
    names (``container.id``: the message's, a stream's ``message_start`` or ``message_delta``'s)
    is one use per request, and one that ran code (a code execution ``server_tool_use`` block)
    but named none is one; none in a request whose web search or fetch runs code itself."""

    __slots__ = ("_free", "_ids", "_ran")

    def __init__(self, body: dict[str, Any]) -> None:
        self._free = _code_execution_free(body.get("tools"))
        self._ids: set[str] = set()
        self._ran = False

    def add(self, holder: Any) -> None:
        """Count the ``container`` a message (or a ``message_delta``'s delta) names, and its blocks."""
        if not isinstance(holder, dict):
            return
        container = holder.get("container")
        if isinstance(container, dict) and isinstance(container.get("id"), str):
            self._ids.add(container["id"])
        content = holder.get("content")
        for block in content if isinstance(content, list) else ():
            self.add_block(block)

    def add_block(self, block: Any) -> None:
        if isinstance(block, dict) and block.get("type") == "server_tool_use":
            self._ran = self._ran or block.get("name") in _CODE_EXECUTION_CALLS

    def uses(self, counted: Mapping[str, int]) -> dict[str, int]:
        """The ``server_tool_requests`` to bill: ``counted`` (the usage's), with the containers
        as ``code_execution`` where the usage counted none."""
        uses = len(self._ids) or int(self._ran)
        if not uses or self._free or "code_execution" in counted:
            return dict(counted)
        return {**counted, "code_execution": uses}


def _hour_long(raw: dict[str, Any], default: int) -> int:
    """Of the cache writes, those kept an hour (``cache_creation.ephemeral_1h_input_tokens``)."""
    split = raw.get("cache_creation")
    return _given(split, "ephemeral_1h_input_tokens", default) if isinstance(split, dict) else default


def decode_answer(data: dict[str, Any]) -> Answer | None:
    """An upstream's message as an answer; None when it is not a message."""
    content = data.get("content")
    if data.get("type") != "message" or not isinstance(content, list):
        return None
    thinking: list[ThinkingPart | RedactedThinkingPart] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    apart = False  # a block other than text came since the last text
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" and any(texts):
            apart = True
        if kind == "thinking":
            thinking.append(ThinkingPart(str(block.get("thinking") or ""), str(block.get("signature") or "")))
        elif kind == "redacted_thinking":
            thinking.append(RedactedThinkingPart(str(block.get("data") or "")))
        elif kind == "text" and isinstance(block.get("text"), str):
            # Blocks in a row are one text (citations split it mid-sentence); text resumed after a
            # tool call starts a line of its own, as ``core.Message.text`` joins parts (a stream's
            # TextJoiner: before the first text that follows).
            text = block["text"]
            texts.append(("\n" if apart and text else "") + text)
            apart = apart and not text
        elif kind == "tool_use":
            arguments = msgspec.json.encode(block.get("input") or {}).decode()
            calls.append(ToolCall(str(block.get("id") or ""), str(block.get("name") or ""), arguments))
    stop_sequence = data.get("stop_sequence")
    return Answer(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        thinking=thinking,
        text="".join(texts) if texts else None,
        tool_calls=calls,
        finish_reason=_finish_of(data.get("stop_reason")),
        stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
        usage=usage_from_wire(data.get("usage")) or Usage(),
    )


_PROMPT_COUNTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
"""A usage's counts of the prompt, which a stream's ``message_delta`` repeats (cumulative)."""


class StreamDecoder:
    """An upstream's stream events as deltas (the reverse of :class:`StreamEncoder`).

    ``tool_use`` blocks are numbered as tool calls in order of appearance; usage comes as
    :class:`UsageReport` from ``message_start`` and again from each ``message_delta`` (whose
    usage may carry only the output count: the prompt's stays as ``message_start`` said).
    Event and delta types added after this was written say nothing here.
    """

    __slots__ = ("_joiner", "_silent", "_tools", "id", "model", "usage")

    def __init__(self, *, joined: bool = True) -> None:
        """``joined=False``: text resumed after a tool call comes without the line that starts it,
        for a :class:`TextJoiner` to add later (once the gateway's stop strings have seen the text)."""
        self.id: str | None = None
        self.model: str | None = None
        self.usage: Usage | None = None
        self._tools: dict[int, int] = {}
        """Content block index → tool call index."""
        self._silent: set[int] = set()
        """Tool calls no argument text has come for yet: a call without input streams one empty
        ``input_json_delta``, and ends with ``{}`` as its arguments, as the whole message says."""
        self._joiner = TextJoiner() if joined else None

    def feed(self, event: dict[str, Any]) -> list[Delta]:
        deltas = self._feed(event)
        return deltas if self._joiner is None else self._joiner.join(deltas)

    def _feed(self, event: dict[str, Any]) -> list[Delta]:
        kind = event.get("type")
        if kind == "message_start":
            message = event["message"] if isinstance(event.get("message"), dict) else {}
            self.id = message["id"] if isinstance(message.get("id"), str) else None
            self.model = message["model"] if isinstance(message.get("model"), str) else None
            return self._usage(message.get("usage"))
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "content_block_stop":
            tool = self._tools.get(_count(event.get("index")))
            if tool is not None and tool in self._silent:
                self._silent.discard(tool)  # t52: '' reached chat clients as a call's arguments
                return [ToolArgumentsDelta(tool, "{}")]
            return []
        if kind == "message_delta":
            delta = event["delta"] if isinstance(event.get("delta"), dict) else {}
            reason = _finish_of(delta.get("stop_reason"))
            matched = delta.get("stop_sequence")
            finish = Finish(reason or "stop", matched if isinstance(matched, str) else None)
            return [*self._usage(event.get("usage")), finish]
        return []

    def _usage(self, raw: Any) -> list[Delta]:
        """The usage so far, each field the event gives (cumulative) replacing the one known: a
        ``message_delta`` may give ``input_tokens`` with null cache counts, which keep what
        ``message_start`` said (as the SDKs merge them), or only the output count."""
        if not isinstance(raw, dict):
            return []
        known = self.usage
        if known is not None and known.input_tokens and not any(raw.get(name) for name in _PROMPT_COUNTS):
            # zeros for the whole prompt after message_start counted it: no cumulative count falls so
            # far; a proxy's filler, which billed the stream on the gateway's count (t186: 88x short)
            raw = {name: value for name, value in raw.items() if name not in _PROMPT_COUNTS}
        if known is None:
            first = usage_from_wire(raw)
            if first is None:  # no prompt count (an upstream that is not Anthropic's own): counted here (t47: $0)
                return []
            full = first
        else:
            fresh = _given(
                raw, "input_tokens", known.input_tokens - known.cached_input_tokens - known.cache_write_tokens
            )
            read = _given(raw, "cache_read_input_tokens", known.cached_input_tokens)
            write = _given(raw, "cache_creation_input_tokens", known.cache_write_tokens)
            output = _given(raw, "output_tokens", known.output_tokens)
            full = Usage(
                input_tokens=fresh + read + write,
                output_tokens=output,
                cached_input_tokens=read,
                cache_write_tokens=write,
                cache_write_1h_tokens=min(write, _hour_long(raw, known.cache_write_1h_tokens)),
                **_priced_options(raw, known),
            )
        self.usage = full
        return [UsageReport(full)]

    def _block_start(self, event: dict[str, Any]) -> list[Delta]:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return []
        kind = block.get("type")
        if kind == "text":
            text = block["text"] if isinstance(block.get("text"), str) else ""
            return [TextDelta(text)] if text else []
        if kind == "redacted_thinking":
            return [RedactedThinking(str(block.get("data") or ""))]
        if kind == "tool_use":
            index = self._tools[_count(event.get("index"))] = len(self._tools)
            self._silent.add(index)
            return [ToolCallStart(index, str(block.get("id") or ""), str(block.get("name") or ""))]
        return []  # a thinking block: its text and signature come as deltas

    def _block_delta(self, event: dict[str, Any]) -> list[Delta]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        field = _DELTA_FIELDS.get(kind) if isinstance(kind, str) else None
        value = delta.get(field) if field is not None else None
        if not isinstance(value, str) or not value:
            return []  # empty, or a delta type this does not read (citations_delta, ...)
        if kind == "text_delta":
            return [TextDelta(value)]
        if kind == "thinking_delta":
            return [ThinkingDelta(value)]
        if kind == "signature_delta":
            return [ThinkingSignature(value)]
        tool = self._tools.get(_count(event.get("index")))
        if tool is None:
            return []
        self._silent.discard(tool)
        return [ToolArgumentsDelta(tool, value)]


class TextJoiner:
    """Text resumed after a tool call (made after text) starts a line of its own, as
    :func:`decode_answer` joins a whole message's blocks: the ``"\n"`` goes before the first text
    that follows. Apart from the decoder, so that the stop strings the gateway applies see only
    what the model wrote (t58: a ``"\n"`` stop matched this line, and the call was lost)."""

    __slots__ = ("_apart", "_texted")

    def __init__(self) -> None:
        self._texted = False
        self._apart = False

    def join(self, deltas: list[Delta]) -> list[Delta]:
        joined = deltas
        for position, delta in enumerate(deltas):
            if isinstance(delta, TextDelta) and delta.text:
                if self._apart:
                    joined = list(deltas) if joined is deltas else joined
                    joined[position] = TextDelta("\n" + delta.text)
                    self._apart = False
                self._texted = True
            elif isinstance(delta, ToolCallStart):
                self._apart = self._texted
        return joined


_DELTA_FIELDS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
    "signature_delta": "signature",
}
"""Where each kind of content block delta carries its text."""


_STOP_REASON: dict[FinishReason, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "stop_sequence": "stop_sequence",
    "pause_turn": "pause_turn",
    "model_context_window_exceeded": "model_context_window_exceeded",
}


def _stop_reason(finish: FinishReason | None, called: bool, refused: bool = False) -> str:
    """vLLM ends a forced tool call (``tool_choice`` required or named) with ``stop``; a message
    that ends in tool calls is ``tool_use`` to Anthropic's clients, whose agent loops look for it.
    An OpenAI model's refusal ends with ``stop`` too: Anthropic's clients look for ``refusal``."""
    if called and finish in (None, "stop"):
        return "tool_use"
    if refused and finish in (None, "stop"):
        return "refusal"
    return _STOP_REASON.get(finish or "stop", "end_turn")


def usage_body(usage: Usage) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` without the cache's reads and writes, and the writes
    split by how long they are kept when there are some."""
    body: dict[str, Any] = {
        "input_tokens": max(0, usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
    }
    if usage.cache_write_tokens:
        hour = usage.cache_write_1h_tokens
        body["cache_creation"] = {
            "ephemeral_5m_input_tokens": usage.cache_write_tokens - hour,
            "ephemeral_1h_input_tokens": hour,
        }
    return body


def encode_answer(answer: Answer, message_id: str, model: str) -> bytes:
    content: list[dict[str, Any]] = [_thinking_block(part) for part in answer.thinking]
    text = (answer.text or "") + (answer.refusal or "")  # as the stream tells them: one text block
    if text:
        content.append({"type": "text", "text": text})
    for call in answer.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments(call.arguments)})
    body = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(answer.finish_reason, bool(answer.tool_calls), bool(answer.refusal)),
        "stop_sequence": answer.stop_sequence,
        "usage": usage_body(answer.usage),
    }
    return msgspec.json.encode(body)


def _thinking_block(part: ThinkingPart | RedactedThinkingPart) -> dict[str, Any]:
    if isinstance(part, RedactedThinkingPart):
        return {"type": "redacted_thinking", "data": part.data}
    return {"type": "thinking", "thinking": part.text, "signature": part.signature}


def _arguments(text: str) -> Any:
    """Tool input as an object; arguments that do not parse are kept whole rather than lost. Half an
    emoji escaped in them (``\\ud83d``) is U+FFFD: kept, it could not be written out (t82: the
    Messages stream died after its tool call, unlogged and unbilled)."""
    try:
        value = mended(json.loads(text)) if text else {}
    except ValueError:
        return {"_raw_arguments": text}
    return value if isinstance(value, dict) else {"value": value}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def encode_error(status: int, message: str) -> bytes:
    return msgspec.json.encode({"type": "error", "error": {"type": error_type_for(status), "message": message}})


_UPSTREAM_PREFIX = re.compile(r"^upstream '[^']*': HTTP \d+: ")


def context_overflow_message(message: str, max_tokens: int | None) -> str:
    """A prompt too long for the model's window, worded as Anthropic words it, whichever upstream
    said it (t59): Claude Code compacts on "prompt is too long: P tokens > W maximum" and retries
    with a smaller ``max_tokens`` on "input length and `max_tokens` exceed context limit: P + C > W",
    and reads neither in vLLM's words nor after the gateway's "upstream 'x': HTTP 400: "."""
    words = _UPSTREAM_PREFIX.sub("", message)
    said = context_overflow(words)
    if said.window is not None and said.prompt is not None:
        completion = said.completion if said.completion is not None else max_tokens
        if said.prompt_fits and completion is not None:
            return (
                f"input length and `max_tokens` exceed context limit: {said.prompt} + {completion} > "
                f"{said.window}, decrease input length or `max_tokens` and try again"
            )
        if not said.prompt_fits:
            return f"prompt is too long: {said.prompt} tokens > {said.window} maximum"
    return words if words.lower().startswith("prompt is too long") else f"prompt is too long: {words}"


_PING_EVERY_S = 5.0


class StreamEncoder:
    """Deltas to Anthropic's event sequence: message_start, ping, content blocks, message_delta, message_stop.

    Thinking and text stream as they come, a block closing when the next one starts (a
    thinking block also when its signature arrives), text resumed after a call going on in the
    block it left. Tool calls are held to the end and sent whole, each as one ``tool_use``
    block whose input is the object the non-streamed answer has: an OpenAI upstream may
    interleave parallel calls' arguments, and a small model's arguments may not be JSON, and
    Anthropic's blocks can neither be reopened nor carry input that is not an object (the SDKs
    raise on it).
    """

    __slots__ = (
        "_blocks",
        "_calls",
        "_finish",
        "_input_tokens",
        "_message_id",
        "_model",
        "_open",
        "_open_kind",
        "_pinged",
        "_refused",
        "_stop_sequence",
        "_usage",
    )

    def __init__(self, message_id: str, model: str, input_tokens: int) -> None:
        self._message_id = message_id
        self._model = model
        self._input_tokens = input_tokens
        self._blocks = 0
        self._open: int | None = None
        self._open_kind: str | None = None
        """The open block's type: ``"text"``, ``"thinking"``, ``"redacted"`` or ``"tool"``."""
        self._finish: FinishReason | None = None
        self._stop_sequence: str | None = None
        self._usage: Usage | None = None
        self._calls: dict[int, tuple[str, str, list[str]]] = {}
        """Upstream index -> (id, name, argument fragments), in the order the calls began."""
        self._pinged = time.monotonic()
        self._refused = False

    def start(self, usage: Usage | None = None) -> bytes:
        """``message_start``, with the upstream's own usage when it came first (an Anthropic
        upstream's: its cache reads and writes), else the gateway's count of the prompt."""
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_body(usage)
            if usage is not None
            else {
                "input_tokens": self._input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return _event("message_start", {"type": "message_start", "message": message}) + _event("ping", {"type": "ping"})

    def feed(self, deltas: list[Delta]) -> bytes:
        out = b""
        for delta in deltas:
            if isinstance(delta, ThinkingDelta):
                if self._open_kind != "thinking":
                    out += self._close() + self._begin(
                        "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                    )
                out += self._delta({"type": "thinking_delta", "thinking": delta.text})
            elif isinstance(delta, ThinkingSignature):
                if self._open_kind != "thinking":
                    out += self._close() + self._begin(
                        "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                    )
                out += self._delta({"type": "signature_delta", "signature": delta.signature}) + self._close()
            elif isinstance(delta, RedactedThinking):
                redacted = {"type": "redacted_thinking", "data": delta.data}
                out += self._close() + self._begin("redacted", redacted) + self._close()
            elif isinstance(delta, TextDelta | RefusalDelta):
                if self._open_kind != "text":
                    out += self._close() + self._begin("text", {"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": delta.text})
                self._refused = self._refused or isinstance(delta, RefusalDelta)
            elif isinstance(delta, ToolCallStart):
                # The open block stays open: text after the call goes on in it, as the whole
                # message joins its texts ahead of the calls (f142: a second text block).
                self._calls.setdefault(delta.index, (delta.id, delta.name, []))
            elif isinstance(delta, ToolArgumentsDelta):
                self._calls.setdefault(delta.index, ("", "", []))[2].append(delta.fragment)
                out += self._ping_while_held()
            elif isinstance(delta, Finish):
                self._finish, self._stop_sequence = delta.reason, delta.stop_sequence
            elif isinstance(delta, UsageReport):
                self._usage = delta.usage
        return out

    def _ping_while_held(self) -> bytes:
        """A ``ping`` every few seconds while a tool call's input is held for its whole block: a
        model writing a long file sent nothing for 9 s, which a proxy's idle timeout cuts (t21)."""
        now = time.monotonic()
        if now - self._pinged < _PING_EVERY_S:
            return b""
        self._pinged = now
        return _event("ping", {"type": "ping"})

    def finish(self) -> bytes:
        usage = usage_body(self._usage) if self._usage is not None else {"output_tokens": 0}
        delta = {
            "stop_reason": _stop_reason(self._finish, bool(self._calls), self._refused),
            "stop_sequence": self._stop_sequence,
        }
        return (
            self._close()
            + self._tool_blocks()
            + _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + _event("message_stop", {"type": "message_stop"})
        )

    def error(self, status: int, message: str) -> bytes:
        """An error after the stream began: Anthropic's ``error`` event."""
        return _event("error", {"type": "error", "error": {"type": error_type_for(status), "message": message}})

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        return _event(
            "content_block_start", {"type": "content_block_start", "index": self._open, "content_block": block}
        )

    def _tool_blocks(self) -> bytes:
        out = b""
        for number, (call_id, name, fragments) in enumerate(self._calls.values()):
            block = {
                "type": "tool_use",
                "id": call_id or f"toolu_{self._message_id}_{number}",
                "name": name,
                "input": {},
            }
            whole = msgspec.json.encode(_arguments("".join(fragments))).decode()
            out += self._begin("tool", block) + self._delta({"type": "input_json_delta", "partial_json": whole})
            out += self._close()
        self._calls.clear()
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self._open, "delta": delta})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._open_kind = self._open, None, None
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"
