"""vLLM's engine-level request fields are the operator's: a tenant's never reach the upstream (t177).

Every tenant's requests reach one vLLM server under one key. A client's ``request_id`` (two in
flight under one id broke the engine), ``priority`` (ahead of every other tenant under the
priority scheduler), ``kv_transfer_params`` (the host and KV blocks a decode server pulls) and
``vllm_xargs`` (arguments to the server's plugins) went on as the client sent them, as unknown
fields do. The loopback upstream answers as vLLM does and keeps every body it was sent; the
clients are the official openai SDK, the fields in its ``extra_body``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.protocols.engine_fields import ENGINE_FIELDS
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

_MODELS = """
  vllm:
    base_url: {url}/v1
    upstream_model: qwen
    price: {{input: 1, output: 2}}
    tier: small
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  vllm-responses:
    base_url: {url}/v1
    upstream_model: qwen
    responses_api: true
    price: {{input: 1, output: 2}}
    tier: small
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  vllm-embed:
    kind: embedding
    base_url: {url}/v1
    upstream_model: bge
    price: {{input: 0.02, output: 0}}
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  vllm-r: {model: vllm}
  vllm-responses-r: {model: vllm-responses}
  vllm-embed-r: {model: vllm-embed}
"""

_ENGINE: dict[str, Any] = {
    "kv_transfer_params": {"remote_host": "10.0.0.1", "remote_port": 1, "remote_block_ids": [0, 1]},
    "priority": -100,
    "request_id": "fixed-id",
    "vllm_xargs": {"plugin_arg": 1},
    "logits_processors": ["my_module.Processor"],
    "chat_template": "{{ messages }}",
    # SGLang's (t181)
    "rid": "fixed-rid",
    "bootstrap_host": "10.0.0.2",
    "bootstrap_port": 8998,
    "bootstrap_room": 7,
    "data_parallel_rank": 0,
    "custom_logit_processor": "gASV...",
    "lora_path": "/etc/passwd",
    "return_hidden_states": True,
}
_EXTRA: dict[str, Any] = {**_ENGINE, "top_k": 5}
"""The engine fields, and one of vLLM's sampling fields, which goes on as unknown fields do."""
_ASK: Any = [{"role": "user", "content": "Say hello."}]
_USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    head = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**head, "object": "chat.completion.chunk"}
    await write_sse(response, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello."}}]})
    await write_sse(response, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    await write_sse(response, {**chunk, "choices": [], "usage": _USAGE})
    await write_sse(response, b"[DONE]")
    return response


async def _embeddings(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [{"object": "embedding", "index": i, "embedding": [0.5, 0.25, 0.125]} for i in range(len(inputs))]
    usage = {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}
    return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})


async def _responses(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    text = {"type": "output_text", "text": "Hello.", "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11}  # fmt: skip
    return web.json_response({"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                              "model": body["model"], "output": [message], "parallel_tool_calls": True,
                              "tool_choice": "auto", "tools": [], "usage": usage})  # fmt: skip


@pytest.fixture(scope="module")
def vllm() -> Iterator[RecordingUpstream]:
    routes = {"/v1/chat/completions": _chat, "/v1/embeddings": _embeddings, "/v1/responses": _responses}
    with serve_recording(routes, name="vllm-engine-fields") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway, vllm: RecordingUpstream) -> Iterator[GatewayProcess]:
    models = _MODELS.format(url=vllm.url)
    env = {"TEST_ANTHROPIC_KEY": "sk-ant", "TEST_LARGE_KEY": "sk-large"}
    with pair_gateway("engine-fields", extra_models=models, routes=_ROUTES, env=env) as process:
        yield process


@pytest.fixture
def oai(gateway: GatewayProcess) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=20))


def _dropped(headers: Any) -> set[str]:
    return set(headers.get("x-gateway-dropped", "").split(","))


def _sent_without_engine_fields(body: dict[str, Any]) -> None:
    assert not set(ENGINE_FIELDS) & set(body), body


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_clients_engine_fields_do_not_reach_vllm_and_are_named(
    oai: openai.OpenAI, vllm: RecordingUpstream, stream: bool
) -> None:
    if stream:
        with oai.chat.completions.with_streaming_response.create(
            model="vllm-r", messages=_ASK, stream=True, extra_body=_EXTRA
        ) as response:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
            headers = response.headers
    else:
        raw = oai.chat.completions.with_raw_response.create(model="vllm-r", messages=_ASK, extra_body=_EXTRA)
        text, headers = raw.parse().choices[0].message.content or "", raw.headers
    assert text == "Hello."
    sent = vllm.bodies[-1]
    _sent_without_engine_fields(sent)
    assert sent["top_k"] == 5  # an unknown field that is not the operator's goes on
    assert _dropped(headers) == set(ENGINE_FIELDS)


def test_a_plain_chat_request_names_nothing_dropped(oai: openai.OpenAI, vllm: RecordingUpstream) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="vllm-r", messages=_ASK, extra_body={"top_k": 5})
    assert "x-gateway-dropped" not in raw.headers
    assert vllm.bodies[-1]["top_k"] == 5


def test_a_completions_clients_engine_fields_do_not_reach_vllm(oai: openai.OpenAI, vllm: RecordingUpstream) -> None:
    raw = oai.completions.with_raw_response.create(model="vllm-r", prompt="Say hello.", extra_body=_ENGINE)
    assert raw.parse().choices[0].text == "Hello."
    _sent_without_engine_fields(vllm.bodies[-1])
    assert _dropped(raw.headers) == set(ENGINE_FIELDS)


