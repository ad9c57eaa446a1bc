"""An operator's ``anthropic-beta`` (a model's ``headers``) and a client's, both sent upstream (t177).

A model may pin betas in the policy (``headers: {anthropic-beta: ...}``); an Anthropic client may
send betas of its own. The client's replaced the operator's: on a translated request, a
passed-through one and ``count_tokens`` alike, the upstream got the client's alone. And of a
client's two ``anthropic-beta`` lines only the first went on. Now the upstream gets one line: the
operator's betas, then the client's (every line of them), each once. The loopback upstream answers
as Anthropic's API does and records each request's ``anthropic-beta`` lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web

from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

_MODELS = """
  pinned:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-pinned-1
    headers: {{anthropic-beta: "operator-beta-1"}}
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  pinned-r: {model: pinned}
"""
_OPERATOR = "operator-beta-1"
_ASK: dict[str, Any] = {"model": "pinned-r", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi."}]}
_PASSED = {"top_k": 5}
"""What the internal model does not hold: the request is passed through."""
_USAGE = {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    """Records each request as ``{"path", "betas": its anthropic-beta lines, "body"}``."""
    body = await request.json()
    upstream.bodies.append({"path": request.path, "betas": request.headers.getall("anthropic-beta", []), "body": body})
    if request.path.endswith("/count_tokens"):
        return web.json_response({"input_tokens": 7})
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                               "stop_sequence": None}  # fmt: skip
    if not body.get("stream"):
        content = [{"type": "text", "text": "Hello."}]
        return web.json_response({**message, "content": content, "stop_reason": "end_turn", "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None, "usage": _USAGE}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": _USAGE},
        {"type": "message_stop"},
    ]
    for event in events:
        await write_sse(response, event, event["type"])
    return response


@pytest.fixture(scope="module")
def claude_upstream() -> Iterator[RecordingUpstream]:
    routes = {"/v1/messages": _messages, "/v1/messages/count_tokens": _messages}
    with serve_recording(routes, name="operator-betas-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway, claude_upstream: RecordingUpstream) -> Iterator[GatewayProcess]:
    with pair_gateway("operator-betas", extra_models=_MODELS.format(url=claude_upstream.url), routes=_ROUTES) as gw:
        yield gw


def _claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="sk-unused", max_retries=0, timeout=15))


def _sent_betas(upstream: RecordingUpstream, path: str = "/v1/messages") -> list[str]:
    sent = upstream.bodies[-1]
    assert sent["path"] == path
    betas: list[str] = sent["betas"]
    return betas


def test_without_a_client_beta_the_operators_goes_alone(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    _claude(gateway).messages.create(**_ASK)
    assert _sent_betas(claude_upstream) == [_OPERATOR]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("passed", [False, True], ids=["translated", "passed-through"])
def test_a_clients_beta_is_added_to_the_operators(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, passed: bool, stream: bool
) -> None:
    """The client's ``evil-beta`` went up alone: the model's pinned beta was gone."""
    ask: Any = {**_ASK, "extra_headers": {"anthropic-beta": "evil-beta"}}
    if passed:
        ask["extra_body"] = _PASSED
    claude = _claude(gateway)
    if stream:
        with claude.messages.stream(**ask) as streamed:
            streamed.get_final_message()
    else:
        claude.messages.create(**ask)
    assert ("top_k" in claude_upstream.bodies[-1]["body"]) is passed
    assert _sent_betas(claude_upstream) == [f"{_OPERATOR},evil-beta"]


@pytest.mark.parametrize("passed", [False, True], ids=["translated", "passed-through"])
def test_the_sdks_betas_are_added_once(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, passed: bool
) -> None:
    """The SDK's ``betas=`` (``/v1/messages?beta=true``): one the operator pins is not sent twice."""
    _claude(gateway).beta.messages.create(
        **_ASK, betas=["client-beta-1", _OPERATOR, "client-beta-1"], extra_body=_PASSED if passed else None
    )
    assert _sent_betas(claude_upstream) == [f"{_OPERATOR},client-beta-1"]


def test_count_tokens_adds_the_clients_betas_to_the_operators(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream
) -> None:
    counted = _claude(gateway).messages.count_tokens(
        model="pinned-r",
        messages=[{"role": "user", "content": "Hi."}],
        extra_headers={"anthropic-beta": "client-beta-1"},
    )
    assert counted.input_tokens == 7  # the upstream's count
    assert _sent_betas(claude_upstream, "/v1/messages/count_tokens") == [f"{_OPERATOR},client-beta-1"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [("/v1/messages", {}), ("/v1/messages", _PASSED), ("/v1/messages/count_tokens", {})],
    ids=["translated", "passed-through", "count_tokens"],
)
def test_every_line_of_a_clients_betas_goes_on(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, path: str, extra: dict[str, Any]
) -> None:
    """RFC 9110: a field's lines are one comma-separated list; only the first line went on."""
    headers = [("anthropic-beta", "client-beta-1"), ("anthropic-beta", "client-beta-2, operator-beta-1")]
    body = {**_ASK, **extra}
    if path.endswith("count_tokens"):
        del body["max_tokens"]
    with httpx.Client(base_url=gateway.url, timeout=15) as client:
        response = client.post(path, json=body, headers=[*headers, ("anthropic-version", "2023-06-01")])
    assert response.status_code == 200, response.text
    assert _sent_betas(claude_upstream, path) == [f"{_OPERATOR},client-beta-1,client-beta-2"]
