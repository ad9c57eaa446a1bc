"""Decoding a request body into a typed view, with one set of messages for what can go wrong."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from gateway.errors import InvalidRequestError

__all__ = [
    "LARGE_BODY_BYTES",
    "check_fields",
    "decode_body",
    "named_model",
    "read_off_loop",
    "refuse_choice_without_tools",
    "refuse_options_without_stream",
]

T = TypeVar("T")

LARGE_BODY_BYTES = 256 << 10
"""A body this large is read into the internal model off the event loop (:func:`read_off_loop`)."""

_LARGE_BODIES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="large-body")
"""One thread for them all: each thread holds the interpreter in turns with the event loop,
which waits a switch interval (5 ms) for each; ten such threads at once left it waiting ten."""


async def read_off_loop(raw: bytes, read: Callable[[], T]) -> T:
    """``read()``, in the large-body thread when ``raw`` is large: a body of 100,000 short messages
    takes ~0.4 s to decode and read, and ten at once held every other request of the process,
    ``/healthz`` too, for 3 s (t51)."""
    if len(raw) < LARGE_BODY_BYTES:
        return read()
    return await asyncio.get_running_loop().run_in_executor(_LARGE_BODIES, read)


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?$")


def decode_body(raw: bytes, into: type[T]) -> T:
    """``raw`` as ``into``; a 400 that says why (empty, not JSON, too deep, or the field that is wrong)."""
    if not raw:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.match(message)
        if unknown:
            name = f"{unknown[2]}.{unknown[1]}" if unknown[2] else unknown[1]  # one in an object: its path
            raise InvalidRequestError(f"unknown parameter '{name}'", param=name) from None
        if " - at `$" not in message and not _MISSING.match(message):  # the body itself: every view is an object
            raise InvalidRequestError(f"the request body must be a JSON object ({message})") from None
        if " - at `$[...]" in message:  # a map's value (a number out of range): msgspec does not say which
            raise _value_error(message, raw) from None
        raise _field_error(message, into) from None
    except msgspec.DecodeError as exc:
        raise _not_json(str(exc), raw) from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None


class _Named(msgspec.Struct):
    model: Any = None


def named_model(raw: bytes) -> str | None:
    """The ``model`` a body names as a string (every model API's field), whatever else is wrong with
    the body; None where it is no JSON object naming one."""
    try:
        model = msgspec.json.decode(raw, type=_Named).model
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return model if isinstance(model, str) else None


_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _not_json(reason: str, raw: bytes) -> InvalidRequestError:
    """The 400 for a body that is not JSON: msgspec's ``reason``, but for a lone UTF-16 surrogate
    escape, which it calls truncated (t67)."""
    if "truncated" in reason:
        lone = _LONE_SURROGATE.search(raw)
        if lone is not None:
            reason = f"{lone[0].decode()} is half of a UTF-16 surrogate pair, which JSON text cannot hold alone"
    return InvalidRequestError(f"the request body is not valid JSON: {reason}")


def check_fields(body: dict[str, Any], view: type[T]) -> T:
    """A decoded body read as ``view``, strictly; a 400 that names the parameter that is wrong."""
    try:
        return msgspec.convert(body, view, strict=True)
    except msgspec.ValidationError as exc:
        raise _field_error(str(exc), view) from None


_CONTAINER = dict[str, msgspec.Raw] | list[msgspec.Raw]
_POSITION = re.compile(r" \(byte \d+\)$")
_PATH_DEPTH = 16
"""How deep the failing value is looked for: each level reads what is under it again."""


def _value_error(message: str, raw: bytes) -> InvalidRequestError:
    """A 400 naming the parameter whose value a body decoded as a map failed on, found in the
    body refused, so a valid one is parsed once (t126: chat's was ``param: null``)."""
    try:
        path = _failing_path(raw).removeprefix(".")
    except RecursionError:
        path = ""
    except msgspec.DecodeError as exc:  # not JSON further on (t197: a 500); the position is in a part read again
        return _not_json(_POSITION.sub("", str(exc)), raw)
    if not path:
        return _field_error(message)
    reason = message[: message.index(" - at `$")]
    return InvalidRequestError(f"invalid parameter '{path}': {reason}", param=path)


def _failing_path(raw: bytes, depth: int = _PATH_DEPTH) -> str:
    """The path (``.messages[0].temperature``) to the value in ``raw`` that fails to decode, its
    first ``depth`` steps."""
    if depth == 0:
        return ""
    try:
        container = msgspec.json.decode(raw, type=_CONTAINER)
    except msgspec.ValidationError:  # the value itself
        return ""
    steps = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in steps:
        try:
            msgspec.json.decode(value)
        except msgspec.ValidationError:
            return (f".{key}" if isinstance(key, str) else f"[{key}]") + _failing_path(value, depth - 1)
    return ""


def _field_error(message: str, into: Any = None) -> InvalidRequestError:
    """msgspec's validation message as a 400 that names the parameter, as OpenAI's do; a value
    outside a set of them (``into``'s ``Literal`` there) with the values taken."""
    missing = _MISSING.match(message)
    if missing:
        return InvalidRequestError(f"{missing.group(1)}: Field required", param=missing.group(1))
    match = _AT.search(message)
    param = (match.group(1).replace("[...]", "") if match else "") or None  # a map's value: the map is the parameter
    reason = message[: match.start()] if match else message
    if into is not None and match and reason.startswith("Invalid enum value"):
        taken = _values_at(msgspec.inspect.type_info(into), _STEP.findall(match.group(1)))
        if taken:  # t200: feedback's label without the two it takes
            reason += f"; expected one of {', '.join(repr(value) for value in dict.fromkeys(taken))}"
    return InvalidRequestError(
        f"invalid parameter '{param}': {reason}" if param else f"invalid request: {reason}", param=param
    )


_STEP = re.compile(r"\[[^\]]*\]|[^.\[]+")
"""A step of a msgspec path: a field's name, or an index (``[0]``, a map's ``[...]``)."""


def _values_at(info: msgspec.inspect.Type, steps: list[str]) -> list[object]:
    """The values the ``Literal`` (or ``Enum``) at ``steps`` into a type allows; [] where none is."""
    inspect = msgspec.inspect
    if isinstance(info, inspect.UnionType):
        return [value for member in info.types for value in _values_at(member, steps)]
    if not steps:
        if isinstance(info, inspect.LiteralType):
            return list(info.values)
        return [member.value for member in info.cls] if isinstance(info, inspect.EnumType) else []
    step, rest = steps[0], steps[1:]
    if step.startswith("["):
        if isinstance(info, inspect.ListType | inspect.VarTupleType | inspect.SetType | inspect.FrozenSetType):
            return _values_at(info.item_type, rest)
        return _values_at(info.value_type, rest) if isinstance(info, inspect.DictType) else []
    if isinstance(info, inspect.StructType | inspect.TypedDictType | inspect.DataclassType):
        field = next((field for field in info.fields if field.encode_name == step), None)
        return [] if field is None else _values_at(field.type, rest)
    return _values_at(info.value_type, rest) if isinstance(info, inspect.DictType) else []


def refuse_choice_without_tools(choice: object, tools: object, message: str) -> None:
    """A 400 for a ``tool_choice`` other than ``"none"`` without ``tools`` (``[]`` is none), as
    OpenAI, vLLM and Anthropic answer it; ``message`` in the words of the API asked."""
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequestError(message, param="tool_choice")


def refuse_options_without_stream(stream: object, options: object) -> None:
    """A 400 for ``stream_options`` on a request that does not stream, in OpenAI's words, as
    OpenAI and vLLM answer it (t112); ``null`` is no options."""
    if options is not None and stream is not True:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
