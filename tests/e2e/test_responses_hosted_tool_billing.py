"""OpenAI's hosted tools and audio on passed-through Responses requests, priced or refused (t159).

A request passed through to a ``responses_api`` upstream may offer OpenAI's hosted tools, which
OpenAI bills per use above the token prices (a web search or a file search per call, the code
interpreter per container), and its input may hold audio, whose tokens cost several times the
text's. Chat refused them unpriced and billed them (t150); this path sent them on and billed text
prices. A request offering a tool (or holding an ``input_audio`` part) that a model it may end at
does not price is refused unsent, with ``param`` ``tools`` (or ``input``); a priced one is billed
each use the answer's output items show, whole or streamed. The loopback upstream answers as
OpenAI's Responses API does: a ``web_search_call`` per search, a ``code_interpreter_call`` per run,
an ``image_generation_call`` per image. An input that says ``HOLD`` is held after the output items
(a client leaves it), one that says ``CUT`` ends there (the upstream breaks), and one that says
``DROPIDS`` lists the final response's items without their ids (f176).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key
from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

_MODELS = """
  tooled:
    base_url: {url}/v1
    upstream_model: gpt-5
    responses_api: true
    price: {{input: 2, output: 8, audio_input: 40,
             server_tools: {{web_search: 10, code_interpreter: 30, file_search: 2.5, image_generation: 40}}}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  plain:
    base_url: {url}/v1
    upstream_model: gpt-5-mini
    responses_api: true
    price: {{input: 2, output: 8}}
    tier: small
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  tooled-r: {model: tooled}
  plain-r: {model: plain}
  tooled-or-plain: {model: tooled, fallbacks: [plain]}
  translated: {model: tooled, fallbacks: [small]}
"""
_KEYS = """
auth:
  mode: keys
  keys:
    - {id: open, tenant: acme, hash: "%(open)s"}
    - {id: sparing, tenant: sparing, hash: "%(sparing)s", limits: {usd_per_day: 0.025}}
""" % {name: hash_key(f"key-{name}") for name in ("open", "sparing")}

_TEXT_USD = (100 * 2 + 20 * 8) / 1_000_000
"""Every answer's usage (100 input tokens, 20 output) at ``tooled``'s text prices."""
_WAV = base64.b64encode(b"RIFF....WAVEfmt ").decode()
_HEARD: Any = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is said here?"},
            {"type": "input_audio", "input_audio": {"data": _WAV, "format": "wav"}},
        ],
    }
]


def _calls(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The hosted tools' calls an answer makes: two searches, two runs in one container, one file search."""
    kinds = {str(tool.get("type")) for tool in body.get("tools") or ()}
    calls: list[dict[str, Any]] = []
    if any(kind.startswith("web_search") for kind in kinds):
        action = {"type": "search", "query": "weather"}
        calls += [{"type": "web_search_call", "id": f"ws_{n}", "status": "completed", "action": action} for n in (1, 2)]
    if "code_interpreter" in kinds:
        calls += [
            {"type": "code_interpreter_call", "id": f"ci_{n}", "status": "completed", "container_id": "cntr_1",
             "code": "print(1)", "outputs": None}
            for n in (1, 2)
        ]  # fmt: skip
    if "file_search" in kinds:
        calls.append({"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["x"]})
    if "image_generation" in kinds:
        calls.append({"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": _WAV})
    return calls


def _response(body: dict[str, Any], status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    heard = '"input_audio"' in str(body.get("input")).replace("'", '"')
    usage = {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 0, **({"audio_tokens": 40} if heard else {})},
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 120,
    }
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": body["model"],
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage if status == "completed" else None}  # fmt: skip


async def _responses(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    text = {"type": "output_text", "text": "Found it.", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    output = [*_calls(body), message]
    if not body.get("stream"):
        whole = _response(body, "completed", output)
        if "NOUSAGE" in str(body.get("input")):
            whole["usage"] = None
        return web.json_response(whole)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    events: list[dict[str, Any]] = [{"type": "response.created", "response": _response(body, "in_progress", [])}]
    for index, item in enumerate(output):
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    said = str(body.get("input"))
    if "DROPIDS" in said:
        output = [{k: v for k, v in item.items() if k != "id"} for item in output]
    if "CUT" not in said and "HOLD" not in said:
        events.append({"type": "response.completed", "response": _response(body, "completed", output)})
    for number, event in enumerate(events):
        await write_sse(response, {**event, "sequence_number": number}, event["type"])
    if "HOLD" in said:
        await asyncio.sleep(10)  # the client leaves meanwhile
    return response


@pytest.fixture(scope="module")
def responses_upstream() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/responses": _responses}, name="responses-tools-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    responses_upstream: RecordingUpstream,
) -> Iterator[GatewayProcess]:
    models = _MODELS.format(url=responses_upstream.url)
    with pair_gateway("hosted-tools", auth=_KEYS, extra_models=models, routes=_ROUTES) as process:
        yield process


def _client(gateway: GatewayProcess, key: str = "open") -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=15))


@pytest.mark.parametrize(
    ("route", "asked", "param", "field"),
    [
        ("plain-r", {"tools": [{"type": "web_search"}]}, "tools", "models.plain.price.server_tools.web_search"),
        ("plain-r", {"tools": [{"type": "web_search_preview"}]}, "tools", "models.plain.price.server_tools.web_search"),
        ("plain-r", {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools",
         "models.plain.price.server_tools.code_interpreter"),
        ("plain-r", {"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools",
         "models.plain.price.server_tools.file_search"),
        ("plain-r", {"tools": [{"type": "image_generation"}]}, "tools",
         "models.plain.price.server_tools.image_generation"),
        ("tooled-or-plain", {"tools": [{"type": "web_search"}]}, "tools",
         "models.plain.price.server_tools.web_search"),
        ("plain-r", {"input": _HEARD}, "input", "models.plain.price.audio_input"),
    ],
)  # fmt: skip
def test_a_hosted_tool_or_audio_the_policy_does_not_price_is_refused_unsent(
    gateway: GatewayProcess,
    responses_upstream: RecordingUpstream,
    route: str,
    asked: dict[str, Any],
    param: str,
    field: str,
) -> None:
    sent = len(responses_upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).responses.create(**{"model": route, "input": "What is the weather?", **asked})
    assert refused.value.param == param
    assert field in refused.value.message and "billed above the base price" in refused.value.message
    assert len(responses_upstream.bodies) == sent


@pytest.mark.parametrize("stream", [False, True])
def test_each_web_search_the_answer_shows_is_billed(gateway: GatewayProcess, stream: bool) -> None:
    """OpenAI bills a web search per call: two ``web_search_call`` items are two fees."""
    request_id = f"searched-{stream}"
    client = _client(gateway)
    asked: Any = {"model": "tooled-r", "input": "Weather?", "tools": [{"type": "web_search"}]}
    if stream:
        with client.responses.stream(**asked, extra_headers={"x-request-id": request_id}) as events:
            said = events.get_final_response().output_text
    else:
        said = client.responses.create(**asked, extra_headers={"x-request-id": request_id}).output_text
    assert said == "Found it."
    record = gateway.wait_for_record(request_id)
    assert record["passthrough"] is True and record["server_tool_requests"] == {"web_search": 2}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + 2 * 10 / 1000, rel=1e-6)


def test_an_answer_without_usage_bills_its_searches_on_the_gateways_count(gateway: GatewayProcess) -> None:
    """A whole answer that says no usage is billed on the gateway's count of its tokens, and its
    searches were dropped with the usage they would have gone onto (as a stream's are not)."""
    asked: Any = {"model": "tooled-r", "input": "Weather? NOUSAGE", "tools": [{"type": "web_search"}]}
    said = _client(gateway).responses.create(**asked, extra_headers={"x-request-id": "searched-unsaid"})
    assert said.output_text == "Found it.", said.usage
    record = gateway.wait_for_record("searched-unsaid")
    assert record["tokens_source"] == "gateway" and record["server_tool_requests"] == {"web_search": 2}
    assert record["cost_usd"] > 2 * 10 / 1000


@pytest.mark.parametrize("stream", [False, True])
def test_the_code_interpreter_is_billed_per_container(gateway: GatewayProcess, stream: bool) -> None:
    """Two runs in one container are one session; a file search is billed per call."""
    request_id = f"interpreted-{stream}"
    tools: Any = [
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "file_search", "vector_store_ids": []},
    ]
    asked: Any = {
        "model": "tooled-r",
        "input": "Compute.",
        "tools": tools,
        "extra_headers": {"x-request-id": request_id},
    }
    if stream:
        assert [event.type for event in _client(gateway).responses.create(**asked, stream=True)][-1] == (
            "response.completed"
        )
    else:
        assert _client(gateway).responses.create(**asked).output_text == "Found it."
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] == {"code_interpreter": 1, "file_search": 1}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + 30 / 1000 + 2.5 / 1000, rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_each_generated_image_is_billed(gateway: GatewayProcess, stream: bool) -> None:
    """OpenAI bills the image generation tool per image, far above the tokens around it."""
    request_id = f"drawn-{stream}"
    asked: Any = {"model": "tooled-r", "input": "Draw a cat.", "tools": [{"type": "image_generation"}]}
    if stream:
        with _client(gateway).responses.stream(**asked, extra_headers={"x-request-id": request_id}) as events:
            output = events.get_final_response().output
    else:
        output = _client(gateway).responses.create(**asked, extra_headers={"x-request-id": request_id}).output
    assert [item.type for item in output] == ["image_generation_call", "message"]
    record = gateway.wait_for_record(request_id)
    assert record["server_tool_requests"] == {"image_generation": 1}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + 40 / 1000, rel=1e-6)


