"""Messages requests passed through to Anthropic upstreams, with the anthropic SDK.

A request whose every reachable model is Anthropic's, and that the internal model cannot
hold whole (documents, server tools, ``top_k``, fields it does not read), goes upstream as
the client sent it, betas and all, and comes back as Anthropic wrote it; the gateway still
authenticates, limits, routes, prices from the upstream's usage and logs. One it can hold
is translated, and so can be served from the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.protocols.tenant_ids import scoped
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, inject, upstream_stats
from tests.gateway_process import GatewayProcess

CLAUDE_CODE_BETA = "claude-code-20250219,context-management-2025-06-27"


@pytest.fixture
def claude(gateway: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=gateway.url,
        api_key="sk-unused",
        max_retries=0,
        timeout=15,
        default_headers={"anthropic-beta": CLAUDE_CODE_BETA},
    ) as client:
        yield client


def _last_request(upstream: SimulatedUpstream) -> dict[str, Any]:
    last: dict[str, Any] = upstream_stats(upstream)["last_request"]
    return last


def test_what_only_anthropic_reads_reaches_it_as_it_was_sent(
    claude: anthropic.Anthropic, gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    ask: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "Build step 3 copies files."},
                        "title": "build.log",
                        "citations": {"enabled": True},
                    },
                    {"type": "text", "text": "Which step copies files?", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}],
        "metadata": {"user_id": "user-1"},
    }
    raw = claude.messages.with_raw_response.create(**ask)
    message = raw.parse()
    assert message.type == "message" and message.content and message.content[0].type == "text"
    sent = _last_request(large_upstream)
    assert sent["path"] == "/v1/messages"
    # only the model name changed, and the end user is the tenant's own (another's "user-1" is another)
    assert sent["body"] == {**ask, "model": "claude-sim", "metadata": {"user_id": scoped("default", "user-1")}}
    assert sent["headers"]["anthropic-beta"] == CLAUDE_CODE_BETA
    assert sent["headers"]["x-api-key"] == "sk-ant-456"  # the gateway's key, not the client's
    assert "x-gateway-dropped" not in raw.headers
    record = gateway.wait_for_record(raw.http_response.headers["x-request-id"])
    assert record["passthrough"] is True and record["protocol"] == "anthropic.messages"
    assert record["tokens_source"] == "upstream" and record["model"] == "claude"
    assert record["finish_reason"] == "stop"  # as a streamed one's
    assert record["prompt_tokens"] == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) + (
        message.usage.cache_creation_input_tokens or 0
    )
    assert record["completion_tokens"] == message.usage.output_tokens


def test_server_tool_results_and_search_results_in_history_pass_through(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """The shapes Anthropic returns for code execution, web fetch and a failed web search (an
    object as ``content``) and a ``search_result`` (a string ``source``) must go back in the next turn."""
    history = [
        {"role": "user", "content": [
            {"type": "search_result", "source": "https://docs.example.com/build", "title": "Build",
             "content": [{"type": "text", "text": "Step 3 copies files."}], "citations": {"enabled": True}},
            {"type": "text", "text": "Fetch the page and run the script."}]},
        {"role": "assistant", "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_fetch", "input": {"url": "https://x.example"}},
            {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_1",
             "content": {"type": "web_fetch_result", "url": "https://x.example",
                         "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}}},
            {"type": "server_tool_use", "id": "srvtoolu_2", "name": "code_execution", "input": {"code": "print(1)"}},
            {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_2",
             "content": {"type": "code_execution_result", "stdout": "1\n", "stderr": "", "return_code": 0, "content": []}},
            {"type": "server_tool_use", "id": "srvtoolu_3", "name": "web_search", "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_3",
             "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}},
            {"type": "text", "text": "It printed 1."}]},
        {"role": "user", "content": "Thanks. And step 4?"},
    ]  # fmt: skip
    body = {"model": "claude", "max_tokens": 64, "messages": history}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "sk-unused"}
    answered = httpx.post(f"{gateway.url}/v1/messages", json=body, headers=headers, timeout=15)
    assert answered.status_code == 200, answered.text
    assert _last_request(large_upstream)["body"] == {**body, "model": "claude-sim"}
    counted = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers=headers, timeout=15)
    assert counted.status_code == 200, counted.text


def test_top_k_passed_through_is_not_named_as_dropped(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    body = {"model": "claude", "max_tokens": 32, "top_k": 5, "messages": [{"role": "user", "content": "Hi"}]}
    answered = httpx.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=15)
    assert answered.status_code == 200 and "x-gateway-dropped" not in answered.headers
    assert _last_request(large_upstream)["body"]["top_k"] == 5


def test_the_stream_is_anthropics_own_and_the_sdk_accumulates_it(
    claude: anthropic.Anthropic, gateway: GatewayProcess
) -> None:
    with claude.messages.stream(
        model="claude",
        max_tokens=128,
        extra_body={"top_k": 40},  # not in the internal model: passed through
        extra_headers={"x-request-id": "relayed-message-stream-1"},
        messages=[{"role": "user", "content": "Describe the sea briefly."}],
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert final.content and final.content[0].type == "text" and final.stop_reason == "end_turn"
    record = gateway.wait_for_record("relayed-message-stream-1")  # written once the stream has ended
    assert record["passthrough"] is True and record["protocol"] == "anthropic.messages" and record["stream"] is True
    assert record["completion_tokens"] == final.usage.output_tokens and record["finish_reason"] == "stop"


def test_an_overloaded_upstream_mid_stream_ends_with_anthropics_error_event(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    inject(large_upstream, {"cut_after_chunks": 3})
    body = {"model": "claude", "max_tokens": 64, "stream": True, "context_management": {"edits": []},
            "messages": [{"role": "user", "content": "Go on."}]}  # fmt: skip
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=10) as r:
        frames = [frame for frame in r.read().decode().split("\n\n") if frame.strip()]
    assert frames[0].startswith("event: message_start")
    assert frames[-1].startswith("event: error\ndata: ") and '"type":"error"' in frames[-1]


@pytest.mark.parametrize("client", ["anthropic", "anthropic_passed_through", "openai"])
def test_anthropics_in_band_overload_before_any_content_is_retried(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, client: str
) -> None:
    """Anthropic says "overloaded" as an error event right after message_start: nothing has reached
    the client yet, so the gateway retries it as it would a 529, translated or passed through
    (Claude Code's requests usually are)."""
    inject(large_upstream, {"overloaded_after_events": 1})
    ask = [{"role": "user", "content": "Still there?"}]
    if client.startswith("anthropic"):
        body = {"model": "claude", "max_tokens": 64, "stream": True, "messages": ask}
        if client == "anthropic_passed_through":
            body["context_management"] = {"edits": []}  # a field only Anthropic reads: the request goes as sent
        headers = {"x-api-key": "k", "x-request-id": f"overloaded-{client}"}
        with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers=headers, timeout=15) as r:
            text = r.read().decode()
        assert "event: error" not in text and "event: message_stop" in text
        assert text.count("event: message_start") == 1
        record = gateway.wait_for_record(f"overloaded-{client}")
        assert record["retries"] == 1 and record["error_type"] is None
        assert record["passthrough"] is (True if client == "anthropic_passed_through" else None)
    else:
        body = {"model": "claude", "stream": True, "messages": ask}
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=15) as r:
            text = r.read().decode()
        assert '"error"' not in text and text.rstrip().endswith("data: [DONE]")
    assert upstream_stats(large_upstream)["messages_requests"] == 2  # the overloaded one, then the answer


