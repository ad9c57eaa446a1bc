"""Deterministic OpenAI-style ``logprobs`` for the simulator's tokens.

Each generated token gets a log probability in ``(-0.7, 0]`` drawn from a hash of
the token and its position: the simulated model is greedy and fairly sure of itself,
so the chosen token is always the most likely one. ``top_logprobs`` alternatives are
other vocabulary tokens sharing the remaining probability mass, each half as likely as
the one before, so the list is sorted (descending) and sums to less than one.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any

from gateway.simulated.tokenizer import encoding

__all__ = ["logprob_entries"]

_VOCAB = 100_000  # ordinary cl100k tokens; the special ones sit above 100 256
_LN2 = math.log(2.0)


def _unit(*parts: int) -> float:
    """A number in (0, 1) from a hash of ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + 1) / (2.0**64 + 2)


@functools.lru_cache(maxsize=8192)
def _token_view(token: int) -> tuple[str, tuple[int, ...]]:
    """(token text, its bytes); text that is not whole UTF-8 reads ``bytes:\\xNN...`` as OpenAI writes it."""
    raw = encoding().decode_single_token_bytes(token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, tuple(raw)


def _alternatives(token: int, position: int, k: int) -> list[int]:
    found: list[int] = []
    step = 0
    while len(found) < k:
        candidate = int(_unit(token, position, step) * _VOCAB)
        step += 1
        if candidate != token and candidate not in found:
            found.append(candidate)
    return found


def _entry(token: int, logprob: float) -> dict[str, Any]:
    text, raw = _token_view(token)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def logprob_entries(tokens: Sequence[int], start: int, top: int) -> list[dict[str, Any]]:
    """``logprobs.content`` entries for ``tokens``; ``start`` is the first one's position."""
    entries: list[dict[str, Any]] = []
    for offset, token in enumerate(tokens):
        position = start + offset
        chosen = -0.7 * _unit(token, position) ** 2
        entry = _entry(token, chosen)
        tops = [dict(entry)]
        if top > 1:
            rest = math.log(-math.expm1(chosen))  # log(1 - p): the mass left for the others
            for rank, alt in enumerate(_alternatives(token, position, top - 1), start=1):
                tops.append(_entry(alt, rest - rank * _LN2))
        entry["top_logprobs"] = tops[:top]
        entries.append(entry)
    return entries
