"""The fields OpenAI's chat, completions and Responses APIs share, with the ranges and limits OpenAI sets."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from gateway.errors import InvalidRequestError

__all__ = [
    "BestOf",
    "ChoiceCount",
    "MaxTokens",
    "Penalty",
    "Stop",
    "Temperature",
    "TopP",
    "check_metadata",
    "check_schema_name",
    "json_type",
]

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=128)]
BestOf = Annotated[int, msgspec.Meta(ge=1, le=20)]
"""OpenAI's legacy range. Only 1 is taken: an upstream's usage counts the one sequence it returns."""
Stop = str | list[str]
"""Any number of strings: OpenAI's API takes 4 and says so itself; vLLM and Anthropic take more."""
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]

_METADATA_PAIRS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512


def check_metadata(metadata: dict[str, Any]) -> None:
    """A 400 for ``metadata`` past OpenAI's limits (16 pairs, keys of at most 64 characters, values
    of at most 512), with OpenAI's param and message (no code, as for the other ranges the edge
    checks): a chat upstream does not check them, and a Responses turn stored and echoed them (t147).
    A value not a string is refused first, as OpenAI's schema does, in its words and code (t159)."""
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidRequestError(
                f"Invalid type for 'metadata.{key}': expected a string, but got {json_type(value)} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
    if len(metadata) > _METADATA_PAIRS:
        raise InvalidRequestError(
            f"Invalid 'metadata': too many properties. Expected an object with at most {_METADATA_PAIRS} "
            f"properties, but got an object with {len(metadata)} properties instead.",
            param="metadata",
        )
    for key, value in metadata.items():
        if len(key) > _METADATA_KEY_CHARS:
            raise InvalidRequestError(
                f"Invalid property name in 'metadata': '{key}' is too long. Expected a string with maximum "
                f"length {_METADATA_KEY_CHARS}, but got a string with length {len(key)} instead.",
                param=f"metadata.{key}",
            )
        if len(value) > _METADATA_VALUE_CHARS:
            raise InvalidRequestError(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                f"{_METADATA_VALUE_CHARS}, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
            )


_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_SCHEMA_NAME_CHARS = 64


def check_schema_name(name: object, param: str) -> None:
    """A 400 for a JSON schema's ``name`` (Responses' ``text.format.name``, chat's
    ``response_format.json_schema.name``) or a chat tool's ``function.name`` (t179) that OpenAI
    refuses, in its words and code: a chat upstream may take it, and an OpenAI one refused it only
    after the request was routed (t167).
    ``None``: the name is missing (t169)."""
    if name is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if not isinstance(name, str):
        raise InvalidRequestError(
            f"Invalid type for '{param}': expected a string, but got {json_type(name)} instead.",
            param=param,
            code="invalid_type",
        )
    if len(name) > _SCHEMA_NAME_CHARS:
        raise InvalidRequestError(
            f"Invalid '{param}': string too long. Expected a string with maximum length {_SCHEMA_NAME_CHARS}, "
            f"but got a string with length {len(name)} instead.",
            param=param,
            code="string_above_max_length",
        )
    if not _SCHEMA_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
            "'^[a-zA-Z0-9_-]+$'.",
            param=param,
            code="invalid_value",
        )


def json_type(value: object) -> str:
    """A decoded JSON value's type as OpenAI's messages name it, with its article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
