"""OpenAI's Responses API served by the gateway over OpenAI-compatible upstreams, with the openai SDK."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import redis
from openai.types.responses import Response
from pydantic import BaseModel

from gateway.auth import hash_key
from gateway.core.model import Message, TextPart
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream
from gateway.store import keyspace
from tests.conftest import closed_after_test, inject, upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway, stop_with_its_redis_back

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def _stored(response: Response) -> object:
    """The `store` flag the gateway sends: this SDK's Response model declares no such field, so it is an extra."""
    return (response.model_extra or {}).get("store")


def _last_upstream_body(upstream: SimulatedUpstream) -> dict[str, Any]:
    last = upstream_stats(upstream)["last_request"]
    assert isinstance(last, dict)
    body: dict[str, Any] = last["body"]
    return body


def test_a_string_input_is_answered_as_a_response_object(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    raw = client.responses.with_raw_response.create(model="fast", input="Name three primary colours.")
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.model == "fast" and response.output_text
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert _stored(response) is True and response.error is None and response.previous_response_id is None
    assert "output_text" not in raw.http_response.json()  # the SDK computes it; it is not on the wire
    assert raw.headers["x-gateway-model"] == "small"
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["protocol"] == "openai.responses" and record["status"] == 200 and record["route"] == "fast"


def test_instructions_and_a_list_input_reach_the_upstream_in_order(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    response = client.responses.create(
        model="fast",
        instructions="You are terse.",
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
            {"type": "message", "role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again, please."},
        ],
        max_output_tokens=64,
        temperature=0.5,
        metadata={"ticket": "T-1"},
    )
    assert response.output_text and response.instructions == "You are terse."
    assert response.metadata == {"ticket": "T-1"} and response.max_output_tokens == 64
    body = _last_upstream_body(small_upstream)
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "You are terse."),
        ("system", "Answer in English."),
        ("user", "Say hello."),
        ("assistant", "Hello."),
        ("user", "Again, please."),
    ]
    assert body["max_tokens"] == 64 and body["temperature"] == 0.5


def test_the_stream_helper_gets_the_same_answer_with_events_in_order(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": "fast",
        "input": "Describe the sea in a few words.",
        "extra_headers": {"cache-control": "no-cache"},
    }
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    names = [event.type for event in events]
    assert final.output_text == whole.output_text and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens > 0 and final.id.startswith("resp_")
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text


