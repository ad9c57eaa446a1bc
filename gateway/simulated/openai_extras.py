"""Chat completions with ``tools``, ``response_format``, ``n`` and ``logprobs``, as OpenAI answers them.

The server keeps its fast path for requests that use none of these; this module plans
the others (see :func:`needs_extras`): which choices, each either text (the echo, a
JSON object, JSON that fits a schema, or a reply to a tool result) or tool calls, and
turns a plan into the ``choices`` of a completion or the deltas of a stream.

* ``tools`` / ``tool_choice`` / ``parallel_tool_calls``: see :mod:`.tools` for when a
  tool is called; ``message.tool_calls`` then holds ``call_<hex>`` calls with JSON
  string arguments, ``content`` is null and ``finish_reason`` is ``tool_calls``. A
  conversation that ends with ``tool`` messages gets a text answer quoting the result
  (unless ``tool_choice`` forces a call).
* ``response_format``: ``json_object`` → ``{"answer": "<the echo>"}``; ``json_schema``
  → a value generated from the schema (:mod:`.schema_values`). Streams split the JSON
  over token deltas like any text.
* ``n``: that many choices (identical: the simulated model is greedy); usage counts
  every choice's tokens.
* ``logprobs`` / ``top_logprobs``: :mod:`.logprobs`, one entry per generated token.
* Prompt tokens add the tokens of the ``tools`` and of the JSON schema, as both are
  part of what the model reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.simulated.answers import Answer, content_text, last_user_text, make_answer
from gateway.simulated.logprobs import logprob_entries
from gateway.simulated.schema_values import SchemaValues
from gateway.simulated.tokenizer import count, encode, pieces, token_groups
from gateway.simulated.tools import Tool, arguments_json, call_id, choose_tools

__all__ = [
    "FINISH",
    "ChatPlan",
    "ChatRequestError",
    "Delta",
    "needs_extras",
    "plan_chat",
    "response_choices",
    "stream_rounds",
    "tool_result_reply",
]

_MAX_N = 128
_MAX_TOP_LOGPROBS = 20
_RESULT_WORDS = 40

FINISH: dict[str, str] = {"end": "stop", "length": "length", "stop_sequence": "stop"}


class ChatRequestError(ValueError):
    """A request the real API rejects with HTTP 400; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    pieces: tuple[str, ...]  # how a stream splits the arguments


@dataclass(frozen=True, slots=True)
class Choice:
    answer: Answer | None  # None: tool calls
    calls: tuple[ToolCall, ...]
    finish_reason: str
    n_tokens: int


@dataclass(frozen=True, slots=True)
class ChatPlan:
    prompt_tokens: int
    choices: tuple[Choice, ...]
    top_logprobs: int | None  # None: no logprobs asked for

    @property
    def completion_tokens(self) -> int:
        return sum(choice.n_tokens for choice in self.choices)


def needs_extras(body: dict[str, Any]) -> bool:
    """Whether a (validated) chat request needs this module rather than the plain echo."""
    if body.get("tools") or body.get("n") not in (None, 1) or body.get("logprobs") not in (None, False):
        return True
    if body.get("top_logprobs") is not None:
        return True
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        return True
    if body.get("tool_choice") not in (None, "auto", "none"):
        return True
    last = body["messages"][-1]
    return isinstance(last, dict) and last.get("role") == "tool"


