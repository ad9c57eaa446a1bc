"""OpenAI Chat Completions: a chat body to the internal model and back, and completions and chunks.

A chat client's body is read into the internal model once (:func:`read_chat_request`), and the
pipeline's steps read that; the body itself goes on to OpenAI-compatible upstreams as it came.
A request that arrived in another protocol reaches an OpenAI-compatible upstream written by
:func:`to_chat_body`.

What OpenAI's format has no field for can travel in a chat body under names that the
Anthropic provider reads and OpenAI-compatible upstreams never see (``for_openai_upstream``):
``cache_control`` on parts and tools, a top-level ``thinking``, and assistant content
parts ``{"type": "thinking", "thinking", "signature"}`` / ``{"type":
"redacted_thinking", "data"}``. Answers carry reasoning as ``message.reasoning_content``
(the field vLLM and DeepSeek use) and, with Anthropic's signatures, ``thinking_blocks``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

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
from gateway.core.replay import deltas_of
from gateway.errors import InvalidRequestError
from gateway.pricing import tier_name
from gateway.protocols.call_ids import distinct_call_id
from gateway.protocols.upstream_json import token_count

__all__ = [
    "CHAT_UPSTREAM_LOSSES",
    "CallNumbering",
    "CallRelay",
    "ChunkDeltas",
    "ChunkReader",
    "answer_from_completion",
    "answer_from_message",
    "chat_finish_reason",
    "chunk_body",
    "client_usage",
    "completion_body",
    "completion_from_answer",
    "grown_name",
    "lost_on_chat_upstreams",
    "read_chat_request",
    "read_usage",
    "reasoning_of",
    "request_from_chat_body",
    "storable_answer",
    "stream_from_answer",
    "to_chat_body",
    "usage_body",
    "usage_from",
    "whole_arguments",
]

_encode = msgspec.json.Encoder().encode

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def _finish_of(choice: dict[str, Any]) -> tuple[FinishReason | None, str | None]:
    """A choice's finish and the stop string that caused it: vLLM names the string it matched
    in ``stop_reason`` (a token id there is an end-of-sequence token, not a stop sequence);
    OpenAI does not say, and its stops read as a plain ``stop``."""
    reason = _FINISH.get(str(choice.get("finish_reason")))
    matched = choice.get("stop_reason")
    if reason == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return reason, None


def _other_finish(said: object) -> str | None:
    """A finish reason the internal model has no name for (vLLM's ``abort``), as it was said."""
    return said if isinstance(said, str) and said and said not in _FINISH else None


CHAT_UPSTREAM_LOSSES = frozenset({"thinking", "tool_result.image", "tool_result.file", "tool_result.is_error"})
"""Every name :func:`lost_on_chat_upstreams` gives: what an Anthropic upstream does take."""


def lost_on_chat_upstreams(request: Request) -> list[str]:
    """What of ``request``'s turns a chat completions upstream cannot be sent (for ``x-gateway-dropped``):
    signed thinking, and a tool result's images, files or error flag (its content is text there)."""
    lost: dict[str, None] = {}
    for message in request.messages:
        if any(isinstance(part, ThinkingPart | RedactedThinkingPart) for part in message.parts):
            lost["thinking"] = None
        if message.role == "tool":
            if any(isinstance(part, ImagePart) for part in message.parts):
                lost["tool_result.image"] = None
            if any(isinstance(part, FilePart) for part in message.parts):
                lost["tool_result.file"] = None
            if message.is_error:
                lost["tool_result.is_error"] = None
    return list(lost)


def to_chat_body(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "messages": [_message(m) for m in _alternating(request.messages)]}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop  # all of them: vLLM takes more than OpenAI's 4 (which refuses the rest itself)
    if request.user is not None:
        body["user"] = request.user
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
        choice = request.tool_choice
        if choice is not None:
            if choice.mode == "tool":
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = choice.mode
            if not choice.parallel:
                body["parallel_tool_calls"] = False
    if request.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": request.json_schema},
        }
    if request.thinking is not None:
        body["thinking"] = request.thinking
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.extra:
        body.update(request.extra)
    return body


_MODELED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "thinking",
    }
)
"""The chat fields :func:`request_from_chat_body` reads into the model; every other field goes to
:attr:`Request.extra` (``response_format`` too, whose name and ``strict`` the model does not hold)."""


def read_chat_request(body: dict[str, Any]) -> Request:
    """A chat client's request as the internal model, never refused: what the model has no
    place for is named in :attr:`Request.unreadable` (the request still goes as it came to
    an OpenAI-compatible upstream), and unmodeled fields go to :attr:`Request.extra`."""
    try:
        request = request_from_chat_body(body)
    except InvalidRequestError as exc:
        request = _readable_part(body)
        request.unreadable, request.unreadable_param = exc.message, exc.param or "messages"
    request.extra = {key: value for key, value in body.items() if key not in _MODELED}
    return request


def _readable_part(body: dict[str, Any]) -> Request:
    """What the model can hold of a request :func:`request_from_chat_body` refused: messages,
    parts and tools it cannot read are left out (or kept as their text)."""
    messages: list[Message] = []
    for i, message in enumerate(body.get("messages") or ()):
        try:
            messages.append(_internal_message(message, i))
        except InvalidRequestError:
            if isinstance(message, dict):
                role = message.get("role")
                text = _loose_text(message.get("content"))
                messages.append(Message(role if role in ("system", "user", "assistant") else "user", text))
    try:
        tools, choice = _internal_tools(body)
    except InvalidRequestError:
        tools, choice = [], None
    return Request(
        model=str(body.get("model") or ""),
        messages=messages,
        max_tokens=_max_tokens(body),
        temperature=_number(body.get("temperature")),
        top_p=_number(body.get("top_p")),
        stop=_stop(body.get("stop")),
        stream=body.get("stream") is True,
        tools=tools,
        tool_choice=choice,
        thinking=body["thinking"] if isinstance(body.get("thinking"), dict) else None,  # named where dropped (t78)
    )


