"""Images are counted from their size (t100: every image was 85 tokens, a 1568 x 1568 one as a 32 x 32
one): header readers on hand-made bytes, and OpenAI's and Anthropic's rules at their documented figures."""

from __future__ import annotations

import base64

import pytest

from gateway.core.model import ImagePart
from gateway.image_size import data_url_size, image_size
from gateway.protocols.openai_chat import read_chat_request
from gateway.tokens import anthropic_image_tokens, count_prompt, image_tokens, openai_image_tokens, prompt_chars


def _png(width: int, height: int) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + b"IHDR" + ihdr + b"\x00" * 4 + b"IDAT..."


def _gif(width: int, height: int) -> bytes:
    return b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\xf7\x00\x00" + b"\x00" * 20


def _riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + len(payload).to_bytes(4, "little") + payload
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _webp_lossy(width: int, height: int) -> bytes:
    frame = b"\x30\x01\x00" + b"\x9d\x01\x2a" + width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return _riff(b"VP8 ", frame + b"\x00" * 16)


def _webp_lossless(width: int, height: int) -> bytes:
    return _riff(b"VP8L", b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little") + b"\x00" * 8)


def _webp_extended(width: int, height: int) -> bytes:
    return _riff(b"VP8X", b"\x10\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _jpeg(width: int, height: int, *, frame: int = 0xC0, before_frame: bytes = b"") -> bytes:
    """SOI, JFIF, a large EXIF segment, a DHT (0xC4, in the SOF range but no frame), fill bytes, then the frame."""
    sof = b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return (
        b"\xff\xd8"
        + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + _segment(0xE1, b"Exif\x00\x00" + bytes(range(256)) * 40)
        + _segment(0xC4, b"\x00" * 20)
        + before_frame
        + b"\xff\xff\xff"
        + _segment(frame, sof)
        + _segment(0xDA, b"\x00" * 10)
        + b"\x12\x34" * 50
        + b"\xff\xd9"
    )


def _size(data: bytes) -> tuple[int, int] | None:
    return image_size(lambda offset, length: data[offset : offset + length])


def _url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    "image",
    [_png, _gif, _webp_lossy, _webp_lossless, _webp_extended, _jpeg, lambda w, h: _jpeg(w, h, frame=0xC2)],
    ids=["png", "gif", "webp-vp8", "webp-vp8l", "webp-vp8x", "jpeg-baseline", "jpeg-progressive"],
)
@pytest.mark.parametrize("width, height", [(1, 1), (32, 32), (1568, 1000), (3000, 4000), (16383, 9)])
def test_headers_tell_the_size(image: object, width: int, height: int) -> None:
    data = image(width, height)  # type: ignore[operator]
    assert _size(data) == (width, height)
    assert data_url_size(_url(data)) == (width, height)  # each byte offset read from its own base64 group


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 64,
        b"not an image at all, just words",
        _png(64, 64)[:20],  # cut in the IHDR
        _png(64, 64)[:12] + b"CgBI" + _png(64, 64)[16:],  # not IHDR first
        _png(0, 64),
        _gif(64, 64)[:8],
        _webp_lossy(64, 64)[:26],
        _riff(b"VP8 ", b"\x30\x01\x00\x00\x00\x00" + b"\x00" * 20),  # no key frame start code
        _riff(b"ALPH", b"\x00" * 20),
        _jpeg(64, 64)[:40],  # cut in the EXIF segment
        _jpeg(64, 64)[: _jpeg(64, 64).index(b"\xff\xc0")],  # cut before the frame
        _jpeg(64, 64, frame=0xDA),  # the data starts with no frame header before it
        b"\xff\xd8\xff\xe0\x00\x01",  # a length shorter than itself
        b"\xff\xd8" + b"\xff" * 200,  # fill bytes only
        b"\xff\xd8" + b"\xff\xd0" * 200 + _segment(0xC0, b"\x08\x00\x10\x00\x10"),  # past the segments walked
    ],
)
def test_a_header_that_cannot_be_read_tells_nothing(data: bytes) -> None:
    assert _size(data) is None
    assert data_url_size(_url(data)) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/chart.png",
        "x",
        "data:image/png,%89PNG",  # not base64
        "data:image/png;base64,!!!!" + base64.b64encode(_png(64, 64)).decode(),
        "data:image/png;base64," + base64.b64encode(_png(64, 64)).decode()[:20],  # cut
        "data:" + "x" * 300 + ";base64," + base64.b64encode(_png(64, 64)).decode(),  # no comma where one belongs
    ],
)
def test_urls_whose_size_is_not_at_hand(url: str) -> None:
    assert data_url_size(url) is None


