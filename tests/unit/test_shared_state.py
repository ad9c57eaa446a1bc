"""Ids of upstream state a request must not name, wherever in the body (t26, t33)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.protocols.shared_state import refuse_upstream_ids


def _where(body: dict[str, Any], *, dotted: bool = False, raw: bytes | None = None) -> str | None:
    try:
        refuse_upstream_ids(body, json.dumps(body).encode() if raw is None else raw, dotted=dotted)
    except InvalidRequestError as exc:
        return exc.param
    return None


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f1"]}}]},
         "tools[0].container.file_ids"),
        ({"input": [{"type": "computer_call_output", "call_id": "c",
                     "output": {"type": "computer_screenshot", "file_id": "f2"}}]}, "input[0].output.file_id"),
        ({"tools": [{"type": "image_generation", "input_image_mask": {"file_id": "f3"}}]},
         "tools[0].input_image_mask.file_id"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f4"}}]}]},
         "messages[0].content[0].file.file_id"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[0].vector_store_ids"),
    ],
)  # fmt: skip
def test_openai_shapes_are_refused_where_the_id_sits(body: dict[str, Any], where: str) -> None:
    assert _where(body) == where


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "f5"}]}]},
         "messages.0.content.0.file_id"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "content", "content": [
            {"type": "document", "source": {"type": "file", "file_id": "f6"}}]}}]}]},
         "messages.0.content.0.source.content.0.source"),
        ({"container": "container_1", "messages": []}, "container"),
    ],
)  # fmt: skip
def test_anthropic_shapes_are_refused_with_anthropics_paths(body: dict[str, Any], where: str) -> None:
    assert _where(body, dotted=True) == where


def test_what_names_no_state_passes() -> None:
    assert _where({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}) is None
    assert _where({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:..."}]}]}) is None
    assert _where({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]}) is None  # fmt: skip


def test_the_clients_own_data_may_use_the_names() -> None:
    """A tool whose parameter is a file_id, a model's call of it in the history, a schema."""
    tool = {
        "type": "function",
        "function": {
            "name": "read",
            "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}}, "required": ["file_id"]},
        },
    }
    assert (
        _where(
            {
                "tools": [tool],
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "read", "arguments": '{"file_id": "f"}'},
                            }
                        ],
                    }
                ],
            }
        )
        is None
    )
    anthropic_tool = {
        "name": "read",
        "input_schema": {"type": "object", "properties": {"container": {"type": "string"}}},
    }
    history = [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "read", "input": {"file_id": "f", "container": "c"}}],
        }
    ]
    assert _where({"tools": [anthropic_tool], "messages": history}, dotted=True) is None
    assert _where({"text": {"format": {"type": "json_schema", "schema": {"properties": {"file_ids": {}}}}}}) is None
    assert _where({"metadata": {"file_id": "mine"}}) is None


def test_what_a_model_answered_and_is_told_back_passes() -> None:
    """t34: follow-up turns after code execution or a code interpreter were refused."""
    cited = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "see file",
             "annotations": [{"type": "container_file_citation", "file_id": "cfile_1", "container_id": "c"}]}]}  # fmt: skip
    call = {"type": "code_interpreter_call", "id": "ci_1", "container_id": "c", "outputs": [{"file_id": "f"}]}
    assert _where({"input": [cited, call, {"role": "user", "content": "and now?"}], "store": False}) is None
    anthropic_turn = {"role": "assistant", "content": [{"type": "code_execution_tool_result", "tool_use_id": "t",
                      "content": {"type": "code_execution_result", "content": [{"file_id": "f"}]}}]}  # fmt: skip
    assert _where({"messages": [anthropic_turn, {"role": "user", "content": "next"}]}, dotted=True) is None
    mcp = {"type": "mcp", "server_label": "s", "server_url": "https://x", "headers": {"container": "blue"}}
    assert _where({"tools": [mcp]}) is None
    assert _where({"guided_json": {"$defs": {"file_id": {"type": "string"}}}}) is None
    upload = {"role": "user", "content": [{"type": "container_upload", "file_id": "f"}]}
    assert _where({"messages": [anthropic_turn, upload]}, dotted=True) == "messages.1.content.0.file_id"  # still


def test_an_escaped_key_is_still_found() -> None:
    """The raw body is looked at first, to walk only a body that may name state: a key spelt with
    a JSON escape must not slip past that look."""
    raw = b'{"tools": [{"type": "file_search", "vector\\u005fstore_ids": ["vs"]}]}'
    assert _where(json.loads(raw), raw=raw) == "tools[0].vector_store_ids"


def test_a_body_too_deep_to_look_through_is_refused() -> None:
    deep: dict[str, Any] = {"file_id": "f"}
    for _ in range(70):
        deep = {"x": deep}
    with pytest.raises(InvalidRequestError, match="too deep to check"):
        refuse_upstream_ids({"input": [deep]}, json.dumps(deep).encode())


def test_only_a_turn_of_the_conversation_is_taken_as_told_back() -> None:
    """t35: a "role": "assistant" or a type ending in _call anywhere (on a content part, a tool,
    the body itself) switched the check off below it."""
    disguised_part = {"role": "user", "content": [{"type": "file", "role": "assistant", "file": {"file_id": "f"}}]}
    assert _where({"messages": [disguised_part]}) == "messages[0].content[0].file.file_id"
    assert _where({"role": "assistant", "type": "x_call", "tools": [{"type": "file_search",
                   "vector_store_ids": ["vs"]}]}) == "tools[0].vector_store_ids"  # fmt: skip
    tool = {"type": "file_search", "role": "assistant", "vector_store_ids": ["vs"]}
    assert _where({"input": "hi", "tools": [tool]}) == "tools[0].vector_store_ids"


def test_in_a_turn_told_back_what_only_a_client_writes_is_looked_through() -> None:
    """t37: a made-up type ending in _call, or an assistant turn holding a client's file part,
    passed with the id in it."""
    made_up = {"type": "note_call", "role": "user", "content": [{"type": "input_file", "file_id": "f"}]}
    assert _where({"input": [made_up]}) == "input[0].content[0].file_id"
    assistant = {"role": "assistant", "content": [{"type": "input_file", "file_id": "f"}]}
    assert _where({"input": [assistant]}) == "input[0].content[0].file_id"
    chat = {"role": "assistant", "content": [{"type": "file", "file": {"file_id": "f"}}]}
    assert _where({"messages": [chat]}) == "messages[0].content[0].file.file_id"
    document = {"role": "assistant", "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]}
    assert _where({"messages": [document]}, dotted=True) == "messages.0.content.0.source"
