"""The OpenAI Responses codec and the store of Responses turns, without a server.

Response objects and stream events are checked against the openai SDK's own models,
and streams are replayed through the SDK's stream accumulator, so a client parses them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from structlog.testing import capture_logs

from gateway.core.model import (
    Answer,
    Delta,
    Finish,
    ImagePart,
    Message,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    ToolChoice,
    Usage,
    UsageReport,
)
from gateway.errors import InvalidRequestError
from gateway.protocols import anthropic_messages as anthropic
from gateway.protocols import openai_chat
from gateway.protocols import openai_responses as codec
from gateway.responses_store import (
    ANCESTORS_AT_MOST,
    KEPT_ID_CHARS,
    RESPONSE_TTL_S,
    ResponseStore,
    StoredResponse,
    kept_ids,
)
from gateway.store import keyspace
from gateway.store.base import BOUNDED_ENTRY_BYTES
from gateway.store.memory import MemoryKeyValue
from gateway.upstreams.base import StreamTally

_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def _decode(**body: Any) -> codec.ResponsesRequest:
    return codec.decode_request(msgspec.json.encode({"model": "m", **body}))


def _ids() -> codec.IdMaker:
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


def test_a_string_input_is_one_user_message_and_instructions_come_first() -> None:
    decoded = _decode(input="hello", instructions="be brief", max_output_tokens=50, temperature=0.2)
    assert decoded.request.messages == [Message("user", (TextPart("hello"),))]
    body = _chat(decoded)
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert body["max_tokens"] == 50 and body["temperature"] == 0.2 and "stream" not in body
    assert decoded.store is True and decoded.request.dropped == []


def test_items_become_chat_messages_with_calls_on_the_assistant_turn() -> None:
    decoded = _decode(
        input=[
            {"role": "developer", "content": "use tools"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "weather in Oslo?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
            ]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "call_b", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "-3C"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
        ]
    )  # fmt: skip
    messages = decoded.request.messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[1].parts == (TextPart("weather in Oslo?"), ImagePart("data:image/png;base64,AAAA"))
    assert messages[2].text == "Let me look."
    assert messages[2].tool_calls == (
        ToolCall("call_a", "weather", '{"city":"Oslo"}'),
        ToolCall("call_b", "time", "{}"),
    )
    assert messages[4].tool_call_id == "call_b" and messages[4].text == "noon"
    body = _chat(decoded)
    assert body["messages"][2]["tool_calls"][0] == {
        "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
    }  # fmt: skip
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_a", "content": "-3C"}


def test_a_function_call_without_an_assistant_message_makes_one() -> None:
    decoded = _decode(
        input=[
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ]
    )
    assert decoded.request.messages[1] == Message("assistant", (), (ToolCall("c1", "f", "{}"),))
    assert _chat(decoded)["messages"][1]["content"] is None


def test_an_items_own_id_is_kept_in_the_order_it_is_listed() -> None:
    """f76: a listing made new ids, so an item's was lost. One listed item per message, but an
    assistant's text and each of its calls are one each (an empty text beside calls is none)."""
    decoded = _decode(
        input=[
            {"role": "user", "content": "hi", "id": "msg_client_1"},
            {"type": "message", "role": "assistant", "content": [], "id": "msg_empty"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "id": "fco_1", "call_id": "c1", "output": "ok"},
            {"type": "message", "role": "assistant", "content": "Done.", "id": None},
        ]
    )  # fmt: skip
    assert decoded.item_ids == ["msg_client_1", "fc_1", None, "fco_1", None]
    assert codec.item_count(decoded.request.messages) == len(decoded.item_ids)
    listed = codec.input_items(decoded.request.messages, [("resp_1", len(decoded.item_ids))], decoded.item_ids)
    assert [item["id"] for item in listed][:2] == ["msg_client_1", "fc_1"] and listed[3]["id"] == "fco_1"
    assert listed[2]["id"] == _derived("fc", "resp_1", 2) and listed[4]["id"] == _derived("msg", "resp_1", 4)
    with pytest.raises(InvalidRequestError) as bad:
        _decode(input=[{"role": "user", "content": "hi", "id": 7}])
    assert bad.value.param == "input[0].id"


def test_a_turn_keeps_its_answers_output_ids_and_lists_an_id_once() -> None:
    """A turn keeps its input items' ids (new ones for those sent without) and its answer's output
    items' (not its reasoning, not a refusal beside text: one message item holds both)."""
    decoded = _decode(input=[{"role": "user", "content": "q", "id": "msg_q"}, {"role": "user", "content": "again"}])
    answer = Answer(id="a", model="m", text="Let me look.", refusal="Not that.", tool_calls=[ToolCall("c1", "f", "{}")],
                    thinking=[ThinkingPart("hmm")])  # fmt: skip
    output = codec.output_items(answer, _ids())
    assert [item["id"] for item in output] == ["rs_1", "msg_2", "msg_3", "fc_4"]
    said = codec.assistant_message(answer)
    kept = codec.turn_item_ids(decoded, said, output)
    assert kept[0] == "msg_q" and kept[1].startswith("msg_") and kept[2:] == ["msg_2", "fc_4"]
    twice = codec.input_items([*decoded.request.messages, said], [("resp_2", 4)], ["msg_q", "msg_q", "msg_q"])
    assert [item["id"] for item in twice] == ["msg_q", _derived("msg", "resp_2", 1), _derived("msg", "resp_2", 2),
                                              _derived("fc", "resp_2", 3)]  # fmt: skip


