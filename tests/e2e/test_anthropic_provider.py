"""AnthropicProvider against a loopback server that speaks the Messages API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from gateway.config.schema import ModelConfig, Price
from gateway.errors import InvalidRequestError, UpstreamProtocolError, UpstreamStatusError
from gateway.upstreams.anthropic import AnthropicProvider
from gateway.upstreams.base import Provider
from gateway.upstreams.registry import build_provider
from tests.chat_requests import as_sent

API_KEY = "sk-ant-test"


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


TEXT_MESSAGE = {
    "id": "msg_text",
    "type": "message",
    "role": "assistant",
    "model": "claude-test-1",
    "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2},
}

TOOL_MESSAGE = {
    "id": "msg_tool",
    "type": "message",
    "role": "assistant",
    "model": "claude-test-1",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 20, "output_tokens": 7},
}

STREAM_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_stream",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-1",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1},
        },
    },
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42},
    },
    {"type": "message_stop"},
]


class FakeAnthropic:
    """Records each request; answers as ``mode`` says."""

    def __init__(self) -> None:
        self.mode = "text"
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    @property
    def last_body(self) -> dict[str, Any]:
        return self.requests[-1][2]

    @property
    def last_headers(self) -> dict[str, str]:
        return self.requests[-1][1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        if request.headers.get("x-api-key") != API_KEY or request.headers.get("anthropic-version") != "2023-06-01":
            return _error(401, "authentication_error", "invalid x-api-key")
        if self.mode == "rate_limited":
            return _error(429, "rate_limit_error", "slow down", headers={"retry-after": "7"})
        if body.get("stream"):
            return await self._stream(request)
        return web.json_response(TOOL_MESSAGE if self.mode == "tool" else TEXT_MESSAGE)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        events = STREAM_EVENTS
        if self.mode in ("cut", "abort"):
            events = STREAM_EVENTS[:5]
        elif self.mode == "overloaded":
            events = [
                *STREAM_EVENTS[:4],
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ]
        for event in events:
            data = _sse(event)
            # Split each event in two writes, so the parser sees partial lines.
            await response.write(data[: len(data) // 2])
            await response.write(data[len(data) // 2 :])
        if self.mode == "abort":
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[tuple[FakeAnthropic, str]]:
    server = FakeAnthropic()
    app = web.Application()
    app.router.add_post("/v1/messages", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def upstream(fake: tuple[FakeAnthropic, str]) -> AsyncIterator[tuple[FakeAnthropic, Provider]]:
    server, base_url = fake
    server.mode = "text"
    server.requests.clear()
    config = ModelConfig(
        provider="anthropic",
        base_url=base_url,
        upstream_model="claude-test-1",
        api_key_env="ANTHROPIC_KEY",
        price=Price(input_per_mtok=3.0, output_per_mtok=15.0),
        tier="large",
        headers={"anthropic-beta": "test-beta"},
    )
    provider = build_provider("claude", config, environ={"ANTHROPIC_KEY": API_KEY})
    yield server, provider
    await provider.aclose()


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-test-1", "messages": [{"role": "user", "content": "Hi"}], **extra}


async def test_registry_builds_anthropic_provider(upstream: tuple[FakeAnthropic, Provider]) -> None:
    _, provider = upstream
    assert isinstance(provider, AnthropicProvider)
    assert provider.kind == "anthropic"


async def test_request_translation(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    body = {
        "model": "claude-test-1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "What's the weather"},
            {"role": "user", "content": [{"type": "text", "text": "in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
            {"role": "user", "content": "Thanks. And this?"},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}],
            },
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stop": "END",
        "temperature": 1.7,
        "top_p": 0.9,
        "user": "tenant-42",
        "seed": 1,
        "presence_penalty": 0.5,
        "response_format": {"type": "json_object"},
        "n": 1,
    }
    await provider.complete(*as_sent(body))
    path, headers, sent = server.requests[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "test-beta"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers
    assert sent == {
        "model": "claude-test-1",
        "max_tokens": 4096,
        "system": "Be brief.\n\nUse metric units.",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What's the weather"}, {"type": "text", "text": "in Paris?"}],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
                    {"type": "text", "text": "Thanks. And this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            },
        ],
        "temperature": 1.0,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "tenant-42"},
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": True,
            }
        ],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }


async def test_request_options(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    tools = [{"type": "function", "function": {"name": "f"}}]

    await provider.complete(
        *as_sent(_body(max_tokens=100, stop=["a", "b"], temperature=-1, tools=tools, tool_choice="required"))
    )
    sent = server.last_body
    assert sent["max_tokens"] == 100
    assert sent["stop_sequences"] == ["a", "b"]
    assert sent["temperature"] == 0.0
    assert sent["messages"] == [{"role": "user", "content": "Hi"}]
    assert sent["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    assert sent["tool_choice"] == {"type": "any"}
    assert "stream" not in sent

    await provider.complete(*as_sent(_body(max_completion_tokens=50, max_tokens=9, tools=tools, tool_choice="auto")))
    assert server.last_body["max_tokens"] == 50
    assert server.last_body["tool_choice"] == {"type": "auto"}

    # Anthropic's own none: the tools stay (a conversation holding tool calls needs them)
    await provider.complete(*as_sent(_body(tools=tools, tool_choice="none", parallel_tool_calls=False)))
    assert server.last_body["tool_choice"] == {"type": "none"} and len(server.last_body["tools"]) == 1

    strict = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]
    await provider.complete(*as_sent(_body(tools=strict)))
    assert server.last_body["tools"] == [{"name": "f", "input_schema": {"type": "object"}, "strict": True}]

    await provider.complete(*as_sent(_body(tools=tools, parallel_tool_calls=False)))
    assert server.last_body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_what_a_chat_request_cannot_carry_to_anthropic_is_named(upstream: tuple[FakeAnthropic, Provider]) -> None:
    _, provider = upstream
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}
    body = _body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
        seed=1, logprobs=True, response_format={"type": "json_object"}, temperature=1.5, n=1,
        stream_options={"include_usage": True}, reasoning_effort="high",
    )  # fmt: skip
    assert provider.not_carried(as_sent(body)[0]) == [
        "seed", "logprobs", "response_format", "reasoning_effort", "temperature", "image_url.detail",
    ]  # fmt: skip
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert provider.not_carried(as_sent(_body(response_format=schema))[0]) == []  # output_config.format


def test_a_speakers_name_anthropic_has_no_place_for_is_named(upstream: tuple[FakeAnthropic, Provider]) -> None:
    """Anthropic's turns have no ``name``: alice and bob reach it as one user turn (t78: without a word)."""
    _, provider = upstream
    body = _body(messages=[
        {"role": "system", "content": "Moderate.", "name": "host"},
        {"role": "user", "content": "a", "name": "alice"}, {"role": "user", "content": "hi", "name": "bob"},
    ])  # fmt: skip
    assert provider.not_carried(as_sent(body)[0]) == ["messages.name"]
    assert provider.not_carried(as_sent(_body(messages=[{"role": "system", "content": "x", "name": "h"}]))[0]) == [
        "messages.name"
    ]
    assert provider.not_carried(as_sent(_body())[0]) == []


