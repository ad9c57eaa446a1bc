"""Ids of what an upstream keeps under the operator's key, which a client's request must not name.

Every tenant's requests go upstream under one key: an id of a file, a vector store, a container,
a conversation or a stored item reaches whatever any tenant made there (the gateway serves
none of the APIs that make them, so no tenant made its own through it). Such a request is
refused with a 400 that names where the id is, wherever in the body it sits (t26, t33: the
places an API names them keep growing: a screenshot's ``file_id``, a mask's, a container
upload's, files of a container, a document nested in a document). What a model answered and
the client tells back (assistant turns, Responses output items) is passed: the ids in it are the
upstream's own answer to this conversation, and refusing them broke ordinary follow-up turns.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequestError

__all__ = ["refuse_upstream_ids"]

_ID_FIELDS = frozenset({"file_id", "file_ids", "vector_store_ids"})
"""Fields whose value names upstream state wherever they appear."""
_DEPTH = 64
_CLIENT_DATA = frozenset(
    {"parameters", "input_schema", "schema", "json_schema", "properties", "$defs", "definitions", "metadata",
     "arguments", "headers", "guided_json", "structured_outputs", "response_format", "annotations"}
)  # fmt: skip
"""Fields whose value is the client's own data, not a reference to upstream state: a tool's
schema may well have a parameter called ``file_id``, an MCP server a header called ``container``."""
_TOOL_CALLS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
"""Blocks whose ``input`` is what a model passed to a tool (the client's data too)."""


def refuse_upstream_ids(body: dict[str, Any], raw: bytes, *, dotted: bool = False) -> None:
    """Raise a 400 when ``body`` (decoded from ``raw``) names upstream state by id; ``dotted``: the
    error names the place as Anthropic's errors do (``messages.0.content``), else as OpenAI's
    (``input[0].content``)."""
    if not (b"file_id" in raw or b"vector_store_ids" in raw or b"container" in raw or b"\\u" in raw):
        return  # none of what names state, nor a JSON escape that could spell it (a generator: 2x the time)
    turns = {name: value for name, value in body.items() if name in ("messages", "input") and isinstance(value, list)}
    where = _named_state({name: value for name, value in body.items() if name not in turns}, "", 0, dotted)
    for name, conversation in turns.items():  # in turns a model answered, told back, only what a client writes
        for index, turn in enumerate(conversation):
            if where is None:
                at = _at(name, index, dotted)
                where = _client_parts(turn, at, 1, dotted) if _told_back(turn) else _named_state(turn, at, 1, dotted)
    if where == _TOO_DEEP:
        raise InvalidRequestError(f"the request body is nested deeper than {_DEPTH} levels, too deep to check")
    if where is not None:
        raise InvalidRequestError(
            f"{where}: upstream state named by an id is shared by every tenant of this gateway, which "
            "does not serve the APIs that make it; send the content itself",
            param=where,
        )


_TOO_DEEP = "\0"


def _named_state(value: Any, path: str, depth: int, dotted: bool) -> str | None:
    if depth > _DEPTH:
        return _TOO_DEEP  # an id hidden below what is looked at would go upstream unseen (t34)
    if isinstance(value, dict):
        call = _type_of(value) in _TOOL_CALLS
        for name, item in value.items():
            if name in _CLIENT_DATA or (call and name == "input"):
                continue
            at = f"{path}.{name}" if path else str(name)
            if name in _ID_FIELDS and item not in (None, "", []):
                return at
            if name == "container" and (isinstance(item, str) or (isinstance(item, dict) and item.get("id"))):
                return at
            if name == "source" and isinstance(item, dict) and item.get("type") == "file":
                return at
            found = _named_state(item, at, depth + 1, dotted)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _named_state(item, _at(path, index, dotted), depth + 1, dotted)
            if found is not None:
                return found
    return None


def _type_of(value: dict[str, Any]) -> str | None:
    """A part's ``type``, when it is a string (a list there is the client's error, which the
    request's validation answers with a 400: a set cannot hold it, t86)."""
    kind = value.get("type")
    return kind if isinstance(kind, str) else None


def _at(path: str, index: int, dotted: bool) -> str:
    return f"{path}.{index}" if dotted else f"{path}[{index}]"


_OUTPUT_ITEMS = frozenset(
    {"reasoning", "function_call", "custom_tool_call", "code_interpreter_call", "file_search_call",
     "web_search_call", "computer_call", "image_generation_call", "local_shell_call", "shell_call",
     "apply_patch_call", "mcp_call", "mcp_list_tools", "mcp_approval_request"}
)  # fmt: skip
"""Responses items only a model writes (what a client tells back of its answers)."""
_CLIENT_PARTS = frozenset(
    {"input_file", "input_image", "input_audio", "file", "image", "document", "container_upload"}
)  # fmt: skip
"""Parts only a client writes: in a turn told back, they are looked through all the same (t37)."""


def _told_back(turn: Any) -> bool:
    """A turn of the conversation that is what a model answered, told back to it: an assistant
    message, or a Responses output item (``code_interpreter_call``, ...). The ids in it are the
    upstream's own for this conversation (refused, follow-up turns broke: t34); only a turn of
    the conversation is taken so, never a part or field within one (t35)."""
    if not isinstance(turn, dict):
        return False
    return turn.get("role") == "assistant" or _type_of(turn) in _OUTPUT_ITEMS


def _client_parts(value: Any, path: str, depth: int, dotted: bool) -> str | None:
    """In a turn told back, the first part only a client writes that names state."""
    if depth > _DEPTH:
        return _TOO_DEEP
    if isinstance(value, dict):
        if _type_of(value) in _CLIENT_PARTS:
            return _named_state(value, path, depth, dotted)
        items: Any = ((f"{path}.{name}", item) for name, item in value.items() if name not in _CLIENT_DATA)
    elif isinstance(value, list):
        items = ((_at(path, index, dotted), item) for index, item in enumerate(value))
    else:
        return None
    for at, item in items:
        found = _client_parts(item, at, depth + 1, dotted)
        if found is not None:
            return found
    return None