@pytest.mark.parametrize("passed_through", [False, True])
def test_anthropics_overload_after_content_reaches_the_client_as_overloaded(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream, passed_through: bool
) -> None:
    """Once content went out nothing can be retried; the client is told what Anthropic said
    (its SDK raises the overloaded error apart), translated or passed through alike."""
    inject(large_upstream, {"overloaded_after_events": 4})
    extra: dict[str, Any] = {"context_management": {"edits": []}} if passed_through else {}
    ask: Any = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "one two three four"}]}
    with pytest.raises(anthropic.APIStatusError) as broke:
        with claude.messages.stream(**ask, extra_body=extra) as stream:
            list(stream)
    assert broke.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


@pytest.mark.parametrize("passed_through", [False, True])
def test_a_stream_without_message_delta_bills_what_was_written_not_the_placeholder(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, passed_through: bool
) -> None:
    """message_start says 1 output token; only message_delta says the real count. When it never
    comes, the answer is counted, as a cut stream's is."""
    inject(large_upstream, {"omit_message_delta": True})
    ask = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
    body: dict[str, Any] = {"model": "claude", "max_tokens": 64, "stream": True, "messages": ask}
    if passed_through:
        body["context_management"] = {"edits": []}
    headers = {"x-api-key": "k", "x-request-id": f"no-delta-{passed_through}"}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers=headers, timeout=10) as r:
        text = r.read().decode()
    record = gateway.wait_for_record(f"no-delta-{passed_through}")
    assert record["completion_tokens"] > 5 and record["tokens_source"] == "upstream"
    if passed_through:  # the upstream's own events, as they came
        assert "event: message_stop" in text
    else:  # no stop reason came: not presented as an end_turn
        assert '"stop_reason":"end_turn"' not in text and text.rstrip().split("\n\n")[-1].startswith("event: error")
        assert record["error_type"] == "upstream_bad_response"