async def test_an_assistant_turns_refusal_reaches_anthropic_as_its_text(
    upstream: tuple[FakeAnthropic, Provider],
) -> None:
    """An OpenAI answer's ``refusal`` sent back with it is the assistant's text, as a ``refusal``
    part is (t78: a 400 on a Claude route, while a chat upstream took it)."""
    server, provider = upstream
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "refusal": "I can't."},
             {"role": "user", "content": "ok"}]  # fmt: skip
    await provider.complete(*as_sent(_body(messages=turns)))
    assert server.last_body["messages"][1] == {"role": "assistant", "content": "I can't."}
    part = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    await provider.complete(*as_sent(_body(messages=[turns[0], part, turns[2]])))
    assert server.last_body["messages"][1] == {"role": "assistant", "content": "I can't."}  # the same


async def test_n_above_one_is_refused(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    with pytest.raises(InvalidRequestError) as caught:
        await provider.complete(*as_sent(_body(n=2)))
    assert caught.value.param == "n"
    assert caught.value.message == "n > 1 is not supported by anthropic upstream 'claude'"
    with pytest.raises(InvalidRequestError):
        await provider.open_stream(*as_sent(_body(n=3, stream=True)))
    assert server.requests == []


async def test_complete_text(upstream: tuple[FakeAnthropic, Provider]) -> None:
    _, provider = upstream
    completion = await provider.complete(*as_sent(_body()))
    assert completion.text == "Hello there"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (15, 5)
    assert (completion.usage.cached_prompt_tokens, completion.usage.cache_write_tokens) == (3, 2)
    answer = msgspec.json.decode(completion.body)
    assert answer["id"] == "msg_text"
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int)
    assert answer["model"] == "claude-test-1"
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert answer["usage"] == {
        "prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2},  # (t78)
        "completion_tokens_details": {"reasoning_tokens": 0},  # as OpenAI's, and a cache hit's (t195)
    }  # fmt: skip


