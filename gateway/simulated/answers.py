"""The simulator's answers: the echo text, its tokens, ``max_tokens`` and stop strings.

The plain answer is ``"[simulated <name>] "`` followed by the first 12 words of the
last user message in reverse order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from gateway.simulated.tokenizer import encode, pieces

__all__ = [
    "Answer",
    "content_parts",
    "content_text",
    "is_positive_int",
    "last_user_text",
    "make_answer",
    "reply_words",
    "stop_tuple",
]

_MAX_ECHO_WORDS = 12


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished completion. ``finish`` is API-neutral: end, length or stop_sequence."""

    text: str
    pieces: tuple[str, ...]
    n_tokens: int
    finish: str
    stop_sequence: str | None
    tokens: tuple[int, ...] = ()


def content_parts(content: Any) -> list[str]:
    """Texts of a message content: a string or a list of ``{"type": "text"}`` blocks."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
    return []


def content_text(content: Any) -> str:
    return " ".join(content_parts(content))


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message ("" when there is none)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def reply_words(messages: list[Any]) -> str:
    """The echo: first words of the last user message, reversed."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            words = content_text(message.get("content")).split()[:_MAX_ECHO_WORDS]
            return " ".join(reversed(words)) if words else "ok"
    return "ok"


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop string; return the matched one too."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop) if stop else -1
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return (text, None) if best is None else (text[: best[0]], best[1])


@functools.lru_cache(maxsize=1024)
def make_answer(full_text: str, max_tokens: int | None, stops: tuple[str, ...]) -> Answer:
    text, matched = _cut_at_stop(full_text, stops)
    tokens = encode(text)
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens = tokens[:max_tokens]
        finish, matched = "length", None
    else:
        finish = "end" if matched is None else "stop_sequence"
    parts = pieces(tokens)
    return Answer("".join(parts), parts, len(tokens), finish, matched, tuple(tokens))


def stop_tuple(stop: Any) -> tuple[str, ...] | None:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    return None


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
