"""A chat client's request body, checked at the edge.

The body is decoded once into plain values (sent on to OpenAI-compatible upstreams as
it came, unknown fields included) and checked against :class:`_ChatRequest`, the fields
whose type or range OpenAI's API defines; a mismatch becomes a 400 that names the
parameter, in OpenAI's words. :func:`gateway.protocols.openai_chat.read_chat_request`
then reads the checked body into the internal model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from gateway.errors import InvalidRequestError

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
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None


_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Decode and check a request body; returns it as plain values."""
    if not raw:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _check(body)
    return body


def _check(body: dict[str, Any]) -> None:
    try:
        msgspec.convert(body, _ChatRequest, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT.search(message)
        param = match.group(1) if match else None
        reason = message[: match.start()] if match else message
        raise InvalidRequestError(
            f"invalid parameter '{param}': {reason}" if param else f"invalid request: {reason}", param=param
        ) from None
