"""The Anthropic Messages codec and the chat codec it is paired with, without a server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from gateway.cache.entries import CachedAnswer
from gateway.core.model import (
    Answer,
    Finish,
    ImagePart,
    RedactedThinkingPart,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ThinkingSignature,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    Usage,
    UsageReport,
)
from gateway.errors import InvalidRequestError
from gateway.protocols import anthropic_messages as anthropic
from gateway.protocols import openai_chat
from gateway.upstreams.openai import for_openai_upstream, not_for_openai_upstream


def _decode(**body: Any) -> Any:
    return anthropic.decode_request(msgspec.json.encode({"model": "m", "max_tokens": 10, **body}))


def test_tool_results_come_first_as_tool_messages_then_the_rest_of_the_turn() -> None:
    request = _decode(
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "-3C"}], "is_error": False},
                {"type": "text", "text": "and now?"},
            ]},
        ],
    )  # fmt: skip
    roles = [m.role for m in request.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[0].parts == (TextPart("be brief", cache_control={"type": "ephemeral"}),)
    assert request.messages[2].tool_calls == (ToolCall("t1", "w", '{"city": "Oslo"}'),)
    assert request.messages[3].tool_call_id == "t1" and request.messages[3].text == "-3C"
    body = openai_chat.to_chat_body(request)
    assert body["messages"][2] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}],
    }  # fmt: skip
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "-3C"}


def test_images_tools_and_choices_translate() -> None:
    request = _decode(
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            {"type": "text", "text": "what is it?"}]}],
        tools=[{"name": "f", "input_schema": {"type": "object"}, "description": "does f"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"], metadata={"user_id": "u-9"}, top_k=5,
    )  # fmt: skip
    assert request.messages[0].parts[0] == ImagePart("data:image/png;base64,iVBO")
    body = openai_chat.to_chat_body(request)
    assert body["messages"][0]["content"][0] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBO"},
    }
    assert body["tools"][0]["function"] == {"name": "f", "description": "does f", "parameters": {"type": "object"}}
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert body["stop"] == ["END"] and body["user"] == "u-9"
    assert request.dropped == ["top_k"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"model": "m", "max_tokens": 0, "messages": []}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "'video'"),
        # the field is named as the client sent it, past the blocks taken apart
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}, {"type": "video"}]}]},
         "messages.1.content.1.type"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text"}]}]}]},
         "messages.2.content.0.content.0.text"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ],
)  # fmt: skip
def test_bad_requests_are_named(body: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        anthropic.decode_request(msgspec.json.encode(body))
    assert says in raised.value.message


def test_count_tokens_needs_no_max_tokens() -> None:
    request = anthropic.decode_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', counting=True)
    assert request.max_tokens is None
    with pytest.raises(InvalidRequestError, match="at least one message"):  # as /v1/messages refuses it
        anthropic.decode_request(b'{"model": "m", "messages": []}', counting=True)


def test_what_anthropic_takes_of_budgets_breakpoints_and_stops_is_taken() -> None:
    """f200 refuses a budget under 1024 or not under ``max_tokens``, a fifth ``cache_control`` block
    and an empty stop string; what Anthropic takes around them is taken: a budget past
    ``max_tokens`` with tools (interleaved thinking spends it over the turn), one with no
    ``max_tokens`` to pass (a count), four breakpoints, and a stop with text around its whitespace
    (one of whitespace alone is Anthropic's 400: f222)."""
    mark = {"type": "ephemeral"}
    thinking = {"type": "enabled", "budget_tokens": 4096}
    tools = [{"name": "f", "input_schema": {"type": "object"}, "cache_control": mark}]
    turns = [{"role": "user", "content": [{"type": "text", "text": t, "cache_control": mark} for t in "ab"]}]
    taken = _decode(max_tokens=1024, thinking=thinking, tools=tools, messages=turns, stop_sequences=["\nEND"],
                    system=[{"type": "text", "text": "s", "cache_control": mark}])  # fmt: skip
    assert taken.thinking == thinking and taken.stop == ["\nEND"]
    counted = anthropic.decode_request(
        msgspec.json.encode({"model": "m", "thinking": thinking, "messages": [{"role": "user", "content": "x"}]}),
        counting=True,
    )
    assert counted.thinking == thinking
    with pytest.raises(InvalidRequestError, match="greater than `thinking\\.budget_tokens`"):
        _decode(max_tokens=4096, thinking=thinking, messages=turns)
    with pytest.raises(InvalidRequestError, match="Found 5"):
        _decode(tools=tools, messages=[*turns, {"role": "assistant", "content": turns[0]["content"]}])


def test_usage_reports_cache_reads_and_writes_apart_from_input_tokens() -> None:
    answer = Answer(
        id="x", model="m", text="hi", tool_calls=[ToolCall("c1", "f", '{"a": 1}'), ToolCall("c2", "g", "{oops")],
        finish_reason="tool_calls", usage=Usage(input_tokens=1000, output_tokens=20, cached_input_tokens=800),
    )  # fmt: skip
    body = msgspec.json.decode(anthropic.encode_answer(answer, "msg_1", "claude-x"))
    assert body["usage"] == {"input_tokens": 200, "output_tokens": 20, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 800}  # fmt: skip
    assert body["stop_reason"] == "tool_use" and body["model"] == "claude-x"
    assert body["content"][1] == {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}
    assert body["content"][2]["input"] == {"_raw_arguments": "{oops"}


def test_openai_usage_details_are_read() -> None:
    usage = openai_chat.usage_from({"prompt_tokens": 50, "completion_tokens": 30,
                                    "prompt_tokens_details": {"cached_tokens": 40},
                                    "completion_tokens_details": {"reasoning_tokens": 12}})  # fmt: skip
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens) == (
        50,
        30,
        40,
        12,
    )


def _events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in stream.strip().split(b"\n\n"):
        name, data = frame.split(b"\n")
        out.append((name[7:].decode(), msgspec.json.decode(data[6:])))
    return out


