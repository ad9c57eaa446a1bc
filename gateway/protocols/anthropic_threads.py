"""The Messages ``thread`` field (Anthropic's message-threads beta), as the gateway reads it.

``{"type": "create"}`` asks the upstream to keep the conversation under the answer's message
id; ``{"type": "continue", "previous_message_id": "msg_..."}`` resumes one, the body holding
only the new turn. The id names state the upstream keeps for every tenant under one key, so
the caller own-checks it (:mod:`gateway.thread_store`); a shape the gateway cannot check is refused.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequestError

__all__ = ["continued_message"]

_FIELDS = {"create": frozenset({"type"}), "continue": frozenset({"type", "previous_message_id"})}


def continued_message(body: dict[str, Any]) -> str | None:
    """The message id a ``continue`` names; None for no thread or a ``create``. Raises a 400 for
    any other shape: one that names upstream state otherwise would go upstream unchecked."""
    thread = body.get("thread")
    if thread is None:
        return None
    kind = thread.get("type") if isinstance(thread, dict) else None
    allowed = _FIELDS.get(kind) if isinstance(kind, str) else None
    if allowed is None or not isinstance(thread, dict) or not set(thread) <= allowed:
        raise InvalidRequestError(
            'thread: only {"type": "create"} and {"type": "continue", "previous_message_id": ...} are '
            "supported by this gateway (a thread is upstream state shared by every tenant, checked per tenant)",
            param="thread",
        )
    if kind == "create":
        return None
    previous = thread.get("previous_message_id")
    if not isinstance(previous, str) or not previous:
        raise InvalidRequestError("thread.previous_message_id: Field required", param="thread.previous_message_id")
    return previous
