"""A model's ``base_url`` with a query string keeps it on every call upstream (t177).

Azure OpenAI wants ``api-version`` on every call (``.../openai/deployments/dep1?api-version=...``),
and a proxy may want a token in the query. The gateway appended each call's path after the query
(``POST /openai/deployments/dep1?api-version=2024-10-21/chat/completions``): every call went to the
deployment's bare path, and ``count_tokens`` quietly fell back to the gateway's own count. A read of a
passed-through response then put the client's whole query after the base's, so a client could repeat
the base's ``api-version`` or token (t181). The loopback upstream records the path and query each
call came to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess, model_entry
from tests.loopback_app import RecordingUpstream, serve_recording


def _models(url: str) -> str:
    azure = {"price": "{input: 2, output: 8}", "tier": "large", "responses_api": "true"}
    return (
        model_entry("azure", f"{url}/openai/deployments/dep1?api-version=2024-10-21", "gpt-4o", **azure)
        + model_entry("azure-tok", f"{url}/openai/deployments/dep2?api-version=2024-10-21&tok=a%26b", "gpt-4o", **azure)
        + model_entry("proxied-claude", f"{url}/anthropic/?tok=abc", "claude-sonnet-4-6", "{input: 3, output: 15}",
                      "large", provider="anthropic")
    )  # fmt: skip


_AZURE = "/openai/deployments/dep1"
_TOKEN = "/openai/deployments/dep2"
_BASE_QUERY = "api-version=2024-10-21&tok=a%26b"
_USAGE = {"input_tokens": 10, "output_tokens": 2}


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    message = {"role": "assistant", "content": "Hi."}
    return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})  # fmt: skip


def _response(model: str, response_id: str = "resp_1") -> dict[str, Any]:
    text = {"type": "output_text", "text": "Hi.", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    return {"id": response_id, "object": "response", "created_at": 1, "status": "completed", "model": model,
            "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {**_USAGE, "total_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}  # fmt: skip


async def _responses(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response(_response((await request.json())["model"]))


async def _stored(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response(_response("gpt-4o", request.match_info.get("id", "resp_1")))


async def _responses_2(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    return web.json_response(_response((await request.json())["model"], "resp_2"))


async def _input_items(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    item = {"type": "message", "id": "msg_0", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": "Hi"}]}  # fmt: skip
    return web.json_response({"object": "list", "data": [item], "first_id": "msg_0", "last_id": "msg_0",
                              "has_more": False})  # fmt: skip


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
        f"{_TOKEN}/responses": _responses_2,
        f"GET {_TOKEN}/responses/{{id}}": _stored,
        f"GET {_TOKEN}/responses/{{id}}/input_items": _input_items,
        "/anthropic/v1/messages": _messages,
        "/anthropic/v1/messages/count_tokens": _count_tokens,
    }
    with serve_recording(routes, name="query-base-upstream") as served:
        yield served


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway, upstream: RecordingUpstream) -> Iterator[GatewayProcess]:
    with pair_gateway("base-url-query", extra_models=_models(upstream.url)) as process:
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


def test_a_read_forwards_only_openais_parameters_never_the_base_urls_own(
    gateway: GatewayProcess, upstream: RecordingUpstream
) -> None:
    """t181: the client's whole query went after the base's, so ``?api-version=evil`` came second to
    the operator's: a server reading the last value took the client's, and Azure may refuse a repeat."""
    client = _openai(gateway)
    made = client.responses.create(model="azure-tok", input="Hi")
    sent = len(upstream.targets)
    smuggled = {"api-version": "evil", "tok": "x", "junk": "1"}
    read = client.responses.retrieve(made.id, include=["reasoning.encrypted_content"], extra_query=smuggled)
    items = client.responses.input_items.list(made.id, limit=2, order="asc", after="msg_9", extra_query=smuggled)
    # as sent by hand: the names percent-encoded or in capitals, which a server may read as the same
    raw = "include%5B%5D=x&api%2Dversion=evil&API-VERSION=evil&tok=y&starting_after=3&include_obfuscation=false"
    by_hand = httpx.get(f"{gateway.base_url}/responses/{made.id}?{raw}", headers={"authorization": "Bearer unused"})
    assert read.id == made.id == "resp_2" and [item.id for item in items.data] == ["msg_0"]
    assert by_hand.status_code == 200, by_hand.text
    assert _last(upstream, sent) == [
        f"GET {_TOKEN}/responses/resp_2?{_BASE_QUERY}&include%5B%5D=reasoning.encrypted_content",
        f"GET {_TOKEN}/responses/resp_2/input_items?{_BASE_QUERY}&after=msg_9&limit=2&order=asc",
        f"GET {_TOKEN}/responses/resp_2?{_BASE_QUERY}&include%5B%5D=x&starting_after=3&include_obfuscation=false",
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
