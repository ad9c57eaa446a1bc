"""vLLM's engine-level request fields: the operator's to set, never a tenant's.

Every tenant's requests reach one server under one key, and these fields act on the server, not on
the one request: ``request_id`` (two requests in flight under one id broke vLLM's engine before it
added a random suffix, vllm#10583, and could crash it with several API servers, vllm#27711),
``priority`` (under ``--scheduling-policy priority`` a tenant goes ahead of every other),
``kv_transfer_params`` (with prefill and decode disaggregated: the host a decode server pulls KV
blocks from, and which blocks) and ``vllm_xargs`` (arguments to the server's custom logits
processors and plugins); ``logits_processors`` (processor classes the server imports by name) and
``chat_template`` (a Jinja template the server renders, which vLLM takes from a request only when
its operator trusts them). SGLang's alike (t181): ``rid`` (its request id), ``bootstrap_host``,
``bootstrap_port`` and ``bootstrap_room`` (its disaggregated prefill's peer),
``data_parallel_rank``, ``custom_logit_processor`` (serialized code the server runs when it allows
it), ``lora_path`` (an adapter loaded from the server's disk) and ``return_hidden_states``. They are
taken out of every body an OpenAI-compatible upstream would be sent as the client wrote it, and
named in ``x-gateway-dropped`` (t177), but for those an API key's ``engine_fields`` lets its
requests send on (f223: an operator's trusted batch job at a low ``priority``, an internal service's
``vllm_xargs`` for its own logits processor).

:data:`SAMPLING_FIELDS` are vLLM's other kind: sampling fields of the one request (``top_k``,
``min_p``, ``repetition_penalty``, ...), a tenant's own to set. A chat body takes them on as it
takes any unknown field; an edge that reads only its API's fields (legacy completions) carries
these into the chat request too (f213), so they mean the same on every route.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequestError
from gateway.protocols.openai_fields import json_type

__all__ = ["ENGINE_FIELDS", "SAMPLING_FIELDS", "check_kept", "without_engine_fields"]

ENGINE_FIELDS = frozenset(
    {
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "chat_template",
        "custom_logit_processor",
        "data_parallel_rank",
        "kv_transfer_params",
        "logits_processors",
        "lora_path",
        "priority",
        "request_id",
        "return_hidden_states",
        "rid",
        "vllm_xargs",
    }
)

SAMPLING_FIELDS = frozenset(
    {
        "allowed_token_ids",
        "bad_words",
        "ignore_eos",
        "include_stop_str_in_output",
        "length_penalty",
        "min_p",
        "min_tokens",
        "repetition_penalty",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "stop_token_ids",
        "top_k",
        "truncate_prompt_tokens",
        "use_beam_search",
    }
)
"""vLLM's sampling fields that mean the same in its chat and completions requests (its
``SamplingParams``); none an OpenAI chat field, none one of :data:`ENGINE_FIELDS`."""


def without_engine_fields(body: dict[str, Any], kept: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """``body`` without the engine fields but those ``kept`` (the key's ``engine_fields``), and
    the names of those it had; the same dict when it has none to take out. A 400 for a kept one
    the server would refuse (:func:`check_kept`)."""
    if ENGINE_FIELDS.isdisjoint(body):
        return body, []  # the usual request: one look at each of its fields on the hot path
    check_kept(body, kept)
    dropped = ENGINE_FIELDS.difference(kept) if kept else ENGINE_FIELDS
    found = sorted(name for name in body if name in dropped)
    if not found:
        return body, []  # only fields its key may send
    return {name: value for name, value in body.items() if name not in dropped}, found


def check_kept(body: dict[str, Any], kept: frozenset[str]) -> None:
    """A 400 for a kept ``priority`` that is not an integer, in OpenAI's words and code: vLLM
    refuses it, but ``priority`` is not in the cache key, so a hit answered 200 what a miss got
    refused (f229). Other kept fields are in the key, and the server judges them."""
    if "priority" in kept and "priority" in body:
        value = body["priority"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequestError(
                f"Invalid type for 'priority': expected an integer, but got {json_type(value)} instead.",
                param="priority",
                code="invalid_type",
            )
