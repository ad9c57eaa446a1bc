"""Decoding a request body into a typed view, with one set of messages for what can go wrong."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from gateway.errors import InvalidRequestError

__all__ = ["decode_body"]

T = TypeVar("T")


def decode_body(raw: bytes, into: type[T]) -> T:
    """``raw`` as ``into``; a 400 that says why (empty, not JSON, too deep, or the field that is wrong)."""
    if not raw:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.ValidationError as exc:
        if " - at `$" not in str(exc):  # the body itself, not one of its fields: every view is an object
            raise InvalidRequestError(f"the request body must be a JSON object ({exc})") from None
        raise InvalidRequestError(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
