"""vLLM's engine-level request fields: the operator's to set, never a tenant's.

Every tenant's requests reach one server under one key, and these fields act on the server, not on
the one request: ``request_id`` (two requests in flight under one id broke vLLM's engine before it
added a random suffix, vllm#10583, and could crash it with several API servers, vllm#27711),
``priority`` (under ``--scheduling-policy priority`` a tenant goes ahead of every other),
``kv_transfer_params`` (with prefill and decode disaggregated: the host a decode server pulls KV
blocks from, and which blocks) and ``vllm_xargs`` (arguments to the server's custom logits
processors and plugins). They are taken out of every body an OpenAI-compatible upstream would be
sent as the client wrote it, and named in ``x-gateway-dropped`` (t177).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINE_FIELDS", "without_engine_fields"]

ENGINE_FIELDS = ("kv_transfer_params", "priority", "request_id", "vllm_xargs")


def without_engine_fields(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``body`` without the engine fields, and the names of those it had; the same dict when it
    has none."""
    if not ("request_id" in body or "priority" in body or "kv_transfer_params" in body or "vllm_xargs" in body):
        return body, []  # the usual request: four lookups on the hot path
    found = [name for name in ENGINE_FIELDS if name in body]
    return {name: value for name, value in body.items() if name not in ENGINE_FIELDS}, found