async def test_complete_tool_calls(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    server.mode = "tool"
    completion = await provider.complete(*as_sent(_body()))
    assert completion.text == ""
    answer = msgspec.json.decode(completion.body)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_1"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert msgspec.json.decode(call["function"]["arguments"]) == {"city": "Paris"}
    assert answer["usage"] == {
        "prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27, "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip


async def test_stream_text_and_tool_use(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    stream = await provider.open_stream(*as_sent(_body(stream=True, stream_options={"include_usage": True})))
    chunks = [msgspec.json.decode(payload) async for payload in stream]
    assert server.last_body["stream"] is True
    assert "stream_options" not in server.last_body

    assert {(c["id"], c["model"], c["object"]) for c in chunks} == {
        ("msg_stream", "claude-test-1", "chat.completion.chunk")
    }
    assert len({c["created"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
        {
            "tool_calls": [
                {"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 6 + ["tool_calls"]
    assert all("usage" not in c for c in chunks)

    tally = stream.tally
    assert tally.id == "msg_stream" and tally.model == "claude-test-1" and tally.created == chunks[0]["created"]
    assert tally.text == "Hello world"
    assert tally.finish_reason == "tool_calls"
    assert tally.usage is not None
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (30, 42)
    assert tally.usage.cached_prompt_tokens == 5  # from message_start: the stream reports its cache reads too
    assert tally.chunks == len(chunks)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_rate_limited(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    server.mode = "rate_limited"
    for call in (provider.complete(*as_sent(_body())), provider.open_stream(*as_sent(_body(stream=True)))):
        with pytest.raises(UpstreamStatusError) as caught:
            await call
        error = caught.value
        assert error.upstream_status == 429
        assert error.retry_after_s == 7.0
        assert error.retryable
        assert "HTTP 429" in error.message and "slow down" not in error.message  # Anthropic's words stay ours


async def test_an_upstream_refusing_the_gateways_key_is_the_gateways_fault(
    upstream: tuple[FakeAnthropic, Provider],
) -> None:
    _server, base = upstream
    provider = AnthropicProvider("claude", base.config, base.client, "wrong", base.transport)
    with pytest.raises(UpstreamStatusError) as caught:
        await provider.complete(*as_sent(_body()))
    assert caught.value.upstream_status == 401 and caught.value.status_code == 502
    assert "invalid x-api-key" not in caught.value.message  # the client's key is not the one refused
    assert not caught.value.retryable and caught.value.try_next  # the route's next model may answer


@pytest.mark.parametrize("mode", ["cut", "abort"])
async def test_stream_cut_before_message_stop(upstream: tuple[FakeAnthropic, Provider], mode: str) -> None:
    server, provider = upstream
    server.mode = mode
    stream = await provider.open_stream(*as_sent(_body(stream=True)))
    received: list[bytes] = []
    with pytest.raises(UpstreamProtocolError) as caught:
        async with asyncio.timeout(3):
            async for payload in stream:
                received.append(payload)
    if mode == "cut":
        assert "ended before message_stop" in caught.value.message
    assert len(received) >= 2  # role chunk and "Hello" came through before the cut
    assert stream.tally.text.startswith("Hello")


async def test_stream_error_event(upstream: tuple[FakeAnthropic, Provider]) -> None:
    server, provider = upstream
    server.mode = "overloaded"
    stream = await provider.open_stream(*as_sent(_body(stream=True)))
    with pytest.raises(UpstreamStatusError) as caught:
        async for _ in stream:
            pass
    assert caught.value.upstream_status == 529
    assert caught.value.retryable
    assert "overloaded" in caught.value.message


async def test_invalid_content_is_refused(upstream: tuple[FakeAnthropic, Provider]) -> None:
    _, provider = upstream
    bad_parts = [{"type": "input_audio", "input_audio": {"data": "..", "format": "wav"}}]
    with pytest.raises(InvalidRequestError):
        await provider.complete(*as_sent({"model": "x", "messages": [{"role": "user", "content": bad_parts}]}))
    bad_args = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]
    with pytest.raises(InvalidRequestError):
        await provider.complete(*as_sent({"model": "x", "messages": [{"role": "assistant", "tool_calls": bad_args}]}))
