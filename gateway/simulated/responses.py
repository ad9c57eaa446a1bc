"""The simulator's OpenAI Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``).

It behaves as OpenAI's server does where a gateway can tell: the request is read as
OpenAI reads it (hosted and custom tools are accepted and simply never called here);
``store`` (the default) keeps the turn, and ``previous_response_id`` continues it or is
a 400 ``previous_response_not_found``; stored turns are per API key (per organisation
at OpenAI), so one key cannot read another's. The answer is the simulated chat answer
to the same conversation, encoded by the gateway's own Responses codec. A continued
conversation reports the earlier turns' tokens as cached once they reach 1,024, in
steps of 128, as OpenAI's automatic prompt caching does.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.core.model import Answer, Delta, Finish, Message, TextDelta, ToolArgumentsDelta, ToolCallStart, Usage
from gateway.errors import InvalidRequestError
from gateway.protocols import openai_chat
from gateway.protocols import openai_responses as codec

__all__ = ["ResponsesRequestError", "SimulatedTurn", "TurnStore", "plan_turn", "stream_deltas"]

_PROMPT_CACHE_MIN_TOKENS = 1024
_PROMPT_CACHE_STEP = 128


class ResponsesRequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(slots=True)
class SimulatedTurn:
    """A request read and ready to answer: its chat form and what the answer needs."""

    decoded: codec.ResponsesRequest
    chat: dict[str, Any]
    """The conversation as a chat request (earlier turns first): what the simulated model answers."""
    history: list[Message]
    history_chat: list[dict[str, Any]]
    """The earlier turns as chat messages, for the cached-token count."""


@dataclass(slots=True)
class TurnStore:
    """Stored turns by API key: the response object and the conversation up to it."""

    turns: dict[tuple[str, str], tuple[dict[str, Any], list[Message]]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    run: str = field(default_factory=lambda: secrets.token_hex(6))
    """This server's own part of its ids: unique across servers, as a real upstream's ids are (two
    simulators numbering from 1 gave one id to two tenants' responses where they shared a Redis)."""

    def new_id(self) -> str:
        return f"resp_sim{self.run}{next(self.ids):06d}"

    def keep(self, key: str, response: dict[str, Any], messages: list[Message]) -> None:
        self.turns[(key, response["id"])] = (response, messages)

    def get(self, key: str, response_id: str) -> tuple[dict[str, Any], list[Message]] | None:
        return self.turns.get((key, response_id))

    def delete(self, key: str, response_id: str) -> bool:
        return self.turns.pop((key, response_id), None) is not None


def plan_turn(raw: bytes, store: TurnStore, key: str) -> SimulatedTurn:
    """Read a request; :class:`ResponsesRequestError` for what OpenAI would refuse."""
    try:
        decoded = codec.decode_request(raw, passed_through=True)
    except InvalidRequestError as exc:
        raise ResponsesRequestError(400, exc.message, exc.param) from None
    history: list[Message] = []
    if decoded.previous_response_id is not None:
        stored = store.get(key, decoded.previous_response_id)
        if stored is None:
            raise ResponsesRequestError(
                400,  # OpenAI's status for it (t60), which clients act on with the code
                f"Previous response with id '{decoded.previous_response_id}' not found.",
                "previous_response_id",
                "previous_response_not_found",
            )
        history = stored[1]
    try:
        chat = openai_chat.to_chat_body(codec.to_request(decoded, history))
    except InvalidRequestError as exc:
        raise ResponsesRequestError(400, exc.message, exc.param) from None
    chat.pop("stream", None)
    chat.pop("stream_options", None)
    earlier = msgspec.structs.replace(decoded.request, messages=history, tools=[])
    history_chat = openai_chat.to_chat_body(earlier)["messages"] if history else []
    return SimulatedTurn(decoded, chat, history, history_chat)


def cached_tokens(history_tokens: int) -> int:
    if history_tokens < _PROMPT_CACHE_MIN_TOKENS:
        return 0
    return history_tokens - history_tokens % _PROMPT_CACHE_STEP


def with_cache(usage: Usage, history_tokens: int) -> Usage:
    return msgspec.structs.replace(usage, cached_input_tokens=min(usage.input_tokens, cached_tokens(history_tokens)))


def stream_deltas(answer: Answer) -> list[list[Delta]]:
    """The answer as rounds of deltas, one word of text or one call's start and arguments per round."""
    rounds: list[list[Delta]] = []
    text = answer.text or ""
    words = text.split(" ")
    for position, word in enumerate(words if text else ()):
        rounds.append([TextDelta(word if position == 0 else " " + word)])
    for index, call in enumerate(answer.tool_calls):
        rounds.append([ToolCallStart(index, call.id, call.name)])
        half = len(call.arguments) // 2
        rounds.append(
            [ToolArgumentsDelta(index, call.arguments[:half]), ToolArgumentsDelta(index, call.arguments[half:])]
        )
    if answer.finish_reason is not None:
        rounds.append([Finish(answer.finish_reason)])
    return rounds
