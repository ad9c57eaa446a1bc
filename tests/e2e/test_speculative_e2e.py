"""Speculative decoding (mode gateway) through the gateway process, with the toy LM servers."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, start_gateway
from tests.speculative.servers import ToyServer, start_toy_server
from tests.speculative.toy_lm_server import write_tokenizer_json

PROMPTS = ["tell me about the way it was", "write some long word and then see", "it is what it is"]


def _policy(large: ToyServer, small: ToyServer) -> str:
    return f"""
pair: {{small: small, large: large}}
models:
  small:
    base_url: {small.base_url}
    price: {{input: 0.2, output: 0.2}}
    tier: small
  large:
    base_url: {large.base_url}
    price: {{input: 2, output: 6}}
    tier: large
    # min_speedup 0: the toy servers' passes cost nothing, so drafting does not pay (t49)
    speculative: {{mode: gateway, draft: small, k_initial: 4, k_min: 1, k_max: 8, tokenizer: tokenizer.json,
                   min_speedup: 0}}
  large-plain:
    base_url: {large.base_url}
    upstream_model: large
    price: {{input: 2, output: 6}}
    tier: large
routes:
  best: {{model: large}}
auth: {{mode: none}}
cache: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ToyServer, ToyServer]]:
    large = start_toy_server(role="large", eos_rate=0.03, special_rate=0.03, cleanup=1)
    small = start_toy_server(role="small", agreement=0.8)
    yield large, small
    large.stop()
    small.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis, servers: tuple[ToyServer, ToyServer]
) -> Iterator[GatewayProcess]:
    folder = Path(tmp_path_factory.mktemp("spec"))
    write_tokenizer_json(str(folder / "tokenizer.json"))  # named relative to the policy file
    process = start_gateway(folder, _policy(*servers), env={"REDIS_URL": redis_server.url})
    # the pair checked by the check spawned at start: a request while it runs goes plain ("pair_checking"),
    # which a loaded machine's first request could meet
    try:
        assert process.wait_for_ops("speculation_pair_ok"), process.stderr_text()[-3000:]
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_speculative_answers_equal_the_large_models_own(gateway: GatewayProcess, stream: bool) -> None:
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=30))
    for prompt in PROMPTS:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
        plain = client.chat.completions.create(model="large-plain", messages=messages, temperature=0, max_tokens=40)
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model="best", messages=messages, temperature=0, max_tokens=40, stream=True
            ) as response:
                request_id = response.headers["x-request-id"]
                text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="best", messages=messages, temperature=0, max_tokens=40
            )
            request_id = raw.headers["x-request-id"]
            text = raw.parse().choices[0].message.content or ""
        assert text == plain.choices[0].message.content
        record = gateway.wait_for_record(request_id)
        speculation = record["speculation"]
        assert speculation["mode"] == "gateway" and speculation["rounds"] >= 1
        assert speculation["drafted"] >= speculation["accepted"] >= 0 and speculation["large_calls"] >= 1
        # what each server read and wrote, beside the usage billed as the large model's alone (t124)
        assert speculation["draft_completion_tokens"] == speculation["drafted"]
        assert speculation["draft_prompt_tokens"] >= speculation["draft_calls"] * record["prompt_tokens"]
        assert speculation["large_prompt_tokens"] >= speculation["rounds"] * record["prompt_tokens"]
        assert speculation["large_completion_tokens"] >= speculation["rounds"]
    assert gateway.wait_for_ops("speculation_pair_ok"), gateway.stderr_text()


def test_non_speculative_models_log_no_speculation(gateway: GatewayProcess) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions",
                          json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})  # fmt: skip
    assert gateway.wait_for_record(response.headers["x-request-id"]).get("speculation") is None


def test_a_speculative_answer_that_fails_midway_logs_the_loops_work(
    gateway: GatewayProcess, servers: tuple[ToyServer, ToyServer]
) -> None:
    large, _ = servers
    large.reset()
    large.fail_after(3, "500")
    try:
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "best", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 60,
                  "temperature": 0},
            timeout=30,
        )  # fmt: skip
    finally:
        large.reset()
    assert response.status_code == 502, response.text
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["status"] == 502 and record["speculation"]["rounds"] >= 1, record


