"""An unknown model is the client's 404 on every edge, whatever else its body gets wrong (t200:
Claude Code's model name on a Messages route with ``context_management`` was told the field "is not
supported on a route that may reach a model other than Anthropic's", where no such route was)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess

_CLAUDE_CODES_MODEL = "claude-sonnet-4-5-20250929"
_SAID = f"model '{_CLAUDE_CODES_MODEL}' does not exist or this key may not use it; available: "


@pytest.mark.parametrize(
    "ask",
    [
        pytest.param(
            lambda claude: claude.messages.create(
                model=_CLAUDE_CODES_MODEL,
                max_tokens=32000,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"context_management": {"edits": []}},
            ),
            id="messages",
        ),
        pytest.param(
            lambda claude: claude.messages.count_tokens(
                model=_CLAUDE_CODES_MODEL,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"context_management": {"edits": []}},
            ),
            id="count_tokens",
        ),
    ],
)
def test_messages_name_the_unknown_model_before_a_field(
    claude: anthropic.Anthropic, ask: Callable[[anthropic.Anthropic], Any]
) -> None:
    with pytest.raises(anthropic.NotFoundError) as refused:
        ask(claude)
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "not_found_error" and error["message"].startswith(_SAID), error
    assert "fast" in error["message"]  # the names the key may call


@pytest.mark.parametrize(
    "ask",
    [
        pytest.param(
            lambda client: client.chat.completions.create(
                model=_CLAUDE_CODES_MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream_options={"include_usage": True},  # without stream: a 400
            ),
            id="chat",
        ),
        pytest.param(
            lambda client: client.completions.create(
                model=_CLAUDE_CODES_MODEL, prompt="hi", stream_options={"include_usage": True}
            ),
            id="completions",
        ),
        pytest.param(
            lambda client: client.responses.create(model=_CLAUDE_CODES_MODEL, input="hi", temperature="hot"),
            id="responses",
        ),
        pytest.param(
            lambda client: client.embeddings.create(model=_CLAUDE_CODES_MODEL, input=[]),
            id="embeddings",
        ),
    ],
)
def test_openai_edges_name_the_unknown_model_before_a_field(
    client: openai.OpenAI, ask: Callable[[openai.OpenAI], Any]
) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        ask(client)
    assert refused.value.code == "model_not_found" and refused.value.param == "model"
    said = refused.value.body["message"]  # type: ignore[index]
    assert said.startswith(_SAID) and "fast" in said, said


def test_a_known_model_is_told_what_its_body_gets_wrong(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="embed", input=[])
    assert refused.value.param == "input"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param(
            "/v1/messages",
            {"model": _CLAUDE_CODES_MODEL, "max_tokens": 32000, "thinking": {"type": "adaptive"},
             "output_config": {"effort": "high"}, "messages": [{"role": "user", "content": "hi"}]},
            404,
            id="messages",
        ),
        pytest.param("/v1/completions", {"model": _CLAUDE_CODES_MODEL, "prompt": "hi", "foo_bar": 1}, 404,
                     id="completions"),
        pytest.param("/v1/embeddings", {"model": _CLAUDE_CODES_MODEL, "input": "hi", "priority": 1}, 404,
                     id="embeddings"),
        pytest.param(  # routed, then refused before any upstream: the policy prices no web search for it
            "/v1/responses", {"model": "gpt", "input": "hi", "tools": [{"type": "web_search"}], "priority": 1}, 400,
            id="responses",
        ),
    ],
)  # fmt: skip
def test_a_refusal_before_any_model_was_called_names_nothing_as_dropped(
    gateway: GatewayProcess, path: str, body: dict[str, Any], status: int
) -> None:
    """t206: a 404 for Claude Code's model name said ``x-gateway-dropped: output_config.effort,thinking``,
    though nothing was sent anywhere: the header says what did not reach the model that answered."""
    answer = httpx.post(f"{gateway.url}{path}", json=body, timeout=10)
    assert answer.status_code == status, answer.text
    assert "x-gateway-model" not in answer.headers and "x-gateway-dropped" not in answer.headers
