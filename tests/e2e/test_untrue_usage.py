"""t103: an upstream's usage no answer can have is billed at the gateway's own count, as one
that sends none is (``tokens_source: "gateway"``), and the log says why (``usage_refused``).

A prompt of 10**15 tokens on a model of 8,192 was billed $10**9 and spent the tenant's daily
budget; a usage of zeros made an answer free. The simulated upstreams report the counts a
fault writes over their own; every model of the test policy has a window of 8,192 tokens."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.simulated import SimulatedUpstream
from tests.conftest import inject
from tests.gateway_process import GatewayProcess

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "alpha beta gamma"}]

_UNTRUE = [
    ({"prompt_tokens": 10**15}, {}, "prompt_over_window"),
    ({"completion_tokens": 10**9}, {}, "completion_over_window"),
    ({"completion_tokens": 51}, {"max_tokens": 50}, "completion_over_max_tokens"),
    ({"completion_tokens": 101}, {"max_completion_tokens": 50, "n": 2}, "completion_over_max_tokens"),
    ({"prompt_tokens": 0, "completion_tokens": 0}, {}, "no_completion_tokens"),
    ({"prompt_tokens": 0}, {}, "no_prompt_tokens"),
]
_IDS = ["huge-prompt", "huge-completion", "over-max-tokens", "over-n-times-max", "zeros", "no-prompt"]


def _chat(client: openai.OpenAI, stream: bool, **extra: Any) -> tuple[str, tuple[int, int]]:
    """One chat request: its id and the usage its client was told."""
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="fast", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **extra
        ) as response:
            usage = list(response.parse())[-1].usage
            request_id = response.headers["x-request-id"]
    else:
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES, **extra)
        usage, request_id = raw.parse().usage, raw.headers["x-request-id"]
    assert usage is not None
    return request_id, (usage.prompt_tokens, usage.completion_tokens)


def _counted(
    gateway: GatewayProcess, client: openai.OpenAI, small: SimulatedUpstream, stream: bool, **extra: Any
) -> dict[str, Any]:
    """The log line of the same request answered without usage: the gateway's own count."""
    inject(small, {"omit_usage": True})
    request_id, _ = _chat(client, stream, **extra)
    return gateway.wait_for_record(request_id)


def _warned(gateway: GatewayProcess, request_id: str) -> list[tuple[str, str]]:
    """The ``usage_refused`` warnings of one request (model, reason), waited for: stderr is
    written apart from the request log, and may be read between the two."""
    deadline = time.monotonic() + 30
    while True:
        said = [
            (e["model"], e["reason"]) for e in gateway.ops_records("usage_refused") if e["request_id"] == request_id
        ]
        if said or time.monotonic() >= deadline:
            return said
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("usage", "extra", "reason"), _UNTRUE, ids=_IDS)
def test_a_chat_usage_that_cannot_be_true_is_billed_at_the_gateways_count(
    client: openai.OpenAI,
    gateway: GatewayProcess,
    small_upstream: SimulatedUpstream,
    stream: bool,
    usage: dict[str, int],
    extra: dict[str, Any],
    reason: str,
) -> None:
    counted = _counted(gateway, client, small_upstream, stream, **extra)
    inject(small_upstream, {"usage": usage})
    request_id, told = _chat(client, stream, **extra)
    record = gateway.wait_for_record(request_id)
    assert (record["tokens_source"], record["usage_refused"]) == ("gateway", reason)
    billed = (record["prompt_tokens"], record["completion_tokens"])
    assert billed == (counted["prompt_tokens"], counted["completion_tokens"]) and told == billed
    assert 0 < record["cost_usd"] == pytest.approx(counted["cost_usd"])
    assert _warned(gateway, request_id) == [("small", reason)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_large_counts_an_answer_can_have_are_the_upstreams(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """A prompt near the window, and ``n`` completions that together pass ``max_tokens``, are billed
    as the upstream says."""
    inject(small_upstream, {"usage": {"prompt_tokens": 8000, "completion_tokens": 95}})
    request_id, told = _chat(client, stream, max_tokens=50, n=2)
    record = gateway.wait_for_record(request_id)
    assert (record["tokens_source"], record["usage_refused"]) == ("upstream", None)
    assert (record["prompt_tokens"], record["completion_tokens"]) == told == (8000, 95)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_anthropic_usage_past_the_window_is_refused_and_its_cache_reads_are_not(
    claude: anthropic.Anthropic, gateway: GatewayProcess, large_upstream: SimulatedUpstream, stream: bool
) -> None:
    """Anthropic counts a prompt in three parts (``input_tokens`` and the cache's reads and writes):
    their sum is the prompt held against the window."""
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "alpha beta gamma"}]

    def ask(usage: dict[str, int]) -> tuple[dict[str, Any], anthropic.types.Usage]:
        inject(large_upstream, {"usage": usage})
        if stream:
            with claude.messages.stream(model="claude", max_tokens=64, messages=messages) as answer:
                said, request_id = answer.get_final_message().usage, answer.response.headers["x-request-id"]
        else:
            raw = claude.messages.with_raw_response.create(model="claude", max_tokens=64, messages=messages)
            said, request_id = raw.parse().usage, raw.headers["x-request-id"]
        return gateway.wait_for_record(request_id), said

    record, said = ask({"input_tokens": 10, "cache_read_input_tokens": 8000, "cache_creation_input_tokens": 100})
    assert (record["tokens_source"], record["prompt_tokens"], record["cached_prompt_tokens"]) == (
        "upstream",
        8110,
        8000,
    )
    for usage, reason in (
        ({"input_tokens": 10, "cache_read_input_tokens": 10**12}, "prompt_over_window"),
        ({"output_tokens": 65}, "completion_over_max_tokens"),
        ({"output_tokens": 0}, "no_completion_tokens"),
    ):
        record, said = ask(usage)
        assert (record["tokens_source"], record["usage_refused"]) == ("gateway", reason)
        assert 0 < record["prompt_tokens"] < 100 and 0 < record["completion_tokens"] <= 64
        assert record["cached_prompt_tokens"] == 0 and record["cost_usd"] < 0.01
        assert (said.input_tokens, said.output_tokens) == (record["prompt_tokens"], record["completion_tokens"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["fast", "gpt"], ids=["translated", "responses-upstream"])
def test_a_responses_usage_past_the_window_is_billed_at_the_gateways_count(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool, model: str
) -> None:
    inject(small_upstream, {"usage": {"prompt_tokens": 10**15}})
    text = "alpha beta gamma"
    if stream:
        with client.responses.with_streaming_response.create(
            model=model, input=text, max_output_tokens=64, stream=True
        ) as response:
            said = next(e.response.usage for e in response.parse() if e.type == "response.completed")
            request_id = response.headers["x-request-id"]
    else:
        raw = client.responses.with_raw_response.create(model=model, input=text, max_output_tokens=64)
        said, request_id = raw.parse().usage, raw.headers["x-request-id"]
    record = gateway.wait_for_record(request_id)
    assert (record["tokens_source"], record["usage_refused"]) == ("gateway", "prompt_over_window")
    assert 0 < record["prompt_tokens"] < 100 and record["cost_usd"] < 0.01
    if model == "fast":  # translated: told the counts billed (a relayed answer is its upstream's own)
        assert said is not None and said.input_tokens == record["prompt_tokens"]


def test_a_completions_usage_of_zeros_is_billed_at_the_gateways_count(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"usage": {"prompt_tokens": 0, "completion_tokens": 0}})
    response = httpx.post(f"{gateway.base_url}/completions", json={"model": "fast", "prompt": "alpha beta"}, timeout=15)
    assert response.status_code == 200, response.text
    record = gateway.wait_for_record(response.headers["x-request-id"])
    assert (record["tokens_source"], record["usage_refused"]) == ("gateway", "no_completion_tokens")
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0 and record["cost_usd"] > 0
    said = response.json()["usage"]
    assert (said["prompt_tokens"], said["completion_tokens"]) == (record["prompt_tokens"], record["completion_tokens"])


