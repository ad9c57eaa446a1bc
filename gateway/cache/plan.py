"""Whether and how one request may use the cache: read, write, exact key, semantic namespace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.cache.keys import answer_params, exact_key, namespace_hash
from gateway.config.schema import CachePolicy
from gateway.core.model import Message, Request, TextPart
from gateway.errors import InvalidRequestError
from gateway.store import keyspace

__all__ = ["SEMANTIC_MAX_CHARS", "CachePlan", "check_directives", "directives", "plan_cache"]

SEMANTIC_MAX_CHARS = 8_000
"""Longer prompts use the exact cache alone: the embedding reads their start, the verifier at
most 256 tokens of what differs, and the guard's rules run on the event loop over the whole text."""


@dataclass(slots=True)
class CachePlan:
    read: bool
    write: bool
    exact_key: str
    semantic_set: str | None
    """The vector set to search and fill, or None when the semantic cache does not apply."""
    prompt: str
    """The text the semantic guard compares: the last user turn (every other message, in its
    place, is in the namespace, which must match exactly)."""


def plan_cache(
    policy: CachePolicy, tenant: str, route: str, request: Request, cache_control: str | None, field: Any = None
) -> CachePlan | None:
    """None when the cache is off for this request altogether. ``field``: the chat body's
    ``gateway_cache`` directives, which the edge took out of the body."""
    if not policy.enabled:
        return None
    asked = directives(cache_control, field)
    read, write = "no-cache" not in asked, "no-store" not in asked
    extra = request.extra
    if extra.get("n") not in (None, 1) or not (read or write) or _beyond_the_answer(request):
        return None
    temperature = request.temperature if request.temperature is not None else 1.0
    exact_limit = policy.exact.max_temperature
    if not policy.exact.enabled or (exact_limit is not None and temperature > exact_limit):
        return None
    semantic_set = None
    semantic = policy.semantic
    turns = [m for m in request.messages if m.role != "system"]
    prompt = _text(turns[-1]) if turns else ""
    if (
        semantic.enabled
        and temperature <= semantic.max_temperature
        and (semantic.tools or not (request.tools or extra.get("functions")))
        and (semantic.multi_turn or len(turns) == 1)
        and turns[-1].role == "user"  # a tool result's meaning is the state of a loop, not a question
        and len(prompt) <= SEMANTIC_MAX_CHARS
        and _text_only(request.messages)
    ):
        # Every message but the question, in its place: a system message after the question, or
        # one split in two, is another conversation to a chat template (t42: served as one).
        at = next(i for i in range(len(request.messages) - 1, -1, -1) if request.messages[i] is turns[-1])
        context = [_exactly(m) for m in request.messages[:at]], [_exactly(m) for m in request.messages[at + 1 :]]
        asker = turns[-1].name  # "greet the user by name": another name asks for another answer
        semantic_set = keyspace.semantic_index(
            tenant, namespace_hash(route, {"params": answer_params(request), "context": context, "name": asker})
        )
    return CachePlan(read, write, exact_key(tenant, route, request), semantic_set, prompt)


def _exactly(message: Message) -> list[Any]:
    """An earlier turn as the namespace holds it: everything that can change the next answer (the
    tool calls asked and their results' errors too), the ids that only link a call to its result aside."""
    calls = [(call.name, call.arguments) for call in message.tool_calls]
    return [message.role, _text(message), calls, message.is_error, message.name]


def _text_only(messages: list[Message]) -> bool:
    """The embedding and the verifier read text alone: another image under the same words asks
    another question, and neither would see it (the exact key holds the image; it still applies)."""
    return all(isinstance(part, TextPart) for message in messages for part in message.parts)


def _beyond_the_answer(request: Request) -> bool:
    """What a cached answer does not hold: token logprobs, audio, or anything of the request
    the internal model could not read (:attr:`Request.unreadable`)."""
    modalities = request.extra.get("modalities")
    return (
        request.unreadable is not None
        or bool(request.extra.get("logprobs"))
        or (isinstance(modalities, list) and "audio" in modalities)
    )


_DIRECTIVES = frozenset({"no-cache", "no-store"})


def check_directives(field: Any) -> None:
    """The chat body's ``gateway_cache`` field: ``"no-cache"``, ``"no-store"`` (or both, comma
    separated or as a list), or ``{"read": false, "write": false}``; anything else is refused,
    not ignored (t64: a misspelt directive read the cache the client meant to skip)."""
    if isinstance(field, str):
        given = [part.strip().lower() for part in field.split(",")]
    elif isinstance(field, list) and all(isinstance(item, str) for item in field):
        given = [item.strip().lower() for item in field]
    elif (
        isinstance(field, dict)
        and set(field) <= {"read", "write"}
        and all(isinstance(value, bool) for value in field.values())
    ):
        return
    else:
        given = [""]
    if any(name not in _DIRECTIVES for name in given):
        raise InvalidRequestError(
            'gateway_cache: expected "no-cache", "no-store", a list of them, or {"read": false, "write": false}',
            param="gateway_cache",
        )


def directives(header: str | None, field: Any = None) -> set[str]:
    """``Cache-Control: no-cache`` (don't read), ``no-store`` (don't write); or the body field
    ``gateway_cache``. ``max-age=0`` is ``no-cache`` too: no stored answer is young enough for it,
    and it is how HTTP clients and proxies ask for a fresh one (t169: it was served a hit)."""
    found: set[str] = set()
    if header:
        found.update(part.strip().lower() for part in header.split(","))
        if "max-age=0" in found:
            found.add("no-cache")
    if isinstance(field, str):  # as check_directives reads it (t67: "no-cache, no-store" passed it, and stored)
        found.update(part.strip().lower() for part in field.split(","))
    elif isinstance(field, list):
        found.update(str(item).strip().lower() for item in field)
    elif isinstance(field, dict):
        if field.get("read") is False:
            found.add("no-cache")
        if field.get("write") is False:
            found.add("no-store")
    return found


def _text(message: Message) -> str:
    return "\n".join(part.text for part in message.parts if isinstance(part, TextPart))