def test_an_id_derived_for_an_item_is_its_turns_not_the_listed_responses() -> None:
    """t167 #1: one derived from the listed response's id and the item's place changed each turn:
    it is derived from the id of the turn that stored the item and its place there."""
    conversation = [Message("user", (TextPart(text),)) for text in ("a", "b", "c", "d")]
    turns = [("resp_1", 2), ("resp_2", 2)]
    listed = codec.input_items(conversation, turns, ["msg_same", "msg_same", None, "msg_same"])
    assert [item["id"] for item in listed] == [
        "msg_same", _derived("msg", "resp_1", 1), _derived("msg", "resp_2", 0), _derived("msg", "resp_2", 1)
    ]  # fmt: skip
    later = codec.input_items([*conversation, *conversation[:1]], [*turns, ("resp_3", 1)], ["msg_same"] * 5)
    assert [item["id"] for item in later][:4] == [item["id"] for item in listed]  # the same in every later turn's


def _derived(prefix: str, response_id: str, place: int) -> str:
    """The id of an item listed with none kept (from before f76), or one already listed: from its turn's id and its place there."""
    return f"{prefix}_{hashlib.blake2b(f'{response_id}:{place}'.encode(), digest_size=16).hexdigest()}"


def test_a_tool_result_of_text_and_images_keeps_both() -> None:
    """Its parts in order (an Anthropic upstream takes them so; a chat upstream reads its texts a
    line apart, and its loss of the images is named in x-gateway-dropped; t128)."""
    output = [{"type": "input_text", "text": "The chart "}, {"type": "input_image", "image_url": "https://x/c.png"},
              {"type": "output_text", "text": "is above."}]  # fmt: skip
    decoded = _decode(
        input=[
            {"type": "function_call", "call_id": "c1", "name": "plot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": output},
        ]
    )
    result = decoded.request.messages[1]
    assert result.role == "tool" and result.tool_call_id == "c1"
    assert result.parts == (TextPart("The chart "), ImagePart("https://x/c.png"), TextPart("is above."))
    assert _chat(decoded)["messages"][1]["content"] == "The chart \nis above."
    with pytest.raises(InvalidRequestError, match="input_file"):  # a chat upstream has no place for it
        _decode(input=[{"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_file"}]}])


def test_function_tools_choice_and_strict_are_carried() -> None:
    parameters = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    decoded = _decode(
        input="x",
        tools=[
            {"type": "function", "name": "search", "description": "find", "parameters": parameters, "strict": True},
            {"type": "function", "name": "noop", "parameters": None},
        ],
        tool_choice={"type": "function", "name": "search"},
        parallel_tool_calls=False,
    )
    assert decoded.request.tool_choice == ToolChoice("tool", "search", parallel=False)
    body = _chat(decoded)
    assert body["tools"][0]["function"] == {
        "name": "search", "description": "find", "parameters": parameters, "strict": True,
    }  # fmt: skip
    assert body["tools"][1]["function"] == {"name": "noop", "parameters": {"type": "object", "properties": {}}}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "search"}}
    assert body["parallel_tool_calls"] is False
    assert decoded.echo["tool_choice"] == {"type": "function", "name": "search"}
    assert decoded.echo["parallel_tool_calls"] is False
    assert (
        _chat(_decode(input="x", tools=[decoded.echo["tools"][1]], tool_choice="required"))["tool_choice"] == "required"
    )


def test_hosted_tools_are_refused_naming_every_type() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        _decode(
            input="x",
            tools=[
                {"type": "web_search"},
                {"type": "function", "name": "f", "parameters": {}},
                {"type": "file_search", "vector_store_ids": []},
                {"type": "web_search"},
            ],
        )
    assert refused.value.status_code == 400 and refused.value.param == "tools"
    assert "web_search, file_search" in refused.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "'item_reference'"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "file_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "image_url"),
        ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": "x", "background": True}, "'background'"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "model": ""}, "model"),
    ],
)
def test_bad_requests_are_400s_that_say_where(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as bad:
        _decode(**body)
    assert message in bad.value.message


def test_no_input_at_all_is_a_400_but_a_continuation_may_add_none() -> None:
    with pytest.raises(InvalidRequestError, match="input"):
        _chat(_decode(instructions="only this"))
    history = [Message("user", (TextPart("q"),)), Message("assistant", (TextPart("a"),))]
    body = _chat(_decode(previous_response_id="resp_1"), history)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]


def test_a_continuation_puts_the_earlier_turns_after_the_instructions() -> None:
    history = [Message("system", (TextPart("old rule"),)), Message("user", (TextPart("q1"),))]
    history.append(Message("assistant", (TextPart("a1"),)))
    decoded = _decode(input="q2", instructions="new rule", previous_response_id="resp_1")
    body = _chat(decoded, history)
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "new rule"), ("system", "old rule"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
    ]  # fmt: skip
    assert decoded.echo["previous_response_id"] == "resp_1"


def test_structured_output_formats() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "name": "Count", "schema": schema, "strict": True}
    decoded = _decode(input="x", text={"format": fmt})
    assert decoded.request.json_schema == schema
    assert _chat(decoded)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "Count", "schema": schema, "strict": True},
    }  # fmt: skip
    assert decoded.echo["text"] == {"format": fmt}
    plain = _decode(input="x", text={"format": {"type": "text"}})
    assert "response_format" not in _chat(plain)
    json_mode = _decode(input="x as JSON", text={"format": {"type": "json_object"}})
    assert _chat(json_mode)["response_format"] == {"type": "json_object"}
    asked: list[str] = []

    def never(model: str) -> bool:
        asked.append(model)
        return False

    dropped = codec.decode_request(
        msgspec.json.encode({"model": "m", "input": "x json", "text": {"format": {"type": "json_object"}}}),
        json_object_ok=never,
    )
    assert asked == ["m"] and dropped.request.dropped == ["text.format"]
    assert "response_format" not in _chat(dropped)
    assert dropped.echo["text"]["format"] == {"type": "text"}  # t84: not claimed as honoured


