"""What text the router sees for a conversation.

Rule (measured, see router_models/README.md, "Text selection"): the **last user turn**.
If that turn is very short (a follow-up such as "why?" or "continue", under
``SHORT_TURN_CHARS`` characters), the previous user turn is prepended so the
classifier sees what the follow-up refers to. The system prompt and assistant turns
are not used: on conversations built from held-out prompts, adding them lowered APGR
(they are mostly boilerplate shared by easy and hard requests, and at 64-128 tokens
they push the question out of the window).

A request whose text it cannot read (:func:`unreadable`) leans large, in the gateway and in the
``route`` and ``calibrate`` commands alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.core.model import FilePart, ImagePart, Message, TextPart

SHORT_TURN_CHARS = 24
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})
"""The types of an image part in chat, Messages and Responses content."""
_VISIBLE = re.compile(
    r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    r"\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
"""A character that shows: not whitespace, a control character (NUL) or one of Unicode's default
ignorable code points (zero-width spaces and joiners, direction marks, variation selectors)."""


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
    """The text the classifier scores for a request in the internal model (read from the end: a
    body of 100,000 messages took 67 ms to join them all, t51)."""
    return _newest_first((m.role, _joined(m)) for m in reversed(messages))


def unreadable(text: str, image_last: bool) -> bool:
    """The router cannot read what a request asks, so it leans large on it (``p_large`` 1, t28):
    ``text`` (what it would score) shows nothing, or the last user turn holds an image
    (``image_last``), which the text encoder does not see. Text of NULs or zero-width spaces
    only counts as none, as whitespace does: the tokenizer drops them all (t51)."""
    return image_last or _VISIBLE.search(text) is None


def request_unreadable(messages: Sequence[Message], text: str) -> bool:
    """:func:`unreadable` for a request in the internal model that the router reads as ``text``."""
    last = next((m for m in reversed(messages) if m.role == "user"), None)
    return unreadable(text, last is not None and any(isinstance(part, ImagePart | FilePart) for part in last.parts))


def messages_unreadable(messages: list[dict[str, Any]], text: str) -> bool:
    """:func:`unreadable` for chat-shaped ``messages`` (OpenAI's, Anthropic's or Responses' image
    parts) that the router reads as ``text``: the ``route`` command's rule is the gateway's (t51)."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = None if last is None else last.get("content")
    image = isinstance(content, list) and any(
        isinstance(part, Mapping) and isinstance(part.get("type"), str) and part["type"] in _IMAGE_PARTS
        for part in content
    )
    return unreadable(text, image)


def select_from_turns(turns: Sequence[tuple[object, str]]) -> str:
    """The rule of the module docstring, on (role, text) pairs."""
    return _newest_first(reversed(turns))


def _newest_first(turns: Iterable[tuple[object, str]]) -> str:
    """The rule on (role, text) pairs given newest first, read only as far as it needs. A turn
    with no visible text (whitespace, NULs, zero-width spaces alike: t55) is no turn."""
    users: list[str] = []
    fallback: str | None = None
    for role, text in turns:
        if _VISIBLE.search(text) is None:
            continue
        if role == "user":
            users.append(text.strip())
            if len(users) == 2 or len(users[0]) >= SHORT_TURN_CHARS:
                break
        elif fallback is None:
            fallback = text.strip()  # no user turn: the last message with any text (a bare system prompt)
    if not users:
        return fallback or ""
    last = users[0]
    if len(last) < SHORT_TURN_CHARS and len(users) > 1:
        return users[1] + "\n" + last
    return last


def _joined(message: Message) -> str:
    """Text parts joined as :func:`message_text` joins a chat message's."""
    return "\n".join(part.text for part in message.parts if isinstance(part, TextPart))