def _loose_text(content: Any) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),) if content else ()
    if not isinstance(content, list):
        return ()
    return tuple(
        TextPart(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]
    )


def request_from_chat_body(body: dict[str, Any]) -> Request:
    """A chat request as the internal model. Fields it has no place for (``n``, penalties,
    ``seed``, ``logprobs``, a ``json_object`` response format, ...) are left out: the
    upstream that reads the internal model cannot honour them either. Invalid messages,
    parts, tool calls and tools are an :class:`InvalidRequestError` naming where."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a list", param="messages")
    request = Request(
        model=str(body.get("model") or ""),
        messages=[_internal_message(message, i) for i, message in enumerate(messages)],
        max_tokens=_max_tokens(body),
        temperature=_number(body.get("temperature")),
        top_p=_number(body.get("top_p")),
        stop=_stop(body.get("stop")),
        stream=body.get("stream") is True,
        user=body["user"] if isinstance(body.get("user"), str) and body["user"] else None,
    )
    request.tools, request.tool_choice = _internal_tools(body)
    request.unsigned_reasoning = _unsigned_reasoning(messages, request.messages)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        request.json_schema = schema if isinstance(schema, dict) else None
    if isinstance(body.get("thinking"), dict):
        request.thinking = body["thinking"]
    return request


_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
_ECHOED_FIELDS = frozenset({"annotations", "reasoning_content", "reasoning", "thinking_blocks"})
"""Fields of an answer's message that a client sends back with it, which change no next answer
(citations; the reasoning, which chat servers do not show the model again), except Anthropic's
signed ``thinking_blocks``, which go back to it (:func:`_echoed_thinking`)."""


def _internal_message(message: Any, i: int) -> Message:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
    for field, value in message.items():
        if field == "refusal" and message.get("role") == "assistant":
            continue  # read below, as a refusal part is
        if field not in _MESSAGE_FIELDS and field not in _ECHOED_FIELDS and value not in (None, False, "", [], {}):
            # prefix (a continuation), audio, ...: the model has no place for them
            raise InvalidRequestError(f"messages[{i}].{field} cannot be sent to this upstream", param="messages")
    role, content = message.get("role"), message.get("content")
    name = message.get("name") if isinstance(message.get("name"), str) and message.get("name") else None
    if role in ("system", "developer"):
        parts = _internal_parts(content, i)
        if not all(isinstance(part, TextPart) for part in parts):
            raise InvalidRequestError(f"messages[{i}]: only text parts are allowed here", param="messages")
        return Message("system", parts, name=name)
    if role == "user":
        return Message("user", _internal_parts(content, i), name=name)
    if role == "assistant":
        parts = (*_internal_parts(content, i), *_refusal(message, i))
        if message.get("thinking_blocks") and not any(
            isinstance(p, ThinkingPart | RedactedThinkingPart) for p in parts
        ):
            parts = (*_echoed_thinking(message), *parts)
        return Message("assistant", parts, _internal_calls(message.get("tool_calls"), i), name=name)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise InvalidRequestError(f"messages[{i}]: a tool message needs a tool_call_id", param="messages")
        return Message("tool", _internal_parts(content, i), tool_call_id=call_id)
    raise InvalidRequestError(f"messages[{i}]: role {role!r} is not supported", param="messages")


def _unsigned_reasoning(sent: list[dict[str, Any]], messages: list[Message]) -> str | None:
    """The field of the first answer sent back with reasoning but no signed thinking (t128: an
    Anthropic upstream left it out without a word)."""
    for raw, message in zip(sent, messages, strict=True):
        if (
            message.role == "assistant"
            and reasoning_of(raw)
            and not any(
                isinstance(part, RedactedThinkingPart) or (isinstance(part, ThinkingPart) and part.signature)
                for part in message.parts
            )
        ):
            return "reasoning_content" if raw.get("reasoning_content") else "reasoning"
    return None


def _refusal(message: dict[str, Any], i: int) -> tuple[TextPart, ...]:
    """An answer's ``refusal`` sent back with it, as the assistant's text, as a ``refusal``
    part is: OpenAI takes it, and the model that reads the conversation next should see that it
    declined (t78: a 400 on a Claude route, taken on a chat one, so ``auto`` decided)."""
    refusal = message.get("refusal")
    if refusal is None or refusal == "":
        return ()
    if not isinstance(refusal, str):
        raise InvalidRequestError(f"messages[{i}].refusal must be a string", param="messages")
    return (TextPart(refusal),)


def _echoed_thinking(message: dict[str, Any]) -> list[ThinkingPart | RedactedThinkingPart]:
    """The signed reasoning of an answer (its ``thinking_blocks``) sent back with it: Anthropic
    requires it before the tool calls it led to. A streamed block's entry had only its signature
    (before t128): one such block takes the text of ``reasoning_content``."""
    parts = [part for part in _thinking(message) if not isinstance(part, ThinkingPart) or part.signature]
    reasoning = reasoning_of(message)
    signed = [part for part in parts if isinstance(part, ThinkingPart)]
    if len(signed) == 1 and not signed[0].text and reasoning:
        parts[parts.index(signed[0])] = ThinkingPart(reasoning, signed[0].signature)
    return parts


_PART_FIELDS: dict[Any, frozenset[str]] = {
    "text": frozenset({"type", "text", "cache_control"}),
    "refusal": frozenset({"type", "refusal", "cache_control"}),
    "image_url": frozenset({"type", "image_url", "cache_control"}),
    "file": frozenset({"type", "file", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
"""The keys the model reads of each content part it has a type for."""


def _refuse_unknown_keys(raw: dict[str, Any], known: frozenset[str], where: str) -> None:
    """A key the model has no place for, unless empty, is refused as a message's unknown field is
    (OpenAI refuses both; t128: a part's was left out without a word)."""
    for key, value in raw.items():
        if key not in known and value not in (None, False, "", [], {}):
            raise InvalidRequestError(f"{where}.{key} cannot be sent to this upstream", param="messages")


def _internal_parts(content: Any, i: int) -> tuple[Part, ...]:
    """Empty text is left out (Anthropic refuses empty text blocks, and it says nothing)."""
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(content),) if content else ()
    if not isinstance(content, list):
        raise InvalidRequestError(f"messages[{i}]: content must be a string or a list of parts", param="messages")
    parts: list[Part] = []
    for j, raw in enumerate(content):
        kind = raw.get("type") if isinstance(raw, dict) else None
        assert kind is None or isinstance(raw, dict)
        known = _PART_FIELDS.get(kind)
        if known is not None and not raw.keys() <= known:
            _refuse_unknown_keys(raw, known, f"messages[{i}].content[{j}]")
        marked = (
            raw.get("cache_control") if isinstance(raw, dict) and isinstance(raw.get("cache_control"), dict) else None
        )
        if kind == "thinking":
            parts.append(ThinkingPart(str(raw.get("thinking") or ""), str(raw.get("signature") or "")))
        elif kind == "redacted_thinking":
            parts.append(RedactedThinkingPart(str(raw.get("data") or "")))
        elif kind in ("text", "refusal"):
            text = raw.get(kind)
            if not isinstance(text, str):
                raise InvalidRequestError(f"messages[{i}]: a {kind} part needs a string {kind!r}", param="messages")
            if text:
                parts.append(TextPart(text, cache_control=marked))
        elif kind == "image_url":
            image = raw.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequestError(f"messages[{i}]: an image_url part needs a url", param="messages")
            detail = image.get("detail") if isinstance(image, dict) else None
            detail = detail if isinstance(detail, str) and detail != "auto" else None  # auto: the default, said or not
            parts.append(ImagePart(url, cache_control=marked, detail=detail))
        elif kind == "file":
            parts.append(_file_part(raw.get("file"), f"messages[{i}].content[{j}]", marked))
        else:
            raise InvalidRequestError(
                f"messages[{i}]: content part type {kind!r} cannot be sent to this upstream", param="messages"
            )
    return tuple(parts)


