"""A ``system`` message in ``messages`` (Anthropic's mid-conversation system messages), with the anthropic SDK (t206).

Claude Code sends one (``messages[1]``, with the ``mid-conversation-system-2026-04-07`` beta) for a
model id it does not list, as a gateway route's name; every route answered it with a 400 ("Invalid
enum value 'system'"), and Claude Code exited on its first request. Claude Opus 4.8 reads one in
place; Claude's other models refuse it there. Now a route of Anthropic's models alone passes the
request through as it came, beta and all; a chat upstream gets it in place as a chat ``system``
message; a translation to Claude moves it into the top-level ``system``, named ``system.position``
in ``x-gateway-dropped``; and one Anthropic would refuse for its place is refused on every route.
The loopback upstreams answer as Anthropic's API (refusing a system message in ``messages`` but for
Opus 4.8) and as vLLM, and record what they are sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web
from anthropic.types import MessageParam

from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess, model_entry
from tests.loopback_app import RecordingUpstream, claude_text, serve_recording, write_sse

_OPUS = "claude-opus-4-8"
"""The one model of the loopback Anthropic that reads a system message in ``messages``."""
_ROUTES = """
  opus-r: {model: opus}
  sonnet-r: {model: sonnet}
  chat-r: {model: vllm}
  mixed-r: {model: sonnet, fallbacks: [vllm]}
"""
_BETAS = "claude-code-20250219,mid-conversation-system-2026-04-07"
_TOLD = "Available agent types for the Agent tool: claude, Explore."
_ASKED: list[MessageParam] = [
    {"role": "user", "content": [{"type": "text", "text": "Read x.txt.", "cache_control": {"type": "ephemeral"}}]},
    {"role": "system", "content": _TOLD},
]
"""Claude Code's first turn: the user's, then the system message it adds for a model it does not know."""
_SYSTEM = "You are Claude Code."
_CLAUDE_USAGE = {"input_tokens": 9, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_CHAT_USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


def _refusal(body: dict[str, Any]) -> str | None:
    """Anthropic's 400 for a system message in ``messages`` on a model before Opus 4.8."""
    for index, turn in enumerate(body["messages"]):
        if turn["role"] == "system" and body["model"] != _OPUS:
            return f"messages.{index}.role: role 'system' is not supported on this model"
    return None


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    """Records each request as ``{"path", "betas": its anthropic-beta lines, "body"}``."""
    body = await request.json()
    upstream.bodies.append({"path": request.path, "betas": request.headers.getall("anthropic-beta", []), "body": body})
    refused = _refusal(body)
    if refused is not None:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": refused}}
        return web.json_response(error, status=400)
    if request.path.endswith("/count_tokens"):
        return web.json_response({"input_tokens": 7})
    return await claude_text(request, body, "Bonjour.", _CLAUDE_USAGE)


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    head = {"id": "chatcmpl-vllm", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "Bonjour."}, "finish_reason": "stop"}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _CHAT_USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**head, "object": "chat.completion.chunk"}
    for delta, finish in (({"role": "assistant", "content": "Bonjour."}, None), ({}, "stop")):
        await write_sse(response, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    await write_sse(response, {**chunk, "choices": [], "usage": _CHAT_USAGE})
    await write_sse(response, b"[DONE]")
    return response


@pytest.fixture(scope="module")
def claude_upstream() -> Iterator[RecordingUpstream]:
    routes = {"/v1/messages": _messages, "/v1/messages/count_tokens": _messages}
    with serve_recording(routes, name="mid-system-claude") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def vllm() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/chat/completions": _chat}, name="mid-system-vllm") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway, claude_upstream: RecordingUpstream, vllm: RecordingUpstream
) -> Iterator[GatewayProcess]:
    price = "{input: 3, output: 15}"
    models = (
        model_entry("opus", claude_upstream.url, _OPUS, price, "large", provider="anthropic")
        + model_entry("sonnet", claude_upstream.url, "claude-sonnet-4-6", price, "large", provider="anthropic")
        + model_entry("vllm", f"{vllm.url}/v1", "qwen", "{input: 1, output: 2}", "small")
    )
    with pair_gateway("mid-conversation-system", extra_models=models, routes=_ROUTES) as gw:
        yield gw


@pytest.fixture
def claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return closed_after_test(
        anthropic.Anthropic(
            base_url=gateway.url, api_key="sk-unused", max_retries=0, timeout=15,
            default_headers={"anthropic-beta": _BETAS},
        )
    )  # fmt: skip


def _sent(upstream: RecordingUpstream, path: str = "/v1/messages") -> dict[str, Any]:
    sent = upstream.bodies[-1]
    assert sent["path"] == path
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_on_a_route_of_claude_alone_it_passes_through_as_the_client_sent_it(
    claude: anthropic.Anthropic, gateway: GatewayProcess, claude_upstream: RecordingUpstream, stream: bool
) -> None:
    """Opus 4.8 reads it where the client put it: the body reaches it as sent, with the beta."""
    ask: dict[str, Any] = {"model": "opus-r", "max_tokens": 64, "system": _SYSTEM, "messages": _ASKED}
    if stream:
        with claude.messages.stream(**ask) as streamed:
            message = streamed.get_final_message()
            request_id = streamed.response.headers["x-request-id"]
            dropped = streamed.response.headers.get("x-gateway-dropped")
    else:
        raw = claude.messages.with_raw_response.create(**ask)
        message, request_id, dropped = raw.parse(), raw.headers["x-request-id"], raw.headers.get("x-gateway-dropped")
    assert message.content[0].type == "text" and message.content[0].text == "Bonjour."
    sent = _sent(claude_upstream)
    assert sent["body"] == {**ask, "model": _OPUS, **({"stream": True} if stream else {})}
    assert sent["betas"] == [_BETAS]
    assert dropped is None
    record = gateway.wait_for_record(request_id)
    assert record["status"] == 200 and record["passthrough"] is True