def test_a_stream_without_message_delta_fails_on_the_chat_edge_too(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t93: the chat client got [DONE] and a 200 in the log for the answer the Messages edge
    (rightly) failed: the same broken upstream counted as a success on one edge only."""
    inject(large_upstream, {"omit_message_delta": True})
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)
    ask: Any = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
    with pytest.raises(openai.APIError, match="without a stop reason"):
        for _ in client.chat.completions.create(
            model="claude", max_tokens=64, messages=ask, stream=True, extra_headers={"x-request-id": "no-delta-chat"}
        ):
            pass
    record = gateway.wait_for_record("no-delta-chat")
    assert record["error_type"] == "upstream_bad_response" and record["status"] == 502
    assert record["completion_tokens"] > 5 and record["tokens_source"] == "upstream"


def test_a_translated_stream_cut_midway_ends_with_anthropics_error_event(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """Translated (the internal model holds the request): Anthropic's events reach the client as the
    pipeline's deltas, and a cut upstream as Anthropic's error event after the text so far."""
    inject(large_upstream, {"cut_after_chunks": 10})
    ask = [{"role": "user", "content": "one two three four five six seven eight nine ten eleven twelve"}]
    body = {"model": "claude", "max_tokens": 64, "stream": True, "messages": ask}
    headers = {"x-api-key": "k", "x-request-id": "translated-cut-1"}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers=headers, timeout=10) as r:
        frames = [frame for frame in r.read().decode().split("\n\n") if frame.strip()]
    assert frames[0].startswith("event: message_start")
    assert any(frame.startswith("event: content_block_delta") for frame in frames)
    assert frames[-1].startswith("event: error\ndata: ") and '"type":"error"' in frames[-1]
    record = gateway.wait_for_record("translated-cut-1")
    assert record["passthrough"] is None and record["error_type"] == "upstream_bad_response"
    said = "".join(
        json.loads(frame.split("data: ", 1)[1])["delta"].get("text", "")
        for frame in frames
        if frame.startswith("event: content_block_delta")
    )
    # Billed what was said, not message_start's placeholder of 1 output token.
    assert record["completion_tokens"] >= len(said.split()) > 1


def test_count_tokens_is_the_anthropic_models_own_count(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """What only Anthropic reads is accepted, and counted by the model: the gateway's own count
    cannot see a document's text (a 20k-token document counted as 9 tokens)."""
    document = " ".join(f"line {i} of the build log" for i in range(400))
    body = {
        "model": "claude",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": document}},
                    {"type": "text", "text": "Summarise the document."},
                ],
            }
        ],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    answer = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"})
    assert answer.status_code == 200 and answer.json()["input_tokens"] > 2000
    assert upstream_stats(large_upstream)["count_tokens_requests"] == 1
    inject(large_upstream, {"status": 500})  # the model cannot count: the gateway's own count answers
    fallback = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"})
    assert fallback.status_code == 200 and 0 < fallback.json()["input_tokens"] < 2000
    # found by an outside tester: the request's own fault was answered 200 with the gateway's count,
    # and a count no request can have was passed on
    too_long = '{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}'
    inject(large_upstream, {"status": 400, "body": too_long})
    refused = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"})
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    assert "prompt is too long" in refused.json()["error"]["message"]
    for count in (-5, 10**12):
        inject(large_upstream, {"status": 200, "body": f'{{"input_tokens": {count}}}'})
        implausible = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"})
        assert implausible.status_code == 200 and 0 < implausible.json()["input_tokens"] < 2000  # the gateway's own
    inject(large_upstream, {"status": 200, "body": '{"input_tokens": 60000}'})  # a PDF by file_id: beyond the bytes
    assert httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"}).json() == {
        "input_tokens": 60000
    }