def test_a_streamed_text_then_tool_call_becomes_two_content_blocks() -> None:
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me"}}]},
        {"choices": [{"index": 0, "delta": {"content": " check."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                            "function": {"name": "w", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9}},
    ]  # fmt: skip
    stream = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in chunks) + encoder.finish()
    events = _events(stream)
    assert [name for name, _ in events] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "w", "input": {}}
    assert events[7][1]["delta"]["partial_json"] == '{"city":"Oslo"}'  # the call's input, whole
    assert events[9][1]["delta"]["stop_reason"] == "tool_use"
    assert events[9][1]["usage"]["output_tokens"] == 9 and events[9][1]["usage"]["input_tokens"] == 12


def test_text_after_a_tool_call_streams_at_once_in_the_text_block_it_left() -> None:
    """f142: the text after a call opened a second text block, while the whole message has one;
    it still goes out as it comes, only the call is held."""
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me check."}}]},
        _call(0, name="w", arguments='{"city": "Oslo"}'),
        {"choices": [{"index": 0, "delta": {"content": " Done."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    encoder.start()
    sent = [_events(out) if (out := encoder.feed(reader.read(chunk))) else [] for chunk in chunks]
    assert [[name for name, _ in events] for events in sent] == [
        ["content_block_start", "content_block_delta"],
        [],
        ["content_block_delta"],
        [],
    ]
    assert sent[2][0][1] == {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": " Done."}}  # fmt: skip
    blocks = [
        data["content_block"]["type"] for name, data in _events(encoder.finish()) if name == "content_block_start"
    ]
    assert blocks == ["tool_use"]


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("END", ("stop_sequence", "END")),
        (128009, ("end_turn", None)),
        (None, ("end_turn", None)),
        ("", ("end_turn", None)),
    ],
)
def test_vllms_stop_reason_says_which_stop_sequence_ended_the_stream(
    stop_reason: Any, expected: tuple[str, Any]
) -> None:
    """vLLM's ``stop_reason`` is the stop string it matched, or the id of a stop token (an end
    of sequence, not a stop sequence), or null."""
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": "Hi"}, "stop_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": stop_reason}]},
    ]
    stream = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in chunks) + encoder.finish()
    delta = next(data["delta"] for name, data in _events(stream) if name == "message_delta")
    assert (delta["stop_reason"], delta["stop_sequence"]) == expected
    answer = openai_chat.answer_from_completion(
        {"choices": [{"message": {"content": "Hi"}, "finish_reason": "stop", "stop_reason": stop_reason}]}
    )
    assert (answer.finish_reason, answer.stop_sequence) == (("stop_sequence", "END") if expected[1] else ("stop", None))


def _tool_inputs(chunks: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    stream = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in chunks) + encoder.finish()
    events = _events(stream)
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    parts = [data["delta"]["partial_json"] for name, data in events if name == "content_block_delta"]
    return [(block["name"], json.loads(part)) for block, part in zip(starts, parts, strict=True)]


def _call(index: int, **function: str) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": function}
    if "name" in function:
        call.update(id=f"call_{index}", type="function")
    return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


def test_parallel_calls_whose_arguments_interleave_keep_every_argument() -> None:
    # Legal OpenAI chunking: both calls announced, then their arguments. Anthropic blocks
    # cannot be reopened, so the calls are sent whole at the end.
    chunks = [
        _call(0, name="a", arguments=""), _call(1, name="b", arguments=""),
        _call(0, arguments='{"x": 1}'), _call(1, arguments='{"y": 2}'),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]  # fmt: skip
    assert _tool_inputs(chunks) == [("a", {"x": 1}), ("b", {"y": 2})]


def test_streamed_arguments_that_are_not_an_object_arrive_as_the_non_streamed_answer_has_them() -> None:
    chunks = [
        _call(0, name="a", arguments="{not json"), _call(1, name="b", arguments="[1, 2]"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]  # fmt: skip
    assert _tool_inputs(chunks) == [("a", {"_raw_arguments": "{not json"}), ("b", {"value": [1, 2]})]


def test_signed_thinking_travels_in_the_chat_body_and_never_to_an_openai_upstream() -> None:
    request = _decode(
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "sig=="},
                {"type": "redacted_thinking", "data": "ZW5j"},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {}},
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "-3C"}]},
        ],
    )  # fmt: skip
    assert request.thinking == {"type": "enabled", "budget_tokens": 1024} and request.dropped == []
    assert request.messages[1].parts == (ThinkingPart("Use the tool.", "sig=="), RedactedThinkingPart("ZW5j"))
    body = openai_chat.to_chat_body(request)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "Use the tool.", "signature": "sig=="},
        {"type": "redacted_thinking", "data": "ZW5j"},
    ]
    plain = for_openai_upstream(body)
    assert "thinking" not in plain and plain["messages"][1]["content"] is None
    assert plain["messages"][1]["tool_calls"] == body["messages"][1]["tool_calls"]
    simple = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert for_openai_upstream(simple) is simple  # nothing to take out: not copied


def test_what_an_openai_upstream_is_not_sent_of_a_chat_clients_request_is_named() -> None:
    """A chat client's ``thinking`` reached a vLLM route without a word (t78), where a Messages
    client is told: what :func:`for_openai_upstream` takes out is named."""
    marked = {"type": "text", "text": "Long context.", "cache_control": {"type": "ephemeral"}}
    tool = {"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}}
    signed = {"type": "thinking", "thinking": "Hmm.", "signature": "sig=="}
    hi: dict[str, Any] = {"role": "user", "content": "hi"}
    asked: list[tuple[dict[str, Any], list[str]]] = [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, ["thinking"]),
        ({"messages": [{"role": "user", "content": [marked]}]}, ["cache_control"]),
        ({"tools": [tool]}, ["cache_control"]),
        ({"messages": [hi, {"role": "assistant", "content": [signed, {"type": "text", "text": "4"}]}, hi]}, ["thinking"]),
        ({"messages": [hi, {"role": "assistant", "content": "4", "thinking_blocks": [signed]}, hi]}, ["thinking"]),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}], "thinking": {"type": "enabled"}},
         ["thinking"]),  # a body the internal model cannot hold whole
        ({"messages": [hi, {"role": "assistant", "content": "4", "reasoning_content": "vLLM's"}, hi]}, []),
        ({}, []),
    ]  # fmt: skip
    for extra, named in asked:
        body = {"model": "m", "messages": [hi], **extra}
        assert not_for_openai_upstream(openai_chat.read_chat_request(body)) == named, extra
        if not named:
            assert for_openai_upstream(body) is body  # nothing taken out
        assert "sig==" not in json.dumps(for_openai_upstream(body))  # t128: named, yet thinking_blocks went on