def test_a_reasoning_summary_and_verbosity_are_dropped_an_effort_carried_and_the_rest_accepted() -> None:
    decoded = _decode(
        input="x",
        reasoning={"effort": "high", "summary": "auto"},
        text={"verbosity": "low"},
        include=["reasoning.encrypted_content"],
        truncation="auto",
        store=False,
        service_tier="auto",
        metadata={"k": "v"},
    )
    assert decoded.request.dropped == ["reasoning.summary", "text.verbosity", "include", "truncation"]
    assert decoded.request.extra["reasoning_effort"] == "high"  # chat's name for it (t204)
    assert decoded.echo["reasoning"] == {"effort": "high", "summary": None}
    assert decoded.store is False and decoded.echo["metadata"] == {"k": "v"}
    assert decoded.echo["truncation"] == "disabled"  # what was done: nothing is cut (t25)
    assert _decode(input="x", reasoning={"effort": None}).request.dropped == []


def test_end_user_and_prompt_cache_ids_go_on_as_a_chat_clients_do() -> None:
    """t48: ``safety_identifier`` was lost beside ``user``, and ``prompt_cache_key`` went nowhere."""
    decoded = _decode(input="x", user="u-1", safety_identifier="s-1", prompt_cache_key="session-1")
    assert decoded.request.user == "u-1" and decoded.request.dropped == []
    sent = _chat(decoded)
    assert (sent["user"], sent["safety_identifier"], sent["prompt_cache_key"]) == ("u-1", "s-1", "session-1")
    alone = _decode(input="x", safety_identifier="s-1").request
    assert alone.user is None and anthropic.encode_request(alone, "claude", stream=False)["metadata"] == {
        "user_id": "s-1"  # Anthropic's end user, where no user is given
    }
    assert (decoded.echo["user"], decoded.echo["safety_identifier"], decoded.echo["prompt_cache_key"]) == (
        "u-1",
        "s-1",
        "session-1",
    )


def _answer(text: str | None, calls: list[ToolCall], finish: Any, usage: Usage) -> Answer:
    return Answer(id="chatcmpl-1", model="small", text=text, tool_calls=calls, finish_reason=finish, usage=usage)


def test_a_response_object_the_sdk_parses() -> None:
    decoded = _decode(
        input="x", instructions="be brief", metadata={"a": "b"}, tools=[{"type": "function", "name": "f"}]
    )
    usage = Usage(input_tokens=12, output_tokens=5, cached_input_tokens=4, reasoning_tokens=1)
    answer = _answer("Hello.", [ToolCall("call_1", "f", '{"x": 1}')], "tool_calls", usage)
    body = codec.response_object(decoded, "resp_1", 1700000000, output=codec.output_items(answer, _ids()), usage=usage)
    assert "output_text" not in body
    response = Response.model_validate(msgspec.json.decode(msgspec.json.encode(body)))
    assert response.status == "completed" and response.output_text == "Hello."
    assert response.model == "m" and response.instructions == "be brief" and response.metadata == {"a": "b"}
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.output[0].id == "msg_1" and response.output[1].id == "fc_2"
    assert body["output"][1]["call_id"] == "call_1" and body["output"][1]["arguments"] == '{"x": 1}'
    assert response.usage is not None and response.usage.total_tokens == 17
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 1
    assert response.incomplete_details is None and response.error is None


def test_max_output_tokens_below_openais_minimum_is_refused_unless_passed_through() -> None:
    """f201: OpenAI refuses one below 16; a Responses upstream checks its own."""
    with pytest.raises(InvalidRequestError) as refused:
        _decode(input="x", max_output_tokens=0)
    assert (refused.value.param, refused.value.code) == ("max_output_tokens", "integer_below_min_value")
    assert refused.value.message.endswith("Expected a value >= 16, but got 0 instead.")
    raw = msgspec.json.encode({"model": "m", "input": "x", "max_output_tokens": 5})
    assert codec.decode_request(raw, passed_through=True).request.max_tokens == 5
    with pytest.raises(InvalidRequestError, match="Expected a value >= 1, but got 0 instead"):
        codec.decode_request(msgspec.json.encode({"model": "m", "max_output_tokens": 0}), passed_through=True)


def test_an_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    decoded = _decode(input="x", max_output_tokens=16)
    answer = _answer("one two three", [], "length", Usage(input_tokens=3, output_tokens=3))
    body = codec.response_object(
        decoded, "resp_1", 1, output=codec.output_items(answer), usage=answer.usage, finish_reason="length"
    )
    response = Response.model_validate(body)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert body["output"][0]["status"] == "incomplete" and body["max_output_tokens"] == 16


def _replay(frames: bytes) -> tuple[list[str], list[Any], ResponseStreamState[Any]]:
    """Event names, the SDK's typed events and its accumulator, fed as the SDK would feed them."""
    names: list[str] = []
    events: list[Any] = []
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for frame in frames.split(b"\n\n"):
        if not frame:
            continue
        head, data = frame.split(b"\n", 1)
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        payload = msgspec.json.decode(data[6:])
        assert payload["type"] == head[7:].decode()
        names.append(payload["type"])
        event = _EVENTS.validate_python(payload)
        events.append(event)
        state.handle_event(event)
    return names, events, state


def test_a_stream_of_text_and_a_call_follows_openais_event_order() -> None:
    decoded = _decode(input="x", stream=True)
    encoder = codec.StreamEncoder(decoded, "resp_1", 1, _ids())
    out = encoder.start()
    out += encoder.feed([TextDelta("Hel"), TextDelta("lo")])
    out += encoder.feed([ToolCallStart(0, "call_9", "f"), ToolArgumentsDelta(0, '{"a"'), ToolArgumentsDelta(0, ":1}")])
    out += encoder.feed([Finish("tool_calls"), UsageReport(Usage(input_tokens=7, output_tokens=9))])
    out += encoder.finish()
    names, events, state = _replay(out)
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[4].item_id == "msg_1" and events[4].output_index == 0 and events[4].content_index == 0
    assert events[6].text == "Hello" and events[12].arguments == '{"a":1}' and events[12].output_index == 1
    final = state._completed_response
    assert final is not None and final.output_text == "Hello" and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 9
    call = final.output[1]
    assert call.type == "function_call" and call.call_id == "call_9" and call.arguments == '{"a":1}'
    assert encoder.response is not None and encoder.response["output"] == msgspec.json.decode(
        msgspec.json.encode(events[-1].response.model_dump(mode="json", exclude_unset=True)["output"])
    )
    streamed = encoder.answer()  # what the store keeps of the turn
    assert streamed.finish_reason == "tool_calls" and streamed.usage == Usage(input_tokens=7, output_tokens=9)
    assert codec.assistant_message(streamed) == Message(
        "assistant", (TextPart("Hello"),), (ToolCall("call_9", "f", '{"a":1}'),)
    )