def test_raw_stream_events_are_named_and_numbered(gateway: GatewayProcess) -> None:
    body = {"model": "fast", "input": "hi there", "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/responses", json=body, timeout=15) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert len(names) == len(data) and [d["type"] for d in data] == names
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert names[0] == "response.created" and names[-1] == "response.completed"
    completed = data[-1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["total_tokens"] > 0
    record = gateway.wait_for_record(request_id)  # the pipeline's stream was read to its end
    assert record["status"] == 200 and record["stream"] is True and record["protocol"] == "openai.responses"
    retrieved = httpx.get(f"{gateway.base_url}/responses/{completed['id']}", timeout=10)
    assert retrieved.status_code == 200 and retrieved.json()["output"] == completed["output"]


def test_a_stream_cut_midway_ends_with_response_failed_and_is_not_stored(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"cut_after_chunks": 3})
    with client.responses.with_streaming_response.create(
        model="fast", input="Tell me a long story.", stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        events = list(response.parse())
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    assert any(event.type == "response.output_text.delta" for event in events)
    assert gateway.wait_for_record(request_id)["error_type"] == "upstream_bad_response"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(failed.id)


class Colours(BaseModel):
    colours: list[str]
    count: int


def test_structured_output_parses_into_the_model(client: openai.OpenAI, small_upstream: SimulatedUpstream) -> None:
    parsed = client.responses.parse(model="fast", input="Name three colours.", text_format=Colours)
    assert isinstance(parsed.output_parsed, Colours)
    response_format = _last_upstream_body(small_upstream)["response_format"]
    assert response_format["type"] == "json_schema" and response_format["json_schema"]["name"] == "Colours"
    assert response_format["json_schema"]["strict"] is True


def test_a_refusal_is_told_as_one_streamed_or_not_and_a_follow_up_continues_it(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """A chat model's ``message.refusal`` is Responses' refusal part (t25: it was an empty text,
    which ``responses.parse`` then failed to parse as the schema)."""
    declined = "I can't help with that request."
    inject(small_upstream, {"refusal": declined})
    parsed = client.responses.parse(model="fast", input="Name three colours.", text_format=Colours)
    assert parsed.status == "completed" and parsed.output_parsed is None
    message = parsed.output[-1]
    assert message.type == "message"
    assert [(part.type, getattr(part, "refusal", None)) for part in message.content] == [("refusal", declined)]

    inject(small_upstream, {"refusal": declined})
    with client.responses.stream(model="fast", input="Tell me a secret.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [event.delta for event in events if event.type == "response.refusal.delta"]
    assert "".join(deltas) == declined and len(deltas) > 1
    done = [event for event in events if event.type == "response.refusal.done"]
    assert len(done) == 1 and done[0].refusal == declined
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = final.output[-1]
    assert streamed.type == "message" and [part.type for part in streamed.content] == ["refusal"]
    assert final.output_text == ""

    follow_up = client.responses.create(model="fast", previous_response_id=final.id, input="Why not?")
    assert follow_up.output_text
    messages = _last_upstream_body(small_upstream)["messages"]
    assert messages[1] == {"role": "assistant", "content": declined}  # what the model said, carried on


def test_function_calls_and_their_outputs_round_trip(client: openai.OpenAI, small_upstream: SimulatedUpstream) -> None:
    first = client.responses.create(
        model="fast", input="What is the weather in Oslo?", tools=[WEATHER_TOOL], tool_choice="required"
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].id and calls[0].id.startswith("fc_")
    assert json.loads(calls[0].arguments).keys() == {"city"}
    assert first.tools[0].type == "function" and first.tool_choice == "required"
    second = client.responses.create(
        model="fast",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "-3C and snowing"}],
        tools=[WEATHER_TOOL],
    )
    assert second.output_text and second.previous_response_id == first.id
    messages = _last_upstream_body(small_upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == calls[0].call_id
    assert messages[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "-3C and snowing"}


def test_a_function_call_output_answering_no_call_of_the_conversation_is_refused(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """f92: it went upstream as a tool message answering no call; OpenAI's API refuses it."""
    first = client.responses.create(
        model="fast", input="What is the weather in Oslo?", tools=[WEATHER_TOOL], tool_choice="required"
    )
    call = next(item for item in first.output if item.type == "function_call")
    before = upstream_stats(small_upstream)["requests"]
    bogus: Any = {"type": "function_call_output", "call_id": "call_bogus", "output": "-3C"}
    asked: Any = [
        {"previous_response_id": first.id, "input": [bogus]},
        {"input": [{"role": "user", "content": "Weather?"}, bogus]},
        {"previous_response_id": first.id,  # a call of this input is answered, the bogus one still is not
         "input": [{"type": "function_call", "call_id": "call_own", "name": "get_weather", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "call_own", "output": "1C"}, bogus]},
    ]  # fmt: skip
    for body in asked:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="fast", tools=[WEATHER_TOOL], **body)
        said: Any = refused.value.body
        assert said["type"] == "invalid_request_error" and refused.value.param == "input"
        assert said["message"] == "No tool call found for function call output with call_id call_bogus."
    assert upstream_stats(small_upstream)["requests"] == before  # nothing went upstream
    answered = client.responses.create(  # the call's own output, and one this input calls, go on
        model="fast",
        previous_response_id=first.id,
        tools=[WEATHER_TOOL],
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "-3C"},
            {"type": "function_call", "call_id": "call_own", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_own", "output": "1C"},
        ],
    )
    assert answered.output_text


@pytest.mark.parametrize(
    ("asked", "param", "message", "code"),
    [
        (  # instructions do not count: OpenAI reads the input messages only
            {"instructions": "Answer in JSON.", "input": "Say hi.", "text": {"format": {"type": "json_object"}}},
            "text.format",
            "Response input messages must contain the word 'json' in some form to use 'text.format' of type "
            "'json_object'.",
            None,
        ),
        (  # a history trimmed between a call and its output
            {"input": [{"role": "user", "content": "Weather?"},
                       {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                       {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
                       {"type": "function_call_output", "call_id": "call_2", "output": "1C"},
                       {"role": "user", "content": "And?"}]},
            "input",
            "No tool output found for function call call_1.",
            None,
        ),
        (
            {"input": "Hi.", "tools": [{**WEATHER_TOOL, "name": "get weather"}]},
            "tools[0].name",
            "Invalid 'tools[0].name': string does not match pattern. Expected a string that matches the pattern "
            "'^[a-zA-Z0-9_-]+$'.",
            "invalid_value",
        ),
        (  # f201: OpenAI's minimum, which a chat upstream does not have
            {"input": "Hi.", "max_output_tokens": 15},
            "max_output_tokens",
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but got 15 instead.",
            "integer_below_min_value",
        ),
    ],
)  # fmt: skip
def test_what_openai_refuses_in_an_input_or_its_tools_is_refused_before_it_is_served(
    client: openai.OpenAI,
    small_upstream: SimulatedUpstream,
    asked: dict[str, Any],
    param: str,
    message: str,
    code: str | None,
) -> None:
    """t182: OpenAI refuses these with a 400; translated to a chat upstream they were served and
    billed (JSON mode without the word may write whitespace until the token limit)."""
    sent = upstream_stats(small_upstream)["requests"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="fast", stream=stream, **{"tools": [WEATHER_TOOL], **asked})
        assert refused.value.body == {"message": message, "type": "invalid_request_error", "param": param,
                                      "code": code}  # fmt: skip
    assert upstream_stats(small_upstream)["requests"] == sent


_ONE_OUTPUT_EACH = "Each function_call must have exactly one matching function_call_output"


def test_a_call_id_called_again_while_waiting_or_answered_twice_is_refused_as_openai_refuses_it(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """f222: which call does the output answer? Two calls of one id, or two outputs of one call,
    went to the chat upstream as they came. OpenAI refuses a second output; the gateway refuses
    both, streamed or not, nothing going upstream. Servers that number their calls per turn
    (``call_0``) reuse an id once it is answered: each output follows its own call, and that goes on."""
    call: Any = {"type": "function_call", "call_id": "call_0", "name": "get_weather", "arguments": "{}"}
    ask: Any = {"role": "user", "content": "Weather?"}

    def output(text: str) -> Any:
        return {"type": "function_call_output", "call_id": "call_0", "output": text}

    refused = [
        ([ask, call, call, output("1C")], f"Duplicate function_call for call_id 'call_0'. {_ONE_OUTPUT_EACH}"),
        ([ask, call, output("1C"), output("2C")], f"Duplicate function_call_output for call_id 'call_0'. {_ONE_OUTPUT_EACH}"),
    ]  # fmt: skip
    sent = upstream_stats(small_upstream)["requests"]
    for given, message in refused:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                client.responses.create(model="fast", stream=stream, tools=[WEATHER_TOOL], input=given)
            assert caught.value.body == {"message": message, "type": "invalid_request_error", "param": "input",
                                         "code": None}  # fmt: skip
    assert upstream_stats(small_upstream)["requests"] == sent
    again = client.responses.create(
        model="fast", tools=[WEATHER_TOOL], input=[ask, call, output("1C"), call, output("2C")]
    )
    assert again.status == "completed"
    messages = _last_upstream_body(small_upstream)["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in messages] == [
        ("user", None), ("assistant", None), ("tool", "call_0"), ("assistant", None), ("tool", "call_0")
    ]  # fmt: skip


def test_a_stored_call_left_unanswered_is_refused_and_one_answered_in_this_input_goes_on(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """t182: a turn continuing one whose answer called a tool must carry the call's output, as
    OpenAI requires; this input's output answering it is the Codex loop."""
    first = client.responses.create(
        model="fast", input="What is the weather in Oslo? Answer in JSON.", tools=[WEATHER_TOOL],
        tool_choice="required",
    )  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    sent = upstream_stats(small_upstream)["requests"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fast", previous_response_id=first.id, input="Well?", tools=[WEATHER_TOOL])
    said: Any = refused.value.body
    assert refused.value.param == "input"
    assert said["message"] == f"No tool output found for function call {call.call_id}."
    assert upstream_stats(small_upstream)["requests"] == sent
    answered = client.responses.create(  # the word said in an earlier turn's input counts for JSON mode
        model="fast",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-3C"}],
        tools=[WEATHER_TOOL],
        text={"format": {"type": "json_object"}},
    )
    assert answered.status == "completed"
    renamed: Any = [{**WEATHER_TOOL, "name": "Get-weather_v2"}]  # the pattern's characters
    in_a_part: Any = [{"role": "user", "content": [{"type": "input_text", "text": "Reply as JSON."}]}]
    said_in_a_part = client.responses.create(
        model="fast",
        input=in_a_part,
        text={"format": {"type": "json_object"}},
        tools=renamed,
    )
    assert said_in_a_part.status == "completed"


def test_a_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="fast", input="What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required"
    ) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_response()
    call = final.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments)
    assert "response.function_call_arguments.delta" in names and "response.function_call_arguments.done" in names
    assert names[-1] == "response.completed"


def _text_and_call(city: str) -> dict[str, Any]:
    """A fault that makes the upstream answer with text and a call to get_weather, as a model may."""
    call = {
        "id": "call_w1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    completion = {
        "id": "chatcmpl-f234",
        "object": "chat.completion",
        "created": 0,
        "model": "small",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    return {"status": 200, "body": json.dumps(completion)}


def test_item_references_to_the_tenants_own_output_items_read_as_the_items_themselves(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """f234: the Vercel AI SDK's default (``store: true``) sends a step's output back as item references."""
    prompt = f"What is the weather in Paris? ({uuid.uuid4().hex})"
    inject(small_upstream, _text_and_call("Paris"))
    first = client.responses.create(model="fast", input=prompt, tools=[WEATHER_TOOL])
    message, call = first.output
    assert message.type == "message" and call.type == "function_call" and message.id and call.id
    second = client.responses.create(
        model="fast",
        tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": prompt},
            {"type": "item_reference", "id": message.id},
            {"id": call.id},  # the shorthand: an item reference's type is optional in OpenAI's API
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert second.status == "completed" and second.output_text
    messages = _last_upstream_body(small_upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == "Let me look."
    assert messages[1]["tool_calls"] == [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    listed = [item.id for item in client.responses.input_items.list(second.id, order="asc")]
    assert listed[1:3] == [message.id, call.id]  # the items keep their ids, as if sent whole


def test_an_item_reference_to_a_streamed_responses_output_reads_as_the_item(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    prompt = f"Say something about the sea. ({uuid.uuid4().hex})"
    with client.responses.stream(model="fast", input=prompt) as events:
        first = events.get_final_response()
    (message,) = first.output
    assert message.type == "message"
    client.responses.create(
        model="fast", input=[{"role": "user", "content": prompt}, {"type": "item_reference", "id": message.id}]
    )
    messages = _last_upstream_body(small_upstream)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", prompt), ("assistant", first.output_text)]


def test_previous_response_id_continues_the_conversation(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    first = client.responses.create(model="fast", instructions="Be kind.", input="My name is Zed.")
    second = client.responses.create(model="fast", previous_response_id=first.id, input="What is my name?")
    third = client.responses.create(model="fast", previous_response_id=second.id, input="And again?")
    messages = _last_upstream_body(small_upstream)["messages"]
    # The stored turns give the whole conversation; instructions are not carried over (as in OpenAI's API).
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "My name is Zed."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
        ("assistant", second.output_text),
        ("user", "And again?"),
    ]
    assert third.previous_response_id == second.id and third.instructions is None


def test_input_items_list_the_conversation_a_response_answered(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="fast", input="What is the weather in Oslo?", tools=[WEATHER_TOOL], tool_choice="required"
    )
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(
        model="fast",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-3C"}],
        tools=[WEATHER_TOOL],
    )
    newest_first = client.responses.input_items.list(second.id)
    assert [item.type for item in newest_first.data] == ["function_call_output", "function_call", "message"]
    output, asked_call, asked = newest_first.data
    assert output.type == "function_call_output" and output.call_id == call.call_id and output.output == "-3C"
    assert asked_call.type == "function_call" and (asked_call.name, asked_call.arguments) == (call.name, call.arguments)
    assert asked.type == "message" and asked.role == "user"
    assert asked.content[0].type == "input_text" and asked.content[0].text == "What is the weather in Oslo?"
    # Pages by ``after``, in either order, with the same ids every time.
    paged = [item.id for item in client.responses.input_items.list(second.id, order="asc", limit=1)]
    assert paged == [item.id for item in reversed(newest_first.data)]
    (only,) = client.responses.input_items.list(first.id).data
    assert only.type == "message" and only.content[0].type == "input_text" and "Oslo" in only.content[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.input_items.list(second.id, limit=101)
    assert bad.value.param == "limit"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nothing_here")
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(second.id)


def test_items_keep_their_ids_from_turn_to_turn_as_openai_keeps_them(client: openai.OpenAI) -> None:
    """f76: every listing made new ids (from the listing response's id and the item's place), so
    the client's own id was lost, one item had another id under each response, and an answer's
    items were not those of its ``output``: a client that rebuilt a conversation from ``output``
    and ``input_items``, one item once by its id, had every item twice."""
    asked: Any = {"type": "message", "role": "user", "id": "msg_client_1", "content": "What is the weather in Oslo?"}
    first = client.responses.create(model="fast", input=[asked], tools=[WEATHER_TOOL], tool_choice="required")
    call = next(item for item in first.output if item.type == "function_call")
    result: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "-3C"}
    with client.responses.stream(model="fast", previous_response_id=first.id, input=[result]) as stream:
        second = stream.get_final_response()
    third = client.responses.create(model="fast", previous_response_id=second.id, input="Thanks.")
    answered = second.output[0]
    assert answered.type == "message"

    assert [item.id for item in client.responses.input_items.list(first.id).data] == ["msg_client_1"]
    listed = client.responses.input_items.list(second.id, order="asc").data
    assert [item.id for item in listed[:2]] == ["msg_client_1", call.id]  # as sent, and as answered
    fco = listed[2].id
    assert fco is not None and fco.startswith("fco_")  # sent without one: given one, kept from then on
    later = [item.id for item in client.responses.input_items.list(third.id, order="asc").data]
    assert later[:4] == ["msg_client_1", call.id, fco, answered.id]  # the streamed answer's too
    assert len(set(later)) == len(later) == 5
    assert later == [item.id for item in client.responses.input_items.list(third.id, order="asc").data]


def test_an_id_sent_twice_is_listed_once_and_pages_by_after_reach_every_item(client: openai.OpenAI) -> None:
    """Item ids page the listing (``after``): one the client sends again, in a turn or a later one,
    is listed under another id, the same at every read."""
    twice = [{"type": "message", "role": "user", "id": "msg_same", "content": text} for text in ("One.", "Two.")]
    first = client.responses.create(model="fast", input=twice)  # type: ignore[arg-type]
    again = [{"type": "message", "role": "user", "id": "msg_same", "content": "Three."}]
    second = client.responses.create(model="fast", previous_response_id=first.id, input=again)  # type: ignore[arg-type]
    listed = client.responses.input_items.list(second.id, order="asc").data
    ids = [item.id for item in listed]
    assert ids[0] == "msg_same" and ids[2] == first.output[0].id and len(set(ids)) == len(ids) == 4
    paged = [item.id for item in client.responses.input_items.list(second.id, order="asc", limit=1)]
    assert paged == ids
    texts = [item.content[0].text for item in listed]  # type: ignore[union-attr,index]
    assert texts == ["One.", "Two.", first.output_text, "Three."]


def test_an_id_sent_again_is_listed_under_one_other_id_in_every_later_turns_list(client: openai.OpenAI) -> None:
    """t167 #1: the other id was derived from the listed response's id and the item's place, so
    each later turn listed the item under a new one: it is derived from the turn that stored it."""
    twice: Any = [{"type": "message", "role": "user", "id": "msg_same", "content": text} for text in ("One.", "Two.")]
    turns = [client.responses.create(model="fast", input=twice)]
    again: Any = [{"type": "message", "role": "user", "id": "msg_same", "content": "Three."}]
    turns.append(client.responses.create(model="fast", previous_response_id=turns[0].id, input=again))
    for text in ("Four.", "Five."):
        turns.append(client.responses.create(model="fast", previous_response_id=turns[-1].id, input=text))
    lists = [[item.id for item in client.responses.input_items.list(turn.id, order="asc").data] for turn in turns]
    assert lists[0][0] == "msg_same" and len(set(lists[-1])) == len(lists[-1]) == 2 + 3 * 2
    for earlier, later in itertools.pairwise(lists):
        assert later[: len(earlier)] == earlier  # each item under the id it had in the turn before


def test_a_stored_response_can_be_retrieved_and_deleted(client: openai.OpenAI) -> None:
    created = client.responses.create(model="fast", input="Keep this.", metadata={"k": "v"})
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.id == created.id and retrieved.output_text == created.output_text
    assert retrieved.metadata == {"k": "v"} and retrieved.usage == created.usage
    with pytest.raises(openai.BadRequestError) as streamed:  # t86: the SDK read the object as no events
        list(client.responses.retrieve(created.id, stream=True))
    assert streamed.value.param == "stream"
    with pytest.raises(openai.BadRequestError):  # a query boolean spelled as a number
        client.responses.retrieve(created.id, extra_query={"stream": 1})
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as gone:  # a 400, as OpenAI answers
        client.responses.create(model="fast", previous_response_id=created.id, input="more")
    assert gone.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def _stored_bytes(redis_server: EmbeddedRedis, tenant: str) -> int:
    """What the tenant's kept turns count against its cap."""
    with redis.Redis.from_url(redis_server.url) as store:
        return int(store.hget(keyspace.stored_responses(tenant) + ":bytes", "#") or 0)


def test_a_conversation_costs_its_tenant_each_turns_own_bytes_not_the_conversation_so_far(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """t60: each turn held the whole conversation up to it, so a chain of n turns cost the cap
    n²/2 turns, and one long session pushed the tenant's other conversations out."""
    filler = "Note this for later, please. " * 70  # ~2 KB a turn
    costs, previous = [], None
    for n in range(12):
        before = _stored_bytes(redis_server, "default")
        turn = client.responses.create(model="fast", input=f"{n}: {filler}", previous_response_id=previous)
        costs.append(_stored_bytes(redis_server, "default") - before)
        previous = turn.id
    # Linear: each turn costs its own text and answer, plus ~40 bytes per earlier turn's id (at most
    # 100 of them); holding the conversation so far, the 12th turn cost 12 turns' text (~25 KB).
    assert len(filler) < costs[0] and max(costs) - costs[0] < 12 * 48, costs
    assert sum(costs) < 12 * (costs[0] + 12 * 48)
    sent = _last_upstream_body(small_upstream)["messages"]
    assert len(sent) == 2 * 12 - 1 and sent[0]["content"] == f"0: {filler}"  # still the whole conversation
    assert [m["content"] for m in sent[::2]] == [f"{n}: {filler}" for n in range(12)]


class _RecordBefore(msgspec.Struct, kw_only=True):
    """A stored turn as the gateway wrote it before t60."""

    response: dict[str, Any]
    messages: list[Message]
    held_by: str | None = None
    own_ids: dict[str, str | None] = msgspec.field(default_factory=dict)


def test_a_turn_stored_by_the_previous_version_is_read_and_continued(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, redis_server: EmbeddedRedis
) -> None:
    """Records from before t60 hold the whole conversation (no ``version``): they stay readable."""
    old_id = "resp_" + uuid.uuid4().hex
    response = {"id": old_id, "object": "response", "status": "completed", "model": "fast", "output": [],
                "created_at": 1, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}  # fmt: skip
    said = ("My name is Ada.", "Hello Ada.", "I live in Oslo.", "Noted.")
    conversation = [Message("user" if n % 2 == 0 else "assistant", (TextPart(text),)) for n, text in enumerate(said)]
    written = msgspec.json.encode(_RecordBefore(response=response, messages=conversation))
    with redis.Redis.from_url(redis_server.url) as store:
        store.set(keyspace.response("default", old_id), written, ex=3600)
    assert client.responses.retrieve(old_id).id == old_id
    items = client.responses.input_items.list(old_id, order="asc").data
    assert [item.content[0].text for item in items if item.type == "message"] == [  # type: ignore[union-attr]
        "My name is Ada.", "Hello Ada.", "I live in Oslo."
    ]  # fmt: skip
    assert [item.id for item in items] == _derived_ids(old_id, ["msg"] * 3)  # kept no ids: as listed before
    second = client.responses.create(model="fast", previous_response_id=old_id, input="Where do I live?")
    third = client.responses.create(model="fast", previous_response_id=second.id, input="And my name?")
    sent = [m["content"] for m in _last_upstream_body(small_upstream)["messages"]]
    assert sent == ["My name is Ada.", "Hello Ada.", "I live in Oslo.", "Noted.", "Where do I live?",
                    second.output_text, "And my name?"]  # fmt: skip
    listed = [item.id for item in client.responses.input_items.list(third.id, order="asc").data]
    assert listed[:4] == _derived_ids(old_id, ["msg"] * 4) and listed[5] == second.output[0].id  # as its own (t167)
    assert listed[4] == client.responses.input_items.list(second.id).data[0].id  # kept since: the same under each
    assert len(set(listed)) == len(listed) == 7


def _derived_ids(response_id: str, prefixes: list[str]) -> list[str]:
    """The ids the gateway lists the items of a turn stored with none with: from its id and their place in it."""
    digests = [hashlib.blake2b(f"{response_id}:{n}".encode(), digest_size=16).hexdigest() for n in range(len(prefixes))]
    return [f"{prefix}_{digest}" for prefix, digest in zip(prefixes, digests, strict=True)]


def test_a_conversation_with_an_earlier_turn_deleted_is_read_but_not_continued(client: openai.OpenAI) -> None:
    """t60: a turn holds only what it added, so a deleted (or expired, or evicted) earlier turn
    leaves a gap: its descendants can be read, and continuing them is OpenAI's error for a response
    that is gone, which clients recover from by sending the whole conversation."""
    first = client.responses.create(model="fast", input="First, a secret: tulip.")
    second = client.responses.create(model="fast", previous_response_id=first.id, input="Second.")
    third = client.responses.create(model="fast", previous_response_id=second.id, input="Third.")
    client.responses.delete(first.id)
    assert client.responses.retrieve(third.id).output_text == third.output_text
    listed = client.responses.input_items.list(third.id, order="asc").data
    texts = [item.content[0].text for item in listed if item.type == "message"]  # type: ignore[union-attr]
    assert texts == ["Second.", second.output_text, "Third."]  # what follows the gap: not the deleted secret
    for descendant in (second, third):
        with pytest.raises(openai.BadRequestError) as gone:
            client.responses.create(model="fast", previous_response_id=descendant.id, input="Go on.")
        assert gone.value.code == "previous_response_not_found" and gone.value.param == "previous_response_id"
        said = gone.value.body["message"]  # type: ignore[index]
        assert said == (  # f92: not that the descendant, which GET still returns, is not found
            f"Previous response with id '{descendant.id}' continues response '{first.id}', which was not found "
            "(deleted or expired)."
        )


def test_continuing_past_a_deleted_middle_turn_names_the_turn_that_is_gone(client: openai.OpenAI) -> None:
    """f92: t1 -> t2 -> t3 with t2 deleted: continuing t3 said t3 was not found, while GET t3 answered."""
    first = client.responses.create(model="fast", input="One.")
    second = client.responses.create(model="fast", previous_response_id=first.id, input="Two.")
    third = client.responses.create(model="fast", previous_response_id=second.id, input="Three.")
    client.responses.delete(second.id)
    assert client.responses.retrieve(third.id).id == third.id
    with pytest.raises(openai.BadRequestError) as gone:
        client.responses.create(model="fast", previous_response_id=third.id, input="Four.")
    assert gone.value.status_code == 400 and gone.value.code == "previous_response_not_found"
    assert gone.value.param == "previous_response_id"
    said = gone.value.body["message"]  # type: ignore[index]
    assert f"'{second.id}'" in said and "not found" in said
    assert said != f"Previous response with id '{third.id}' not found."
    assert client.responses.create(model="fast", previous_response_id=first.id, input="Two again.").output_text


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model="fast", input="Forget this.", store=False)
    assert _stored(response) is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_errors_come_in_openais_shape(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as hosted:
        client.responses.create(model="fast", input="x", tools=[{"type": "web_search"}])
    assert hosted.value.status_code == 400 and "web_search" in hosted.value.message
    assert hosted.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    response = httpx.post(
        f"{gateway.base_url}/responses",
        json={"model": "fast", "input": "x", "previous_response_id": "resp_nope"},
        timeout=10,
    )
    assert response.status_code == 400  # OpenAI's status for this code, which Codex acts on
    assert response.json() == {
        "error": {
            "message": "Previous response with id 'resp_nope' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }
    assert gateway.wait_for_record(response.headers["x-request-id"])["status"] == 400
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="no-such-model", input="x")
    assert unknown.value.code == "model_not_found"
    for body, param in [
        ({"input": "x"}, "model"),
        ({"model": "fast", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "fast", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "fast", "input": "x", "metadata": {"k": {"nested": 1}}}, "metadata.k"),
    ]:
        invalid = httpx.post(f"{gateway.base_url}/responses", json=body, timeout=10)
        assert invalid.status_code == 400 and invalid.json()["error"]["param"] == param, invalid.text
        assert "x-gateway-model" not in invalid.headers  # refused before routing: no empty header (t60)
    with pytest.raises(openai.BadRequestError):
        # a role no message type has, on purpose: the SDK's types cannot express it, the gateway's 400 is the point
        client.responses.create(model="fast", input=[{"role": "robot", "content": "x"}])  # type: ignore[misc, list-item]


def test_usage_is_the_gateways_count_when_the_upstream_sends_none(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"omit_usage": True})
    raw = client.responses.with_raw_response.create(model="fast", input="Count these words for me.")
    usage = raw.parse().usage
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert record["tokens_source"] == "gateway" and record["prompt_tokens"] > 0
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (record["prompt_tokens"], record["completion_tokens"])


def test_fields_a_chat_upstream_cannot_honour_are_named_as_dropped(client: openai.OpenAI) -> None:
    loose_tool: Any = {**WEATHER_TOOL, "strict": None}
    raw = client.responses.with_raw_response.create(
        model="fast", input="Hi.", max_tool_calls=2, text={"verbosity": "low"}, tools=[loose_tool]
    )
    assert raw.headers["x-gateway-dropped"] == "text.verbosity,max_tool_calls"
    response = raw.parse()
    assert response.text is not None and response.text.verbosity is None  # what was done, not what was asked (t38)
    tool = response.tools[0]
    assert tool.type == "function" and tool.strict is False  # a chat upstream applies strict only when asked


def test_a_field_the_gateway_does_not_read_is_named_not_passed_over_in_silence(
    client: openai.OpenAI, small_upstream: SimulatedUpstream
) -> None:
    """t54: a misspelt ``max_output_token`` got a 200 with no limit and no word of it."""
    raw = client.responses.with_raw_response.create(
        model="fast", input="Hi.", service_tier="flex", extra_body={"max_output_token": 5}
    )
    assert raw.headers["x-gateway-dropped"] == "max_output_token"
    assert upstream_stats(small_upstream)["last_request"]["body"]["service_tier"] == "flex"  # as a chat client's


_LONG_KEY = "k" * 65
_PAST_METADATA_LIMITS = [  # each metadata, and OpenAI's param and message for it
    (
        {f"k{i}": "v" for i in range(17)},
        "metadata",
        "Invalid 'metadata': too many properties. Expected an object with at most 16 properties, "
        "but got an object with 17 properties instead.",
    ),
    (
        {_LONG_KEY: "v"},
        f"metadata.{_LONG_KEY}",
        f"Invalid property name in 'metadata': '{_LONG_KEY}' is too long. Expected a string with maximum "
        "length 64, but got a string with length 65 instead.",
    ),
    (
        {"k": "界" * 513},
        "metadata.k",
        "Invalid 'metadata.k': string too long. Expected a string with maximum length 512, but got a string "
        "with length 513 instead.",
    ),
]


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_metadata_past_openais_limits_is_refused_as_openai_refuses_it(client: openai.OpenAI, api: str) -> None:
    """t147: 17 pairs, a 65-character key or a 513-character value were answered 200, and a
    Responses turn stored and echoed them back; OpenAI refuses them (16 pairs, keys of at most 64
    characters, values of at most 512), and so does the gateway, in its words. At the limits, taken."""

    def ask(metadata: dict[str, str]) -> dict[str, str] | None:
        if api == "responses":
            return client.responses.create(model="fast", input="Hi.", metadata=metadata).metadata
        client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "Hi."}], metadata=metadata)
        return None

    for metadata, param, message in _PAST_METADATA_LIMITS:
        with pytest.raises(openai.BadRequestError) as refused:
            ask(metadata)
        assert refused.value.body == {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    at_limits = {f"{i:064}": "界" * 512 for i in range(16)}
    assert ask(at_limits) == (at_limits if api == "responses" else None)


_NOT_STRINGS: list[tuple[object, str]] = [
    (1, "an integer"),
    (1.5, "a number"),
    (True, "a boolean"),
    (None, "null"),
    ([], "an array"),
    ({}, "an object"),
]


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_a_metadata_value_not_a_string_is_refused_as_openai_refuses_it(client: openai.OpenAI, api: str) -> None:
    """t159: a value not a string was refused in msgspec's words (``Expected `str`, got `int```)
    with ``param: "metadata"``; OpenAI names the key and the type, before counting the pairs."""
    sixteen: dict[str, object] = {f"k{i}": "v" for i in range(16)}
    cases = [({"k": value}, "k", named) for value, named in _NOT_STRINGS] + [({**sixteen, "z": 2}, "z", "an integer")]
    for metadata, key, named in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            if api == "responses":
                client.responses.create(model="fast", input="Hi.", extra_body={"metadata": metadata})
            else:
                client.chat.completions.create(
                    model="fast", messages=[{"role": "user", "content": "Hi."}], extra_body={"metadata": metadata}
                )
        message = f"Invalid type for 'metadata.{key}': expected a string, but got {named} instead."
        assert refused.value.body == {
            "message": message, "type": "invalid_request_error", "param": f"metadata.{key}", "code": "invalid_type"
        }  # fmt: skip


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_a_json_schema_name_openai_refuses_is_refused_as_openai_refuses_it(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, api: str
) -> None:
    """t167 #2: a name outside ``^[a-zA-Z0-9_-]{1,64}$`` went upstream, where OpenAI refuses it;
    t169 #2: on chat, so did a schema without a name, which OpenAI requires as Responses does."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}

    def ask(name: object) -> None:
        named = {} if name is None else {"name": name}
        if api == "responses":
            text: Any = {"format": {"type": "json_schema", **named, "schema": schema}}
            client.responses.create(model="fast", input="Hi.", text=text, store=False)
        else:
            response_format: Any = {"type": "json_schema", "json_schema": {**named, "schema": schema}}
            client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "Hi."}], response_format=response_format
            )

    param = "text.format.name" if api == "responses" else "response_format.json_schema.name"
    pattern = "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'."
    refusals = [
        ("bad name!", f"Invalid '{param}': string does not match pattern. {pattern}", "invalid_value"),
        ("n" * 65, f"Invalid '{param}': string too long. Expected a string with maximum length 64, but got a "
                   "string with length 65 instead.", "string_above_max_length"),
        (7, f"Invalid type for '{param}': expected a string, but got an integer instead.", "invalid_type"),
        (None, f"Missing required parameter: '{param}'.", "missing_required_parameter"),
    ]  # fmt: skip
    before = upstream_stats(small_upstream)["requests"]
    for name, message, code in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            ask(name)
        assert refused.value.body == {"message": message, "type": "invalid_request_error", "param": param,
                                      "code": code}  # fmt: skip
    assert upstream_stats(small_upstream)["requests"] == before  # none went upstream
    ask("Answer_v2-" + "n" * 54)  # 64 characters of the pattern's
    body = _last_upstream_body(small_upstream)
    assert body["response_format"]["json_schema"]["name"] == "Answer_v2-" + "n" * 54


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_says_the_tier_that_processed_it(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t68: the response object never said which ``service_tier`` processed it, as OpenAI's does,
    though the bill used it: the tier the upstream says, not the one asked."""
    inject(small_upstream, {"service_tier_as": "default"})  # asked priority, served at the default tier
    if stream:
        with client.responses.stream(model="fast", input="Hi, streamed.", service_tier="priority") as events:
            said = events.get_final_response().service_tier
            response_id = events.get_final_response().id
    else:
        response = client.responses.create(model="fast", input="Hi.", service_tier="priority")
        said, response_id = response.service_tier, response.id
    assert said == "default"
    assert client.responses.retrieve(response_id).service_tier == "default"


def test_a_tool_results_image_a_chat_upstream_cannot_read_is_named_as_dropped(client: openai.OpenAI) -> None:
    """t43: it reached a chat upstream as a text-only tool message, with a 200 and no word."""
    items: Any = [
        {"type": "message", "role": "user", "content": "Plot it."},
        {"type": "function_call", "call_id": "c1", "name": "plot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "The chart:"}, {"type": "input_image", "image_url": "https://x/c.png"}]},
    ]  # fmt: skip
    raw = client.responses.with_raw_response.create(model="fast", input=items)
    assert raw.parse().output_text and raw.headers["x-gateway-dropped"] == "tool_result.image"


def test_a_tool_results_list_keeps_its_parts_in_order_as_the_other_protocols_do(
    client: openai.OpenAI, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t128: its texts were glued ("resB1resB2") and its images moved after them: an Anthropic
    upstream now reads its blocks in order, a chat upstream its texts a line apart, as a chat
    or Anthropic client's tool result with the same content reaches them."""

    def items(*output: dict[str, str]) -> Any:
        return [
            {"type": "message", "role": "user", "content": "Plot it."},
            {"type": "function_call", "call_id": "c1", "name": "plot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": list(output)},
        ]

    before, after = {"type": "input_text", "text": "before image."}, {"type": "input_text", "text": "after image."}
    image = {"type": "input_image", "image_url": "https://x/c.png"}
    client.responses.create(model="claude", input=items(before, image, after), store=False)
    result = _last_upstream_body(large_upstream)["messages"][-1]["content"][0]
    assert result["type"] == "tool_result" and result["content"] == [
        {"type": "text", "text": "before image."},
        {"type": "image", "source": {"type": "url", "url": "https://x/c.png"}},
        {"type": "text", "text": "after image."},
    ]
    raw = client.responses.with_raw_response.create(model="fast", input=items(before, image, after), store=False)
    assert raw.headers["x-gateway-dropped"] == "tool_result.image"
    assert _last_upstream_body(small_upstream)["messages"][-1]["content"] == "before image.\nafter image."
    texts = items({"type": "input_text", "text": "resB1"}, {"type": "input_text", "text": "resB2"})
    raw = client.responses.with_raw_response.create(model="fast", input=texts, store=False)
    assert "x-gateway-dropped" not in raw.headers
    assert _last_upstream_body(small_upstream)["messages"][-1] == {
        "role": "tool", "tool_call_id": "c1", "content": "resB1\nresB2"
    }  # fmt: skip


def test_a_reasoning_effort_reaches_a_chat_upstream_as_reasoning_effort_and_claude_names_it_dropped(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t204: an agent's ``reasoning.effort`` was dropped on every translated route, so a reasoning
    model served by vLLM never got it; chat's ``reasoning_effort`` is the same setting. A summary
    has no place in a chat request, and Claude takes no effort: each is named, not echoed (t38)."""
    body = {
        "model": "fast",
        "input": "2+2?",
        "reasoning": {"effort": "high", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "store": False,
    }
    response = httpx.post(f"{gateway.base_url}/responses", json=body, timeout=15)
    assert response.status_code == 200 and response.headers["x-gateway-dropped"] == "reasoning.summary,include"
    assert _last_upstream_body(small_upstream)["reasoning_effort"] == "high"
    assert response.json()["reasoning"] == {"effort": "high", "summary": None}
    response = httpx.post(f"{gateway.base_url}/responses", json={**body, "model": "claude"}, timeout=15)
    assert (
        response.status_code == 200 and response.headers["x-gateway-dropped"] == "reasoning.summary,include,reasoning"
    )
    assert "reasoning_effort" not in _last_upstream_body(large_upstream)
    assert response.json()["reasoning"] == {"effort": None, "summary": None}  # not echoed as if honoured (t38)


# -- tenants and the store being down ------------------------------------------------

KEYS = """auth:
  mode: keys
  keys:
    - {id: a1, tenant: acme, hash: "%(a1)s"}
    - {id: a2, tenant: acme, hash: "%(a2)s"}
    - {id: b1, tenant: globex, hash: "%(b1)s"}
    - {id: c1, tenant: initech, hash: "%(c1)s"}
""" % {name: hash_key(f"key-{name}") for name in ("a1", "a2", "b1", "c1")}


@pytest.fixture(scope="module")
def keyed_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    tenants = (  # acme keeps ~10 KB of turns, initech ~20 KB
        "\ntenants:\n  acme: {stored_responses_mib: 0.01}\n  globex: {}\n  initech: {stored_responses_mib: 0.02}\n"
    )
    policy = policy_text(small_upstream, large_upstream, auth=KEYS + tenants)
    process = start_gateway(Path(tmp_path_factory.mktemp("responses")), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def _client(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=10))


def test_a_tenant_cannot_read_continue_or_delete_another_tenants_response(keyed_gateway: GatewayProcess) -> None:
    with _client(keyed_gateway, "a1") as alice, _client(keyed_gateway, "a2") as colleague:
        with _client(keyed_gateway, "b1") as bob:
            mine = alice.responses.create(model="fast", input="A secret of acme.")
            with pytest.raises(openai.NotFoundError):
                bob.responses.retrieve(mine.id)
            with pytest.raises(openai.NotFoundError):
                bob.responses.input_items.list(mine.id)
            with pytest.raises(openai.BadRequestError) as continued:
                bob.responses.create(model="fast", previous_response_id=mine.id, input="What was the secret?")
            assert continued.value.code == "previous_response_not_found"
            with pytest.raises(openai.NotFoundError):
                bob.responses.delete(mine.id)
            assert alice.responses.retrieve(mine.id).output_text == mine.output_text  # still there
            # Another key of the same tenant shares its responses, as keys of one OpenAI project do.
            assert colleague.responses.retrieve(mine.id).id == mine.id
            with _client(keyed_gateway, "wrong") as stranger, pytest.raises(openai.AuthenticationError):
                stranger.responses.retrieve(mine.id)


@pytest.mark.parametrize("named", ["another tenant's", "unknown"])
def test_an_item_reference_to_no_item_of_the_tenant_is_openais_404_and_reaches_no_upstream(
    keyed_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream, named: str
) -> None:
    with _client(keyed_gateway, "a1") as alice, _client(keyed_gateway, "b1") as bob:
        theirs = alice.responses.create(model="fast", input=f"A secret of acme. ({uuid.uuid4().hex})")
        item_id = theirs.output[0].id if named == "another tenant's" else f"msg_{uuid.uuid4().hex}0"
        asked = [upstream_stats(upstream)["chat_requests"] for upstream in (small_upstream, large_upstream)]
        for reference in ({"type": "item_reference", "id": item_id}, {"id": item_id}):
            with pytest.raises(openai.NotFoundError) as refused:
                bob.responses.create(model="fast", input=[{"role": "user", "content": "Go on."}, reference])  # type: ignore[list-item]
            error = refused.value.body
            assert isinstance(error, dict)
            assert error == {
                "message": f"Item with id '{item_id}' not found.",
                "type": "invalid_request_error",
                "param": "input",
                "code": None,
            }
        assert [upstream_stats(upstream)["chat_requests"] for upstream in (small_upstream, large_upstream)] == asked


def test_a_tenant_past_its_cap_loses_its_own_oldest_turns_and_no_one_elses(keyed_gateway: GatewayProcess) -> None:
    with _client(keyed_gateway, "a1") as alice, _client(keyed_gateway, "b1") as bob:
        theirs = bob.responses.create(model="fast", input="Globex keeps this.")
        filler = "Please summarise the following notes. " * 80  # ~3 KB kept per turn
        turns = [alice.responses.create(model="fast", input=f"{n}: {filler}") for n in range(5)]
        assert all(_stored(turn) is True for turn in turns)
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(turns[0].id)  # the oldest went to make room
        with pytest.raises(openai.BadRequestError) as continued:
            alice.responses.create(model="fast", previous_response_id=turns[0].id, input="go on")
        assert continued.value.code == "previous_response_not_found"
        assert alice.responses.retrieve(turns[-1].id).id == turns[-1].id
        assert alice.responses.create(model="fast", previous_response_id=turns[-1].id, input="go on").output_text
        # A turn larger than the whole cap is answered and not kept: the client is told so.
        whole = alice.responses.create(model="fast", input=filler * 4)
        assert whole.output_text and _stored(whole) is False
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(whole.id)
        deleted = alice.responses.create(model="fast", input="short")
        alice.responses.delete(deleted.id)
        assert bob.responses.retrieve(theirs.id).output_text == theirs.output_text
    deadline = time.monotonic() + 30  # the turn is stored after its answer: the line may follow it
    while "stored_responses_evicted" not in keyed_gateway.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stored_responses_evicted" in keyed_gateway.stderr_text()


def test_a_tenant_past_its_cap_loses_its_idle_conversations_before_one_in_use(keyed_gateway: GatewayProcess) -> None:
    """t60: turns went oldest stored first, so a conversation in use lost its first turn (and could
    not be continued) while the tenant kept conversations nobody had touched since."""
    with _client(keyed_gateway, "c1") as carol:
        # ~1 KB a turn: the cap holds about 7 turns. Sized for the idle turn alone to make room
        # for the next live one (where two must go, a live turn goes too, as the README says).
        filler = "Here is some context for you. " * 34
        live = [carol.responses.create(model="fast", input=f"live 0: {filler}")]
        idle = carol.responses.create(model="fast", input=f"idle: {filler}")
        for n in range(1, 12):
            live.append(
                carol.responses.create(model="fast", input=f"live {n}: {filler}", previous_response_id=live[-1].id)
            )
            try:
                carol.responses.retrieve(idle.id)
            except openai.NotFoundError:
                break  # the idle one went first
        else:
            pytest.fail("the idle conversation was never evicted")
        assert all(_stored(turn) is True for turn in live)
        assert carol.responses.retrieve(live[0].id).id == live[0].id  # stored before the idle one, used since
        assert carol.responses.create(model="fast", previous_response_id=live[-1].id, input="Go on.").output_text


def test_without_the_store_answers_go_on_but_continuations_are_503(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    policy = policy_text(small_upstream, large_upstream)
    redis_url = f"redis://:pw-9@127.0.0.1:{free_port()}/0"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_url}, expect_ready=False)
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=10) as client:
            answered = client.responses.create(model="fast", input="hello")
            assert answered.output_text and answered.status == "completed"
            assert (
                getattr(answered, "store", None) is False
            )  # not kept: the client is not promised a response it cannot get
            with client.responses.stream(model="fast", input="hello again") as stream:
                final = stream.get_final_response()
                assert final.output_text and getattr(final, "store", None) is False
            with pytest.raises(openai.InternalServerError) as unavailable:
                client.responses.create(model="fast", previous_response_id=answered.id, input="more")
            assert unavailable.value.status_code == 503
            assert unavailable.value.body["param"] == "previous_response_id"  # type: ignore[index]
            with pytest.raises(openai.InternalServerError):
                client.responses.retrieve(answered.id)
    finally:
        stop_with_its_redis_back(gateway, redis_url, tmp_path / "redis")
    said = gateway.stderr_text()
    assert "response_not_stored" in said and "pw-9" not in said and "hello" not in said


# -- a Redis of its own: full, or paused -----------------------------------------------


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(tmp_path_factory.mktemp("own-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_redis_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    own_redis: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(small_upstream, large_upstream)
    process = start_gateway(Path(tmp_path_factory.mktemp("responses-own-redis")), policy,
                            env={"REDIS_URL": own_redis.url})  # fmt: skip
    yield process
    process.stop()


@contextmanager
def _full(server: EmbeddedRedis) -> Iterator[None]:
    """Redis's memory full (``noeviction``, a limit under what it holds): it refuses what could grow it."""
    with redis.Redis.from_url(server.url) as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            yield
        finally:
            admin.config_set("maxmemory", 0)
            admin.config_set("maxmemory-policy", "volatile-ttl")


def _own_client(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=10))


def test_a_full_redis_stores_no_response_and_the_response_says_so(
    own_redis_gateway: GatewayProcess, own_redis: EmbeddedRedis
) -> None:
    """t130: a full Redis refused other writes, yet 40 responses of ~90 KB were stored, ~4 MB past
    its ``maxmemory``, each said ``store: true``: the store script's first write was a removal, which
    let the rest past Redis's check."""
    client = _own_client(own_redis_gateway)
    with _full(own_redis):
        answered = client.responses.create(model="fast", input="Kept while Redis is full?")
        assert answered.output_text and _stored(answered) is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(answered.id)
    assert _stored(client.responses.create(model="fast", input="Kept once there is room?")) is True


def test_a_conversation_is_continued_while_redis_is_full(
    own_redis_gateway: GatewayProcess, own_redis: EmbeddedRedis, small_upstream: SimulatedUpstream
) -> None:
    """t130: continuing read the earlier turns with a script that marks them used, which a full
    Redis refused: a 503 "cannot be read right now", while ``GET`` of the same turns worked."""
    client = _own_client(own_redis_gateway)
    first = client.responses.create(model="fast", input="My name is Ada.")
    second = client.responses.create(model="fast", previous_response_id=first.id, input="What is my name?")
    with _full(own_redis):
        third = client.responses.create(model="fast", previous_response_id=second.id, input="And again?")
        assert third.output_text and _stored(third) is False  # its own write is refused
        messages = _last_upstream_body(small_upstream)["messages"]
        assert [m["content"] for m in messages] == [
            "My name is Ada.",
            first.output_text,
            "What is my name?",
            second.output_text,
            "And again?",
        ]
    assert client.responses.create(model="fast", previous_response_id=second.id, input="Once more?").output_text


def test_a_response_whose_write_timed_out_says_store_false_and_is_not_kept(
    own_redis_gateway: GatewayProcess, own_redis: EmbeddedRedis
) -> None:
    """t130: Redis paused (SIGSTOP) while a response was stored: the write timed out, the response
    said ``store: false``, and Redis ran the write once it went on: the response was kept all the same."""
    client = _own_client(own_redis_gateway)
    assert _stored(client.responses.create(model="fast", input="Before the pause.")) is True  # connected
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        answered = client.responses.create(model="fast", input="Kept through a pause?")
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert answered.output_text and _stored(answered) is False
    deadline = time.monotonic() + 30
    while True:  # Redis is taken for down for a second or so: 503 until it answers again
        try:
            client.responses.retrieve(answered.id)
        except openai.NotFoundError:
            break
        except openai.InternalServerError:
            pass
        assert time.monotonic() < deadline, "told store: false, yet it was kept"
        time.sleep(0.2)
    time.sleep(1)
    with pytest.raises(openai.NotFoundError):  # and not stored since: the late write stores nothing
        client.responses.retrieve(answered.id)
