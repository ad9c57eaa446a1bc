"""A request's path as the routes match it, whatever form the client wrote it in.

Litestar routes ``/v1/messages/``, ``/v1//messages`` and ``//v1/messages`` as ``/v1/messages``;
the chat route in front of it, the choice of the caller's error shape and the bound on a
request's head (which sees only the raw request target) decide on the same path, so that every
route treats those forms alike.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MESSAGES_PATH", "base_url_hint", "canonical_path", "in_messages_api", "names_messages", "target_path"]

MESSAGES_PATH = "/v1/messages"
_SLASHES = re.compile(r"/{2,}")


def canonical_path(path: str) -> str:
    """``path`` as Litestar routes it: repeated slashes as one, and no trailing slash."""
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]  # one at most, once repeated ones are one
    return path


def in_messages_api(path: str) -> bool:
    """Whether ``path`` is Anthropic's Messages API (``/v1/messages`` or under it), answered in its shape."""
    path = canonical_path(path)
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


_API_PATH = re.compile(
    r"(?P<endpoint>/(?:chat/completions|completions|embeddings|responses|models|messages(?:/count_tokens)?|feedback|usage))"
    r"(?P<more>/.+)?"
)
"""A path the gateway serves under ``/v1`` (``more``: a response's or model's id, and what follows it)."""


def names_messages(path: str) -> bool:
    """Whether ``path`` ends as a Messages API path does (``/v1/v1/messages`` too): a client of
    Anthropic's API, which reads only its own error shape."""
    return canonical_path(path).endswith(("/messages", "/messages/count_tokens"))


def base_url_hint(path: str) -> str | None:
    """What to fix in the base URL of a client that called ``path``, which is not served, when it
    is a served path with a ``/v1`` too many (an Anthropic SDK given ``.../v1``) or too few (an
    OpenAI SDK given the address alone); None for any other path."""
    path = canonical_path(path)
    if path.startswith("/v1/v1/") and (found := _API_PATH.fullmatch(path.removeprefix("/v1/v1"))):
        should = "not end in /v1" if found["endpoint"].startswith("/messages") else "end in /v1 once, not /v1/v1"
        called = found["endpoint"] + ("/..." if found["more"] else "")
        return f"the base URL should {should} (this request came to /v1/v1{called}; the gateway serves /v1{called})"
    if not path.startswith("/v1/") and (found := _API_PATH.fullmatch(path)):
        called = found["endpoint"] + ("/..." if found["more"] else "")
        return f"the base URL should end in /v1 (this request came to {called}; the gateway serves /v1{called})"
    return None


def target_path(target: bytes) -> str:
    """The path of a request line's target, in origin form (``/v1/messages?beta=true``) or absolute
    form (``http://host:8000/v1/messages``); part of one, as a head cut short has, gives what is there.
    Percent-decoded as uvicorn decodes the path it routes (``/v1/%6Dessages`` is ``/v1/messages``)."""
    text = target.decode("latin-1").partition("?")[0]
    if not text.startswith("/"):  # absolute form: the path begins at the first slash after the authority
        text = "/" + text.partition("://")[2].partition("/")[2]
    return unquote(text) if "%" in text else text