def test_parallel_calls_whose_arguments_interleave_close_with_all_their_arguments() -> None:
    """vLLM announces both calls, then interleaves their arguments: clients act on each call's
    ``output_item.done`` (Codex, the Agents SDK), so each must carry its whole arguments."""
    encoder = codec.StreamEncoder(_decode(input="x", stream=True), "resp_1", 1, _ids())
    out = encoder.start() + encoder.feed([ToolCallStart(0, "call_a", "f"), ToolCallStart(1, "call_b", "g")])
    out += encoder.feed([ToolArgumentsDelta(0, '{"a"'), ToolArgumentsDelta(1, '{"b":2}'), ToolArgumentsDelta(0, ":1}")])
    out += encoder.feed([Finish("tool_calls")]) + encoder.finish()
    names, events, state = _replay(out)
    done = {event.item.call_id: event.item.arguments for event in events if event.type == "response.output_item.done"}
    assert done == {"call_a": '{"a":1}', "call_b": '{"b":2}'}
    deltas = [(event.output_index, event.delta) for event in events if event.type.endswith("arguments.delta")]
    assert deltas == [(0, '{"a"'), (1, '{"b":2}'), (0, ":1}")]
    final = state._completed_response
    assert final is not None and [getattr(item, "arguments", None) for item in final.output] == ['{"a":1}', '{"b":2}']
    assert names[-1] == "response.completed"


def test_calls_streamed_one_after_another_close_one_after_another() -> None:
    """t84: OpenAI and vLLM's chat stream parallel calls one after another; each closed only at the
    end of the answer, so Codex, which runs a call on its ``output_item.done``, waited for all."""
    encoder = codec.StreamEncoder(_decode(input="x", stream=True), "resp_1", 1, _ids())
    out = encoder.start() + encoder.feed([ToolCallStart(0, "call_a", "f"), ToolArgumentsDelta(0, '{"a": 1}')])
    out += encoder.feed([ToolCallStart(1, "call_b", "g"), ToolArgumentsDelta(1, "{}")])
    out += encoder.feed([Finish("tool_calls")]) + encoder.finish()
    names, events, state = _replay(out)
    order = [(event.type, getattr(event, "output_index", None)) for event in events if "item" in event.type]
    assert order == [
        ("response.output_item.added", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.done", 1),
    ]  # fmt: skip
    done = [event.arguments for event in events if event.type == "response.function_call_arguments.done"]
    assert done == ['{"a": 1}', "{}"] and names[-1] == "response.completed"
    final = state._completed_response
    assert final is not None and [getattr(item, "arguments", None) for item in final.output] == ['{"a": 1}', "{}"]


def test_a_reasoning_models_reasoning_comes_as_a_reasoning_item_streamed_or_not() -> None:
    """What a chat upstream says as reasoning_content reaches a Responses client as vLLM's
    Responses API shows it: a reasoning item with the text, before the message."""
    encoder = codec.StreamEncoder(_decode(input="x", stream=True), "resp_1", 1, _ids())
    out = encoder.start() + encoder.feed([ThinkingDelta("2 and 2 "), ThinkingDelta("make 4."), TextDelta("4")])
    out += encoder.feed([Finish("stop")]) + encoder.finish()
    names, events, state = _replay(out)
    assert names[2:10] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added",
    ]  # fmt: skip
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[2].item.content == []  # t118: its part is announced by content_part.added, as a message's is
    assert events[3].part.type == "reasoning_text" and events[3].part.text == ""
    assert (events[3].item_id, events[3].output_index, events[3].content_index) == (events[2].item.id, 0, 0)
    assert events[7].part.type == "reasoning_text" and events[7].part.text == "2 and 2 make 4."
    assert events[8].item.content[0].text == "2 and 2 make 4."
    final = state._completed_response
    assert final is not None and final.output_text == "4"
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "2 and 2 make 4."
    whole = _answer("4", [], "stop", Usage(input_tokens=3, output_tokens=9))
    whole = msgspec.structs.replace(whole, thinking=[ThinkingPart("2 and 2 make 4.")])
    body = codec.response_object(_decode(input="x"), "resp_2", 1, output=codec.output_items(whole, _ids()),
                                 usage=whole.usage, finish_reason="stop")  # fmt: skip
    response = Response.model_validate(body)
    assert [item.type for item in response.output] == ["reasoning", "message"] and response.output_text == "4"


def test_interleaved_parallel_calls_keep_every_argument_in_the_completed_response() -> None:
    encoder = codec.StreamEncoder(_decode(input="x", stream=True), "resp_1", 1, _ids())
    out = encoder.start()
    out += encoder.feed([ToolCallStart(0, "call_a", "a"), ToolCallStart(1, "call_b", "b")])
    out += encoder.feed([ToolArgumentsDelta(0, '{"x": 1}'), ToolArgumentsDelta(1, '{"y": 2}'), Finish("tool_calls")])
    out += encoder.finish()
    _, _, state = _replay(out)
    final = state._completed_response
    assert final is not None
    assert [(item.name, item.arguments) for item in final.output if item.type == "function_call"] == [
        ("a", '{"x": 1}'),
        ("b", '{"y": 2}'),
    ]
    assert [call.arguments for call in encoder.answer().tool_calls] == ['{"x": 1}', '{"y": 2}']  # what is stored


