"""An OpenAI-compatible upstream inside the test process, served through ``httpx.MockTransport``.

It answers ``/v1/chat/completions`` as vLLM does (usage in the body, SSE with an
optional usage chunk and ``data: [DONE]``), records every call, and fails on request:
``fail(model, status, times)`` queues error statuses with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from gateway.config.loader import load_policy_text
from gateway.upstreams.base import Provider
from gateway.upstreams.registry import Transport, build_provider

__all__ = ["FakeUpstream", "pair_provider"]


class FakeUpstream:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._failures: dict[str, deque[tuple[int, dict[str, str]]]] = defaultdict(deque)
        self.transport = httpx.MockTransport(self._handle)
        self.usage: dict[str, Any] | None = None
        """When set, the usage every answer reports (as a provider with prompt caching would)."""
        self.ending: tuple[str, str | None] | None = None
        """When set, every answer's text and finish_reason (a content filter's empty stop, a
        stream that never says why it ended)."""
        self.delay_s = 0.0
        """How long each call waits before it answers (so identical requests overlap)."""
        self.omit_done = False
        """Streams end without ``data: [DONE]`` (some OpenAI-compatible servers close after the finish)."""
        self.on_call: Callable[[], None] | None = None
        """When set, run on every call before it answers (a test's clock moved on while it thinks)."""

    def fail(self, model: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        self._failures[model].extend([(status, headers or {})] * times)

    def calls_to(self, model: str) -> int:
        return sum(1 for call in self.calls if call["model"] == model)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        self.calls.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.on_call is not None:
            self.on_call()
        model = body["model"]
        if self._failures[model]:
            status, headers = self._failures[model].popleft()
            param = "messages" if status == 400 else None  # as OpenAI names what it refused
            error = {"error": {"message": f"{model} is failing", "type": "server_error", "param": param, "code": None}}
            return httpx.Response(status, json=error, headers=headers)
        text, finish = self.ending or (f"{model} says: {_last_user_text(body)[::-1]}", "stop")
        prompt_tokens, completion_tokens = len(json.dumps(body["messages"]).split()), len(text.split())
        usage = self.usage or {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _events(model, text, finish, usage if include_usage else None, done=not self.omit_done)
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events)
        completion = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        }
        return httpx.Response(200, json=completion)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body["messages"]):
        if message["role"] == "user":
            content = message["content"]
            return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)
    return ""


async def _events(
    model: str, text: str, finish: str | None, usage: dict[str, int] | None, *, done: bool = True
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for word in text.split(" ") if text else ():
        yield chunk({"content": word + " "})
    yield chunk({}, finish)
    if usage is not None:
        tail = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [], "usage": usage}  # fmt: skip
        yield b"data: " + json.dumps(tail).encode() + b"\n\n"
    if done:
        yield b"data: [DONE]\n\n"


_PAIR = """
pair: {small: small, large: large}
models:
  small: {base_url: "http://small.test/v1", price: {input: 1, output: 1}, tier: small}
  large: {base_url: "http://large.test/v1", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: small}}
auth: {mode: none}
"""


def pair_provider(model: str, transport: Transport) -> Provider:
    """``small`` or ``large`` of a plain OpenAI-compatible pair (at ``http://{model}.test/v1``), through ``transport``."""
    policy = load_policy_text(_PAIR, environ={}).policy
    return build_provider(model, policy.models[model], {}, transport)
