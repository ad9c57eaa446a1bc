"""Canonical request keys: the same question gives the same key whatever protocol or JSON layout carried it."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from gateway.core.model import Message, Request
from gateway.store import keyspace

__all__ = ["answer_params", "exact_key", "namespace_hash"]

_NOT_IN_KEY = frozenset(
    {
        "stream_options",
        "metadata",
        "store",
        "service_tier",
        "gateway_cache",
        "safety_identifier",
        "prompt_cache_key",
        "priority",
    }
)
"""Unmodeled fields (:attr:`Request.extra`) that do not change the answer. Every other one,
unknown fields included, is part of the key. An end user's or prompt-cache group's id is not,
as ``user`` is not: one tenant's end users share its answers, through any API (t48). Nor is
vLLM's ``priority``, which a key's ``engine_fields`` may let through (f223): it orders the
server's queue, not what the model writes. Its other engine fields such a key sends on are part
of the key (``vllm_xargs``, ``chat_template``, ``lora_path`` change the answer)."""

_DEFAULTS: dict[str, object] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
"""Unmodeled fields whose value here is the API's default: sent or left out, one key."""

_encoder = msgspec.json.Encoder(order="sorted")


def exact_key(tenant: str, route: str, request: Request) -> str:
    """The tenant's exact-cache key (see :mod:`gateway.store.keyspace`): no lookup can cross tenants.

    The hash covers the route asked for and everything in the internal request that can change
    the answer: its messages and :func:`answer_params`. Decoding already wrote each question one
    way (a string content and a list of one text part are one :class:`TextPart`; ``max_tokens``
    and ``max_completion_tokens`` are one field), so one question asked through two APIs has
    one key.
    """
    messages = _calls_by_place(request.messages)
    digest = hashlib.sha256(_encoder.encode([route, messages, answer_params(request)])).hexdigest()
    return keyspace.exact(tenant, digest)


def _calls_by_place(messages: list[Message]) -> list[Message]:
    """The conversation with each tool call's id written as its place among the calls (``#0``,
    ``#1``, ...), in the calls and in the results that name them. An upstream's call ids are new
    with every answer, and so are a cached answer's each time it is served: an agent's later turns
    would otherwise never be asked alike twice."""
    if not any(message.tool_calls or message.tool_call_id for message in messages):
        return messages
    places: dict[str, str] = {}

    def place(call_id: str) -> str:
        return places.setdefault(call_id, f"#{len(places)}")

    return [
        msgspec.structs.replace(
            message,
            tool_calls=tuple(msgspec.structs.replace(call, id=place(call.id)) for call in message.tool_calls),
            tool_call_id=None if message.tool_call_id is None else place(message.tool_call_id),
        )
        if message.tool_calls or message.tool_call_id
        else message
        for message in messages
    ]


def answer_params(request: Request) -> dict[str, Any]:
    """The request's settings that can change the answer (not its messages), numbers written
    one way (``0`` and ``0.0``)."""
    params: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": request.stop,
        "tools": request.tools,
        "tool_choice": request.tool_choice,
        "json_schema": request.json_schema,
        "thinking": request.thinking,
    }
    if request.continues_last_turn:  # Anthropic's prefill: continued, where a chat client's gets a new turn
        params["continues_last_turn"] = True
    if request.betas:  # Anthropic's beta features change what the model may do (context, tools, thinking)
        params["betas"] = sorted({beta.strip() for beta in request.betas.split(",") if beta.strip()})
    for key, value in request.extra.items():
        if key in _NOT_IN_KEY or _is_default(key, value):
            continue
        params[key] = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return params


def _is_default(key: str, value: object) -> bool:
    if key not in _DEFAULTS:
        return False
    default = _DEFAULTS[key]
    if isinstance(default, bool):
        return value is default
    return type(value) in (int, float) and value == default


def namespace_hash(route: str, params: dict[str, Any]) -> str:
    """What a semantic vector set is specific to, besides its tenant."""
    return hashlib.sha256(_encoder.encode([route, params])).hexdigest()[:32]