@pytest.mark.parametrize("said", [10**15, 0])
def test_an_embeddings_count_that_cannot_be_true_is_the_gateways(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream, said: int
) -> None:
    """The embeddings provider holds a batch's count to the inputs' size (more tokens than bytes, or
    0 for text, is none): billed as an answer without usage is."""
    billed = []
    for fault in ({"omit_usage": True}, {"usage": {"prompt_tokens": said}}):
        inject(small_upstream, fault)
        raw = client.embeddings.with_raw_response.create(model="embed", input=["alpha beta", "gamma"])
        record = gateway.wait_for_record(raw.headers["x-request-id"])
        assert record["tokens_source"] == "gateway" and raw.parse().usage.prompt_tokens == record["prompt_tokens"]
        billed.append((record["prompt_tokens"], record["cost_usd"]))
    assert billed[1] == billed[0] and billed[0][0] > 0


def test_an_embeddings_count_past_the_window_of_each_input_is_the_gateways(
    client: openai.OpenAI, gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t136: an upstream that bills a byte a token was billed 30,032 tokens for one 30,000-byte
    input on a model of 8,192 (``tokens_source: "upstream"``): within the inputs' bytes, the count
    was not held to the window. No input is longer than the window; a batch may be."""
    long = "word " * 6000  # 30,000 bytes, some 6,000 tokens as the gateway counts them
    inject(small_upstream, {"omit_usage": True})
    counted = gateway.wait_for_record(
        client.embeddings.with_raw_response.create(model="embed", input=[long, "short"]).headers["x-request-id"]
    )
    inject(small_upstream, {"usage": {"prompt_tokens": 30_000}})
    raw = client.embeddings.with_raw_response.create(model="embed", input=[long, "short"])
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert (record["tokens_source"], record["usage_refused"]) == ("gateway", "prompt_over_window")
    assert raw.parse().usage.prompt_tokens == record["prompt_tokens"] == counted["prompt_tokens"] < 8192
    assert _warned(gateway, raw.headers["x-request-id"]) == [("embed", "prompt_over_window")]
    inject(small_upstream, {"usage": {"prompt_tokens": 12_000}})  # two long inputs: within two windows
    raw = client.embeddings.with_raw_response.create(model="embed", input=[long, f"{long} again"])
    record = gateway.wait_for_record(raw.headers["x-request-id"])
    assert (record["tokens_source"], record["usage_refused"], record["prompt_tokens"]) == ("upstream", None, 12_000)
