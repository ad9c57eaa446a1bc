"""A Responses ``namespace`` tool on a translated route (f239, t206).

The Codex CLI sends its sub-agent tools as a namespace, ``{"type": "namespace", "name":
"multi_agent_v1", "tools": [function tools]}``, and the calls it is answered with name the
function and its namespace. A route with a chat (vLLM) or Anthropic upstream refused the request
(400 ``unsupported_tool_type``), so Codex could not use it. The namespace's functions now reach
the upstream as plain functions under joined names (``multi_agent_v1__close_agent``), and a call
to one comes back to the client under the function's own name with its ``namespace``, streamed
or not, stored, listed and sent back alike. The loopback upstreams answer as vLLM and Anthropic's
API: with a call to the joined name when the user asks, and with text once a tool answered.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import closed_after_test, recording_vllm_and_claude
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, write_sse

_ROUTES = """
  vllm-r: {model: vllm}
  claude-r: {model: claude-up}
"""
_JOINED = "multi_agent_v1__close_agent"
_TARGET = {"target": "a1"}
_ARGUMENTS = json.dumps(_TARGET)
_USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
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


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    """vLLM: a call to the joined name for a user's question, text after a tool's output."""
    body = await request.json()
    upstream.bodies.append(body)
    calling = body["messages"][-1]["role"] == "user"
    head = {"id": "chatcmpl-vllm", "created": 1, "model": body["model"]}
    call = {"id": "call_0", "type": "function", "function": {"name": _JOINED, "arguments": _ARGUMENTS}}
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": None if calling else "Closed."}
        if calling:
            message["tool_calls"] = [call]
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calling else "stop"}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**head, "object": "chat.completion.chunk"}

    async def say(delta: dict[str, Any], finish_reason: str | None = None) -> None:
        await write_sse(response, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    await say({"role": "assistant", "content": None if calling else ""})
    if calling:  # as vLLM streams a call: its id and name, then its arguments
        await say({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                   "function": {"name": _JOINED, "arguments": ""}}]})  # fmt: skip
        await say({"tool_calls": [{"index": 0, "function": {"arguments": _ARGUMENTS}}]})
    else:
        await say({"content": "Closed."})
    await say({}, "tool_calls" if calling else "stop")
    await write_sse(response, {**chunk, "choices": [], "usage": _USAGE})
    await write_sse(response, b"[DONE]")
    return response


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    """Anthropic's API, not streamed: a ``tool_use`` of the joined name for a user's question."""
    body = await request.json()
    upstream.bodies.append(body)
    use = {"type": "tool_use", "id": "toolu_1", "name": _JOINED, "input": _TARGET}
    return web.json_response(
        {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_sequence": None,
         "content": [use], "stop_reason": "tool_use", "usage": {"input_tokens": 9, "output_tokens": 2}}
    )  # fmt: skip


vllm, claude_upstream, gateway = recording_vllm_and_claude("namespace-tools", _chat, _messages, routes=_ROUTES)


def _oai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=15))


def _response(oai: openai.OpenAI, stream: bool, **asked: Any) -> Any:
    """A Responses answer, whole or as the ``response.completed`` of its stream; streamed, each
    function call's events are checked to name the function and its namespace as the answer does."""
    if not stream:
        return oai.responses.create(**asked)
    events = list(oai.responses.create(**asked, stream=True))
    assert events[-1].type == "response.completed"
    calls = [(e.item.name, e.item.namespace) for e in events
             if e.type in ("response.output_item.added", "response.output_item.done") and e.item.type == "function_call"]  # fmt: skip
    done = [e.name for e in events if e.type == "response.function_call_arguments.done"]
    assert calls == [("close_agent", "multi_agent_v1")] * 2 * len(done) and done == ["close_agent"] * len(done)
    return events[-1].response


def _calls(response: Any) -> list[tuple[str, str | None, Any]]:
    return [
        (item.name, item.namespace, json.loads(item.arguments))
        for item in response.output
        if item.type == "function_call"
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_namespaces_functions_reach_a_chat_upstream_and_their_calls_come_back_by_namespace(
    gateway: GatewayProcess, vllm: RecordingUpstream, stream: bool
) -> None:
    oai = _oai(gateway)
    question: Any = {"role": "user", "content": "Close agent a1."}
    first = _response(oai, stream, model="vllm-r", tools=[_AGENTS], input=[question])
    assert _calls(first) == [("close_agent", "multi_agent_v1", _TARGET)]
    sent = vllm.bodies[-1]["tools"]
    assert [tool["function"]["name"] for tool in sent] == [_JOINED, "multi_agent_v1__wait_agent"]
    assert sent[0]["function"]["description"] == (
        "Namespace multi_agent_v1: Tools for spawning and managing sub-agents.\n\nClose an agent."
    )
    assert first.tools[0].type == "namespace" and first.tools[0].name == "multi_agent_v1"
    assert _calls(oai.responses.retrieve(first.id)) == _calls(first)  # stored as answered

    call = next(item for item in first.output if item.type == "function_call")
    output: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "closed"}
    # as Codex continues: the whole conversation sent back, nothing stored
    whole = [question, call.model_dump(exclude_none=True), output]
    second = _response(oai, stream, model="vllm-r", tools=[_AGENTS], input=whole, store=False)
    assert second.output_text == "Closed."
    assert vllm.bodies[-1]["messages"][1]["tool_calls"][0]["function"]["name"] == _JOINED
    assert vllm.bodies[-1]["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "closed"}

    # and from the stored turn
    third = _response(oai, stream, model="vllm-r", tools=[_AGENTS], input=[output], previous_response_id=first.id)
    assert third.output_text == "Closed."
    assert vllm.bodies[-1]["messages"][1]["tool_calls"][0]["function"]["name"] == _JOINED
    listed = oai.responses.input_items.list(third.id, order="asc").data
    assert [(item.name, item.namespace) for item in listed if item.type == "function_call"] == [
        ("close_agent", "multi_agent_v1")
    ]


def test_a_namespaces_function_claude_calls_comes_back_by_namespace(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    oai = _oai(gateway)
    answer = oai.responses.create(model="claude-r", tools=[_AGENTS], input="Close agent a1.")
    assert _calls(answer) == [("close_agent", "multi_agent_v1", _TARGET)]
    assert [tool["name"] for tool in claude_upstream.bodies[-1]["tools"]] == [_JOINED, "multi_agent_v1__wait_agent"]
