"""Anthropic's message threads (``thread``, the message-threads beta) are own-checked per tenant (t202).

The upstream keeps a thread under the answer's message id, for every tenant of the gateway's one
key: a ``continue`` naming another tenant's message went upstream and read its conversation.
Now the gateway claims each message it relays for a request with a ``thread`` for the request's
tenant, and a ``continue`` of any other is a 404 (``not_found_error``) that never reaches the
upstream. A continued turn's tool results answer calls that are in the thread, not the body, and
an answer that depends on upstream state is neither served from nor kept in the cache. The
loopback upstream keeps threads as Anthropic's API does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

from gateway.auth import hash_key
from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

_MODELS = """
  threaded:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-threads-1
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  threads-r: {model: threaded}
"""
_KEYS = """
auth:
  mode: keys
  keys:
    - {id: alpha, tenant: team-a, hash: "%(alpha)s"}
    - {id: beta, tenant: team-b, hash: "%(beta)s"}
""" % {name: hash_key(f"key-{name}") for name in ("alpha", "beta")}
_BETA = {"anthropic-beta": "message-threads-2026-08-12"}
_USAGE = {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_TOOLS: Any = [{"name": "get_time", "description": "The time.", "input_schema": {"type": "object", "properties": {}}}]
_ASK: dict[str, Any] = {"model": "threads-r", "max_tokens": 64, "tools": _TOOLS}
_numbers = itertools.count(1)
_kept_threads: dict[str, bool] = {}
"""The upstream's threads, by message id (every tenant's, as its one key holds them)."""


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    """Anthropic's threads: ``create`` keeps the conversation under the answer's id; ``continue``
    answers from a kept one, or is Anthropic's 404. A new thread's answer calls the tool."""
    body = await request.json()
    upstream.bodies.append(body)
    thread = body.get("thread") or {}
    kept = _kept_threads
    if thread.get("type") == "continue" and thread.get("previous_message_id") not in kept:
        error = {"type": "not_found_error", "message": "previous_message_id: thread not found"}
        return web.json_response({"type": "error", "error": error}, status=404)
    message_id = f"msg_upstream_{next(_numbers)}"
    if thread.get("type") == "continue":
        content: list[dict[str, Any]] = [{"type": "text", "text": "It is noon."}]
        stop = "end_turn"
    else:
        content, stop = [{"type": "tool_use", "id": f"toolu_{message_id}", "name": "get_time", "input": {}}], "tool_use"
    if thread:
        kept[message_id] = True
    message: dict[str, Any] = {"id": message_id, "type": "message", "role": "assistant", "model": body["model"],
                               "stop_sequence": None}  # fmt: skip
    if not body.get("stream"):
        return web.json_response({**message, "content": content, "stop_reason": stop, "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    block = content[0]
    start = {**block, "input": {}} if block["type"] == "tool_use" else {"type": "text", "text": ""}
    delta = (
        {"type": "input_json_delta", "partial_json": "{}"}
        if block["type"] == "tool_use"
        else {"type": "text_delta", "text": block["text"]}
    )
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": _USAGE}},
        {"type": "content_block_start", "index": 0, "content_block": start},
        {"type": "content_block_delta", "index": 0, "delta": delta},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": _USAGE},
        {"type": "message_stop"},
    ]
    for event in events:
        await write_sse(response, event, event["type"])
    return response


@pytest.fixture(scope="module")
def claude_upstream() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/messages": _messages}, name="threads-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway, claude_upstream: RecordingUpstream) -> Iterator[GatewayProcess]:
    models = _MODELS.format(url=claude_upstream.url)
    with pair_gateway(
        "threads", auth=_KEYS, extra_models=models, routes=_ROUTES, cache="{enabled: true, exact: {ttl_s: 600}}"
    ) as gw:
        yield gw


def _claude(gateway: GatewayProcess, key: str = "alpha") -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key=f"key-{key}", max_retries=0, timeout=15))


def _create(gateway: GatewayProcess, key: str = "alpha", *, stream: bool = False) -> str:
    """A new thread of ``key``'s tenant: the id of its first answer (a tool call)."""
    ask: Any = {
        **_ASK,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "extra_body": {"thread": {"type": "create"}},
        "extra_headers": _BETA,
    }
    claude = _claude(gateway, key)
    if stream:
        with claude.messages.stream(**ask) as streamed:
            message = streamed.get_final_message()
    else:
        message = claude.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    return message.id