def test_only_the_header_is_decoded() -> None:
    """A 20 MB image is read in the few base64 groups its header lies in: what follows is not base64
    at all here, and a whole decode would have refused it."""
    url = _url(_png(1568, 1568)) + "!" * 20_000_000
    assert data_url_size(url) == (1568, 1568)
    jpeg = _jpeg(800, 600)
    url = _url(jpeg[: jpeg.index(b"\xff\xda")]) + "!" * 1_000_000
    assert data_url_size(url) == (800, 600)


@pytest.mark.parametrize(
    "width, height, detail, tokens",
    [
        (1024, 1024, None, 765),  # OpenAI's examples: 768 x 768, 4 tiles
        (1024, 1024, "high", 765),
        (2048, 4096, "high", 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
        (4096, 8192, "high", 1105),
        (4096, 8192, "low", 85),
        (32, 32, None, 255),  # one tile
        (1568, 1568, None, 765),
        (1920, 1080, None, 1105),
        (8192, 100, None, 85 + 170 * 4),  # a strip: fit in 2048, the short side stays
    ],
)
def test_openai_rule(width: int, height: int, detail: str | None, tokens: int) -> None:
    assert openai_image_tokens(width, height, detail) == tokens
    assert openai_image_tokens(height, width, detail) == tokens


@pytest.mark.parametrize(
    "width, height, tokens",
    [
        (200, 200, 54),  # Anthropic's table: ~54
        (1000, 1000, 1334),  # ~1,334
        (1092, 1092, 1590),  # ~1,590: the largest square it does not scale
        (1568, 1568, 1600),  # scaled to its cap
        (4000, 3000, 1600),
        (1568, 100, 210),  # a strip at the long edge
        (3136, 200, 210),  # halved to that strip
        (1, 1, 1),
    ],
)
def test_anthropic_rule(width: int, height: int, tokens: int) -> None:
    assert anthropic_image_tokens(width, height) == tokens
    assert anthropic_image_tokens(height, width) == tokens


def test_images_are_counted_by_the_rule_of_who_bills_them() -> None:
    big, small = _url(_png(1568, 1568)), _url(_gif(32, 32), "image/gif")
    assert image_tokens(ImagePart(big), "openai") == 765
    assert image_tokens(ImagePart(big), "anthropic") == 1600
    assert image_tokens(ImagePart(small), "openai") == 255
    assert image_tokens(ImagePart(small), "anthropic") == 2
    assert image_tokens(ImagePart(big, detail="low"), "openai") == 85
    assert image_tokens(ImagePart(big, detail="low"), "anthropic") == 1600  # Anthropic has no detail
    remote = ImagePart("https://example.com/photo.jpg")  # not at hand: a full-size photo's cost
    assert image_tokens(remote, "openai") == 1105
    assert image_tokens(remote, "anthropic") == 1600
    assert image_tokens(ImagePart("https://example.com/photo.jpg", detail="low"), "openai") == 85


def test_a_prompt_counts_its_images_by_size() -> None:
    def count(url: str, provider: str) -> int:
        parts = [{"type": "text", "text": "Hello world"}, {"type": "image_url", "image_url": {"url": url}}]
        request = read_chat_request({"model": "m", "messages": [{"role": "user", "content": parts}]})
        return count_prompt(request, "cl100k_base", provider=provider)  # type: ignore[arg-type]

    text = 3 + 3 + 2
    assert count(_url(_png(32, 32)), "openai") == text + 255
    assert count(_url(_png(1568, 1568)), "openai") == text + 765
    assert count(_url(_png(1568, 1568)), "anthropic") == text + 1600
    assert count(_url(_png(200, 200)), "anthropic") == text + 54


def test_images_weigh_in_the_choice_to_count_off_the_event_loop() -> None:
    """t102: prompt_chars ignored images, so a 4 MB body of 15,000 JPEG headers of fill bytes was
    counted on the event loop (1.7 s). Each image weighs its URL's length, at least 1,000 chars."""
    hostile = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8" + b"\xff" * 130 + b"\xff\xc0").decode()
    parts = [{"type": "image_url", "image_url": {"url": hostile}}] * 40
    request = read_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]}
    )
    assert prompt_chars(request) == 2 + 40 * 1_000 > 32_000  # the default limits.long_prompt_chars
    big = "data:image/png;base64," + "A" * 50_000
    one = read_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]}
    )
    assert prompt_chars(one) == len(big)
