"""Tool-call ids an upstream repeats, carried so that every API downstream takes them (f230, t201).

vLLM's and Qwen's tool parsers number their calls per answer, ``call_0`` every turn, and may give
two calls of one answer the same id. OpenAI's API never repeats an id within an answer, and
Anthropic's refuses a conversation whose ``tool_use`` ids repeat at all ("`tool_use` ids must be
unique"). So a Responses or chat conversation that reused ``call_0`` across turns was refused by
an Anthropic upstream in words its client never wrote, and an answer of two ``call_0`` calls
could not be continued: the client must send each call's output under the call's id. The loopback
upstreams answer as vLLM (``call_0`` every turn, twice in an answer that asks ``twice``) and as
Anthropic's API (refusing repeated ``tool_use`` ids and results that answer no call just before).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import closed_after_test, recording_vllm_and_claude
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, claude_text, write_sse

_ROUTES = """
  vllm-r: {model: vllm}
  claude-r: {model: claude-up}
"""
_WEATHER = {"city": "Paris"}
_USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
_CLAUDE_USAGE = {"input_tokens": 9, "output_tokens": 2}


def _calls_asked(body: dict[str, Any]) -> int:
    """vLLM's answer: no call after a tool's output; two calls both ``call_0`` when the user says
    ``twice``; else one."""
    last = body["messages"][-1]
    if last["role"] == "tool" or not body.get("tools"):
        return 0
    return 2 if "twice" in str(last.get("content")) else 1


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    count = _calls_asked(body)
    arguments = json.dumps(_WEATHER)
    calls: list[dict[str, Any]] = [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    ] * count
    head = {"id": "chatcmpl-vllm", "created": 1, "model": body["model"]}
    finish = "tool_calls" if calls else "stop"
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else "Sunny."}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": finish}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**head, "object": "chat.completion.chunk"}

    async def say(delta: dict[str, Any], finish_reason: str | None = None) -> None:
        await write_sse(response, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    await say({"role": "assistant", "content": None if calls else ""})
    for index, call in enumerate(calls):  # as vLLM streams each call: its id and name, then its arguments
        opened = {"index": index, "id": call["id"], "type": "function",
                  "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
        await say({"tool_calls": [opened]})
        await say({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
    if not calls:
        await say({"content": "Sunny."})
    await say({}, finish)
    await write_sse(response, {**chunk, "choices": [], "usage": _USAGE})
    await write_sse(response, b"[DONE]")
    return response


def _refusal(body: dict[str, Any]) -> str | None:
    """What Anthropic's API refuses in the tool blocks, in its words: a ``tool_use`` id seen before
    in the conversation, a ``tool_result`` that answers no ``tool_use`` of the turn just before."""
    seen: set[str] = set()
    before: set[str] = set()
    for i, message in enumerate(body["messages"]):
        blocks = message["content"] if isinstance(message["content"], list) else []
        if message["role"] == "assistant":
            before = set()
            for j, block in enumerate(blocks):
                if block["type"] == "tool_use":
                    if block["id"] in seen:
                        return f"messages.{i}.content.{j}: `tool_use` ids must be unique"
                    seen.add(block["id"])
                    before.add(block["id"])
            continue
        for j, block in enumerate(blocks):
            if block["type"] == "tool_result" and block["tool_use_id"] not in before:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` block "
                    "in the previous message."
                )
        before = set()
    return None


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    refused = _refusal(body)
    if refused is not None:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": refused}}
        return web.json_response(error, status=400)
    return await claude_text(request, body, "Sunny.", _CLAUDE_USAGE)


vllm, claude_upstream, gateway = recording_vllm_and_claude("repeated-tool-call-ids", _chat, _messages, routes=_ROUTES)


def _oai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=15))


def _claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=15))


_RESPONSES_TOOL: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
_CHAT_TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
_CLAUDE_TOOL: Any = {"name": "get_weather", "input_schema": {"type": "object"}}


def _response(oai: openai.OpenAI, stream: bool, **asked: Any) -> Any:
    """A Responses answer, whole or as the ``response.completed`` of its stream, with the ids of
    the function calls its stream's ``response.output_item.done`` events gave (None: not streamed)."""
    if not stream:
        return oai.responses.create(**asked), None
    events = list(oai.responses.create(**asked, stream=True))
    done = [e.item.call_id for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert events[-1].type == "response.completed"
    return events[-1].response, done


def _chat_calls(oai: openai.OpenAI, stream: bool, messages: Any, model: str = "vllm-r") -> Any:
    """The answer's message, whole or as the SDK's stream helper adds it up."""
    if not stream:
        return oai.chat.completions.create(model=model, tools=[_CHAT_TOOL], messages=messages).choices[0].message
    with oai.chat.completions.stream(model=model, tools=[_CHAT_TOOL], messages=messages) as streamed:
        return streamed.get_final_completion().choices[0].message


def _wire_ids(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The tool blocks of a request to Anthropic, in order: (``tool_use``, its id) or (``tool_result``, its call's)."""
    return [
        (block["type"], block.get("id") or block["tool_use_id"])
        for message in body["messages"]
        if isinstance(message["content"], list)
        for block in message["content"]
        if block["type"] in ("tool_use", "tool_result")
    ]


def _paired_apart(ids: list[tuple[str, str]]) -> None:
    """Two pairs, ``call_0`` first, the second under an id of its own in its call and its result."""
    assert [kind for kind, _ in ids] == ["tool_use", "tool_result", "tool_use", "tool_result"]
    assert ids[0][1] == ids[1][1] == "call_0"
    assert ids[2][1] == ids[3][1] != "call_0"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_id_reused_across_turns_reaches_anthropic_unique_on_every_translated_edge(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, stream: bool
) -> None:
    """t201: a Responses conversation reusing ``call_0`` (each output after its own call) went to
    Anthropic with ``call_0`` twice, refused "`tool_use` ids must be unique"; a chat conversation
    the same. The second pair goes under an id of its own, call and result alike; the client never
    sees it."""
    oai = _oai(gateway)
    call: Any = {"type": "function_call", "call_id": "call_0", "name": "get_weather", "arguments": "{}"}

    def output(text: str) -> Any:
        return {"type": "function_call_output", "call_id": "call_0", "output": text}

    given: Any = [{"role": "user", "content": "Weather twice?"}, call, output("1C"), call, output("2C")]
    response, _ = _response(oai, stream, model="claude-r", tools=[_RESPONSES_TOOL], input=given, store=False)
    assert response.status == "completed" and response.output_text == "Sunny."
    _paired_apart(_wire_ids(claude_upstream.bodies[-1]))

    asked = {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}  # fmt: skip
    messages: Any = [{"role": "user", "content": "Weather twice?"}, asked,
                     {"role": "tool", "tool_call_id": "call_0", "content": "1C"}, asked,
                     {"role": "tool", "tool_call_id": "call_0", "content": "2C"}]  # fmt: skip
    text = _chat_calls(oai, stream, messages, model="claude-r").content
    assert text == "Sunny."
    _paired_apart(_wire_ids(claude_upstream.bodies[-1]))


_USE: Any = {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {}}
_CLAUDE_TURNS: Any = [
    {"role": "user", "content": "Weather twice?"},
    {"role": "assistant", "content": [_USE]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "1C"}]},
    {"role": "assistant", "content": [_USE]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "2C"}]},
]


