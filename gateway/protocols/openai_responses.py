"""OpenAI Responses (``POST /v1/responses``): requests in, response objects and stream events out.

A request's ``input`` (a string, or a list of items: messages, ``function_call`` and
``function_call_output``) becomes internal messages; ``instructions`` is a system
message put first (and, as in OpenAI's API, not carried into a later turn that names
this one as ``previous_response_id``: the caller prepends a stored turn's messages, which
never hold its instructions). Only ``function`` tools are accepted, alone or in a
``namespace`` tool (whose functions the upstream knows by joined names, :func:`joined_name`,
and whose calls come back with their own names and the namespace): a chat upstream
cannot run OpenAI's hosted tools (web search, file search, ...), so those are a 400
naming them. ``reasoning``, ``text.verbosity`` and ``top_logprobs`` have no chat
equivalent the gateway can promise and are named in ``Request.dropped``, as are input
``reasoning`` items (``input.reasoning``), ``include``
and any top-level field the decoding does not read; ``safety_identifier``, ``prompt_cache_key``
and ``service_tier`` go on as a chat client's do (in ``Request.extra``);
``truncation: "auto"`` is accepted and named as dropped (a chat upstream refuses a
conversation longer than its window rather than cut its oldest items).

The answer is a ``response`` object with ``message`` and ``function_call`` output items
(``output_text`` is not on the wire: SDKs compute it), or the stream of semantic events
OpenAI sends (``response.created`` ... ``response.completed``), each with its
``sequence_number``. An answer cut by ``max_output_tokens`` is ``incomplete``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
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
    RefusalDelta,
    Request,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    Tool,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    ToolChoice,
    Usage,
    UsageReport,
)
from gateway.errors import InvalidRequestError, ResponseNotFoundError
from gateway.pricing import PricedOptions
from gateway.protocols import openai_chat
from gateway.protocols.body import decode_body
from gateway.protocols.openai_fields import check_metadata, check_schema_name

__all__ = [
    "HostedToolUses",
    "ResponsesRequest",
    "StreamEncoder",
    "assistant_message",
    "decode_request",
    "finish_reason_of",
    "input_items",
    "item_count",
    "item_references",
    "joined_name",
    "new_id",
    "output_ids",
    "output_items",
    "own_name",
    "priced_options",
    "reference_id",
    "response_object",
    "response_of_item",
    "response_text",
    "to_request",
    "turn_item_ids",
    "usage_body",
    "usage_from_wire",
    "with_namespaces",
]

IdMaker = Callable[[str], str]
"""A fresh id with the given prefix (``resp``, ``msg``, ``fc``)."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


_OUTPUT_PREFIXES = frozenset({"msg", "fc", "rs"})
_HEX = re.compile(r"[0-9a-f]{32}[0-9a-f]+")


def output_ids(response_id: str) -> IdMaker:
    """The ids of a translated response's output items: its own id's digits, then the item's
    number, so that an ``item_reference`` to one is found by reading its response, the tenant's
    own (f234: the Vercel AI SDK's default sends them from its second step on)."""
    digits = response_id.partition("_")[2]
    numbers = itertools.count()
    return lambda prefix: f"{prefix}_{digits}{next(numbers):x}"


def response_of_item(item_id: str) -> str | None:
    """The id of the response whose output holds ``item_id`` (:func:`output_ids`); None for an id
    no translated response can have made."""
    prefix, _, rest = item_id.partition("_")
    if prefix not in _OUTPUT_PREFIXES or not _HEX.fullmatch(rest):
        return None
    return f"resp_{rest[:32]}"


class _Wire(msgspec.Struct, forbid_unknown_fields=False):
    pass


class _ResponsesRequest(_Wire):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None  # its minimum checked in OpenAI's words
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    metadata: dict[str, Any] | None = None  # its values' types checked in OpenAI's words
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """A decoded request: the internal request and what the response object repeats of it."""

    request: Request
    """Its ``messages`` are this request's input items only: no instructions, no earlier turns."""
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    echo: dict[str, Any] = msgspec.field(default_factory=dict)
    """The request's fields as the response object repeats them (tools, tool_choice, text, ...)."""
    response_format: dict[str, Any] | None = None
    """The chat ``response_format`` for ``text.format`` (json_schema with its name, or json_object)."""
    json_mode: bool = False
    """``text.format`` asks for a JSON object, whether or not the model is asked for one: OpenAI
    refuses it without the word "json" in the input (t182)."""
    item_ids: list[str | None] = msgspec.field(default_factory=list)
    """The ids the client gave ``request.messages``' items, in the order :func:`input_items` lists
    them (None: an item sent without one); a stored turn keeps them, as OpenAI's API does (f76)."""
    namespaces: dict[str, str] = msgspec.field(default_factory=dict)
    """The namespace of each function a ``namespace`` tool holds, by the name the upstream knows
    it by (:func:`joined_name`): a call to one is answered with the function's own name and its namespace."""


