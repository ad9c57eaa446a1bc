"""docs/request-log.md against a real line: the schema finance dashboards are built from (t119)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import msgspec
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.gateway_process import GatewayProcess

_DOC = Path(__file__).resolve().parents[2] / "docs" / "request-log.md"
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "object": dict,
}


def _documented_fields() -> dict[str, str]:
    """The field table's rows: field name to its type, in the table's order."""
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", _DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {name: kind for name, kind in rows if kind in _TYPES}


def _example_lines() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)```", _DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [msgspec.json.decode(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_the_field_table_and_the_example_lines_are_a_real_lines_fields(
    gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    """The examples lacked the fields added since (speed, service_tier, started_at, ...)."""
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "Name the schema."}], max_tokens=5
    )
    line = gateway.wait_for_record(raw.headers["x-request-id"])
    documented = _documented_fields()
    assert list(documented) == list(line)  # every field, in the order lines have them
    examples = _example_lines()
    assert examples
    for example in examples:
        assert list(example) == list(line)
        wrong = {name: value for name, value in example.items() if value is not None}
        wrong = {name: value for name, value in wrong.items() if not isinstance(value, _TYPES[documented[name]])}
        assert wrong == {}, "example values not of their documented type"


_ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Stream it."}]
_SAY: list[MessageParam] = [{"role": "user", "content": "Stream it."}]
_STREAMED_REFUSALS: dict[str, Callable[[openai.OpenAI, anthropic.Anthropic], object]] = {
    "chat, an unknown model": lambda c, _: c.chat.completions.create(model="nosuch", messages=_ASK, stream=True),
    "chat, a bad temperature": lambda c, _: c.chat.completions.create(
        model="fast", messages=_ASK, temperature=5, stream=True
    ),
    "completions, an unknown model": lambda c, _: c.completions.create(model="nosuch", prompt="hi", stream=True),
    "completions, a bad temperature": lambda c, _: c.completions.create(
        model="fast", prompt="hi", temperature=5, stream=True
    ),
    "messages, an unknown model": lambda _, a: a.messages.create(
        model="nosuch", max_tokens=5, messages=_SAY, stream=True
    ),
    "messages, no max_tokens": lambda _, a: a.messages.create(
        model="fast",
        max_tokens=cast(int, anthropic.omit),
        messages=_SAY,
        stream=True,  # sent without it
    ),
    "messages, a bad temperature": lambda _, a: a.messages.create(
        model="fast", max_tokens=5, messages=_SAY, extra_body={"temperature": 5}, stream=True
    ),
    "responses, a previous response not kept": lambda c, _: c.responses.create(
        model="fast", input="hi", previous_response_id="resp_nosuch", stream=True
    ),
    "responses, a bad temperature": lambda c, _: c.responses.create(
        model="fast", input="hi", temperature=5, stream=True
    ),
}


@pytest.mark.parametrize("ask", list(_STREAMED_REFUSALS))
def test_a_stream_refused_before_routing_is_logged_as_asked_for(
    gateway: GatewayProcess, client: openai.OpenAI, claude: anthropic.Anthropic, ask: str
) -> None:
    """`stream` is what the client asked: a refusal before the request was routed logged false (t175)."""
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as refused:
        _STREAMED_REFUSALS[ask](client, claude)
    error = refused.value
    assert isinstance(error, (openai.APIStatusError, anthropic.APIStatusError))
    assert 400 <= error.status_code < 500
    line = gateway.wait_for_record(error.response.headers["x-request-id"])
    assert (line["status"], line["stream"]) == (error.status_code, True)


def test_a_body_that_is_no_json_object_asked_for_no_stream(gateway: GatewayProcess) -> None:
    """Nothing was asked where there is no object to ask it in: false (docs/request-log.md)."""
    refused = httpx.post(f"{gateway.base_url}/chat/completions", content=b'[{"stream": true}]', timeout=10)
    line = gateway.wait_for_record(refused.headers["x-request-id"])
    assert (refused.status_code, line["status"], line["stream"]) == (400, 400, False)
