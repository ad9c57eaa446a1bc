"""PDFs and other files reach a model the route translates to (f235, t202).

A Responses ``input_file`` (what the AI SDK sends a PDF as) was a 400 on every translated route, and
a chat ``file`` part was a 400 on the way to Claude, which reads PDFs as ``document`` blocks. The
loopback upstreams record what they are sent: one as vLLM (chat ``file`` parts), one as Anthropic.
"""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import closed_after_test, recording_vllm_and_claude
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream

_ROUTES = """
  vllm-r: {model: vllm}
  claude-r: {model: claude-up}
  claude-or-vllm: {model: claude-up, fallbacks: [vllm]}
"""
_CACHE = "{enabled: true, semantic: {enabled: false}, coalesce: {wait_s: 5}, redis_timeout_ms: 1000}"
_PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF").decode()
_PDF_URL = f"data:application/pdf;base64,{_PDF}"


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    choice = {"index": 0, "message": {"role": "assistant", "content": "A PDF."}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [choice], "usage": usage})  # fmt: skip


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    return web.json_response({
        "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_sequence": None,
        "content": [{"type": "text", "text": "A PDF."}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 9, "output_tokens": 2},
    })  # fmt: skip


vllm, claude_upstream, gateway = recording_vllm_and_claude("file-parts", _chat, _messages, routes=_ROUTES, cache=_CACHE)


def _oai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=15))


def _claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=15))


def _document(source: dict[str, str], **fields: Any) -> Any:
    document = {"type": "document", "source": source, **fields}
    return [{"role": "user", "content": [document, {"type": "text", "text": "Summarize."}]}]


_PDF_SOURCE = {"type": "base64", "media_type": "application/pdf", "data": _PDF}


def _input_file(**file: str) -> Any:
    return [{"role": "user", "content": [{"type": "input_file", **file}, {"type": "input_text", "text": "Summarize."}]}]


def _chat_file(**file: str) -> Any:
    return [{"role": "user", "content": [{"type": "file", "file": file}, {"type": "text", "text": "Summarize."}]}]


def _first_part(upstream: RecordingUpstream) -> Any:
    content = upstream.bodies[-1]["messages"][-1]["content"]
    assert isinstance(content, list) and content[1]["text"] == "Summarize."
    return content[0]


def test_a_responses_pdf_reaches_claude_as_a_document_block(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    answer = _oai(gateway).responses.create(model="claude-r", input=_input_file(filename="a.pdf", file_data=_PDF_URL))
    assert answer.output_text == "A PDF."
    assert _first_part(claude_upstream) == {
        "type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": _PDF}
    }  # fmt: skip


def test_a_chat_pdf_reaches_claude_as_a_document_block(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    messages = _chat_file(filename="b.pdf", file_data=_PDF_URL)
    answer = _oai(gateway).chat.completions.create(model="claude-r", messages=messages)
    assert answer.choices[0].message.content == "A PDF."
    assert _first_part(claude_upstream) == {
        "type": "document", "title": "b.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": _PDF}
    }  # fmt: skip