def test_a_stream_with_no_output_still_has_a_message_and_a_cut_one_is_incomplete() -> None:
    encoder = codec.StreamEncoder(_decode(input="x"), "resp_1", 1, _ids())
    names, _, state = _replay(encoder.start() + encoder.finish())
    assert "response.output_item.added" in names and names[-1] == "response.completed"
    assert state._completed_response is not None and state._completed_response.output_text == ""
    cut = codec.StreamEncoder(_decode(input="x", max_output_tokens=16), "resp_2", 1, _ids())
    frames = cut.start() + cut.feed([TextDelta("a b"), Finish("length")]) + cut.finish()
    names, events, _ = _replay(frames)
    assert names[-1] == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_a_call_the_length_limit_cut_is_incomplete_streamed_or_not() -> None:
    """Its arguments are broken JSON: an agent must not run it as a completed call."""
    decoded = _decode(input="x", max_output_tokens=16)
    call = ToolCall("call_1", "get_weather", '{"ci')
    answer = _answer("Checking.", [call], "length", Usage(input_tokens=3, output_tokens=5))
    statuses = [item["status"] for item in codec.output_items(answer)]
    assert statuses == ["completed", "incomplete"]
    encoder = codec.StreamEncoder(decoded, "resp_1", 1, _ids())
    frames = encoder.start() + encoder.feed(
        [
            TextDelta("Checking."),
            ToolCallStart(0, "call_1", "get_weather"),
            ToolArgumentsDelta(0, '{"ci'),
            Finish("length"),
        ]
    )
    _, events, _ = _replay(frames + encoder.finish())
    assert [item.status for item in events[-1].response.output] == ["completed", "incomplete"]


def test_a_broken_stream_ends_with_response_failed() -> None:
    encoder = codec.StreamEncoder(_decode(input="x"), "resp_1", 1, _ids())
    frames = encoder.start() + encoder.feed([TextDelta("part")]) + encoder.fail("upstream 'small': timed out")
    names, events, _ = _replay(frames)
    assert names[-1] == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and "timed out" in failed.error.message
    assert failed.output[0].content[0].text == "part" and failed.output[0].status == "incomplete"
    assert failed.store is False  # only completed turns are kept: none to look up or continue from


def test_a_broken_stream_says_no_usage_rather_than_its_first_count() -> None:
    """t174: Anthropic's ``message_start`` counts 1 output token; a stream broken later said so in
    ``response.failed`` while the log billed what was streamed. The count of a broken stream is
    the request log's and ``/v1/usage``'s, as when an OpenAI upstream's usage never came."""
    encoder = codec.StreamEncoder(_decode(input="x"), "resp_1", 1, _ids())
    started: list[Delta] = [UsageReport(Usage(input_tokens=9, output_tokens=1)), TextDelta("one two three")]
    frames = encoder.start() + encoder.feed(started) + encoder.fail("overloaded")
    _, events, _ = _replay(frames)
    assert events[-1].response.status == "failed" and events[-1].response.usage is None


async def test_a_passed_through_responses_record_counts_in_its_tenants_cap() -> None:
    """t160: outside the cap, one tenant's ~1 KB records (each for a tiny upstream call) filled a
    Redis that then evicted other tenants' turns by TTL. They count as turns do: the tenant's own
    oldest go, never another's (t17: the response evicted stays upstream until its retention ends)."""
    one = len(msgspec.json.encode(StoredResponse.held("gpt", {}))) + BOUNDED_ENTRY_BYTES
    store = ResponseStore(MemoryKeyValue(), lambda tenant: 3 * one)
    assert await store.save("globex", "resp_theirs", StoredResponse.held("gpt", {}))
    for n in range(5):
        assert await store.save("acme", f"resp_{n}", StoredResponse.held("gpt", {}))
    assert [await store.load("acme", f"resp_{n}") is not None for n in range(5)] == [False, False, True, True, True]
    assert await store.load("globex", "resp_theirs") == StoredResponse.held("gpt", {})
    assert not await ResponseStore(MemoryKeyValue(), lambda tenant: one - 1).save(
        "acme", "resp_big", StoredResponse.held("gpt", {})
    )  # larger than the whole cap: not kept (the client is told store: false)


async def test_a_tenant_at_its_cap_is_logged_once_in_a_while_not_per_response() -> None:
    """t101: a tenant at its cap wrote a stored_responses_evicted line per stored response (2,429
    for 3,000); another tenant's evictions are still said."""
    store = ResponseStore(MemoryKeyValue(), lambda tenant: 2000)  # a few of these fit
    with capture_logs() as logs:
        for n in range(20):
            for tenant in ("acme", "globex"):
                assert await store.save(tenant, f"resp_{n}", StoredResponse(response={"id": "x" * 200}))
    evicted = [log["tenant"] for log in logs if log["event"] == "stored_responses_evicted"]
    assert sorted(evicted) == ["acme", "globex"]


async def test_a_passed_through_responses_record_keeps_the_clients_own_ids_bounded() -> None:
    """t48: read back, the response said the tenant's digests; the record keeps the client's own
    values, none longer than KEPT_ID_CHARS (a record stays about a kilobyte of the tenant's cap),
    and one written before it did reads as keeping none."""
    store = ResponseStore(MemoryKeyValue(), lambda tenant: 1 << 20)
    long = "u" * (KEPT_ID_CHARS + 1)
    own = kept_ids({"d1": "user-1", "d2": "s" * KEPT_ID_CHARS, "d3": long})
    assert own == {"d1": "user-1", "d2": "s" * KEPT_ID_CHARS, "d3": None}
    assert await store.save("acme", "resp_1", StoredResponse(held_by="gpt", own_ids=own))
    assert (await store.load("acme", "resp_1")) == StoredResponse(held_by="gpt", own_ids=own)
    older = msgspec.json.decode(b'{"held_by": "gpt"}', type=StoredResponse)
    assert older.own_ids == {}


