"""A model's ``base_url`` with a query string keeps it on every call upstream (t177).

Azure OpenAI wants ``api-version`` on every call (``.../openai/deployments/dep1?api-version=...``),
and a proxy may want a token in the query. The gateway appended each call's path after the query
(``POST /openai/deployments/dep1?api-version=2024-10-21/chat/completions``): every call went to the
deployment's bare path, and ``count_tokens`` quietly fell back to the gateway's own count. The
loopback upstream records the path and query each call came to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording

_MODELS = """
  azure:
    base_url: {url}/openai/deployments/dep1?api-version=2024-10-21
    upstream_model: gpt-4o
    responses_api: true
    price: {{input: 2, output: 8}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  proxied-claude:
    provider: anthropic
    base_url: {url}/anthropic/?tok=abc
    upstream_model: claude-sonnet-4-6
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_AZURE = "/openai/deployments/dep1"
_USAGE = {"input_tokens": 10, "output_tokens": 2}


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    message = {"role": "assistant", "content": "Hi."}
    return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})  # fmt: skip


def _response(model: str) -> dict[str, Any]:
    text = {"type": "output_text", "text": "Hi.", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": model,
            "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {**_USAGE, "total_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}  # fmt: skip


async def _responses(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response(_response((await request.json())["model"]))


async def _stored(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response(_response("gpt-4o"))


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                              "content": [{"type": "text", "text": "Hi."}], "stop_reason": "end_turn",
                              "stop_sequence": None, "usage": _USAGE})  # fmt: skip


async def _count_tokens(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response({"input_tokens": 4242})


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    routes = {
        f"{_AZURE}/chat/completions": _chat,
        f"{_AZURE}/responses": _responses,
        f"GET {_AZURE}/responses/{{id}}": _stored,
        "/anthropic/v1/messages": _messages,
        "/anthropic/v1/messages/count_tokens": _count_tokens,
    }
    with serve_recording(routes, name="query-base-upstream") as served:
        yield served


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway, upstream: RecordingUpstream) -> Iterator[GatewayProcess]:
    with pair_gateway("base-url-query", extra_models=_MODELS.format(url=upstream.url)) as process:
        yield process


def _openai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=15))


def _last(upstream: RecordingUpstream, sent: int) -> list[str]:
    return upstream.targets[sent:]


def test_chat_goes_to_the_deployment_with_its_api_version(gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    sent = len(upstream.targets)
    answer = _openai(gateway).chat.completions.create(model="azure", messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content == "Hi."
    assert _last(upstream, sent) == [f"POST {_AZURE}/chat/completions?api-version=2024-10-21"]


def test_a_passed_through_response_and_its_read_keep_the_api_version_before_the_clients_query(
    gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    client = _openai(gateway)
    sent = len(upstream.targets)
    made = client.responses.create(model="azure", input="Hi")
    read = client.responses.retrieve(made.id, include=["reasoning.encrypted_content"])
    assert read.id == made.id == "resp_1"
    assert _last(upstream, sent) == [
        f"POST {_AZURE}/responses?api-version=2024-10-21",
        f"GET {_AZURE}/responses/resp_1?api-version=2024-10-21&include%5B%5D=reasoning.encrypted_content",
    ]


def test_messages_and_count_tokens_keep_the_proxys_token(gateway: GatewayProcess, upstream: RecordingUpstream) -> None:
    sent = len(upstream.targets)
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=15) as claude:
        said = claude.messages.create(
            model="proxied-claude", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        )
        counted = claude.messages.count_tokens(model="proxied-claude", messages=[{"role": "user", "content": "Hi"}])
    assert said.content[0].type == "text" and said.content[0].text == "Hi."
    assert counted.input_tokens == 4242  # the upstream's count, not the gateway's own
    assert _last(upstream, sent) == [
        "POST /anthropic/v1/messages?tok=abc",
        "POST /anthropic/v1/messages/count_tokens?tok=abc",
    ]
