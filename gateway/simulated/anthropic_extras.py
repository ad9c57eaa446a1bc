"""The Anthropic Messages API beyond plain text: tools, thinking, structured output, token counts.

A request is planned as content blocks, in the order Claude writes them:

* ``thinking`` (``{"type": "enabled", "budget_tokens": n}`` or ``adaptive``): a short
  thinking block with a signature first;
* tools (``tools`` with ``input_schema``, ``tool_choice`` auto / any / tool / none,
  ``disable_parallel_tool_use``): when :mod:`.tools` decides on a call, ``auto`` writes
  a one-line text block and then the ``tool_use`` block(s) (``toolu_<hex>`` ids, input
  generated from the schema); ``any`` / ``tool`` write the ``tool_use`` only; the stop
  reason is ``tool_use``. A last user turn that carries ``tool_result`` blocks gets a
  text answer quoting the result (unless ``tool_choice`` forces a call);
* ``output_config.format`` (or the older top-level ``output_format``) of type
  ``json_schema``: the text block is JSON generated from the schema;
* otherwise the echo text block.

``max_tokens`` is spent across the blocks in order: a text or thinking block is cut
where it runs out (``max_tokens``), a tool call that does not fit is left out.
``stop_sequences`` apply to text blocks. Input tokens are the tokens of the system
prompt, of every text, tool_use input and tool_result in the messages, and of the
tool definitions (no per-message overhead; images count nothing).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.simulated.answers import content_text, last_user_text, make_answer, reply_words
from gateway.simulated.schema_values import SchemaValues
from gateway.simulated.tokenizer import count, encode, pieces
from gateway.simulated.tools import Tool, arguments_json, call_id, choose_tools

__all__ = ["Block", "MessagesPlan", "MessagesRequestError", "input_tokens", "plan_messages", "validate"]

_FINISH = {"end": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}
_ROLES = ("user", "assistant")
_TOOL_CHOICES = ("auto", "any", "tool", "none")
_MIN_THINKING_BUDGET = 1024
_RESULT_WORDS = 40
_encode_json = msgspec.json.Encoder().encode


class MessagesRequestError(ValueError):
    """A request the real API rejects with 400 ``invalid_request_error``."""


# ------------------------------------------------------------------ validation


def _fail(message: str) -> MessagesRequestError:
    return MessagesRequestError(message)


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _fail("system: Input should be a valid string or a list of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _fail(f"system.{i}: Input should be a text block")


def _validate_messages(messages: list[Any]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _fail(f"messages.{i}: Input should be a valid dictionary")
        if message.get("role") == "system" and i > 0:  # mid-conversation, as Claude Opus 4.8 takes it
            _validate_system(message.get("content"))
            continue
        if message.get("role") not in _ROLES:
            raise _fail(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _fail(f"messages.{i}.content: Input should be a valid string or a list of content blocks")
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise _fail(f"messages.{i}.content.{j}: Input should be a content block with a 'type'")
            kind = block["type"]
            if kind == "text" and not isinstance(block.get("text"), str):
                raise _fail(f"messages.{i}.content.{j}.text: Field required")
            if kind == "tool_use" and (not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str)):
                raise _fail(f"messages.{i}.content.{j}: tool_use blocks need an 'id' and a 'name'")
            if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
                raise _fail(f"messages.{i}.content.{j}.tool_use_id: Field required")
            if kind == "thinking" and block.get("signature") != _signature(str(block.get("thinking") or "")):
                raise _fail(f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block")


def _validate_thinking_history(messages: list[Any]) -> None:
    """With thinking on, the assistant turn whose tool calls the last user turn answers must
    start with its thinking block, as the model wrote it (the real API's rule)."""
    if len(messages) < 2 or not _tool_results(messages):
        return
    index = len(messages) - 2
    turn = messages[index]
    content = turn.get("content") if isinstance(turn, dict) else None
    first = content[0] if isinstance(content, list) and content else None
    kind = first.get("type") if isinstance(first, dict) else "text"
    if turn.get("role") == "assistant" and kind not in ("thinking", "redacted_thinking"):
        raise _fail(
            f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{kind}`. "
            "When `thinking` is enabled, a final `assistant` message must start with a thinking block "
            "(preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
        )


def _tools(body: dict[str, Any]) -> list[Tool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail("tools: Input should be a valid list")
    tools: list[Tool] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise _fail(f"tools.{i}.name: Field required")
        if item.get("type", "custom") != "custom":
            continue  # server tools (web search, bash, ...): accepted, never called here
        schema = item.get("input_schema")
        if not isinstance(schema, dict):
            raise _fail(f"tools.{i}.custom.input_schema: Field required")
        description = item.get("description")
        tools.append(Tool(item["name"], description if isinstance(description, str) else "", schema))
    return tools


def _tool_choice(body: dict[str, Any], tools: list[Tool]) -> tuple[str, str | None, bool]:
    """(mode: auto|required|none, forced tool name, parallel calls allowed)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", None, True
    if not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICES:
        raise _fail("tool_choice: Input tag should be 'auto', 'any', 'tool' or 'none'")
    parallel = choice.get("disable_parallel_tool_use") is not True
    kind = choice["type"]
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise _fail("tool_choice.tool.name: Field required")
        if not any(t.name == name for t in tools):
            raise _fail(f"tool_choice: tool '{name}' not found in tools")
        return "required", name, parallel
    if kind == "any":
        if not tools:
            raise _fail("tool_choice: 'any' requires at least one tool")
        return "required", None, parallel
    return str(kind), None, parallel


def _thinking(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise _fail("thinking: Input tag should be 'enabled', 'disabled' or 'adaptive'")
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < _MIN_THINKING_BUDGET:
            raise _fail(
                f"thinking.enabled.budget_tokens: Input should be greater than or equal to {_MIN_THINKING_BUDGET}"
            )
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and budget >= max_tokens:
            raise _fail("`max_tokens` must be greater than `thinking.budget_tokens`")
    return bool(thinking["type"] != "disabled")


def _output_schema(body: dict[str, Any]) -> Any:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _fail("output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}")
    return fmt["schema"]


def without_system_messages(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its mid-conversation system messages read into its ``system``, as the
    answer and the count read them (a validated body's)."""
    messages: list[Any] = body["messages"]
    placed = [message for message in messages if message.get("role") == "system"]
    if not placed:
        return body
    system = body.get("system")
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system or [])
    for message in placed:
        content = message.get("content")
        blocks += [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    kept = [message for message in messages if message.get("role") != "system"]
    return {**body, "system": blocks, "messages": kept}


def validate(body: dict[str, Any]) -> None:
    """Raise MessagesRequestError for what the real API rejects beyond the basic fields."""
    _validate_system(body.get("system"))
    _validate_messages(body["messages"])
    tools = _tools(body)
    mode, _, _ = _tool_choice(body, tools)
    if _thinking(body) and mode == "required":
        raise _fail("Thinking may not be enabled when tool_choice forces tool use.")
    if _thinking(body):
        _validate_thinking_history(body["messages"])
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 1
    ):
        raise _fail("temperature: Input should be a number from 0 to 1")
    _output_schema(body)


# ------------------------------------------------------------------ counting


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return count(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return count(block["text"])
    if kind == "tool_use":
        return count(str(block.get("name", ""))) + count(json.dumps(block.get("input", {}), ensure_ascii=False))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block_tokens(part) for part in content)
        return count(content) if isinstance(content, str) else 0
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return count(block["thinking"])
    if kind == "document":  # what Anthropic counts and the gateway's own count cannot see
        raw = block.get("source")
        source: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return count(source["data"])
        if source.get("type") == "content" and isinstance(source.get("content"), list):
            return sum(_block_tokens(part) for part in source["content"])
        return _IMAGE_TOKENS  # a PDF or a file: a page's worth
    if kind == "search_result" and isinstance(block.get("content"), list):
        return sum(_block_tokens(part) for part in block["content"])
    if kind == "image":
        return _IMAGE_TOKENS
    return 0


_IMAGE_TOKENS = 1_600
"""About what Anthropic counts for a 1,092 x 1,092 image (width x height / 750)."""


@functools.lru_cache(maxsize=256)
def _input_tokens(key: bytes) -> int:
    system, messages, tools = msgspec.json.decode(key)
    total = _block_tokens(system) if isinstance(system, str) else sum(_block_tokens(b) for b in system or [])
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += count(content) if isinstance(content, str) else sum(_block_tokens(b) for b in content or [])
    if tools:
        total += count(json.dumps(tools, ensure_ascii=False))
    return total


def input_tokens(body: dict[str, Any]) -> int:
    """Tokens of a validated request's system prompt, messages and tools."""
    return _input_tokens(_encode_json([body.get("system"), body["messages"], body.get("tools")]))


# ------------------------------------------------------------------------ plan


@dataclass(frozen=True, slots=True)
class Block:
    """One content block of the answer; ``text`` is the tool input JSON for ``tool_use``."""

    kind: str  # thinking | text | tool_use
    text: str
    pieces: tuple[str, ...]
    n_tokens: int
    id: str = ""
    name: str = ""
    signature: str = ""

    def content(self) -> dict[str, Any]:
        """The block in a finished message."""
        if self.kind == "tool_use":
            return {"type": "tool_use", "id": self.id, "name": self.name, "input": json.loads(self.text or "{}")}
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": self.text, "signature": self.signature}
        return {"type": "text", "text": self.text}

    def start(self) -> dict[str, Any]:
        """The block in ``content_block_start``."""
        if self.kind == "tool_use":
            return {"type": "tool_use", "id": self.id, "name": self.name, "input": {}}
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": "", "signature": ""}
        return {"type": "text", "text": ""}

    def deltas(self) -> list[dict[str, Any]]:
        """The ``delta`` of each ``content_block_delta``."""
        if self.kind == "tool_use":
            # Like the real API: an empty fragment first, then the JSON in pieces.
            return [{"type": "input_json_delta", "partial_json": p} for p in ("", *self.pieces)]
        if self.kind == "thinking":
            return [{"type": "thinking_delta", "thinking": p} for p in self.pieces] + [
                {"type": "signature_delta", "signature": self.signature}
            ]
        return [{"type": "text_delta", "text": p} for p in self.pieces]


@dataclass(frozen=True, slots=True)
class MessagesPlan:
    input_tokens: int
    blocks: tuple[Block, ...]
    stop_reason: str
    stop_sequence: str | None

    @property
    def output_tokens(self) -> int:
        return sum(block.n_tokens for block in self.blocks)


def _tool_results(messages: list[Any]) -> list[str]:
    """Texts of the ``tool_result`` blocks of a last user turn (empty: there are none)."""
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user" or not isinstance(last.get("content"), list):
        return []
    results: list[str] = []
    for block in last["content"]:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content")
            results.append(content if isinstance(content, str) else content_text(content))
    return results


def _signature(text: str) -> str:
    return base64.b64encode(hashlib.blake2b(text.encode(), digest_size=48).digest()).decode("ascii")


def plan_messages(body: dict[str, Any], *, name: str, fault_text: str | None) -> MessagesPlan:
    """Plan the answer to a validated request (see the module docs)."""
    messages: list[Any] = body["messages"]
    prompt = last_user_text(messages)
    tools = _tools(body)
    mode, forced, parallel = _tool_choice(body, tools)
    results = _tool_results(messages)
    schema = _output_schema(body)

    intended: list[tuple[str, str, Tool | None]] = []  # (kind, text, tool)
    if _thinking(body):
        gist = " ".join(prompt.split()[:24]) or "the conversation so far"
        intended.append(("thinking", f"The user wrote: {gist}. A short, direct answer will do.", None))
    chosen: list[Tool] = []
    if mode != "none" and (mode != "auto" or not results):
        chosen = choose_tools(tools, prompt, mode, forced=forced, parallel=parallel)
    if chosen:
        if mode == "auto":
            names = ", ".join(t.name for t in chosen)
            preface = fault_text if fault_text is not None else f"I'll use {names} for this."
            intended.append(("text", preface, None))
        intended += [("tool_use", arguments_json(tool, prompt), tool) for tool in chosen]
    elif fault_text is not None:
        intended.append(("text", fault_text, None))
    elif schema is not None:
        intended.append(("text", json.dumps(SchemaValues(schema, prompt).value(), ensure_ascii=False), None))
    elif results:
        words = " ".join(results).split()
        snippet = " ".join(words[:_RESULT_WORDS]) + (" ..." if len(words) > _RESULT_WORDS else "")
        intended.append(("text", f"[simulated {name}] Based on the tool result: {snippet or '(empty)'}", None))
    else:
        intended.append(("text", f"[simulated {name}] {reply_words(messages)}", None))

    stops = tuple(body.get("stop_sequences") or ())
    budget: int = body["max_tokens"]
    blocks: list[Block] = []
    stop_reason, stop_sequence = "end_turn", None
    for kind, text, tool in intended:
        if kind == "text":
            answer = make_answer(text, budget, stops)
            if answer.text or not blocks:
                blocks.append(Block("text", answer.text, answer.pieces, answer.n_tokens))
            budget -= answer.n_tokens
            if answer.finish != "end":
                stop_reason, stop_sequence = _FINISH[answer.finish], answer.stop_sequence
                break
            continue
        tokens = encode(text)
        if kind == "tool_use" and tool is not None:
            if len(tokens) > budget:
                stop_reason = "max_tokens"
                break
            blocks.append(Block("tool_use", text, pieces(tokens), len(tokens), call_id("toolu_"), tool.name))
            stop_reason = "tool_use"
        else:  # thinking
            cut = tokens[:budget]
            parts = pieces(cut)
            blocks.append(Block("thinking", "".join(parts), parts, len(cut), signature=_signature(text)))
            if len(cut) < len(tokens):
                stop_reason = "max_tokens"
                break
        budget -= len(tokens)
    return MessagesPlan(input_tokens(body), tuple(blocks), stop_reason, stop_sequence)
