"""A chat client's body as the pipeline hands it to a provider, for tests that call providers directly."""

from __future__ import annotations

from typing import Any

from gateway.core.model import Request
from gateway.protocols.openai_chat import read_chat_request

__all__ = ["as_sent"]


def as_sent(body: dict[str, Any]) -> tuple[Request, dict[str, Any]]:
    """The request in the internal model, and the body itself (what an OpenAI-compatible upstream gets)."""
    return read_chat_request(body), body
