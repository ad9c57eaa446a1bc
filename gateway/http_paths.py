"""A request's path as the routes match it, whatever form the client wrote it in.

Litestar routes ``/v1/messages/``, ``/v1//messages`` and ``//v1/messages`` as ``/v1/messages``;
the chat route in front of it, the choice of the caller's error shape and the bound on a
request's head (which sees only the raw request target) decide on the same path, so that every
route treats those forms alike.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MESSAGES_PATH", "canonical_path", "in_messages_api", "target_path"]

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


def target_path(target: bytes) -> str:
    """The path of a request line's target, in origin form (``/v1/messages?beta=true``) or absolute
    form (``http://host:8000/v1/messages``); part of one, as a head cut short has, gives what is there.
    Percent-decoded as uvicorn decodes the path it routes (``/v1/%6Dessages`` is ``/v1/messages``)."""
    text = target.decode("latin-1").partition("?")[0]
    if not text.startswith("/"):  # absolute form: the path begins at the first slash after the authority
        text = "/" + text.partition("://")[2].partition("/")[2]
    return unquote(text) if "%" in text else text