_FILE_FIELDS = frozenset({"file_data", "file_id", "filename"})


def _file_part(file: Any, where: str, marked: dict[str, Any] | None) -> FilePart:
    """A ``file`` part (``{"file_data": "data:application/pdf;base64,...", "filename": ...}`` or a
    ``file_id``), as OpenAI's chat API takes it."""
    if not isinstance(file, dict):
        raise InvalidRequestError(f"{where}: a file part needs a 'file' object", param="messages")
    _refuse_unknown_keys(file, _FILE_FIELDS, f"{where}.file")
    data, file_id, filename = file.get("file_data"), file.get("file_id"), file.get("filename")
    filename = filename if isinstance(filename, str) and filename else None
    if isinstance(data, str) and data:
        return FilePart(
            data=checked_file_data(data, f"{where}.file.file_data"), filename=filename, cache_control=marked
        )
    if isinstance(file_id, str) and file_id:
        return FilePart(file_id=file_id, filename=filename, cache_control=marked)
    raise InvalidRequestError(f"{where}.file: a file part needs file_data or a file_id", param="messages")


def checked_file_data(data: str, where: str, param: str = "messages") -> str:
    """``data`` if it is a ``data:<media type>;base64,<data>`` URL, as OpenAI's APIs take file data;
    another upstream is told the media type from it."""
    comma = data.find(",", 0, 261)
    header = data[5:comma].split(";") if data.startswith("data:") and comma > 0 else []
    if len(header) < 2 or not header[0].strip() or header[-1].strip().lower() != "base64":
        raise InvalidRequestError(
            f"{where}: file data must be a data URL, data:<media type>;base64,<data>", param=param
        )
    return data


def _internal_calls(tool_calls: Any, i: int) -> tuple[ToolCall, ...]:
    if not tool_calls:
        return ()
    if not isinstance(tool_calls, list):
        raise InvalidRequestError(f"messages[{i}]: tool_calls must be a list", param="messages")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(call.get("id"), str)
        ):
            raise InvalidRequestError(
                f"messages[{i}]: each tool call needs an id and a function name", param="messages"
            )
        arguments = function.get("arguments") or "{}"
        text = arguments if isinstance(arguments, str) else _encode(arguments).decode()
        calls.append(ToolCall(call["id"], function["name"], text))
    return tuple(calls)