@pytest.mark.parametrize("streamed", [False, True])
def test_an_answers_signed_thinking_sent_back_by_a_chat_client_reaches_anthropic(streamed: bool) -> None:
    """``messages.append(completion.choices[0].message)``: Anthropic refuses a tool-result turn
    whose assistant turn lost its thinking. A streamed answer's block has its text in the
    ``reasoning_content`` deltas and only the signature in ``thinking_blocks``."""
    block = {"type": "thinking", "thinking": "" if streamed else "Let me think.", "signature": "sig_1"}
    echoed = {
        "role": "assistant", "content": "Checking.", "reasoning_content": "Let me think.",
        "thinking_blocks": [block, {"type": "redacted_thinking", "data": "blob"}],
        "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }  # fmt: skip
    body = {"model": "m", "messages": [
        {"role": "user", "content": "go"}, echoed, {"role": "tool", "tool_call_id": "toolu_1", "content": "ok"},
    ]}  # fmt: skip
    sent = anthropic.encode_request(openai_chat.read_chat_request(body), "claude", stream=False)
    assert sent["messages"][1]["content"][:2] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig_1"},
        {"type": "redacted_thinking", "data": "blob"},
    ]
    unsigned = {**echoed, "thinking_blocks": None}  # vLLM's reasoning is never sent back
    plain = anthropic.encode_request(openai_chat.read_chat_request({**body, "messages": [
        body["messages"][0], unsigned, body["messages"][2]]}), "claude", stream=False)  # fmt: skip
    assert [block["type"] for block in plain["messages"][1]["content"]] == ["text", "tool_use"]


def test_a_context_window_stop_reads_as_a_cut_answer_and_keeps_its_word_for_messages_clients() -> None:
    message = {"id": "m", "type": "message", "role": "assistant", "model": "c", "content": [{"type": "text", "text": "a"}],
               "stop_reason": "model_context_window_exceeded", "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    answer = anthropic.decode_answer(message)
    assert answer is not None and openai_chat.chat_finish_reason(answer.finish_reason) == "length"
    encoded = msgspec.json.decode(anthropic.encode_answer(answer, "m", "c"))
    assert encoded["stop_reason"] == "model_context_window_exceeded"  # t115: was max_tokens


def test_text_on_both_sides_of_a_tool_call_does_not_fuse_but_cited_pieces_do() -> None:
    def message(*content: dict[str, Any]) -> dict[str, Any]:
        return {"id": "m", "type": "message", "role": "assistant", "model": "c", "content": list(content),
                "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip

    call = {"type": "tool_use", "id": "t1", "name": "get", "input": {}}
    around = anthropic.decode_answer(
        message({"type": "text", "text": "First."}, call, {"type": "text", "text": "Second."})
    )
    assert around is not None and around.text == "First.\nSecond." and len(around.tool_calls) == 1
    cited = anthropic.decode_answer(message({"type": "text", "text": "It is "}, {"type": "text", "text": "42", "citations": []},
                                            {"type": "text", "text": "."}))  # fmt: skip
    assert cited is not None and cited.text == "It is 42."
    decoder = anthropic.StreamDecoder()
    events: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "First."}},
        {"type": "content_block_start", "index": 1, "content_block": {**call, "input": {}}},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Second."}},
    ]
    streamed = [d.text for event in events for d in decoder.feed(event) if isinstance(d, TextDelta)]
    assert "".join(streamed) == around.text


def test_a_message_deltas_null_cache_counts_keep_what_message_start_said() -> None:
    """Every count of a ``message_delta``'s usage but the output's may be null: a null keeps the
    earlier figure, as the SDKs merge them (t27: the cache's 60 tokens fell out of the bill)."""
    decoder = anthropic.StreamDecoder()
    start = {"input_tokens": 43, "cache_read_input_tokens": 50, "cache_creation_input_tokens": 10, "output_tokens": 1}
    decoder.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": start}})
    nulls = {"input_tokens": 43, "cache_read_input_tokens": None, "cache_creation_input_tokens": None,
             "output_tokens": 6}  # fmt: skip
    decoder.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": nulls})
    assert decoder.usage == Usage(input_tokens=103, output_tokens=6, cached_input_tokens=50, cache_write_tokens=10)
    decoder.feed({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}})  # only the output's
    assert decoder.usage == Usage(input_tokens=103, output_tokens=9, cached_input_tokens=50, cache_write_tokens=10)
    whole = {"input_tokens": 40, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 70, "output_tokens": 12}
    decoder.feed({"type": "message_delta", "delta": {}, "usage": whole})  # cumulative figures replace the earlier
    assert decoder.usage == Usage(input_tokens=110, output_tokens=12, cached_input_tokens=0, cache_write_tokens=70)
    late = anthropic.StreamDecoder()  # no prompt count from the upstream: the gateway counts (t47: $0)
    late.feed({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}})
    assert late.usage is None


def test_a_message_delta_of_zeros_for_the_prompt_keeps_what_message_start_counted() -> None:
    """t186: a proxy's ``message_delta`` said 0 for every prompt count after ``message_start`` had
    counted 55,100: the usage was refused as having no prompt, and the stream billed on the
    gateway's count, 88 times short, its output count lost with it."""
    decoder = anthropic.StreamDecoder()
    start = {"input_tokens": 100, "cache_read_input_tokens": 50_000, "cache_creation_input_tokens": 5_000,
             "output_tokens": 1, "cache_creation": {"ephemeral_5m_input_tokens": 2_000, "ephemeral_1h_input_tokens": 3_000}}  # fmt: skip
    decoder.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": start}})
    zeros = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 40}
    decoder.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": zeros})
    assert decoder.usage == Usage(
        input_tokens=55_100, output_tokens=40, cached_input_tokens=50_000, cache_write_tokens=5_000,
        cache_write_1h_tokens=3_000,
    )  # fmt: skip