def decode_request(
    raw: bytes,
    *,
    json_object_ok: Callable[[str], bool] | None = None,
    passed_through: bool = False,
    translated_because: str | None = None,
    referenced: Mapping[str, dict[str, Any]] | None = None,
) -> ResponsesRequest:
    """``json_object_ok(model)``: whether the model can be asked for a JSON object (else
    ``text.format`` is named in ``dropped``); asked only when a request wants one.

    ``passed_through``: the request goes to a Responses upstream as it is, and this decoding
    only gives the gateway its view (text for counting, routing and the log): hosted and
    custom tools, input items and content parts a chat upstream could not take are left out
    of the view instead of refused, since the upstream will read them itself.
    ``translated_because``: why the request is translated rather than passed through, which a
    refusal of tools that only a Responses upstream runs says.
    ``referenced``: the items the input's ``item_reference`` items name (:func:`item_references`),
    by id, each read as if the client had sent it; one not there is OpenAI's 404. None: a
    reference is refused as an item of a type not supported (or, passed through, left to the upstream).
    """
    wire = decode_body(raw, _ResponsesRequest)
    if referenced is not None and isinstance(wire.input, list):
        wire.input = [_referenced_item(item, referenced) for item in wire.input]
    _check_max_output_tokens(wire.max_output_tokens, passed_through)
    if wire.metadata:
        check_metadata(wire.metadata)
    if wire.background:
        # Passed through too: the upstream answers "queued" with no usage and the answer comes to
        # a poll, which bills nothing, and past the tenant's budget (t38: $2.50 billed $0.00005).
        raise InvalidRequestError(
            "'background' is not supported by this gateway: a background response is paid for when it is "
            "polled, which the gateway does not bill; ask in the foreground (streamed, for a long answer)",
            param="background",
        )
    for name in ("conversation", "prompt"):
        if not passed_through and getattr(wire, name) not in (None, False):
            raise InvalidRequestError(f"'{name}' is not supported by this gateway", param=name)
    tools, echo_tools, namespaces = _tools(wire.tools or [], passed_through, translated_because)
    choice, echo_choice = _tool_choice(wire.tool_choice, wire.parallel_tool_calls)
    if not passed_through:
        _check_choice(choice, tools)
    text = wire.text or {}
    text_format, json_schema, response_format, dropped = _text_format(
        text.get("format"), lambda: json_object_ok is None or json_object_ok(wire.model)
    )
    messages, item_ids = _input(wire.input, passed_through)
    request = Request(
        model=wire.model,
        messages=messages,
        max_tokens=wire.max_output_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stream=bool(wire.stream),
        tools=tools,
        tool_choice=choice,
        user=wire.user,
        json_schema=json_schema,
        dropped=dropped,
        extra=_carried(wire),
    )
    for name, value in (wire.reasoning or {}).items():  # but an effort, carried as reasoning_effort
        if value is not None and (name != "effort" or not isinstance(value, str)):
            request.dropped.append(f"reasoning.{name}")  # a summary: a chat upstream gives none
    if text.get("verbosity") is not None:
        request.dropped.append("text.verbosity")
    if wire.top_logprobs:
        request.dropped.append("top_logprobs")
    if wire.include:
        request.dropped.append("include")  # extra output items only OpenAI's own upstream makes
    if not passed_through and _has_reasoning_item(wire.input):  # a chat upstream has no place for them (t138)
        request.dropped.append("input.reasoning")
    if wire.max_tool_calls is not None:
        request.dropped.append("max_tool_calls")
    if wire.truncation == "auto":  # a chat upstream refuses an overlong conversation: nothing is cut (t25)
        request.dropped.append("truncation")
    if not passed_through:  # a field this gateway does not read, or misspelt (t54: max_output_token, in silence)
        request.dropped.extend(_unread_fields(raw))
    else:
        request.unreadable = _unread_in_last_turn(wire.input)
    echo: dict[str, Any] = {
        "instructions": wire.instructions,
        "max_output_tokens": wire.max_output_tokens,
        "metadata": wire.metadata or {},
        "parallel_tool_calls": True if wire.parallel_tool_calls is None else wire.parallel_tool_calls,
        "previous_response_id": wire.previous_response_id,
        # what was done, as for truncation: a dropped setting is not echoed as if honoured (t38)
        "reasoning": {"effort": _effort(wire.reasoning), "summary": None},  # the edge: None where not sent
        "safety_identifier": wire.safety_identifier,
        "prompt_cache_key": wire.prompt_cache_key,
        "store": True if wire.store is None else wire.store,
        "temperature": wire.temperature,
        "text": {"format": text_format},
        "tool_choice": echo_choice,
        "tools": echo_tools,
        "top_p": wire.top_p,
        "truncation": "disabled",  # what was done
        "user": wire.user,
    }
    return ResponsesRequest(
        request=request,
        instructions=wire.instructions,
        previous_response_id=wire.previous_response_id,
        store=echo["store"],
        echo=echo,
        response_format=response_format,
        json_mode=isinstance(text.get("format"), dict) and text["format"].get("type") == "json_object",
        item_ids=item_ids,
        namespaces=namespaces,
    )


_MIN_OUTPUT_TOKENS = 16
"""OpenAI's least ``max_output_tokens``, which a chat upstream does not have (f201)."""


def _check_max_output_tokens(value: int | None, passed_through: bool) -> None:
    """A 400 in OpenAI's words for a ``max_output_tokens`` below its minimum (a chat upstream
    served and billed one); passed through, the upstream checks its own, and only one below 1
    is refused."""
    least = 1 if passed_through else _MIN_OUTPUT_TOKENS
    if value is not None and value < least:
        raise InvalidRequestError(
            f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= {least}, "
            f"but got {value} instead.",
            param="max_output_tokens",
            code="integer_below_min_value",
        )


_READ_FIELDS = frozenset(field.encode_name for field in msgspec.structs.fields(_ResponsesRequest))


def _unread_fields(raw: bytes) -> list[str]:
    """The body's top-level fields the decoding does not read (the body is a JSON object by now,
    but a field it skipped is read here first: t197, a name not UTF-8 was a 500)."""
    names = decode_body(raw, dict[str, msgspec.Raw])
    return sorted(name for name in names if name not in _READ_FIELDS)


def _carried(wire: _ResponsesRequest) -> dict[str, Any]:
    """The fields a chat request has with the same meaning, carried as a chat client's are (in
    ``extra``): a chat upstream is sent them, and one that is not names them as dropped (t48: the
    prompt-cache key went nowhere unnamed, and the safety identifier was lost beside ``user``).
    ``reasoning.effort`` is chat's ``reasoning_effort`` (t204: an agent's reasoning setting never
    reached a reasoning model served by vLLM)."""
    return {
        name: value
        for name, value in (
            ("safety_identifier", wire.safety_identifier),
            ("prompt_cache_key", wire.prompt_cache_key),
            ("service_tier", wire.service_tier),  # OpenAI's flex or priority processing, priced as such
            ("reasoning_effort", _effort(wire.reasoning)),
        )
        if value is not None
    }


def _effort(reasoning: dict[str, Any] | None) -> str | None:
    effort = reasoning.get("effort") if reasoning else None
    return effort if isinstance(effort, str) else None


# -- input items ------------------------------------------------------------------


def _input(raw: str | list[Any] | None, lenient: bool = False) -> tuple[list[Message], list[str | None]]:
    """The messages, and the ids their items are listed with (:attr:`ResponsesRequest.item_ids`)."""
    if raw is None:
        return [], []
    if isinstance(raw, str):
        return [Message("user", (TextPart(raw),))], [None]
    messages: list[Message] = []
    ids: list[str | None] = []
    pending: tuple[tuple[Part, ...], list[ToolCall], list[str | None]] | None = None
    """An assistant message that later ``function_call`` items attach their calls to, and the ids
    of its message item and its calls."""

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            parts, calls, own = pending
            messages.append(Message("assistant", parts, tuple(calls)))
            ids.extend(own if _text_listed(messages[-1]) else own[1:])  # no text beside calls: no message item
            pending = None

    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where}: an input item must be an object", param=where)
        if reference_id(item) is not None:  # resolved before, when the gateway keeps the items
            if lenient:
                continue
            raise InvalidRequestError(
                f"{where}.type: input items of type 'item_reference' are not supported", param=where
            )
        kind = item.get("type")
        if kind is None or kind == "message":
            role = item.get("role")
            parts = _content(item.get("content"), f"{where}.content", lenient)
            if role == "assistant":
                flush()
                pending = (parts, [], [_item_id(item, where, lenient)])
            elif role in ("user", "system", "developer"):
                flush()
                messages.append(Message("user" if role == "user" else "system", parts))
                ids.append(_item_id(item, where, lenient))
            else:
                raise InvalidRequestError(
                    f"{where}.role: expected 'user', 'assistant', 'system' or 'developer', got {role!r}",
                    param=f"{where}.role",
                )
        elif kind == "function_call":
            name, namespace = _string(item, "name", where), _namespace_of(item, where, lenient)
            call = ToolCall(
                _string(item, "call_id", where),
                name if namespace is None else joined_name(namespace, name),  # as the upstream called it
                _string(item, "arguments", where),
                namespace,
            )
            if pending is None:
                pending = ((), [], [None])
            pending[1].append(call)
            pending[2].append(_item_id(item, where, lenient))
        elif kind == "function_call_output":
            flush()
            call_id = _string(item, "call_id", where)
            # a list: text and images in order, as a tool's result holds them (t38: images and files were
            # a 400 also when passed through, which OpenAI's API takes; t128: texts were glued, images moved)
            output = _content(item.get("output"), f"{where}.output", lenient)
            messages.append(Message("tool", output, tool_call_id=call_id))
            ids.append(_item_id(item, where, lenient))
        elif kind == "reasoning" or lenient:
            continue  # the model's own reasoning (or, passed through, an item only the upstream reads)
        else:
            raise InvalidRequestError(f"{where}.type: input items of type {kind!r} are not supported", param=where)
    flush()
    return messages, ids


