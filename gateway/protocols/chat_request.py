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
    _check_schema_name(body.get("response_format"))
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