def test_hour_long_cache_writes_are_read_whole_and_streamed_and_told_back() -> None:
    raw = {"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 0, "output_tokens": 3,
           "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70}}  # fmt: skip
    usage = anthropic.usage_from_wire(raw)
    assert usage is not None and (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (100, 70)
    decoder = anthropic.StreamDecoder()
    decoder.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": raw}})
    decoder.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}})
    assert decoder.usage is not None and decoder.usage.cache_write_1h_tokens == 70
    assert anthropic.usage_body(usage)["cache_creation"] == {"ephemeral_5m_input_tokens": 30,
                                                             "ephemeral_1h_input_tokens": 70}  # fmt: skip


def test_streamed_thinking_becomes_a_thinking_block_closed_by_its_signature() -> None:
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Think"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]},
        {"choices": [{"index": 0, "delta": {"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "s1"}]}}]},
        {"choices": [{"index": 0, "delta": {"thinking_blocks": [{"type": "redacted_thinking", "data": "ZW5j"}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "Done."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]  # fmt: skip
    stream = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in chunks) + encoder.finish()
    events = _events(stream)
    assert [name for name, _ in events][2:-2] == [
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
    ]  # fmt: skip
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert [e[1]["delta"] for e in events[3:6]] == [
        {"type": "thinking_delta", "thinking": "Think"},
        {"type": "thinking_delta", "thinking": "ing."},
        {"type": "signature_delta", "signature": "s1"},
    ]
    assert events[7][1]["content_block"] == {"type": "redacted_thinking", "data": "ZW5j"}
    assert [e[1]["index"] for e in events[2:12] if e[0] == "content_block_start"] == [0, 1, 2]


def test_a_cached_answer_replays_its_thinking_in_order() -> None:
    message = {"role": "assistant", "content": "Done.", "reasoning_content": "Thinking.",
               "thinking_blocks": [{"type": "thinking", "thinking": "Thinking.", "signature": "s1"}]}  # fmt: skip
    body = {"model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    stored = openai_chat.storable_answer(body)
    assert stored is not None and stored.thinking == [ThinkingPart("Thinking.", "s1")]
    cached = CachedAnswer(answer=stored, model="m", provider="p", prompt_tokens=1, completion_tokens=2, cost_usd=0.0,
                          created_at=0.0)  # fmt: skip
    entry = CachedAnswer.decode(cached.encode())
    assert entry is not None
    reader = openai_chat.ChunkReader()
    deltas = [
        delta
        for event in openai_chat.stream_from_answer(entry.served_as("chatcmpl-1"), 1, include_usage=False)
        if event != b"data: [DONE]\n\n"
        for delta in reader.read(msgspec.json.decode(event[6:]))
    ]
    assert deltas[:3] == [ThinkingDelta("Thinking."), ThinkingSignature("s1"), TextDelta("Done.")]


CLAUDE_CODE_SHAPED: dict[str, Any] = {
    "model": "claude-sim",
    "max_tokens": 1024,
    "system": [
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Project notes.", "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {"role": "user", "content": "List the files."},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should look.", "signature": "sig-1"},
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {"path": "."}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py b.py"},
                {"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
            ],
        },
    ],
    "tools": [{"name": "ls", "description": "List", "input_schema": {"type": "object", "properties": {}}}],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "temperature": 0.2,
    "stop_sequences": ["END"],
    "metadata": {"user_id": "u-1"},
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "stream": True,
}


def test_a_request_anthropic_sent_comes_back_the_same_through_the_internal_model_and_a_chat_body() -> None:
    """Anthropic → internal → chat body (the pipeline) → internal → Anthropic: nothing lost or moved."""
    decoded = anthropic.decode_request(msgspec.json.encode(CLAUDE_CODE_SHAPED))
    chat = openai_chat.to_chat_body(decoded)
    again = openai_chat.request_from_chat_body(msgspec.json.decode(msgspec.json.encode(chat)))
    assert anthropic.encode_request(again, "claude-sim", stream=True) == CLAUDE_CODE_SHAPED


def test_a_chat_request_keeps_what_the_internal_model_holds() -> None:
    chat: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "max_completion_tokens": 50,
        "stop": "END",
        "seed": 7,
    }  # fmt: skip
    request = openai_chat.request_from_chat_body(chat)
    assert request.max_tokens == 50 and request.stop == ["END"] and request.tool_choice is not None
    assert request.tool_choice.mode == "required" and request.tools[0].name == "f"
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[2].tool_calls == (ToolCall("c1", "f", '{"a": 1}'),)
    assert request.messages[1].parts == (TextPart("Hi"), ImagePart("https://x/a.png"))
    back = openai_chat.to_chat_body(request)
    assert back["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "done"}
    assert back["tool_choice"] == "required" and back["max_tokens"] == 50


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "cannot be sent"),
        ([{"role": "assistant", "tool_calls": [{"id": "c"}]}], "needs an id and a function name"),
        ([{"role": "tool", "content": "x"}], "needs a tool_call_id"),
        ([{"role": "narrator", "content": "x"}], "is not supported"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}], "only text"),
    ],
)
def test_a_chat_request_the_internal_model_cannot_hold_is_refused_naming_where(messages: list[Any], said: str) -> None:
    with pytest.raises(InvalidRequestError, match=said) as refused:
        openai_chat.request_from_chat_body({"model": "m", "messages": messages})
    assert refused.value.message.startswith("messages[0]")


def test_deltas_survive_anthropics_event_stream_and_back() -> None:
    """StreamEncoder (what the gateway sends Anthropic clients) and StreamDecoder (what it reads
    from Anthropic upstreams) are each other's reverse."""
    sent: list[Any] = [
        ThinkingDelta("Let me think."),
        ThinkingSignature("sig-9"),
        TextDelta("Checking"),
        TextDelta(" the weather."),
        ToolCallStart(0, "toolu_1", "get_weather"),
        ToolArgumentsDelta(0, '{"city": '),
        ToolArgumentsDelta(0, '"Paris"}'),
        Finish("tool_calls"),
        UsageReport(Usage(input_tokens=12, output_tokens=30)),
    ]
    encoder = anthropic.StreamEncoder("msg_1", "claude-sim", 12)
    frames = encoder.start() + encoder.feed(sent) + encoder.finish()
    decoder = anthropic.StreamDecoder()
    got: list[Any] = []
    for frame in frames.decode().split("\n\n"):
        if frame.strip():
            got += decoder.feed(msgspec.json.decode(frame.split("data: ", 1)[1]))
    assert decoder.id == "msg_1" and decoder.model == "claude-sim"
    whole = [*sent[:5], ToolArgumentsDelta(0, '{"city":"Paris"}'), sent[7]]  # a tool call's input comes whole
    assert [d for d in got if not isinstance(d, UsageReport)] == whole
    assert decoder.usage is not None and (decoder.usage.input_tokens, decoder.usage.output_tokens) == (12, 30)


def test_a_streamed_call_without_input_has_arguments_a_client_can_parse() -> None:
    """Claude streams a call without input as one empty ``input_json_delta``: chat and Responses
    clients got ``arguments: ""`` (``json.loads`` fails) where the whole message gives ``{}`` (t52)."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                       "name": "get_time", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_2",
                                                                       "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"c'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '": 1}'}},
        {"type": "content_block_stop", "index": 1},
    ]  # fmt: skip
    decoder = anthropic.StreamDecoder()
    got = [delta for event in events for delta in decoder.feed(event)]
    assert [d for d in got if isinstance(d, ToolArgumentsDelta)] == [
        ToolArgumentsDelta(0, "{}"),
        ToolArgumentsDelta(1, '{"c'),
        ToolArgumentsDelta(1, '": 1}'),
    ]


def test_an_upstream_message_reads_as_the_answer_a_client_message_was_written_from() -> None:
    answer = Answer(
        id="msg_2",
        model="claude-sim",
        thinking=[ThinkingPart("Hmm.", "sig-1"), RedactedThinkingPart("opaque")],
        text="It is sunny.",
        tool_calls=[ToolCall("toolu_2", "get_weather", '{"city":"Paris"}')],
        finish_reason="tool_calls",
        usage=Usage(input_tokens=20, output_tokens=9, cached_input_tokens=5, cache_write_tokens=3),
    )
    again = anthropic.decode_answer(msgspec.json.decode(anthropic.encode_answer(answer, "msg_2", "claude-sim")))
    assert again == answer
    completion = msgspec.json.decode(openai_chat.completion_from_answer(again, again.usage))
    assert openai_chat.answer_from_completion(completion).tool_calls == answer.tool_calls
    assert completion["choices"][0]["message"]["reasoning_content"] == "Hmm."
    assert completion["usage"]["prompt_tokens"] == 20 and completion["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 5,
        "cache_write_tokens": 3,  # the dearer part of the prompt, as the openai SDK reads it (t78)
    }


def test_a_forced_tool_call_that_vllm_ends_with_stop_is_tool_use() -> None:
    """vLLM ends a required or named tool call with ``finish_reason: stop``; Anthropic's agent
    loops look for ``tool_use``."""
    reader, encoder = openai_chat.ChunkReader(), anthropic.StreamEncoder("msg_1", "m", 0)
    chunks: list[dict[str, Any]] = [_call(0, name="get_time", arguments="{}"),
                                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]  # fmt: skip
    stream = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in chunks) + encoder.finish()
    delta = next(data["delta"] for name, data in _events(stream) if name == "message_delta")
    assert delta["stop_reason"] == "tool_use"
    completion = {"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        "finish_reason": "stop"}]}  # fmt: skip
    body = json.loads(anthropic.encode_answer(openai_chat.answer_from_completion(completion), "msg_1", "m"))
    assert body["stop_reason"] == "tool_use" and body["content"][0]["type"] == "tool_use"


def test_every_stop_sequence_reaches_a_chat_upstream() -> None:
    """OpenAI takes 4 (and refuses more itself, in the client's protocol); vLLM takes any number:
    none is dropped on the way."""
    stops = ["a", "b", "c", "d", "e", "f"]
    body = openai_chat.to_chat_body(_decode(messages=[{"role": "user", "content": "hi"}], stop_sequences=stops))
    assert body["stop"] == stops


def test_an_answer_whose_reasoning_a_replay_would_lose_is_not_stored() -> None:
    """Newer vLLM names it ``reasoning``; the internal answer replays ``reasoning_content`` only."""
    message = {"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4."}
    assert openai_chat.storable_answer({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}) is None
    older = {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4."}
    stored = openai_chat.storable_answer({"choices": [{"index": 0, "message": older, "finish_reason": "stop"}]})
    assert stored is not None and stored.thinking


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_newer_vllms_reasoning_field_reaches_anthropic_clients_too(field: str) -> None:
    """vLLM renamed ``reasoning_content`` to ``reasoning``: a thinking block either way, streamed or not."""
    message = {"role": "assistant", "content": "4", field: "2 and 2 make 4."}
    answer = openai_chat.answer_from_completion(
        {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    )
    assert answer.thinking == [ThinkingPart("2 and 2 make 4.")]
    deltas = openai_chat.ChunkReader().read({"choices": [{"index": 0, "delta": {field: "2 and 2"}}]})
    assert deltas == [ThinkingDelta("2 and 2")]


def test_an_impossible_token_count_is_no_count() -> None:
    """A negative count must never reach a bill or a metric (a counter refuses to go down,
    and the request's log line was lost with it): the gateway counts instead."""
    assert openai_chat.read_usage({"prompt_tokens": -5, "completion_tokens": 3}) is None
    assert openai_chat.read_usage({"prompt_tokens": True, "completion_tokens": 3}) is None
    usage = anthropic.usage_from_wire({"input_tokens": 4, "output_tokens": -9, "cache_read_input_tokens": -1})
    assert usage is not None and (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) == (4, 0, 0)


def test_user_turns_in_a_row_reach_a_chat_upstream_as_one() -> None:
    """Anthropic's API combines them; Gemma's or Mistral's chat template refuses roles that do not alternate."""
    request = _decode(
        messages=[
            {"role": "user", "content": "First question."},
            {"role": "user", "content": [{"type": "text", "text": "And a second."}]},
            {"role": "assistant", "content": "Answer."},
            {"role": "user", "content": "Thanks."},
        ]
    )
    messages = openai_chat.to_chat_body(request)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "First question.\nAnd a second."


async def test_a_replayed_hits_message_start_counts_cache_reads_apart() -> None:
    """message_start of a cache hit told as a stream carries the whole usage, as message_delta does:
    input_tokens without the upstream's cache reads (LangChain reads it from message_start)."""
    from gateway.api.messages import _events
    from gateway.core.replay import deltas_of
    from gateway.pipeline import DeltaBatch, StreamingDeltas

    usage = Usage(input_tokens=100, output_tokens=7, cached_input_tokens=60)

    async def replayed() -> AsyncIterator[DeltaBatch]:  # as the pipeline replays a hit
        for delta in deltas_of(Answer(id="", model="m", text="Hello.", finish_reason="stop", usage=usage)):
            yield [delta]
        yield None

    hit = StreamingDeltas({}, replayed(), usage.input_tokens, usage)
    events = [event async for event in _events(hit, "msg_1", "m")]
    start = json.loads(events[0].split(b"data: ", 1)[1].split(b"\n", 1)[0])["message"]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"], start["output_tokens"]) == (40, 60, 0)


def test_thinking_goes_without_the_signed_thinking_of_a_turn_another_model_answered() -> None:
    """A fallback to a chat server answered one turn of a thinking tool loop: its reasoning is not
    Anthropic's, so that turn opens with the tool call, and Anthropic refused every later turn
    (400, no fallback tried: t21). The request then goes without ``thinking``, as Anthropic advises."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}
    thinking = {"type": "enabled", "budget_tokens": 2048}

    def sent(assistant: list[dict[str, Any]]) -> dict[str, Any]:
        messages = [{"role": "user", "content": "list files"}, {"role": "assistant", "content": assistant},
                    {"role": "user", "content": [result]}]  # fmt: skip
        request = _decode(max_tokens=4096, messages=messages, thinking=thinking)
        return anthropic.encode_request(request, "claude", stream=False)

    signed = {"type": "thinking", "thinking": "ls it", "signature": "sig"}
    assert sent([signed, call])["thinking"] == thinking
    unsigned = {"type": "thinking", "thinking": "I'll list them.", "signature": ""}  # a chat server's reasoning
    assert "thinking" not in sent([unsigned, {"type": "text", "text": "Listing."}, call])
    assert "thinking" not in sent([{"type": "text", "text": "Listing."}, call])  # a chat model without reasoning
    # the loop over, a new question: thinking goes again (t23 saw it dropped for good)
    after = [{"role": "user", "content": "list files"}, {"role": "assistant", "content": [call]},
             {"role": "user", "content": [result]}, {"role": "assistant", "content": "a.py"},
             {"role": "user", "content": "and now?"}]  # fmt: skip
    assert anthropic.encode_request(
        _decode(max_tokens=4096, messages=after, thinking=thinking), "claude", stream=False
    )["thinking"]
    plain = [{"role": "user", "content": "hi"}]
    assert anthropic.encode_request(
        _decode(max_tokens=4096, messages=plain, thinking=thinking), "claude", stream=False
    )["thinking"]
    # a loop is one assistant turn to Anthropic: without interleaved thinking Claude thinks once, at its
    # start, and its later calls come bare; thinking stays on (t24 saw it dropped mid-turn)
    second = {**call, "id": "toolu_2"}
    loop = [{"role": "user", "content": "list files"}, {"role": "assistant", "content": [signed, call]},
            {"role": "user", "content": [result]}, {"role": "assistant", "content": [second]},
            {"role": "user", "content": [{**result, "tool_use_id": "toolu_2"}]}]  # fmt: skip
    assert anthropic.encode_request(_decode(max_tokens=4096, messages=loop, thinking=thinking), "claude", stream=False)[
        "thinking"
    ]
    opened_elsewhere = [loop[0], {"role": "assistant", "content": [call]}, *loop[2:]]
    assert anthropic.thinking_left_out(
        _decode(max_tokens=4096, messages=opened_elsewhere, thinking=thinking)
    )  # said in a header
    assert not anthropic.thinking_left_out(_decode(max_tokens=4096, messages=loop, thinking=thinking))
    assert "thinking" not in anthropic.encode_request(_decode(max_tokens=4096, messages=opened_elsewhere, thinking=thinking), "claude",
                                                      stream=False)  # fmt: skip


def test_a_held_tool_input_keeps_the_stream_alive_with_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tool calls go out whole at the end of the message: a model writing a long file sent the
    client nothing for 9 s, which a proxy's idle timeout would cut (t21)."""
    clock = [100.0]
    monkeypatch.setattr("gateway.protocols.anthropic_messages.time.monotonic", lambda: clock[0])
    encoder = anthropic.StreamEncoder("m1", "claude", 10)
    encoder.start()
    assert encoder.feed([ToolCallStart(0, "toolu_1", "write_file"), ToolArgumentsDelta(0, '{"text": "')]) == b""
    clock[0] += 6
    assert b"event: ping" in encoder.feed([ToolArgumentsDelta(0, "a long file")])
    assert encoder.feed([ToolArgumentsDelta(0, '"}')]) == b""  # a few seconds apart, not every piece
    assert b'"name":"write_file"' in encoder.finish()


def test_tool_call_ids_another_model_wrote_reach_anthropic_in_its_form_and_stay_paired() -> None:
    """Kimi K2's ``functions.get_weather:0`` reached Anthropic as is and was refused (t21)."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "functions.get_weather:0", "name": "w", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": "sun"}]},
    ]  # fmt: skip
    body = anthropic.encode_request(_decode(messages=messages), "claude", stream=False)
    call, result = body["messages"][1]["content"][0], body["messages"][2]["content"][0]
    assert call["id"] == result["tool_use_id"] and call["id"].startswith("functions_get_weather_0_")
    assert anthropic._tool_id("call.1") != anthropic._tool_id("call:1")  # mapped alike, kept apart (t23)
    assert anthropic._tool_id("toolu_01A-b") == "toolu_01A-b"


def test_a_tool_results_cache_breakpoint_reaches_anthropic_through_a_translation() -> None:
    """Claude Code marks the newest tool result: on a route with a chat fallback the marker was
    dropped, and each round of an agent loop paid the whole prompt at the full price (t21)."""
    marker = {"type": "ephemeral"}
    messages = [
        {"role": "user", "content": "ls"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py",
                                      "cache_control": marker}]},
    ]  # fmt: skip
    assert anthropic.nested_fields_not_carried({"messages": messages}) == []
    body = anthropic.encode_request(_decode(messages=messages), "claude", stream=False)
    assert body["messages"][2]["content"][0]["cache_control"] == marker


@pytest.mark.parametrize(
    ("said", "max_tokens", "told"),
    [
        (  # vLLM before 0.10, OpenAI: the prompt alone fits
            "upstream 'vllm': HTTP 400: This model's maximum context length is 32768 tokens. However, you requested "
            "40000 tokens (31000 in the messages, 9000 in the completion). Please reduce the length of the messages "
            "or completion.",
            9000,
            "input length and `max_tokens` exceed context limit: 31000 + 9000 > 32768, decrease input length or "
            "`max_tokens` and try again",
        ),
        (  # vLLM 0.11 (claude-code-router #1799)
            "upstream 'vllm': HTTP 400: Requested token count exceeds the model's maximum context length of 262144 "
            "tokens. You requested a total of 262462 tokens: 230462 tokens from the input messages and 32000 tokens "
            "for the completion.",
            32000,
            "input length and `max_tokens` exceed context limit: 230462 + 32000 > 262144, decrease input length or "
            "`max_tokens` and try again",
        ),
        (  # vLLM: the completion's size from the request
            "upstream 'vllm': HTTP 400: This model's maximum context length is 4096 tokens and your request has 4000 "
            "input tokens",
            1000,
            "input length and `max_tokens` exceed context limit: 4000 + 1000 > 4096, decrease input length or "
            "`max_tokens` and try again",
        ),
        (  # vLLM 0.10.2+ (t170: the sizes were not read)
            "upstream 'vllm': HTTP 400: This model's maximum context length is 1024 tokens. However, your request has "
            "1044 input tokens. Please reduce the length of the input messages.",
            600,
            "prompt is too long: 1044 tokens > 1024 maximum",
        ),
        (  # vLLM before 0.10, the prompt alone (t170)
            "upstream 'vllm': HTTP 400: This model's maximum context length is 32768 tokens. However, you requested "
            "32818 tokens in the messages, Please reduce the length of the messages.",
            512,
            "prompt is too long: 32818 tokens > 32768 maximum",
        ),
        (  # vLLM's V1 engine (t170)
            "upstream 'vllm': HTTP 400: Input length (196905) exceeds model's maximum context length (196608).",
            512,
            "prompt is too long: 196905 tokens > 196608 maximum",
        ),
        (  # llama.cpp
            "upstream 'local': HTTP 400: request (24071 tokens) exceeds the available context size (8192 tokens)",
            512,
            "prompt is too long: 24071 tokens > 8192 maximum",
        ),
        (  # no sizes said: still the words Claude Code compacts on
            "upstream 'x': HTTP 400: The input is too long for the model's context window.",
            512,
            "prompt is too long: The input is too long for the model's context window.",
        ),
    ],
)
def test_a_context_overflow_is_worded_as_anthropic_words_it(said: str, max_tokens: int, told: str) -> None:
    """(t59) Claude Code reads Anthropic's two wordings, with their sizes, and no other."""
    assert anthropic.context_overflow_message(said, max_tokens) == told


def test_what_an_answer_ran_with_is_read_whole_and_streamed() -> None:
    """t59: ``speed``, ``inference_geo`` and ``server_tool_use`` were not read, and fast mode,
    US-only inference and web searches were billed at the base price."""
    raw = {"input_tokens": 10, "output_tokens": 5, "speed": "fast", "inference_geo": "us",
           "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0}}  # fmt: skip
    usage = anthropic.usage_from_wire(raw)
    assert usage is not None and (usage.speed, usage.inference_geo) == ("fast", "us")
    assert usage.server_tool_requests == {"web_search": 3}  # none used: none billed
    decoder = anthropic.StreamDecoder()
    start = {"input_tokens": 10, "output_tokens": 1, "speed": "fast", "inference_geo": "us"}
    decoder.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": start}})
    final = {"output_tokens": 7, "server_tool_use": {"web_search_requests": 2}}
    decoder.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": final})
    assert decoder.usage is not None and (decoder.usage.speed, decoder.usage.inference_geo) == ("fast", "us")
    assert decoder.usage.server_tool_requests == {"web_search": 2} and decoder.usage.output_tokens == 7


def test_the_options_a_request_pays_more_for_are_read() -> None:
    body = {"speed": "fast", "inference_geo": "us", "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 4},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "bash_20250124", "name": "bash"},  # run by the client: no fee
        {"name": "get_weather", "input_schema": {"type": "object"}}]}  # fmt: skip
    asked = anthropic.priced_options(body)
    assert (asked.speed, asked.inference_geo) == ("fast", "us")
    assert asked.server_tools == {"web_search": 4, "web_fetch": 1}
    assert anthropic.priced_options({"messages": []}) == anthropic.priced_options({"speed": None, "tools": "x"})


def test_a_passed_through_document_is_named_unreadable_for_the_router() -> None:
    """t64: a PDF in the last turn was scored on its caption alone ("Summarize this." went small);
    the view of a passed-through request says what it left out, so the router leans large."""
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
    last = {"role": "user", "content": [{"type": "text", "text": "Summarize this."}, document]}
    raw = msgspec.json.encode({"model": "c", "max_tokens": 10, "messages": [last]})
    request = anthropic.decode_request(raw, passed_through=True)
    assert request.unreadable == "messages.0.content.1: a 'document' block the gateway does not read"
    earlier = {"model": "c", "max_tokens": 10, "messages": [last, {"role": "assistant", "content": "A summary."},
                                                            {"role": "user", "content": "Thanks, shorter?"}]}  # fmt: skip
    assert anthropic.decode_request(msgspec.json.encode(earlier), passed_through=True).unreadable is None


def test_a_field_set_to_null_asks_for_nothing_a_translation_loses() -> None:
    """t67: ``speed: null`` on a route that may reach a chat upstream was refused as not supported."""
    assert anthropic.fields_not_read({"model": "m", "speed": None, "inference_geo": None}) == []
    assert anthropic.fields_not_read({"model": "m", "speed": "fast"}) == ["speed"]


def test_counts_written_as_doubles_are_counts_whole_and_streamed() -> None:
    """t80: a server that keeps numbers as doubles writes ``222.0``; the SDKs read 222, and the
    gateway billed 22 of the 244 tokens (the output and cache counts dropped), or its own count."""
    wire = {"input_tokens": 222.0, "output_tokens": 22.0, "cache_read_input_tokens": 0.0,
            "cache_creation_input_tokens": 0.0}  # fmt: skip
    assert anthropic.usage_from_wire(wire) == Usage(input_tokens=222, output_tokens=22)
    decoder = anthropic.StreamDecoder()
    decoder.feed(
        {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {**wire, "output_tokens": 1.0}}}
    )
    decoder.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 22.0}})
    assert decoder.usage == Usage(input_tokens=222, output_tokens=22)
    assert anthropic.usage_from_wire({"input_tokens": 2.5, "output_tokens": 1}) is None  # no count


