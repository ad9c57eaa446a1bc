"""The error raised when a pair cannot run speculation in the gateway."""

from __future__ import annotations

from gateway.errors import ConfigError

__all__ = ["PairMismatchError"]


class PairMismatchError(ConfigError):
    """The draft and target servers do not share a tokenizer, so ``mode: gateway`` is refused.

    A :class:`ConfigError` (source: ``models.<name>.speculative``): the policy names a pair
    that cannot work, exactly like an invalid file, but only the servers can tell.
    """