async def test_the_store_keeps_turns_per_tenant_and_deletes_them() -> None:
    kv = MemoryKeyValue()
    store = ResponseStore(kv, lambda tenant: 1 << 20)
    record = StoredResponse(
        response={"id": "resp_1", "object": "response"},
        messages=[Message("user", (TextPart("q"), ImagePart("https://x/y.png"))), Message("assistant", (), (ToolCall("c", "f", "{}"),))],
    )  # fmt: skip
    await store.save("acme", "resp_1", record)
    assert await store.load("acme", "resp_1") == record
    assert await store.load("globex", "resp_1") is None  # another tenant's key: not even looked at
    assert keyspace.response("acme", "resp_1").startswith(keyspace.tenant_prefix("acme") + ":resp:")
    assert kv._values[keyspace.response("acme", "resp_1")][1] > RESPONSE_TTL_S  # expires, 30 days out
    assert not await store.delete("globex", "resp_1")
    assert await store.delete("acme", "resp_1")
    assert await store.load("acme", "resp_1") is None
    assert not await store.delete("acme", "resp_1")


class _CountedReads(MemoryKeyValue):
    """Counts the store's round trips for stored turns."""

    reads = 0

    async def get_bounded(self, keys: list[str], ledger: str, ttl_s: int, timeout_s: float) -> list[bytes | None]:
        self.reads += 1
        return await super().get_bounded(keys, ledger, ttl_s, timeout_s)

    async def get_many(self, keys: list[str], timeout_s: float) -> list[bytes | None]:
        self.reads += 1
        return await super().get_many(keys, timeout_s)


async def _chain(store: ResponseStore, turns: int, root: StoredResponse | None = None) -> tuple[str, StoredResponse]:
    """A conversation of ``turns`` turns after ``root`` (a turn ``resp_root``, if given), as the gateway stores it."""
    previous_id, previous = ("resp_root", root) if root is not None else (None, None)
    if root is not None:
        assert await store.save("acme", "resp_root", root)
    for n in range(turns):
        ancestors = previous.then(previous_id) if previous is not None and previous_id is not None else []
        added = [Message("user", (TextPart(f"q{n}"),)), Message("assistant", (TextPart(f"a{n}"),))]
        record = StoredResponse.turn({"id": f"resp_{n}"}, added, ancestors)
        assert await store.save("acme", f"resp_{n}", record)
        previous_id, previous = f"resp_{n}", record
    assert previous is not None and previous_id is not None
    return previous_id, previous


async def test_a_long_conversation_is_read_back_whole_in_few_round_trips() -> None:
    """t60: a turn keeps only what it added and the ids of the turns before it, at most
    ANCESTORS_AT_MOST of them: a record stays small however long the conversation, and the oldest
    of its ancestors leads on to the ones before."""
    kv = _CountedReads()
    store = ResponseStore(kv, lambda tenant: 1 << 30)
    turns = 2 * ANCESTORS_AT_MOST + 50
    last_id, last = await _chain(store, turns)
    assert len(last.ancestors) == ANCESTORS_AT_MOST and last.ancestors[-1] == f"resp_{turns - 2}"
    messages, gone = await store.conversation("acme", last, use=True)
    assert gone is None and [m.text for m in messages] == [text for n in range(turns) for text in (f"q{n}", f"a{n}")]
    assert kv.reads == 3  # 249 earlier turns: 100 a round trip
    encoded = msgspec.json.encode(await store.load("acme", last_id))
    assert len(encoded) < ANCESTORS_AT_MOST * 48 + 200  # its own two messages, and the ids


async def test_a_conversation_from_a_turn_stored_before_t60_and_one_with_a_gap() -> None:
    store = ResponseStore(MemoryKeyValue(), lambda tenant: 1 << 30)
    before = [Message("user", (TextPart("old q"),)), Message("assistant", (TextPart("old a"),))]
    root = msgspec.json.decode(
        msgspec.json.encode({"response": {"id": "resp_root"}, "messages": before, "held_by": None, "own_ids": {}}),
        type=StoredResponse,
    )  # the whole conversation up to it, as the version before wrote it
    assert root.version == 1 and root.own == before
    _, last = await _chain(store, 3, root)
    messages, gone = await store.conversation("acme", last)
    assert gone is None and [m.text for m in messages] == ["old q", "old a", "q0", "a0", "q1", "a1", "q2", "a2"]
    assert await store.delete("acme", "resp_0")
    messages, gone = await store.conversation("acme", last)
    assert gone == "resp_0" and [m.text for m in messages] == ["q1", "a1", "q2", "a2"]  # what follows the gap


async def test_a_record_of_this_version_is_not_read_as_a_whole_conversation_by_the_one_before() -> None:
    """A gateway rolled back finds no ``messages`` it can decode: the turn is gone to it (the client
    is told ``previous_response_not_found``), not a conversation with its history lost."""

    class Before(msgspec.Struct, kw_only=True):
        response: dict[str, Any] = msgspec.field(default_factory=dict)
        messages: list[Message] = msgspec.field(default_factory=list)
        held_by: str | None = None

    record = StoredResponse.turn({"id": "resp_1"}, [Message("user", (TextPart("q"),))], ["resp_0"])
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(record), type=Before)
    held = msgspec.json.decode(msgspec.json.encode(StoredResponse.held("gpt", {})), type=Before)
    assert held.held_by == "gpt"  # a passed-through response's record stays readable


