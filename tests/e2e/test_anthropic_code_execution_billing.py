"""Anthropic's code execution tool on a passed-through Messages request, priced or refused (f175).

Anthropic bills code execution by the time of the container it runs in, above the token
prices, and its usage counts no runs (``server_tool_use`` has only web searches and fetches);
the answer names the container (``container.id``: the message's, or a stream's
``message_delta``'s). The gateway sent the tool on unpriced and billed the text prices alone.
A request offering it that a model it may end at does not price (``server_tools.code_execution``)
is refused unsent; a priced one is billed once per container the answer names (or per run its
usage counts, where it counts them), whole or streamed. The loopback upstream answers as
Anthropic's API does: ``server_tool_use`` blocks for its runs, their results, the container;
asked to ``SEARCH``, two web searches and a fetch where those tools are offered (``ERRED``: the
second search fails, unbilled). A question that says ``CUT`` ends the stream after the blocks
(the upstream breaks), one that says ``HOLD`` holds it there (a client leaves it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

from gateway.auth import hash_key
from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

_MODELS = """
  opus:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-opus-4-6
    price: {{input: 5, output: 25, server_tools: {{code_execution: 50, web_search: 10, web_fetch: 0}}}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  haiku:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-haiku-4-5
    price: {{input: 5, output: 25, server_tools: {{web_search: 10}}}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  sonnet:
    provider: anthropic
    base_url: {url}
    upstream_model: claude-sonnet-4-6
    price: {{input: 3, output: 15}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  opus-r: {model: opus}
  sonnet-r: {model: sonnet}
  haiku-r: {model: haiku}
  opus-or-sonnet: {model: opus, fallbacks: [sonnet]}
"""
_KEYS = """
auth:
  mode: keys
  keys:
    - {id: open, tenant: acme, hash: "%(open)s"}
""" % {"open": hash_key("key-open")}

_TEXT_USD = (100 * 5 + 20 * 25) / 1_000_000
"""Every answer's usage (100 input tokens, 20 output) at ``opus``'s text prices."""
_RUN_USD = 50 / 1000
"""One code execution (a container, per request) at ``opus``'s $50 per 1,000."""
_CONTAINER = {"id": "container_011CPR5CNjB747bTd36fQLFk", "expires_at": "2026-05-23T21:13:31.749448Z"}
_CODE = [{"type": "code_execution_20250825", "name": "code_execution"}]


def _runs() -> list[dict[str, Any]]:
    """Two runs in the one container, as Anthropic's answer shows them: a call and its result each."""
    blocks: list[dict[str, Any]] = []
    for n in (1, 2):
        blocks.append({"type": "server_tool_use", "id": f"srvtoolu_{n}", "name": "bash_code_execution",
                       "input": {"command": f"python -c 'print({n} + 1)'"}})  # fmt: skip
        result = {"type": "bash_code_execution_result", "stdout": f"{n + 1}\n", "stderr": "", "return_code": 0,
                  "content": []}  # fmt: skip
        blocks.append({"type": "bash_code_execution_tool_result", "tool_use_id": f"srvtoolu_{n}", "content": result})
    return blocks


def _searches(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Two web searches and a fetch, of the tools offered, as Anthropic's answer shows them."""
    offered = " ".join(str(tool.get("type")) for tool in body.get("tools") or ())
    if "SEARCH" not in str(body.get("messages")):
        return []
    blocks: list[dict[str, Any]] = []
    for n in (1, 2) if "web_search_" in offered else ():
        blocks.append({"type": "server_tool_use", "id": f"srvtoolu_s{n}", "name": "web_search",
                       "input": {"query": f"news {n}"}})  # fmt: skip
        found: Any = [{"type": "web_search_result", "url": f"https://example.com/{n}", "title": f"News {n}",
                       "encrypted_content": "Eo8BCioIAhgBIiQ", "page_age": None}]  # fmt: skip
        if n == 2 and "ERRED" in str(body.get("messages")):
            found = {"type": "web_search_tool_result_error", "error_code": "unavailable"}
        blocks.append({"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_s{n}", "content": found})
    if "web_fetch_" in offered:
        blocks.append({"type": "server_tool_use", "id": "srvtoolu_f1", "name": "web_fetch",
                       "input": {"url": "https://example.com/1"}})  # fmt: skip
        document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "News."},
                    "title": "News 1"}  # fmt: skip
        fetched = {"type": "web_fetch_result", "url": "https://example.com/1", "content": document,
                   "retrieved_at": "2026-05-23T21:13:31Z"}  # fmt: skip
        blocks.append({"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_f1", "content": fetched})
    return blocks


def _usage(body: dict[str, Any], output_tokens: int, *, final: bool = True) -> dict[str, Any]:
    """Anthropic's usage: no count of code runs, but where the question asks it to ("counted");
    the searches and fetches that did not fail, counted in the final usage alone."""
    searched = [block for block in _searches(body) if block["type"].endswith("_tool_result")] if final else []
    used: dict[str, int] = {
        "web_search_requests": sum(isinstance(b["content"], list) for b in searched if b["type"].startswith("web_s")),
        "web_fetch_requests": sum(b["type"].startswith("web_f") for b in searched),
    }
    if "counted" in str(body.get("messages")):
        used["code_execution_requests"] = 3
    return {"input_tokens": 100, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "server_tool_use": used, "service_tier": "standard"}  # fmt: skip


async def _messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    ran = any(str(tool.get("type")).startswith("code_execution_") for tool in body.get("tools") or ())
    content = [
        {"type": "text", "text": "Let me compute."},
        *_searches(body),
        *(_runs() if ran else ()),
        {"type": "text", "text": "2 and 3."},
    ]
    container = _CONTAINER if ran else None
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                               "stop_reason": "end_turn", "stop_sequence": None}  # fmt: skip
    if not body.get("stream"):
        return web.json_response({**message, "content": content, "container": container, "usage": _usage(body, 20)})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {**message, "content": [], "stop_reason": None, "container": None, "usage": _usage(body, 1, final=False)}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(content):
        opened = {**block, "input": {}} if block["type"] == "server_tool_use" else block
        events.append({"type": "content_block_start", "index": index, "content_block": opened})
        if block["type"] == "server_tool_use":
            partial = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events.append({"type": "content_block_delta", "index": index, "delta": partial})
        events.append({"type": "content_block_stop", "index": index})
    delta = {"stop_reason": "end_turn", "stop_sequence": None, "container": container}
    said = str(body.get("messages"))
    if "CUT" not in said and "HOLD" not in said:  # else the upstream breaks (or holds) after the blocks
        events.append({"type": "message_delta", "delta": delta, "usage": _usage(body, 20)})
        events.append({"type": "message_stop"})
    for event in events:
        await write_sse(response, event, event["type"])
    if "HOLD" in said:
        await asyncio.sleep(10)  # the client leaves meanwhile
    return response


@pytest.fixture(scope="module")
def claude_upstream() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/messages": _messages}, name="claude-code-execution-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    claude_upstream: RecordingUpstream,
) -> Iterator[GatewayProcess]:
    models = _MODELS.format(url=claude_upstream.url)
    with pair_gateway("code-execution", auth=_KEYS, extra_models=models, routes=_ROUTES) as process:
        yield process