# ------------------------------------------------------------------ validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tools(body: dict[str, Any]) -> list[Tool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ChatRequestError("'tools' must be an array", "tools")
    tools: list[Tool] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("type", "function"), str):
            raise ChatRequestError(f"'tools[{i}]' must be an object with a 'type'", f"tools[{i}]")
        if item.get("type", "function") != "function":
            continue  # custom / hosted tools: accepted, never called here
        function = item.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatRequestError(f"'tools[{i}].function.name' is required", f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ChatRequestError(f"'tools[{i}].function.parameters' must be an object", f"tools[{i}].function")
        description = function.get("description")
        tools.append(
            Tool(
                name=function["name"],
                description=description if isinstance(description, str) else "",
                schema=parameters or {"type": "object", "properties": {}},
            )
        )
    return tools


def _tool_choice(body: dict[str, Any], tools: list[Tool]) -> tuple[str, str | None, list[Tool]]:
    """(mode, forced tool name, callable tools) from ``tool_choice``."""
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return "auto", None, tools
    if choice == "none":
        return "none", None, tools
    if choice == "required":
        if not tools:
            raise ChatRequestError("tool_choice 'required' needs at least one function tool", "tool_choice")
        return "required", None, tools
    if isinstance(choice, dict):
        kind = choice.get("type")
        function = choice.get("function")
        if kind == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
            name = function["name"]
            if not any(t.name == name for t in tools):
                raise ChatRequestError(f"tool_choice names '{name}', which is not in 'tools'", "tool_choice")
            return "required", name, tools
        allowed = choice.get("allowed_tools")
        if kind == "allowed_tools" and isinstance(allowed, dict) and isinstance(allowed.get("tools"), list):
            names = {
                t["function"]["name"]
                for t in allowed["tools"]
                if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
            }
            subset = [t for t in tools if t.name in names]
            mode = allowed.get("mode", "auto")
            if mode not in ("auto", "required") or (mode == "required" and not subset):
                raise ChatRequestError("'tool_choice.allowed_tools' is not valid", "tool_choice")
            return str(mode), None, subset
    raise ChatRequestError(
        "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def _response_format(body: dict[str, Any]) -> tuple[str, Any]:
    """(kind, schema): kind is text, json_object or json_schema."""
    raw = body.get("response_format")
    if raw is None:
        return "text", None
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise ChatRequestError(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format"
        )
    if raw["type"] != "json_schema":
        return str(raw["type"]), None
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ChatRequestError("'response_format.json_schema.name' is required", "response_format.json_schema")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise ChatRequestError("'response_format.json_schema.schema' must be an object", "response_format")
    return ("json_schema", schema) if schema else ("json_object", None)


def _n_and_logprobs(body: dict[str, Any]) -> tuple[int, int | None]:
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= _MAX_N:
        raise ChatRequestError(f"'n' must be an integer from 1 to {_MAX_N}", "n")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ChatRequestError("'logprobs' must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise ChatRequestError(f"'top_logprobs' must be an integer from 0 to {_MAX_TOP_LOGPROBS}", "top_logprobs")
        if logprobs is not True:
            raise ChatRequestError("'logprobs' must be true when 'top_logprobs' is set", "top_logprobs")
    if logprobs is not True:
        return n, None
    return n, top or 0


# ----------------------------------------------------------------------- plan


def _tool_results(messages: list[Any]) -> list[str]:
    """Texts of the ``tool`` messages that end the conversation (empty: it does not end so)."""
    results: list[str] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        results.append(content_text(message.get("content")))
    return results[::-1]


def tool_result_reply(name: str, results: list[str]) -> str:
    words = " ".join(results).split()
    snippet = " ".join(words[:_RESULT_WORDS]) + (" ..." if len(words) > _RESULT_WORDS else "")
    return f"[simulated {name}] Based on the tool result: {snippet or '(empty)'}"


def _json_text(kind: str, schema: Any, echo: str, prompt: str) -> str:
    if kind == "json_schema":
        return json.dumps(SchemaValues(schema, prompt).value(), ensure_ascii=False)
    return json.dumps({"answer": echo}, ensure_ascii=False)


def _calls(chosen: list[Tool], arguments: list[str], max_tokens: int | None) -> tuple[tuple[ToolCall, ...], str, int]:
    """Tool calls for one choice: (calls, finish_reason, tokens), arguments cut at ``max_tokens``."""
    calls: list[ToolCall] = []
    used = 0
    finish = "tool_calls"
    for tool, args in zip(chosen, arguments, strict=True):
        tokens = encode(args)
        if max_tokens is not None and used + len(tokens) > max_tokens:
            tokens = tokens[: max_tokens - used]
            finish = "length"
        parts = pieces(tokens)
        calls.append(ToolCall(call_id("call_"), tool.name, "".join(parts), parts))
        used += len(tokens)
        if finish == "length":
            break
    return tuple(calls), finish, used


def plan_chat(
    body: dict[str, Any],
    *,
    name: str,
    prompt_tokens: int,
    echo: str,
    fault_text: str | None,
    max_tokens: int | None,
    stops: tuple[str, ...],
) -> ChatPlan:
    """Plan the answer to a validated chat request; raises ChatRequestError for a bad one.

    ``prompt_tokens`` and ``echo`` are the plain path's figures for the messages.
    """
    n, top = _n_and_logprobs(body)
    tools = _tools(body)
    mode, forced, callable_tools = _tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ChatRequestError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    kind, schema = _response_format(body)

    messages: list[Any] = body["messages"]
    prompt = last_user_text(messages)
    results = _tool_results(messages)
    if body.get("tools"):
        prompt_tokens += count(json.dumps(body["tools"]))
    if schema is not None:
        prompt_tokens += count(json.dumps(schema))

    chosen: list[Tool] = []
    if mode != "none" and (mode != "auto" or not results):
        chosen = choose_tools(callable_tools, prompt, mode, forced=forced, parallel=parallel is not False)
    choices: list[Choice] = []
    if chosen:
        arguments = [arguments_json(tool, prompt) for tool in chosen]
        for _ in range(n):
            calls, finish, used = _calls(chosen, arguments, max_tokens)
            choices.append(Choice(None, calls, finish, used))
    else:
        if fault_text is not None:
            text = fault_text
        elif kind != "text":
            text = _json_text(kind, schema, f"[simulated {name}] {echo}", prompt)
        elif results:
            text = tool_result_reply(name, results)
        else:
            text = f"[simulated {name}] {echo}"
        answer = make_answer(text, max_tokens, stops)
        choices = [Choice(answer, (), FINISH[answer.finish], answer.n_tokens)] * n
    return ChatPlan(prompt_tokens, tuple(choices), top)


# ------------------------------------------------------------------- output


def _logprobs(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": content, "refusal": None}


def _tool_calls_json(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def response_choices(plan: ChatPlan) -> list[dict[str, Any]]:
    """The ``choices`` of a non-streamed completion."""
    out: list[dict[str, Any]] = []
    for index, choice in enumerate(plan.choices):
        message: dict[str, Any]
        logprobs: dict[str, Any] | None = None
        if choice.answer is not None:
            message = {"role": "assistant", "content": choice.answer.text}
            if plan.top_logprobs is not None:
                logprobs = _logprobs(logprob_entries(choice.answer.tokens, 0, plan.top_logprobs))
        else:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls_json(choice.calls)}
            if plan.top_logprobs is not None:
                logprobs = _logprobs([])
        out.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return out


Delta = tuple[int, dict[str, Any], dict[str, Any] | None, str | None]
"""(choice index, delta, logprobs, finish_reason) of one stream chunk."""


def _choice_deltas(index: int, choice: Choice, top: int | None) -> list[Delta]:
    deltas: list[Delta] = []
    if choice.answer is not None:
        deltas.append((index, {"role": "assistant", "content": ""}, None, None))
        position = 0
        for text, tokens in token_groups(choice.answer.tokens):
            logprobs = None
            if top is not None:
                logprobs = _logprobs(logprob_entries(tokens, position, top))
                position += len(tokens)
            if text or logprobs is not None:
                deltas.append((index, {"content": text}, logprobs, None))
    else:
        for k, call in enumerate(choice.calls):
            head = {
                "index": k,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            first: dict[str, Any] = {"role": "assistant", "content": None} if k == 0 else {}
            first["tool_calls"] = [head]
            deltas.append((index, first, None, None))
            for piece in call.pieces:
                deltas.append((index, {"tool_calls": [{"index": k, "function": {"arguments": piece}}]}, None, None))
    return deltas


def stream_rounds(plan: ChatPlan) -> list[list[Delta]]:
    """The stream's chunks in rounds: round r holds every choice's r-th delta (OpenAI
    interleaves the choices of ``n`` > 1); the last round holds the finish chunks."""
    per_choice = [_choice_deltas(i, c, plan.top_logprobs) for i, c in enumerate(plan.choices)]
    longest = max(len(d) for d in per_choice)
    rounds = [[d[r] for d in per_choice if r < len(d)] for r in range(longest)]
    rounds.append([(i, {}, None, c.finish_reason) for i, c in enumerate(plan.choices)])
    return rounds