_DRAWN_AND_SEARCHED: Any = [{"type": "image_generation"}, {"type": "web_search"}]
_FEES_USD = 40 / 1000 + 2 * 10 / 1000
"""An image and two searches at ``tooled``'s prices."""


def test_an_abandoned_stream_bills_the_tool_uses_its_client_was_given(gateway: GatewayProcess) -> None:
    """f176: the client has every output item (an image, two searches) and hangs up before
    ``response.completed``, the only event with a usage: the uses are billed with the gateway's
    count of the tokens, as OpenAI bills the work it did."""
    stream = _client(gateway).responses.create(
        model="tooled-r",
        input="Draw and search. HOLD",
        tools=_DRAWN_AND_SEARCHED,
        stream=True,
        extra_headers={"x-request-id": "abandoned-tools"},
    )
    done = 0
    for event in stream:
        done += event.type == "response.output_item.done"
        if done == 4:  # the image, two searches, the message
            break
    stream.close()
    record = gateway.wait_for_record("abandoned-tools")
    assert record["status"] == 499 and record["tokens_source"] == "gateway"
    assert record["server_tool_requests"] == {"image_generation": 1, "web_search": 2}
    assert record["cost_usd"] > _FEES_USD


def test_a_stream_its_upstream_cuts_bills_the_tool_uses_it_gave(gateway: GatewayProcess) -> None:
    """f176: the upstream ends the stream after the output items, without ``response.completed``."""
    events = _client(gateway).responses.create(
        model="tooled-r",
        input="Draw and search. CUT",
        tools=_DRAWN_AND_SEARCHED,
        stream=True,
        extra_headers={"x-request-id": "cut-tools"},
    )
    assert [event.type for event in events][-1] == "error"
    record = gateway.wait_for_record("cut-tools")
    assert record["status"] == 502 and record["tokens_source"] == "gateway"
    assert record["server_tool_requests"] == {"image_generation": 1, "web_search": 2}
    assert record["cost_usd"] > _FEES_USD


