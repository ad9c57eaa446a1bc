"""Cross-origin calls from browsers (``cors:`` in policies.yaml, reloaded with it).

A browser app calls the gateway with a key of its own, as OpenAI's and Anthropic's APIs
allow (the SDKs' ``dangerouslyAllowBrowser``). An allowed origin's preflight is answered
here, before auth (browsers send no credentials on it), and its other responses carry
``access-control-allow-origin``. Other origins get no CORS headers, so their browsers
keep the response from the page. Nothing is done with cookies: keys travel in headers.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.config.schema import CorsPolicy

__all__ = ["allowed_origin", "answer_preflight", "is_preflight", "with_cors_headers"]

Scope = MutableMapping[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_METHODS = b"GET, POST, DELETE, OPTIONS"
_EXPOSED = (b"access-control-expose-headers", b"*")  # request ids, x-gateway-*, retry-after


def allowed_origin(scope: Scope, cors: CorsPolicy) -> bytes | None:
    """The request's ``Origin`` when the policy allows it, else None (most requests: no header)."""
    origin: bytes | None = next((value for name, value in scope["headers"] if name == b"origin"), None)
    if origin is None:
        return None
    allowed = _allowed(tuple(cors.allow_origins))
    if "*" in allowed or origin.decode("latin-1").lower() in allowed:
        return origin
    return None


@functools.lru_cache(maxsize=8)
def _allowed(origins: tuple[str, ...]) -> frozenset[str]:
    """The policy's origins as browsers send them: scheme and host in lower case, no trailing slash."""
    return frozenset(origin.strip().rstrip("/").lower() for origin in origins)


def is_preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope["headers"]
    )


async def answer_preflight(scope: Scope, send: Send, origin: bytes, cors: CorsPolicy) -> None:
    """204 allowing the method and the headers the browser asked about (SDKs send many of their own)."""
    asked = next((value for name, value in scope["headers"] if name == b"access-control-request-headers"), b"")
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", _METHODS),
        (b"access-control-max-age", str(int(cors.max_age_s)).encode()),
        (b"vary", b"origin, access-control-request-headers"),
        (b"content-length", b"0"),
    ]
    if asked:
        headers.append((b"access-control-allow-headers", asked))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def with_cors_headers(send: Send, origin: bytes) -> Send:
    """``send`` that adds the allowed origin to the response's headers."""

    async def send_with_cors(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [
                *message.get("headers", ()),
                (b"access-control-allow-origin", origin),
                (b"vary", b"origin"),
                _EXPOSED,
            ]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_cors
