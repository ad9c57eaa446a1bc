"""Whether and how one request may use the cache: read, write, exact key, semantic namespace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.cache.keys import canonical_params, exact_key, namespace_hash
from gateway.config.schema import CachePolicy
from gateway.protocol import ChatRequest, ContentPart
from gateway.store import keyspace

__all__ = ["CachePlan", "plan_cache"]

_ANSWER_INDEPENDENT = frozenset(
    {"messages", "model", "stream", "stream_options", "user", "metadata", "store", "gateway_cache"}
)


@dataclass(slots=True)
class CachePlan:
    read: bool
    write: bool
    exact_key: str
    semantic_set: str | None
    """The vector set to search and fill, or None when the semantic cache does not apply."""
    prompt: str
    """The text the semantic guard compares: the conversation's user and assistant turns."""


def plan_cache(
    policy: CachePolicy, tenant: str, route: str, body: dict[str, Any], request: ChatRequest, cache_control: str | None
) -> CachePlan | None:
    """None when the cache is off for this request altogether."""
    if not policy.enabled:
        return None
    directives = _directives(cache_control, body.pop("gateway_cache", None))
    read, write = "no-cache" not in directives, "no-store" not in directives
    if request.n not in (None, 1) or not (read or write) or _beyond_the_answer(body):
        return None
    temperature = request.temperature if request.temperature is not None else 1.0
    exact_limit = policy.exact.max_temperature
    if not policy.exact.enabled or (exact_limit is not None and temperature > exact_limit):
        return None
    semantic_set = None
    semantic = policy.semantic
    turns = [m for m in request.messages if m.role not in ("system", "developer")]
    if (
        semantic.enabled
        and temperature <= semantic.max_temperature
        and (semantic.tools or not (request.tools or body.get("functions")))
        and (semantic.multi_turn or len(turns) == 1)
    ):
        system = "\n".join(_text(m.content) for m in request.messages if m.role in ("system", "developer"))
        params = {k: v for k, v in canonical_params(body).items() if k not in _ANSWER_INDEPENDENT}
        earlier = [(m.role, _text(m.content)) for m in turns[:-1]]
        semantic_set = keyspace.semantic_index(
            tenant, namespace_hash(route, system, {"params": params, "earlier": earlier})
        )
    prompt = "\n".join(_text(m.content) for m in turns[-1:]) if turns else ""
    return CachePlan(read, write, exact_key(tenant, route, body), semantic_set, prompt)


def _beyond_the_answer(body: dict[str, Any]) -> bool:
    """The client asked for what a cached answer does not hold (token logprobs, audio)."""
    modalities = body.get("modalities")
    return bool(body.get("logprobs")) or (isinstance(modalities, list) and "audio" in modalities)


def _directives(header: str | None, field: Any) -> set[str]:
    """``Cache-Control: no-cache`` (don't read), ``no-store`` (don't write); or the body field ``gateway_cache``."""
    found: set[str] = set()
    if header:
        found.update(part.strip().lower() for part in header.split(","))
    if isinstance(field, str):
        found.add(field.lower())
    elif isinstance(field, list):
        found.update(str(item).lower() for item in field)
    elif isinstance(field, dict):
        if field.get("read") is False:
            found.add("no-cache")
        if field.get("write") is False:
            found.add("no-store")
    return found


def _text(content: str | list[ContentPart] | None) -> str:
    if isinstance(content, str):
        return content
    if content:
        return "\n".join(part.text for part in content if part.type == "text" and part.text is not None)
    return ""