def _internal_tools(body: dict[str, Any]) -> tuple[list[Tool], ToolChoice | None]:
    raw, choice = body.get("tools"), body.get("tool_choice")
    tools: list[Tool] = []
    if raw:
        if not isinstance(raw, list):
            raise InvalidRequestError("tools must be a list", param="tools")
        for tool in raw:
            function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                raise InvalidRequestError("only function tools with a name are supported", param="tools")
            parameters = function.get("parameters")
            description = function.get("description")
            tools.append(
                Tool(
                    function["name"],
                    parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}},
                    description if isinstance(description, str) else None,
                    tool["cache_control"] if isinstance(tool.get("cache_control"), dict) else None,
                    function["strict"] if isinstance(function.get("strict"), bool) else None,
                )
            )
    parallel = body.get("parallel_tool_calls") is not False
    if choice in ("auto", "required", "none"):
        return tools, ToolChoice(choice, None, parallel)
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return tools, ToolChoice("tool", function["name"], parallel)
    if choice is not None:  # allowed_tools, a custom tool, ...: another answer than no choice at all
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise InvalidRequestError(f"tool_choice {kind!r} cannot be sent to this upstream", param="tool_choice")
    return tools, None if parallel else ToolChoice("auto", None, False)


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise InvalidRequestError(f"{key} must be >= 1", param=key)
            return value
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _stop(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def _tool(tool: Tool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "function",
        "function": _drop_none(
            {"name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": tool.strict}
        ),
    }
    if tool.cache_control is not None:
        out["cache_control"] = tool.cache_control  # read by the Anthropic provider, removed for others
    return out


def _part(part: Part) -> dict[str, Any]:
    if isinstance(part, FilePart):
        return _file(part)
    if isinstance(part, ImagePart):
        image: dict[str, Any] = {"type": "image_url", "image_url": {"url": part.url}}
        if part.detail is not None:
            image["image_url"]["detail"] = part.detail
        if part.cache_control is not None:
            image["cache_control"] = part.cache_control
        return image
    if isinstance(part, ThinkingPart):
        return {"type": "thinking", "thinking": part.text, "signature": part.signature}
    if isinstance(part, RedactedThinkingPart):
        return {"type": "redacted_thinking", "data": part.data}
    if part.cache_control is not None:
        return {"type": "text", "text": part.text, "cache_control": part.cache_control}
    return {"type": "text", "text": part.text}


def _file(part: FilePart) -> dict[str, Any]:
    """A chat ``file`` part: OpenAI's chat API takes file data or an uploaded file's id, not a URL."""
    if part.url is not None:
        raise InvalidRequestError(
            "a file given by URL (file_url, or a document's url source) cannot be sent to a chat completions "
            "upstream: send the file's data inline, as file_data (a data: URL) or a document's base64 source",
            param="input",
        )
    file = _drop_none({"filename": part.filename, "file_data": part.data, "file_id": part.file_id})
    out: dict[str, Any] = {"type": "file", "file": file}
    if part.cache_control is not None:
        out["cache_control"] = part.cache_control
    return out


def _plain(part: Part) -> bool:
    return isinstance(part, TextPart) and part.cache_control is None


def _alternating(messages: Sequence[Message]) -> Sequence[Message]:
    """User turns in a row as one, as Anthropic's API reads them: several chat templates (Gemma,
    Mistral) refuse roles that do not alternate, so a request Anthropic takes would be a 400."""
    if not any(a.role == b.role == "user" for a, b in itertools.pairwise(messages)):
        return messages
    runs: list[tuple[Message, list[Part]]] = []  # parts gathered per run: linear in the turns
    for message in messages:
        last = runs[-1][0] if runs else None
        if last is not None and last.role == message.role == "user" and last.name == message.name:
            runs[-1][1].extend(message.parts)
        else:
            runs.append((message, list(message.parts)))
    return [
        first if len(parts) == len(first.parts) else msgspec.structs.replace(first, parts=tuple(parts))
        for first, parts in runs
    ]


def _message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text}
    out: dict[str, Any] = {"role": message.role}
    if not all(_plain(part) for part in message.parts):
        out["content"] = [_part(part) for part in message.parts]
    else:
        out["content"] = message.text if message.parts or not message.tool_calls else None
    if message.tool_calls:
        out["tool_calls"] = _tool_calls(message.tool_calls)
    if message.name is not None:
        out["name"] = message.name
    return out


def _tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]


def usage_body(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    cached_tokens: int | None = None,
    reasoning_tokens: int | None = None,
    cache_write_tokens: int = 0,
) -> dict[str, Any]:
    """OpenAI's usage object; the details only when given. ``cache_write_tokens``: prompt tokens
    written to the prompt cache (Anthropic's, dearer than the rest: t78), said when there were some."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if cache_write_tokens:
        usage["prompt_tokens_details"] = {
            **usage.get("prompt_tokens_details", {}),
            "cache_write_tokens": cache_write_tokens,
        }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


_USAGE_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})
_USAGE_DETAILS = {
    "prompt_tokens_details": frozenset({"cached_tokens", "audio_tokens", "cache_write_tokens"}),
    "completion_tokens_details": frozenset(
        {"reasoning_tokens", "audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens"}
    ),
}


def client_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """An upstream's usage object with only the fields OpenAI's defines (and the gateway's own
    ``cache_write_tokens``): what else it says, such as a router's ``cost``, is of the operator's
    account, not the tenant's (t159)."""
    kept = {name: value for name, value in usage.items() if name in _USAGE_COUNTS}
    for name, fields in _USAGE_DETAILS.items():
        if name in usage:
            details = usage[name]
            kept[name] = {k: v for k, v in details.items() if k in fields} if isinstance(details, dict) else details
    return kept


