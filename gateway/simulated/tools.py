"""When the simulator calls a tool, which one, and with what arguments (OpenAI and Anthropic alike).

The heuristic for ``auto`` (OpenAI ``tool_choice`` absent or ``"auto"``, Anthropic
``{"type": "auto"}``), applied to the text of the last user turn, case-insensitively:

1. the prompt names a tool (``get_weather``, or ``get weather`` / ``getWeather`` spelled
   as words) → that tool; several named and parallel calls allowed → each of them;
2. else a word of the prompt is a distinctive part of a tool's name (``weather`` for
   ``get_current_weather``; generic parts such as get/list/search/current don't count)
   → the tool with the most such words;
3. else the prompt asks for a tool in so many words (``use the tool``, ``call``,
   ``invoke``, ``look up``, ``lookup``) → the tool whose name and description share the
   most words with the prompt, or the first tool;
4. else no call: a text answer.

``required`` / ``any`` calls the tool the heuristic picks, or the first; a named tool
is always that tool; ``none`` never calls. When the conversation ends with a tool
result, ``auto`` answers in text (the caller decides that before asking here).

Arguments are generated from the tool's JSON schema by :class:`SchemaValues`, with the
prompt as the source of values; a root object gets its required properties and those
the prompt mentions.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.simulated.schema_values import SchemaValues

__all__ = ["Tool", "arguments_json", "call_id", "choose_tools"]

_GENERIC = frozenset(
    [
        "get",
        "set",
        "list",
        "find",
        "fetch",
        "search",
        "lookup",
        "look",
        "query",
        "current",
        "create",
        "update",
        "delete",
        "remove",
        "make",
        "do",
        "run",
        "tool",
        "tools",
        "function",
        "call",
        "data",
        "info",
        "the",
        "and",
        "for",
        "with",
        "from",
        "into",
        "by",
        "of",
        "to",
        "on",
        "in",
        "at",
        "a",
        "an",
        "is",
    ]
)
_ASK = re.compile(
    r"\b(?:use (?:the|a|an|your|this|that) (?:\w+ )?(?:tool|function)|use tools?|call|invoke|look(?:s|ing)? (?:it |that |this )?up|lookup)\b"
)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Tool:
    """A callable function tool: its name, description and arguments schema."""

    name: str
    description: str
    schema: Mapping[str, Any]


def call_id(prefix: str) -> str:
    """``call_<24 hex>`` (OpenAI) or ``toolu_<24 hex>`` (Anthropic)."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _name_words(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return _WORD.findall(spaced.lower())


def _names_in(tool: Tool, lower: str) -> bool:
    words = _name_words(tool.name)
    spellings = {tool.name.lower(), " ".join(words)}
    return any(s and re.search(rf"(?<![\w]){re.escape(s)}(?![\w])", lower) for s in spellings)


def _prompt_words(lower: str) -> set[str]:
    words = set(_WORD.findall(lower))
    return words | {w[:-1] for w in words if len(w) > 3 and w.endswith("s")}


def choose_tools(tools: list[Tool], prompt: str, mode: str, *, forced: str | None, parallel: bool) -> list[Tool]:
    """The tools to call (empty: answer in text).

    ``mode`` is ``auto``, ``required`` or ``none``; ``forced`` names the one tool to call.
    """
    if not tools or mode == "none":
        return []
    if forced is not None:
        return [t for t in tools if t.name == forced][:1]
    lower = prompt.lower()
    named = [t for t in tools if _names_in(t, lower)]
    if named:
        return named if parallel else named[:1]
    words = _prompt_words(lower)
    best: tuple[int, Tool] | None = None
    for tool in tools:
        hits = sum(1 for w in _name_words(tool.name) if len(w) >= 3 and w not in _GENERIC and w in words)
        if hits and (best is None or hits > best[0]):
            best = (hits, tool)
    if best is not None:
        return [best[1]]
    if _ASK.search(lower) or mode == "required":
        scored = max(tools, key=lambda t: _overlap(t, words))
        return [scored if _overlap(scored, words) > 0 else tools[0]]
    return []


def _overlap(tool: Tool, words: set[str]) -> int:
    mine = set(_name_words(tool.name)) | set(_WORD.findall(tool.description.lower()))
    return len((mine - _GENERIC) & words)


def arguments_json(tool: Tool, prompt: str) -> str:
    """The arguments as a compact JSON object string, as models emit them."""
    value = SchemaValues(tool.schema, prompt).value(only_mentioned=True)
    if not isinstance(value, dict):  # a schema that is not an object: arguments are always one
        value = {}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
