"""The two documented base-URL mistakes are told how to fix them (t200: a bare "no such endpoint"):
an Anthropic SDK given a base URL ending in /v1 (it calls /v1/v1/messages), answered in Anthropic's
error shape, and an OpenAI SDK given one without /v1 (it calls /chat/completions, /responses ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess

_ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "ask",
    [
        pytest.param(lambda claude: claude.messages.create(model="fast", max_tokens=16, messages=_ASK), id="messages"),
        pytest.param(lambda claude: claude.messages.count_tokens(model="fast", messages=_ASK), id="count_tokens"),
    ],
)
def test_an_anthropic_base_url_ending_in_v1(gateway: GatewayProcess, ask: Callable[[anthropic.Anthropic], Any]) -> None:
    claude = closed_after_test(anthropic.Anthropic(base_url=f"{gateway.url}/v1", api_key="sk-unused", max_retries=0))
    with pytest.raises(anthropic.NotFoundError) as refused:
        ask(claude)
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "not_found_error", refused.value.body
    assert error["message"].startswith("no such endpoint: the base URL should not end in /v1"), error["message"]


@pytest.mark.parametrize(
    "ask",
    [
        pytest.param(lambda client: client.chat.completions.create(model="fast", messages=_ASK), id="chat"),
        pytest.param(lambda client: client.completions.create(model="fast", prompt="hi"), id="completions"),
        pytest.param(lambda client: client.responses.create(model="fast", input="hi"), id="responses"),
        pytest.param(lambda client: client.responses.retrieve("resp_123"), id="responses.retrieve"),
        pytest.param(lambda client: client.embeddings.create(model="embed", input="hi"), id="embeddings"),
        pytest.param(lambda client: client.models.list(), id="models"),
    ],
)
def test_an_openai_base_url_without_v1(gateway: GatewayProcess, ask: Callable[[openai.OpenAI], Any]) -> None:
    client = closed_after_test(openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0))
    with pytest.raises(openai.NotFoundError) as refused:
        ask(client)
    assert refused.value.code == "not_found"
    said = refused.value.body["message"]  # type: ignore[index]
    assert said.startswith("no such endpoint: the base URL should end in /v1 ("), said


def test_other_paths_are_no_such_endpoint(gateway: GatewayProcess) -> None:
    for path in ("/v1/nothing", "/nothing/chat/completions", "/v2/messages"):
        answer = httpx.post(f"{gateway.url}{path}", json={})
        assert answer.status_code == 404 and answer.json()["error"]["message"] == "no such endpoint", path
    assert httpx.post(f"{gateway.url}/v1/v1/chat/completions", json={}).json()["error"]["message"] == (
        "no such endpoint: the base URL should end in /v1 once, not /v1/v1 (this request came to "
        "/v1/v1/chat/completions; the gateway serves /v1/chat/completions)"
    )
