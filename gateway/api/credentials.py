"""Where a caller's key is read from, the same on every endpoint."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["authorization_of"]


def authorization_of(headers: Mapping[str, str]) -> str | None:
    """The key as an ``Authorization`` header value: OpenAI's clients send ``Authorization:
    Bearer``, Anthropic's ``x-api-key`` (which wins when both are sent, as Anthropic's API has it)."""
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else headers.get("authorization")