_SAMPLING: dict[str, Any] = {
    "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05, "length_penalty": 1.0, "stop_token_ids": [151643],
    "include_stop_str_in_output": False, "ignore_eos": False, "min_tokens": 1, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "truncate_prompt_tokens": 512, "allowed_token_ids": None,
    "bad_words": ["spam"], "use_beam_search": False,
}  # fmt: skip
"""vLLM's sampling fields, which a chat client's request takes on to vLLM (``allowed_token_ids``
null: not set)."""


@pytest.mark.parametrize("stream", [False, True])
def test_a_completions_clients_vllm_sampling_fields_reach_vllm_as_a_chat_clients_do(
    oai: openai.OpenAI, vllm: RecordingUpstream, stream: bool
) -> None:
    """f213: the legacy completions edge dropped them (a Qwen model's recommended ``top_k`` and
    ``repetition_penalty`` went nowhere), where chat sends them on."""
    extra = {**_SAMPLING, **_ENGINE}
    if stream:
        with oai.completions.with_streaming_response.create(
            model="vllm-r", prompt="Say hello.", stream=True, extra_body=extra
        ) as response:
            text = "".join(chunk.choices[0].text for chunk in response.parse() if chunk.choices)
            headers = response.headers
    else:
        raw = oai.completions.with_raw_response.create(model="vllm-r", prompt="Say hello.", extra_body=extra)
        text, headers = raw.parse().choices[0].text, raw.headers
    assert text == "Hello."
    sent = vllm.bodies[-1]
    _sent_without_engine_fields(sent)
    assert {name: sent.get(name) for name in _SAMPLING} == _SAMPLING
    assert _dropped(headers) == set(ENGINE_FIELDS)  # the operator's, as chat names them
    oai.chat.completions.create(model="vllm-r", messages=_ASK, extra_body=extra)
    as_chat = vllm.bodies[-1]
    assert {name: as_chat.get(name) for name in _SAMPLING} == _SAMPLING


def test_on_an_anthropic_route_completions_name_vllms_sampling_fields_as_chat_does(
    oai: openai.OpenAI, large_upstream: SimulatedUpstream
) -> None:
    """Anthropic takes none of them: the upstream is not sent them and both edges name the same ones."""
    chat = oai.chat.completions.with_raw_response.create(model="claude", messages=_ASK, extra_body=_SAMPLING)
    assert chat.parse().choices[0].message.content
    completion = oai.completions.with_raw_response.create(model="claude", prompt="Say hello.", extra_body=_SAMPLING)
    assert completion.parse().choices[0].text
    assert not set(_SAMPLING) & set(upstream_stats(large_upstream)["last_request"]["body"])
    named = {name for name, value in _SAMPLING.items() if value is not None}
    assert _dropped(completion.headers) == _dropped(chat.headers) == named


def test_an_embeddings_clients_engine_fields_do_not_reach_vllm(oai: openai.OpenAI, vllm: RecordingUpstream) -> None:
    """vLLM's embeddings requests take ``priority`` and ``request_id`` too; the gateway sends a
    client's other fields on (``truncate_prompt_tokens``), these not."""
    extra = {**_ENGINE, "truncate_prompt_tokens": 8}
    raw = oai.embeddings.with_raw_response.create(model="vllm-embed-r", input="engine fields", extra_body=extra)
    assert len(raw.parse().data) == 1
    sent = vllm.bodies[-1]
    _sent_without_engine_fields(sent)
    assert sent["truncate_prompt_tokens"] == 8
    assert _dropped(raw.headers) == set(ENGINE_FIELDS)


def test_a_passed_through_responses_requests_engine_fields_do_not_reach_vllm(
    oai: openai.OpenAI, vllm: RecordingUpstream
) -> None:
    raw = oai.responses.with_raw_response.create(
        model="vllm-responses-r", input="Say hello.", extra_body={**_ENGINE, "top_k": 5}
    )
    assert raw.parse().output_text == "Hello."
    sent = vllm.bodies[-1]
    assert sent["input"] == "Say hello." and sent["top_k"] == 5  # passed through: the rest as the client wrote it
    _sent_without_engine_fields(sent)
    assert _dropped(raw.headers) == set(ENGINE_FIELDS)
    plain = oai.responses.with_raw_response.create(model="vllm-responses-r", input="Say hello.")
    assert "x-gateway-dropped" not in plain.headers


def test_a_translated_responses_requests_engine_fields_do_not_reach_vllm(
    oai: openai.OpenAI, vllm: RecordingUpstream
) -> None:
    raw = oai.responses.with_raw_response.create(model="vllm-r", input="Say hello.", extra_body=_ENGINE)
    assert raw.parse().output_text == "Hello."
    _sent_without_engine_fields(vllm.bodies[-1])
    assert set(ENGINE_FIELDS) <= _dropped(raw.headers)


def test_an_anthropic_upstream_is_not_sent_a_chat_clients_engine_fields(
    oai: openai.OpenAI, large_upstream: SimulatedUpstream
) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="claude", messages=_ASK, extra_body=_ENGINE)
    assert raw.parse().choices[0].message.content
    _sent_without_engine_fields(upstream_stats(large_upstream)["last_request"]["body"])
    assert _dropped(raw.headers) == set(ENGINE_FIELDS)