class _InputOnly(_Wire):
    input: str | list[Any] | None = None


def item_references(raw: bytes) -> list[str]:
    """The ids the body's ``item_reference`` input items name, each once: ``{"type": "item_reference",
    "id": ...}``, or an item with only an ``id`` (its ``type`` is optional in OpenAI's API)."""
    given = decode_body(raw, _InputOnly).input
    found = (reference_id(item) for item in given) if isinstance(given, list) else ()
    return list(dict.fromkeys(item_id for item_id in found if item_id is not None))


def reference_id(item: Any) -> str | None:
    """The id an input item references (None: it is no ``item_reference``)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "item_reference" or (kind is None and "role" not in item and "content" not in item):
        item_id = item.get("id")
        return item_id if isinstance(item_id, str) else None
    return None


def _referenced_item(item: Any, referenced: Mapping[str, dict[str, Any]]) -> Any:
    item_id = reference_id(item)
    if item_id is None:
        return item
    found = referenced.get(item_id)
    if found is None:  # OpenAI's words and status (a 404, param ``input``, no code)
        raise ResponseNotFoundError(f"Item with id '{item_id}' not found.", param="input")
    return found


def _has_reasoning_item(raw: str | list[Any] | None) -> bool:
    return isinstance(raw, list) and any(isinstance(item, dict) and item.get("type") == "reasoning" for item in raw)


def _item_id(item: dict[str, Any], where: str, lenient: bool) -> str | None:
    """The item's own id, which it keeps when listed (None: it came without one)."""
    value = item.get("id")
    if isinstance(value, str) and value:
        return value
    if value in (None, "") or lenient:
        return None
    raise InvalidRequestError(f"{where}.id: a non-empty string is required", param=f"{where}.id")


def _namespace_of(item: dict[str, Any], where: str, lenient: bool) -> str | None:
    """A ``function_call`` item's ``namespace`` (None: none, or ``null``)."""
    value = item.get("namespace")
    if value is None or (lenient and not isinstance(value, str)):
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{where}.namespace: a non-empty string is required", param=f"{where}.namespace")
    return value


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{name}: a string is required", param=f"{where}.{name}")
    return value


def _content(content: Any, where: str, lenient: bool = False) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (TextPart(content),)
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}: a string or a list of content parts is required", param=where)
    parts: list[Part] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append(TextPart(_string(part, "text", at)))
        elif kind == "refusal":
            parts.append(TextPart(_string(part, "refusal", at)))
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise InvalidRequestError(
                    f"{at}: an image needs an 'image_url' (an https or data: URL); file ids are not supported",
                    param=at,
                )
            detail = part.get("detail")
            parts.append(ImagePart(url, detail=detail if isinstance(detail, str) and detail != "auto" else None))
        elif kind == "input_file":
            file = _file_part(part, at, lenient)
            if file is not None:
                parts.append(file)
        elif not lenient:
            raise InvalidRequestError(f"{at}.type: content parts of type {kind!r} are not supported", param=at)
    return tuple(parts)


def _file_part(part: dict[str, Any], at: str, lenient: bool) -> FilePart | None:
    """An ``input_file``: its data (a data URL) or URL goes to any upstream that takes files; a
    ``file_id`` names a file in OpenAI's Files API, which only a passed-through request reaches."""
    filename = part.get("filename") if isinstance(part.get("filename"), str) and part.get("filename") else None
    data, url, file_id = (part.get(name) for name in ("file_data", "file_url", "file_id"))
    if isinstance(data, str) and data:
        return FilePart(
            data=data if lenient else openai_chat.checked_file_data(data, f"{at}.file_data", f"{at}.file_data"),
            filename=filename,
        )
    if isinstance(url, str) and url:
        if not lenient and not url.startswith(("https://", "http://")):
            raise InvalidRequestError(f"{at}.file_url: an http(s) URL is required", param=f"{at}.file_url")
        return FilePart(url=url, filename=filename)
    if isinstance(file_id, str) and file_id:
        if not lenient:
            raise InvalidRequestError(
                f"{at}.file_id: a file uploaded to OpenAI's Files API cannot be read by this route's model, "
                "which is not OpenAI's Responses API; send the file's content as file_data (a data URL)",
                param=f"{at}.file_id",
            )
        return FilePart(file_id=file_id, filename=filename)
    if lenient:
        return None  # the upstream reads it, and says what it misses
    raise InvalidRequestError(f"{at}: an input_file needs file_data, a file_url or a file_id", param=at)


_READ_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "input_image"})


def _unread_in_last_turn(given: Any) -> str | None:
    """What the last user message holds that the view of a passed-through request leaves out (an
    ``input_file``, ``input_audio``, an image by file id): the router cannot see what it asks (t64)."""
    if not isinstance(given, list):
        return None
    last = next(
        (i for i in range(len(given) - 1, -1, -1) if isinstance(given[i], dict) and given[i].get("role") == "user"),
        None,
    )
    content = None if last is None else given[last].get("content")
    if not isinstance(content, list):
        return None
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if (
            not isinstance(kind, str)
            or kind not in _READ_PARTS
            or (kind == "input_image" and not part.get("image_url"))
        ):
            return f"input[{last}].content[{index}]: a {kind!r} part the gateway does not read"
    return None