def _claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="key-open", max_retries=0, timeout=15))


@pytest.mark.parametrize(
    ("route", "kind", "field"),
    [
        ("sonnet-r", "code_execution_20250825", "models.sonnet.price.server_tools.code_execution"),
        ("sonnet-r", "code_execution_20250522", "models.sonnet.price.server_tools.code_execution"),
        # a fallback that does not price it would run it unbilled
        ("opus-or-sonnet", "code_execution_20260120", "models.sonnet.price.server_tools.code_execution"),
        # a web search that runs no code of its own leaves code execution charged
        ("haiku-r", "code_execution_20260120", "models.haiku.price.server_tools.code_execution"),
    ],
)
def test_code_execution_the_policy_does_not_price_is_refused_unsent(
    gateway: GatewayProcess, claude_upstream: RecordingUpstream, route: str, kind: str, field: str
) -> None:
    sent = len(claude_upstream.bodies)
    tools: Any = [{"type": kind, "name": "code_execution"}]
    if route == "haiku-r":
        tools.append({"type": "web_search_20250305", "name": "web_search"})
    with pytest.raises(anthropic.BadRequestError) as refused:
        _claude(gateway).messages.create(
            model=route, max_tokens=64, messages=[{"role": "user", "content": "Compute 1 + 1."}], tools=tools
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert field in refused.value.message and "billed above the base price" in refused.value.message
    assert len(claude_upstream.bodies) == sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("question", "runs"), [("Compute 1 + 1 and 2 + 1.", 1), ("Compute, counted.", 3)])
def test_code_execution_is_billed_per_container_or_as_usage_counts_it(
    gateway: GatewayProcess, stream: bool, question: str, runs: int
) -> None:
    """Two runs in one container are one fee, as Anthropic bills the container's time, not its
    runs; where the usage counts runs (``code_execution_requests``), its count is billed."""
    request_id = f"code-{stream}-{runs}"
    asked: Any = {
        "model": "opus-r",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": question}],
        "tools": _CODE,
        "extra_headers": {"x-request-id": request_id, "anthropic-beta": "code-execution-2025-08-25"},
    }
    claude = _claude(gateway)
    if stream:
        with claude.messages.stream(**asked) as streamed:
            message = streamed.get_final_message()
    else:
        raw = claude.messages.with_raw_response.create(**asked)
        message = raw.parse()
        assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(_TEXT_USD + runs * _RUN_USD, rel=1e-6)
    assert message.container is not None and message.container.id == _CONTAINER["id"]
    assert [block.type for block in message.content].count("bash_code_execution_tool_result") == 2
    record = gateway.wait_for_record(request_id)
    assert record["passthrough"] is True and record["server_tool_requests"] == {"code_execution": runs}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + runs * _RUN_USD, rel=1e-6)