def test_claudes_own_refusal_of_it_on_another_model_reaches_the_client(
    claude: anthropic.Anthropic, claude_upstream: RecordingUpstream
) -> None:
    """Passed through to a model before Opus 4.8: Anthropic's 400 is the answer, in its words."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="sonnet-r", max_tokens=64, messages=_ASKED)
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].endswith("messages.1.role: role 'system' is not supported on this model")
    assert _sent(claude_upstream)["body"]["messages"] == _ASKED


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_upstream_gets_it_in_its_place(
    claude: anthropic.Anthropic, vllm: RecordingUpstream, stream: bool
) -> None:
    asked: list[MessageParam] = [
        *_ASKED,
        {"role": "assistant", "content": "Reading."},
        {"role": "user", "content": "Go."},
    ]
    ask: dict[str, Any] = {"model": "chat-r", "max_tokens": 64, "system": _SYSTEM, "messages": asked}
    if stream:
        with claude.messages.stream(**ask) as streamed:
            assert streamed.get_final_message().content
    else:
        assert claude.messages.create(**ask).content
    assert vllm.bodies[-1]["messages"] == [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "Read x.txt."}]},  # its cache_control left out
        {"role": "system", "content": _TOLD},
        {"role": "assistant", "content": "Reading."},
        {"role": "user", "content": "Go."},
    ]


def test_a_translation_to_claude_moves_it_into_the_top_level_system_and_names_it(
    claude: anthropic.Anthropic, claude_upstream: RecordingUpstream
) -> None:
    """A route that may reach a chat upstream translates: Claude Sonnet, which refuses it in place,
    gets it in the top-level system, and the client is told its place did not reach the model."""
    raw = claude.messages.with_raw_response.create(model="mixed-r", max_tokens=64, system=_SYSTEM, messages=_ASKED)
    assert raw.parse().content[0].type == "text"
    assert raw.headers["x-gateway-dropped"] == "system.position"
    sent = _sent(claude_upstream)
    assert sent["body"]["system"] == f"{_SYSTEM}\n\n{_TOLD}"
    assert [turn["role"] for turn in sent["body"]["messages"]] == ["user"]
    assert sent["betas"] == [_BETAS]


@pytest.mark.parametrize(
    ("model", "counted_by"),
    [("opus-r", "upstream"), ("mixed-r", "upstream"), ("chat-r", "gateway")],
)
def test_count_tokens_takes_it(
    claude: anthropic.Anthropic, claude_upstream: RecordingUpstream, model: str, counted_by: str
) -> None:
    """Counted by Claude where the route's first model is Claude's: the body as sent on a route of
    Claude alone, with the system message where a translation puts it otherwise; by the gateway on
    a chat route, the system message's tokens counted."""
    before = len(claude_upstream.bodies)
    counted = claude.messages.count_tokens(model=model, system=_SYSTEM, messages=_ASKED).input_tokens
    if counted_by == "gateway":
        assert len(claude_upstream.bodies) == before
        without = claude.messages.count_tokens(model=model, system=_SYSTEM, messages=_ASKED[:1]).input_tokens
        assert counted > without
        return
    assert counted == 7
    sent = _sent(claude_upstream, "/v1/messages/count_tokens")
    assert sent["betas"] == [_BETAS]
    if model == "opus-r":
        assert sent["body"] == {"model": _OPUS, "system": _SYSTEM, "messages": _ASKED}
    else:
        assert sent["body"]["system"] == [{"type": "text", "text": _SYSTEM}, {"type": "text", "text": _TOLD}]
        assert sent["body"]["messages"] == _ASKED[:1]


_USER: MessageParam = {"role": "user", "content": "q"}
_TOLD_TURN: MessageParam = {"role": "system", "content": _TOLD}
_AFTER = (
    "a system message must immediately follow a user message (or an assistant message that ends in server tool use)"
)
_BEFORE = "a system message must be the last message or be followed by an assistant message"


@pytest.mark.parametrize("model", ["opus-r", "chat-r", "mixed-r"])
def test_a_misplaced_one_is_refused_on_every_route_as_anthropic_refuses_it(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, vllm: RecordingUpstream, model: str
) -> None:
    """First, after an assistant turn, before a user turn, or with other than text: Anthropic's 400
    in its shape, for ``count_tokens`` too, and no upstream asked."""
    refused: list[tuple[list[Any], str]] = [
        ([_TOLD_TURN, _USER], 'messages.0: Unexpected role "system" for the first message.'),
        ([_USER, {"role": "assistant", "content": "a"}, _TOLD_TURN], f"messages.2: {_AFTER}"),
        ([_USER, _TOLD_TURN, _USER], f"messages.1: {_BEFORE}"),
        ([_USER, {"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}]}],
         "messages.1.content.0.type: Input should be 'text'"),
    ]  # fmt: skip
    before = len(claude_upstream.bodies), len(vllm.bodies)
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "sk-unused", "anthropic-beta": _BETAS}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=15) as client:
        for messages, said in refused:
            for path, body in (
                ("/v1/messages", {"model": model, "max_tokens": 32, "messages": messages}),
                ("/v1/messages/count_tokens", {"model": model, "messages": messages}),
            ):
                answered = client.post(path, json=body)
                assert answered.status_code == 400, (path, answered.text)
                error = answered.json()
                assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
                assert error["error"]["message"].startswith(said), (path, error)
    assert (len(claude_upstream.bodies), len(vllm.bodies)) == before