# -- tools and formats ------------------------------------------------------------

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _tools(
    raw: list[Any], lenient: bool = False, translated_because: str | None = None
) -> tuple[list[Tool], list[dict[str, Any]], dict[str, str]]:
    """The tools, as the upstream is sent them and as the response echoes them, and the
    namespace of each function a ``namespace`` tool holds, by the name the upstream knows it by
    (:func:`joined_name`)."""
    if lenient:
        raw = [tool for tool in raw if isinstance(tool, dict) and tool.get("type") == "function"]
    unsupported = [kind for tool in raw for kind in _unsupported_kinds(tool)]
    if unsupported:
        names = ", ".join(dict.fromkeys(unsupported))
        said = f"tools: tool type(s) {names} are not supported by this gateway; only 'function' tools are"
        if translated_because is not None:  # t138: other routes pass them through
            said = (
                f"tools: tool type(s) {names} are not supported here: {translated_because}, which takes only "
                "'function' tools; custom and hosted tools need a route whose every model declares responses_api"
            )
        raise InvalidRequestError(
            said,
            param="tools",
            code="unsupported_tool_type",
        )
    tools: list[Tool] = []
    echo: list[dict[str, Any]] = []
    namespaces: dict[str, str] = {}
    top_level = {tool.get("name") for tool in raw if tool.get("type") == "function"}
    for index, tool in enumerate(raw):
        if tool.get("type") == "namespace":
            functions, echoed = _namespace(tool, f"tools[{index}]", top_level, namespaces)
            tools += functions
            echo.append(echoed)
            continue
        if not lenient:  # as OpenAI checks it (t182); a passed-through request's, the upstream checks
            check_schema_name(tool.get("name"), f"tools[{index}].name")
        sent, echoed = _function(tool, f"tools[{index}]", _string(tool, "name", f"tools[{index}]"))
        tools.append(sent)
        echo.append(echoed)
    return tools, echo, namespaces


def _function(
    tool: dict[str, Any], where: str, name: str, *, sent_as: str | None = None, about: str | None = None
) -> tuple[Tool, dict[str, Any]]:
    """A ``function`` tool as the upstream is sent it (under ``sent_as``, its description after
    ``about`` where given) and as the response echoes it."""
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(f"{where}.parameters: a JSON schema object is required", param=f"{where}.parameters")
    description = tool.get("description") if isinstance(tool.get("description"), str) else None
    strict = tool["strict"] if isinstance(tool.get("strict"), bool) else None
    told = description if about is None else f"{about}\n\n{description}" if description else about
    echoed = {
        "type": "function",
        "name": name,
        "description": tool.get("description"),
        "parameters": parameters,
        "strict": bool(strict),  # what the chat upstream applies: strict only when asked
    }
    return Tool(sent_as or name, parameters or _EMPTY_PARAMETERS, told, strict=strict), echoed


def _unsupported_kinds(tool: Any) -> list[str]:
    """The tool's type, when a chat upstream cannot take it; a namespace's, its tools' that it cannot."""
    if not isinstance(tool, dict):
        return [repr(tool)]
    kind = tool.get("type")
    if kind == "function":
        return []
    if kind == "namespace":  # its tools are checked by :func:`_namespace`, their types here
        inner = tool.get("tools")
        return [
            str(each.get("type")) if isinstance(each, dict) else repr(each)
            for each in (inner if isinstance(inner, list) else ())
            if not isinstance(each, dict) or each.get("type") != "function"
        ]
    return [str(kind)]


_UPSTREAM_NAME_CHARS = 64
"""The longest function name OpenAI's chat API takes (``^[a-zA-Z0-9_-]{1,64}$``; Anthropic's rule is no stricter)."""


def joined_name(namespace: str, name: str) -> str:
    """The name a chat or Anthropic upstream knows function ``name`` of ``namespace`` by: it has
    no namespaces, and a name in its rules is a namespace's and a function's joined by ``__``."""
    return f"{namespace}__{name}"


def _namespace(
    tool: dict[str, Any], where: str, top_level: set[Any], namespaces: dict[str, str]
) -> tuple[list[Tool], dict[str, Any]]:
    """A ``namespace`` tool's functions as plain ones, each under its joined name and with the
    namespace's description before its own (Codex's ``multi_agent_v1``, f239); its echo."""
    check_schema_name(tool.get("name"), f"{where}.name")
    namespace: str = tool["name"]
    about = tool.get("description")
    inner = tool.get("tools")
    if not isinstance(inner, list):
        raise InvalidRequestError(f"{where}.tools: a list of function tools is required", param=f"{where}.tools")
    said = f"Namespace {namespace}" + (f": {about}" if isinstance(about, str) and about else "")
    tools: list[Tool] = []
    echo: list[dict[str, Any]] = []
    for index, function in enumerate(inner):
        at = f"{where}.tools[{index}]"
        check_schema_name(function.get("name"), f"{at}.name")
        name: str = function["name"]
        joined = joined_name(namespace, name)
        if len(joined) > _UPSTREAM_NAME_CHARS:
            raise InvalidRequestError(
                f"{at}.name: function '{name}' of namespace '{namespace}' is sent to this route's model as "
                f"'{joined}', longer than the {_UPSTREAM_NAME_CHARS} characters a function's name may have; "
                "shorten the namespace's or the function's name",
                param=f"{at}.name",
            )
        if joined in top_level or joined in namespaces:
            raise InvalidRequestError(
                f"{at}.name: function '{name}' of namespace '{namespace}' is sent to this route's model as "
                f"'{joined}', the name of another of the request's tools; rename one of them",
                param=f"{at}.name",
            )
        namespaces[joined] = namespace
        sent, echoed = _function(function, at, name, sent_as=joined, about=said)
        tools.append(sent)
        echo.append(echoed)
    return tools, {"type": "namespace", "name": namespace, "description": about, "tools": echo}


def _tool_choice(
    raw: str | dict[str, Any] | None, parallel: bool | None
) -> tuple[ToolChoice | None, str | dict[str, Any]]:
    allow_parallel = parallel is not False
    if raw is None:
        return (None if allow_parallel else ToolChoice("auto", None, False)), "auto"
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise InvalidRequestError(
                f"tool_choice: expected 'auto', 'none', 'required' or a function, got {raw!r}", param="tool_choice"
            )
        return ToolChoice(raw, None, allow_parallel), raw  # type: ignore[arg-type]
    if raw.get("type") != "function" or not isinstance(raw.get("name"), str):
        raise InvalidRequestError(
            "tool_choice: only 'auto', 'none', 'required' or {'type': 'function', 'name': ...} are supported",
            param="tool_choice",
        )
    return ToolChoice("tool", raw["name"], allow_parallel), {"type": "function", "name": raw["name"]}


def _check_choice(choice: ToolChoice | None, tools: list[Tool]) -> None:
    """What OpenAI refuses: a call required of no tools, or of a function the request does not define."""
    if choice is None:
        return
    if choice.mode == "required" and not tools:
        raise InvalidRequestError("tool_choice: 'required' needs at least one tool in 'tools'", param="tool_choice")
    if choice.mode == "tool" and choice.name not in {tool.name for tool in tools}:
        raise InvalidRequestError(
            f"tool_choice: function '{choice.name}' is not one of the request's tools", param="tool_choice"
        )