def _chat(decoded: codec.ResponsesRequest, history: Sequence[Message] = ()) -> dict[str, Any]:
    """The chat body an OpenAI-compatible upstream is sent for ``decoded``."""
    return openai_chat.to_chat_body(codec.to_request(decoded, history))


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "name": "missing"}, "tools": [{"type": "function", "name": "present"}]},
    ],
)
def test_a_tool_choice_no_tool_can_satisfy_is_a_400_naming_it(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        _decode(input="x", **fields)
    assert refused.value.param == "tool_choice"


def _chunk(call: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"tool_calls": [call]} if call is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_a_tool_call_whose_name_comes_late_keeps_its_name_and_id() -> None:
    """Some OpenAI-compatible servers send a call's id or first arguments before its name."""
    reader = openai_chat.ChunkReader()
    chunks = [
        _chunk({"index": 0, "function": {"arguments": ""}}),
        _chunk({"index": 0, "id": "call_late", "function": {"arguments": '{"ci'}}),
        _chunk({"index": 0, "function": {"name": "get_weather", "arguments": 'ty": "Oslo"}'}}),
        _chunk({"index": 1, "id": "call_2", "function": {"arguments": "{}"}}),  # never named
        _chunk(finish="tool_calls"),
    ]
    deltas = [delta for chunk in chunks for delta in reader.read(chunk)]
    assert deltas == [
        ToolCallStart(0, "call_late", "get_weather"),
        ToolArgumentsDelta(0, '{"city": "Oslo"}'),
        ToolCallStart(1, "call_2", ""),
        ToolArgumentsDelta(1, "{}"),
        Finish("tool_calls"),
    ]


def test_tool_calls_without_ids_get_ids_unique_to_their_answer() -> None:
    """call_0 in every answer repeats across a conversation, which Anthropic's API refuses."""

    def first_id(answer_id: str) -> str:
        chunk = {**_chunk({"index": 0, "function": {"name": "f", "arguments": "{}"}}), "id": answer_id}
        start = openai_chat.ChunkReader().read(chunk)[0]
        assert isinstance(start, ToolCallStart)
        return start.id

    assert first_id("chatcmpl-1") != first_id("chatcmpl-2")
    completion = {"id": "chatcmpl-3", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}  # fmt: skip
    assert openai_chat.answer_from_completion(completion).tool_calls[0].id == "call_chatcmpl-3_0"


@pytest.mark.parametrize("pieces", [["get_", "weather"], ["get_weather", "get_weather"]])
def test_a_name_streamed_in_pieces_or_repeated_is_read_whole_by_the_stream_and_the_cache(pieces: list[str]) -> None:
    """Some servers stream a call's name in pieces, others repeat it in every chunk."""
    chunks = [_chunk({"index": 0, "id": "call_1", "function": {"name": pieces[0]}})]
    chunks += [_chunk({"index": 0, "function": {"name": piece, "arguments": '{"city"'}}) for piece in pieces[1:]]
    chunks += [_chunk({"index": 0, "function": {"arguments": ': "Oslo"}'}}), _chunk(finish="tool_calls")]
    reader, tally = openai_chat.ChunkReader(), StreamTally()
    deltas = [delta for chunk in chunks for delta in reader.read(chunk)]
    for chunk in chunks:
        tally.take_delta(chunk["choices"][0]["delta"])
    assert deltas[0] == ToolCallStart(0, "call_1", "get_weather")
    assert "".join(d.fragment for d in deltas if isinstance(d, ToolArgumentsDelta)) == '{"city": "Oslo"}'
    assert tally.message()["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_a_passed_through_file_is_named_unreadable_for_the_router() -> None:
    """t64: an input_file in the last user message: the router cannot see what it asks."""
    given = {"role": "user", "content": [{"type": "input_text", "text": "Summarize this."},
                                        {"type": "input_file", "file_id": "file-1"}]}  # fmt: skip
    raw = msgspec.json.encode({"model": "m", "input": [given]})
    assert codec.decode_request(raw, passed_through=True).request.unreadable == (
        "input[0].content[1]: a 'input_file' part the gateway does not read"
    )
    plain = msgspec.json.encode({"model": "m", "input": "Summarize this."})
    assert codec.decode_request(plain, passed_through=True).request.unreadable is None


def test_hosted_tools_and_audio_are_priced_options_and_each_use_is_counted() -> None:
    """t159: a passed-through request's hosted tools and audio went on at the text prices."""
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    body = {
        "tools": [{"type": "web_search_preview_2025_03_11"}, {"type": "code_interpreter"}, {"type": "function"}],
        "max_tool_calls": 4,
        "input": [{"type": "function_call_output", "call_id": "c", "output": [audio]}],
    }
    asked = codec.priced_options(body)
    assert asked.server_tools == {"web_search": 4, "code_interpreter": 4} and asked.audio_input == "input"
    assert codec.priced_options({"tools": [{"type": "web_search"}], "input": "x"}).server_tools == {"web_search": 1}
    uses = codec.HostedToolUses()
    runs = [{"type": "code_interpreter_call", "id": f"ci_{n}", "container_id": "cntr_1"} for n in (1, 2)]
    output = [{"type": "web_search_call", "id": "ws_1"}, {"type": "web_search_call"}, *runs, {"type": "message"}]
    assert uses.add(output[0], 0) and not uses.add(output[-1], 4)
    assert uses.add_output(output)  # read again from the final response: each item once
    assert uses.uses() == {"web_search": 2, "code_interpreter": 1}


_AGENTS: Any = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [
        {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
         "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}},
        {"type": "function", "name": "wait_agent", "parameters": {"type": "object", "properties": {}}},
    ],
}  # fmt: skip
"""Codex's namespace tool (f239), as the Codex CLI 0.171 sends it, shortened."""


def test_a_namespaces_functions_reach_the_upstream_as_plain_functions_under_joined_names() -> None:
    """f239: Codex's ``multi_agent_v1`` namespace was a 400 on a translated route."""
    decoded = _decode(input="x", tools=[{"type": "function", "name": "shell"}, _AGENTS])
    sent = [tool["function"] for tool in _chat(decoded)["tools"]]
    assert [tool["name"] for tool in sent] == ["shell", "multi_agent_v1__close_agent", "multi_agent_v1__wait_agent"]
    assert sent[1]["description"] == (
        "Namespace multi_agent_v1: Tools for spawning and managing sub-agents.\n\nClose an agent."
    )
    assert sent[1]["parameters"] == _AGENTS["tools"][0]["parameters"] and sent[1]["strict"] is False
    assert sent[2]["description"] == "Namespace multi_agent_v1: Tools for spawning and managing sub-agents."
    claude = anthropic.encode_request(codec.to_request(decoded), "claude", stream=False)
    assert [tool["name"] for tool in claude["tools"]][1:] == [
        "multi_agent_v1__close_agent",
        "multi_agent_v1__wait_agent",
    ]
    echoed = decoded.echo["tools"][1]  # as sent: the SDK reads it as a NamespaceTool
    assert echoed["type"] == "namespace" and [tool["name"] for tool in echoed["tools"]] == ["close_agent", "wait_agent"]
    body = codec.response_object(decoded, "resp_1", 1, output=[], usage=None)
    assert Response.model_validate(body).tools[1].type == "namespace"
    viewed = codec.decode_request(
        msgspec.json.encode({"model": "m", "input": "x", "tools": [_AGENTS]}), passed_through=True
    )
    assert viewed.request.tools == [] and viewed.namespaces == {}  # passed through: the upstream reads it


def test_a_call_to_a_namespaced_function_comes_back_with_its_name_and_namespace_streamed_or_not() -> None:
    decoded = _decode(input="x", tools=[_AGENTS])
    joined = ToolCall("call_1", "multi_agent_v1__close_agent", '{"target":"a1"}')
    answer = codec.with_namespaces(_answer(None, [joined], "tool_calls", Usage()), decoded)
    output = codec.output_items(answer, _ids())
    call = Response.model_validate(codec.response_object(decoded, "resp_1", 1, output=output, usage=Usage())).output[0]
    assert call.type == "function_call" and (call.name, call.namespace) == ("close_agent", "multi_agent_v1")
    encoder = codec.StreamEncoder(_decode(input="x", tools=[_AGENTS], stream=True), "resp_1", 1, _ids())
    out = encoder.start() + encoder.feed(
        [ToolCallStart(0, "call_1", "multi_agent_v1__close_agent"), ToolArgumentsDelta(0, '{"target":"a1"}')]
    )
    out += encoder.feed([Finish("tool_calls")]) + encoder.finish()
    names, events, state = _replay(out)
    added, done = events[names.index("response.output_item.added")], events[names.index("response.output_item.done")]
    assert (added.item.name, added.item.namespace) == (done.item.name, done.item.namespace) == (
        "close_agent", "multi_agent_v1"
    )  # fmt: skip
    assert events[names.index("response.function_call_arguments.done")].name == "close_agent"
    final = state._completed_response
    assert final is not None and final.output[0].type == "function_call"
    assert (final.output[0].name, final.output[0].namespace) == ("close_agent", "multi_agent_v1")
    said = codec.assistant_message(encoder.answer())  # what the store keeps: the joined name, and the namespace
    assert said.tool_calls == (ToolCall("call_1", "multi_agent_v1__close_agent", '{"target":"a1"}', "multi_agent_v1"),)
    kept = msgspec.json.decode(
        msgspec.json.encode(StoredResponse.turn({"id": "resp_1"}, [said], [])), type=StoredResponse
    )
    listed = codec.input_items(kept.added, [("resp_1", 1)])
    assert (listed[0]["name"], listed[0]["namespace"]) == ("close_agent", "multi_agent_v1")
    assert _chat(
        _decode(input=[{"type": "function_call_output", "call_id": "call_1", "output": "closed"}]), kept.added
    )["messages"][0]["tool_calls"][0]["function"]["name"] == (
        "multi_agent_v1__close_agent"
    )  # a later turn sends it upstream as the upstream called it


def test_a_function_call_item_with_a_namespace_goes_upstream_under_the_joined_name() -> None:
    """Codex sends its earlier turns back whole (``store: false``), each call with its namespace."""
    decoded = _decode(
        tools=[_AGENTS],
        input=[
            {"role": "user", "content": "close a1"},
            {"type": "function_call", "call_id": "c1", "name": "close_agent", "namespace": "multi_agent_v1",
             "arguments": '{"target":"a1"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "closed"},
        ],
    )  # fmt: skip
    messages = _chat(decoded)["messages"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "multi_agent_v1__close_agent"
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "closed"}
    claude = anthropic.encode_request(codec.to_request(decoded), "claude", stream=False)["messages"]
    assert claude[1]["content"][0]["name"] == "multi_agent_v1__close_agent"
    listed = codec.input_items(decoded.request.messages, [("resp_1", 3)])
    assert (listed[1]["name"], listed[1]["namespace"]) == ("close_agent", "multi_agent_v1")
    with pytest.raises(InvalidRequestError) as bad:
        _decode(input=[{"type": "function_call", "call_id": "c1", "name": "f", "namespace": 7, "arguments": "{}"}])
    assert bad.value.param == "input[0].namespace"


@pytest.mark.parametrize(
    ("tools", "param", "said"),
    [
        ([{**_AGENTS, "tools": [{"type": "custom", "name": "patch"}]}], "tools", "tool type(s) custom are not"),
        ([{**_AGENTS, "name": "n" * 60}], "tools[0].tools[0].name", "longer than the 64 characters"),
        ([{"type": "function", "name": "multi_agent_v1__wait_agent"}, _AGENTS], "tools[1].tools[1].name", "another"),
        ([_AGENTS, _AGENTS], "tools[1].tools[0].name", "the name of another of the request's tools"),
        ([{**_AGENTS, "name": "multi agent"}], "tools[0].name", "does not match pattern"),
    ],
)
def test_a_namespace_that_cannot_reach_a_chat_upstream_is_a_400_saying_why(
    tools: list[Any], param: str, said: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        _decode(input="x", tools=tools)
    assert refused.value.status_code == 400 and refused.value.param == param and said in refused.value.message
