"""Stop strings the gateway applies itself, met by clients of the official SDKs (t58).

An upstream that refuses ``stop`` (OpenAI's reasoning models) or a stop of whitespace alone
(Anthropic) writes on past the string: the client's stream ends at the cut, or waits for the usage
it asked for with keep-alives its SDK skips, and the upstream is read to its end all the same, for
the bill. The loopback upstream here writes the cut text, then holds until the test lets it go.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import msgspec
import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, policy_text, start_gateway
from tests.loopback_app import serve_app, write_sse

_WRITTEN = 5000
"""The output tokens the upstream says it wrote: the cut text and all it wrote past it."""

_MODELS = """  reasoner6:
    base_url: {url}/v1
    upstream_model: o4-mini
    tier: large
    price: {{input: 1, output: 10}}
    max_connections: 6
    timeouts: {{connect: 2, first_byte: 10, total: 20, idle: 20}}
  reasoner1:
    base_url: {url}/v1
    upstream_model: o4-mini
    tier: large
    price: {{input: 1, output: 10}}
    max_connections: 1
    timeouts: {{connect: 2, first_byte: 10, total: 20, idle: 20}}
  reasoner:
    base_url: {url}/v1
    upstream_model: o4-mini
    tier: large
    price: {{input: 1, output: 10}}
    timeouts: {{connect: 2, first_byte: 10, total: 20, idle: 20}}
  claude45:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-sonnet-4-5
    tier: large
    price: {{input: 3, output: 15}}
    timeouts: {{connect: 2, first_byte: 10, total: 20, idle: 20}}
"""


@dataclass
class HeldUpstream:
    """OpenAI's reasoning model and Anthropic's Messages API: each streamed answer says its cut
    text, then holds until :meth:`release` for the prompt (Anthropic's tool answer does not)."""

    url: str = ""
    loop: asyncio.AbstractEventLoop | None = None
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)

    def release(self, prompt: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._gate(prompt).set)

    def _gate(self, prompt: str) -> asyncio.Event:
        return self.gates.setdefault(prompt, asyncio.Event())


async def _openai(request: web.Request, upstream: HeldUpstream) -> web.StreamResponse:
    body = await request.json()
    if body.get("stop") is not None:  # OpenAI's own words for a reasoning model
        error = {"message": "Unsupported parameter: 'stop' is not supported with this model.", "param": "stop",
                 "type": "invalid_request_error", "code": "unsupported_parameter"}  # fmt: skip
        return web.json_response({"error": error}, status=400)
    prompt = body["messages"][-1]["content"]
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-held", "object": "chat.completion.chunk", "created": 1, "model": "o4-mini",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    await write_sse(response, chunk({"role": "assistant", "content": ""}))
    await write_sse(response, chunk({"content": "Thought: look\nObservation: made up"}))
    if prompt.startswith("BREAK"):  # a broken event past the cut, and the end
        await write_sse(response, b"not json")
        return response
    await upstream._gate(prompt).wait()
    upstream.finished.add(prompt)  # before the end is written: a client that has it may look at once
    await write_sse(response, chunk({"content": " and more"}, "stop"))
    usage = {"prompt_tokens": 11, "completion_tokens": _WRITTEN, "total_tokens": 11 + _WRITTEN}
    await write_sse(response, {"id": "chatcmpl-held", "object": "chat.completion.chunk", "created": 1,
                          "model": "o4-mini", "choices": [], "usage": usage})  # fmt: skip
    await write_sse(response, b"[DONE]")
    return response