def _continue(
    gateway: GatewayProcess, previous: str, key: str = "alpha", *, stream: bool = False, text: bool = False
) -> Any:
    """The thread's next turn, as the SDK's tool runner sends it: the tool's result alone (or a question)."""
    result = {"type": "tool_result", "tool_use_id": f"toolu_{previous}", "content": "12:00"}
    ask: Any = {
        **_ASK,
        "messages": [{"role": "user", "content": "What did I say before?" if text else [result]}],
        "extra_body": {"thread": {"type": "continue", "previous_message_id": previous}},
        "extra_headers": _BETA,
    }
    claude = _claude(gateway, key)
    if stream:
        with claude.messages.stream(**ask) as streamed:
            return streamed.get_final_message()
    return claude.messages.create(**ask)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tenant_continues_its_own_thread_with_the_tool_result_alone(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, stream: bool
) -> None:
    """The gateway's own check refused the result: its ``tool_use`` is in the thread, not the body."""
    first = _create(gateway, stream=stream)
    answer = _continue(gateway, first, stream=stream)
    assert answer.content[0].text == "It is noon."
    assert claude_upstream.bodies[-1]["thread"] == {"type": "continue", "previous_message_id": first}
    again = _continue(gateway, first, stream=stream)  # a fork from the same turn: still the tenant's
    assert again.content[0].text == "It is noon."


@pytest.mark.parametrize("stream", [False, True])
def test_another_tenants_thread_is_not_found_and_never_reaches_the_upstream(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, stream: bool
) -> None:
    """t202: another tenant's message id reached its thread upstream (200)."""
    theirs = _create(gateway, "alpha", stream=stream)
    sent = len(claude_upstream.bodies)
    for text in (True, False):
        with pytest.raises(anthropic.NotFoundError) as refused:
            _continue(gateway, theirs, "beta", stream=stream, text=text)
        assert refused.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        assert theirs in refused.value.message
    assert len(claude_upstream.bodies) == sent
    with pytest.raises(anthropic.NotFoundError):  # an id no tenant made: the same answer
        _continue(gateway, "msg_made_by_no_one", "beta", stream=stream)
    assert len(claude_upstream.bodies) == sent


def test_a_thread_of_a_shape_the_gateway_cannot_check_is_refused(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    sent = len(claude_upstream.bodies)
    for thread in ({"type": "fork", "message_id": "msg_x"}, {"type": "create", "previous_message_id": "msg_x"}, "x"):
        with pytest.raises(anthropic.BadRequestError) as refused:
            _claude(gateway).messages.create(
                **_ASK,
                messages=[{"role": "user", "content": "Hi."}],
                extra_body={"thread": thread},
                extra_headers=_BETA,
            )
        assert "thread" in refused.value.message
    assert len(claude_upstream.bodies) == sent


def test_a_thread_is_neither_served_from_nor_kept_in_the_cache(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    """A thread's answer depends on what the upstream keeps: each request reaches it, each a new message."""
    sent = len(claude_upstream.bodies)
    first, second = _create(gateway), _create(gateway)
    assert first != second and len(claude_upstream.bodies) == sent + 2
    ask: Any = {**_ASK, "messages": [{"role": "user", "content": "What time is it?"}]}
    plain = _claude(gateway).messages.with_raw_response.create(**ask)  # the same request without a thread: cacheable
    assert plain.headers.get("x-gateway-cache") != "hit"
    gateway.wait_for_record(plain.headers["x-request-id"])
    assert len(claude_upstream.bodies) == sent + 3
