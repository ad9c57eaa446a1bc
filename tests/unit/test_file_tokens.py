"""Files are counted at a documented estimate, not as nothing (f235): a text file as its text, a PDF
at 3,000 tokens a page with a page per 100 kB of it, at least one and at most 100."""

from __future__ import annotations

import base64

from gateway.core.model import FilePart
from gateway.protocols.openai_chat import read_chat_request
from gateway.tokens import count_prompt, count_text, file_tokens


def _data(media_type: str, raw: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def test_a_text_file_is_counted_as_its_text() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 50
    assert file_tokens(FilePart(data=_data("text/plain", text.encode())), "cl100k_base") == count_text(
        text, "cl100k_base"
    )


def test_a_pdf_is_counted_by_pages_estimated_from_its_size() -> None:
    assert file_tokens(FilePart(data=_data("application/pdf", b"%PDF" * 10)), "cl100k_base") == 3_000
    assert file_tokens(FilePart(data=_data("application/pdf", b"x" * 250_000)), "cl100k_base") == 9_000
    assert file_tokens(FilePart(data=_data("application/pdf", b"x" * 20_000_000)), "cl100k_base") == 300_000
    assert file_tokens(FilePart(url="https://example.com/d.pdf"), "cl100k_base") == 3_000


def test_a_chat_file_part_is_part_of_the_prompt_count() -> None:
    file = {"type": "file", "file": {"filename": "a.pdf", "file_data": _data("application/pdf", b"%PDF-1.4")}}
    with_file = read_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": [file, {"type": "text", "text": "hi"}]}]}
    )
    without = read_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert count_prompt(with_file, "cl100k_base") - count_prompt(without, "cl100k_base") == 3_000