def _text_format(
    raw: Any, json_object_ok: Callable[[], bool]
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """The echoed format, the JSON schema, the chat ``response_format`` and what is dropped."""
    if raw is None or (isinstance(raw, dict) and raw.get("type") == "text"):
        return {"type": "text"}, None, None, []
    if not isinstance(raw, dict):
        raise InvalidRequestError("text.format: an object is required", param="text.format")
    kind = raw.get("type")
    if kind == "json_object":
        if not json_object_ok():  # what the model got is echoed, as a dropped top_p is (t84)
            return {"type": "text"}, None, None, ["text.format"]
        return {"type": "json_object"}, None, {"type": "json_object"}, []
    if kind != "json_schema":
        raise InvalidRequestError(
            f"text.format.type: expected 'text', 'json_schema' or 'json_object', got {kind!r}",
            param="text.format.type",
        )
    schema, name = raw.get("schema"), raw.get("name")
    if not isinstance(schema, dict):
        raise InvalidRequestError("text.format.schema: a JSON schema object is required", param="text.format.schema")
    check_schema_name(name, "text.format.name")
    spec: dict[str, Any] = {"name": name, "schema": schema}
    if isinstance(raw.get("description"), str):
        spec["description"] = raw["description"]
    if isinstance(raw.get("strict"), bool):
        spec["strict"] = raw["strict"]
    echo = {"type": "json_schema", **spec, "strict": spec.get("strict", False)}
    return echo, schema, {"type": "json_schema", "json_schema": spec}, []


def to_request(decoded: ResponsesRequest, history: Sequence[Message] = (), *, upstream_keeps: bool = False) -> Request:
    """The whole request: the instructions, then the earlier turns' messages, then this input;
    the chat ``response_format`` (a JSON schema's name and ``strict``, or JSON mode) in ``extra``.

    ``upstream_keeps``: the conversation is the upstream's (a passed-through request continues
    what it keeps): it is not checked here, the upstream checks it."""
    messages = list(history) + decoded.request.messages
    if not messages:
        raise InvalidRequestError("input: at least one input item is required", param="input")
    if not upstream_keeps:
        _refuse_unpaired_calls(messages)
        if decoded.json_mode:
            _refuse_json_mode_unsaid(messages)
    if decoded.instructions:
        messages.insert(0, Message("system", (TextPart(decoded.instructions),)))
    extra = decoded.request.extra
    if decoded.response_format is not None:
        extra = {**extra, "response_format": decoded.response_format}
    return msgspec.structs.replace(decoded.request, messages=messages, extra=extra)


def _refuse_unpaired_calls(messages: Sequence[Message]) -> None:
    """A ``function_call_output`` must answer a ``function_call`` of the conversation, and each
    call be answered by an output after it (in this input, for a stored turn's call: the Codex
    loop), as OpenAI's API requires (f92: one answering no call went upstream as a tool message
    that a chat upstream may take, or refuse with an error about messages the client never sent;
    t182: a call left unanswered was served and billed)."""
    called = {call.id for message in messages for call in message.tool_calls}
    for message in messages:
        if message.role == "tool" and message.tool_call_id not in called:
            raise InvalidRequestError(
                f"No tool call found for function call output with call_id {message.tool_call_id}.", param="input"
            )
    _refuse_ambiguous_pairs(messages)
    answered: set[str | None] = set()
    unanswered: str | None = None  # the first in the conversation's order
    for message in reversed(messages):
        if message.role == "tool":
            answered.add(message.tool_call_id)
        for call in reversed(message.tool_calls):
            if call.id not in answered:
                unanswered = call.id
    if unanswered is not None:
        raise InvalidRequestError(f"No tool output found for function call {unanswered}.", param="input")


_ONE_OUTPUT_EACH = "Each function_call must have exactly one matching function_call_output"


def _refuse_ambiguous_pairs(messages: Sequence[Message]) -> None:
    """A ``call_id`` called again before an output answered it, or answered twice, as OpenAI's API
    refuses a second output ("Duplicate function_call_output for call_id ..."): the output could
    answer either call, and a chat upstream was sent both (f222). An id called again once answered
    starts a new pair, as upstreams that number their calls per turn (``call_0``) reuse it."""
    waiting: set[str | None] = set()
    answered: set[str | None] = set()
    for message in messages:
        for call in message.tool_calls:
            if call.id in waiting:
                raise InvalidRequestError(
                    f"Duplicate function_call for call_id '{call.id}'. {_ONE_OUTPUT_EACH}", param="input"
                )
            waiting.add(call.id)
            answered.discard(call.id)
        if message.role != "tool":
            continue
        if message.tool_call_id in answered:
            raise InvalidRequestError(
                f"Duplicate function_call_output for call_id '{message.tool_call_id}'. {_ONE_OUTPUT_EACH}",
                param="input",
            )
        if message.tool_call_id in waiting:
            waiting.discard(message.tool_call_id)
            answered.add(message.tool_call_id)


def _refuse_json_mode_unsaid(messages: Sequence[Message]) -> None:
    """JSON mode needs the word "json" in the conversation's messages (not ``instructions``), as
    OpenAI refuses it otherwise: the model may write whitespace until the token limit, billed (t182).
    A stored turn's input counts too."""
    for message in messages:
        if any(isinstance(part, TextPart) and "json" in part.text.lower() for part in message.parts):
            return
    raise InvalidRequestError(
        "Response input messages must contain the word 'json' in some form to use 'text.format' of type 'json_object'.",
        param="text.format",
    )


# -- the answer -------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def usage_from_wire(raw: Any, service_tier: Any = None) -> Usage | None:
    """A Responses ``usage`` object as read from an upstream; None when it is not one.
    ``service_tier``: the response's own field, the tier that processed it."""
    return openai_chat.read_usage(raw, "input", "output", service_tier=service_tier)


def response_text(response: Any) -> str:
    """The text of a response object's message items (what the gateway counts when usage is missing)."""
    texts: list[str] = []
    output = response.get("output") if isinstance(response, dict) else None
    for item in output if isinstance(output, list) else ():
        content = item.get("content") if isinstance(item, dict) and item.get("type") == "message" else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "".join(texts)


def finish_reason_of(response: dict[str, Any]) -> FinishReason | None:
    """A finished response object's outcome in chat terms (what the request log records)."""
    status = response.get("status")
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    if status != "completed":
        return None
    output = response.get("output")
    calls = isinstance(output, list) and any(
        isinstance(item, dict) and str(item.get("type")).endswith("_call") for item in output
    )
    return "tool_calls" if calls else "stop"


# -- what OpenAI bills above the token prices (a request passed through) -----------------

_WEB_SEARCH = re.compile(r"web_search(_preview)?(_\d{4}_\d{2}_\d{2})?")
_BILLED_CALLS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
}
"""The output items of OpenAI's hosted tools it bills per use, by the tool's name in ``price.server_tools``."""