def test_a_speculative_stream_cut_midway_is_billed_on_the_loops_exact_counts(
    gateway: GatewayProcess, servers: tuple[ToyServer, ToyServer]
) -> None:
    """t49: a stream the large server dropped midway was billed on the gateway's estimate (13
    prompt tokens for 9, 10 completion tokens for the 9 sent) though the loop knows both exactly."""
    large, _ = servers
    messages = [{"role": "user", "content": PROMPTS[1]}]
    plain = httpx.post(f"{gateway.base_url}/chat/completions", timeout=30,
                       json={"model": "large-plain", "messages": messages, "max_tokens": 5, "temperature": 0})  # fmt: skip
    prompt_tokens = plain.json()["usage"]["prompt_tokens"]
    large.reset()
    large.fail_after(3, "drop")
    try:
        body = {"model": "best", "messages": messages, "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=30) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
            request_id = response.headers["x-request-id"]
    finally:
        large.reset()
    assert '"error"' in events[-1]  # cut midway: some text, then the error event
    record = gateway.wait_for_record(request_id)
    assert record["status"] == 502 and record["speculation"]["output_tokens"] >= 1, record
    assert record["prompt_tokens"] == prompt_tokens
    assert record["completion_tokens"] == record["speculation"]["output_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_large_window_cannot_hold_is_refused_as_the_server_refuses_it(
    gateway: GatewayProcess, stream: bool
) -> None:
    """The loop used to cut max_tokens to the room left (or to nothing) and answer 200 with
    finish_reason "length", billed; now such a request goes plain and the server's 400 reaches
    the client, as from the large model alone (the toy servers' window is 4,096 tokens)."""
    body = {
        "model": "best",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 5000,
        "stream": stream,
    }
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 4096" in error["message"]
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert record["status"] == 400 and record["cost_usd"] == 0
    assert record["speculation"]["mode"] == "plain" and record["speculation"]["fallback_reason"] == "context_length"


@pytest.mark.parametrize("stream", [False, True])
def test_neither_server_is_sent_a_clients_engine_fields(
    gateway: GatewayProcess, servers: tuple[ToyServer, ToyServer], stream: bool
) -> None:
    """t177: vLLM's engine-level fields are the operator's; the loop's own calls never carried
    them, and a request sent plain (or not speculated) must not either."""
    large, small = servers
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=30))
    engine = {"request_id": "fixed-id", "priority": -100, "kv_transfer_params": {"remote_host": "10.0.0.1"},
              "vllm_xargs": {"plugin_arg": 1}}  # fmt: skip
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPTS[1]}]
    for model in ("best", "large-plain"):
        large.reset()
        small.reset()
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, temperature=0, max_tokens=16, stream=stream, extra_body=engine
        ) as response:
            answer = response.parse()
            if stream:
                list(answer)
            request_id, dropped = response.headers["x-request-id"], response.headers["x-gateway-dropped"]
        assert set(dropped.split(",")) == set(engine)
        if model == "best":
            assert gateway.wait_for_record(request_id)["speculation"]["mode"] == "gateway"
        assert (large.stats()["engine_fields"], small.stats()["engine_fields"]) == ([], []), model


