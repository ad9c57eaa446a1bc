"""vLLM's engine-level request fields are the operator's: a tenant's never reach the upstream (t177).

Every tenant's requests reach one vLLM server under one key. A client's ``request_id`` (two in
flight under one id broke the engine), ``priority`` (ahead of every other tenant under the
priority scheduler), ``kv_transfer_params`` (the host and KV blocks a decode server pulls) and
``vllm_xargs`` (arguments to the server's plugins) went on as the client sent them, as unknown
fields do. The loopback upstream answers as vLLM does and keeps every body it was sent; the
clients are the official openai SDK, the fields in its ``extra_body``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key
from gateway.protocols.engine_fields import ENGINE_FIELDS
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess, model_entry, policy_text, start_gateway
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

T = TypeVar("T")


def _models(url: str) -> str:
    return (
        model_entry("vllm", f"{url}/v1", "qwen", "{input: 1, output: 2}", "small")
        + model_entry("vllm-responses", f"{url}/v1", "qwen", "{input: 1, output: 2}", "small", responses_api="true")
        + model_entry("vllm-embed", f"{url}/v1", "bge", "{input: 0.02, output: 0}", kind="embedding")
    )


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
    models = _models(vllm.url)
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


# ------------------------------------------------ a key the operator trusts with some of them (f223)

_TRUSTED, _OTHER, _OPS = "sk-trusted-batch", "sk-other-app", "sk-ops-admin"
_KEPT = frozenset({"priority", "vllm_xargs"})


def _keyed_auth(trusted: str = "[priority, vllm_xargs]") -> str:
    return f"""auth:
  mode: keys
  keys:
    - {{id: batch, tenant: team-a, hash: "{hash_key(_TRUSTED)}", engine_fields: {trusted}}}
    - {{id: app, tenant: team-a, hash: "{hash_key(_OTHER)}"}}
    - {{id: ops, tenant: ops, hash: "{hash_key(_OPS)}", admin: true}}
"""


@pytest.fixture(scope="module")
def keyed(pair_gateway: PairGateway, vllm: RecordingUpstream) -> Iterator[GatewayProcess]:
    """Auth on, the exact cache on: key ``batch`` may send ``priority`` and ``vllm_xargs`` on,
    key ``app`` (the same tenant) none."""
    models = _models(vllm.url)
    env = {"TEST_ANTHROPIC_KEY": "sk-ant", "TEST_LARGE_KEY": "sk-large"}
    cache = "{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}"
    with pair_gateway(
        "engine-fields-keyed", extra_models=models, routes=_ROUTES, env=env, auth=_keyed_auth(), cache=cache
    ) as process:
        yield process


def _sdk(gateway: GatewayProcess, secret: str) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0, timeout=20))


def _ask(oai: openai.OpenAI, edge: str, extra: dict[str, Any]) -> Any:
    """One request of ``edge`` with ``extra`` in its body: the answer's headers."""
    unique = f"Say hello ({uuid.uuid4().hex})."  # never a cache hit
    if edge == "chat-stream":
        with oai.chat.completions.with_streaming_response.create(
            model="vllm-r", messages=[{"role": "user", "content": unique}], stream=True, extra_body=extra
        ) as response:
            assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices) == "Hello."
            return response.headers
    if edge == "chat":
        raw: Any = oai.chat.completions.with_raw_response.create(
            model="vllm-r", messages=[{"role": "user", "content": unique}], extra_body=extra
        )
    elif edge == "completions":
        raw = oai.completions.with_raw_response.create(model="vllm-r", prompt=unique, extra_body=extra)
    elif edge == "embeddings":
        raw = oai.embeddings.with_raw_response.create(model="vllm-embed-r", input=unique, extra_body=extra)
    else:  # passed through
        raw = oai.responses.with_raw_response.create(model="vllm-responses-r", input=unique, extra_body=extra)
    raw.parse()
    return raw.headers


_EDGES = ["chat", "chat-stream", "completions", "embeddings", "responses"]


@pytest.mark.parametrize("edge", _EDGES)
def test_a_key_allowed_engine_fields_sends_those_on_and_no_other(
    keyed: GatewayProcess, vllm: RecordingUpstream, edge: str
) -> None:
    headers = _ask(_sdk(keyed, _TRUSTED), edge, _ENGINE)
    sent = vllm.bodies[-1]
    assert {name: sent[name] for name in ENGINE_FIELDS if name in sent} == {name: _ENGINE[name] for name in _KEPT}
    assert _dropped(headers) == set(ENGINE_FIELDS - _KEPT)
    headers = _ask(_sdk(keyed, _TRUSTED), edge, {"priority": 10})
    assert vllm.bodies[-1]["priority"] == 10
    assert "x-gateway-dropped" not in headers


@pytest.mark.parametrize("edge", _EDGES)
def test_another_keys_engine_fields_are_dropped_as_before(
    keyed: GatewayProcess, vllm: RecordingUpstream, edge: str
) -> None:
    headers = _ask(_sdk(keyed, _OTHER), edge, _ENGINE)
    _sent_without_engine_fields(vllm.bodies[-1])
    assert _dropped(headers) == set(ENGINE_FIELDS)