def test_a_messages_clients_reused_id_goes_to_anthropic_as_it_came_passed_through_and_unique_translated(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    """Passed through (``top_k``), the body is the client's: Anthropic decides, in its words. A
    translated request is the gateway's to make valid, as for the other edges (its ids may be a
    vLLM's, relayed by the gateway)."""
    claude = _claude(gateway)
    asked: Any = {"model": "claude-r", "max_tokens": 64, "tools": [_CLAUDE_TOOL], "messages": _CLAUDE_TURNS}
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(**asked, extra_body={"top_k": 5})
    assert "messages.3.content.0: `tool_use` ids must be unique" in str(caught.value)
    assert _wire_ids(claude_upstream.bodies[-1])[2] == ("tool_use", "call_0")
    assert claude.messages.create(**asked).content[0].type == "text"
    _paired_apart(_wire_ids(claude_upstream.bodies[-1]))


def _apart(ids: list[str]) -> None:
    """Two calls under ids of their own, the first as the upstream gave it."""
    assert len(ids) == 2 and ids[0] == "call_0" and ids[1] != "call_0"


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_of_one_answer_under_one_id_reach_a_responses_client_apart_and_are_stored_so(
    gateway: GatewayProcess, vllm: RecordingUpstream, stream: bool
) -> None:
    """t201: vLLM answered two calls both ``call_0``; the gateway gave and stored them so, and
    answering both was a 400 ("Duplicate function_call for call_id 'call_0'"). Each call now has
    an id of its own, in the stream's events, the response and the stored turn alike, and its
    output goes upstream under it."""
    oai = _oai(gateway)
    first, streamed_ids = _response(oai, stream, model="vllm-r", tools=[_RESPONSES_TOOL], input="Weather twice?")
    ids = [item.call_id for item in first.output if item.type == "function_call"]
    outputs: Any = [{"type": "function_call_output", "call_id": i, "output": "1C"} for i in ids]
    second, _ = _response(
        oai, stream, model="vllm-r", tools=[_RESPONSES_TOOL], previous_response_id=first.id, input=outputs
    )
    assert second.status == "completed" and second.output_text == "Sunny."
    _apart(ids)
    assert streamed_ids in (None, ids)
    sent = vllm.bodies[-1]["messages"]
    assert [call["id"] for call in sent[1]["tool_calls"]] == ids
    assert [m["tool_call_id"] for m in sent[2:]] == ids


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_of_one_answer_under_one_id_reach_a_chat_client_apart(
    gateway: GatewayProcess, vllm: RecordingUpstream, stream: bool
) -> None:
    """The chat client sent the answer back with an output for each call: a 400 ("Duplicate value
    for 'tool_call_id' of 'call_0'"), as OpenAI refuses two outputs of one call."""
    oai = _oai(gateway)
    ask: Any = {"role": "user", "content": "Weather twice?"}
    message = _chat_calls(oai, stream, [ask])
    ids = [call.id for call in message.tool_calls or ()]
    answers = [{"role": "tool", "tool_call_id": i, "content": "1C"} for i in ids]
    assert _chat_calls(oai, stream, [ask, message.model_dump(exclude_none=True), *answers]).content == "Sunny."
    _apart(ids)
    assert [m.get("tool_call_id") for m in vllm.bodies[-1]["messages"][2:]] == ids


@pytest.mark.parametrize("stream", [False, True])
def test_two_calls_of_one_answer_under_one_id_reach_a_messages_client_apart(
    gateway: GatewayProcess, vllm: RecordingUpstream, stream: bool
) -> None:
    """The Messages client sent the turn back with a result for each call: a 400 ("`tool_use` ids
    must be unique"), as Anthropic refuses it."""
    claude = _claude(gateway)
    asked: Any = {"model": "vllm-r", "max_tokens": 64, "tools": [_CLAUDE_TOOL]}
    turn: Any = [{"role": "user", "content": "Weather twice?"}]
    if stream:
        with claude.messages.stream(**asked, messages=turn) as streaming:
            called = streaming.get_final_message()
    else:
        called = claude.messages.create(**asked, messages=turn)
    uses = [block for block in called.content if block.type == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": use.id, "content": "1C"} for use in uses]
    turn += [{"role": "assistant", "content": [use.model_dump() for use in uses]}, {"role": "user", "content": results}]
    assert claude.messages.create(**asked, messages=turn).content[0].type == "text"
    _apart([use.id for use in uses])
    assert [m.get("tool_call_id") for m in vllm.bodies[-1]["messages"][2:]] == [use.id for use in uses]
