"""A chat client's request body, checked at the edge.

The body is decoded once into plain values (sent on to OpenAI-compatible upstreams as
it came, unknown fields included) and checked against :class:`_ChatRequest`, the fields
whose type or range OpenAI's API defines; a mismatch becomes a 400 that names the
parameter, in OpenAI's words. :func:`gateway.protocols.openai_chat.read_chat_request`
then reads the checked body into the internal model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.errors import InvalidRequestError
from gateway.protocols.body import (
    check_fields,
    decode_body,
    refuse_choice_without_tools,
    refuse_options_without_stream,
)
from gateway.protocols.openai_fields import (
    BestOf,
    ChoiceCount,
    MaxTokens,
    Penalty,
    Stop,
    Temperature,
    TopP,
    check_metadata,
    check_schema_name,
)
from gateway.protocols.shared_state import refuse_upstream_ids

__all__ = ["parse_chat_request"]

_Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _View(msgspec.Struct, forbid_unknown_fields=False):
    pass


class _ContentPart(_View):
    """Any part type is accepted and forwarded; a ``text`` part must carry a string."""

    type: str
    text: str | None = None

    def __post_init__(self) -> None:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a string 'text'")


class _Message(_View):
    role: _Role
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _StreamOptions(_View):
    include_usage: bool = False


class _ChatRequest(_View):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: ChoiceCount | None = None
    best_of: BestOf | None = None
    stop: Stop | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    metadata: dict[str, Any] | None = None  # its values' types checked in OpenAI's words


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Decode and check a request body; returns it as plain values."""
    body = decode_body(raw, dict[str, Any])
    checked = check_fields(body, _ChatRequest)
    if checked.metadata:
        check_metadata(checked.metadata)
    if "stream" in body and body["stream"] is None:  # not streamed, as OpenAI reads it; some servers refuse null
        del body["stream"]
    refuse_options_without_stream(body.get("stream"), body.get("stream_options"))
    _check_tool_choice(body)
    _check_tool_names(checked.tools)
    _check_tool_answers(checked.messages)
    _check_schema_name(body.get("response_format"))
    _check_json_mode(body.get("response_format"), checked.messages)
    _refuse_best_of(body.get("best_of"))
    refuse_upstream_ids(body, raw)  # a ``file`` part's file_id names a file under the operator's key (t33)
    return body


def _refuse_best_of(best_of: int | None) -> None:
    """vLLM's ``best_of`` (OpenAI's chat API has none) generates that many sequences, and its usage
    counts the one returned: neither the estimate nor the bill would hold the rest (t150), so it
    is refused as on ``/v1/completions``."""
    if best_of is not None and best_of > 1:
        raise InvalidRequestError("invalid parameter 'best_of': best_of > 1 is not supported", param="best_of")


def _check_schema_name(response_format: Any) -> None:
    """A JSON schema's name as OpenAI checks it, as on Responses (``text.format.name``)."""
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict):
            check_schema_name(spec.get("name"), "response_format.json_schema.name")


def _check_json_mode(response_format: Any, messages: list[_Message]) -> None:
    """JSON mode needs the word "json" in the messages, as OpenAI refuses it otherwise: the model
    may write whitespace until ``max_tokens``, billed (t179)."""
    if not (isinstance(response_format, dict) and response_format.get("type") == "json_object"):
        return
    for message in messages:
        content = message.content
        texts = [content] if isinstance(content, str) else [part.text or "" for part in content or ()]
        if any("json" in text.lower() for text in texts):
            return
    raise InvalidRequestError(
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
        param="messages",
    )


def _check_tool_names(tools: list[dict[str, Any]] | None) -> None:
    """A function tool's name as OpenAI checks it, as a JSON schema's (t179)."""
    for i, tool in enumerate(tools or ()):
        function = tool.get("function")
        if isinstance(function, dict):
            check_schema_name(function.get("name"), f"tools[{i}].function.name")


def _check_tool_answers(messages: list[_Message]) -> None:
    """Each ``tool`` message answers a call of the assistant message just before it, once, and each
    call is answered before the next other message, as OpenAI refuses it otherwise: an agent's history
    trimming that split a call from its answer is told so, not answered (t179), as is one that kept
    two answers to a call (f202). The legacy ``function`` role is not checked, as before."""
    calls: dict[str, int | None] = {}  # the calls of the assistant message at ``asked``, each its answer's index
    pending = 0
    asked = 0
    for i, message in enumerate(messages):
        if message.role == "tool":
            call_id = message.tool_call_id
            if call_id is None:
                raise InvalidRequestError(
                    f"Missing required parameter: 'messages.[{i}].tool_call_id'.",
                    param=f"messages.[{i}].tool_call_id",
                    code="missing_required_parameter",
                )
            if call_id not in calls:
                raise InvalidRequestError(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
                    "with 'tool_calls'.",  # sic, OpenAI's words
                    param=f"messages.[{i}].role",
                )
            answered = calls[call_id]
            if answered is not None:
                raise InvalidRequestError(
                    f"Invalid parameter: Duplicate value for 'tool_call_id' of '{call_id}', in messages[{answered}] "
                    f"and messages[{i}].",
                    param=f"messages.[{i}].tool_call_id",
                )
            calls[call_id] = i
            pending -= 1
        elif pending:
            break
        elif message.tool_calls:
            calls = {call["id"]: None for call in message.tool_calls if isinstance(call.get("id"), str)}
            pending = len(calls)
            asked = i
        elif calls:
            calls = {}  # a tool message after this one answers no call
    if pending:
        raise InvalidRequestError(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: "
            f"{', '.join(call_id for call_id, answered in calls.items() if answered is None)}",
            param=f"messages.[{asked}].role",
        )


def _check_tool_choice(body: dict[str, Any]) -> None:
    """A ``tool_choice`` without ``tools`` is a 400, as OpenAI and vLLM answer it: an Anthropic
    upstream is sent no choice without tools, and answered it with text (t78). ``none`` asks for
    nothing a request without tools does not get (vLLM takes it). ``tools: []`` is no tools (t80:
    ``required`` with it was answered with text on a Claude route; OpenAI refuses an empty list)."""
    refuse_choice_without_tools(
        body.get("tool_choice"),
        body.get("tools"),
        "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
    )
    if body.get("parallel_tool_calls") is not None and not body.get("tools"):  # null: not set (t179)
        raise InvalidRequestError(
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are "
            "specified.",
            param="parallel_tool_calls",
        )
