"""A streamed chat answer's usage chunk says what the whole answer's usage does (t150).

The loopback upstream answers as OpenAI does, with the usage details the gateway does not bill
on (predicted output's accepted and rejected tokens, audio tokens): the gateway writes the
stream's usage chunk itself, and wrote the billed counts alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test
from tests.gateway_process import GatewayProcess, policy_text, running_gateway
from tests.loopback_app import serve_app, write_sse

_MODELS = """  detailed:
    base_url: {url}/v1
    upstream_model: gpt-4o
    tier: large
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 20}}
"""

_OPENAIS_USAGE: dict[str, Any] = {
    "prompt_tokens": 12,
    "completion_tokens": 6,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 2,
        "rejected_prediction_tokens": 3,
    },
}
_USAGE = {  # with what a router says of the operator's account beside it (OpenRouter's cost)
    **_OPENAIS_USAGE,
    "cost": 0.00042,
    "is_byok": False,
    "cost_details": {"upstream_inference_cost": 0.0004},
    "prompt_tokens_details": {**_OPENAIS_USAGE["prompt_tokens_details"], "operator_only": 1},
    "completion_tokens_details": {**_OPENAIS_USAGE["completion_tokens_details"], "operator_only": 2},
}
_TEXT = "one two three"


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    head = {"id": "chatcmpl-up", "created": 1, "model": "gpt-4o", "system_fingerprint": "fp_up"}
    if not body.get("stream"):
        message = {"role": "assistant", "content": _TEXT}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _USAGE})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    every = (body.get("stream_options") or {}).get("continuous_usage_stats")  # vLLM's: usage on every chunk
    for delta, finish in (({"role": "assistant", "content": _TEXT}, None), ({}, "stop")):
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        usage = _USAGE if every else None
        await write_sse(response, {**head, "object": "chat.completion.chunk", "choices": [choice], "usage": usage})
    await write_sse(response, {**head, "object": "chat.completion.chunk", "choices": [], "usage": _USAGE})
    await write_sse(response, b"[DONE]")
    return response


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    with serve_app({"/v1/chat/completions": _openai}, name="usage-details-upstream") as served:
        policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=served.url))
        workdir: Path = tmp_path_factory.mktemp("usagedetails")
        with running_gateway(workdir, policy, env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"}) as process:
            yield process


@pytest.mark.parametrize("max_tokens", [None, 2], ids=["upstream-usage", "usage-refused"])
def test_a_streamed_usage_chunk_carries_the_whole_answers_details(
    gateway: GatewayProcess, max_tokens: int | None
) -> None:
    """With ``max_tokens: 2`` the upstream's 6 completion tokens cannot be its count: the gateway
    bills its own, and both answers carry only what it counted."""
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    ask: Any = {"model": "detailed", "messages": [{"role": "user", "content": "Count."}]}
    if max_tokens is not None:
        ask["max_tokens"] = max_tokens
    whole = client.chat.completions.with_raw_response.create(**ask)
    with client.chat.completions.with_streaming_response.create(
        **ask, stream=True, stream_options={"include_usage": True}
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    said = chunks[-1].usage
    assert chunks[-1].choices == [] and said is not None
    assert said.model_dump() == whole.parse().usage.model_dump()
    record = gateway.wait_for_record(request_id)
    assert (said.prompt_tokens, said.completion_tokens) == (record["prompt_tokens"], record["completion_tokens"])
    details = said.completion_tokens_details
    if max_tokens is None:
        assert record["tokens_source"] == "upstream"
        assert details is not None and (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (
            2,
            3,
        )
        assert details.audio_tokens == 0 and said.prompt_tokens_details is not None
        assert said.prompt_tokens_details.audio_tokens == 0
    else:
        assert record["tokens_source"] == "gateway" and record["usage_refused"] == "completion_over_max_tokens"
        assert details is not None and details.accepted_prediction_tokens is None


def test_a_client_is_told_only_the_usage_fields_openai_defines(gateway: GatewayProcess) -> None:
    """t159: what else an upstream's usage said (OpenRouter's ``cost`` of the operator's account,
    any private field, in the usage or its details) reached the tenant, in the whole answer and
    in the stream's usage chunk."""
    client = closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0))
    ask: Any = {"model": "detailed", "messages": [{"role": "user", "content": "Count."}]}
    whole = client.chat.completions.with_raw_response.create(**ask)
    assert msgspec.json.decode(whole.content)["usage"] == _OPENAIS_USAGE
    with client.chat.completions.with_streaming_response.create(
        **ask, stream=True, stream_options={"include_usage": True}
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert msgspec.json.decode(lines[-1].removeprefix("data: "))["usage"] == _OPENAIS_USAGE
    every: Any = {"include_usage": True, "continuous_usage_stats": True}  # as vLLM takes it, on every chunk
    with client.chat.completions.with_streaming_response.create(**ask, stream=True, stream_options=every) as response:
        said = [msgspec.json.decode(line.removeprefix("data: "))["usage"] for line in response.iter_lines()
                if line.startswith("data: {")]  # fmt: skip
    assert len(said) == 3 and all(usage == _OPENAIS_USAGE for usage in said), said