def test_a_route_that_may_reach_another_upstream_still_refuses_what_it_cannot_carry(gateway: GatewayProcess) -> None:
    body = {
        "model": "fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    answer = httpx.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"})
    assert answer.status_code == 400 and answer.json()["type"] == "error"
    assert "server tools" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"container": "container_9"}, "container"),
        ({"container": {"id": "container_9", "skills": []}}, "container"),
        ({"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "file", "file_id": "file_9"}},
            {"type": "text", "text": "summarise"}]}]}, "messages.0.content.0.source"),
    ],
)  # fmt: skip
def test_ids_of_upstream_state_every_tenant_shares_are_refused(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, extra: dict[str, Any], param: str
) -> None:
    """t26: a container id or a file_id names what the operator's key holds for every tenant."""
    before = upstream_stats(large_upstream)["messages_requests"]
    body = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **extra}
    answer = httpx.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", answer.text
    assert answer.json()["error"]["message"].startswith(f"{param}: upstream")
    assert upstream_stats(large_upstream)["messages_requests"] == before


@pytest.mark.parametrize(
    "field", ["thread", "container", "foo_bar"]
)  # service_tier (t47) and context_management (t206): left out and named
def test_a_route_that_may_reach_another_upstream_refuses_anthropics_own_fields_naming_them(
    gateway: GatewayProcess, field: str
) -> None:
    """The SDK's tool runner sends only the new turns with ``thread``: answered without it, the
    model would see a lone tool result (and the SDK falls back to whole turns on a 400). f200:
    ``count_tokens`` counted such a request; it refuses it in the same words."""
    body = {"model": "fast", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], field: {"type": "x"}}
    answer = httpx.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["message"].startswith(f"{field}: not supported on a route that may reach")
    counted = httpx.post(f"{gateway.url}/v1/messages/count_tokens", json=body, headers={"x-api-key": "k"})
    assert counted.status_code == 400 and counted.json() == answer.json()
    hinted = {**body, "service_tier": "auto"}  # left out of a translation, not refused: counted
    counted = httpx.post(
        f"{gateway.url}/v1/messages/count_tokens", json={**hinted, field: None}, headers={"x-api-key": "k"}
    )
    assert counted.status_code == 200, counted.text


