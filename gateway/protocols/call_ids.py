"""Tool-call ids made unique where an upstream repeats one and the API downstream refuses that.

Chat servers number their calls per answer (vLLM's and Qwen's tool parsers: ``call_0`` every turn)
and may give two parallel calls of one answer the same id. OpenAI's API never does; a client sends
each call's output under its call's id, so two calls of one id cannot both be answered. Anthropic's
API refuses a conversation in which a ``tool_use`` id repeats at all ("`tool_use` ids must be
unique"). A repeated id gets a suffix (``call_0-2``, then ``-3``, ...), never one already given.
"""

from __future__ import annotations

__all__ = ["distinct_call_id"]


def distinct_call_id(call_id: str, given: set[str]) -> str:
    """``call_id``, or a fresh one where it is in ``given``; the id returned is added to ``given``."""
    unique, again = call_id, 1
    while unique in given:
        again += 1
        unique = f"{call_id}-{again}"
    given.add(unique)
    return unique