def test_an_anthropic_upstream_is_not_sent_what_a_trusted_key_may_send_vllm(
    keyed: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    raw = _sdk(keyed, _TRUSTED).chat.completions.with_raw_response.create(
        model="claude", messages=_ASK, extra_body=_ENGINE
    )
    assert raw.parse().choices[0].message.content
    _sent_without_engine_fields(upstream_stats(large_upstream)["last_request"]["body"])
    assert _dropped(raw.headers) == set(ENGINE_FIELDS)


def test_the_cache_keeps_an_answer_shaped_by_vllm_xargs_apart(keyed: GatewayProcess, vllm: RecordingUpstream) -> None:
    """``vllm_xargs`` steers the server's logits processors: its answer is not a plain request's,
    nor the other way round. ``priority`` orders the server's queue alone: it shares the entry."""
    trusted, other = _sdk(keyed, _TRUSTED), _sdk(keyed, _OTHER)
    ask: Any = [{"role": "user", "content": f"Say hello ({uuid.uuid4().hex})."}]

    def chat(oai: openai.OpenAI, extra: dict[str, Any]) -> str:
        raw = oai.chat.completions.with_raw_response.create(
            model="vllm-r", messages=ask, temperature=0, extra_body=extra
        )
        raw.parse()
        return str(raw.headers["x-gateway-cache"])

    sent = len(vllm.bodies)
    assert chat(trusted, {}) == "miss"
    assert chat(trusted, {"vllm_xargs": {"plugin_arg": 1}}) == "miss"  # not the plain answer
    assert len(vllm.bodies) == sent + 2 and vllm.bodies[-1]["vllm_xargs"] == {"plugin_arg": 1}
    assert chat(trusted, {"vllm_xargs": {"plugin_arg": 2}}) == "miss"  # nor another argument's
    assert chat(trusted, {"vllm_xargs": {"plugin_arg": 1}}) == "exact"
    assert chat(trusted, {"priority": -5}) == "exact"  # the plain answer, whatever the queue's order
    assert chat(other, {"vllm_xargs": {"plugin_arg": 1}}) == "exact"  # dropped: a plain request
    assert len(vllm.bodies) == sent + 3


@pytest.mark.parametrize("edge", _EDGES)
def test_a_kept_priority_that_is_no_integer_is_refused_at_the_edge(
    keyed: GatewayProcess, vllm: RecordingUpstream, edge: str
) -> None:
    """f229 (t201): vLLM's ``priority`` is an integer, and it is not in the cache key: ``"high"``
    was answered 200 from the cache where a miss got vLLM's 400. It is refused before either."""
    oai, sent = _sdk(keyed, _TRUSTED), len(vllm.bodies)
    for value in ("high", "5", True, 2.5, None, [1]):
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(oai, edge, {"priority": value, "vllm_xargs": {"plugin_arg": 1}})
        assert (refused.value.param, refused.value.code) == ("priority", "invalid_type"), refused.value
        assert "Invalid type for 'priority': expected an integer" in refused.value.message, refused.value
    assert len(vllm.bodies) == sent
    _ask(oai, edge, {"priority": -3})  # an integer goes on
    assert vllm.bodies[-1]["priority"] == -3


def test_a_kept_priority_that_is_no_integer_is_refused_whatever_the_cache_holds(keyed: GatewayProcess) -> None:
    trusted = _sdk(keyed, _TRUSTED)
    ask: Any = [{"role": "user", "content": f"Say hello ({uuid.uuid4().hex})."}]
    raw = trusted.chat.completions.with_raw_response.create(
        model="vllm-r", messages=ask, temperature=0, extra_body={"priority": 1}
    )
    raw.parse()
    assert raw.headers["x-gateway-cache"] == "miss"
    with pytest.raises(openai.BadRequestError) as refused:
        trusted.chat.completions.create(model="vllm-r", messages=ask, temperature=0, extra_body={"priority": "high"})
    assert refused.value.param == "priority"


def test_another_keys_priority_is_dropped_whatever_its_value(keyed: GatewayProcess, vllm: RecordingUpstream) -> None:
    """A key that may not send ``priority`` is not told what a trusted key's must be: it is dropped, as before."""
    headers = _ask(_sdk(keyed, _OTHER), "chat", {"priority": "high"})
    assert _dropped(headers) == {"priority"} and "priority" not in vllm.bodies[-1]


@pytest.mark.parametrize("name", ["temperature", "foo"])
def test_a_key_naming_what_is_no_engine_field_is_refused_at_start(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream, name: str
) -> None:
    policy = policy_text(small_upstream, large_upstream, auth=_keyed_auth(f"[priority, {name}]"))
    with pytest.raises(RuntimeError, match="is invalid") as refused:
        start_gateway(tmp_path, policy, env={"REDIS_URL": "redis://127.0.0.1:1"})
    said = str(refused.value)  # the names quoted are hidden from the ops log, as a secret may be one
    assert "auth.keys[0].engine_fields[1] (line" in said and "no engine field" in said, said
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(tmp_path / "policies.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 1 and f"key 'batch' names '{name}'" in checked.stdout + checked.stderr, checked


def _poll(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 30.0) -> T:
    """``probe``'s value once ``done`` takes it, or its last at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not done(value := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def _write_atomically(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("name", ["temperature", "foo"])
def test_a_reload_naming_what_is_no_engine_field_is_refused_and_the_old_policy_kept(
    keyed: GatewayProcess, vllm: RecordingUpstream, name: str
) -> None:
    good = keyed.policy_path.read_text()
    admin = {"authorization": f"Bearer {_OPS}"}

    def policy() -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(f"{keyed.url}/readyz", headers=admin, timeout=5).json()["policy"]
        return state

    version = policy()["version"]
    bad = good.replace("engine_fields: [priority, vllm_xargs]", f"engine_fields: [{name}, priority]")
    assert bad != good
    _write_atomically(keyed.policy_path, bad)
    try:
        error = _poll(lambda: policy()["last_reload_error"], lambda e: e is not None and name in e)
        assert error is not None and "auth.keys[0].engine_fields[0]" in error, error
        assert f"key 'batch' names '{name}'" in error, error
        assert policy()["version"] == version
        _ask(_sdk(keyed, _TRUSTED), "chat", {"priority": 3, "vllm_xargs": {"plugin_arg": 3}})  # as before
        assert {vllm.bodies[-1]["priority"], str(vllm.bodies[-1]["vllm_xargs"])} == {3, "{'plugin_arg': 3}"}
    finally:
        _write_atomically(keyed.policy_path, good)
        assert _poll(lambda: policy()["last_reload_error"], lambda e: e is None) is None


def test_a_grant_taken_back_while_the_key_file_holds_a_bad_line_applies_at_once(
    tmp_path: Path, pair_gateway: PairGateway, vllm: RecordingUpstream
) -> None:
    """f229 (t201): narrowing a key's ``engine_fields`` in a key file that another line made invalid
    was held back with the rest of the edit: the key kept sending ``vllm_xargs``. A grant taken
    back is a removal, applied as a key taken out is; a grant widened waits for a valid file."""
    keys = tmp_path / "keys.yaml"

    def entry(key_id: str, engine_fields: str | None) -> str:
        granted = "" if engine_fields is None else f", engine_fields: {engine_fields}"
        return f'  - {{id: {key_id}, tenant: team-a, hash: "{hash_key("sk-" + key_id)}"{granted}}}\n'

    _write_atomically(
        keys, "keys:\n" + entry("k", "[priority, vllm_xargs]") + entry("j", "[priority]") + entry("w", "[]")
    )
    inline = f'    - {{id: ops, tenant: ops, hash: "{hash_key(_OPS)}", admin: true}}'  # the policy's own, first
    auth = f"auth:\n  mode: keys\n  key_file: {keys}\n  keys:\n{inline}\n"
    sent = {"priority": 2, "vllm_xargs": {"plugin_arg": 2}}
    started = pair_gateway("engine-fields-key-file", extra_models=_models(vllm.url), routes=_ROUTES,
                           env={"TEST_LARGE_KEY": "sk-large"}, auth=auth)  # fmt: skip
    with started as gateway:

        def dropped(key_id: str) -> set[str]:
            return _dropped(_ask(_sdk(gateway, "sk-" + key_id), "chat", sent)) - {""}

        assert (dropped("k"), dropped("j"), dropped("w")) == (set(), {"vllm_xargs"}, set(sent))
        bad = '  - {id: oops, tenant: team-b, hash: "sha256:NOTHEX"}\n'
        narrowed = entry("k", "[priority]") + entry("j", None) + entry("w", "[vllm_xargs]")
        _write_atomically(keys, "keys:\n" + narrowed + bad)
        assert _poll(lambda: dropped("k"), lambda d: d == {"vllm_xargs"}) == {"vllm_xargs"}, gateway.stderr_text()
        assert vllm.bodies[-1]["priority"] == 2  # what the file still grants it goes on
        assert dropped("j") == set(sent)  # no `engine_fields` at all: none
        assert dropped("w") == set(sent)  # widened: waits for a valid file
        reloaded = gateway.wait_for_ops("policy_reloaded")
        assert [line.get("engine_fields_taken_back") for line in reloaded if line.get("key_file_only")] == [["j", "k"]]
        rejected = gateway.wait_for_ops("policy_rejected")
        assert rejected[-1]["key_file"] == "removals only", rejected

        _write_atomically(keys, "keys:\n" + narrowed)  # fixed: the rest of the edit applies
        assert _poll(lambda: dropped("w"), lambda d: d == {"priority"}) == {"priority"}, gateway.stderr_text()
        assert (dropped("k"), dropped("j")) == ({"vllm_xargs"}, set(sent))
