"""An image's width and height from its header bytes (PNG, JPEG, GIF, WebP), to count its tokens.

An image in a request is mostly a ``data:`` URL of base64 that may hold megabytes. Only the few
bytes a header needs are decoded, each where it lies (4 base64 characters hold 3 bytes), so a
20 MB image costs the event loop what a 20 kB one does; nothing is decoded into pixels.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable

__all__ = ["Read", "data_url_size", "image_size"]

Read = Callable[[int, int], bytes]
"""``read(offset, length)``: the image's bytes there, fewer (or none) past its end or where unreadable."""

_HEAD = 30
"""Bytes that hold the size of a PNG, GIF or WebP (and a JPEG's first marker)."""
_JPEG_SEGMENTS = 128
"""Segments walked to a JPEG's frame header at most (EXIF, ICC and other APPn come before it)."""
_JPEG_FRAMES = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
"""SOF0-SOF15 but for DHT (C4), JPG (C8) and DAC (CC), which share the range."""
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
"""Markers with no length after them: TEM, SOI, RST0-7."""
_HEADER_CHARS = 256
"""Where a data URL's comma must be by: a media type and its parameters are short."""


def data_url_size(url: str) -> tuple[int, int] | None:
    """Width and height of a ``data:<media type>;base64,...`` image, or None (another URL, or
    a header that cannot be read)."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 5, _HEADER_CHARS)
    if comma < 0 or not url[5:comma].lower().endswith(";base64"):
        return None
    return image_size(_base64_reader(url, comma + 1))


def _base64_reader(text: str, start: int) -> Read:
    """Reads bytes of the base64 that begins at ``text[start]``, decoding only their 4-character groups."""

    def read(offset: int, length: int) -> bytes:
        first = start + offset // 3 * 4
        last = start + (offset + length + 2) // 3 * 4
        try:
            data = binascii.a2b_base64(text[first:last], strict_mode=True)
        except binascii.Error:  # not base64 there (or broken across lines): unreadable
            return b""
        return data[offset % 3 : offset % 3 + length]

    return read


def image_size(read: Read) -> tuple[int, int] | None:
    """Width and height from the header, or None for another format or a truncated or broken header."""
    head = read(0, _HEAD)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        size = _png(head)
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        size = _gif(head)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        size = _webp(head)
    elif head[:3] == b"\xff\xd8\xff":
        size = _jpeg(read)
    else:
        return None
    return size if size is not None and size[0] > 0 and size[1] > 0 else None


def _png(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":  # the first chunk
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _gif(head: bytes) -> tuple[int, int] | None:
    if len(head) < 10:
        return None
    return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if len(head) < 30:
        return None
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: a key frame's start code, then 14-bit sizes
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14 bits each of width - 1 and height - 1
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each of width - 1 and height - 1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(read: Read) -> tuple[int, int] | None:
    """The size in the first frame header (SOFn), segment by segment from the start."""
    offset = 2
    for _ in range(_JPEG_SEGMENTS):
        segment = read(offset, 9)
        if len(segment) < 2 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
        elif marker in _JPEG_STANDALONE:
            offset += 2
        elif marker in _JPEG_FRAMES:  # length, precision, height, width
            if len(segment) < 9:
                return None
            return int.from_bytes(segment[7:9], "big"), int.from_bytes(segment[5:7], "big")
        elif marker in (0xD9, 0xDA) or len(segment) < 4:  # the image ends, or its data starts: no frame header
            return None
        else:
            length = int.from_bytes(segment[2:4], "big")
            if length < 2:
                return None
            offset += 2 + length
    return None