def priced_options(body: dict[str, Any]) -> PricedOptions:
    """What a request passed through to a Responses upstream asks for that OpenAI bills above the
    token prices (t159): its hosted tools billed per use (web search, file search, code
    interpreter, image generation: an image per call), each with the most calls
    ``max_tool_calls`` allows (1 when unset, for the budget estimate), and an ``input_audio``
    part anywhere in its input."""
    tools, limit = body.get("tools"), body.get("max_tool_calls")
    uses = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 1
    server_tools: dict[str, int] = {}
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in ("file_search", "code_interpreter", "image_generation"):
            server_tools[kind] = uses
        elif isinstance(kind, str) and _WEB_SEARCH.fullmatch(kind):
            server_tools["web_search"] = uses
    given = body.get("input")
    heard = isinstance(given, list) and any(_holds_audio(item) for item in given)
    return PricedOptions(server_tools=server_tools, audio_input="input" if heard else None)


def _holds_audio(item: object) -> bool:
    """An input item (a message's ``content``, a tool result's ``output``) with an ``input_audio`` part."""
    if not isinstance(item, dict):
        return False
    return any(
        isinstance(parts, list) and any(isinstance(part, dict) and part.get("type") == "input_audio" for part in parts)
        for parts in (item.get("content"), item.get("output"))
    )


class HostedToolUses:
    """The hosted tools' uses an answer's output items show, as OpenAI bills them: a web or file
    search per call, the code interpreter per container (its session) however many runs it
    holds (t159). An item is counted once by its place in the output, read from a stream's
    ``response.output_item.done`` and again from its final response (f176: by its id, one the
    final response listed without was counted twice)."""

    __slots__ = ("_units",)

    def __init__(self) -> None:
        self._units: dict[str, set[str]] = {}

    def add(self, item: Any, index: Any) -> bool:
        """Count ``item`` (at ``output_index`` ``index``); whether it is a billed tool's."""
        kind = item.get("type") if isinstance(item, dict) else None
        name = _BILLED_CALLS.get(kind) if isinstance(kind, str) else None
        if name is None:
            return False
        own = item.get("id")
        unit = f"#{index}" if isinstance(index, int) or not isinstance(own, str) else own
        container = item.get("container_id")
        if name == "code_interpreter" and isinstance(container, str):
            unit = container
        self._units.setdefault(name, set()).add(unit)
        return True

    def add_output(self, output: Any) -> bool:
        """Count a response's ``output`` items; whether any is a billed tool's."""
        counted = False
        for index, item in enumerate(output if isinstance(output, list) else ()):
            counted = self.add(item, index) or counted
        return counted

    def uses(self) -> dict[str, int]:
        return {name: len(units) for name, units in self._units.items()}


_INCOMPLETE: dict[FinishReason, str] = {
    "length": "max_output_tokens",
    "model_context_window_exceeded": "max_output_tokens",
    "content_filter": "content_filter",
}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _refusal_item(item_id: str, refusal: str, status: str) -> dict[str, Any]:
    """The model declined: OpenAI's message whose content is a refusal (``responses.parse``
    tells it from text, which it would try to parse)."""
    content = [{"type": "refusal", "refusal": refusal}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """The model's reasoning as vLLM's Responses API gives it: the text itself (no summary)."""
    content = [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    item = {"type": "function_call", "id": item_id, "call_id": call.id, "name": own_name(call)}
    if call.namespace is not None:
        item["namespace"] = call.namespace
    return {**item, "arguments": call.arguments, "status": status}


def own_name(call: ToolCall) -> str:
    """The name the client knows a call's function by: a namespaced one's, without its namespace."""
    if call.namespace is None:
        return call.name
    return call.name.removeprefix(joined_name(call.namespace, ""))


def with_namespaces(answer: Answer, decoded: ResponsesRequest) -> Answer:
    """The answer with each call to a function of a ``namespace`` tool naming its namespace."""
    if not decoded.namespaces or not any(call.name in decoded.namespaces for call in answer.tool_calls):
        return answer
    calls = [msgspec.structs.replace(call, namespace=decoded.namespaces.get(call.name)) for call in answer.tool_calls]
    return msgspec.structs.replace(answer, tool_calls=calls)


def output_items(answer: Answer, make_id: IdMaker = new_id) -> list[dict[str, Any]]:
    """A reasoning item (when the model showed its reasoning), a message item (when there is
    text, or nothing else), a message item with the refusal (when the model declined), then a
    function_call item per call."""
    status = "incomplete" if answer.finish_reason in _INCOMPLETE else "completed"
    items: list[dict[str, Any]] = []
    reasoning = "".join(part.text for part in answer.thinking if isinstance(part, ThinkingPart))
    if reasoning:
        items.append(_reasoning_item(make_id("rs"), reasoning, "completed"))
    if answer.text or not (answer.tool_calls or answer.refusal):
        items.append(_message_item(make_id("msg"), answer.text or "", "completed"))
    if answer.refusal:
        items.append(_refusal_item(make_id("msg"), answer.refusal, "completed"))
    items += [_call_item(make_id("fc"), call, "completed") for call in answer.tool_calls]
    items[-1]["status"] = status  # a cut answer's last item is what the cut broke: its text, or a call's arguments
    return items


def input_items(
    messages: Sequence[Message], turns: Sequence[tuple[str, int]], ids: Sequence[str | None] = ()
) -> list[dict[str, Any]]:
    """What ``GET /v1/responses/{id}/input_items`` lists: the conversation a response answered
    (earlier turns' inputs and answers, then its own input), oldest first, as Responses items;
    the system role stands for ``developer`` too, which the internal model does not tell apart.

    Each item has its id from ``ids``, in order: the one it was sent with or answered with, which
    it keeps from turn to turn, as in OpenAI's API (f76: a client that rebuilt a conversation from
    ``output`` and ``input_items`` got every item twice). One with none (a turn stored before the
    ids were kept), or one already listed (a client may send an id twice), has an id derived from
    the turn that stored it and its place there (``turns``: each turn's id and how many items it
    added, oldest first): the same from one read to the next, for ``after`` pages by it, and in
    every later turn's list (t167: one derived from the listed response's id changed each turn)."""
    items = [item for message in messages for item in _items_of(message)]
    places = [(turn_id, place) for turn_id, count in turns for place in range(count)]
    listed: set[str] = set()
    for index, item in enumerate(items):
        item_id = ids[index] if index < len(ids) else None
        if item_id is None or item_id in listed:
            turn_id, place = places[index]
            digest = hashlib.blake2b(f"{turn_id}:{place}".encode(), digest_size=16).hexdigest()
            item_id = f"{_PREFIXES[item['type']]}_{digest}"
        listed.add(item_id)
        item["id"] = item_id
    return items


def item_count(messages: Sequence[Message]) -> int:
    """How many items :func:`input_items` lists for ``messages``."""
    return sum(len(_items_of(message)) for message in messages)


def turn_item_ids(decoded: ResponsesRequest, answer: Message, output: Sequence[dict[str, Any]]) -> list[str]:
    """The ids a stored turn keeps for its items (its input, then ``answer``), in the order
    :func:`input_items` lists them: an input item's own (a new one for an item sent without
    one), and for the answer, those its items have in ``output``, the response's (reasoning, which
    is not carried on, is not listed)."""
    given: list[str | None] = [*decoded.item_ids, *_answer_ids(answer, output)]
    items = [item for message in [*decoded.request.messages, answer] for item in _items_of(message)]
    return [
        (given[place] if place < len(given) else None) or new_id(_PREFIXES[item["type"]])
        for place, item in enumerate(items)
    ]


def _answer_ids(answer: Message, output: Sequence[dict[str, Any]]) -> list[str | None]:
    """The ids of ``output``'s items that ``answer``'s listed items stand for: its first message
    item (a refusal beside text is listed in the same message) and its calls, in order."""
    own = {kind: [item.get("id") for item in output if item.get("type") == kind] for kind in _PREFIXES}
    ids: list[str | None] = []
    for item in _items_of(answer):
        found = own[item["type"]]
        item_id = found.pop(0) if found else None
        ids.append(item_id if isinstance(item_id, str) else None)
    return ids


_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
"""The prefix of an id the gateway makes, by the type of the item."""


def _items_of(message: Message) -> list[dict[str, Any]]:
    """The items ``message`` is listed as (an assistant's text and each of its calls are one), with no id yet."""
    if message.role == "tool":
        return [{"type": "function_call_output", "id": "", "call_id": message.tool_call_id or "",
                 "output": message.text, "status": "completed"}]  # fmt: skip
    if message.role == "assistant":
        calls = [_call_item("", call, "completed") for call in message.tool_calls]
        return [_message_item("", message.text, "completed"), *calls] if _text_listed(message) else calls
    content: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "input_text", "text": part.text})
        elif isinstance(part, ImagePart):
            content.append({"type": "input_image", "image_url": part.url, "detail": part.detail or "auto"})
        elif isinstance(part, FilePart):
            fields = {"file_data": part.data, "file_url": part.url, "file_id": part.file_id, "filename": part.filename}
            content.append({"type": "input_file", **{k: v for k, v in fields.items() if v is not None}})
    return [{"type": "message", "id": "", "role": message.role, "content": content, "status": "completed"}]