def test_a_stream_cut_after_its_runs_bills_them(gateway: GatewayProcess) -> None:
    """f176: the stream ends before ``message_delta`` (its container, its final usage): the runs the
    client was shown are billed, on ``message_start``'s usage and the gateway's count."""
    asked: Any = {
        "model": "opus-r",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Compute. CUT"}],
        "tools": _CODE,
        "extra_headers": {"x-request-id": "code-cut", "anthropic-beta": "code-execution-2025-08-25"},
    }
    with pytest.raises(anthropic.APIStatusError):
        for _ in _claude(gateway).messages.create(**asked, stream=True):
            pass
    record = gateway.wait_for_record("code-cut")
    assert record["status"] == 502 and record["server_tool_requests"] == {"code_execution": 1}


def test_an_answer_without_code_execution_bills_none(gateway: GatewayProcess) -> None:
    """A web search offered alone: no container, no code execution fee."""
    raw = _claude(gateway).messages.with_raw_response.create(
        model="opus-r",
        max_tokens=64,
        messages=[{"role": "user", "content": "What is new?"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}],
        extra_headers={"x-request-id": "no-code"},
    )
    assert raw.parse().container is None
    record = gateway.wait_for_record("no-code")
    assert record["server_tool_requests"] is None
    assert record["cost_usd"] == pytest.approx(_TEXT_USD, rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_code_execution_with_a_code_running_web_search_is_free(gateway: GatewayProcess, stream: bool) -> None:
    """With ``web_search_20260209`` (or a later search or fetch, which filters its results by
    running code) Anthropic charges no code execution: not refused unpriced, not billed."""
    request_id = f"free-code-{stream}"
    asked: Any = {
        "model": "haiku-r",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Search, then compute."}],
        "tools": [
            {"type": "web_search_20260209", "name": "web_search"},
            {**_CODE[0], "type": "code_execution_20260120"},
        ],
        "extra_headers": {"x-request-id": request_id},
    }
    if stream:
        with _claude(gateway).messages.stream(**asked) as streamed:
            message = streamed.get_final_message()
    else:
        message = _claude(gateway).messages.create(**asked)
    assert message.container is not None
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] is None
    assert record["cost_usd"] == pytest.approx(_TEXT_USD, rel=1e-6)


_SEARCHING: Any = [
    {"type": "web_search_20250305", "name": "web_search"},
    {"type": "web_fetch_20250910", "name": "web_fetch"},
]
_SEARCHES_USD = 2 * 10 / 1000
"""Two web searches at ``opus``'s $10 per 1,000 (its fetches are free)."""


@pytest.mark.parametrize(("question", "searches"), [("SEARCH for news.", 2), ("SEARCH for news. ERRED", 1)])
def test_a_finished_stream_bills_the_searches_its_usage_counts(
    gateway: GatewayProcess, question: str, searches: int
) -> None:
    """f180: the searches streamed are counted as they come, and the final usage's count wins: no
    search billed twice, and one that failed (which Anthropic does not bill) not billed."""
    request_id = f"searched-{searches}"
    with _claude(gateway).messages.stream(
        model="opus-r",
        max_tokens=64,
        messages=[{"role": "user", "content": question}],
        tools=_SEARCHING,
        extra_headers={"x-request-id": request_id},
    ) as streamed:
        message = streamed.get_final_message()
    assert message.usage.server_tool_use is not None and message.usage.server_tool_use.web_search_requests == searches
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] == {"web_search": searches, "web_fetch": 1}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + searches * 10 / 1000, rel=1e-6)


def test_an_abandoned_stream_bills_the_searches_its_client_was_given(gateway: GatewayProcess) -> None:
    """f180: the client has the searches' and the fetch's results and hangs up before
    ``message_delta``, the only event that counts them: they are billed, as Anthropic bills them."""
    stream = _claude(gateway).messages.create(
        model="opus-r",
        max_tokens=64,
        messages=[{"role": "user", "content": "SEARCH for news. HOLD"}],
        tools=_SEARCHING,
        stream=True,
        extra_headers={"x-request-id": "searched-abandoned"},
    )
    for event in stream:
        if event.type == "content_block_start" and event.content_block.type == "web_fetch_tool_result":
            break
    stream.close()
    record = gateway.wait_for_record("searched-abandoned")
    assert record["status"] == 499 and record["server_tool_requests"] == {"web_search": 2, "web_fetch": 1}
    assert record["cost_usd"] > _SEARCHES_USD


def test_a_stream_cut_after_its_searches_bills_them(gateway: GatewayProcess) -> None:
    """f180: the upstream ends the stream after the searches' results, before ``message_delta``."""
    with pytest.raises(anthropic.APIStatusError):
        for _ in _claude(gateway).messages.create(
            model="opus-r",
            max_tokens=64,
            messages=[{"role": "user", "content": "SEARCH for news. CUT"}],
            tools=_SEARCHING,
            stream=True,
            extra_headers={"x-request-id": "searched-cut"},
        ):
            pass
    record = gateway.wait_for_record("searched-cut")
    assert record["status"] == 502 and record["server_tool_requests"] == {"web_search": 2, "web_fetch": 1}
    assert record["cost_usd"] > _SEARCHES_USD
