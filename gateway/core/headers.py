"""Response headers the gateway writes from what a client sent."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["dropped_header"]

_HEADER_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def dropped_header(names: Iterable[str]) -> str | None:
    """The ``x-gateway-dropped`` value, or None when nothing was dropped. Names come from the
    client (unknown fields): one a header cannot carry (a newline, a NUL, non-Latin text) or a
    very long one is written as ``?`` rather than breaking the response."""
    shown = [name if _HEADER_SAFE_NAME.fullmatch(name) else "?" for name in names]
    return ",".join(dict.fromkeys(shown)) or None
