"""Where a caller's key is read from, the same on every endpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from gateway.auth import AmbiguousKey, Credentials

__all__ = ["authorization_of", "credentials_in"]

_READ = (b"x-api-key", b"authorization")
_CARRY_KEYS = frozenset({*_READ, b"api-key"})
"""Headers a key may come in: the gateway reads the first two; ``api-key`` (Azure's; Anthropic's
Foundry client sends it beside ``x-api-key``) is compared only, as a proxy in front may read it."""
_SHOWN = {b"x-api-key": "x-api-key", b"authorization": "Authorization", b"api-key": "api-key"}


class _Scoped(Protocol):
    @property
    def scope(self) -> Mapping[str, Any]: ...


def authorization_of(request: _Scoped) -> Credentials:
    """The caller's key as an ``Authorization`` header value (see :func:`credentials_in`)."""
    return credentials_in(request.scope["headers"])


def credentials_in(headers: Iterable[tuple[bytes, bytes]]) -> Credentials:
    """The key as an ``Authorization`` header value, from the request's header lines as ASGI has them.

    OpenAI's clients send ``Authorization: Bearer``, Anthropic's ``x-api-key`` (which wins when
    both carry the key, as Anthropic's API has it). A request whose lines carry more than one key
    (two ``Authorization`` lines, or ``x-api-key`` and a Bearer key that differ) is
    :class:`~gateway.auth.AmbiguousKey`, whichever key is valid: taking the first line let a
    proxy in front that reads another (RFC 9110 §5.3 lets none be sent twice) disagree with the
    gateway about who calls (t98). The same key sent twice, or in two headers, is one key.
    """
    lines = [(name, value) for name, value in headers if name in _CARRY_KEYS]
    if not lines:
        return None
    if len(lines) == 1:  # what nearly every request sends
        name, value = lines[0]
        if name == b"x-api-key" and value:
            return f"Bearer {value.decode('latin-1')}"
        return value.decode("latin-1") if name == b"authorization" else None
    return _one_of(lines)


def _one_of(lines: list[tuple[bytes, bytes]]) -> Credentials:
    sent: dict[bytes, set[tuple[bool, str]]] = {}
    for name, raw in lines:
        value = raw.decode("latin-1")
        if value.strip():  # an empty x-api-key is no key (a client that sends Bearer too)
            sent.setdefault(name, set()).add(_token(name, value))
    for name, tokens in sent.items():
        if len(tokens) > 1:
            return AmbiguousKey(f"the {_SHOWN[name]} header is sent more than once, with different values")
    keys = {name: value for name, ((is_key, value),) in sent.items() if is_key}
    if len(set(keys.values())) > 1:
        both = " and ".join(_SHOWN[name] for name in _SHOWN if name in keys)
        return AmbiguousKey(f"the {both} headers carry different keys")
    for name in _READ:
        if name in sent:
            ((is_key, value),) = sent[name]
            return f"Bearer {value}" if is_key else value
    return None


def _token(name: bytes, value: str) -> tuple[bool, str]:
    """Whether a header line carries a key, and the key (else the line as sent: another scheme's
    credentials): ``Bearer k`` in any case or spacing and ``x-api-key: k`` carry one key, ``k``."""
    if name != b"authorization":
        return True, value.strip()
    scheme, _, secret = value.partition(" ")
    return (True, secret.strip()) if scheme.lower() == "bearer" and secret.strip() else (False, value)