def test_tool_arguments_with_half_an_emoji_are_written_out_not_crashed_on() -> None:
    """t82: arguments text holding an escaped lone surrogate parsed to a str msgspec cannot encode:
    a translated Messages stream died after its tool call, with no log line and no bill."""
    answer = Answer(
        id="x", model="m", text=None, tool_calls=[ToolCall("c1", "f", '{"q": "half \\ud83d"}')],
        finish_reason="tool_calls", usage=Usage(input_tokens=1, output_tokens=1),
    )  # fmt: skip
    body = msgspec.json.decode(anthropic.encode_answer(answer, "msg_1", "claude-x"))
    assert body["content"][0]["input"] == {"q": "half \ufffd"}


_TOLD = {"role": "system", "content": "From now on, answer in French."}
"""A mid-conversation system message, as Claude Code sends one for a model it does not know (t206)."""


@pytest.mark.parametrize("passed_through", [False, True])
def test_a_system_message_in_the_turns_is_decoded_in_its_place(passed_through: bool) -> None:
    """t206: ``messages[1].role: 'system'`` was a 400 on every route, Claude Code exiting on its first
    request. It is a system message where it stands: a chat upstream gets it there, Claude (translated)
    in the top-level system, and tool results before it still answer the calls before them."""
    called = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
    answered = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}]}
    turns = [{"role": "user", "content": "q"}, called, answered, _TOLD,
             {"role": "assistant", "content": "Fini."}, {"role": "user", "content": "Merci."}]  # fmt: skip
    body = {"model": "m", "max_tokens": 10, "system": "Be brief.", "messages": turns}
    request = anthropic.decode_request(msgspec.json.encode(body), passed_through=passed_through)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool", "system", "assistant", "user"]
    assert request.messages[4].parts == (TextPart(_TOLD["content"]),)
    chat = openai_chat.to_chat_body(request)["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "system", "assistant", "user"]
    assert chat[4] == _TOLD
    sent = anthropic.encode_request(request, "claude", stream=False)
    assert sent["system"] == f"Be brief.\n\n{_TOLD['content']}"
    assert [turn["role"] for turn in sent["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    last = [{"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}}]
    told_last = anthropic.decode_request(  # last, after a user turn; text blocks, marked
        msgspec.json.encode({**body, "messages": [*turns, {"role": "system", "content": last}]}),
        passed_through=passed_through,
    )
    assert told_last.messages[-1].parts == (TextPart("Answer in French.", cache_control={"type": "ephemeral"}),)
    assert not told_last.continues_last_turn
    assert anthropic.holds_system_messages(body) and not anthropic.holds_system_messages({**body, "messages": []})