def test_a_block_field_a_translation_would_lose_sends_the_request_through_as_it_came(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream
) -> None:
    """Claude Code's prompt-cache breakpoint sits on the last tool result."""
    turns: list[Any] = [
        {"role": "user", "content": "weather in Lima?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ]},
    ]  # fmt: skip
    tools: Any = [{"name": "weather", "input_schema": {"type": "object"}, "strict": True}]
    raw = claude.messages.with_raw_response.create(model="claude", max_tokens=64, messages=turns, tools=tools)
    assert raw.parse().content and "x-gateway-dropped" not in raw.headers
    sent = _last_request(large_upstream)["body"]
    assert sent["messages"][2]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert sent["tools"][0]["strict"] is True


def test_thinking_with_tools_goes_as_it_came_so_interleaved_blocks_keep_their_order(
    claude: anthropic.Anthropic, gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """t40: translated, Claude's [thinking, text, tool_use, thinking, text, tool_use] came back
    regrouped (all thinking first, the texts merged), and Claude Code sent that rebuilt turn back."""
    tools: Any = [{"name": "weather", "input_schema": {"type": "object"}}]
    ask: dict[str, Any] = {"model": "claude", "max_tokens": 2048, "tools": tools,
                           "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    turns: list[Any] = [{"role": "user", "content": "Weather in Lima? Use the weather tool."}]
    first = claude.messages.with_raw_response.create(
        **ask, messages=turns, extra_headers={"x-request-id": "interleaved-1"}
    )
    said = [block.model_dump(exclude_none=True) for block in first.parse().content]
    assert gateway.wait_for_record("interleaved-1")["passthrough"] is True  # the answer comes back as written
    answers = [
        {"type": "tool_result", "tool_use_id": b["id"], "content": "sunny"} for b in said if b["type"] == "tool_use"
    ]
    turns += [
        {"role": "assistant", "content": said},
        {"role": "user", "content": [*answers, {"type": "text", "text": "And in Quito?"}]},
    ]
    assert claude.messages.create(**ask, messages=turns).content
    assert _last_request(large_upstream)["body"]["messages"] == turns  # the turn told back, in its order


def test_what_only_steers_anthropic_is_left_out_and_named_where_a_route_may_reach_another_upstream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t40: the SDK's top-level cache_control (automatic caching) and output_config.effort were a
    400 on any route that can reach vLLM, where thinking is left out and named."""
    body = {"model": "fast", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],
            "cache_control": {"type": "ephemeral"}, "output_config": {"effort": "low"}, "service_tier": "auto"}  # fmt: skip
    answer = httpx.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=15)
    assert answer.status_code == 200, answer.text
    assert set(answer.headers["x-gateway-dropped"].split(",")) == {
        "cache_control",
        "output_config.effort",
        "service_tier",
    }
    sent = _last_request(small_upstream)["body"]
    assert "cache_control" not in sent and "output_config" not in sent and "effort" not in json.dumps(sent)
    assert "service_tier" not in sent


_CONTEXT_EDITING = {"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
"""What Claude Code sends with every request once thinking is on."""


def test_claude_codes_context_editing_is_left_out_and_named_where_a_route_may_reach_a_chat_upstream(
    claude: anthropic.Anthropic, small_upstream: SimulatedUpstream
) -> None:
    """t206: it was a 400 on every route that may reach a chat upstream, so Claude Code could not use
    one (but with ``CLAUDE_CODE_DISABLE_EXPERIMENTAL_BETAS=1``): its edits prune the context
    Anthropic keeps, the thinking a chat upstream is not sent anyway."""
    ask: Any = {"model": "fast", "max_tokens": 2048, "messages": [{"role": "user", "content": "one two three"}],
                "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    raw = claude.messages.with_raw_response.create(**ask, extra_body=_CONTEXT_EDITING)
    assert raw.parse().content
    assert set(raw.headers["x-gateway-dropped"].split(",")) == {"context_management", "thinking"}
    sent = _last_request(small_upstream)["body"]
    assert "context_management" not in sent and "clear_thinking" not in json.dumps(sent)
    del ask["max_tokens"]
    counted = claude.messages.with_raw_response.count_tokens(**ask, extra_body=_CONTEXT_EDITING)
    assert counted.parse().input_tokens > 0 and counted.headers["x-gateway-dropped"] == "context_management"


def test_context_editing_reaches_claude_only_on_a_route_of_anthropics_models(
    pair_gateway: PairGateway, large_upstream: SimulatedUpstream
) -> None:
    """t206: a translated request that reaches Claude on a route with a chat fallback goes without it,
    as ``output_config.effort`` does (the internal model holds neither, nor the edits an answer says
    it applied), and says so; a count there is of that request. Passed through, it goes as sent."""
    routes = "  claude-first: {model: claude, fallbacks: [small]}\n"
    env = {"TEST_LARGE_KEY": "sk-large-secret-123", "TEST_ANTHROPIC_KEY": "sk-ant-456"}
    ask: Any = {"max_tokens": 64, "messages": [{"role": "user", "content": "one two three"}]}
    with (
        pair_gateway("claude-first", routes=routes, env=env) as gw,
        anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=15) as claude,
    ):
        raw = claude.messages.with_raw_response.create(model="claude-first", **ask, extra_body=_CONTEXT_EDITING)
        assert raw.parse().content and raw.headers["x-gateway-model"] == "claude"
        assert raw.headers["x-gateway-dropped"] == "context_management"
        sent = _last_request(large_upstream)
        assert sent["path"] == "/v1/messages" and "context_management" not in sent["body"]
        counted = claude.messages.with_raw_response.count_tokens(
            model="claude-first", messages=ask["messages"], extra_body=_CONTEXT_EDITING
        )
        assert counted.parse().input_tokens > 0 and counted.headers["x-gateway-dropped"] == "context_management"
        sent = _last_request(large_upstream)
        assert sent["path"] == "/v1/messages/count_tokens" and "context_management" not in sent["body"]
        raw = claude.messages.with_raw_response.create(model="claude", **ask, extra_body=_CONTEXT_EDITING)
        assert raw.parse().content and "x-gateway-dropped" not in raw.headers
        assert _last_request(large_upstream)["body"]["context_management"] == _CONTEXT_EDITING["context_management"]
        counted = claude.messages.with_raw_response.count_tokens(
            model="claude", messages=ask["messages"], extra_body=_CONTEXT_EDITING
        )
        assert counted.parse().input_tokens > 0 and "x-gateway-dropped" not in counted.headers
        assert _last_request(large_upstream)["body"]["context_management"] == _CONTEXT_EDITING["context_management"]


def test_a_request_the_internal_model_holds_is_translated(
    claude: anthropic.Anthropic, gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """Translated requests are the ones the cache can serve (tests/e2e/test_cache_e2e.py replays them);
    the client's betas still reach Anthropic (some, such as context-1m, live only in the header)."""
    raw = claude.messages.with_raw_response.create(
        model="claude",
        max_tokens=64,
        messages=[{"role": "user", "content": "Name a colour of the sea."}],
        extra_headers={"x-request-id": "translated-1"},
    )
    assert raw.parse().content
    record = gateway.wait_for_record("translated-1")
    assert record["passthrough"] is None and record["protocol"] == "anthropic.messages" and record["status"] == 200
    assert _last_request(large_upstream)["headers"]["anthropic-beta"] == CLAUDE_CODE_BETA


@pytest.mark.parametrize("passed_through", [False, True])
def test_a_stream_that_ends_after_message_delta_is_whole(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream, claude: anthropic.Anthropic, passed_through: bool
) -> None:
    """message_delta gave the stop reason and the usage, and only message_stop did not come: the
    model had finished, as an OpenAI stream that lost only its [DONE] had (t58: the client got
    an in-band error after the whole answer, and the log a 502)."""
    extra: dict[str, Any] = {"context_management": {"edits": []}} if passed_through else {}
    ask: Any = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "one two three four"}]}
    inject(large_upstream, {"omit_message_stop": True})
    request_id = f"no-message-stop-{passed_through}"
    with claude.messages.stream(**ask, extra_body=extra, extra_headers={"x-request-id": request_id}) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "end_turn" and message.content[0].type == "text" and message.content[0].text
    record = gateway.wait_for_record(request_id)
    assert (record["status"], record["finish_reason"], record["error_type"]) == (200, "stop", None)
    assert record["completion_tokens"] > 1 and record["tokens_source"] == "upstream"
    inject(large_upstream, {"omit_message_stop": True})
    body = {**ask, **extra, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=10) as r:
        frames = [frame for frame in r.read().decode().split("\n\n") if frame.strip()]
    assert frames[-2].startswith("event: message_delta") and frames[-1].startswith("event: message_stop")