def _text_listed(message: Message) -> bool:
    """Whether an assistant message is listed with a message item: not when it is calls alone."""
    return bool(message.parts) or not message.tool_calls


def assistant_message(answer: Answer) -> Message:
    """The answer as the assistant turn of the conversation (what a later turn continues; a
    refusal is what the model said, as a refusal part of an input message reads)."""
    parts = tuple(TextPart(text) for text in (answer.text, answer.refusal) if text)
    return Message("assistant", parts, tuple(answer.tool_calls))


def response_object(
    decoded: ResponsesRequest,
    response_id: str,
    created_at: int,
    *,
    output: list[dict[str, Any]],
    usage: Usage | None,
    finish_reason: FinishReason | None = None,
    status: Literal["in_progress", "completed", "incomplete", "failed"] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object; ``status`` defaults to completed or incomplete by the finish reason."""
    reason = _INCOMPLETE.get(finish_reason) if finish_reason is not None else None
    if status is None:
        status = "incomplete" if reason is not None else "completed"
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": reason} if status == "incomplete" else None,
        "model": decoded.request.model,
        "output": output,
        **decoded.echo,
        # the tier the upstream says processed it, which the bill uses, as OpenAI's object says it (t68)
        "service_tier": usage.service_tier if usage is not None else None,
        "usage": usage_body(usage) if usage is not None else None,
    }
    if status == "completed":
        body["completed_at"] = int(time.time())
    return body


# -- streams ----------------------------------------------------------------------


class _Item:
    __slots__ = ("arguments", "call_id", "id", "index", "kind", "name", "namespace", "text")

    def __init__(
        self, kind: str, item_id: str, index: int, call_id: str = "", name: str = "", namespace: str | None = None
    ) -> None:
        self.kind, self.id, self.index = kind, item_id, index
        self.call_id, self.name, self.namespace = call_id, name, namespace
        self.text = ""
        self.arguments = ""

    def body(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return _message_item(self.id, self.text, status)
        if self.kind == "refusal":
            return _refusal_item(self.id, self.text, status)
        if self.kind == "reasoning":
            return _reasoning_item(self.id, self.text, status)
        return _call_item(self.id, self.call(), status)

    def call(self) -> ToolCall:
        return ToolCall(self.call_id, self.name, self.arguments, self.namespace)


class StreamEncoder:
    """Deltas to OpenAI's Responses events, ``response.created`` first and ``response.completed`` last.

    A reasoning item (the model's reasoning, as vLLM's Responses API shows it) or a message
    item (text) closes when the next item starts. A function call item closes when the next
    call starts with its arguments whole, as OpenAI streams them; calls whose arguments are still
    to come stay open together until the answer ends (or text follows them): vLLM announces
    parallel calls first and then interleaves their arguments, and each delta names its item. An answer with no
    output at all still ends with an (empty) message item.
    """

    __slots__ = (
        "_calls",
        "_created_at",
        "_decoded",
        "_finish",
        "_items",
        "_make_id",
        "_open",
        "_open_calls",
        "_response_id",
        "_sequence",
        "_usage",
        "response",
    )

    def __init__(self, decoded: ResponsesRequest, response_id: str, created_at: int, make_id: IdMaker = new_id) -> None:
        self._decoded = decoded
        self._response_id = response_id
        self._created_at = created_at
        self._make_id = make_id
        self._sequence = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        """The open reasoning or message item."""
        self._open_calls: list[_Item] = []
        self._calls: dict[int, _Item] = {}
        """Function call items by the upstream's tool call index."""
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None
        self.response: dict[str, Any] | None = None
        """The final response object, once :meth:`finish` has run."""

    def start(self) -> bytes:
        response = self._response("in_progress", [], None)
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def feed(self, deltas: list[Delta]) -> bytes:
        out = b""
        for delta in deltas:
            if isinstance(delta, ThinkingDelta):
                out += self._text_into("reasoning", self._begin_reasoning, "response.reasoning_text.delta", delta.text)
            elif isinstance(delta, TextDelta):
                out += self._text_into(
                    "message", self._begin_message, "response.output_text.delta", delta.text, logprobs=[]
                )
            elif isinstance(delta, RefusalDelta):
                out += self._text_into("refusal", self._begin_refusal, "response.refusal.delta", delta.text)
            elif isinstance(delta, ToolCallStart):
                out += self._close() + self._close_whole_calls()
                namespace = self._decoded.namespaces.get(delta.name)
                item = _Item("function_call", self._make_id("fc"), len(self._items), delta.id, delta.name, namespace)
                self._items.append(item)
                self._calls[delta.index] = item
                self._open_calls.append(item)
                out += self._event(
                    "response.output_item.added", {"output_index": item.index, "item": item.body("in_progress")}
                )
            elif isinstance(delta, ToolArgumentsDelta):
                call = self._calls.get(delta.index)
                if call is None:
                    continue
                call.arguments += delta.fragment  # a closed call's too: response.completed has them all
                if call in self._open_calls:
                    out += self._event(
                        "response.function_call_arguments.delta", {**self._where(call), "delta": delta.fragment}
                    )
            elif isinstance(delta, Finish):
                self._finish = delta.reason
            elif isinstance(delta, UsageReport):
                self._usage = delta.usage
        return out

    def finish(self) -> bytes:
        """The open item's closing events, then ``response.completed`` (``response.incomplete`` if cut)."""
        return self.close_items() + self.completed()

    def close_items(self) -> bytes:
        """The open item's closing events; :attr:`response` is the finished response after it."""
        out = b""
        if all(item.kind == "reasoning" for item in self._items):  # as a whole answer: a message, if empty
            out += self._close() + self._begin_message()
        out += self._close() + self._close_calls()
        self.response = self._response(None, [item.body(self._status_of(item)) for item in self._items], self._usage)
        return out

    def completed(self) -> bytes:
        """``response.completed`` (``response.incomplete`` if cut), of :attr:`response` as it is now."""
        assert self.response is not None
        name = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        return self._event(name, {"response": self.response})

    def fail(self, message: str, code: str = "server_error") -> bytes:
        """The stream broke after it began: ``response.failed`` with what was output so far, and no
        usage: an upstream's count so far (Anthropic's ``message_start``) is not what is billed."""
        cut = [self._open, *self._open_calls]
        output = [item.body("incomplete" if item in cut else "completed") for item in self._items]
        response = self._response("failed", output, None, error={"code": code, "message": message})
        response["store"] = False  # the gateway keeps completed turns only: a lookup would be a 404
        return self._event("response.failed", {"response": response})

    def answer(self) -> Answer:
        """What was streamed, as an answer (the text, the calls, the finish reason and usage)."""
        texts = [item.text for item in self._items if item.kind == "message"]
        refusals = [item.text for item in self._items if item.kind == "refusal"]
        calls = [item.call() for item in self._items if item.kind == "function_call"]
        return Answer(
            id=self._response_id,
            model=self._decoded.request.model,
            text="".join(texts) or None,
            refusal="".join(refusals) or None,
            tool_calls=calls,
            finish_reason=self._finish,
            usage=self._usage or Usage(),
        )

    def _status_of(self, item: _Item) -> str:
        """A cut answer's last item is the one the cut broke (a call's arguments too, which an
        agent must not run as if whole)."""
        cut = self._finish in _INCOMPLETE and item is self._items[-1] and item.kind != "reasoning"
        return "incomplete" if cut else "completed"

    def _response(
        self,
        status: Literal["in_progress", "failed"] | None,
        output: list[dict[str, Any]],
        usage: Usage | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self._decoded,
            self._response_id,
            self._created_at,
            output=output,
            usage=usage,
            finish_reason=self._finish,
            status=status,
            error=error,
        )

    def _begin_message(self) -> bytes:
        item = _Item("message", self._make_id("msg"), len(self._items))
        self._items.append(item)
        self._open = item
        part = {"type": "output_text", "text": "", "annotations": []}
        return self._event(
            "response.output_item.added",
            {"output_index": item.index, "item": {**item.body("in_progress"), "content": []}},
        ) + self._event("response.content_part.added", {**self._where(item), "content_index": 0, "part": part})

    def _begin_refusal(self) -> bytes:
        item = _Item("refusal", self._make_id("msg"), len(self._items))
        self._items.append(item)
        self._open = item
        return self._event(
            "response.output_item.added",
            {"output_index": item.index, "item": {**item.body("in_progress"), "content": []}},
        ) + self._event(
            "response.content_part.added",
            {**self._where(item), "content_index": 0, "part": {"type": "refusal", "refusal": ""}},
        )

    def _text_into(self, kind: str, begin: Callable[[], bytes], event: str, text: str, **extra: Any) -> bytes:
        """``text`` added to the open item of ``kind`` (begun first, when another one is open)."""
        out = (
            b"" if self._open is not None and self._open.kind == kind else self._close_calls() + self._close() + begin()
        )
        assert self._open is not None
        self._open.text += text
        return out + self._event(event, {**self._where(self._open), "content_index": 0, "delta": text, **extra})

    def _begin_reasoning(self) -> bytes:
        item = _Item("reasoning", self._make_id("rs"), len(self._items))
        self._items.append(item)
        self._open = item
        return self._event(
            "response.output_item.added",
            {"output_index": item.index, "item": {**item.body("in_progress"), "content": []}},
        ) + self._event(
            "response.content_part.added",
            {**self._where(item), "content_index": 0, "part": {"type": "reasoning_text", "text": ""}},
        )

    def _close_whole_calls(self) -> bytes:
        """Close the open calls whose arguments are already whole JSON, when the next call starts:
        OpenAI streams calls one after another and closes each before the next (t84: Codex runs a
        call on its ``output_item.done``, so it waited for the whole turn). A call announced with
        its arguments still to come (vLLM's parallel calls) stays open."""
        whole = [call for call in self._open_calls if _whole_json(call.arguments)]
        if not whole:
            return b""
        self._open_calls = [call for call in self._open_calls if call not in whole]
        return b"".join(self._closed(call) for call in whole)

    def _close_calls(self) -> bytes:
        calls, self._open_calls = self._open_calls, []
        return b"".join(self._closed(call) for call in calls)

    def _close(self) -> bytes:
        item, self._open = self._open, None
        return b"" if item is None else self._closed(item)

    def _closed(self, item: _Item) -> bytes:
        """An item's closing events."""
        where = self._where(item)
        if item.kind == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": item.text}
            out = self._event(
                "response.reasoning_text.done", {**where, "content_index": 0, "text": item.text}
            ) + self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
        elif item.kind == "message":
            part = {"type": "output_text", "text": item.text, "annotations": []}
            out = self._event(
                "response.output_text.done", {**where, "content_index": 0, "text": item.text, "logprobs": []}
            ) + self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
        elif item.kind == "refusal":
            part = {"type": "refusal", "refusal": item.text}
            out = self._event(
                "response.refusal.done", {**where, "content_index": 0, "refusal": item.text}
            ) + self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
        else:
            out = self._event(
                "response.function_call_arguments.done",
                {**where, "name": own_name(item.call()), "arguments": item.arguments},
            )
        return out + self._event(
            "response.output_item.done", {"output_index": item.index, "item": item.body(self._status_of(item))}
        )

    @staticmethod
    def _where(item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index}

    def _event(self, name: str, payload: dict[str, Any]) -> bytes:
        data = {"type": name, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _whole_json(text: str) -> bool:
    try:
        msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return True
