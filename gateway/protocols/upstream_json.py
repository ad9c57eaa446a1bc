"""What upstreams write, read as the SDKs read it: their JSON, and the token counts in it."""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["decode_json", "mended", "token_count"]


def token_count(value: Any) -> int | None:
    """A token count, or None: a whole number written as a float (``22.0``, as a server that
    keeps numbers as doubles writes it; the SDKs read it as 22) counts (t75, t80); a negative,
    a fraction or a boolean does not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def decode_json(content: bytes) -> Any:
    """An upstream's JSON. A lone surrogate escape (``"\\ud83d"``: half an emoji, as JavaScript's
    ``JSON.stringify`` writes one) is read as U+FFFD rather than refused: the SDKs' own decoders
    read such answers, so a gateway that refused them failed (and retried, unbilled) what the
    client could read (t75). :class:`msgspec.DecodeError` when the content is not JSON."""
    try:
        return msgspec.json.decode(content)
    except msgspec.DecodeError:
        if b"\\ud" not in content.lower():
            raise
        try:
            return mended(json.loads(content))
        except ValueError:
            raise msgspec.DecodeError("not JSON") from None


def mended(value: Any) -> Any:
    """``value`` (what the stdlib's ``json`` read) with each lone surrogate as U+FFFD, so that it
    can be written out again as UTF-8 JSON."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {mended(key): mended(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mended(item) for item in value]
    return value