def completion_body(
    answer_id: str | None,
    created: int | None,
    model: str | None,
    message: dict[str, Any],
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    *,
    stop_reason: str | None = None,
    serving: dict[str, str] | None = None,
) -> bytes:
    """A one-choice ``chat.completion``; ``created`` defaults to now; ``stop_reason``: the stop
    string that ended it, named as vLLM names it; ``serving``: as in :func:`chunk_body`."""
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    if stop_reason is not None:
        choice["stop_reason"] = stop_reason
    body: dict[str, Any] = {
        "id": answer_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage
    if serving:
        body.update(serving)
    return _encode(body)


def chunk_body(
    chunk_id: str | None,
    created: int | None,
    model: str | None,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
    null_usage: bool = False,
    stop_reason: str | None = None,
    serving: dict[str, str] | None = None,
) -> bytes:
    """A ``chat.completion.chunk`` of the first choice; ``delta`` None: the usage chunk, with no choices.
    ``null_usage``: say ``"usage": null``, as OpenAI does on every other chunk of a stream that asked for usage;
    ``stop_reason``: as in :func:`completion_body`; ``serving``: ``system_fingerprint`` and
    ``service_tier``, as the upstream's chunks said them."""
    choices: list[dict[str, Any]] = []
    if delta is not None:
        choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        if stop_reason is not None:
            choices[0]["stop_reason"] = stop_reason
    body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if serving:
        body.update(serving)
    body["choices"] = choices
    if usage is not None or null_usage:
        body["usage"] = usage
    return _encode(body)


def usage_from(raw: Any) -> Usage:
    """OpenAI's usage object, cached-prompt and reasoning details included (zeros where it has none)."""
    return read_usage(raw) or Usage()


def read_usage(
    raw: Any, inputs: str = "prompt", outputs: str = "completion", *, service_tier: Any = None
) -> Usage | None:
    """OpenAI's usage object; None unless it says both token counts, as counts (then the gateway
    counts: a negative or boolean count is no count, and must not reach a bill or a metric).
    The Responses API names its counts ``input`` and ``output``: ``read_usage(raw, "input", "output")``.
    ``service_tier``: the answer's own field beside its usage, the tier that processed it."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = token_count(raw.get(f"{inputs}_tokens")), token_count(raw.get(f"{outputs}_tokens"))
    if prompt is None or completion is None:
        return None
    prompt_details, completion_details = raw.get(f"{inputs}_tokens_details"), raw.get(f"{outputs}_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        cached_input_tokens=min(prompt, token_count(prompt_details.get("cached_tokens")) or 0),
        reasoning_tokens=min(completion, token_count(completion_details.get("reasoning_tokens")) or 0),
        audio_input_tokens=min(prompt, token_count(prompt_details.get("audio_tokens")) or 0),
        audio_output_tokens=min(completion, token_count(completion_details.get("audio_tokens")) or 0),
        service_tier=tier_name(service_tier),
    )


_CHAT_FINISH: dict[FinishReason, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "model_context_window_exceeded": "length",
}


def chat_finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else _CHAT_FINISH[reason]


def _usage_of(usage: Usage) -> dict[str, Any]:
    """The internal usage on the wire, with its reasoning tokens, 0 too, as the gateway says a live
    stream's (a cache hit dropped them: t12; said none where there were none: t195)."""
    return usage_body(
        usage.input_tokens,
        usage.output_tokens,
        cached_tokens=usage.cached_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )


def completion_from_answer(answer: Answer, usage: Usage | None, *, serving: dict[str, str] | None = None) -> bytes:
    """The answer as a ``chat.completion`` (the reverse of :func:`answer_from_completion`);
    ``usage`` None: the upstream reported none, and the completion carries none; ``serving``: as
    in :func:`chunk_body`."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.refusal:
        message["refusal"] = answer.refusal
    if answer.thinking:
        message["reasoning_content"] = "".join(p.text for p in answer.thinking if isinstance(p, ThinkingPart))
        if any(not isinstance(p, ThinkingPart) or p.signature for p in answer.thinking):  # Anthropic's
            message["thinking_blocks"] = [_part(p) for p in answer.thinking]
    if answer.tool_calls:
        message["tool_calls"] = _tool_calls(answer.tool_calls)
    wire = None if usage is None else _usage_of(usage)
    return completion_body(
        answer.id or None,
        None,
        answer.model or None,
        message,
        answer.other_finish or chat_finish_reason(answer.finish_reason),
        wire,
        stop_reason=answer.stop_sequence,  # t53: a cached repeat, a Claude route's, lost it
        serving=serving,
    )


class ChunkDeltas:
    """One stream's deltas as its chunks' ``delta`` (the reverse of :class:`ChunkReader`).

    A thinking block's ``thinking_blocks`` entry has its ``index`` among the answer's blocks, as
    a tool call's has (the openai SDK's stream helper merges list entries by it), and a signed
    block's, which comes with its signature, has the text its ``reasoning_content`` deltas spelled
    out: entries kept as they came, or merged, are each block whole, to be sent back (t128: two
    blocks came with their texts only joined, and no ``index``, which the helper raised on).
    """

    __slots__ = ("_blocks", "_thought")

    def __init__(self) -> None:
        self._blocks = 0
        self._thought: list[str] = []
        """The text of the thinking since the last signed block."""

    def delta(self, delta: Delta) -> dict[str, Any] | None:
        """None for a delta a chunk does not carry (:class:`Finish` and :class:`UsageReport`
        go elsewhere in a chunk)."""
        if isinstance(delta, ThinkingDelta):
            self._thought.append(delta.text)
            return {"reasoning_content": delta.text}
        if isinstance(delta, ThinkingSignature):
            block = {"index": self._blocks, "type": "thinking", "thinking": "".join(self._thought),
                     "signature": delta.signature}  # fmt: skip
            self._thought.clear()
        elif isinstance(delta, RedactedThinking):
            block = {"index": self._blocks, "type": "redacted_thinking", "data": delta.data}
        else:
            return _chunk_delta(delta)
        self._blocks += 1
        return {"thinking_blocks": [block]}


def _chunk_delta(delta: Delta) -> dict[str, Any] | None:
    if isinstance(delta, TextDelta):
        return {"content": delta.text}
    if isinstance(delta, RefusalDelta):
        return {"refusal": delta.text}
    if isinstance(delta, ToolCallStart):
        function = {"name": delta.name, "arguments": ""}
        return {"tool_calls": [{"index": delta.index, "id": delta.id, "type": "function", "function": function}]}
    if isinstance(delta, ToolArgumentsDelta):
        return {"tool_calls": [{"index": delta.index, "function": {"arguments": delta.fragment}}]}
    return None


def answer_from_completion(body: dict[str, Any]) -> Answer:
    """The first choice of a chat completion."""
    choice = (body.get("choices") or [{}])[0]
    _, stop_sequence = _finish_of(choice)
    return answer_from_message(
        choice.get("message") or {},
        choice.get("finish_reason"),
        answer_id=str(body.get("id") or ""),
        model=str(body.get("model") or ""),
        usage=read_usage(body.get("usage"), service_tier=body.get("service_tier")) or Usage(),
        stop_sequence=stop_sequence,
    )


def answer_from_message(
    message: dict[str, Any],
    finish_reason: Any,
    *,
    answer_id: str = "",
    model: str = "",
    usage: Usage | None = None,
    stop_sequence: str | None = None,
) -> Answer:
    """A chat ``message`` (a completion's, or the one a finished stream's deltas add up to);
    ``finish_reason`` is the chat API's, or ``"stop_sequence"`` with the ``stop_sequence`` that
    ended it."""
    calls = [
        ToolCall(
            id=str(call.get("id") or _call_id(answer_id, index)),
            name=str((call.get("function") or {}).get("name") or ""),
            arguments=whole_arguments((call.get("function") or {}).get("arguments")),
        )
        for index, call in enumerate(message.get("tool_calls") or [])
    ]
    content, refusal = message.get("content"), message.get("refusal")
    return Answer(
        id=answer_id,
        model=model,
        thinking=_thinking(message),
        text=content if isinstance(content, str) else None,
        refusal=refusal if isinstance(refusal, str) and refusal else None,
        tool_calls=calls,
        finish_reason="stop_sequence" if stop_sequence else _FINISH.get(str(finish_reason)),
        other_finish=None if stop_sequence else _other_finish(finish_reason),
        stop_sequence=stop_sequence or None,
        usage=usage or Usage(),
    )


_REBUILT = {
    "completion": frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint",
                             "service_tier", "provider", "obfuscation", "prompt_filter_results", "x_groq"}),
    "choice": frozenset({"index", "message", "delta", "finish_reason", "stop_reason", "matched_stop",
                         "native_finish_reason", "content_filter_results"}),
    "message": frozenset({"role", "content", "tool_calls", "reasoning_content", "thinking_blocks"}),
}  # fmt: skip
"""The fields of a completion, a choice and a message (or a stream's chunk, choice and delta) that
a replay from the cache rebuilds or that tell about the serving, not the answer: ``provider`` and
``native_finish_reason`` (OpenRouter), ``obfuscation`` (OpenAI's stream padding), the content
filters' results (Azure OpenAI), ``x_groq`` (Groq's ids and timings). Any other with a value (a
refusal, logprobs, audio, annotations, Perplexity's ``citations``, OpenRouter's
``reasoning_details``, a field no one has named yet) keeps the answer out of the cache: a replay
would drop it."""


def beyond_the_answer(part: dict[str, Any], kind: str) -> bool:
    """Whether ``part`` (a ``completion``, ``choice`` or ``message``) holds something a replay from
    the cache would not give back."""
    known = _REBUILT[kind]
    return any(name not in known and value not in (None, "", [], {}, False) for name, value in part.items())


def storable_answer(body: dict[str, Any]) -> Answer | None:
    """The completion as the internal answer, when that holds all of it (one choice, nothing a
    replay would drop: see :data:`_REBUILT`); None otherwise."""
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict) or beyond_the_answer(body, "completion"):
        return None
    if beyond_the_answer(choice, "choice") or beyond_the_answer(message, "message"):
        return None
    return answer_from_completion(body)


def stream_from_answer(
    answer: Answer, created: int, include_usage: bool, *, serving: dict[str, str] | None = None
) -> list[bytes]:
    """A finished answer as the SSE events of a chat stream: the role, its deltas, the finish,
    the usage chunk when the client asked for it (``stream_options.include_usage``), ``[DONE]``;
    ``serving``: on every chunk, as in :func:`chunk_body`."""
    chunk_id, model = answer.id, answer.model

    def event(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> bytes:
        null_usage = include_usage and "usage" not in extra  # OpenAI's chunks say usage: null until the last
        return (
            b"data: "
            + chunk_body(
                chunk_id, created, model, delta, finish_reason, null_usage=null_usage, serving=serving, **extra
            )
            + b"\n\n"
        )

    deltas = list(deltas_of(answer))
    # OpenAI opens a tool call or a refusal with content null (t100: a cache hit's final message, as
    # the SDK's stream helper assembles it, said "" where the live one said None); the first chunk
    # decides, as in a live Claude stream (reasoning first: "", both ways)
    first = next((d for d in deltas if not isinstance(d, (Finish, UsageReport))), None)
    textless = isinstance(first, (ToolCallStart, RefusalDelta))
    events = [event({"role": "assistant", "content": None if textless else ""})]
    chunk_deltas = ChunkDeltas()
    for delta in deltas:
        if isinstance(delta, Finish):
            events.append(event({}, delta.other or chat_finish_reason(delta.reason), stop_reason=delta.stop_sequence))
        elif isinstance(delta, UsageReport):
            if include_usage:
                usage = delta.usage
                wire = _usage_of(usage)
                events.append(event(None, usage=wire))  # as a non-streamed replay's (completion_from_answer)
        else:
            events.append(event(chunk_deltas.delta(delta)))
    events.append(b"data: [DONE]\n\n")
    return events


def _thinking(message: dict[str, Any]) -> list[ThinkingPart | RedactedThinkingPart]:
    """Anthropic's blocks when the answer kept them, else an unsigned part for ``reasoning_content``."""
    parts: list[ThinkingPart | RedactedThinkingPart] = []
    for block in message.get("thinking_blocks") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking":
            parts.append(ThinkingPart(str(block.get("thinking") or ""), str(block.get("signature") or "")))
        elif block.get("type") == "redacted_thinking":
            parts.append(RedactedThinkingPart(str(block.get("data") or "")))
    reasoning = reasoning_of(message)
    if not parts and reasoning:
        parts.append(ThinkingPart(reasoning))
    return parts


def reasoning_of(message: dict[str, Any]) -> str | None:
    """A message's or delta's reasoning text: ``reasoning_content`` (vLLM until 0.10, DeepSeek,
    LiteLLM), else ``reasoning``, newer vLLM's name for it (some versions send both)."""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return reasoning if isinstance(reasoning, str) and reasoning else None


class ChunkReader:
    """Chat completion chunks (first choice) to deltas; tool calls keep their upstream index.

    A tool call starts once its name is whole, when its arguments begin or a later call comes
    (or the answer ends): some OpenAI-compatible servers send a call's id or arguments before its
    name, or its name in pieces, and a call started nameless stays nameless (the next turn would
    send it upstream so). Until then its id, name and arguments wait here, and so do the calls
    after it: calls start in the order they came, as the non-streamed answer lists them (t128).
    """

    __slots__ = ("_answer_id", "_numbering", "_started", "_waiting")

    def __init__(self) -> None:
        self._started: set[int] = set()
        self._waiting: dict[int, tuple[str, str, list[str]]] = {}
        self._answer_id = ""
        self._numbering = CallNumbering()

    def read(self, chunk: dict[str, Any]) -> list[Delta]:
        deltas: list[Delta] = []
        if not self._answer_id and isinstance(chunk.get("id"), str):
            self._answer_id = chunk["id"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = reasoning_of(delta)
            if reasoning:
                deltas.append(ThinkingDelta(reasoning))
            for block in delta.get("thinking_blocks") or []:
                if isinstance(block, dict) and block.get("type") == "redacted_thinking":
                    deltas.append(RedactedThinking(str(block.get("data") or "")))
                elif isinstance(block, dict) and block.get("signature"):
                    deltas.append(ThinkingSignature(str(block["signature"])))
            content = delta.get("content")
            if isinstance(content, str) and content:
                deltas.append(TextDelta(content))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                deltas.append(RefusalDelta(refusal))
            for call in delta.get("tool_calls") or []:
                self._read_call(call, deltas)
            reason, stop_sequence = _finish_of(choice)
            other = _other_finish(choice.get("finish_reason"))
            if reason is not None or other is not None:
                deltas.extend(self.flush())
                deltas.append(Finish(reason, stop_sequence, other))
        if chunk.get("usage"):
            deltas.append(UsageReport(usage_from(chunk["usage"])))
        return deltas

    def flush(self) -> list[Delta]:
        """The calls whose name never came, and those after them, started as they are (at the answer's end)."""
        deltas: list[Delta] = []
        for index in list(self._waiting):
            self._start(index, deltas)
        return deltas

    def _read_call(self, call: dict[str, Any], deltas: list[Delta]) -> None:
        index = self._numbering.index_of(call)
        function = call.get("function") or {}
        fragment = arguments_text(function.get("arguments")) or None
        if index in self._started:
            if fragment is not None:
                deltas.append(ToolArgumentsDelta(index, fragment))
            return
        call_id, name, arguments = self._waiting.get(index, ("", "", []))
        call_id = call_id or str(call.get("id") or "")
        name = grown_name(name, function.get("name"))
        if fragment is not None:
            arguments.append(fragment)
        self._waiting[index] = (call_id, name, arguments)
        self._release(deltas)

    def _release(self, deltas: list[Delta]) -> None:
        """Start the waiting calls whose names are whole, in order, up to the first that is not.
        A name is whole once its call's arguments begin, or once a later call has come (the
        upstream has moved on; a call with no arguments would otherwise hold the rest to the end)."""
        waiting = list(self._waiting.items())  # in the order the calls came: their indices' order
        for at, (index, (_, name, arguments)) in enumerate(waiting):
            if not name or not (arguments or at + 1 < len(waiting)):
                return
            self._start(index, deltas)

    def _start(self, index: int, deltas: list[Delta]) -> None:
        call_id, name, arguments = self._waiting.pop(index)
        self._started.add(index)
        deltas.append(ToolCallStart(index, call_id or _call_id(self._answer_id, index), name))
        if arguments:
            deltas.append(ToolArgumentsDelta(index, "".join(arguments)))


class CallNumbering:
    """The index each streamed tool call goes on under: dense from 0 in the order the calls first
    came (t58: a server numbering its calls 0, 2, or from 1, made the openai SDK's
    ``chat.completions.stream()`` raise IndexError), and a fresh one when the upstream reuses an
    index for another call (another id: some servers number every call 0, t40), which a client
    would otherwise merge with the call before it."""

    __slots__ = ("_at", "_count", "_ids")

    def __init__(self) -> None:
        self._at: dict[int, int] = {}
        """Each upstream index, and the index the call there now goes on under."""
        self._ids: dict[int, str] = {}
        """The upstream's id of the call at each index."""
        self._count = 0

    def index_of(self, call: dict[str, Any]) -> int:
        given = call.get("index", 0)
        upstream = given if isinstance(given, int) and not isinstance(given, bool) else 0
        index = self._at.get(upstream)
        given_id = call.get("id")
        call_id = given_id if isinstance(given_id, str) else ""
        if index is None or (call_id and self._ids.setdefault(index, call_id) != call_id):
            index = self._at[upstream] = self._count
            self._count += 1
            if call_id:
                self._ids[index] = call_id
        return index


class CallRelay:
    """A chat upstream's streamed tool calls rewritten, in place, into what OpenAI sends a chat
    client, which adds up each call's fields chunk by chunk: indices from :class:`CallNumbering`,
    an id of its own for each call (:func:`distinct_call_id`: vLLM may give parallel calls one
    ``call_0``, f230), arguments as JSON text (some compatible servers send the object: t48), an id or a name a
    server repeats whole in every chunk sent once (t58: the client read ``ff``; the other
    protocols' readers already took it once, :func:`grown_name`), and ``"{}"`` for a call that
    ended with no arguments (t58: the client read ``''``; OpenAI sends ``"{}"``, and a Claude
    upstream's input-less ``tool_use`` reads so too, t52)."""

    __slots__ = ("_argued", "_given", "_ids", "_names", "_numbering")

    def __init__(self) -> None:
        self._numbering = CallNumbering()
        self._ids: dict[int, str] = {}
        """Each call's id as the upstream gave it."""
        self._given: set[str] = set()
        """The ids given to the client: a call under one of them gets another (f230)."""
        self._names: dict[int, str] = {}
        self._argued: set[int] = set()

    def rewrite(self, call: dict[str, Any]) -> bool:
        """The call as the client should read it; whether anything changed."""
        index = self._numbering.index_of(call)
        changed = call.get("index") != index
        call["index"] = index
        call_id = call.get("id")
        if call_id and self._ids.get(index) == call_id:  # the call's id again
            del call["id"]
            changed = True
        elif isinstance(call_id, str) and call_id:
            self._ids[index] = call_id
            if (unique := distinct_call_id(call_id, self._given)) != call_id:
                call["id"], changed = unique, True
        function = call.get("function")
        if not isinstance(function, dict):
            self._names.setdefault(index, "")
            return changed
        name = self._names.get(index, "")
        self._names[index] = grown_name(name, function.get("name"))
        if name and function.get("name") == name:  # the whole name again
            del function["name"]
            changed = True
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):
            function["arguments"], changed = arguments_text(arguments), True
        if function.get("arguments"):
            self._argued.add(index)
        return changed

    def unargued(self) -> list[dict[str, Any]]:
        """At the finish: ``"{}"`` for each call that had no arguments (once)."""
        missing = [index for index in sorted(self._names) if index not in self._argued]
        self._argued.update(missing)
        return [{"index": index, "function": {"arguments": "{}"}} for index in missing]


def arguments_text(arguments: object) -> str:
    """A tool call's arguments as the JSON text OpenAI's API sends; some compatible servers send
    the object itself (t40: it became a Python repr, or was lost when streamed)."""
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, dict | list):
        return _encode(arguments).decode()
    return ""


def whole_arguments(arguments: object) -> str:
    """A finished tool call's arguments as OpenAI gives them: ``"{}"`` where a compatible server
    sent none, or empty ones (t58), as for a Claude upstream's input-less ``tool_use`` (t52)."""
    return arguments_text(arguments) or "{}"


def grown_name(name: str, piece: object) -> str:
    """A streamed tool call's name with one more chunk's ``name``: a piece of it (a server that
    streams the name too), or the whole name again (one that repeats it in every chunk)."""
    if not isinstance(piece, str) or not piece or piece == name:
        return name
    return name + piece


def _call_id(answer_id: str, index: int) -> str:
    """An id for a tool call the upstream named none (some OpenAI-compatible servers): unique
    across a conversation's answers where the answer has an id (Anthropic's API refuses a
    conversation whose tool_use ids repeat)."""
    return f"call_{answer_id}_{index}" if answer_id else f"call_{index}"


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