def test_a_text_file_reaches_claude_as_a_plain_text_document(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    text = base64.b64encode("Zeile 1\nZeile 2 ü".encode()).decode()
    file = _input_file(filename="n.md", file_data=f"data:text/markdown;base64,{text}")
    _oai(gateway).responses.create(model="claude-r", input=file)
    assert _first_part(claude_upstream) == {
        "type": "document", "title": "n.md", "source": {"type": "text", "media_type": "text/plain", "data": "Zeile 1\nZeile 2 ü"}
    }  # fmt: skip


def test_a_responses_pdf_reaches_a_chat_upstream_as_a_file_part(
    gateway: GatewayProcess, vllm: RecordingUpstream
) -> None:
    answer = _oai(gateway).responses.create(model="vllm-r", input=_input_file(filename="c.pdf", file_data=_PDF_URL))
    assert answer.output_text == "A PDF."
    assert _first_part(vllm) == {"type": "file", "file": {"filename": "c.pdf", "file_data": _PDF_URL}}


@pytest.mark.parametrize(
    ("route", "file", "named"),
    [
        ("claude-r", {"filename": "z.zip", "file_data": "data:application/zip;base64,UEsDBA=="}, "'application/zip'"),
        ("claude-r", {"file_id": "file-abc"}, "file_id"),
        ("vllm-r", {"file_id": "file-abc"}, "file_id"),
        ("vllm-r", {"file_url": "https://example.com/d.pdf"}, "file_url"),
        ("vllm-r", {"filename": "d.pdf", "file_data": _PDF}, "data URL"),
    ],
)
def test_a_file_the_upstream_cannot_read_is_refused_naming_why(
    gateway: GatewayProcess, vllm: RecordingUpstream, claude_upstream: RecordingUpstream,
    route: str, file: dict[str, str], named: str,
) -> None:  # fmt: skip
    sent = len(vllm.bodies), len(claude_upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        _oai(gateway).responses.create(model=route, input=_input_file(**file))
    assert named in str(refused.value.message)
    if "file_url" in file:  # t203: not pointed to file_id, itself refused on every route
        assert "file_data" in refused.value.message and "file_id" not in refused.value.message
    assert (len(vllm.bodies), len(claude_upstream.bodies)) == sent


def test_another_file_under_the_same_words_is_another_cache_key(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    oai = _oai(gateway)
    other = base64.b64encode(b"%PDF-1.4\n% another one\n%%EOF").decode()
    asked = [
        _input_file(filename="k.pdf", file_data=data)
        for data in (_PDF_URL, _PDF_URL, f"data:application/pdf;base64,{other}")
    ]
    said = [
        oai.responses.with_raw_response.create(model="claude-r", input=i, temperature=0, store=False) for i in asked
    ]
    assert [r.headers["x-gateway-cache"] for r in said] == ["miss", "exact", "miss"]
    assert claude_upstream.bodies[-1]["messages"][-1]["content"][0]["source"]["data"] == other


def test_a_messages_pdf_document_reaches_a_chat_upstream_as_a_file_part(
    gateway: GatewayProcess, vllm: RecordingUpstream
) -> None:
    """f236: an Anthropic SDK's document block was a 400 on a route to a chat upstream."""
    messages = _document(_PDF_SOURCE, title="p.pdf")
    answer = _claude(gateway).messages.create(model="vllm-r", max_tokens=20, messages=messages)
    assert answer.content[0].type == "text" and answer.content[0].text == "A PDF."
    assert _first_part(vllm) == {"type": "file", "file": {"filename": "p.pdf", "file_data": _PDF_URL}}


def test_a_messages_text_document_reaches_a_chat_upstream_as_its_text_under_its_title(
    gateway: GatewayProcess, vllm: RecordingUpstream
) -> None:
    source = {"type": "text", "media_type": "text/plain", "data": "Zeile 1\nZeile 2 ü"}
    _claude(gateway).messages.create(model="vllm-r", max_tokens=20, messages=_document(source, title="notes.txt"))
    # a chat model reads a document best as text (vLLM takes no file part); the two text parts are joined
    assert vllm.bodies[-1]["messages"][-1]["content"] == "# notes.txt\n\nZeile 1\nZeile 2 ü\nSummarize."


@pytest.mark.parametrize(
    ("source", "fields", "named"),
    [
        ({"type": "url", "url": "https://example.com/d.pdf"}, {}, "url source"),
        ({"type": "content", "content": [{"type": "text", "text": "x"}]}, {}, "'content'"),
        (_PDF_SOURCE, {"citations": {"enabled": True}}, "citations"),
        (_PDF_SOURCE, {"context": "A report."}, "context"),
    ],
)
def test_a_messages_document_a_chat_upstream_cannot_read_is_refused_naming_why(
    gateway: GatewayProcess, vllm: RecordingUpstream, source: dict[str, Any], fields: dict[str, Any], named: str
) -> None:
    sent = len(vllm.bodies)
    with pytest.raises(anthropic.BadRequestError) as refused:
        _claude(gateway).messages.create(model="vllm-r", max_tokens=20, messages=_document(source, **fields))
    assert named in str(refused.value.message)
    assert len(vllm.bodies) == sent


def test_a_messages_document_translated_for_claude_is_the_same_document_block(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    """A route that may reach a chat model translates it; Claude gets the block as it was sent."""
    messages = _document(_PDF_SOURCE, title="q.pdf", cache_control={"type": "ephemeral"})
    answer = _claude(gateway).messages.create(model="claude-or-vllm", max_tokens=20, messages=messages)
    assert answer.content[0].type == "text" and answer.content[0].text == "A PDF."
    assert _first_part(claude_upstream) == messages[0]["content"][0]


@pytest.mark.parametrize("fields", [{}, {"citations": {"enabled": True}}])
def test_a_messages_document_on_a_route_of_claude_alone_goes_as_it_came(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, fields: dict[str, Any]
) -> None:
    """Passed through, not translated: a text document stays a document (not text under a title)."""
    source = {"type": "text", "media_type": "text/plain", "data": "Plain words."}
    messages = _document(source, title="w.txt", **fields)
    _claude(gateway).messages.create(model="claude-r", max_tokens=20, messages=messages)
    assert _first_part(claude_upstream) == messages[0]["content"][0]


def test_a_tool_results_pdf_reaches_claude_in_its_tool_result_and_is_named_where_a_chat_upstream_cannot_read_it(
    gateway: GatewayProcess, vllm: RecordingUpstream, claude_upstream: RecordingUpstream
) -> None:
    """A chat tool message is text: a function_call_output's PDF was named ``tool_result.image``
    there, which sent a client looking for an image it never sent."""
    items: Any = [
        {"type": "message", "role": "user", "content": "Fetch the report."},
        {"type": "function_call", "call_id": "c1", "name": "fetch", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "The report:"}, {"type": "input_file", "filename": "r.pdf", "file_data": _PDF_URL}]},
    ]  # fmt: skip
    client = _oai(gateway)
    client.responses.create(model="claude-r", input=items, store=False)
    result = claude_upstream.bodies[-1]["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["content"][1] == {
        "type": "document", "title": "r.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": _PDF}
    }  # fmt: skip
    raw = client.responses.with_raw_response.create(model="vllm-r", input=items, store=False)
    assert raw.headers["x-gateway-dropped"] == "tool_result.file"
    assert vllm.bodies[-1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "The report:"}