def test_a_system_message_after_a_paused_server_tool_turn_passes_through() -> None:
    """Anthropic takes one after an assistant turn that ends in server tool use (``pause_turn``)."""
    paused = {"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}]}  # fmt: skip
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}, paused, _TOLD]}
    request = anthropic.decode_request(msgspec.json.encode(body), passed_through=True)
    assert [m.role for m in request.messages] == ["user", "assistant", "system"]


_USER = {"role": "user", "content": "q"}
_ASSISTANT = {"role": "assistant", "content": "a"}
_AFTER = (
    "a system message must immediately follow a user message (or an assistant message that ends in server tool use)"
)
_BEFORE = "a system message must be the last message or be followed by an assistant message"


@pytest.mark.parametrize(
    ("messages", "said", "param"),
    [
        ([_TOLD, _USER], 'messages.0: Unexpected role "system" for the first message.', "messages.0.role"),
        ([_USER, _ASSISTANT, _TOLD], f"messages.2: {_AFTER}", "messages.2"),
        ([_USER, _TOLD, _TOLD], f"messages.1: {_BEFORE}", "messages.1"),
        ([_USER, _TOLD, _USER], f"messages.1: {_BEFORE}", "messages.1"),
        ([_USER, {"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}]}],
         "messages.1.content.0.type: Input should be 'text'", "messages.1.content.0.type"),
        ([_USER, {"role": "system", "content": ""}], "messages.1: all messages must have non-empty content",
         "messages.1.content"),
        ([_USER, {"role": "system", "content": " \n"}], "messages.1: text content blocks must contain non-whitespace",
         "messages.1.content"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("passed_through", [False, True])
@pytest.mark.parametrize("counting", [False, True])
def test_a_misplaced_system_message_is_refused_as_anthropic_places_it(
    messages: list[Any], said: str, param: str, passed_through: bool, counting: bool
) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": messages}
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.decode_request(msgspec.json.encode(body), passed_through=passed_through, counting=counting)
    assert refused.value.message.startswith(said) and refused.value.param == param


def test_tool_pairing_is_still_checked_around_a_system_message() -> None:
    called = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
    unanswered = [_USER, called, {"role": "user", "content": "never mind"}, _TOLD]
    with pytest.raises(InvalidRequestError, match=r"messages\.1: `tool_use` ids were found without `tool_result`"):
        _decode(messages=unanswered)


def test_the_exact_cache_key_tells_a_system_message_and_its_place() -> None:
    """The same turns without it, or with its text in the top-level system, are other questions."""
    from gateway.cache.keys import exact_key

    def key(**body: Any) -> str:
        return exact_key("tenant", "route", _decode(**body))

    told = key(messages=[_USER, _TOLD])
    assert told != key(messages=[_USER])
    assert told != key(system=_TOLD["content"], messages=[_USER])
    assert told == key(messages=[_USER, {"role": "system", "content": [{"type": "text", "text": _TOLD["content"]}]}])
