"""What text the router sees for a conversation.

Rule (measured, see router_models/README.md, "Text selection"): the **last user turn**.
If that turn is very short (a follow-up such as "why?" or "continue", under
``SHORT_TURN_CHARS`` characters), the previous user turn is prepended so the
classifier sees what the follow-up refers to. The system prompt and assistant turns
are not used: on conversations built from held-out prompts, adding them lowered APGR
(they are mostly boilerplate shared by easy and hard requests, and at 64-128 tokens
they push the question out of the window).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.core.model import Message, TextPart

SHORT_TURN_CHARS = 24


def message_text(message: Mapping[str, Any]) -> str:
    """The text content of an OpenAI/Anthropic-style message (string or list of parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str) and part.get("type", "text") in ("text", "input_text"):
                    parts.append(text)
        return "\n".join(parts)
    return str(content)


def select_text(messages: list[dict[str, Any]]) -> str:
    """The text the classifier scores for chat-shaped ``messages`` (see module docstring)."""
    return select_from_turns([(m.get("role"), message_text(m)) for m in messages])


def request_text(messages: Sequence[Message]) -> str:
    """The text the classifier scores for a request in the internal model."""
    return select_from_turns([(m.role, _joined(m)) for m in messages])


def select_from_turns(turns: Sequence[tuple[object, str]]) -> str:
    """The rule of the module docstring, on (role, text) pairs."""
    user_turns = [t for role, t in turns if role == "user" and t.strip()]
    if not user_turns:
        # no user turn: the last message with any text (e.g. a bare system prompt)
        for _, t in reversed(turns):
            if t.strip():
                return t.strip()
        return ""
    last = user_turns[-1].strip()
    if len(last) < SHORT_TURN_CHARS and len(user_turns) > 1:
        return user_turns[-2].strip() + "\n" + last
    return last


def _joined(message: Message) -> str:
    """Text parts joined as :func:`message_text` joins a chat message's."""
    return "\n".join(part.text for part in message.parts if isinstance(part, TextPart))