_TOOL_ANSWER: list[dict[str, Any]] = [
    {"type": "text", "text": "Let me check."},
    {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
    {"type": "text", "text": "Done."},
]
"""Claude's text, a call, and text again: the model wrote no newline."""


async def _anthropic(request: web.Request, upstream: HeldUpstream) -> web.StreamResponse:
    body = await request.json()
    if any(not stop.strip() for stop in body.get("stop_sequences") or ()):
        error = {
            "type": "invalid_request_error",
            "message": "stop_sequences: each stop sequence must contain non-whitespace",
        }
        return web.json_response({"type": "error", "error": error}, status=400)
    prompt = body["messages"][-1]["content"]
    prompt = prompt if isinstance(prompt, str) else prompt[0]["text"]
    tools = prompt.startswith("TOOLS")
    blocks: list[dict[str, Any]] = [dict(b) for b in _TOOL_ANSWER] if tools else [{"type": "text", "text": "one\ntwo"}]
    if prompt.endswith("LATER"):  # a stop the model did write, in the text after the call
        blocks[2]["text"] = "Done.\nLater."
    reason = "tool_use" if tools else "end_turn"
    usage = {"input_tokens": 12, "output_tokens": _WRITTEN}
    if not body.get("stream"):
        return web.json_response({"id": "msg_held", "type": "message", "role": "assistant", "model": body["model"],
                                  "content": blocks, "stop_reason": reason, "stop_sequence": None, "usage": usage})  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {"id": "msg_held", "type": "message", "role": "assistant", "model": body["model"], "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}  # fmt: skip
    await write_sse(response, {"type": "message_start", "message": start}, "message_start")
    for index, block in enumerate(blocks):
        opening = {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}}
        await write_sse(
            response, {"type": "content_block_start", "index": index, "content_block": opening}, "content_block_start"
        )
        if block["type"] == "text":
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            delta = {"type": "input_json_delta", "partial_json": msgspec.json.encode(block["input"]).decode()}
        await write_sse(
            response, {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
        )
        await write_sse(response, {"type": "content_block_stop", "index": index}, "content_block_stop")
    if not tools:
        await upstream._gate(prompt).wait()
    upstream.finished.add(prompt)  # before the end is written: a client that has it may look at once
    ending = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": usage}
    await write_sse(response, ending, "message_delta")
    await write_sse(response, {"type": "message_stop"}, "message_stop")
    return response


@pytest.fixture(scope="module")
def held_upstream() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _openai(request, upstream)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _anthropic(request, upstream)

    with serve_app({"/v1/chat/completions": chat, "/v1/messages": messages}, name="held-upstream") as served:
        upstream.loop, upstream.url = served.loop, served.url
        try:
            yield upstream
        finally:
            for gate in list(upstream.gates.values()):  # nothing is left holding
                served.loop.call_soon_threadsafe(gate.set)


def _start(
    workdir: Path, held: HeldUpstream, redis: EmbeddedRedis, small: SimulatedUpstream, large: SimulatedUpstream
) -> GatewayProcess:
    policy = policy_text(small, large, extra_models=_MODELS.format(url=held.url))
    return start_gateway(workdir, policy, env={"REDIS_URL": redis.url, "TEST_LARGE_KEY": "k"})


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    held_upstream: HeldUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    process = _start(tmp_path_factory.mktemp("stopcut"), held_upstream, redis_server, small_upstream, large_upstream)
    yield process
    process.stop()


def _prompt(tag: str = "") -> str:
    return f"{tag}{uuid.uuid4().hex}"


class _ReleaseOnKeepAlive:
    """An SDK's own connection (``http``: its httpx module), which lets the upstream go once a
    keep-alive (``marker``) reached the client after the answer's text (``after``)."""

    def __init__(self, http: Any, marker: bytes, after: bytes, release: Callable[[], None]) -> None:
        self.seen = 0
        spy, inner, read = self, http.HTTPTransport(), bytearray()

        class Spied(http.SyncByteStream):  # type: ignore[misc]
            def __init__(self, stream: Any) -> None:
                self._stream = stream

            def __iter__(self) -> Iterator[bytes]:
                for piece in self._stream:
                    read.extend(piece)
                    if not spy.seen and after in read and marker in read[read.index(after) :]:
                        spy.seen += 1
                        release()
                    yield piece

            def close(self) -> None:
                self._stream.close()

        class Transport(http.BaseTransport):  # type: ignore[misc]
            def handle_request(self, request: Any) -> Any:
                response = inner.handle_request(request)
                response.stream = Spied(response.stream)
                return response

            def close(self) -> None:
                inner.close()

        self.client = http.Client(transport=Transport(), timeout=30)


def test_a_stream_ends_at_the_cut_while_the_upstream_writes_on(
    gateway: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """The finish chunk, then [DONE] at once: the SDK's stream ends (t58: silence until the model
    finished, and an SDK read timeout failed the complete answer). The log line has the upstream's
    usage once it is done."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    prompt = _prompt()
    raw = oai.chat.completions.with_raw_response.create(
        model="reasoner", messages=[{"role": "user", "content": prompt}], stop=["Observation:"], stream=True
    )
    chunks, request_id = list(raw.parse()), raw.headers["x-request-id"]
    assert prompt not in held_upstream.finished  # the client has its [DONE]: the upstream is still held
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Thought: look\n"
    finishes = [(c.choices[0].finish_reason, (c.choices[0].model_extra or {}).get("stop_reason")) for c in chunks if c.choices and c.choices[0].finish_reason]  # fmt: skip
    assert finishes == [("stop", "Observation:")]
    held_upstream.release(prompt)
    record = gateway.wait_for_record(request_id, timeout_s=30)
    assert (record["status"], record["completion_tokens"], record["tokens_source"]) == (200, _WRITTEN, "upstream")
    assert record["finish_reason"] == "stop"


def test_a_client_that_leaves_at_the_cut_is_billed_the_upstreams_usage(
    gateway: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """t58: a client that closed once it saw the finish was logged with the gateway's count of the
    cut text (4 tokens), not the 5000 the upstream wrote and bills."""
    prompt = _prompt()
    body = {
        "model": "reasoner",
        "messages": [{"role": "user", "content": prompt}],
        "stop": "Observation:",
        "stream": True,
    }
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if '"finish_reason":"stop"' in line:
                break  # and the connection is closed
    held_upstream.release(prompt)
    record = gateway.wait_for_record(request_id, timeout_s=30)
    assert (record["completion_tokens"], record["tokens_source"]) == (_WRITTEN, "upstream")
    assert record["finish_reason"] == "stop"


def test_a_chat_client_that_asked_for_the_usage_waits_for_it_with_keep_alives(
    gateway: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """SSE comments, which the openai SDK skips, until the upstream's usage comes."""
    prompt = _prompt()
    spy = _ReleaseOnKeepAlive(httpx, b": keep-alive", b"Observation:", lambda: held_upstream.release(prompt))
    client = closed_after_test(spy.client)
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, http_client=client))
    chunks = list(
        oai.chat.completions.create(
            model="reasoner",
            messages=[{"role": "user", "content": prompt}],
            stop=["Observation:"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert spy.seen and prompt in held_upstream.finished
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Thought: look\n"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == _WRITTEN


def test_a_messages_client_waits_for_the_usage_with_pings(gateway: GatewayProcess, held_upstream: HeldUpstream) -> None:
    """A reasoning model, which refuses ``stop``, writes on past the cut: the Messages client is
    sent Anthropic's ``ping`` events, which its SDK reads past, until the usage of its
    ``message_delta`` comes. (A Messages client's stop of whitespace alone, which the gateway
    applied for Claude, is Anthropic's 400: f222.)"""
    prompt = _prompt()
    spy = _ReleaseOnKeepAlive(httpx2, b"event: ping", b"text_delta", lambda: held_upstream.release(prompt))
    client = closed_after_test(spy.client)
    claude = closed_after_test(
        anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0, http_client=client)
    )
    with claude.messages.stream(
        # room for all the upstream says it wrote (t103: more than max_tokens is no true count)
        model="reasoner",
        max_tokens=_WRITTEN,
        messages=[{"role": "user", "content": prompt}],
        stop_sequences=["Observation:"],
    ) as events:
        final = events.get_final_message()
    assert spy.seen and prompt in held_upstream.finished
    assert [(b.type, getattr(b, "text", None)) for b in final.content] == [("text", "Thought: look\n")]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Observation:")
    assert final.usage.output_tokens == _WRITTEN


_LOOKUP: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def test_a_newline_stop_does_not_match_the_line_the_gateway_starts_text_after_a_call_with(
    gateway: GatewayProcess,
) -> None:
    """t58: Claude's text, a call, and text again came joined with a "\\n" the model never wrote;
    ``stop: ["\\n"]`` cut there, and the call was lost (streamed: told ``stop``, not ``tool_calls``)."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    ask: Any = [{"role": "user", "content": _prompt("TOOLS")}]
    whole = oai.chat.completions.create(model="claude45", messages=ask, tools=_LOOKUP, stop=["\n"])
    message = whole.choices[0].message
    assert message.content == "Let me check.\nDone."
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or [] if c.type == "function"]
    assert calls == [("lookup", '{"q":"x"}')]
    assert whole.choices[0].finish_reason == "tool_calls"
    chunks = list(oai.chat.completions.create(model="claude45", messages=ask, tools=_LOOKUP, stop=["\n"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check.\nDone."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_call_made_before_the_stop_is_kept_streamed_or_not(gateway: GatewayProcess) -> None:
    """t58: the stop in text after a call cut the whole answer's call, while a stream had sent it."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    ask: Any = [{"role": "user", "content": _prompt("TOOLS") + "LATER"}]
    whole = oai.chat.completions.create(model="claude45", messages=ask, tools=_LOOKUP, stop=["\n"])
    chunks = list(oai.chat.completions.create(model="claude45", messages=ask, tools=_LOOKUP, stop=["\n"], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or [] if t.function and t.function.name]  # fmt: skip
    finishes = [(c.choices[0].finish_reason, (c.choices[0].model_extra or {}).get("stop_reason")) for c in chunks if c.choices and c.choices[0].finish_reason]  # fmt: skip
    assert whole.choices[0].message.content == streamed == "Let me check.\nDone."
    made = [c.function.name for c in whole.choices[0].message.tool_calls or [] if c.type == "function"]
    assert made == calls == ["lookup"]
    assert finishes == [("stop", "\n")]
    assert (whole.choices[0].finish_reason, (whole.choices[0].model_extra or {}).get("stop_reason")) == ("stop", "\n")


def test_an_upstream_read_past_its_client_is_billed_before_the_worker_exits(
    tmp_path: Path,
    held_upstream: HeldUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> None:
    """The rest of a cut stream is read by the gateway, not the client's request: at SIGTERM the
    worker waits for it (up to its drain deadline) before the bill and the log close."""
    process = _start(tmp_path, held_upstream, redis_server, small_upstream, large_upstream)
    try:
        oai = closed_after_test(openai.OpenAI(base_url=process.base_url, api_key="x", max_retries=0))
        prompt = _prompt()
        raw = oai.chat.completions.with_raw_response.create(
            model="reasoner", messages=[{"role": "user", "content": prompt}], stop=["Observation:"], stream=True
        )
        chunks, request_id = list(raw.parse()), raw.headers["x-request-id"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        process.send_signal(signal.SIGTERM)
        _until_closed(process)  # the server has stopped: the worker is on its way out
        held_upstream.release(prompt)
        assert process.process.wait(30) == 0
        (record,) = [r for r in process.log_records() if r["request_id"] == request_id]
        assert (record["completion_tokens"], record["tokens_source"]) == (_WRITTEN, "upstream")
    finally:
        process.stop()


def test_a_whole_answer_waiting_for_its_usage_at_the_drain_deadline_ends_with_the_usage(
    tmp_path: Path,
    held_upstream: HeldUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> None:
    """t68: at the drain deadline, a client that had its whole answer and waited for the usage
    got an in-band ``shutting_down`` error (the SDK raised ``APIError`` after the text and the
    finish), and the request was logged 503. It ends as a read cut short by ``past_stop`` does:
    the usage the gateway bills, ``[DONE]``, status 200, and ``stream_usage_unread``."""
    policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=held_upstream.url))
    env = {"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"}
    process = start_gateway(tmp_path, policy, env=env, serve_args=("--drain-s", "1"))
    try:
        oai = closed_after_test(openai.OpenAI(base_url=process.base_url, api_key="x", max_retries=0, timeout=30))
        raw = oai.chat.completions.with_raw_response.create(
            model="reasoner",
            messages=[{"role": "user", "content": _prompt()}],
            stop=["Observation:"],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = []
        for chunk in raw.parse():  # the upstream is held past the cut until the drain deadline
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].finish_reason:
                process.send_signal(signal.SIGTERM)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _CUT
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == _counted(_CUT)
        assert process.process.wait(30) == 0
        request_id = raw.headers["x-request-id"]
        (record,) = [r for r in process.log_records() if r["request_id"] == request_id]
        assert (record["status"], record["error_type"], record["finish_reason"]) == (200, None, "stop")
        assert (record["tokens_source"], record["completion_tokens"]) == ("gateway", _counted(_CUT))
        assert _unread(process, request_id) == ["drain_deadline"]
    finally:
        process.stop()


def _until_closed(process: GatewayProcess) -> None:
    for _ in range(300):
        try:
            httpx.get(process.url + "/healthz", timeout=1)
        except httpx.TransportError:
            return
        threading.Event().wait(0.1)
    raise AssertionError("the gateway went on accepting after SIGTERM")


# -- t65: what a cut stream's read past its client's answer may hold, and how it is told --------

_CUT = "Thought: look\n"
"""The answer at the cut."""


@pytest.fixture
def guarded(
    tmp_path: Path,
    held_upstream: HeldUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    """The exact cache on, and the (anonymous) tenant held to 2 requests in flight."""
    policy = policy_text(
        small_upstream,
        large_upstream,
        extra_models=_MODELS.format(url=held_upstream.url),
        cache="{enabled: true, redis_timeout_ms: 2000, semantic: {enabled: false}}",
    )
    policy += "\ntenants:\n  default: {limits: {max_concurrent: 2}}\n"
    process = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"})
    yield process
    process.stop()


def _cut_stream(gateway: GatewayProcess, prompt: str, model: str = "reasoner", **extra: Any) -> tuple[str, list[Any]]:
    """A cut stream read to its end by an openai SDK client: its request id and chunks."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=30))
    raw = oai.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stop=["Observation:"],
        stream=True,
        temperature=0,
        **extra,
    )
    return raw.headers["x-request-id"], list(raw.parse())


def _unread(gateway: GatewayProcess, request_id: str, expect: bool = True) -> list[str]:
    """The ``stream_usage_unread`` reasons of one request. The warning follows its request line,
    so where one is expected it is waited for (a loaded machine read the file between the two)."""
    deadline = time.monotonic() + (30 if expect else 0)
    while True:
        said = [e["reason"] for e in gateway.ops_records("stream_usage_unread") if e["request_id"] == request_id]
        if said or time.monotonic() >= deadline:
            return said
        time.sleep(0.02)


def _counted(text: str) -> int:
    from gateway.tokens import count_text

    return count_text(text, "cl100k_base")


_KEYS = """
auth:
  mode: keys
  keys:
    - {id: one, tenant: agents, hash: "%(one)s", limits: {max_concurrent: 1, usd_per_day: 0.07}}
    - {id: two, tenant: agents, hash: "%(two)s", limits: {max_concurrent: 1}}
    - {id: three, tenant: loopers, hash: "%(three)s"}
tenants:
  loopers: {limits: {max_concurrent: 1}}
""" % {name: hash_key(f"key-{name}") for name in ("one", "two", "three")}
"""Two keys of one tenant, each allowed one request in flight; ``one``'s day budget takes a cut
stream's estimate, and not that of a request asking for the model's whole window. A key of
another tenant, held to one request in flight by its tenant alone."""


@pytest.fixture
def keyed(
    tmp_path: Path,
    held_upstream: HeldUpstream,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    """The exact cache on, and the keys of :data:`_KEYS` (tenants of their own in the shared Redis)."""
    suffix = uuid.uuid4().hex[:8]
    policy = policy_text(
        small_upstream,
        large_upstream,
        auth=_KEYS.replace("agents", f"agents{suffix}").replace("loopers", f"loopers{suffix}"),
        extra_models=_MODELS.format(url=held_upstream.url),
        cache="{enabled: true, redis_timeout_ms: 2000, semantic: {enabled: false}}",
    )
    process = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"})
    yield process
    process.stop()


def _keyed_cut(gateway: GatewayProcess, key: str, prompt: str, model: str = "reasoner") -> str:
    """A cut stream of ``key`` read to its end: its request id."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=30))
    raw = oai.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], stop=["Observation:"], stream=True
    )
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _CUT
    return raw.headers["x-request-id"]


def test_a_keys_other_requests_neither_wait_on_nor_end_its_read_past_the_cut(
    keyed: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """t68: the read past the cut held the key's place under ``max_concurrent: 1``, and the key's
    next request took it, ending the read, even when that request was then refused or a cache
    hit: an agent loop was billed the cut text of 4 turns in 5 (10 tokens for the upstream's
    5,000). The client has its whole answer at the cut: the read no longer holds the key's
    place, and nothing the key asks ends it, nor does another key's cut stream."""
    read = _prompt()
    read_id = _keyed_cut(keyed, "one", read)
    oai = closed_after_test(openai.OpenAI(base_url=keyed.base_url, api_key="key-one", max_retries=0, timeout=30))
    claude = closed_after_test(anthropic.Anthropic(base_url=keyed.url, api_key="key-one", max_retries=0))
    with pytest.raises(anthropic.BadRequestError):  # fast mode, which the model has no price for
        claude.messages.create(
            model="claude45", max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_body={"speed": "fast"}
        )
    with pytest.raises(openai.RateLimitError) as over:  # its whole window is over the key's day budget
        oai.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": "hi"}], max_tokens=8192)
    assert over.value.code == "request_too_large_for_budget"  # no retry can pass (t200)
    asked: Any = [{"role": "user", "content": _prompt()}]
    assert oai.chat.completions.create(model="small", messages=asked).choices[0].message.content
    hit = oai.chat.completions.with_raw_response.create(model="small", messages=asked)
    assert hit.headers["x-gateway-cache"] == "exact"
    other = _prompt()
    other_id = _keyed_cut(keyed, "two", other)  # the tenant's other key, at its own cap of one
    held_upstream.release(read)
    held_upstream.release(other)
    for request_id in (read_id, other_id):
        record = keyed.wait_for_record(request_id, timeout_s=30)
        assert (record["status"], record["tokens_source"], record["completion_tokens"]) == (200, "upstream", _WRITTEN)
        assert _unread(keyed, request_id, expect=False) == []


@pytest.mark.parametrize("key", ["two", "three"])
def test_an_agent_loop_under_max_concurrent_one_is_billed_every_turn(
    keyed: GatewayProcess, held_upstream: HeldUpstream, key: str
) -> None:
    """t71: a key's reads past the cut were held to its ``max_concurrent`` (or its tenant's), so
    each cut turn of an agent loop under a cap of one ended the previous turn's read: 4 turns in 5
    were billed the cut text, and a capped key paid less than an uncapped one. Reads are bounded
    by the model's pool alone: a key capped by itself (``two``) or by its tenant (``three``)
    is billed every turn's upstream usage."""
    turns = [_prompt() for _ in range(5)]
    request_ids = [_keyed_cut(keyed, key, prompt) for prompt in turns]  # each upstream still writing
    assert not held_upstream.finished.intersection(turns)
    for prompt in turns:
        held_upstream.release(prompt)
    for request_id in request_ids:
        record = keyed.wait_for_record(request_id, timeout_s=30)
        assert (record["status"], record["tokens_source"], record["completion_tokens"]) == (200, "upstream", _WRITTEN)
        assert _unread(keyed, request_id, expect=False) == []


def test_a_model_of_one_connection_reads_nothing_past_the_cut(
    keyed: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """t71: half of ``max_connections: 1`` was taken as one read, which held the only connection
    for up to ``past_stop`` after its client had gone: another tenant's request waited
    ``timeouts.connect`` and got 504 ``upstream_busy``. Such a model reads nothing past the cut:
    the upstream is let go there, billed on the cut text, and said so."""
    first, theirs = _prompt(), _prompt()
    first_id = _keyed_cut(keyed, "one", first, "reasoner1")
    theirs_id = _keyed_cut(keyed, "three", theirs, "reasoner1")  # answered on the one connection
    for request_id in (first_id, theirs_id):
        record = keyed.wait_for_record(request_id, timeout_s=30)
        assert (record["status"], record["tokens_source"], record["completion_tokens"]) == (
            200,
            "gateway",
            _counted(_CUT),
        )
        assert _unread(keyed, request_id) == ["no_read_allowance"]
    assert first not in held_upstream.finished and theirs not in held_upstream.finished


def test_a_tenant_over_its_share_of_reads_ends_its_own_oldest(
    keyed: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """t65, t71: a model's cut streams read on past their clients hold at most half its
    connections (3 of 6 here), and a tenant at most half of those (2): its new cut stream past
    that ends its own oldest read, never another tenant's; a tenant under its share finds the
    model's reads full and is let go at the cut. Either is billed on the cut text, and said so."""
    ours = [_prompt() for _ in range(3)]
    theirs, let_go = _prompt(), _prompt()
    ours_ids = [_keyed_cut(keyed, "one", ours[0], "reasoner6"), _keyed_cut(keyed, "two", ours[1], "reasoner6")]
    theirs_id = _keyed_cut(keyed, "three", theirs, "reasoner6")  # the model's third and last read
    let_go_id = _keyed_cut(keyed, "three", let_go, "reasoner6")
    ours_ids.append(_keyed_cut(keyed, "one", ours[2], "reasoner6"))  # past the tenant's share of 2
    for request_id, why in ((let_go_id, "too_many_reads"), (ours_ids[0], "too_many_tenant_reads")):
        record = keyed.wait_for_record(request_id, timeout_s=30)
        assert (record["status"], record["tokens_source"], record["completion_tokens"]) == (
            200,
            "gateway",
            _counted(_CUT),
        )
        assert _unread(keyed, request_id) == [why]
    assert ours[0] not in held_upstream.finished
    for prompt in (*ours, theirs, let_go):
        held_upstream.release(prompt)
    for request_id in (ours_ids[1], theirs_id, ours_ids[2]):
        record = keyed.wait_for_record(request_id, timeout_s=30)
        assert (record["tokens_source"], record["completion_tokens"]) == ("upstream", _WRITTEN)
        assert _unread(keyed, request_id, expect=False) == []


def test_a_cut_answer_is_stored_at_the_cut(guarded: GatewayProcess, held_upstream: HeldUpstream) -> None:
    """t65: the cache was filled, and the requests coalesced on the answer let go, only once the
    upstream had written on to its end. The answer is whole at the cut: the same request is a hit
    at once, with the tokens of the cut answer (the rest is the first request's bill alone)."""
    prompt = _prompt()
    first_id, _ = _cut_stream(guarded, prompt)
    again_id, chunks = _cut_stream(guarded, prompt)
    assert prompt not in held_upstream.finished
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _CUT
    hit = guarded.wait_for_record(again_id, timeout_s=30)
    assert (hit["cache"], hit["tokens_source"], hit["completion_tokens"]) == ("exact", "cache", _counted(_CUT))
    held_upstream.release(prompt)
    record = guarded.wait_for_record(first_id, timeout_s=30)
    assert (record["cache"], record["tokens_source"], record["completion_tokens"]) == ("miss", "upstream", _WRITTEN)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_cut_answer_is_cached_with_the_same_tokens_however_it_was_asked(
    guarded: GatewayProcess, held_upstream: HeldUpstream, streamed: bool
) -> None:
    """t68: a whole (not streamed) cut answer was stored with the upstream's usage, so its hits
    reported 5,000 completion tokens and saved the upstream's bill for a 1-token answer, while a
    streamed one was stored with the gateway's count of the cut text: savings differed 400 times
    over by how the first asker called. Both store the gateway's count of the cut answer."""
    oai = closed_after_test(openai.OpenAI(base_url=guarded.base_url, api_key="x", max_retries=0, timeout=30))
    asked: Any = [{"role": "user", "content": _prompt()}]
    if streamed:  # Claude writes on past a newline stop, held until released
        stream = oai.chat.completions.with_raw_response.create(
            model="claude45", messages=asked, stop=["\n"], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices) == "one"
        first_id = stream.headers["x-request-id"]
    else:
        whole = oai.chat.completions.with_raw_response.create(model="claude45", messages=asked, stop=["\n"])
        assert whole.parse().choices[0].message.content == "one"
        first_id = whole.headers["x-request-id"]
    hit = oai.chat.completions.with_raw_response.create(model="claude45", messages=asked, stop=["\n"])
    assert hit.headers["x-gateway-cache"] == "exact"
    usage = hit.parse().usage
    assert usage is not None and usage.completion_tokens == _counted("one")
    record = guarded.wait_for_record(hit.headers["x-request-id"], timeout_s=30)
    assert record["completion_tokens"] == _counted("one")
    prompt_tokens = record["prompt_tokens"]
    assert record["cache_saved_usd"] == pytest.approx((prompt_tokens * 3 + _counted("one") * 15) / 1_000_000)
    held_upstream.release(asked[0]["content"])
    asker = guarded.wait_for_record(first_id, timeout_s=30)
    assert (asker["tokens_source"], asker["completion_tokens"]) == ("upstream", _WRITTEN)  # its own bill


def test_a_cut_streams_latency_ends_with_its_clients_stream(
    gateway: GatewayProcess, held_upstream: HeldUpstream
) -> None:
    """t65: ``latency_ms`` and ``overhead_ms`` ran to the end of the read past the cut, not to
    the client's last byte: no more than the client itself waited, with or without the usage."""
    asks: list[dict[str, Any]] = [{}, {"stream_options": {"include_usage": True}}]
    for extra in asks:
        prompt = _prompt()
        if extra:  # the usage comes once the upstream is let go
            held_upstream.release(prompt)
        started = time.perf_counter()
        request_id, _ = _cut_stream(gateway, prompt, **extra)
        waited_ms = (time.perf_counter() - started) * 1000
        time.sleep(waited_ms / 1000 + 2)  # the upstream writes on past the client's end for 2 s and more
        held_upstream.release(prompt)
        record = gateway.wait_for_record(request_id, timeout_s=30)
        assert record["tokens_source"] == "upstream"
        # The client's end, not the read's 2 s on: timed when the gateway's stream ends, just after its
        # last write, which a loaded machine's client read and timed first (it was asserted within
        # ``waited_ms`` to the millisecond); a second of that lateness allowed, a second short of the read's.
        assert record["overhead_ms"] <= record["latency_ms"] <= waited_ms + 1000


def test_a_read_past_the_cut_that_fails_is_told(gateway: GatewayProcess) -> None:
    """t65: a read past the cut that failed (or timed out, or was ended by the drain deadline)
    billed the cut text alone with nothing to tell it from a whole read but ``tokens_source``."""
    request_id, chunks = _cut_stream(gateway, _prompt("BREAK"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _CUT
    record = gateway.wait_for_record(request_id, timeout_s=30)
    assert (record["status"], record["tokens_source"], record["completion_tokens"]) == (200, "gateway", _counted(_CUT))
    assert _unread(gateway, request_id) == ["upstream_bad_response"]


@pytest.mark.parametrize("model", ["reasoner", "claude45"])
def test_more_stop_strings_than_the_gateway_applies_are_refused(gateway: GatewayProcess, model: str) -> None:
    """t67: 80,000 stop strings the gateway matched itself held a worker's loop for 12 s."""
    oai = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    stops = [f"\n{' ' * n}" for n in range(20)] if model == "claude45" else [f"STOP{n}" for n in range(20)]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], extra_body={"stop": stops}
        )
    assert refused.value.body is not None and "at most 16" in str(refused.value.body)