def test_a_final_response_without_item_ids_bills_each_use_once(gateway: GatewayProcess) -> None:
    """f176: the stream's items had ids and its final response's did not: each is one item, by its
    place in the output, not two."""
    with _client(gateway).responses.stream(
        model="tooled-r",
        input="Draw and search. DROPIDS",
        tools=_DRAWN_AND_SEARCHED,
        extra_headers={"x-request-id": "dropped-ids"},
    ) as events:
        assert events.get_final_response().output_text == "Found it."
    record = gateway.wait_for_record("dropped-ids")
    assert record["server_tool_requests"] == {"image_generation": 1, "web_search": 2}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + _FEES_USD, rel=1e-6)


def test_audio_input_is_billed_at_the_audio_price(gateway: GatewayProcess) -> None:
    raw = _client(gateway).responses.with_raw_response.create(
        model="tooled-r", input=_HEARD, extra_headers={"x-request-id": "heard"}
    )
    assert raw.parse().output_text == "Found it."
    record = gateway.wait_for_record("heard")
    assert record["audio_prompt_tokens"] == 40 and record["server_tool_requests"] is None
    assert record["cost_usd"] == pytest.approx((60 * 2 + 40 * 40 + 20 * 8) / 1_000_000, rel=1e-6)


def test_budgets_reserve_each_tool_call_allowed(gateway: GatewayProcess, responses_upstream: RecordingUpstream) -> None:
    """Three searches allowed (``max_tool_calls``) at $0.01 are over the $0.025 a day: refused
    unsent; one is not."""
    sparing = _client(gateway, "sparing")
    sent = len(responses_upstream.bodies)
    with pytest.raises(openai.RateLimitError) as searches:
        sparing.responses.create(
            model="tooled-r", input="Weather?", tools=[{"type": "web_search"}], max_tool_calls=3, max_output_tokens=50
        )
    assert "usd_per_day" in searches.value.message
    assert len(responses_upstream.bodies) == sent
    allowed = sparing.responses.create(
        model="tooled-r", input="Weather?", tools=[{"type": "web_search"}], max_tool_calls=1, max_output_tokens=50
    )
    assert allowed.output_text == "Found it."


def test_an_audio_part_on_a_translated_route_is_refused(gateway: GatewayProcess) -> None:
    """A chat upstream cannot take it: the translated request names the part."""
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).responses.create(model="translated", input=_HEARD)
    assert refused.value.param == "input[0].content[1]" and "input_audio" in refused.value.message
