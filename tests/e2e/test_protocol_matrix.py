"""Every inbound API × every upstream kind × streamed or not × plain or with tools, each with its official SDK.

Upstreams: ``small`` speaks OpenAI's chat API (the simulated vLLM-like server), ``gpt``
the same server declared ``responses_api`` (Responses requests are passed through to its
``/v1/responses``; other APIs reach its chat API), ``claude`` speaks Anthropic's Messages
API (the simulator's Anthropic endpoint; Messages requests are passed through). Tool cells force a
call to ``get_weather`` and check the arguments arrive as JSON with the required field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway_process import GatewayProcess

INBOUND = ["chat", "messages", "responses", "completions", "embeddings"]
UPSTREAMS = {"openai": "small", "openai-responses": "gpt", "anthropic": "claude"}
_PROMPT = "What is the weather in Paris? Use the get_weather tool."
_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _cells() -> Iterator[Any]:
    for inbound in INBOUND:
        for upstream in UPSTREAMS:
            for stream in (False, True):
                for tools in (False, True):
                    if inbound == "embeddings" and (upstream != "openai" or stream or tools):
                        continue  # embeddings go to embedding models only, neither streamed nor with tools
                    if inbound == "completions" and tools:
                        continue  # the legacy API has no tools
                    name = f"{inbound}-{upstream}-{'stream' if stream else 'whole'}-{'tools' if tools else 'plain'}"
                    yield pytest.param(inbound, upstream, stream, tools, id=name)


@pytest.fixture(scope="module")
def clients(gateway: GatewayProcess) -> Iterator[tuple[openai.OpenAI, anthropic.Anthropic]]:
    with (
        openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=20) as oai,
        anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0, timeout=20) as claude,
    ):
        yield oai, claude


@pytest.mark.parametrize(("inbound", "upstream", "stream", "tools"), list(_cells()))
def test_cell(
    clients: tuple[openai.OpenAI, anthropic.Anthropic], inbound: str, upstream: str, stream: bool, tools: bool
) -> None:
    oai, claude = clients
    model = UPSTREAMS[upstream]
    text, calls = _ASK[inbound](oai, claude, model, stream, tools)
    if tools:
        assert calls, f"no tool call in {inbound} via {upstream}"
        name, arguments = calls[0]
        assert name == "get_weather" and isinstance(json.loads(arguments).get("city"), str), arguments
    else:
        assert text.strip(), f"no text in {inbound} via {upstream}"


Calls = list[tuple[str, str]]


def _chat(oai: openai.OpenAI, _: anthropic.Anthropic, model: str, stream: bool, tools: bool) -> tuple[str, Calls]:
    extra: dict[str, Any] = {}
    if tools:
        extra = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": _SCHEMA}}],
                 "tool_choice": "required"}  # fmt: skip
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": _PROMPT}]
    if not stream:
        message = oai.chat.completions.create(model=model, messages=messages, **extra).choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return message.content or "", calls
    text = ""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in oai.chat.completions.create(model=model, messages=messages, stream=True, **extra):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                if call.function and call.function.arguments:
                    arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
    return text, [(names[i], arguments.get(i, "")) for i in sorted(names)]


def _messages(
    _: openai.OpenAI, claude: anthropic.Anthropic, model: str, stream: bool, tools: bool
) -> tuple[str, Calls]:
    extra: dict[str, Any] = {}
    if tools:
        extra = {"tools": [{"name": "get_weather", "input_schema": _SCHEMA}], "tool_choice": {"type": "any"}}
    ask: dict[str, Any] = {
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": _PROMPT}],
        **extra,
    }
    if stream:
        with claude.messages.stream(**ask) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(**ask)
    text = "".join(block.text for block in message.content if block.type == "text")
    calls = [(block.name, json.dumps(block.input)) for block in message.content if block.type == "tool_use"]
    return text, calls


def _responses(oai: openai.OpenAI, _: anthropic.Anthropic, model: str, stream: bool, tools: bool) -> tuple[str, Calls]:
    extra: dict[str, Any] = {}
    if tools:
        extra = {"tools": [{"type": "function", "name": "get_weather", "parameters": _SCHEMA, "strict": False}],
                 "tool_choice": "required"}  # fmt: skip
    if stream:
        with oai.responses.stream(model=model, input=_PROMPT, **extra) as events:
            response = events.get_final_response()
    else:
        response = oai.responses.create(model=model, input=_PROMPT, **extra)
    calls = [(item.name, item.arguments) for item in response.output if item.type == "function_call"]
    return response.output_text, calls


def _completions(
    oai: openai.OpenAI, _: anthropic.Anthropic, model: str, stream: bool, tools: bool
) -> tuple[str, Calls]:
    if stream:
        return "".join(c.choices[0].text for c in oai.completions.create(model=model, prompt=_PROMPT, max_tokens=32,
                                                                          stream=True) if c.choices), []  # fmt: skip
    return oai.completions.create(model=model, prompt=_PROMPT, max_tokens=32).choices[0].text, []


def _embeddings(oai: openai.OpenAI, _: anthropic.Anthropic, model: str, stream: bool, tools: bool) -> tuple[str, Calls]:
    vectors = oai.embeddings.create(model="embed", input=[_PROMPT, "another"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) > 0
    return "ok", []


_ASK = {"chat": _chat, "messages": _messages, "responses": _responses, "completions": _completions,
        "embeddings": _embeddings}  # fmt: skip
