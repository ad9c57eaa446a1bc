"""An unknown model is the client's 404 on every edge, whatever else its body gets wrong (t200:
Claude Code's model name on a Messages route with ``context_management`` was told the field "is not
supported on a route that may reach a model other than Anthropic's", where no such route was)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

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