def test_a_request_with_engine_fields_its_key_keeps_is_sent_plain_with_them(
    tmp_path: Path, redis_server: EmbeddedRedis, servers: tuple[ToyServer, ToyServer]
) -> None:
    """f229 (t201): the loop's calls carry no engine field, so a trusted key's ``lora_path``,
    ``vllm_xargs`` or ``priority`` was dropped without a word whenever a request speculated: the
    client got the base model's answer, not its adapter's, its batch job's calls went at the
    default priority. A request that carries one is decoded plainly, the fields sent on."""
    large, small = servers
    kept = ["lora_path", "vllm_xargs", "priority", "kv_transfer_params"]
    key = f'    - {{id: batch, tenant: acme, hash: "{hash_key("key-batch")}", engine_fields: [{", ".join(kept)}]}}'
    policy = _policy(large, small).replace("auth: {mode: none}", "auth:\n  mode: keys\n  keys:\n" + key)
    write_tokenizer_json(str(tmp_path / "tokenizer.json"))
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="key-batch", max_retries=0, timeout=30))
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPTS[2]}]

    def ask(extra: dict[str, object], stream: bool) -> tuple[str, dict[str, object]]:
        large.reset()
        small.reset()
        with client.chat.completions.with_streaming_response.create(
            model="best", messages=messages, temperature=0, max_tokens=16, stream=stream, extra_body=extra
        ) as response:
            answer = response.parse()
            text = (
                "".join(c.choices[0].delta.content or "" for c in answer if c.choices)  # type: ignore[union-attr]
                if stream
                else answer.choices[0].message.content or ""  # type: ignore[union-attr]
            )
            assert "x-gateway-dropped" not in response.headers
            speculation: dict[str, object] = gateway.wait_for_record(response.headers["x-request-id"])["speculation"]
        return text, speculation

    try:
        assert gateway.wait_for_ops("speculation_pair_ok"), gateway.stderr_text()[-3000:]  # else it goes plain
        want, speculation = ask({}, stream=False)
        assert speculation["mode"] == "gateway", speculation  # the key's other requests still speculate
        engine: dict[str, object] = {"lora_path": "/adapters/sql", "vllm_xargs": {"plugin_arg": 1}, "priority": 10,
                                     "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
        for stream in (False, True):
            for name in kept:
                text, speculation = ask({name: engine[name]}, stream)
                assert text == want  # the toy server reads none of them
                assert speculation["mode"] == "plain", speculation
                assert speculation["fallback_reason"] == f"unsupported_{name}", speculation
                assert large.stats()["engine_fields"] == [name] and large.stats()["chat"] == 1
                assert small.stats()["completions"] == small.stats()["chat"] == 0  # nothing drafted
    finally:
        gateway.stop()


def test_speculating_keeps_each_tenants_prefix_cache_its_own(
    tmp_path: Path, redis_server: EmbeddedRedis, servers: tuple[ToyServer, ToyServer]
) -> None:
    """t77: with ``tenant_cache_salt`` the loop's own calls to both servers went out unsalted, so
    a tenant's prompt, once speculated on, was in the large server's prefix cache for any tenant
    to time; passed-through requests skipped the salt too (the wrapper did not forward it)."""
    large, small = servers
    keys = "\n".join(f'    - {{id: {t}, tenant: {t}, hash: "{hash_key("key-" + t)}"}}' for t in ("acme", "globex"))
    policy = (
        _policy(large, small)
        .replace("    tier: small\n", "    tier: small\n    tenant_cache_salt: true\n", 1)
        .replace(
            "    tier: large\n    # min_speedup", "    tier: large\n    tenant_cache_salt: true\n    # min_speedup", 1
        )
        .replace("auth: {mode: none}", "auth:\n  mode: keys\n  keys:\n" + keys)
    )
    write_tokenizer_json(str(tmp_path / "tokenizer.json"))
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:
        assert gateway.wait_for_ops("speculation_pair_ok"), gateway.stderr_text()[-3000:]  # else it goes plain
        confidential = " ".join(PROMPTS * 12)  # many cache blocks long

        def ask(tenant: str) -> tuple[int, int]:
            before = large.stats()["prefill_tokens"]
            response = httpx.post(
                f"{gateway.base_url}/chat/completions",
                headers={"authorization": f"Bearer key-{tenant}"},
                json={"model": "best", "messages": [{"role": "user", "content": confidential}], "max_tokens": 8,
                      "temperature": 0},
                timeout=30,
            )  # fmt: skip
            assert response.status_code == 200, response.text
            record = gateway.wait_for_record(response.headers["x-request-id"])
            assert record["speculation"]["mode"] == "gateway", record
            return large.stats()["prefill_tokens"] - before, response.json()["usage"]["prompt_tokens"]

        ask("acme")  # checks the pair (its probes carry no tenant's text) and fills acme's cache
        unsalted = (large.stats()["unsalted"], small.stats()["unsalted"])
        again, prompt_tokens = ask("acme")
        other, _ = ask("globex")
        assert (large.stats()["unsalted"], small.stats()["unsalted"]) == unsalted
        assert again < prompt_tokens // 2 <= prompt_tokens <= other  # acme hits its own blocks; globex none of them
    finally:
        gateway.stop()


def test_speculating_salts_with_the_clients_own_cache_salt_as_a_plain_request_does(
    tmp_path: Path, redis_server: EmbeddedRedis, servers: tuple[ToyServer, ToyServer]
) -> None:
    """t176: the loop's own calls salted with the tenant alone, leaving out the client's own
    ``cache_salt``, so the end users of one tenant shared the prefix cache whenever a request
    speculated. Each server must get the salt a plain request with that client salt gets."""
    large, small = servers
    keys = f'    - {{id: acme, tenant: acme, hash: "{hash_key("key-acme")}"}}'
    policy = (
        _policy(large, small)
        .replace("    tier: small\n", "    tier: small\n    tenant_cache_salt: true\n", 1)
        .replace(
            "    tier: large\n    # min_speedup", "    tier: large\n    tenant_cache_salt: true\n    # min_speedup", 1
        )
        .replace("    tier: large\nroutes", "    tier: large\n    tenant_cache_salt: true\nroutes", 1)
        .replace("auth: {mode: none}", "auth:\n  mode: keys\n  keys:\n" + keys)
    )
    write_tokenizer_json(str(tmp_path / "tokenizer.json"))
    # one secret for every model, so "large-plain" salts as "large" does (keyed on the name otherwise)
    env = {"REDIS_URL": redis_server.url, "GATEWAY_CACHE_SALT_KEY": "spec-salt-secret"}
    gateway = start_gateway(tmp_path, policy, env=env)

    def salts(model: str, client_salt: str | None) -> tuple[list[str], list[str]]:
        large.reset()
        small.reset()
        extra = {} if client_salt is None else {"cache_salt": client_salt}
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            headers={"authorization": "Bearer key-acme"},
            json={"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8,
                  "temperature": 0, **extra},
            timeout=30,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        if model == "best":
            record = gateway.wait_for_record(response.headers["x-request-id"])
            assert record["speculation"]["mode"] == "gateway", record
        return large.stats()["salts"], small.stats()["salts"]

    try:
        assert gateway.wait_for_ops("speculation_pair_ok"), gateway.stderr_text()[-3000:]  # else it goes plain
        seen: dict[str | None, tuple[list[str], list[str]]] = {}
        for client_salt in ("u1", "u2", None):
            plain = (salts("large-plain", client_salt)[0], salts("small", client_salt)[1])
            assert len(plain[0]) == len(plain[1]) == 1, plain
            seen[client_salt] = salts("best", client_salt)
            assert seen[client_salt] == plain, client_salt
        assert len({large_salts[0] for large_salts, _ in seen.values()}) == 3  # one partition per client salt
    finally:
        gateway.stop()


def test_a_hung_draft_server_costs_requests_no_first_byte_timeout(
    tmp_path: Path, redis_server: EmbeddedRedis, servers: tuple[ToyServer, ToyServer]
) -> None:
    """t105: with the draft server hung, the pair check (at start, and on each request after it
    failed) waited the small model's first-byte timeout, and concurrent requests queued behind it
    one check after another. Now the check has the draft's deadline and starts the cooldown, and
    no request waits for another's check: every request is answered plainly, at once."""
    large, small = servers
    policy = (
        _policy(large, small)
        .replace("    tier: small\n", "    tier: small\n    timeouts: {first_byte: 60}\n", 1)
        .replace("min_speedup: 0}", "min_speedup: 0, draft_timeout_ms: 300, draft_cooldown_s: 60}", 1)
    )
    write_tokenizer_json(str(tmp_path / "tokenizer.json"))
    small.reset()
    small.fail_after(0, "hang")  # before the gateway starts: its own check at start meets it
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url})
    try:
        messages = [{"role": "user", "content": PROMPTS[0]}]

        def ask(model: str) -> httpx.Response:
            body = {"model": model, "messages": messages, "max_tokens": 12, "temperature": 0}
            return httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=20)  # under the 60 s

        want = ask("large-plain").json()["choices"][0]["message"]["content"]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(ask, ["best"] * 3))
        for response in responses:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == want
            speculation = gateway.wait_for_record(response.headers["x-request-id"])["speculation"]
            assert speculation["mode"] == "plain", speculation
            assert speculation["fallback_reason"] in ("pair_unchecked", "pair_checking"), speculation
        assert gateway.wait_for_ops("speculation_pair_unchecked"), (
            gateway.stderr_text()
        )  # the check's own line comes late
    finally:
        gateway.stop()
        small.reset()


def test_a_large_server_that_answers_no_token_fails_the_request_rather_than_asking_for_ever(
    gateway: GatewayProcess, servers: tuple[ToyServer, ToyServer]
) -> None:
    """t76: a round with nothing drafted (one token left, or prompt lookup without a match) whose
    verification came back with no token made no progress, and the loop asked again: 28,510
    calls to the large server in 15 s, until the request's total timeout."""
    large, _ = servers
    body = {"model": "best", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 1, "temperature": 0}
    assert httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30).status_code == 200  # pair checked
    large.reset()
    large.fail_after(0, "empty")
    try:
        response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
        calls = large.stats()["completions"]
    finally:
        large.reset()
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_bad_response", response.text
    assert calls <= 3
