"""What a finished stream amounts to: the message the cache stores for it."""

from __future__ import annotations

from typing import Any

from gateway.core.model import ToolArgumentsDelta, ToolCallStart
from gateway.protocols import openai_chat
from gateway.upstreams.base import StreamTally


def test_tool_calls_reasoning_and_text_are_rebuilt_from_their_deltas() -> None:
    tally = StreamTally()
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "First I"},
        {"reasoning_content": " look."},
        {"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "s1"}]},
        {"thinking_blocks": [{"type": "redacted_thinking", "data": "ZW5j"}]},
        {"reasoning_content": "Then two calls."},
        {"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "s2"}]},
        {"content": "Checking."},
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "w", "arguments": ""}}]},
        {
            "tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "v", "arguments": "{}"}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]},
    ]
    for delta in deltas:
        tally.take_delta(delta)
    assert tally.replayable and len(tally.tool_calls) == 2
    assert tally.message() == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "First I look.Then two calls.",
        "thinking_blocks": [
            {"type": "thinking", "thinking": "First I look.", "signature": "s1"},
            {"type": "redacted_thinking", "data": "ZW5j"},
            {"type": "thinking", "thinking": "Then two calls.", "signature": "s2"},
        ],
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "v", "arguments": "{}"}},
        ],
    }


def test_a_stream_the_tally_cannot_rebuild_is_not_stored() -> None:
    tally = StreamTally()
    tally.take_delta({"function_call": {"name": "w", "arguments": "{}"}})
    assert not tally.replayable
    odd = StreamTally()
    odd.take_delta({"tool_calls": [{"index": "0", "id": "c", "function": {"name": "w", "arguments": "{}"}}]})
    assert not odd.replayable and odd.message()["content"] == ""
    for field, value in (("refusal", "I can't help with that."), ("annotations", [{"type": "url_citation"}]),
                         ("audio", {"id": "a", "transcript": "hi"})):  # fmt: skip
        beyond = StreamTally()
        beyond.take_delta({"content": "Partly: ", field: value})  # found by an outside tester: replayed without it
        assert not beyond.replayable, field
    opening = StreamTally()
    opening.take_delta({"role": "assistant", "content": "", "refusal": None})  # OpenAI's first chunk
    assert opening.replayable
    text_only = StreamTally()
    text_only.take_delta({"content": "hi"})
    assert text_only.message() == {"role": "assistant", "content": "hi"}


def test_only_what_a_replay_rebuilds_is_stored_whole_or_streamed() -> None:
    """A list of fields known to be lost missed Perplexity's citations and OpenRouter's
    reasoning_details (t17): what the replay rebuilds is listed instead, anything else keeps
    the answer out of the cache."""
    from gateway.protocols.openai_chat import storable_answer

    message: dict[str, Any] = {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": []}
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    plain: dict[str, Any] = {"id": "c", "object": "chat.completion", "model": "m", "provider": "OpenAI",
             "choices": [choice]}  # fmt: skip
    assert storable_answer(plain) is not None  # empty and null fields, and a server's name, lose nothing
    served = {**plain, "x_groq": {"id": "req_1"}, "prompt_filter_results": [{"prompt_index": 0}],
              "choices": [{**choice, "native_finish_reason": "stop", "content_filter_results": {}}]}  # fmt: skip
    assert storable_answer(served) is not None  # t19: Groq, Azure and OpenRouter answers were never cached
    assert storable_answer({**plain, "citations": ["https://example.org"]}) is None
    odd_message = {**message, "reasoning_details": [{"type": "reasoning.text", "text": "..."}]}
    assert storable_answer({**plain, "choices": [{**choice, "message": odd_message}]}) is None
    streamed = StreamTally()
    streamed.take_delta({"content": "Paris", "reasoning_details": [{"type": "reasoning.text"}]})
    assert not streamed.replayable


def test_a_refusal_is_counted_and_object_arguments_are_json() -> None:
    """t40: a streamed refusal without usage was billed 0 output tokens; arguments a server sent
    as an object were lost."""
    tally = StreamTally()
    for delta in ({"refusal": "I can't help"}, {"refusal": " with that."},
                  {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]}):  # fmt: skip
        tally.take_delta(delta)
    assert tally.said == 'I can\'t help with that.f{"a":1}'


def test_the_chunk_reader_keeps_calls_apart_that_a_server_numbers_alike() -> None:
    """t40: two calls sent at index 0 with their own ids became one call; arguments sent as an
    object (not JSON text) were lost, or a Python repr when not streamed."""
    reader = openai_chat.ChunkReader()
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_a", "function": {"name": "weather", "arguments": {"city": "Lima"}}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_b", "function": {"name": "time", "arguments": '{"tz": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"UTC"}'}}]}}]},
    ]  # fmt: skip
    deltas = [delta for chunk in chunks for delta in reader.read(chunk)]
    assert deltas == [
        ToolCallStart(0, "call_a", "weather"), ToolArgumentsDelta(0, '{"city":"Lima"}'),
        ToolCallStart(1, "call_b", "time"), ToolArgumentsDelta(1, '{"tz": '), ToolArgumentsDelta(1, '"UTC"}'),
    ]  # fmt: skip
    message = {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": [1]}}}]}
    assert openai_chat.answer_from_message(message, "tool_calls").tool_calls[0].arguments == '{"a":[1]}'


def test_a_stream_whose_calls_share_an_index_is_not_stored() -> None:
    """t47: two calls at index 0 with their own ids were stored as one merged call, and served so."""
    tally = StreamTally()
    for call_id, name in (("call_a", "get_weather"), ("call_b", "get_time")):
        tally.take_delta({"tool_calls": [{"index": 0, "id": call_id, "function": {"name": name, "arguments": "{}"}}]})
    assert tally.replayable is False


def test_what_a_stream_wrote_is_measured_as_it_grows() -> None:
    """What bounds an upstream that writes on past the request's max_tokens (t110): every part
    the stream said, measured once each, across calls."""
    tally = StreamTally()
    tally.take_delta({"content": "four", "reasoning_content": "think"})
    assert tally.written() == 9
    tally.take_delta(
        {"content": " more", "tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}
    )
    tally.take_delta({"refusal": "no"})
    assert tally.written() == 9 + 5 + 3 + 2 == len(tally.said)
    assert tally.written() == len(tally.said)  # nothing counted twice
