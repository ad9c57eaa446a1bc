"""Request bodies sent compressed (``Content-Encoding``): gzip and deflate, under the body limit."""

from __future__ import annotations

import asyncio
import zlib

from gateway.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["decoded_body"]

_IDENTITY = frozenset({"", "identity"})
_ZLIB_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_MEMBERS_AT_MOST = 16
"""gzip members one body may hold: clients send one (``gzip -c a b`` two); 200,000 empty ones held
a core for 11 s (an outside tester)."""
_OFF_LOOP_BYTES = 64 * 1024  # inflating a larger body takes milliseconds: a worker thread does it


async def decoded_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``raw`` as the client meant it; the limit holds for the inflated size, so a small
    compressed body cannot expand into gigabytes (a decompression bomb)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in _IDENTITY:
        return raw
    wbits = _ZLIB_WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding '{encoding[:40]}' is not supported; send the body as is, gzip or deflate"
        )
    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(_inflate, raw, wbits, encoding, limit)
    return _inflate(raw, wbits, encoding, limit)


def _inflate(raw: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """Every member of a gzip body (members in a row are one gzip stream, as ``gzip -c a b``
    writes them); bytes after the last one, or after a deflate stream, are refused, not dropped."""
    parts: list[bytes] = []
    size = 0
    while True:
        if len(parts) == _MEMBERS_AT_MOST:  # each member copies the rest of the body: bounded, not quadratic
            raise InvalidRequestError(f"the request body has more than {_MEMBERS_AT_MOST} {encoding} members")
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(raw, limit + 1 - size)
        except zlib.error:
            if encoding == "deflate" and not parts:  # some clients send deflate without its header
                return _inflate(raw, -zlib.MAX_WBITS, "raw deflate", limit)
            raise InvalidRequestError(f"the request body is not valid {encoding} data") from None
        size += len(part)
        parts.append(part)
        if size > limit:
            raise PayloadTooLargeError(f"the request body inflates to more than the limit of {limit} bytes")
        if not inflater.eof:
            raise InvalidRequestError(f"the request body's {encoding} data is truncated")
        raw = inflater.unused_data
        if not raw:
            return b"".join(parts)
        if wbits != _ZLIB_WBITS["gzip"]:
            raise InvalidRequestError(f"the request body has bytes after its {encoding} data")
