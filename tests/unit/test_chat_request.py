"""A chat body's checks at the edge that OpenAI's API makes of the conversation and its tools (t179)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequestError
from gateway.protocols.chat_request import parse_chat_request

_ASK = {"role": "user", "content": "weather?"}
_TOOLS = [{"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}]


def _calls(*ids: str) -> dict[str, Any]:
    calls = [{"id": i, "type": "function", "function": {"name": "get_w", "arguments": "{}"}} for i in ids]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


def _refusal(**body: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as refused:
        parse_chat_request(msgspec.json.encode({"model": "fast", **body}))
    return refused.value


_NOT_A_RESPONSE = (
    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
)


@pytest.mark.parametrize(
    "messages",
    [
        [_ASK, _answer("call_1")],  # answers nothing
        [_ASK, _calls("call_1"), _answer("call_zzz")],  # answers no call asked
        [_ASK, _calls("call_1"), _answer("call_1"), _ASK, _answer("call_1")],  # answered in an earlier turn
    ],
)
def test_a_tool_message_answering_no_call_is_refused_in_openais_words(messages: list[dict[str, Any]]) -> None:
    refused = _refusal(messages=messages)
    assert refused.message == _NOT_A_RESPONSE
    assert refused.param == f"messages.[{len(messages) - 1}].role" and refused.error_type == "invalid_request_error"


@pytest.mark.parametrize(
    "messages",
    [
        [_ASK, _calls("call_1"), _answer("call_1"), _answer("call_1")],
        [_ASK, _calls("call_1", "call_2"), _answer("call_1"), _answer("call_1"), _answer("call_2")],
        [_ASK, _calls("call_1", "call_1"), _answer("call_1"), _answer("call_1")],
    ],
)
def test_a_call_answered_twice_is_refused_naming_both_answers(messages: list[dict[str, Any]]) -> None:
    """As OpenAI refuses it (f202): the second answer is named, not taken as answering nothing."""
    refused = _refusal(messages=messages)
    assert refused.message == (
        "Invalid parameter: Duplicate value for 'tool_call_id' of 'call_1', in messages[2] and messages[3]."
    )
    assert (refused.param, refused.code) == ("messages.[3].tool_call_id", None)


@pytest.mark.parametrize("after", [[_ASK], []])
def test_a_call_left_unanswered_is_refused_naming_its_ids(after: list[dict[str, Any]]) -> None:
    refused = _refusal(messages=[_ASK, _calls("call_x", "call_y", "call_z"), _answer("call_y"), *after])
    assert refused.message == (
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        "'tool_call_id'. The following tool_call_ids did not have response messages: call_x, call_z"
    )
    assert refused.param == "messages.[1].role"


def test_a_tool_message_without_its_call_id_is_a_missing_parameter() -> None:
    refused = _refusal(messages=[_ASK, _calls("call_1"), {"role": "tool", "content": "sunny"}])
    assert refused.message == "Missing required parameter: 'messages.[2].tool_call_id'."
    assert refused.param == "messages.[2].tool_call_id" and refused.code == "missing_required_parameter"


def test_answered_calls_and_legacy_functions_are_taken() -> None:
    parallel = [_ASK, _calls("a", "b"), _answer("b"), _answer("a"), {"role": "assistant", "content": "sunny"}]
    function = [
        _ASK,
        {"role": "assistant", "content": None, "function_call": {"name": "get_w", "arguments": "{}"}},
        {"role": "function", "name": "get_w", "content": "sunny"},
    ]
    for messages in (parallel, function, [_ASK, _calls("a"), _answer("a"), _ASK, _calls("b"), _answer("b")]):
        assert parse_chat_request(msgspec.json.encode({"model": "fast", "messages": messages, "tools": _TOOLS}))


def test_json_mode_without_the_word_json_is_refused_in_openais_words() -> None:
    refused = _refusal(messages=[_ASK], response_format={"type": "json_object"})
    assert refused.message == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
    )
    assert refused.param == "messages"
    for said in ("Answer in JSON.", [{"type": "text", "text": "as Json"}]):
        body = {"model": "fast", "messages": [_ASK, {"role": "system", "content": said}]}
        assert parse_chat_request(msgspec.json.encode({**body, "response_format": {"type": "json_object"}}))


@pytest.mark.parametrize(
    ("name", "message", "code"),
    [
        (
            "get.weather",
            "Invalid 'tools[0].function.name': string does not match pattern. Expected a string that matches "
            "the pattern '^[a-zA-Z0-9_-]+$'.",
            "invalid_value",
        ),
        (
            "f" * 65,
            "Invalid 'tools[0].function.name': string too long. Expected a string with maximum length 64, "
            "but got a string with length 65 instead.",
            "string_above_max_length",
        ),
    ],
)
def test_a_tool_name_openai_refuses_is_refused_as_it_refuses_it(name: str, message: str, code: str) -> None:
    refused = _refusal(messages=[_ASK], tools=[{"type": "function", "function": {"name": name}}])
    assert (refused.message, refused.param, refused.code) == (message, "tools[0].function.name", code)


def test_parallel_tool_calls_without_tools_is_refused_and_null_is_not_set() -> None:
    no_tools: list[dict[str, Any]] = [{}, {"tools": []}]
    for tools in no_tools:
        refused = _refusal(messages=[_ASK], parallel_tool_calls=False, **tools)
        assert refused.message == (
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are specified."
        )
        assert refused.param == "parallel_tool_calls"
    for body in ({"parallel_tool_calls": None}, {"parallel_tool_calls": False, "tools": _TOOLS}):
        assert parse_chat_request(msgspec.json.encode({"model": "fast", "messages": [_ASK], **body}))
